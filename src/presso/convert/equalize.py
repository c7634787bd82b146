"""Cross-layer equalization and bias correction for INT8, on the FP32 ONNX graph (numpy + onnx).

**Cross-layer equalization** (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019). For two convolutions in a row, ``y = W2 f(W1 x + b1) + b2`` with ``f`` positively
homogeneous (ReLU, LeakyReLU, PReLU, or nothing), ``f(x / s) = f(x) / s`` for ``s > 0``: dividing output channel i of
the first (weights and bias) by ``s_i`` and multiplying input channel i of the second by ``s_i`` leaves the function
as it is. With ``r1_i``, ``r2_i`` the ranges (largest magnitude) of those channels' weights,
``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both ``sqrt(r1_i * r2_i)``: one channel ten thousand times the others, in
the weights and therefore in the activation between the two, is brought in line, which is what a per-tensor uint8
activation range needs. Pairs share layers along a chain (1x1 -> depthwise 3x3 -> 1x1): every pair is rescaled in
turn, and the whole pass repeated until the scales settle. Grouped and depthwise convolutions map input channel c
of the second convolution to group ``c // (C/g)`` and to weight column ``c % (C/g)`` of that group's filters.

**Clip (ReLU6) is skipped**, not handled: ``min(max(x / s, 0), 6) != min(max(x, 0), 6) / s``, and the per-channel
clip ``6 / s_i`` it would need has no ONNX Clip. AIMET swaps ReLU6 for ReLU before equalizing, which changes the
function; Presso promises the FP32 function unchanged (tests hold it to 1e-4), so a Clip ends a chain.

Measured (``tests/convert/test_equalize.py``, docs): on a depthwise net with channels 1e4 apart, all-INT8 output
SNR 6.3 dB -> 16.0 dB with CLE -> 20.7 dB with bias correction on top. On random-init MobileNets whose channels are
already balanced, with ORT's per-channel weights, CLE alone can *lower* the SNR (MobileNetV2 27.2 -> 20.0 dB): it
balances weight ranges, which per-channel weights do not need, and moves range into the per-tensor activations. So
``auto`` keeps it only when it meets the criterion or does best.

**Bias correction** (same paper, section 4.2, the empirical variant): quantized weights ``W_q = W + e`` add
``e . E[x]`` to each output channel's mean, ``E[x]`` the mean input per channel over the calibration images;
``b' = b - e . E[x]`` takes it out, so the INT8 layer's mean output matches FP32's. ``W_q`` is read from the QDQ
file ONNX Runtime wrote (its int8 weights and scales), so it is exactly what will run, reduce_range and all.

**Why written here, not taken from a library** (read before writing): ONNX Runtime's quantizer has no CLE (it has
SmoothQuant, which moves activation ranges into MatMul weights for transformers, not conv pairs). AIMET's ONNX CLE
(``aimet_onnx.cross_layer_equalization``) needs AIMET's compiled ``libpymo``, its connected graph and a torch build
pinned to its own release; NNCF's ONNX backend has bias correction but no CLE and quantizes with its own QDQ
placement, not ORT's ``quantize_static``; AMD Quark's ``quark.onnx.equalization`` is a large vendor package. Each
would bring far more than the ~150 lines of numpy below, which work on the same FP32 file ORT then quantizes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")  # f(x / s) = f(x) / s for s > 0


@dataclass
class EqualizeReport:
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (first conv, second conv) node names
    skipped_clip: int = 0  # pairs a Clip (ReLU6) stood between
    iterations: int = 0
    largest_scale: float = 1.0  # max over channels of max(s, 1/s), over all passes together

    def to_json(self) -> dict:
        return {"pairs": len(self.pairs), "skipped_clip": self.skipped_clip, "iterations": self.iterations,
                "largest_scale": float(f"{self.largest_scale:.4g}")}  # fmt: skip


def plan(equalize: str, bias_correction: str) -> list[tuple[bool, bool]]:
    """(equalize, bias correction) for each all-INT8 attempt, in order of cost: the ``on`` ones from the start, then
    each ``auto`` one added in turn (CLE costs one more calibration, bias correction one more pass over it). With
    both ``auto``, ``quantize_int8`` corrects the biases of whichever graph did better, plain or equalized."""
    steps = [(equalize == "on", bias_correction == "on")]
    if equalize == "auto":
        steps.append((True, steps[-1][1]))
    if bias_correction == "auto":
        steps.append((steps[-1][0], True))
    return steps


def method_name(equalized: bool, corrected: bool) -> str:
    return "+".join([m for m, on in (("cle", equalized), ("bc", corrected)) if on]) or "ptq"


def _graph_maps(graph):
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    return inits, consumers, outputs


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _only_use(name: str, node, consumers) -> bool:
    return [id(c) for c in consumers.get(name, [])] == [id(node)]


def find_pairs(graph) -> tuple[list[tuple], int]:
    """The (first, second) Conv pairs CLE may rescale, and how many a Clip stood between."""
    inits, consumers, outputs = _graph_maps(graph)

    def owned_weights(node) -> bool:  # weights (and bias) constant and used by this node alone
        params = node.input[1:3]
        return all(p in inits and _only_use(p, node, consumers) for p in params if p) and params[0] in inits

    pairs, clips = [], 0
    for a in graph.node:
        if a.op_type != "Conv" or not owned_weights(a):
            continue
        t = a.output[0]
        users = consumers.get(t, [])
        if t in outputs or len(users) != 1:
            continue
        if users[0].op_type in HOMOGENEOUS:
            act = users[0]
            if act.op_type == "PRelu" and act.input[1] not in inits:
                continue
            t = act.output[0]
            users = consumers.get(t, [])
            if t in outputs or len(users) != 1:
                continue
        elif users[0].op_type == "Clip":
            clips += 1
            continue
        b = users[0]
        if b.op_type != "Conv" or b.input[0] != t or not owned_weights(b):
            continue
        w1, w2 = inits[a.input[1]], inits[b.input[1]]
        if w1.dims[0] != w2.dims[1] * _group(b):
            continue
        pairs.append((a, b))
    return pairs, clips


def _in_view(w: np.ndarray, groups: int) -> np.ndarray:
    """``w`` (O, C/g, ...) as (C, O/g * ...): row c holds every weight that multiplies input channel c."""
    o, cg = w.shape[:2]
    v = w.reshape(groups, o // groups, cg, -1).transpose(0, 2, 1, 3)
    return v.reshape(groups * cg, -1)


def _from_in_view(v: np.ndarray, shape: tuple, groups: int) -> np.ndarray:
    o, cg = shape[:2]
    return v.reshape(groups, cg, o // groups, -1).transpose(0, 2, 1, 3).reshape(shape)


def equalize(src: str | Path, dst: str | Path, *, max_iterations: int = 20, tolerance: float = 1e-3) -> EqualizeReport:
    """Cross-layer equalization of every eligible Conv pair of ``src`` into ``dst``; the FP32 function is kept."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    pairs, clips = find_pairs(graph)
    inits = {i.name: i for i in graph.initializer}
    arrays = {}
    for a, b in pairs:
        for name in (*a.input[1:3], b.input[1]):
            if name and name not in arrays:
                arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
    report = EqualizeReport(pairs=[(a.name, b.name) for a, b in pairs], skipped_clip=clips)
    total = {}  # the accumulated scale per pair, for the report
    for it in range(max_iterations):
        largest = 1.0
        for a, b in pairs:
            w1, w2, g = arrays[a.input[1]], arrays[b.input[1]], _group(b)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            v2 = _in_view(w2, g)
            r2 = np.abs(v2).max(axis=1)
            s = np.ones_like(r1)
            live = (r1 > 0) & (r2 > 0)  # a dead channel keeps its scale
            s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
            arrays[a.input[1]] = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
            if len(a.input) > 2 and a.input[2]:
                arrays[a.input[2]] = arrays[a.input[2]] / s
            arrays[b.input[1]] = _from_in_view(v2 * s[:, None], w2.shape, g)
            total[a.name] = total.get(a.name, 1.0) * s
            largest = max(largest, float(np.max(np.maximum(s, 1 / s))))
        report.iterations = it + 1
        if largest - 1.0 < tolerance:
            break
    if total:
        report.largest_scale = max(float(np.max(np.maximum(s, 1 / s))) for s in total.values())
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    onnx.save(model, str(dst))
    return report


