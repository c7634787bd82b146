"""Exported models read back as they are: an ONNX file, an OpenVINO IR (``model.xml`` + ``model.bin``), a LiteRT
flatbuffer (``.tflite``), or the folder ``presso convert`` writes (``model.onnx``, ``model.xml`` or
``model.tflite``, with ``presso.json`` and ``convert.json``).

``export_path`` tells an export from a model source (which is loaded as PyTorch -- and, for these files, would fail
with a pickle error), so ``presso info`` and ``presso benchmark`` route exports here before any model is loaded.
``export_info`` gives the figures the graph itself holds: inputs, outputs, opset, file size and parameter count.
``OpenVinoIR`` and ``LiteRTFile`` are an IR and a ``.tflite`` ready for the benchmark (their shapes, feed,
precision and fingerprint).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from presso.errors import ConfigError

CONVERT_REPORT = "convert.json"  # what marks a folder written by `presso convert` (presso.convert.launcher)
ONNX_FILE, IR_FILE, TFLITE_FILE = "model.onnx", "model.xml", "model.tflite"
# initializer types that hold weights (shapes, axes and indices are int64/int32 and are not parameters)
_WEIGHT_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT8", "UINT8", "INT4", "UINT4"}
_IR_WEIGHT_TYPES = {"f32", "f16", "bf16", "f64", "i8", "u8", "i4", "u4"}


_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
}


def detect_precision(proto) -> str:
    """An ONNX graph's precision: int8 (quantized ops), fp16 (half-precision weights) or fp32."""
    ops = {n.op_type for n in proto.graph.node}
    if ops & _INT8_OPS:
        return "int8"
    from onnx import TensorProto

    if any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def is_convert_dir(path: str | Path) -> bool:
    p = Path(path)
    return (
        p.is_dir()
        and (p / CONVERT_REPORT).is_file()
        and any((p / f).is_file() for f in (ONNX_FILE, IR_FILE, TFLITE_FILE))
    )


def export_path(source: str | Path, runtime: str | None = None) -> Path | None:
    """The exported model file ``source`` names, or None when it is a model source to load.

    An ``.onnx``, ``.xml`` or ``.tflite`` path is itself (it must exist); a ``presso convert`` folder gives its
    OpenVINO IR for ``runtime="openvino"`` when it has one, else its ONNX file, else its IR or LiteRT file."""
    p = Path(source)
    if p.suffix.lower() in (".onnx", ".xml", ".tflite"):
        if not p.is_file():
            raise ConfigError(f"No such model file: '{p}'.")
        return p
    if is_convert_dir(p):
        if runtime == "openvino" and (p / IR_FILE).is_file():
            return p / IR_FILE
        if runtime == "litert" and (p / TFLITE_FILE).is_file():
            return p / TFLITE_FILE
        return next(p / f for f in (ONNX_FILE, IR_FILE, TFLITE_FILE) if (p / f).is_file())
    return None


