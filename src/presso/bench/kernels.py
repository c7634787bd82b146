"""Kernels: the units a latency predictor adds up, as the runtime actually executes them.

ONNX Runtime rewrites a graph before running it: batch norms are folded at export, ``Conv + Add + Relu`` become one
NCHWc ``Conv`` with a fused sum and activation, ``x * sigmoid(x)`` becomes ``QuickGelu``, and layout reorders are
inserted where NCHWc chains start and end. Rather than re-implement those rules, a model is decomposed by asking ONNX
Runtime for its optimized graph (session creation only -- nothing is run) and taking each node of it as one kernel.
Shapes come from the graph's value info, propagated here through the runtime's own operators.

Each kernel has a *family* (what a regression is fitted on: ``nchwc.Conv/dw``, ``Gemm``, ``ReduceMean``...), an
exact *signature* (family + attributes + shapes: a lookup-table key) and numeric *features* (MACs, bytes, ...).

This module also builds the calibration set: single-kernel ONNX models made with ``onnx.helper``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_BYTES = 4
_HEAVY_ACTS = {"Sigmoid", "HardSigmoid", "Tanh", "HardSwish", "Gelu", "QuickGelu"}
_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "LeakyRelu",
    "Erf",
    "QuickGelu",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "Sqrt",
    "Pow",
    "Neg",
    "Exp",
    "Log",
    "Abs",
    "Identity",
    "Cast",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "BatchNormalization",
    "Dropout",
    "Where",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Elu",
    "Selu",
    "Softplus",
    "PRelu",
}
FEATURES = (
    "log_macs",
    "log_in",
    "log_out",
    "log_w",
    "log_cin",
    "log_cout",
    "log_hw",
    "k",
    "stride",
    "act",
    "heavy",
    "sum",
)


@dataclass
class Kernel:
    name: str  # node name in the optimized graph (joins profiler events)
    op: str  # domain-qualified op type
    family: str
    signature: str
    features: dict[str, float] = field(default_factory=dict)
    exact_shapes: bool = True  # False when a shape had to be guessed

    def vector(self) -> list[float]:
        return [float(self.features.get(f, 0.0)) for f in FEATURES]


# --------------------------------------------------------------------------- graph fingerprint
def graph_fingerprint(model) -> str:
    """A hash of the graph's structure: op types, attributes, initializer shapes/dtypes, input shapes, and the
    wiring -- independent of node/tensor names and of weight values, so re-exporting the same architecture at the
    same input shape gives the same fingerprint."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    g = model.graph
    ids: dict[str, str] = {}
    inits = {i.name: i for i in g.initializer}
    parts = []
    for i, inp in enumerate(x for x in g.input if x.name not in inits):
        ids[inp.name] = f"in{i}"
        dims = [d.dim_value if d.HasField("dim_value") else "?" for d in inp.type.tensor_type.shape.dim]
        parts.append(f"input:{inp.type.tensor_type.elem_type}:{dims}")
    for name, t in inits.items():
        ids[name] = f"w:{t.data_type}:{list(t.dims)}"
    for n_idx, node in enumerate(g.node):
        attrs = []
        for a in sorted(node.attribute, key=lambda a: a.name):
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, onnx.TensorProto):  # Constant nodes: shape and dtype, plus small values
                arr = onnx.numpy_helper.to_array(value)
                value = (arr.dtype.str, list(arr.shape), arr.tolist() if arr.size <= 16 else None)
            elif isinstance(value, (onnx.GraphProto, list)) and value and not isinstance(value[0], (int, float, bytes)):
                value = "subgraph"
            attrs.append(f"{a.name}={value!r}")
        ins = [ids.get(x, "?") if x else "" for x in node.input]
        parts.append(f"{node.domain}.{node.op_type}({','.join(ins)})[{';'.join(attrs)}]")
        for o_idx, out in enumerate(node.output):
            ids[out] = f"n{n_idx}.{o_idx}"
    parts.append("outputs:" + ",".join(ids.get(o.name, "?") for o in g.output))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- decomposition