# ----------------------------------------------------------------------------- bias correction
def _qdq_weights(qdq_graph) -> dict[str, np.ndarray]:
    """Each quantized Conv/Gemm node of a QDQ graph -> its dequantized weights (what ONNX Runtime will multiply by)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq_graph.initializer}
    dq_of = {n.output[0]: n for n in qdq_graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in qdq_graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2 or n.input[1] not in dq_of:
            continue
        dq = dq_of[n.input[1]]
        if dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else 0.0
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
        out[n.name] = (q - zp) * scale
    return out


def _intermediates(fp32: str | Path, feeds: Iterable[dict], tensors: list[str]):
    """(tensor name, value) for each of ``tensors`` and each feed, from one session over ``fp32``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    present = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in present:
            model.graph.output.append(known[t] if t in known else onnx.helper.make_empty_tensor_value_info(t))
            present.add(t)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for feed in feeds:
        yield from zip(tensors, sess.run(tensors, feed), strict=True)


def input_means(fp32: str | Path, feeds: Iterable[dict], tensors: list[str]) -> dict[str, np.ndarray]:
    """The mean of each of ``tensors`` over the images of ``feeds`` (axis 0): a (C, H, W) map for a convolution's
    input, a (K,) vector for a linear layer's."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for t, x in _intermediates(fp32, feeds, tensors):
        sums[t] = sums.get(t, 0.0) + np.asarray(x, dtype=np.float64).sum(axis=0)
        counts[t] = counts.get(t, 0) + len(x)
    return {t: sums[t] / counts[t] for t in sums}


def _conv_errors(nodes, errors: dict[str, np.ndarray], means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each Conv's weight error applied to its mean input map by the Conv itself (its pads, strides, groups), then
    averaged over the output positions: the exact mean output error. Summing the error over the kernel instead
    ignores the zero padding, which on a 2x2 map with 3x3 kernels is most of what the kernel sees."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if not nodes:
        return {}
    inits, graph_nodes, outputs = [], [], []
    for k, n in enumerate(nodes):
        x, w, y = f"x{k}", f"w{k}", f"y{k}"
        inits += [numpy_helper.from_array(means[n.input[0]][None].astype(np.float32), x),
                  numpy_helper.from_array(errors[n.name].astype(np.float32), w)]  # fmt: skip
        graph_nodes.append(helper.make_node("Conv", [x, w], [y], name=f"conv{k}"))
        graph_nodes[-1].attribute.extend(n.attribute)
        outputs.append(helper.make_empty_tensor_value_info(y))
    graph = helper.make_graph(graph_nodes, "bias_correction", [], outputs, inits)
    for o in graph.output:
        o.type.tensor_type.elem_type = TensorProto.FLOAT
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    means_out = [y[0].reshape(len(y[0]), -1).mean(axis=1) for y in sess.run(None, {})]
    return {n.name: m.astype(np.float64) for n, m in zip(nodes, means_out, strict=True)}


def _plain_gemm(node) -> bool:
    """``y = x W (+ c)``: no transposed input, no alpha/beta (then the bias correction is the plain product)."""
    attrs = {a.name: a for a in node.attribute}
    return ("transA" not in attrs or attrs["transA"].i == 0) and all(
        k not in attrs or attrs[k].f == 1.0 for k in ("alpha", "beta")
    )


def bias_corrections(fp32: str | Path, qdq: str | Path, feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per quantized Conv/Gemm node of ``qdq`` (quantized from ``fp32``): the amount to add to its FP32 bias,
    ``-(W_q - W) . E[x]``, with ``E[x]`` measured on ``feeds`` in the FP32 model."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(fp32)).graph
    quantized = _qdq_weights(onnx.load(str(qdq)).graph)
    inits = {i.name: i for i in graph.initializer}
    nodes = [n for n in graph.node if n.name in quantized and n.input[1] in inits]
    nodes = [n for n in nodes if n.op_type == "Conv" or _plain_gemm(n)]
    means = input_means(fp32, feeds, sorted({n.input[0] for n in nodes}))
    errors = {n.name: quantized[n.name] - numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes}
    out = {name: -e for name, e in _conv_errors([n for n in nodes if n.op_type == "Conv"], errors, means).items()}
    for n in nodes:
        if n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            e = errors[n.name] if trans_b else errors[n.name].T  # (N, K)
            out[n.name] = -(e @ means[n.input[0]])
    return out


def apply_bias(src: str | Path, dst: str | Path, deltas: dict[str, np.ndarray]) -> Path:
    """``src`` with ``deltas[node]`` added to each named Conv/Gemm's bias (one made when it had none)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.name not in deltas:
            continue
        delta = deltas[n.name]
        slot = 2
        if len(n.input) > slot and n.input[slot]:
            if n.input[slot] not in inits:  # a computed bias: leave it
                continue
            old = numpy_helper.to_array(inits[n.input[slot]]).astype(np.float64)
            new = old + (delta.reshape(old.shape) if old.size == delta.size else delta)
            inits[n.input[slot]].CopyFrom(numpy_helper.from_array(new.astype(np.float32), n.input[slot]))
        else:
            name = f"{n.name}.bias_correction"
            graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), name))
            while len(n.input) < slot:
                n.input.append("")
            n.input.append(name)
    onnx.save(model, str(dst))
    return Path(dst)
