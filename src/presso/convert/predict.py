"""Predict with a Presso bundle using only ONNX Runtime (or LiteRT), NumPy and Pillow -- no PyTorch, no Presso.

This file is self-contained on purpose: ``presso package`` copies it into every bundle as ``predict.py``, so on a
device ``python predict.py bundle.zip image.jpg`` works with ``pip install onnxruntime numpy pillow`` alone, and
``presso predict`` runs exactly the same code. Keep its imports to the standard library, NumPy, Pillow and ONNX
Runtime. Over 500 lines because of that: all a device runs (bundle checks, classification, detection) is one file.
A bundle of a ``convert --to litert`` model holds ``model.tflite`` instead and runs on ai-edge-litert's interpreter
(``pip install ai-edge-litert numpy pillow``), behind the same checks (``_LiteRTSession``).

Opening a bundle never extracts it: only the model (``model.onnx`` or ``model.tflite``) and ``presso.json`` are
read, into memory, after checking every member's name (no absolute paths, no ``..``, no links), their count, their
declared sizes against a limit each, and their compression ratio (zip bombs); never more than a member declares is
inflated. What the card and the model then declare is checked against each other (preprocessing, input channels
and size, classes, labels; no external data), so a hostile or damaged bundle is refused with one clear message
before an image is scored.
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
TFLITE_MEMBER = "model.tflite"  # the model of a LiteRT bundle (card: bundle.runtime "litert")
MODEL_MEMBERS = {"onnxruntime": MODEL_MEMBER, "litert": TFLITE_MEMBER}
CARD_MEMBER = "presso.json"
MAX_MEMBERS = 64
MAX_TOTAL_BYTES = 4 << 30  # 4 GiB uncompressed in all, declared
MAX_RATIO = 200  # a member may not expand more than this (zip bombs); tiny members are exempt
# What predicting reads, and at most how much of each (declared in the zip header, checked before reading): the
# model (protobuf's own limit; larger models need external data, which a bundle refuses) and the card. Nothing else
# in a bundle is ever read, so padding in another member costs nothing.
MEMBER_LIMITS = {MODEL_MEMBER: (2 << 30) - 1, TFLITE_MEMBER: (2 << 30) - 1, CARD_MEMBER: 16 << 20}
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
    if info.filename in (MODEL_MEMBER, TFLITE_MEMBER) and info.file_size > (1 << 20) and ratio > MAX_MODEL_RATIO:
        raise BundleError(
            f"Refusing the bundle: {info.filename} expands {ratio:.0f}x (limit {MAX_MODEL_RATIO}x; weights barely "
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
        for required in (CARD_MEMBER, MODEL_MEMBER):
            if required not in seen and not (required == MODEL_MEMBER and TFLITE_MEMBER in seen):
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
    """An opened bundle: the model bytes, the card (input spec, preprocessing, labels, lineage, figures), the names
    of all its members (only the model and the card are read) and the runtime the model is for."""

    model: bytes
    card: dict[str, Any]
    members: list[str]
    runtime: str = "onnxruntime"  # or "litert": model.tflite

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
    members, names = _read(path, MAX_TOTAL_BYTES, (MODEL_MEMBER, TFLITE_MEMBER, CARD_MEMBER))
    try:
        text = members[CARD_MEMBER].decode("utf-8")
        if _depth(text) > MAX_CARD_DEPTH:
            raise ValueError(f"it nests deeper than {MAX_CARD_DEPTH} levels")
        card = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BundleError(f"{CARD_MEMBER} in '{path}' is damaged ({e}).") from None
    if not isinstance(card, dict) or card.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(f"'{path}' is not a Presso bundle ({CARD_MEMBER} lacks bundle_format '{BUNDLE_FORMAT}').")
    info = card.get("bundle")
    runtime = info.get("runtime", "onnxruntime") if isinstance(info, dict) else "onnxruntime"
    member = MODEL_MEMBERS.get(runtime) if isinstance(runtime, str) else None
    if member is None:
        raise BundleError(f"The bundle's card names the runtime {runtime!r:.40}; predict runs onnxruntime or litert.")
    if member not in members:
        raise BundleError(f"The bundle's card says it runs on {runtime}, but the bundle has no {member}.")
    return Bundle(model=members[member], card=card, members=names, runtime=runtime)


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


class _Port:
    """What ``Predictor`` reads of a model input or output: ONNX Runtime's ``NodeArg`` has the same attributes."""

    def __init__(self, name: str, type: str, shape: list[Any]):
        self.name, self.type, self.shape = name, type, shape