def optimized_model(model: str | Path | bytes, threads: int = 1):
    """The graph ONNX Runtime will execute (all optimizations, CPU), as an ``onnx.ModelProto``."""
    import onnx

    from presso.bench.runner import ort_session

    with tempfile.TemporaryDirectory(prefix="presso-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(model, threads, optimized_path=out)
        return onnx.load(str(out))


def decompose(
    model: str | Path | bytes, input_shapes: list[tuple[int, ...]] | None = None, threads: int = 1
) -> list[Kernel]:
    """The kernels of ``model`` (an ONNX file or bytes) as ONNX Runtime runs them on this CPU."""
    return kernels_of(optimized_model(model, threads), input_shapes)


def kernels_of(opt, input_shapes: list[tuple[int, ...]] | None = None) -> list[Kernel]:
    import onnx
    from onnx import numpy_helper

    g = opt.graph
    shapes: dict[str, list[int]] = {}
    consts: dict[str, np.ndarray] = {}
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
        if int(np.prod(t.dims or [1])) <= 64:
            consts[t.name] = numpy_helper.to_array(t)
    inits = set(shapes)
    for vi in [*g.value_info, *g.output]:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        if dims and all(d >= 0 for d in dims):
            shapes[vi.name] = dims
    real_inputs = [x for x in g.input if x.name not in inits]
    for i, vi in enumerate(real_inputs):
        if input_shapes and i < len(input_shapes):
            shapes[vi.name] = list(input_shapes[i])
        else:
            shapes[vi.name] = [max(d.dim_value, 1) for d in vi.type.tensor_type.shape.dim]
    out: list[Kernel] = []
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            arr = numpy_helper.to_array(attrs["value"])
            shapes[node.output[0]] = list(arr.shape)
            consts[node.output[0]] = arr
            continue
        exact = _propagate(node, attrs, shapes, consts)
        out.append(_kernel(node, attrs, shapes, inits, exact))
    return out


def _propagate(node, attrs: dict[str, Any], shapes: dict[str, list[int]], consts: dict[str, np.ndarray]) -> bool:
    """Fill in the output shapes the optimized graph does not record; False when one had to be guessed."""
    if all(o in shapes for o in node.output if o):
        return True
    op = node.op_type
    ins = [shapes.get(i) if i else None for i in node.input]
    x = ins[0] if ins else None
    result: list[int] | None = None
    if x is None:
        result = None
    elif op in ("Conv", "FusedConv") and len(ins) > 1 and ins[1] is not None and len(x) == 4:
        w = ins[1]
        result = [x[0], w[0], *_spatial(x[2:], attrs, w[2:])]
    elif op in ("MaxPool", "AveragePool") and len(x) == 4:
        result = [x[0], x[1], *_spatial(x[2:], attrs, attrs.get("kernel_shape", [1, 1]))]
    elif op in ("GlobalAveragePool", "GlobalMaxPool"):
        result = [*x[:2], *([1] * (len(x) - 2))]
    elif op == "ReorderInput":
        result = [x[0], x[3], x[1], x[2]] if attrs.get("channels_last") else list(x)
    elif op == "ReorderOutput":
        c = int(attrs.get("channels", x[1]))
        result = [x[0], x[2], x[3], c] if attrs.get("channels_last") else [x[0], c, *x[2:]]
    elif op == "Upsample" and "scales" in attrs:
        result = [int(d * s) for d, s in zip(x, attrs["scales"], strict=False)]
    elif op in ("FusedGemm", "Gemm") and len(ins) > 1 and ins[1] is not None:
        m = x[1] if attrs.get("transA") else x[0]
        n = ins[1][0] if attrs.get("transB") else ins[1][1]
        result = [m, n]
    elif op in ("MatMul", "FusedMatMul") and len(ins) > 1 and ins[1] is not None:
        a, b = list(x), list(ins[1])
        if attrs.get("transA"):
            a[-2:] = a[-2:][::-1]
        if attrs.get("transB"):
            b[-2:] = b[-2:][::-1]
        batch = list(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))) if len(a) > 2 or len(b) > 2 else []
        result = [*batch, a[-2], b[-1]]
    elif op in _ELEMENTWISE or op.endswith("Gelu"):
        known = [s for s in ins if s is not None]
        try:
            result = list(np.broadcast_shapes(*[tuple(s) for s in known]))
        except ValueError:
            result = list(x)
    elif op in ("ReduceMean", "ReduceMax", "ReduceSum"):
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in consts:
            axes = consts[node.input[1]].tolist()
        axes = [a % len(x) for a in (axes if axes is not None else range(len(x)))]
        keep = attrs.get("keepdims", 1)
        result = [1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes]
    elif op in ("Reshape",) and len(node.input) > 1 and node.input[1] in consts:
        target = [int(v) for v in consts[node.input[1]].tolist()]
        target = [x[i] if v == 0 else v for i, v in enumerate(target)]
        if -1 in target:
            known = int(np.prod([v for v in target if v != -1]))
            target[target.index(-1)] = int(np.prod(x)) // max(known, 1)
        result = target
    elif op == "Flatten":
        axis = attrs.get("axis", 1) % max(len(x), 1)
        result = [int(np.prod(x[:axis])), int(np.prod(x[axis:]))]
    elif op == "Transpose":
        perm = attrs.get("perm", list(range(len(x)))[::-1])
        result = [x[p] for p in perm]
    elif op == "Concat":
        axis = attrs.get("axis", 0) % len(x)
        if all(s is not None for s in ins):
            result = list(x)
            result[axis] = sum(s[axis] for s in ins)
    if result is None:
        for o in node.output:
            if o and o not in shapes and x is not None:
                shapes[o] = list(x)  # guess: the first input's shape
        return False
    shapes[node.output[0]] = [int(d) for d in result]
    for o in node.output[1:]:
        if o and o not in shapes:
            shapes[o] = list(result)
    return True


