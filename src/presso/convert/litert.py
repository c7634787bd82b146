"""LiteRT (TFLite) flatbuffers (``model.tflite``) straight from the PyTorch model, with the extra ``presso[litert]``.

Why litert-torch and not onnx2tf: litert-torch lowers the ``torch.export`` graph itself (no TensorFlow), converted
4 of 4 models of the coverage set (TinyCNN, presso:resnet8, a pruned ResNet-8, torchvision MobileNetV2) at FP32
parity ~1e-6, and installs beside torch 2.14 / numpy 2 / onnx 1.23 / protobuf 7. onnx2tf 2.x needs Python >= 3.12,
and its last release for 3.11 pins numpy 1.26, onnx 1.19, onnxruntime 1.23 and protobuf 4 exactly.

Precisions:
- ``fp32``: litert-torch's graph as it comes (NCHW inputs, as the PyTorch model takes them).
- ``fp16``: FP16 weights that the runtime dequantizes on load (ai-edge-quantizer's float casting; TFLite's own
  "float16 quantization"): half the size, FP32 arithmetic on CPU, FP16 on GPU delegates.
- ``int8``: full integer -- per-channel symmetric int8 weights, per-tensor asymmetric int8 activations with ranges
  from the calibration batches (ai-edge-quantizer's ``static_wi8_ai8``, the TFLite converter's scheme). Inputs and
  outputs stay float (a QUANTIZE op in, a DEQUANTIZE out) unless ``int8_io``: then they are int8 too, as
  microcontroller and NPU targets (Ethos-U, Coral) require. There is no per-layer fallback: a target that takes only
  full-integer models cannot run it; ``float_ops`` lists any op left in float.

litert-torch, ai-edge-quantizer and ai-edge-litert are imported inside the functions, never with ``presso``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from presso.errors import ConversionError

INSTALL_HINT = 'pip install "presso[litert]"'
PRECISIONS = ("fp32", "fp16", "int8")
# ops that only move data between float and int8 at the model's edges: not float compute
_EDGE_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


def _import(what: str):
    try:
        if what == "convert":
            os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its Rich task log would print every pass
            import litert_torch as module
        elif what == "quantize":
            from ai_edge_quantizer import quantizer as module
        else:
            from ai_edge_litert import interpreter as module
    except ImportError:
        raise ConversionError(f"LiteRT export needs the optional extra: {INSTALL_HINT}") from None
    return module


def to_litert(
    model,
    example_inputs: tuple,
    path: str | Path,
    *,
    precision: str = "fp32",
    calibration: list[np.ndarray] | None = None,
    int8_io: bool = False,
) -> Path:
    """Write ``model`` (a PyTorch module in eval mode) as a LiteRT flatbuffer at ``path``.

    example_inputs: the tensors the graph is traced with; their batch size is the file's (LiteRT shapes are static).
    calibration: for INT8, image batches already normalised as the model takes them (any batch size: they are split
        to the file's); at least one batch of the file's size.
    int8_io: INT8 only -- int8 inputs and outputs (their scale and zero point are in the file) instead of float.
    """
    if precision not in PRECISIONS:
        raise ConversionError(f"Unknown LiteRT precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    if int8_io and precision != "int8":
        raise ConversionError("int8 inputs and outputs need precision int8.")
    litert_torch = _import("convert")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        edge = litert_torch.convert(model.eval(), tuple(example_inputs))
    except Exception as e:
        raise ConversionError(_conversion_failure(e)) from None
    fp32 = path if precision == "fp32" else path.with_name(path.stem + ".fp32.tflite")
    edge.export(str(fp32))
    if precision == "fp32":
        return path
    try:
        data = _quantize(fp32, precision, calibration, int8_io)
    finally:
        fp32.unlink()
    path.write_bytes(data)
    try:  # the built-in kernels (not XNNPACK's, which accept more) check each op's scales: fail here, not on a device
        _builtin_interpreter(path)
    except (RuntimeError, ValueError) as e:
        path.unlink()
        node = re.search(r"Node number (\d+) \((\w+)\) failed to prepare", str(e))
        op = f"op {node[2]} (node {node[1]})" if node else "a quantized op"
        raise ConversionError(
            f"The {precision.upper()} LiteRT file does not load: {op} rejects its quantization scales, as when an "
            "activation range is almost zero -- calibrate on real images (--calib DATA), or use --precision fp16."
        ) from None
    return path


def _recipe(precision: str, int8_io: bool) -> list[dict[str, Any]]:
    if precision == "fp16":
        op_config = {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT",
                     "explicit_dequantize": True}  # fmt: skip
        return [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting", "op_config": op_config}]
    from ai_edge_quantizer import recipe

    rules = recipe.static_wi8_ai8()  # its INPUT/OUTPUT pseudo-ops make the model's edges int8
    if not int8_io:  # float edges: the graph gets a QUANTIZE op after each input and a DEQUANTIZE before each output
        rules += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]
    return rules


def _quantize(fp32: Path, precision: str, calibration: list[np.ndarray] | None, int8_io: bool) -> bytes:
    quantizer = _import("quantize")
    rules = _recipe(precision, int8_io)
    q = quantizer.Quantizer(str(fp32), rules)
    calibrated = None
    if precision == "int8":
        runner = LiteRTRunner(fp32)
        if len(runner.input_names) != 1:
            raise ConversionError(
                f"INT8 calibration feeds image batches to a model with one input; this one has "
                f"{len(runner.input_names)}."
            )
        x = np.concatenate([np.asarray(b, dtype=np.float32) for b in calibration or []]) if calibration else None
        step = runner.batch
        if x is None or len(x) < step:
            raise ConversionError(f"INT8 needs calibration samples: at least {step} (the file's batch size).")
        name = runner.input_names[0]
        feeds = [{name: x[i : i + step]} for i in range(0, len(x) - len(x) % step, step)]
        from ai_edge_quantizer import calibrator, recipe_manager
        from ai_edge_quantizer.utils import qsv_utils

        # the ranges seen over all samples, as ONNX Runtime's minmax takes them. Quantizer.calibrate keeps a moving
        # average (0.95 on the old value) instead, which on a batch-1 file leaves the first image's ranges and clips
        # the rest: 11-15 dB output SNR where the true min/max gives 22-29 dB (ResNet-8 on digits)
        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(rules)
        with _quiet():
            ranges = calibrator.Calibrator(str(fp32), num_threads=1, qsv_update_func=qsv_utils.min_max_update)
            ranges.calibrate({runner.signature: feeds}, manager)
        calibrated = ranges.get_model_qsvs()
    with _quiet():
        return bytes(q.quantize(calibrated, enable_progress_report=False).quantized_model)


@contextlib.contextmanager
def _quiet():
    """ai-edge-quantizer's progress bar (stderr) and the interpreter's debugging-mode warning during calibration."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _conversion_failure(e: Exception) -> str:
    """One line: the op litert-torch has no lowering for, and where the model calls it, when the error says so."""
    msg = str(e)
    op = re.search(r"Lowering not found: ([\w.]+)", msg) or re.search(r"\b(aten\.\w+(?:\.\w+)?)", msg)
    where = re.search(r'File "([^"]+)", line (\d+), in (\w+)', msg)
    at = f" (called at {Path(where[1]).name}:{where[2]} in {where[3]})" if where else ""
    if op:
        return (
            f"LiteRT cannot convert the op {op[1]}{at}: litert-torch has no lowering for it -- rewrite that layer "
            "with supported ops, or export with --to onnx."
        )
    first = next((line.strip() for line in msg.splitlines() if line.strip()), type(e).__name__)
    return f"litert-torch could not convert the model ({type(e).__name__}: {first[:300]}); try --to onnx."


class LiteRTRunner:
    """Run a ``.tflite`` file with ai-edge-litert's interpreter (CPU, XNNPACK) on float inputs, returning float
    outputs: int8 inputs and outputs are quantized and dequantized with the file's own scale and zero point, and
    batches of another size than the file's are split (the last one padded)."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        interpreter = _import("runtime")
        self.path = Path(path)
        self.interpreter = interpreter.Interpreter(model_path=str(path), num_threads=threads or 1)
        signatures = self.interpreter.get_signature_list()
        self.signature = next(iter(signatures))
        self.input_names = list(signatures[self.signature]["inputs"])
        self.output_names = list(signatures[self.signature]["outputs"])
        self.call = self.interpreter.get_signature_runner(self.signature)
        self.input_details = self.call.get_input_details()
        self.output_details = self.call.get_output_details()
        self.batch = int(self.input_details[self.input_names[0]]["shape"][0])

    def run(self, inputs: tuple) -> list[np.ndarray]:
        feed = [t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t) for t in inputs]
        n = len(feed[0])
        if n == self.batch:
            return self._run(feed)
        parts = []
        for i in range(0, n, self.batch):
            chunk = [f[i : i + self.batch] for f in feed]
            short = self.batch - len(chunk[0])
            if short:  # the file's batch is fixed: pad with copies of the last sample, then drop their outputs
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            parts.append([o[: self.batch - short] for o in self._run(chunk)])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def _run(self, feed: list[np.ndarray]) -> list[np.ndarray]:
        args = {}
        for name, value in zip(self.input_names, feed, strict=True):
            d = self.input_details[name]
            if np.issubdtype(d["dtype"], np.integer) and d["quantization"][0]:
                scale, zero = d["quantization"]
                info = np.iinfo(d["dtype"])
                value = np.clip(np.round(value / scale) + zero, info.min, info.max)
            args[name] = np.asarray(value, dtype=d["dtype"])
        out = self.call(**args)
        results = []
        for name in self.output_names:
            y, d = out[name], self.output_details[name]
            if np.issubdtype(y.dtype, np.integer) and d["quantization"][0]:
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            results.append(y)
        return results


def _builtin_interpreter(path: str | Path):
    """The file on LiteRT's built-in kernels, with no delegate: the op-by-op view, and the strictest checks."""
    interpreter = _import("runtime")
    it = interpreter.Interpreter(
        model_path=str(path), experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    it.allocate_tensors()
    return it


def op_counts(path: str | Path) -> Counter:
    """The file's ops by name (the interpreter's own kernels, before any delegate takes them)."""
    return Counter(op["op_name"] for op in _builtin_interpreter(path)._get_ops_details())


def float_ops(path: str | Path) -> list[str]:
    """Ops that still compute in float (empty for a full-integer file): a microcontroller or NPU target that takes
    only int8 models cannot run these."""
    it = _builtin_interpreter(path)
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    left = []
    for op in it._get_ops_details():
        if op["op_name"] in _EDGE_OPS:
            continue
        if any(dtypes.get(int(i)) == np.float32 for i in op["outputs"]):
            left.append(op["op_name"])
    return left