class _LiteRTSession:
    """A LiteRT flatbuffer behind the part of ONNX Runtime's ``InferenceSession`` that ``Predictor`` uses, so both
    runtimes pass the same checks: float inputs and outputs (an int8 file's edges are quantized and dequantized with
    its own scale and zero point), the file's fixed shapes."""

    def __init__(self, model: bytes, threads: int | None):
        try:
            from ai_edge_litert import interpreter
        except ImportError:
            raise BundleError("This bundle runs on LiteRT: pip install ai-edge-litert numpy pillow") from None
        try:
            self.it = interpreter.Interpreter(model_content=model, num_threads=threads or os.cpu_count() or 1)
            self.it.allocate_tensors()
        except Exception as e:  # the interpreter's own errors on a damaged flatbuffer: RuntimeError, ValueError
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise BundleError(f"LiteRT cannot load {TFLITE_MEMBER} from the bundle: {first}") from None
        self.ins, self.outs = self.it.get_input_details(), self.it.get_output_details()

    @staticmethod
    def _port(d) -> _Port:
        kind = "tensor(float)" if d["dtype"] in (np.float32, np.int8, np.uint8) else f"tensor({np.dtype(d['dtype'])})"
        return _Port(d["name"], kind, [int(v) for v in d["shape"]])

    def get_inputs(self) -> list[_Port]:
        return [self._port(d) for d in self.ins]

    def get_outputs(self) -> list[_Port]:
        return [self._port(d) for d in self.outs]

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for d, value in zip(self.ins, feed.values(), strict=True):
            scale, zero = d["quantization"]
            if np.issubdtype(d["dtype"], np.integer) and scale:
                info = np.iinfo(d["dtype"])
                value = np.clip(np.round(value / scale) + zero, info.min, info.max)
            self.it.set_tensor(d["index"], np.asarray(value, dtype=d["dtype"]))
        self.it.invoke()
        outs = []
        for d in self.outs:
            y, (scale, zero) = self.it.get_tensor(d["index"]), d["quantization"]
            outs.append((y.astype(np.float32) - zero) * scale if np.issubdtype(y.dtype, np.integer) and scale else y)
        return outs


