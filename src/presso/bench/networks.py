"""Calibration networks: whole synthetic networks a device is profiled on, beside the single kernels.

A kernel timed alone is not the same kernel inside a network. Alone, its weights and input come from memory (the
profile evicts the caches between runs); inside a small network, the previous layer has just written the input into
cache and the weights stay there from one run to the next; inside a large one, they do not. These networks are timed
whole (wall clock) and under the profiler, and every kernel they run is fitted by the predictor beside the isolated
ones (``presso.bench.predictor``).

Each network is built here with ``onnx.helper`` from a seeded recipe -- a style (plain VGG-like; ResNet basic blocks;
MobileNetV2/V3 inverted residuals, with MobileNetV3's or EfficientNet's squeeze-excitation; ShuffleNet-like
split/concat; thin factor chains as Tucker/CP decomposition leaves them), an input resolution and a width -- so every
device gets the same networks, and none of them is a network of a model zoo (those are what the predictor is judged
on). Batch norms are folded into the convolutions, as at export.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from presso.bench.calibration import OPSET, Spec

STYLES = ("plain", "resnet", "mbv2", "mbv3", "shuffle", "thin")
RESOLUTIONS = (32, 48, 64, 96, 128, 160, 192, 224)
MAX_MACS = 1.2e9  # keeps the slowest network near 25 ms on a 2-core CPU at 1 thread: the set measures in a minute


def network_set(size: str = "full", seed: int = 0) -> list[Spec]:
    """The calibration networks: ``full`` (48), ``quick`` (4, for tests). Drawn so that each style covers small
    (32-64 px, narrow) to large (160-224 px, wide) networks."""
    count = {"full": 48, "quick": 4}[size]
    rng = random.Random(seed + 7)
    specs: list[Spec] = []
    i = 0
    while len(specs) < count:
        style = STYLES[i % len(STYLES)] if size == "full" else ("resnet", "mbv2", "thin", "mbv3")[i]
        h = rng.choice(RESOLUTIONS[:3] if size == "quick" else RESOLUTIONS)
        width = round(math.exp(rng.uniform(math.log(0.25), math.log(2.0))), 2)
        spec = Spec("network", dict(style=style, h=h, width=width, seed=seed * 1000 + i))
        i += 1
        if size == "quick" or _Net(spec.params).macs_estimate() <= MAX_MACS:
            specs.append(spec)
    return specs


def build_network(params: dict[str, Any]) -> bytes:
    """The ONNX model of one calibration network, serialized."""
    return _Net(params).build()


class _Net:
    """One network, written node by node with ``onnx.helper``."""

    def __init__(self, params: dict[str, Any]):
        self.p = params
        self.rng = random.Random(params["seed"])
        self.np_rng = np.random.default_rng(params["seed"])
        self.nodes: list = []
        self.inits: list = []
        self.macs = 0.0
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _ch(self, c: float) -> int:
        return max(4, int(round(c * self.p["width"] / 4)) * 4)

    # ---------------------------------------------------------------- layers
    def conv(self, x, shape, cout, k=3, s=1, group=1, act="Relu"):
        from onnx import helper, numpy_helper

        c, h = shape
        w = self._name("w")
        fan = c // group * k * k
        self.inits.append(
            numpy_helper.from_array(
                (self.np_rng.standard_normal((cout, c // group, k, k)) / math.sqrt(fan)).astype(np.float32), w
            )
        )
        b = self._name("b")
        self.inits.append(numpy_helper.from_array((self.np_rng.standard_normal(cout) * 0.1).astype(np.float32), b))
        y = self._name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=group
            )
        )
        h2 = (h + 2 * (k // 2) - k) // s + 1
        self.macs += cout * h2 * h2 * fan
        return self.act(y, act), (cout, h2)

    def act(self, x, kind):
        from onnx import helper, numpy_helper

        if not kind:
            return x
        y = self._name("act")
        if kind == "Clip":
            lo, hi = self._name("lo"), self._name("hi")
            self.inits += [numpy_helper.from_array(np.float32(0), lo), numpy_helper.from_array(np.float32(6), hi)]
            self.nodes.append(helper.make_node("Clip", [x, lo, hi], [y]))
        elif kind == "SiLU":
            s = self._name("sig")
            self.nodes += [helper.make_node("Sigmoid", [x], [s]), helper.make_node("Mul", [x, s], [y])]
        else:
            self.nodes.append(helper.make_node(kind, [x], [y]))
        return y

    def add(self, a, b, act=""):
        from onnx import helper

        y = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y]))
        return self.act(y, act)

    def se(self, x, shape, act="Relu", gate="HardSigmoid", reduce=4):
        from onnx import helper

        c, h = shape
        pooled = self._name("gap")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
        mid = max(8, c // reduce // 8 * 8)
        z, _ = self.conv(pooled, (c, 1), mid, k=1, act=act)
        g, _ = self.conv(z, (mid, 1), c, k=1, act=gate)
        y = self._name("scaled")
        self.nodes.append(helper.make_node("Mul", [x, g], [y]))
        return y

    def maxpool(self, x, shape):
        from onnx import helper

        c, h = shape
        y = self._name("pool")
        self.nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
        return y, (c, (h + 2 - 3) // 2 + 1)

    # ---------------------------------------------------------------- blocks
    def stages(self, h: int) -> list[int]:
        """Stride-2 stages while the map stays at least 4 pixels."""
        n = max(1, min(4, int(math.log2(max(h, 8) / 4)) - 1))
        return list(range(n))

    def body(self, x, shape):
        style, r = self.p["style"], self.rng
        if style == "plain":
            for i in self.stages(shape[1]):
                for _ in range(r.choice([1, 2])):
                    x, shape = self.conv(x, shape, self._ch(64 * 2**i))
                x, shape = self.maxpool(x, shape)
        elif style == "resnet":
            for i in self.stages(shape[1]):
                cout = self._ch(64 * 2**i)
                for j in range(r.choice([1, 2, 3])):
                    s = 2 if j == 0 and i > 0 else 1
                    y, ys = self.conv(x, shape, cout, s=s)
                    y, ys = self.conv(y, ys, cout, act="")
                    skip = x if (s == 1 and shape[0] == cout) else self.conv(x, shape, cout, k=1, s=s, act="")[0]
                    x, shape = self.add(y, skip, "Relu"), ys
        elif style in ("mbv2", "mbv3"):
            act = "Clip" if style == "mbv2" else r.choice(["HardSwish", "Relu", "SiLU"])
            for i in self.stages(shape[1]):
                cout = self._ch(24 * 2**i)
                for j in range(r.choice([1, 2, 3, 4])):
                    s = 2 if j == 0 else 1
                    k = 3 if style == "mbv2" else r.choice([3, 5])
                    mid = self._ch(shape[0] * r.choice([3, 4, 6]) / self.p["width"])
                    y, ys = self.conv(x, shape, mid, k=1, act=act)
                    y, ys = self.conv(y, ys, mid, k=k, s=s, group=mid, act=act)
                    if style == "mbv3" and r.random() < 0.5:  # MobileNetV3's gate, or EfficientNet's
                        y = self.se(y, ys, act, *r.choice([("HardSigmoid", 4), ("Sigmoid", 16)]))
                    y, ys = self.conv(y, ys, cout, k=1, act="")
                    x = self.add(y, x) if (s == 1 and shape[0] == cout) else y
                    shape = ys
        elif style == "shuffle":
            from onnx import helper, numpy_helper

            for i in self.stages(shape[1]):
                cout = self._ch(48 * 2**i) // 2 * 2
                x, shape = self.conv(x, shape, cout, k=1)
                x, shape = self.conv(x, shape, cout, k=3, s=2, group=cout, act="")
                for _ in range(r.choice([1, 2])):
                    half = cout // 2
                    parts, a, b = self._name("parts"), self._name("a"), self._name("b")
                    self.inits.append(numpy_helper.from_array(np.array([half, half], dtype=np.int64), parts))
                    self.nodes.append(helper.make_node("Split", [x, parts], [a, b], axis=1))
                    y, ys = self.conv(b, (half, shape[1]), half, k=1)
                    y, ys = self.conv(y, ys, half, k=3, group=half, act="")
                    y, ys = self.conv(y, ys, half, k=1)
                    x = self._name("cat")
                    self.nodes.append(helper.make_node("Concat", [a, y], [x], axis=1))
        else:  # thin: every kxk convolution as a Tucker-2 chain (1x1 down to a few channels, kxk, 1x1 back up)
            for i in self.stages(shape[1]):
                cout = self._ch(64 * 2**i)
                for j in range(r.choice([1, 2, 3])):
                    s = 2 if j == 0 and i > 0 else 1
                    r1 = max(2, int(shape[0] * r.uniform(0.05, 0.4)))
                    r2 = max(2, int(cout * r.uniform(0.05, 0.4)))
                    y, ys = self.conv(x, shape, r1, k=1, act="")
                    y, ys = self.conv(y, ys, r2, k=3, s=s, act="")
                    y, ys = self.conv(y, ys, cout, k=1, act="Relu")
                    x, shape = (self.add(y, x) if (s == 1 and shape[0] == cout) else y), ys
        return x, shape

    def macs_estimate(self) -> float:
        self.build()
        return self.macs

    def build(self) -> bytes:
        from onnx import TensorProto, checker, helper, numpy_helper

        self.__init__(self.p)  # a fresh build: the same seed gives the same network
        h = int(self.p["h"])
        x, shape = self.conv("x", (3, h), self._ch(32 if self.p["style"] != "mbv2" else 16), s=2)
        if self.p["style"] == "resnet" and h >= 128:
            x, shape = self.maxpool(x, shape)
        x, shape = self.body(x, shape)
        x, shape = self.conv(x, shape, shape[0] * (4 if "mb" in self.p["style"] else 2), k=1)
        pooled, flat = self._name("gap"), self._name("flat")
        self.nodes += [
            helper.make_node("GlobalAveragePool", [x], [pooled]),
            helper.make_node("Flatten", [pooled], [flat], axis=1),
        ]
        w, b = self._name("fc_w"), self._name("fc_b")
        classes = self.rng.choice([10, 100, 1000])
        self.inits += [
            numpy_helper.from_array((self.np_rng.standard_normal((classes, shape[0])) * 0.05).astype(np.float32), w),
            numpy_helper.from_array(np.zeros(classes, dtype=np.float32), b),
        ]
        self.nodes.append(helper.make_node("Gemm", [flat, w, b], ["y"], transB=1))
        self.macs += classes * shape[0]
        for i, node in enumerate(self.nodes):
            node.name = f"net_{i}_{node.op_type}"
        graph = helper.make_graph(
            self.nodes,
            "calibration_network",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, h, h])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="presso-calibrate"
        )
        model.ir_version = 9
        checker.check_model(model)
        return model.SerializeToString()
