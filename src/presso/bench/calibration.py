"""The calibration kernel set: the kernels a device is profiled on, as single-kernel ONNX models built with
``onnx.helper``, and how one of them is timed on this machine (``presso.bench.profile.profile_device`` drives a device
through the set).

Each calibration model is one standard-ONNX pattern (``Conv [+ residual Add] [+ activation]``, ``Gemm``, pooling,
elementwise, ...). ONNX Runtime optimizes it exactly as it would inside a network (fusions, NCHWc layout), the
profiler times every node it runs, and each node becomes one kernel row in the latency database -- the layout
reorders around an isolated convolution included, which calibrates the reorders of real networks. Chains of tiny
nodes measure what a run costs beyond its kernels (session overhead per run and per node).

The sampled shapes cover MobileNet/ResNet/EfficientNet-like networks at 96-320 px, with pruned (non-multiple-of-8)
channel counts; ``quick`` is a tiny set for tests.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 18
SPATIAL = [7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160]
ACTS = ["", "Relu", "Clip", "HardSwish", "Sigmoid", "SiLU"]
MAX_MACS = 250e6
BIG_GEMMS = 6
BIG_GEMM_BYTES = 256 * 2**20


@dataclass
class Spec:
    kind: str
    params: dict[str, Any]

    def label(self) -> str:
        return self.kind + "(" + ",".join(f"{k}={v}" for k, v in self.params.items()) + ")"


# --------------------------------------------------------------------------- model builders
def build(spec: Spec) -> bytes:
    """The single-kernel ONNX model of ``spec``, serialized (calibration networks: ``networks.build_network``)."""
    from onnx import TensorProto, checker, helper, numpy_helper, shape_inference

    rng = np.random.default_rng(0)
    p = spec.params
    nodes: list = []
    inits: list = []
    inputs: list = []

    def inp(name, shape):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def act(x: str, kind: str) -> str:
        if not kind:
            return x
        if kind == "Clip":
            init("clip_min", np.float32(0.0))
            init("clip_max", np.float32(6.0))
            nodes.append(helper.make_node("Clip", [x, "clip_min", "clip_max"], ["act"]))
        elif kind == "SiLU":
            nodes.append(helper.make_node("Sigmoid", [x], ["sig"]))
            nodes.append(helper.make_node("Mul", [x, "sig"], ["act"]))
        else:
            nodes.append(helper.make_node(kind, [x], ["act"]))
        return "act"

    if spec.kind == "conv":
        n, cin, cout, h, k, s, g = p.get("n", 1), p["cin"], p["cout"], p["h"], p["k"], p["s"], p["group"]
        x = inp("x", [n, cin, h, h])
        residual = p.get("residual")
        if residual:
            # ONNX Runtime fuses a skip connection into the convolution (NCHWc Sum) only when both operands are in
            # its blocked layout, as inside a network: the block's input comes from a 1x1 convolution here (itself
            # one more measured kernel).
            if cin != cout or s != 1:
                raise ValueError("a residual kernel keeps its shape (cin == cout, stride 1)")
            init("w_in", rng.standard_normal((cin, cin, 1, 1)) * 0.1)
            nodes.append(helper.make_node("Conv", [x, "w_in"], ["block_in"], kernel_shape=[1, 1]))
            x = "block_in"
        w = init("w", rng.standard_normal((cout, cin // g, k, k)) * 0.1)
        b = init("b", rng.standard_normal(cout) * 0.1)
        nodes.append(
            helper.make_node("Conv", [x, w, b], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=g)
        )
        y = "y"
        if residual:
            nodes.append(helper.make_node("Add", [y, x], ["sum"]))
            y = "sum"
        y = act(y, p.get("act", ""))
    elif spec.kind == "gemm":
        x = inp("x", [p["m"], p["k"]])
        w = init("w", rng.standard_normal((p["n"], p["k"])) * 0.1)
        b = init("b", rng.standard_normal(p["n"]) * 0.1)
        nodes.append(helper.make_node("Gemm", [x, w, b], ["y"], transB=1))
        y = act("y", p.get("act", ""))
    elif spec.kind == "pool":
        x = inp("x", [1, p["c"], p["h"], p["h"]])
        nodes.append(
            helper.make_node(
                p["op"], [x], ["y"], kernel_shape=[p["k"], p["k"]], strides=[p["s"], p["s"]], pads=[p["k"] // 2] * 4
            )
        )
        y = "y"
    elif spec.kind == "gap":
        x = inp("x", [1, p["c"], p["h"], p["h"]])
        init("axes", np.array([2, 3]))
        inits[-1] = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
        nodes.append(helper.make_node("ReduceMean", [x, "axes"], ["y"], keepdims=1))
        y = "y"
    elif spec.kind == "scale":  # squeeze-excitation gate: x * g, g of shape (1, C, 1, 1)
        x = inp("x", [1, p["c"], p["h"], p["h"]])
        gate = inp("g", [1, p["c"], 1, 1])
        nodes.append(helper.make_node("Mul", [x, gate], ["y"]))
        y = "y"
    elif spec.kind == "eltwise":  # a standalone activation or a same-shape Add
        x = inp("x", [1, p["c"], p["h"], p["h"]])
        if p["op"] == "Add":
            other = inp("o", [1, p["c"], p["h"], p["h"]])
            nodes.append(helper.make_node("Add", [x, other], ["y"]))
            y = "y"
        else:
            y = act(x, p["op"])
    elif spec.kind == "chain":  # tiny nodes in a row: per-run and per-node overhead
        x = inp("x", [1, 8])
        y = x
        for i in range(p["length"]):
            init(f"c{i}", np.full((1, 8), 0.5))
            nodes.append(helper.make_node("Add" if i % 2 == 0 else "Mul", [y, f"c{i}"], [f"t{i}"]))
            y = f"t{i}"
    elif spec.kind == "shuffle":  # ShuffleNet's channel shuffle: reshape, transpose, reshape
        c, h = p["c"], p["h"]
        x = inp("x", [1, c, h, h])
        inits.append(numpy_helper.from_array(np.array([1, 2, c // 2, h, h], dtype=np.int64), "s5"))
        inits.append(numpy_helper.from_array(np.array([1, c, h, h], dtype=np.int64), "s4"))
        nodes.append(helper.make_node("Reshape", [x, "s5"], ["r5"]))
        nodes.append(helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]))
        nodes.append(helper.make_node("Reshape", ["t5", "s4"], ["y"]))
        y = "y"
    elif spec.kind == "split":  # channel split (ShuffleNet, CSP blocks): two halves, both outputs kept
        c, h = p["c"], p["h"]
        x = inp("x", [1, c, h, h])
        inits.append(numpy_helper.from_array(np.array([c // 2, c - c // 2], dtype=np.int64), "parts"))
        nodes.append(helper.make_node("Split", [x, "parts"], ["s0", "s1"], axis=1))
        nodes.append(
            helper.make_node("Add", ["s0", "s1"], ["y"]) if c % 2 == 0 else helper.make_node("Identity", ["s0"], ["y"])
        )
        y = "y"
    elif spec.kind == "flatten":
        x = inp("x", [1, p["c"], 1, 1])
        nodes.append(helper.make_node("Flatten", [x], ["y"], axis=1))
        y = "y"
    elif spec.kind == "concat":
        a = inp("a", [1, p["c"], p["h"], p["h"]])
        b = inp("b", [1, p["c2"], p["h"], p["h"]])
        nodes.append(helper.make_node("Concat", [a, b], ["y"], axis=1))
        y = "y"
    else:
        raise ValueError(f"unknown calibration kernel kind {spec.kind}")
    for i, node in enumerate(nodes):  # the profiler reports nodes by name
        node.name = f"{spec.kind}_{i}_{node.op_type}"
    graph = helper.make_graph(
        nodes, spec.kind, inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="presso-calibrate")
    model.ir_version = 9
    done = shape_inference.infer_shapes(model)
    inferred = {v.name: v for v in [*done.graph.value_info, *done.graph.output] if v.type.tensor_type.HasField("shape")}
    if y in inferred:  # declare the output's shape (the checker wants one)
        model.graph.output[0].CopyFrom(inferred[y])
    elif y in {i.name for i in inputs}:
        model.graph.output[0].CopyFrom(next(i for i in inputs if i.name == y))
    checker.check_model(model)
    return model.SerializeToString()


# --------------------------------------------------------------------------- the kernel set
def _channels(rng: random.Random, lo: int, hi: int) -> int:
    c = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    return max(lo, (c + 4) // 8 * 8) if rng.random() < 0.7 else max(lo, c)


def kernel_set(size: str = "full", seed: int = 0) -> list[Spec]:
    """The calibration kernels: ``full`` (1041 kernel models, 1-12 minutes on 2 cores), ``quick`` (29, for tests)."""
    rng = random.Random(seed)
    counts = {
        "full": dict(
            stem=40,
            kxk=120,
            pw=300,
            dw=200,
            group=30,
            gemm=40,
            pool=30,
            gap=60,
            scale=60,
            elt=90,
            concat=20,
            shuffle=15,
            split=15,
            flatten=10,
        ),
        "quick": dict(
            stem=1,
            kxk=3,
            pw=6,
            dw=4,
            group=0,
            gemm=2,
            pool=1,
            gap=2,
            scale=2,
            elt=3,
            concat=1,
            shuffle=0,
            split=0,
            flatten=1,
        ),
    }[size]
    specs: list[Spec] = [Spec("chain", {"length": n}) for n in ((1, 8, 32) if size == "quick" else (1, 4, 16, 48, 96))]

    def spatial(max_h: int = 160) -> int:
        return rng.choice([h for h in SPATIAL if h <= max_h])

    def conv(kind: str) -> Spec | None:
        h = spatial()
        s = 2 if rng.random() < 0.2 else 1
        if kind == "stem":  # a network's first layer, on the input image
            h = rng.choice([96, 112, 128, 160, 192, 224, 256, 288, 320])
            k, s, g = rng.choice([3, 3, 5, 7]), rng.choice([1, 2, 2, 2]), 1
            cin, cout = 3, _channels(rng, 8, 64)
        elif kind == "kxk":
            k = rng.choice([3, 3, 3, 5, 7])
            cin = 3 if rng.random() < 0.15 else _channels(rng, 8, 512)
            cout, g = _channels(rng, 8, 512), 1
        elif kind == "pw":
            k, g = 1, 1
            cin, cout = _channels(rng, 8, 1280), _channels(rng, 8, 1280)
        elif kind == "dw":
            k = rng.choice([3, 3, 5, 7])
            cin = cout = g = _channels(rng, 8, 1344)
        else:
            k, g = 3, rng.choice([2, 4, 8])
            cin = cout = g * _channels(rng, 4, 64)
        macs = h * h / (s * s) * cout * cin / g * k * k
        if macs > MAX_MACS:
            return None
        act = rng.choice(ACTS)
        residual = kind in ("pw", "kxk") and s == 1 and cin == cout and rng.random() < 0.5
        if kind in ("pw", "kxk") and rng.random() < 0.15:
            residual, cout = s == 1, cin
        return Spec("conv", dict(cin=cin, cout=cout, h=h, k=k, s=s, group=g, act=act, residual=bool(residual)))

    for kind in ("stem", "kxk", "pw", "dw", "group"):
        made = 0
        while made < counts[kind]:
            spec = conv(kind)
            if spec is not None:
                specs.append(spec)
                made += 1
    for _ in range(counts["gemm"]):
        specs.append(
            Spec("gemm", dict(m=1, k=_channels(rng, 16, 2048), n=_channels(rng, 8, 1280), act=rng.choice(["", "Relu"])))
        )
    for _ in range(counts["pool"]):
        specs.append(
            Spec(
                "pool",
                dict(
                    op=rng.choice(["MaxPool", "AveragePool"]),
                    c=_channels(rng, 8, 256),
                    h=spatial(),
                    k=3,
                    s=rng.choice([1, 2]),
                ),
            )
        )
    for _ in range(counts["gap"]):
        specs.append(Spec("gap", dict(c=_channels(rng, 8, 1344), h=spatial(112))))
    for _ in range(counts["scale"]):
        specs.append(Spec("scale", dict(c=_channels(rng, 8, 1344), h=spatial(112))))
    for _ in range(counts["elt"]):
        specs.append(
            Spec(
                "eltwise",
                dict(
                    op=rng.choice(["Add", "Relu", "SiLU", "HardSwish", "HardSigmoid", "Sigmoid", "Clip"]),
                    c=_channels(rng, 8, 1024),
                    h=spatial(112),
                ),
            )
        )
    for _ in range(counts["shuffle"]):
        specs.append(Spec("shuffle", dict(c=2 * _channels(rng, 8, 256), h=spatial(56))))
    for _ in range(counts["split"]):
        specs.append(Spec("split", dict(c=2 * _channels(rng, 8, 256), h=spatial(56))))
    for _ in range(counts["flatten"]):
        specs.append(Spec("flatten", dict(c=_channels(rng, 8, 2048))))
    for _ in range(counts["concat"]):
        specs.append(Spec("concat", dict(c=_channels(rng, 8, 512), c2=_channels(rng, 8, 512), h=spatial(56))))
    if size == "full":
        # Memory-bound fully connected layers (VGG's 25088 x 4096 classifier: 411 MB of weights, read once per run
        # at the memory's bandwidth). The Gemms above hold at most 10 MB, in cache, which predicted VGG-11's head 8x
        # too fast. Drawn from their own generator, after the rest: the kernels above keep their labels, so a
        # profile stored before them stays whole.
        big = random.Random(seed + 1)
        for _ in range(BIG_GEMMS):
            k = _channels(big, 2048, 25088)
            n = min(_channels(big, 1000, 4096), BIG_GEMM_BYTES // (4 * k))
            specs.append(Spec("gemm", dict(m=1, k=k, n=n, act=big.choice(["", "Relu"]))))
    return specs


# --------------------------------------------------------------------------- measuring
class CacheFlush:
    """Writes a buffer between two profiled runs so an isolated kernel does not find its weights and inputs in
    cache -- inside a network, the layers before it have evicted them."""

    def __init__(self, mb: float):
        self.buf = np.zeros(int(mb * 2**20) // 8) if mb > 0 else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf += 1.0


def measure_spec_local(
    data: bytes, threads: int, runs: int, wall: bool, flush: CacheFlush | None = None
) -> tuple[dict[str, float], float | None]:
    """Per-node median kernel times (ms) of one calibration model on this machine, and its wall median if asked."""
    from presso.bench.runner import input_feed, node_times, ort_session, time_loop

    with tempfile.TemporaryDirectory(prefix="presso-cal-") as tmp:
        session = ort_session(data, threads, profile_prefix=str(Path(tmp) / "p"))
        feed = input_feed(session)
        for _ in range(2):
            session.run(None, feed)
        times = {n: r["p25"] for n, r in node_times(session, feed, runs, between=flush).items()}
        wall_ms = None
        if wall:
            plain = ort_session(data, threads)
            samples = time_loop(lambda: plain.run(None, feed), warmup=3, repeat=max(runs * 3, 30), max_seconds=5)
            wall_ms = statistics.median(samples)
    return times, wall_ms


class QuietProbe:
    """Tells whether this machine is as quiet as it has been: times a fixed 3x3 convolution (wall clock, mean over
    0.2 s) and compares it with the fastest time ever seen here. On a shared machine other processes' bursts slow
    every kernel alike; measurements taken during one are not comparable with measurements taken outside it."""

    SPEC = Spec("conv", dict(cin=64, cout=64, h=28, k=3, s=1, group=1, act="Relu", residual=False))

    def __init__(self, threads: int, seconds: float = 0.2, remember: bool = True):
        import onnxruntime as ort

        from presso.bench.env import cpu_model, presso_home
        from presso.bench.runner import input_feed, ort_session

        self.session = ort_session(build(self.SPEC), threads)
        self.feed = input_feed(self.session)
        self.seconds = seconds
        # the quietest time ever seen here is kept under PRESSO_HOME: a run that starts on a busy machine must not
        # take that as the norm
        self.key = f"{cpu_model()}|{ort.__version__}|{threads}"
        self.file = presso_home() / "quiet_reference.json" if remember else None
        self.best = self.last_ms = float("inf")
        self.best = self._remembered()
        for _ in range(3):
            self.factor()

    def _remembered(self) -> float:
        import json

        try:
            return float(json.loads(self.file.read_text())[self.key]) if self.file else float("inf")
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return float("inf")

    def _remember(self) -> None:
        import json
        import os

        if self.file is None:
            return
        try:
            data = json.loads(self.file.read_text()) if self.file.exists() else {}
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        try:
            if self.best < float(data.get(self.key, float("inf"))):
                data[self.key] = self.best
                self.file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.file)
        except (OSError, ValueError, TypeError):  # a cache: an unwritable PRESSO_HOME or a damaged file costs nothing
            pass

    def factor(self) -> float:
        """The probe's time now / its best time (1.0: as quiet as ever seen)."""
        from presso.bench.runner import time_loop

        # the mean over a fifth of a second: other processes take the core in scheduler slices of milliseconds, which
        # a median of a few short runs would step around
        samples = time_loop(
            lambda: self.session.run(None, self.feed), warmup=2, repeat=100_000, max_seconds=self.seconds
        )
        ms = statistics.fmean(samples)
        self.last_ms = ms
        if ms < self.best:
            self.best = ms
            self._remember()
        return ms / self.best

    def wait(self, tolerance: float = 1.1, max_seconds: float = 60.0, pause: float = 1.0) -> float:
        """Wait (up to ``max_seconds``) until the probe is within ``tolerance`` of its best; the last factor."""
        import time

        deadline = time.monotonic() + max_seconds
        f = self.factor()
        while f > tolerance and time.monotonic() < deadline:
            time.sleep(pause)
            f = self.factor()
        return f