class Predictor:
    """Class scores (a classifier) or boxes (a detector: the card's ``task`` is ``detect``) for images, from a
    bundle, on ONNX Runtime's CPU provider (or LiteRT's interpreter for a LiteRT bundle).

    Everything the card and the model declare is checked against each other before the first image: the
    preprocessing (``check_preprocess``), the model's one image input ``[N, C, H, W]`` (channels and size as the
    card says), its output (``[N, classes]``; a detector's dense ``[N, 4 + classes, anchors]``), the labels (one per
    class), and no external data.
    """

    def __init__(self, bundle: Bundle | str | Path, threads: int | None = None):
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
            raise ConfigError(f"threads must be a positive number of threads, not {threads!r}.")
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.pp = check_preprocess(self.bundle.preprocess)
        self.task = "detect" if self.bundle.card.get("task") == "detect" else "classify"
        labels = self.bundle.labels
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise BundleError("The bundle's card has malformed labels (not a list of names).")
        if self.bundle.runtime == "litert":
            self.session = _LiteRTSession(self.bundle.model, threads)
            self._check_model()
            return
        import onnxruntime as ort

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
        labels = self.bundle.labels
        if self.task == "detect":  # one dense output: 4 box rows (centre x, centre y, width, height), one per class
            rows = out[1] if len(out) == 3 and isinstance(out[1], int) else None
            if (out and len(out) != 3) or (rows is not None and (rows < 5 or (labels and rows != 4 + len(labels)))):
                need = f"4 + {len(labels)} labels" if labels else "4 + classes"
                raise BundleError(
                    f"The bundle's card says it detects, but its model outputs shape {out}, not the dense detections "
                    f"[batch, {need}, anchors]; re-export the detector in eval mode with presso convert."
                )
            self.num_classes = rows - 4 if rows else (len(labels) if labels else None)
            return
        if out and len(out) != 2:
            raise BundleError(f"The bundle's model outputs shape {out}, not [batch, classes]: it is not a classifier.")
        self.num_classes = out[1] if len(out) == 2 and isinstance(out[1], int) and out[1] > 0 else None
        if labels is not None and self.num_classes is not None and len(labels) != self.num_classes:
            raise BundleError(
                f"The bundle's card names {len(labels)} labels but the model scores {self.num_classes} classes."
            )

    def _outputs(self, images: np.ndarray, rank: int) -> np.ndarray:
        """The model's first output for uint8 images ``[N, C, H, W]`` at its size, checked to be ``rank``-D."""
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
            if out.ndim != rank or out.shape[0] != len(chunk) or out.shape[1] < (5 if rank == 3 else 1):
                want = "[batch, 4 + classes, anchors]" if rank == 3 else "[batch, classes]"
                raise BundleError(f"The bundle's model outputs shape {list(out.shape)}, not {want}.")
            outs.append(out[: min(step, len(x) - i)])
        out = np.concatenate(outs)
        if not np.isfinite(out).all():
            raise BundleError("The bundle's model gives NaN or infinite scores; the bundle is damaged.")
        return out

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Softmax class scores ``[N, classes]`` for uint8 images ``[N, C, H, W]`` at the model's size."""
        logits = self._outputs(images, 2).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def boxes(self, images: np.ndarray, conf: float = 0.25, iou: float = 0.7) -> list[dict[str, Any]]:
        """A detector's boxes for uint8 images ``[N, C, H, W]`` at the model's size: per image ``{"boxes": xyxy
        [K, 4] in the model's input pixels, "scores", "labels"}``, best first (``decode_dense_numpy``)."""
        _check_thresholds(conf, iou)
        y = self._outputs(images, 3)
        if self.num_classes and y.shape[1] != 4 + self.num_classes:
            raise BundleError(f"The bundle's model outputs {y.shape[1]} rows, not 4 + {self.num_classes} classes.")
        return decode_dense_numpy(y, conf, iou)

    def _check_top_k(self, top_k: Any, classes: int | None) -> None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1 or (classes and top_k > classes):
            most = f"1..{classes} (the model's classes)" if classes else "at least 1"
            raise ConfigError(f"top_k must be {most}, not {top_k!r}.")

    def predict(
        self, paths: list[str | Path], top_k: int = 1, *, conf: float = 0.25, iou: float = 0.7
    ) -> list[dict[str, Any]]:
        """Per image: the best class, its label and score, and ``top``: the ``top_k`` best, each with its score. A
        detector's: ``detections``, each a label, class, score and box (x1, y1, x2, y2 in the image's own pixels,
        clipped to it), best first; ``conf`` the lowest score kept, ``iou`` the NMS threshold."""
        if self.task == "detect":
            return self._detect(paths, conf, iou)
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

    def _detect(self, paths: list[str | Path], conf: float, iou: float) -> list[dict[str, Any]]:
        _check_thresholds(conf, iou)  # before any image is read
        h, w = (int(v) for v in self.pp["size"])
        labels, results = self.bundle.labels, []
        for start in range(0, len(paths), CHUNK):
            part = [_decode_image(p, int(self.pp["channels"]), (h, w)) for p in paths[start : start + CHUNK]]
            found = self.boxes(np.stack([a for a, _ in part]), conf, iou)
            for path, (_, (h0, w0)), d in zip(paths[start : start + CHUNK], part, found, strict=True):
                # the model saw the image resized to (h, w): its boxes scale back to the image's own pixels
                boxes = (d["boxes"] * np.array([w0 / w, h0 / h] * 2)).clip(0, [w0, h0, w0, h0])
                results.append({"image": str(path), "detections": [
                    {"label": labels[c] if labels else str(c), "class": c, "score": round(float(sc), 4),
                     "box": [round(float(v), 2) for v in b]}
                    for b, sc, c in zip(boxes, d["scores"], d["labels"].tolist(), strict=True)
                ]})  # fmt: skip
        return results


