"""Predict with a Presso bundle using only ONNX Runtime, NumPy and Pillow -- no PyTorch, no Presso needed.

This file is self-contained on purpose: ``presso package`` copies it into every bundle as ``predict.py``, so on a
device ``python predict.py bundle.zip image.jpg`` works with ``pip install onnxruntime numpy pillow`` alone, and
``presso predict`` runs exactly the same code. Keep its imports to the standard library, NumPy, Pillow and ONNX
Runtime.

Opening a bundle never extracts it: only ``model.onnx`` and ``presso.json`` are read, into memory, after checking
every member's name (no absolute paths, no ``..``, no links), their count, their declared sizes against a limit
each, and their compression ratio (zip bombs); never more than a member declares is inflated. What the card and
the model then declare is checked against each other (preprocessing, input channels and size, classes, labels; no
external data), so a hostile or damaged bundle is refused with one clear message before an image is scored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
MAX_TOTAL_BYTES = 4 << 30  # 4 GiB uncompressed in all, declared
MAX_RATIO = 200  # a member may not expand more than this (zip bombs); tiny members are exempt
# What predicting reads, and at most how much of each (declared in the zip header, checked before reading): the
# model (protobuf's own limit; larger models need external data, which a bundle refuses) and the card. Nothing else
# in a bundle is ever read, so padding in another member costs nothing.
MEMBER_LIMITS = {MODEL_MEMBER: (2 << 30) - 1, CARD_MEMBER: 16 << 20}
MAX_MODEL_RATIO = 50  # weights barely compress (about 1.1x); a model.onnx that expands more is padding
MAX_CARD_DEPTH = 64  # cards nest about 6 deep
MAX_IMAGE_SIDE = 4096
CHUNK = 64  # images decoded and scored at a time


try:  # inside Presso, its named errors (the CLI prints them as one line); standalone in a bundle, local ones
    from presso.errors import BundleError, ConfigError
except ImportError:  # pragma: no cover - exercised by the torch-free subprocess test

    class BundleError(Exception):  # type: ignore[no-redef]
        """The bundle is missing, damaged or unsafe."""

    class ConfigError(ValueError):  # type: ignore[no-redef]
        """A setting (such as --top-k) is out of range."""


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


def _check_needed(info: zipfile.ZipInfo) -> None:
    """The declared size of a member predicting reads, before a byte of it is inflated."""
    limit = MEMBER_LIMITS[info.filename]
    if info.file_size > limit:
        raise BundleError(
            f"Refusing the bundle: {info.filename} declares {info.file_size} bytes (limit {limit}); "
            "not a bundle 'presso package' writes."
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.filename == MODEL_MEMBER and info.file_size > (1 << 20) and ratio > MAX_MODEL_RATIO:
        raise BundleError(
            f"Refusing the bundle: {MODEL_MEMBER} expands {ratio:.0f}x (limit {MAX_MODEL_RATIO}x; weights barely "
            "compress), so it is mostly padding."
        )


def read_members(
    path: str | Path,
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    names: tuple[str, ...] = (MODEL_MEMBER, CARD_MEMBER),
) -> dict[str, bytes]:
    """The members named in ``names`` (what predicting needs), read into memory after the safety checks above.

    Every member's name, type and compression ratio is checked from the zip's directory; only ``names`` are read,
    each after its declared size is checked against ``MEMBER_LIMITS``, and never more than it declares.
    """
    return _read(path, max_total_bytes, names)[0]


def _read(path: str | Path, max_total_bytes: int, names: tuple[str, ...]) -> tuple[dict[str, bytes], list[str]]:
    """``read_members``, and the names of every member of the bundle."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"No bundle at '{path}'; create one with 'presso package MODEL -o bundle.zip'.")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BundleError(f"'{path}' is not a readable zip bundle ({e}); re-create it with 'presso package'.") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_MEMBERS:
            raise BundleError(f"Refusing the bundle: {len(infos)} members (at most {MAX_MEMBERS}).")
        declared, seen = 0, set()
        for info in infos:
            _check_member(info)
            if info.filename in seen:
                raise BundleError(f"Refusing the bundle: member '{info.filename}' appears twice.")
            seen.add(info.filename)
            declared += info.file_size
        if declared > max_total_bytes:
            raise BundleError(f"Refusing the bundle: it expands to {declared} bytes (limit {max_total_bytes}).")
        for required in (MODEL_MEMBER, CARD_MEMBER):
            if required not in seen:
                raise BundleError(
                    f"'{path}' has no {required}; it is not a Presso bundle (make one with presso package)."
                )
        out: dict[str, bytes] = {}
        for info in infos:
            if info.filename not in names:
                continue
            if info.filename in MEMBER_LIMITS:
                _check_needed(info)
            # the declared size can lie: read at most one byte more than it and compare
            try:
                with zf.open(info) as f:
                    data = f.read(info.file_size + 1)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError) as e:
                raise BundleError(f"Member '{info.filename}' of '{path}' cannot be read ({e}).") from None
            except Exception as e:  # zlib.error, lzma.LZMAError: damaged compressed data
                raise BundleError(f"Member '{info.filename}' of '{path}' is damaged ({type(e).__name__}).") from None
            if len(data) != info.file_size:
                raise BundleError(f"Refusing the bundle: member '{info.filename}' is not the size it declares.")
            out[info.filename] = data
    return out, sorted(seen)


