"""Per-layer ratios recommended from LAMP weight scores, bounded to a band, guided by sensitivity on data."""

import pytest
import torch

import presso
from presso.compress import PruneConfig
from presso.compress.recommend import lamp_scores


def test_lamp_ratios_differ_per_group_and_never_empty_a_layer():
    model = presso.load_model("torchvision:resnet18")
    inputs = presso.InputSpec.parse("1,3,32,32").example_inputs()
    scores = lamp_scores(model, inputs, cost=None)
    assert all(s.max() == pytest.approx(1.0) for s in scores.scores.values())  # the strongest channel scores 1
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= set(scores.members["conv1"])  # a residual stage is one group
    ratios = scores.ratios(0.4)
    assert max(ratios.values()) <= 0.9 and len(set(ratios.values())) > 3
    assert len({ratios[n] for n in scores.members["conv1"]}) == 1  # one ratio per group
    total = sum(len(s) for s in scores.scores.values())
    removed = sum(ratios[k] * len(s) for k, s in scores.scores.items())
    assert abs(removed / total - 0.4) < 0.05
    assert scores.ratios(0.2)["layer1.0.conv1"] <= ratios["layer1.0.conv1"]
    # cost-aware: a channel of the high-resolution first stage costs more MACs, so it is cut sooner per unit score
    by_macs = lamp_scores(model, inputs, cost="macs").ratios(0.4)
    assert by_macs["layer1.0.conv1"] >= ratios["layer1.0.conv1"]


def test_recommend_without_a_target_spreads_the_ratio_over_layers(tmp_path):
    from typer.testing import CliRunner

    from presso.cli import app

    model = presso.load_model("torchvision:resnet18")
    r = presso.compress(model, "1,3,32,32", PruneConfig(ratio=0.3, round_to=None), recommend=True)
    ratios = {n: v["ratio"] for n, v in r.per_layer.items() if v.get("ratio")}
    assert len(set(ratios.values())) > 3  # not uniform
    res = CliRunner().invoke(app, ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "-r", "0.3", "--recommend",
                                   "-o", str(tmp_path / "m"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "per_layer.yaml").is_file()


def test_sensitivity_makes_sensitive_layers_keep_more():
    from presso.testing.models import tiny_cnn

    torch.manual_seed(0)
    model = tiny_cnn()
    inputs = presso.InputSpec.parse("1,3,16,16").example_inputs()
    data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    plain, guided = lamp_scores(model, inputs), lamp_scores(model, inputs, data=data)
    sens = guided.sensitivity
    assert sens is not None and len(set(round(v, 6) for v in sens.values())) > 1
    most, least = max(sens, key=sens.get), min(sens, key=sens.get)
    ratio_shift = {n: guided.ratios(0.3)[n] - plain.ratios(0.3)[n] for n in (most, least)}
    assert ratio_shift[most] <= ratio_shift[least]


def test_recommended_ratios_stay_within_the_band_around_the_overall_share():
    model = presso.load_model("torchvision:resnet18")
    inputs = presso.InputSpec.parse("1,3,32,32").example_inputs()
    scores = lamp_scores(model, inputs)
    for share in (0.2, 0.4):
        ratios = scores.ratios(share)
        assert all(share / 2 - 1e-4 <= r <= min(0.9, 2 * share) + 1e-4 for r in ratios.values())
        assert len(set(ratios.values())) > 1  # still per group, not uniform
    scores.band = None  # unbounded: the plain LAMP allocation goes past the band somewhere
    assert any(not 0.1 <= r <= 0.4 for r in scores.ratios(0.2).values())
