"""Calibration networks: whole synthetic networks timed beside the single kernels, their kernels fitted in context."""

from collections import Counter

import numpy as np
import pytest

import presso
from presso.bench.calibration import Spec
from presso.bench.kernels import decompose
from presso.bench.latency_db import LatencyDB
from presso.bench.networks import MAX_MACS, STYLES, _Net, build_network, network_set


def test_the_network_set_is_seeded_covers_every_style_and_stays_within_its_macs():
    full = network_set("full")
    assert [s.label() for s in full] == [s.label() for s in network_set("full")]
    assert len(full) == 48 and Counter(s.params["style"] for s in full) == dict.fromkeys(STYLES, 8)
    assert {s.params["h"] for s in full} >= {32, 224} and len({s.label() for s in full}) == 48
    macs = [_Net(s.params).macs_estimate() for s in full]
    assert max(macs) <= MAX_MACS and min(macs) < 5e6 and max(macs) > 2e8  # small to large networks
    assert len(network_set("quick")) == 4


@pytest.mark.parametrize("spec", network_set("quick"), ids=lambda s: s.params["style"])
def test_each_network_is_a_valid_model_onnx_runtime_runs(spec):
    import onnxruntime as ort

    data = build_network(spec.params)
    assert data == build_network(spec.params)  # the same seed, the same bytes: every device runs the same networks
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    h = spec.params["h"]
    (y,) = session.run(None, {"x": np.random.default_rng(0).standard_normal((1, 3, h, h), dtype=np.float32)})
    assert y.shape[0] == 1 and y.shape[1] in (10, 100, 1000) and np.isfinite(y).all()
    # more than one kernel of the runtime's own (a network, not a kernel)
    assert len(decompose(data)) >= 8


def test_a_profile_stores_each_network_whole_with_its_kernels_timed_in_context(home, tmp_path):
    nets = network_set("quick")[:2]
    specs = [Spec("chain", {"length": 2}), Spec("conv", dict(cin=8, cout=8, h=8, k=3, s=1, group=1, act="Relu")), *nets]
    db = str(tmp_path / "latency.db")
    result = presso.profile_device(threads=1, runs=3, specs=specs, quiet=False, db=db)
    store = LatencyDB(db)
    rows = store.rows(kind="network")
    assert [r["model_name"] for r in rows] == [s.label() for s in nets] and result.networks == 2
    # the network's kernels are not kernel rows: ``kernels`` counts the single-kernel models' rows only
    assert result.kernels == len(store.rows(kind="kernel"))
    for row, spec in zip(rows, nets, strict=True):
        kernels = row["features"]["kernels"]
        assert row["median_ms"] > 0
        assert sorted(k["family"] for k in kernels) == sorted(k.family for k in decompose(build_network(spec.params)))
        timed = [k["ms"] for k in kernels if k["ms"] is not None]
        assert len(timed) >= len(kernels) - 1 and all(ms >= 0 for ms in timed)
    # a second run resumes: nothing is timed again, networks included
    assert presso.profile_device(threads=1, runs=3, specs=specs, quiet=False, db=db).resumed == len(specs)


def test_the_predictor_fits_in_context_kernels_beside_the_isolated_ones():
    from presso.bench.kernels import Kernel
    from presso.bench.predictor import LatencyPredictor, in_context

    x = {"log_macs": 10.0, "log_in": 9.0, "log_out": 9.0}
    isolated = [
        {"kernel_key": "Add", "median_ms": 0.01 * (i + 1), "features": {"signature": f"Add:{i}", "x": x}}
        for i in range(6)
    ]
    network = {
        "median_ms": 1.0,
        "features": {
            "kernels": [
                {"family": "Add", "signature": "Add:0", "features": x, "ms": 0.004},  # the same kernel, in context
                {"family": "Relu", "signature": "Relu:a", "features": x, "ms": 0.02},  # a family only seen there
                {"family": "Relu", "signature": "Relu:b", "features": x, "ms": None},  # not in the profile: skipped
            ]
        },
    }
    assert [r["features"]["signature"] for r in in_context([network])] == ["Add:0", "Relu:a"]
    p = LatencyPredictor(isolated, [], network_rows=[network])
    assert sorted(p.table["Add:0"]) == [0.004, 0.01] and "Relu" in p.ratio
    ms, how = p.kernel_ms([Kernel("n", "Add", "Add", "Add:0", x)])[0]
    assert how == "table" and ms == pytest.approx(0.007)
    assert LatencyPredictor(isolated, []).table["Add:0"] == [0.01]