def _spatial(size: list[int], attrs: dict[str, Any], kernel: list[int]) -> list[int]:
    strides = attrs.get("strides", [1] * len(size))
    dil = attrs.get("dilations", [1] * len(size))
    pads = attrs.get("pads", [0] * (2 * len(size)))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    out = []
    for i, d in enumerate(size):
        k = (kernel[i] - 1) * dil[i] + 1
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(math.ceil(d / strides[i]))
        elif auto == "VALID":
            out.append((d - k) // strides[i] + 1)
        else:
            ceil = attrs.get("ceil_mode", 0)
            span = d + pads[i] + pads[i + len(size)] - k
            out.append((math.ceil(span / strides[i]) if ceil else span // strides[i]) + 1)
    return out


def _numel(shape: list[int] | None) -> int:
    return int(np.prod(shape)) if shape else 0


def _log(v: float) -> float:
    return math.log(max(v, 0) + 1.0)


def _kernel(node, attrs: dict[str, Any], shapes: dict[str, list[int]], inits: set[str], exact: bool) -> Kernel:
    domain = node.domain.replace("com.microsoft.", "").replace("com.microsoft", "ms")
    op = f"{domain}.{node.op_type}" if domain else node.op_type
    ins = [(i, shapes.get(i)) for i in node.input if i]
    acts = [s for i, s in ins if i not in inits]
    weights = [s for i, s in ins if i in inits]
    out_shape = shapes.get(node.output[0]) if node.output else None
    in_bytes = sum(_numel(s) for s in acts) * FLOAT_BYTES
    w_bytes = sum(_numel(s) for s in weights) * FLOAT_BYTES
    out_bytes = _numel(out_shape) * FLOAT_BYTES
    f: dict[str, float] = {"log_in": _log(in_bytes), "log_out": _log(out_bytes), "log_w": _log(w_bytes)}
    family = op
    detail: list[Any] = []
    act = attrs.get("activation", b"")
    act = act.decode() if isinstance(act, bytes) else act
    if node.op_type in ("Conv", "FusedConv") and len(ins) > 1 and ins[1][1] and out_shape and len(out_shape) == 4:
        x = ins[0][1] or [1, 1, 1, 1]
        w = ins[1][1]
        group = int(attrs.get("group", 1))
        cin, cout = x[1], w[0]
        k = w[2] if len(w) > 2 else 1
        stride = (attrs.get("strides") or [1])[0]
        macs = out_shape[0] * cout * out_shape[2] * out_shape[3] * w[1] * _numel(w[2:])
        kind = "dw" if group > 1 and group == cin else ("group" if group > 1 else ("pw" if k == 1 else "kxk"))
        family = f"{op}/{kind}"
        has_sum = int(len(node.input) > 3 and bool(node.input[3]))
        f.update(
            log_macs=_log(macs),
            log_cin=_log(cin),
            log_cout=_log(cout),
            log_hw=_log(out_shape[2] * out_shape[3]),
            k=float(k),
            stride=float(stride),
            act=float(bool(act)),
            heavy=float(act in _HEAVY_ACTS),
            sum=float(has_sum),
        )
        detail = [x, w, group, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"), act, has_sum]
    elif node.op_type in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul") and out_shape:
        kdim = (ins[0][1] or [1])[-1] if not attrs.get("transA") else (ins[0][1] or [1, 1])[-2]
        macs = _numel(out_shape) * kdim
        f.update(log_macs=_log(macs), log_cin=_log(kdim), log_cout=_log(out_shape[-1]), act=float(bool(act)))
        detail = [s for _, s in ins] + [attrs.get("transA"), attrs.get("transB"), act]
    elif node.op_type in ("MaxPool", "AveragePool"):
        kernel = attrs.get("kernel_shape", [1, 1])
        macs = _numel(out_shape) * _numel(kernel)
        f.update(log_macs=_log(macs), k=float(kernel[0]), stride=float((attrs.get("strides") or [1])[0]))
        detail = [acts[0] if acts else None, kernel, attrs.get("strides"), attrs.get("pads")]
    else:
        f.update(log_macs=_log(sum(_numel(s) for s in acts)))
        if node.op_type in ("ReorderInput", "ReorderOutput"):
            family = f"{op}/{'ch' + str(int(attrs.get('channels_last', 0)))}"
        detail = [s for _, s in ins] + [sorted((k, str(v)) for k, v in attrs.items())]
    signature = family + ":" + json.dumps(detail, default=str, separators=(",", ":"))
    return Kernel(node.name, op, family, signature, f, exact)
