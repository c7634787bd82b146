"""Local measurements (statistics, noise, profile, memory), the API's benchmark, and input feeds."""

import numpy as np
import pytest

import presso
from presso.bench.runner import measure_model, measure_onnx, summarize


def test_summary_statistics_and_noise():
    steady = summarize([10.0] * 50)
    assert steady["median_ms"] == steady["p90_ms"] == steady["p99_ms"] == 10.0 and steady["noise_pct"] == 0.0
    # the second half runs 50% slower (another process took the core): block medians 10 and 15, median 12.5
    drift = summarize([10.0] * 25 + [15.0] * 25)
    assert drift["noise_pct"] == pytest.approx(40.0)
    ramp = summarize([float(i) for i in range(1, 101)])
    assert ramp["p90_ms"] == 91.0 and ramp["p99_ms"] == 100.0 and ramp["min_ms"] == 1.0 and ramp["median_ms"] == 50.5


def test_measure_onnx_with_profile(tiny_onnx, tmp_path):
    path = tiny_onnx(tmp_path / "m.onnx", width=16, size=32)
    m = measure_onnx(path, threads=1, warmup=2, repeat=20, profile=True)
    assert m.runs == 20 and m.threads == 1 and m.runtime == "onnxruntime"
    assert m.min_ms <= m.median_ms <= m.p90_ms <= m.p99_ms
    assert m.throughput == pytest.approx(1000 / m.median_ms, rel=1e-3)
    assert m.model_size_bytes == path.stat().st_size and m.environment["threads"] == 1
    ops = {o["op"] for o in m.profile["ops"]}
    assert "Conv" in ops and sum(o["share"] for o in m.profile["ops"]) == pytest.approx(1.0, abs=0.01)


@pytest.mark.timing  # peak memory is sampled by a thread every 2 ms: a starved sampler misses the peak
def test_batch_scales_throughput_inputs_and_memory(home):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
    r = presso.benchmark(model, input_shape="1,3,64,64", batch=8, threads=1, repeat=10, warmup=2)
    assert r.batch == 8 and r.input_shape == "8,3,64,64"
    assert r.throughput == pytest.approx(8 * 1000 / r.latency_ms["median"], rel=1e-3)
    # the output alone is 8 * 8 * 62 * 62 floats (~0.94 MiB): the run's peak memory cannot be below it
    assert r.peak_memory_mb > 0.9
    t = presso.benchmark(model, input_shape="1,3,64,64", runtime="torch", threads=1, repeat=5, warmup=1)
    assert t.runtime == "torch" and t.runtime_version == torch.__version__


def test_measure_model_keeps_the_budget_interface():
    """compress/budget.py times candidates with measure_model(...).median_ms."""
    from torch import nn

    m = measure_model(
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()), (__import__("torch").randn(1, 16),), repeat=5, warmup=1, threads=1
    )
    assert m.median_ms > 0 and m.p90_ms >= m.median_ms


def test_precision_is_checked_not_invented(home, tiny_onnx, tmp_path):
    from presso.errors import ConfigError

    path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="The model is fp32, not int8"):
        presso.benchmark(path, precision="int8")


def test_input_feed_needs_shapes_for_dynamic_inputs(tmp_path):
    from onnx import TensorProto, helper

    from presso.bench.runner import input_feed, ort_session
    from presso.errors import ConfigError

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    s = ort_session(m.SerializeToString(), 1)
    with pytest.raises(ConfigError, match="dynamic shape"):
        input_feed(s)
    assert input_feed(s, [(3, 4)])["x"].shape == (3, 4) and input_feed(s, [(3, 4)])["x"].dtype == np.float32
