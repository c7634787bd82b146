"""Kernels, graph fingerprints and the latency predictor, against real ONNX Runtime runs."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import presso
from presso.bench.calibration import Spec, build, kernel_set
from presso.bench.kernels import decompose, graph_fingerprint

# (cin, cout, h, k, stride, group, act): a small MobileNet-like chain at 40x40
CHAIN = [
    (16, 32, 40, 3, 1, 1, "Relu"),
    (32, 32, 40, 3, 1, 32, "Relu"),
    (32, 64, 40, 1, 1, 1, "Clip"),
    (64, 64, 40, 3, 2, 64, "Relu"),
    (64, 96, 20, 1, 1, 1, ""),
    (96, 96, 20, 3, 1, 1, "Relu"),
]


def _spec(c) -> Spec:
    cin, cout, h, k, s, g, act = c
    return Spec("conv", dict(cin=cin, cout=cout, h=h, k=k, s=s, group=g, act=act, residual=False))


def _chain_model() -> bytes:
    """The same kernels as the calibration specs, wired into one network (weights differ: timing does not care)."""
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    x = "x"
    for i, (cin, cout, _h, k, s, g, act) in enumerate(CHAIN):
        inits.append(
            numpy_helper.from_array((rng.standard_normal((cout, cin // g, k, k)) * 0.1).astype(np.float32), f"w{i}")
        )
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}"))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"w{i}", f"b{i}"],
                [f"c{i}"],
                name=f"conv{i}",
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[k // 2] * 4,
                group=g,
            )
        )
        x = f"c{i}"
        if act == "Clip":
            inits += [
                numpy_helper.from_array(np.float32(0), f"lo{i}"),
                numpy_helper.from_array(np.float32(6), f"hi{i}"),
            ]
            nodes.append(helper.make_node("Clip", [x, f"lo{i}", f"hi{i}"], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
        elif act:
            nodes.append(helper.make_node(act, [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 40, 40])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 96, 20, 20])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


@pytest.mark.timing
def test_prediction_of_a_model_made_of_calibrated_kernels_is_within_15_percent(home, tmp_path):
    from presso.bench.api import calibrate

    chain = [Spec("chain", {"length": n}) for n in (1, 8, 32)]
    path = tmp_path / "chain.onnx"
    path.write_bytes(_chain_model())
    # Calibration and measurement both run on a machine other tests share: a burst of contention during either
    # one skews the comparison. Up to three calibrate-then-measure attempts, each recorded; one must be within 15%.
    attempts = []
    for _ in range(3):
        summary = calibrate(threads=1, runs=15, specs=chain + [_spec(c) for c in CHAIN], quiet=False)
        assert summary["kernels"] > len(CHAIN) and summary["threads"] == 1
        pred = presso.predict_latency(path, threads=1)
        assert pred.unknown == 0 and pred.estimated == 0  # every kernel was looked up
        assert pred.looked_up == pred.kernels >= len(CHAIN)
        measured = presso.benchmark(path, threads=1, warmup=10, repeat=200, max_seconds=10)["latency_ms"]["median"]
        attempts.append((pred.latency_ms, measured))
        if pred.latency_ms == pytest.approx(measured, rel=0.15):
            break
    assert attempts[-1][0] == pytest.approx(attempts[-1][1], rel=0.15), attempts


def test_regression_estimates_unseen_shapes(home):
    """Kernels of shapes never measured are estimated from their family (quick calibration set)."""
    from presso.bench.api import calibrate

    calibrate(threads=1, size="quick", runs=5, quiet=False)
    unseen = build(Spec("conv", dict(cin=24, cout=40, h=28, k=1, s=1, group=1, act="Relu", residual=False)))
    pred = presso.predict_latency(unseen, threads=1)
    assert pred.estimated >= 1 and pred.latency_ms > 0
    assert "nchwc.Conv/pw" in pred.by_family


def test_predictor_needs_a_calibrated_device(home, tmp_path):
    from presso.errors import ConfigError

    path = tmp_path / "m.onnx"
    path.write_bytes(_chain_model())
    with pytest.raises(ConfigError, match="presso db calibrate --device local"):
        presso.predict_latency(path, threads=1)


def test_kernels_follow_onnx_runtime_fusions(tmp_path):
    """Conv + Add + Relu is one kernel (NCHWc conv with a fused sum); x*sigmoid(x) is one QuickGelu."""
    res = decompose(build(Spec("conv", dict(cin=32, cout=32, h=14, k=3, s=1, group=1, act="Relu", residual=True))))
    fused = [k for k in res if k.op == "nchwc.Conv" and k.features["sum"] == 1]
    assert len(fused) == 1 and fused[0].features["act"] == 1 and fused[0].features["k"] == 3
    assert not any(k.op in ("Add", "Relu") for k in res)
    assert all(k.exact_shapes for k in res)
    silu = decompose(build(Spec("eltwise", dict(op="SiLU", c=16, h=8))))
    assert [k.op for k in silu] == ["ms.QuickGelu"]
    assert len(kernel_set("quick")) < len(kernel_set("full")) // 10


def test_graph_fingerprint_is_stable_across_exports(tiny_onnx, tmp_path):
    import torch

    a = graph_fingerprint(tiny_onnx(tmp_path / "a.onnx"))
    torch.manual_seed(123)  # different weights, same architecture and shape
    b = graph_fingerprint(tiny_onnx(tmp_path / "b.onnx"))
    assert a == b
    assert graph_fingerprint(tiny_onnx(tmp_path / "c.onnx", width=16)) != a
    assert graph_fingerprint(tiny_onnx(tmp_path / "d.onnx", size=24)) != a


def test_remote_calibration_over_http_then_prediction_offline(home, agent, tmp_path):
    """Calibrate a remote device through its agent (profiles come back over HTTP), then predict for it from the
    database alone -- with the agent gone from the registry."""
    from presso.bench.api import calibrate
    from presso.bench.devices import add_device, remove_device

    add_device("farm-1", agent["url"], agent["token_file"])
    specs = [Spec("chain", {"length": n}) for n in (1, 8)] + [_spec(c) for c in CHAIN[:3]]
    summary = calibrate("farm-1", threads=1, runs=5, specs=specs)
    assert summary["kernels"] >= 3 + 1 + 8 and summary["device"] == "farm-1"
    remove_device("farm-1")
    path = tmp_path / "m.onnx"
    path.write_bytes(build(_spec(CHAIN[1])))
    pred = presso.predict_latency(path, "farm-1", threads=1)
    assert pred.device == "farm-1" and pred.looked_up >= 1 and pred.latency_ms > 0
