"""Measured latency per layer, for latency-aware pruning ratios (ONNX Runtime backend).

MACs are a poor guide to CPU time: a depthwise convolution or a wide high-resolution layer costs far more time per
MAC than a dense 3x3 convolution in a late stage. Under a latency target the recommended ratios therefore weigh each
channel by the time it costs here: the model is exported once and run with ONNX Runtime's profiler, and each
convolution / linear kernel's time is matched back to its PyTorch layer by weight shape and output size (ONNX
Runtime renames and fuses nodes, so names do not survive; identical layers share their measured time evenly).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from torch import nn

_KERNELS = ("Conv", "FusedConv", "NchwcConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")


def layer_latency_ms(
    model: nn.Module, inputs: tuple, *, threads: int | None = None, runs: int = 10, elementwise: bool = False
) -> dict[str, float]:
    """Median milliseconds per run of every Conv2d / Linear layer (by name) in an ONNX Runtime profile of the
    model on this machine's CPU. Layers whose kernel was not found in the profile are left out.

    elementwise: also charge each other node (activations, squeeze-excitation products, layout reorders...) to the
    convolutions whose output has its channels and size -- the layers whose width decides its cost. Their time
    falls only linearly with the channels (EfficientNet-B0: SiLU alone is 20% of the time), so a group that carries
    a lot of it is worth cutting for time (docs/benchmarks.md)."""
    import onnxruntime as ort

    from presso.compress.decompose import _layer_sizes
    from presso.models.onnx import export_onnx

    sizes = _layer_sizes(model, inputs)
    modules = dict(model.named_modules())
    by_signature: dict[tuple, list[str]] = defaultdict(list)
    for name, (_in_hw, out_hw, _macs) in sizes.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            by_signature[("conv", tuple(m.weight.shape), tuple(out_hw))].append(name)
        elif isinstance(m, nn.Linear):
            by_signature[("linear", frozenset([tuple(m.weight.shape), tuple(m.weight.shape[::-1])]))].append(name)
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
    by_output: dict[tuple, list[str]] = defaultdict(list)  # (channels, height, width) -> convolutions
    for name, (_in_hw, out_hw, _macs) in sizes.items():
        if isinstance(modules[name], nn.Conv2d):
            by_output[(modules[name].out_channels, *tuple(out_hw))].append(name)
    durations: dict[str, list[float]] = defaultdict(list)  # node -> one duration per run
    shapes: dict[str, tuple] = {}
    extra: dict[str, list[float]] = defaultdict(list)  # element-wise node -> durations
    extra_key: dict[str, tuple] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        if args.get("op_name") not in _KERNELS or len(args.get("input_type_shape", [])) < 2:
            if elementwise and args.get("output_type_shape"):
                out = tuple(next(iter(args["output_type_shape"][0].values())))
                # NCHW, or ONNX Runtime's blocked NCHWc layout (N, C/8, H, W, 8)
                key = (out[1], out[2], out[3]) if len(out) == 4 else (out[1] * out[4], out[2], out[3]) \
                    if len(out) == 5 else None  # fmt: skip
                if key in by_output:
                    extra[ev["name"]].append(ev.get("dur", 0) / 1000)
                    extra_key[ev["name"]] = key
            continue
        node = ev["name"]
        durations[node].append(ev.get("dur", 0) / 1000)
        weight = tuple(next(iter(args["input_type_shape"][1].values())))
        out = tuple(next(iter(args["output_type_shape"][0].values())))
        shapes[node] = ("conv", weight, out[-2:]) if len(weight) == 4 else ("linear", weight)
    per_signature: dict[tuple, float] = defaultdict(float)
    for node, durs in durations.items():
        ms = statistics.median(durs[3:] or durs)  # the first runs pay for thread start-up and allocation
        sig = shapes[node]
        if sig[0] == "linear":
            sig = next((s for s in by_signature if s[0] == "linear" and sig[1] in s[1]), sig)
        per_signature[sig] += ms
    out: dict[str, float] = {}
    for sig, ms in per_signature.items():
        for name in by_signature.get(sig, []):
            out[name] = ms / len(by_signature[sig])
    for node, durs in extra.items():
        names = [n for n in by_output[extra_key[node]] if n in out]
        for name in names:
            out[name] += statistics.median(durs[3:] or durs) / len(names)
    return out