@dataclass
class Bundle:
    """An opened bundle: the ONNX model bytes, the card (input spec, preprocessing, labels, lineage, figures) and
    the names of all its members (only the model and the card are read)."""

    model: bytes
    card: dict[str, Any]
    members: list[str]

    @property
    def labels(self) -> list[str] | None:
        return self.card.get("labels")

    @property
    def preprocess(self) -> dict[str, Any] | None:
        return self.card.get("preprocess")


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (a linear scan: hostile depth never reaches the parser). The same scan
    as ``presso.safeio``'s, repeated because this file runs on devices without presso installed."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def open_bundle(path: str | Path) -> Bundle:
    members, names = _read(path, MAX_TOTAL_BYTES, (MODEL_MEMBER, CARD_MEMBER))
    try:
        text = members[CARD_MEMBER].decode("utf-8")
        if _depth(text) > MAX_CARD_DEPTH:
            raise ValueError(f"it nests deeper than {MAX_CARD_DEPTH} levels")
        card = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{CARD_MEMBER} in '{path}' is damaged ({e}).") from None
    if not isinstance(card, dict) or card.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(f"'{path}' is not a Presso bundle ({CARD_MEMBER} lacks bundle_format '{BUNDLE_FORMAT}').")
    return Bundle(model=members[MODEL_MEMBER], card=card, members=names)


# --------------------------------------------------------------------------- what the card and the model declare
def check_preprocess(pp: Any) -> dict[str, Any]:
    """The card's preprocessing, checked: size (H, W) of ints in [1, MAX_IMAGE_SIDE], 1 or 3 channels, finite mean
    and std > 0 per channel (std 0 would divide every pixel by zero and give NaN scores)."""
    if not pp:
        raise BundleError("The bundle records no preprocessing; re-package a model trained with presso train.")
    bad = "The bundle's card has malformed preprocessing"
    if not isinstance(pp, dict):
        raise BundleError(f"{bad} (not an object); re-create the bundle with presso package.")
    size, channels, mean, std = (pp.get(k) for k in ("size", "channels", "mean", "std"))
    if channels not in (1, 3) or isinstance(channels, bool):
        raise BundleError(f"{bad}: channels must be 1 or 3, not {channels!r:.40}.")
    if not (
        isinstance(size, list) and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in size)
    ):  # fmt: skip
        raise BundleError(f"{bad}: size must be [height, width] in 1..{MAX_IMAGE_SIDE}, not {size!r:.60}.")
    for key, values in (("mean", mean), ("std", std)):
        ok = isinstance(values, list) and len(values) == channels
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or (key == "std" and min(values) <= 0):
            need = " > 0" if key == "std" else ""
            raise BundleError(f"{bad}: {key} must be {channels} finite number(s){need}, not {values!r:.60}.")
    return {**pp, "size": list(size), "channels": channels, "mean": list(mean), "std": list(std)}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