def _check_thresholds(conf: Any, iou: Any) -> None:
    number = (int, float)
    if not (isinstance(conf, number) and not isinstance(conf, bool) and 0 <= conf < 1):
        raise ConfigError(f"conf (the lowest box score kept) must be in [0, 1), not {conf!r}.")
    if not (isinstance(iou, number) and not isinstance(iou, bool) and 0 <= iou <= 1):
        raise ConfigError(f"iou (the NMS threshold) must be in [0, 1], not {iou!r}.")


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (240, 50, 230))


def save_drawn(results: list[dict[str, Any]], folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Each image of ``results`` with its boxes and scores (a detector's) or its best label (a classifier's) drawn on
    a copy, written as ``folder/<name>.png`` (``folder`` created). A file already there under one of those names (an
    earlier run's, or the user's) is refused before anything is written unless ``overwrite``; an input image is never
    overwritten. Each file is written beside its name and renamed onto it. Each result gets ``saved``: the file."""
    import secrets

    from PIL import Image, ImageDraw

    folder, names = Path(folder), []
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--save takes a folder, and '{folder}' is a file.")
    inputs = {Path(r["image"]).resolve() for r in results}
    for r in results:  # every name first: refuse before anything is written
        stem, k = Path(r["image"]).stem, 1
        while (name := f"{stem}{f'-{k}' if k > 1 else ''}.png") in names:
            k += 1
        names.append(name)
        if (folder / name).resolve() in inputs:
            raise ConfigError(f"--save would overwrite the input image '{folder / name}'; save to another folder.")
        if not overwrite and os.path.lexists(folder / name):
            raise ConfigError(
                f"--save would overwrite '{folder / name}', which is already there; pass --overwrite to replace it, "
                "or save to another folder."
            )
    folder.mkdir(parents=True, exist_ok=True)
    for r, name in zip(results, names, strict=True):
        try:
            with Image.open(r["image"]) as im:
                im = im.convert("RGB")
        except Exception as e:  # read a moment ago; it changed since
            raise BundleError(f"Cannot read image '{r['image']}' again to draw on it: {e}") from None
        draw, width = ImageDraw.Draw(im), max(1, min(im.size) // 200)
        labels = [(r["label"], r["score"], 0, (2.0, 2.0))] if "top" in r else []  # a classifier's best class
        for d in r.get("detections", []):
            (x1, y1, x2, y2), color = d["box"], PALETTE[d["class"] % len(PALETTE)]
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=width)
            labels.append((d["label"], d["score"], d["class"], (x1, y1 - 11 if y1 >= 11 else y1 + width)))
        for label, score, k, at in labels:  # white on the class's colour: legible on any image
            draw.rectangle(draw.textbbox(at, f"{label} {score:.2f}"), fill=PALETTE[k % len(PALETTE)])
            draw.text(at, f"{label} {score:.2f}", fill=(255, 255, 255))
        # a temporary sibling named as Presso's (presso.outdir), renamed onto the name: never half an image there
        tmp = folder / f".{name}.presso-tmp-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            im.save(tmp, format="PNG")
            os.replace(tmp, folder / name)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        r["saved"] = str(folder / name)
    return [folder / n for n in names]


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` at ``size`` (H, W): the decoding training used (Pillow, bilinear)."""
    return _decode_image(path, channels, size)[0]


def _decode_image(path: str | Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """``load_image`` and the image's own (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever, a device never ends
            raise BundleError(f"Cannot read image '{path}': not a regular file.")
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            own = (im.size[1], im.size[0])
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except BundleError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise BundleError(f"Cannot read image '{path}': {e}") from None
    except Exception as e:  # a hostile file can make a decoder fail in its own ways (struct.error, IndexError, ...)
        raise BundleError(f"Cannot read image '{path}': {type(e).__name__}: {e}") from None
    return (arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()), own


def normalize(images: np.ndarray, preprocess: dict[str, Any]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` -> float32, scaled to [0, 1] and normalised by the recorded mean/std."""
    x = images.astype(np.float32) / 255.0
    mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocess["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- detection: NMS, dense YOLO-style output
def nms_numpy(boxes: Any, scores: Any, iou: float, labels: Any = None, max_det: int | None = None) -> np.ndarray:
    """Indices greedy NMS keeps of xyxy ``boxes [K, 4]``, best score first (ties: lower index first): a box goes when
    its IoU with a kept one is over ``iou``. With ``labels`` it is class-aware (classes never suppress each other)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if labels is not None and len(b):  # each class moved to its own region, apart from the others'
        b = b + (np.asarray(labels, dtype=np.float64) * (b.max() - b.min() + 1))[:, None]
    area = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    order, keep = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable"), []
    while order.size and (max_det is None or len(keep) < max_det):  # greedy: the first max_det kept are final
        i, order = order[0], order[1:]
        keep.append(i)
        wh = (np.minimum(b[i, 2:], b[order, 2:]) - np.maximum(b[i, :2], b[order, :2])).clip(0)
        inter = wh[:, 0] * wh[:, 1]
        order = order[inter <= iou * (area[i] + area[order] - inter)]  # IoU <= iou, without 0 / 0
    return np.asarray(keep, dtype=np.int64)


def decode_dense_numpy(y: Any, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[dict[str, Any]]:
    """Per image of a dense output ``[N, 4 + classes, anchors]`` (centre x, centre y, width, height, then class
    probabilities): ``{"boxes": xyxy [K, 4], "scores", "labels"}``, best first -- each anchor's best class if over
    ``conf``, the 30000 best, class-aware NMS at ``iou``, ``max_det`` kept (as ``presso.tasks.boxes.decode_dense``)."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 3 or y.shape[1] < 5:
        raise ConfigError(f"A dense detection output is [batch, 4 + classes, anchors], not {list(y.shape)}.")
    out = []
    for p in y.transpose(0, 2, 1):  # [anchors, 4 + classes]
        labels = p[:, 4:].argmax(1)
        scores = np.take_along_axis(p[:, 4:], labels[:, None], 1)[:, 0]
        idx = np.flatnonzero(scores > conf)
        idx = idx[np.argsort(-scores[idx], kind="stable")[:30000]]
        boxes = np.concatenate([p[idx, :2] - p[idx, 2:4] / 2, p[idx, :2] + p[idx, 2:4] / 2], axis=1)
        scores, labels = scores[idx], labels[idx].astype(np.int64)
        keep = nms_numpy(boxes, scores, iou, labels, max_det)
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images, or detect objects, with a Presso bundle.")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).with_name("bundle.zip")))
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--conf", type=float, default=0.25, help="detectors: the lowest score kept")
    parser.add_argument("--iou", type=float, default=0.7, help="detectors: NMS IoU threshold")
    parser.add_argument("--save", metavar="DIR", help="write each image, boxes drawn, as DIR/NAME.png")
    parser.add_argument("--overwrite", action="store_true", help="replace files of those names in the --save DIR")
    args = parser.parse_args(argv)
    try:
        results = Predictor(args.bundle).predict(args.images, top_k=args.top_k, conf=args.conf, iou=args.iou)
        if args.save:
            save_drawn(results, args.save, overwrite=args.overwrite)
    except (BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"predictions": results}))
    else:  # one line per image: its k best labels, each with its score
        for r in results:  # a detector's: each box's label, score and x1,y1,x2,y2
            best = [f"{t['label']}\t{t['score']:.4f}" for t in r.get("top", [])]
            boxes = [f"{d['label']}\t{d['score']:.4f}\t{','.join(map(str, d['box']))}" for d in r.get("detections", [])]
            print("\t".join([r["image"], *best, *boxes]))
    return 0


if __name__ == "__main__":  # `python predict.py bundle.zip IMAGE...` inside or beside an unpacked bundle
    sys.exit(main())
