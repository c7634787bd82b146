"""Predict with a Presso bundle using only ONNX Runtime, NumPy and Pillow -- no PyTorch, no Presso needed.

This file is self-contained on purpose: ``presso package`` copies it into every bundle as ``predict.py``, so on a
device ``python predict.py bundle.zip image.jpg`` works with ``pip install onnxruntime numpy pillow`` alone, and
``presso predict`` runs exactly the same code. Keep its imports to the standard library, NumPy, Pillow and ONNX
Runtime.

Opening a bundle never extracts it: members are read into memory after checking their names (no absolute paths, no
``..``, no links), their count, their declared and actual sizes, and their compression ratio (zip bombs), so a
hostile archive is refused with a clear message before anything is written or run.
"""

from __future__ import annotations

import argparse
import json
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

BUNDLE_FORMAT = "presso-bundle"
MODEL_MEMBER = "model.onnx"
CARD_MEMBER = "presso.json"
MAX_MEMBERS = 64
MAX_TOTAL_BYTES = 4 << 30  # 4 GiB uncompressed in all
MAX_RATIO = 200  # a member may not expand more than this (zip bombs); tiny members are exempt


try:  # inside Presso, its named error (the CLI prints it as one line); standalone in a bundle, a local one
    from presso.errors import BundleError
except ImportError:  # pragma: no cover - exercised by the torch-free subprocess test

    class BundleError(Exception):  # type: ignore[no-redef]
        """The bundle is missing, damaged or unsafe."""


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise BundleError(f"Refusing the bundle: member '{name}' points outside the bundle (path traversal).")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BundleError(f"Refusing the bundle: member '{name}' is a symbolic link.")
    if info.file_size > 4096 and info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
        raise BundleError(
            f"Refusing the bundle: member '{name}' expands {info.file_size / info.compress_size:.0f}x "
            f"(limit {MAX_RATIO}x), a zip bomb or not a Presso bundle."
        )


def read_members(path: str | Path, *, max_total_bytes: int = MAX_TOTAL_BYTES) -> dict[str, bytes]:
    """The members of a bundle, read into memory after the safety checks above."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"No bundle at '{path}'; create one with 'presso package MODEL -o bundle.zip'.")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"'{path}' is not a readable zip bundle ({e}); re-create it with 'presso package'.") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_MEMBERS:
            raise BundleError(f"Refusing the bundle: {len(infos)} members (at most {MAX_MEMBERS}).")
        declared = 0
        for info in infos:
            _check_member(info)
            declared += info.file_size
        if declared > max_total_bytes:
            raise BundleError(f"Refusing the bundle: it expands to {declared} bytes (limit {max_total_bytes}).")
        out: dict[str, bytes] = {}
        for info in infos:
            # the declared size can lie: read at most one byte more than it and compare
            with zf.open(info) as f:
                data = f.read(info.file_size + 1)
            if len(data) != info.file_size:
                raise BundleError(f"Refusing the bundle: member '{info.filename}' is not the size it declares.")
            out[info.filename] = data
    for required in (MODEL_MEMBER, CARD_MEMBER):
        if required not in out:
            raise BundleError(f"'{path}' has no {required}; it is not a Presso bundle (make one with presso package).")
    return out


@dataclass
class Bundle:
    """An opened bundle: the ONNX model bytes and the card (input spec, preprocessing, labels, lineage, figures)."""

    model: bytes
    card: dict[str, Any]
    members: list[str]

    @property
    def labels(self) -> list[str] | None:
        return self.card.get("labels")

    @property
    def preprocess(self) -> dict[str, Any] | None:
        return self.card.get("preprocess")


def open_bundle(path: str | Path) -> Bundle:
    members = read_members(path)
    try:
        card = json.loads(members[CARD_MEMBER].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{CARD_MEMBER} in '{path}' is damaged ({e}).") from None
    if not isinstance(card, dict) or card.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(f"'{path}' is not a Presso bundle ({CARD_MEMBER} lacks bundle_format '{BUNDLE_FORMAT}').")
    return Bundle(model=members[MODEL_MEMBER], card=card, members=sorted(members))


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` at ``size`` (H, W): the decoding training used (Pillow, bilinear)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise BundleError(f"Cannot read image '{path}': {e}") from None
    return arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def normalize(images: np.ndarray, preprocess: dict[str, Any]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> float32, scaled to [0, 1] and normalised by the recorded mean/std."""
    x = images.astype(np.float32) / 255.0
    mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocess["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


class Predictor:
    """Class scores for images, from a bundle, on ONNX Runtime's CPU provider."""

    def __init__(self, bundle: Bundle | str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        pp = self.bundle.preprocess
        if not pp:
            raise BundleError("The bundle records no preprocessing; re-package a model trained with presso train.")
        self.pp = pp
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.bundle.model, opts, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.batch = first.shape[0] if isinstance(first.shape[0], int) else None  # None: dynamic batch

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Softmax class scores ``[N, classes]`` for uint8 images ``[N, C, H, W]`` at the model's size."""
        x = normalize(images, self.pp)
        step = self.batch or 32
        outs = [self.session.run(None, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        logits = np.concatenate(outs).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, paths: list[str | Path], top_k: int = 1) -> list[dict[str, Any]]:
        size = (int(self.pp["size"][0]), int(self.pp["size"][1]))
        images = np.stack([load_image(p, int(self.pp["channels"]), size) for p in paths])
        probs = self.scores(images)
        labels = self.bundle.labels
        results = []
        for path, p in zip(paths, probs, strict=True):
            order = np.argsort(-p)[:top_k]
            top = [
                {"class": int(c), "label": labels[c] if labels and c < len(labels) else str(c), "score": float(p[c])}
                for c in order
            ]
            results.append({"image": str(path), **top[0], "top": top})
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with a Presso bundle (ONNX Runtime only).")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).with_name("bundle.zip")))
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = Predictor(args.bundle).predict(args.images, top_k=args.top_k)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"predictions": results}))
    else:
        for r in results:
            print(f"{r['image']}\t{r['label']}\t{r['score']:.4f}")
    return 0


if __name__ == "__main__":  # `python predict.py bundle.zip IMAGE...` inside or beside an unpacked bundle
    sys.exit(main())