def is_tflite(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".tflite"


def is_ir(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".xml"


def _size(path: Path) -> int:
    files = [path, path.with_suffix(".bin")] if is_ir(path) else [path]
    return sum(f.stat().st_size for f in files if f.is_file())


def export_info(path: str | Path) -> dict[str, Any]:
    """What an ONNX file or OpenVINO IR says about itself: format, inputs and outputs (name, shape, type), opset
    (ONNX) or IR version, size on disk (the IR's ``.bin`` included), parameter count (elements of the weight
    tensors), node count and precision."""
    path = Path(path)
    if is_tflite(path):
        return _tflite_info(path)
    return _ir_info(path) if is_ir(path) else _onnx_info(path)


def _onnx_info(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import TensorProto

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a damaged or foreign file: protobuf's own errors are many
        raise ConfigError(f"'{path}' is not a readable ONNX file: {e}") from None
    g = proto.graph
    inits = {i.name for i in g.initializer}

    def tensor(vi) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": vi.name, "shape": dims, "type": TensorProto.DataType.Name(t.elem_type).lower()}

    params = sum(
        int(np.prod(i.dims, dtype=np.int64))
        for i in g.initializer
        if TensorProto.DataType.Name(i.data_type) in _WEIGHT_TYPES
    )
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "format": "onnx",
        "path": str(path),
        "inputs": [tensor(i) for i in g.input if i.name not in inits],
        "outputs": [tensor(o) for o in g.output],
        "opset": opset,
        "producer": " ".join(x for x in (proto.producer_name, proto.producer_version) if x) or None,
        "size_bytes": _size(path),
        "params": params,
        "nodes": len(g.node),
        "precision": detect_precision(proto),
    }


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("Reading an OpenVINO IR needs openvino: pip install openvino.") from None
    return ov


def _read_ir(path: Path):
    ov = _openvino()
    if not path.with_suffix(".bin").is_file():
        raise ConfigError(f"The OpenVINO IR '{path}' lacks its weights file '{path.with_suffix('.bin').name}'.")
    try:
        return ov.Core().read_model(str(path))
    except RuntimeError as e:
        raise ConfigError(f"'{path}' is not a readable OpenVINO IR: {str(e).splitlines()[0]}") from None


def _ir_tensor(port) -> dict[str, Any]:
    shape = port.get_partial_shape()
    dims = [d.get_length() if d.is_static else "?" for d in shape] if shape.rank.is_static else ["?"]
    return {"name": port.any_name, "shape": dims, "type": port.get_element_type().get_type_name()}


def _ir_precision(model) -> str:
    ops = model.get_ordered_ops()
    if any(op.get_type_name() == "FakeQuantize" for op in ops):
        return "int8"
    consts = [op for op in ops if op.get_type_name() == "Constant"]
    if any(op.get_output_element_type(0).get_type_name() == "f16" for op in consts):
        return "fp16"
    return "fp32"


def _ir_info(path: Path) -> dict[str, Any]:
    model = _read_ir(path)
    ops = model.get_ordered_ops()
    params = 0
    for op in ops:
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in _IR_WEIGHT_TYPES:
            shape = op.get_output_partial_shape(0)
            if shape.is_static and len(shape) > 0:  # scalars are scales and clip bounds, not weights
                params += int(np.prod([d.get_length() for d in shape], dtype=np.int64))
    return {
        "format": "openvino",
        "path": str(path),
        "inputs": [_ir_tensor(p) for p in model.inputs],
        "outputs": [_ir_tensor(p) for p in model.outputs],
        "opset": None,
        "producer": "OpenVINO IR",
        "size_bytes": _size(path),
        "params": params,
        "nodes": len(ops),
        "precision": _ir_precision(model),
    }


class OpenVinoIR:
    """An OpenVINO IR to benchmark with the openvino runtime: what ``presso.bench.api`` needs of a model (the
    same attributes as its ONNX counterpart): path, name, input shapes, a random feed, precision, fingerprint."""

    torch_model = None
    example_inputs = None

    def __init__(self, path: str | Path, input_shape: str | None, batch: int | None):
        self.path = Path(path)
        self.name = str(path)
        model = _read_ir(self.path)
        self.precision = _ir_precision(model)
        given = None
        if input_shape is not None:
            from presso.models import InputSpec

            given = [t.shape for t in InputSpec.parse(input_shape).tensors]
        self.ports: list[tuple[str, tuple[int, ...], str]] = []
        for i, port in enumerate(model.inputs):
            info = _ir_tensor(port)
            shape = list(given[i]) if given and i < len(given) else list(info["shape"])
            if batch is not None and shape:
                shape[0] = batch
            if any(not isinstance(d, int) or d < 1 for d in shape):
                raise ConfigError(f"Input '{info['name']}' has a dynamic shape {info['shape']}: give --input-shape.")
            self.ports.append((info["name"], tuple(shape), info["type"]))
        self.shapes = [s for _, s, _ in self.ports]
        self.input_shape = ";".join(",".join(str(d) for d in s) for s in self.shapes)
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(self.input_shape.encode())
        self.fingerprint = "ir-" + digest.hexdigest()[:28]  # the IR's own text: its graph, at this input shape

    def ort_feed(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        dtypes = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32, "u8": np.uint8}
        return {
            name: rng.standard_normal(shape).astype(dtypes.get(kind, np.float32)) for name, shape, kind in self.ports
        }


class LiteRTFile:
    """A LiteRT flatbuffer to benchmark with ai-edge-litert (``runtime="litert"``): the attributes of its ONNX
    counterpart. LiteRT shapes are fixed in the file: another ``input_shape`` or ``batch`` is refused."""

    torch_model = None
    example_inputs = None

    def __init__(self, path: str | Path, input_shape: str | None, batch: int | None):
        self.path = Path(path)
        self.name = str(path)
        interp = litert_interpreter(self.path)
        self.ports = [(d["name"], tuple(int(v) for v in d["shape"]), d["dtype"]) for d in interp.get_input_details()]
        self.shapes = [s for _, s, _ in self.ports]
        self.input_shape = ";".join(",".join(str(d) for d in s) for s in self.shapes)
        asked = None
        if input_shape is not None:
            from presso.models import InputSpec

            asked = [tuple(t.shape) for t in InputSpec.parse(input_shape).tensors]
        if batch is not None:
            asked = [(batch, *s[1:]) for s in (asked or self.shapes)]
        if asked is not None and asked != self.shapes:
            raise ConfigError(
                f"The LiteRT file '{path}' has the fixed input shape {self.input_shape}, not "
                f"{';'.join(','.join(map(str, s)) for s in asked)}: benchmark it as it is, or convert the model at the "
                "shape you want (presso convert ... --to litert --input-shape ...)."
            )
        self.precision = tflite_precision(interp)
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(self.input_shape.encode())
        self.fingerprint = "tflite-" + digest.hexdigest()[:24]

    def feed(self) -> list[np.ndarray]:
        """Random inputs of the file's shapes and types (int8 inputs: random integers)."""
        rng = np.random.default_rng(0)
        out = []
        for _, shape, dtype in self.ports:
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                out.append(rng.integers(info.min, info.max + 1, shape).astype(dtype))
            else:
                out.append(rng.standard_normal(shape).astype(dtype))
        return out


def _tflite_info(path: Path) -> dict[str, Any]:
    interp = litert_interpreter(path)

    def tensor(d) -> dict[str, Any]:
        return {"name": d["name"], "shape": [int(v) for v in d["shape"]], "type": np.dtype(d["dtype"]).name}

    ops = interp._get_ops_details()  # the only public view of the op list (ai-edge-litert 2.3)
    produced = {int(i) for op in ops for i in op["outputs"]}
    inputs = {d["index"] for d in interp.get_input_details()}
    constants = {int(i) for op in ops for i in op["inputs"] if int(i) >= 0} - produced - inputs
    weights = (np.float32, np.float16, np.int8, np.uint8)
    params = sum(
        int(np.prod(d["shape"], dtype=np.int64))
        for d in interp.get_tensor_details()
        if d["index"] in constants and d["dtype"] in weights and len(d["shape"]) >= 1
    )
    return {
        "format": "litert",
        "path": str(path),
        "inputs": [tensor(d) for d in interp.get_input_details()],
        "outputs": [tensor(d) for d in interp.get_output_details()],
        "opset": None,
        "producer": "LiteRT flatbuffer",
        "size_bytes": path.stat().st_size,
        "params": params,
        "nodes": len(ops),
        "precision": tflite_precision(interp),
    }


def litert_interpreter(path: str | Path, threads: int = 1):
    """ai-edge-litert's interpreter on ``path`` (CPU, XNNPACK), tensors allocated; one line when it is missing or
    the file is not a LiteRT model."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        raise ConfigError("Runtime 'litert' needs the optional extra: pip install \"presso[litert]\".") from None
    try:
        it = interpreter.Interpreter(model_path=str(path), num_threads=threads)
        it.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"'{path}' is not a readable LiteRT model: {first[:200]}") from None
    return it


def tflite_precision(interp) -> str:
    """int8 when any tensor holds quantized int8 values (full-integer or int8 weights), fp16 when weights are
    half precision, else fp32."""
    details = interp.get_tensor_details()
    if any(d["dtype"] == np.int8 and d["quantization"][0] for d in details):
        return "int8"
    if any(d["dtype"] == np.float16 for d in details):
        return "fp16"
    return "fp32"
