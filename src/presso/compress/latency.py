"""Measured latency per layer, for latency-aware pruning ratios (ONNX Runtime backend).

MACs are a poor guide to CPU time: a depthwise convolution or a wide high-resolution layer costs far more time per
MAC than a dense 3x3 convolution in a late stage. Under a latency target the recommended ratios therefore weigh each
channel by the time it costs here: the model is exported once and run with ONNX Runtime's profiler, and each
convolution / linear kernel's time is matched back to its PyTorch layer by weight shape and output size (ONNX
Runtime renames and fuses nodes, so names do not survive; identical layers share their measured time evenly).

Shapes do not always survive either. ONNX Runtime's NCHWc layout (all optimizations, x86) rounds a convolution's
output channels -- and its input channels, past one block -- up to the CPU's block size: 8 with AVX2, 16 with
AVX-512. The profile then reports a 24 -> 144 convolution as 32 -> 144, so a layer is also matched at its channel
counts rounded up to the block size the profile shows; layers that become identical once rounded share their time.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)

_LINEAR_KERNELS = ("Gemm", "MatMul", "FusedGemm", "FusedMatMul")
_KERNELS = ("Conv", "FusedConv", "NchwcConv", *_LINEAR_KERNELS)
# NCHWc block sizes MLAS uses (8: AVX2 / NEON, 16: AVX-512), and wider ones in case a later CPU doubles it again
_BLOCKS = (1, 4, 8, 16, 32, 64)


def layer_latency_ms(
    model: nn.Module, inputs: tuple, *, threads: int | None = None, runs: int = 10, elementwise: bool = False
) -> dict[str, float]:
    """Median milliseconds per run of every Conv2d / Linear layer (by name) in an ONNX Runtime profile of the
    model on this machine's CPU. Layers whose kernel was not found in the profile are left out (and logged).

    elementwise: also charge each other node (activations, squeeze-excitation products, layout reorders...) to the
    convolutions whose output has its channels and size -- the layers whose width decides its cost. Their time
    falls only linearly with the channels (EfficientNet-B0: SiLU alone is 20% of the time), so a group that carries
    a lot of it is worth cutting for time (docs/benchmarks.md)."""
    layers, events = profile_events(model, inputs, threads=threads, runs=runs)
    out = profile_layer_ms(events, layers, elementwise=elementwise)
    missing = [n for n in layers if n not in out]
    if missing:
        # a layer left out weighs nothing in a latency-aware allocation: say so rather than skew it silently
        logger.warning(
            "%d of %d layers not found in ONNX Runtime's profile (their latency is not counted): %s",
            len(missing), len(layers), ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
        )  # fmt: skip
    return out


def profile_events(
    model: nn.Module, inputs: tuple, *, threads: int | None = None, runs: int = 10
) -> tuple[dict[str, tuple], list[dict]]:
    """The signature of every Conv2d / Linear layer the inputs reach (``profile_layer_ms``) and the events of an ONNX
    Runtime profile of ``3 + runs`` runs of the model."""
    import onnxruntime as ort

    from presso.compress.decompose import _layer_sizes
    from presso.models.onnx import export_onnx

    sizes = _layer_sizes(model, inputs)
    modules = dict(model.named_modules())
    layers: dict[str, tuple] = {}
    for name, (_in_hw, out_hw, _macs) in sizes.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            layers[name] = ("conv", tuple(m.weight.shape), tuple(out_hw))
        elif isinstance(m, nn.Linear):
            layers[name] = ("linear", tuple(m.weight.shape))
    with tempfile.TemporaryDirectory(prefix="presso-latency-") as tmp:
        path = export_onnx(model, inputs, Path(tmp) / "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=False)}
        for _ in range(3 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return layers, events


def profile_layer_ms(events: list[dict], layers: dict[str, tuple], *, elementwise: bool = False) -> dict[str, float]:
    """Per-layer milliseconds from the events of an ONNX Runtime profile (``layer_latency_ms``).

    ``layers``: name -> ``("conv", weight_shape, (out_h, out_w))`` or ``("linear", weight_shape)``. The first three
    runs of each node are dropped when there are more (thread start-up and allocation)."""
    durations: dict[str, list[float]] = defaultdict(list)  # node -> one duration per run
    shapes: dict[str, tuple] = {}
    extra: dict[str, list[float]] = defaultdict(list)  # element-wise node -> durations
    extra_out: dict[str, tuple] = {}  # element-wise node -> (channels, height, width) of its output
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        op = args.get("op_name")
        ins = [tuple(next(iter(s.values()))) for s in args.get("input_type_shape", [])]
        outs = [tuple(next(iter(s.values()))) for s in args.get("output_type_shape", [])]
        sig = _kernel_signature(op, ins, outs)
        if sig is None:
            if elementwise and outs:
                out = outs[0]
                # NCHW, or ONNX Runtime's blocked NCHWc layout (N, C/8, H, W, 8)
                key = (out[1], out[2], out[3]) if len(out) == 4 else (out[1] * out[4], out[2], out[3]) \
                    if len(out) == 5 else None  # fmt: skip
                if key is not None:
                    extra[ev["name"]].append(ev.get("dur", 0) / 1000)
                    extra_out[ev["name"]] = key
            continue
        durations[ev["name"]].append(ev.get("dur", 0) / 1000)
        shapes[ev["name"]] = sig
    per_signature: dict[tuple, float] = defaultdict(float)  # reported signature -> summed median of its nodes
    for node, durs in durations.items():
        per_signature[shapes[node]] += statistics.median(durs[3:] or durs)
    block = _block_size(set(per_signature), layers)
    keys = {name: _layer_keys(sig, block) for name, sig in layers.items()}
    out: dict[str, float] = {}
    for sig, ms in per_signature.items():
        # every layer the reported kernels can be: identical layers (once rounded to the block) share the time
        names = [name for name, ks in keys.items() if sig in ks]
        for name in names:
            out[name] = out.get(name, 0.0) + ms / len(names)
    by_output: dict[tuple, set[str]] = defaultdict(set)  # (channels, height, width) -> convolutions giving it
    for name, sig in layers.items():
        if sig[0] == "conv" and name in out:
            for c in {sig[1][0], _round_up(sig[1][0], block)}:  # element-wise nodes in NCHWc carry padded channels
                by_output[(c, *sig[2])].add(name)
    for node, durs in extra.items():
        names = sorted(by_output.get(extra_out[node], ()))
        for name in names:
            out[name] += statistics.median(durs[3:] or durs) / len(names)
    return out


def _kernel_signature(op: str | None, ins: list[tuple], outs: list[tuple]) -> tuple | None:
    """What a convolution / linear kernel's event says about its layer: weight shape (and output size)."""
    if op not in _KERNELS or not ins or not outs or not outs[0]:
        return None
    if op not in _LINEAR_KERNELS:
        return ("conv", ins[1], outs[0][-2:]) if len(ins) >= 2 and len(ins[1]) == 4 else None
    if len(ins) >= 2 and len(ins[1]) == 2:
        return ("linear", ins[1])
    if len(ins) >= 2 and len(ins[1]) > 2:
        return None  # a product of two activations (attention), no layer's
    # ONNX Runtime pre-packs a constant weight and then leaves it out of the event (the bias, if any, stays):
    # the weight is (out, in) of the activation's shapes (..., in) -> (..., out)
    return ("linear", (outs[0][-1], ins[0][-1])) if ins[0] else None


def _round_up(c: int, block: int) -> int:
    return -(-c // block) * block


def _layer_keys(sig: tuple, block: int) -> set[tuple]:
    """The signatures a layer's kernel may be reported with: its own, or (NCHWc) channels rounded up to the block.

    Input channels stay as they are for a depthwise convolution (1 per group) and for one that reads NCHW directly
    (fewer than one block), so each channel count is allowed either way."""
    if sig[0] == "linear":
        return {sig, ("linear", sig[1][::-1])}
    o, i, kh, kw = sig[1]
    return {("conv", (oo, ii, kh, kw), sig[2]) for oo in {o, _round_up(o, block)} for ii in {i, _round_up(i, block)}}


def _block_size(reported: set[tuple], layers: dict[str, tuple]) -> int:
    """The NCHWc block size that explains the most layers (the smallest of equals: 1 when all match exactly).

    It depends on the CPU (AVX2 or AVX-512), so it is read off the profile rather than assumed."""
    convs = [sig for sig in layers.values() if sig[0] == "conv"]

    def found(block: int) -> int:
        return sum(bool(_layer_keys(sig, block) & reported) for sig in convs)

    return max(_BLOCKS, key=lambda b: (found(b), -b))