# message kind -> {field: kind of the nested message}; "tensor" fields 13/14 are external_data / data_location
_NESTED = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}


def external_data(model: bytes) -> str | None:
    """Where the first tensor stored outside the model points (``location``), or None when every tensor is inside.

    A walk of the ONNX protobuf's wire format (no ``onnx`` package on a device): initializers, constants and
    subgraphs at any depth. ONNX Runtime would read such a location relative to the working directory -- any file
    on the machine -- so a bundle holding one is refused. Raises ``ValueError`` when the bytes are not protobuf.
    """
    stack = [("model", 0, len(model))]
    while stack:
        kind, i, end = stack.pop()
        nested = _NESTED[kind]
        while i < end:
            key, i = _varint(model, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(model, i)
                if kind == "tensor" and field == 14 and value == 1:
                    return "(data_location EXTERNAL)"
            elif wire == 1 or wire == 5:
                i += 8 if wire == 1 else 4
            elif wire == 2:
                n, i = _varint(model, i)
                if i + n > end:
                    raise ValueError("a field runs past its message")
                if kind == "tensor" and field == 13:
                    return _location(model[i : i + n])
                if field in nested:
                    stack.append((nested[field], i, i + n))
                i += n
            else:
                raise ValueError(f"wire type {wire}")
        if i != end:
            raise ValueError("a field runs past its message")
    return None


def _location(entry: bytes) -> str:
    i, found = 0, {}
    while i < len(entry):
        key, i = _varint(entry, i)
        if key & 7 != 2:
            break
        n, i = _varint(entry, i)
        found[key >> 3] = entry[i : i + n].decode("utf-8", "replace")
        i += n
    return found.get(2, "?") if found.get(1) == "location" else "(external data)"


class Predictor:
    """Class scores for images, from a bundle, on ONNX Runtime's CPU provider.

    Everything the card and the model declare is checked against each other before the first image: the
    preprocessing (``check_preprocess``), the model's one image input ``[N, C, H, W]`` (channels and size as the
    card says), its ``[N, classes]`` output, the labels (one per class), and no external data.
    """

    def __init__(self, bundle: Bundle | str | Path, threads: int | None = None):
        import onnxruntime as ort

        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
            raise ConfigError(f"threads must be a positive number of threads, not {threads!r}.")
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.pp = check_preprocess(self.bundle.preprocess)
        labels = self.bundle.labels
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise BundleError("The bundle's card has malformed labels (not a list of names).")
        try:
            where = external_data(self.bundle.model)
        except ValueError as e:
            raise BundleError(f"{MODEL_MEMBER} in the bundle is not an ONNX model ({e}).") from None
        if where is not None:
            raise BundleError(
                f"Refusing the bundle: {MODEL_MEMBER} keeps weights outside itself (external data at {where!r:.80}), "
                "which would read files on this machine; re-export it with the weights inside."
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(self.bundle.model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own errors: InvalidProtobuf, Fail, NotImplemented, ...
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise BundleError(f"ONNX Runtime cannot load {MODEL_MEMBER} from the bundle: {first}") from None
        self._check_model()

    def _check_model(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise BundleError(
                f"The bundle's model takes {len(inputs)} inputs and gives {len(outputs)} outputs; predict feeds one "
                "image batch and reads one score per class."
            )
        first = inputs[0]
        self.input_name = first.name
        if first.type not in ("tensor(float)", "tensor(float16)"):
            raise BundleError(f"The bundle's model takes {first.type}, not float images.")
        self.dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        shape = list(first.shape)
        want = [self.pp["channels"], *self.pp["size"]]
        if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want, strict=True)):
            raise BundleError(
                f"The bundle's card says images are {want[0]} x {want[1]} x {want[2]} (channels x H x W), but the "
                f"model's input is {shape}; the card does not belong to this model."
            )
        self.batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None  # None: dynamic batch
        out = list(outputs[0].shape or [])
        if out and len(out) != 2:
            raise BundleError(f"The bundle's model outputs shape {out}, not [batch, classes]: it is not a classifier.")
        self.num_classes = out[1] if len(out) == 2 and isinstance(out[1], int) and out[1] > 0 else None
        labels = self.bundle.labels
        if labels is not None and self.num_classes is not None and len(labels) != self.num_classes:
            raise BundleError(
                f"The bundle's card names {len(labels)} labels but the model scores {self.num_classes} classes."
            )

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Softmax class scores ``[N, classes]`` for uint8 images ``[N, C, H, W]`` at the model's size."""
        x = normalize(images, self.pp).astype(self.dtype)
        step = self.batch or 32
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if self.batch and len(chunk) < self.batch:  # a fixed batch: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            try:
                out = np.asarray(self.session.run(None, {self.input_name: chunk})[0])
            except Exception as e:  # onnxruntime's errors on a model that does not fit what the card says
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise BundleError(f"The bundle's model fails on its own inputs: {first}") from None
            if out.ndim != 2 or out.shape[0] != len(chunk) or out.shape[1] < 1:
                raise BundleError(f"The bundle's model outputs shape {list(out.shape)}, not [batch, classes].")
            outs.append(out[: min(step, len(x) - i)])
        logits = np.concatenate(outs).astype(np.float64)
        if not np.isfinite(logits).all():
            raise BundleError("The bundle's model gives NaN or infinite scores; the bundle is damaged.")
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def _check_top_k(self, top_k: Any, classes: int | None) -> None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1 or (classes and top_k > classes):
            most = f"1..{classes} (the model's classes)" if classes else "at least 1"
            raise ConfigError(f"top_k must be {most}, not {top_k!r}.")

    def predict(self, paths: list[str | Path], top_k: int = 1) -> list[dict[str, Any]]:
        """Per image: the best class, its label and score, and ``top``: the ``top_k`` best, each with its score."""
        self._check_top_k(top_k, self.num_classes)
        size = (int(self.pp["size"][0]), int(self.pp["size"][1]))
        labels = self.bundle.labels
        results = []
        for start in range(0, len(paths), CHUNK):  # bounded memory for any number of images
            part = paths[start : start + CHUNK]
            probs = self.scores(np.stack([load_image(p, int(self.pp["channels"]), size) for p in part]))
            self._check_top_k(top_k, probs.shape[1])
            if labels is not None and len(labels) != probs.shape[1]:
                raise BundleError(
                    f"The bundle's card names {len(labels)} labels but the model scores {probs.shape[1]}."
                )
            for path, p in zip(part, probs, strict=True):
                top = [
                    {"class": int(c), "label": labels[c] if labels else str(int(c)), "score": float(p[c])}
                    for c in np.argsort(-p, kind="stable")[:top_k]
                ]
                results.append({"image": str(path), **top[0], "top": top})
        return results


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` at ``size`` (H, W): the decoding training used (Pillow, bilinear)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever, a device never ends
            raise BundleError(f"Cannot read image '{path}': not a regular file.")
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except BundleError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise BundleError(f"Cannot read image '{path}': {e}") from None
    except Exception as e:  # a hostile file can make a decoder fail in its own ways (struct.error, IndexError, ...)
        raise BundleError(f"Cannot read image '{path}': {type(e).__name__}: {e}") from None
    return arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def normalize(images: np.ndarray, preprocess: dict[str, Any]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> float32, scaled to [0, 1] and normalised by the recorded mean/std."""
    x = images.astype(np.float32) / 255.0
    mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocess["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with a Presso bundle (ONNX Runtime only).")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).with_name("bundle.zip")))
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = Predictor(args.bundle).predict(args.images, top_k=args.top_k)
    except (BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"predictions": results}))
    else:  # one line per image: its k best labels, each with its score
        for r in results:
            print("\t".join([r["image"], *(f"{t['label']}\t{t['score']:.4f}" for t in r["top"])]))
    return 0


if __name__ == "__main__":  # `python predict.py bundle.zip IMAGE...` inside or beside an unpacked bundle
    sys.exit(main())
