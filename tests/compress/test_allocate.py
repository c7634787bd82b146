"""Per-layer allocations chosen on data (adaptive BatchNorm, EagleEye-style) and on a device (time per MAC)."""

import numpy as np
import pytest
import torch
from torch import nn

import presso
from presso.compress import PruneConfig, Target
from presso.compress.allocate import (
    ScaledAllocation,
    adapt_batchnorm,
    batch_inputs,
    output_distance,
    time_per_mac_allocations,
)
from presso.compress.recommend import channel_groups


def test_adapt_batchnorm_reestimates_statistics_and_restores_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)).eval()
    batches = [(torch.randn(4, 3, 9, 9) * 3 + 1,) for _ in range(3)]
    with torch.no_grad():
        feats = torch.cat([model[0](x) for (x,) in batches])
    assert adapt_batchnorm(model, batches) == 1
    bn = model[1]
    # a cumulative average over equal batches: the mean over all of them; the variance, each batch's unbiased one
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats.split(4)]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training and not bn.training
    assert int(bn.num_batches_tracked) == 3


def test_output_distance_is_zero_for_the_same_outputs_and_grows_with_damage():
    from presso.testing.models import tiny_cnn

    torch.manual_seed(0)
    model = tiny_cnn().eval()
    batches = batch_inputs([(torch.randn(4, 3, 16, 16), torch.zeros(4)) for _ in range(2)])
    with torch.no_grad():
        ref = [model(*x) for x in batches]
    assert output_distance(model, batches, ref) == pytest.approx(0.0, abs=1e-6)
    damaged = presso.compress(model, "1,3,16,16", PruneConfig(ratio=0.6, round_to=None)).model
    assert output_distance(damaged, batches, ref) > 1e-5  # random-init logits are small: so is their KL


def test_scaled_allocation_scales_and_caps_ratios():
    alloc = ScaledAllocation({"a": ["a", "a2"], "b": ["b"]}, {"a": 0.5, "b": 3.0})
    assert alloc.ratios(0.2) == {"a": 0.1, "a2": 0.1, "b": 0.6}
    assert alloc.ratios(0.5)["b"] == 0.9  # capped
    # a search must be able to cut every group to the cap: group "a" (multiplier 0.5) needs a knob of 1.8
    assert alloc.knob_max == pytest.approx(1.8) and alloc.ratios(alloc.knob_max)["a"] == 0.9
    moved = alloc.perturbed(np.random.default_rng(0), 0.5)
    assert np.mean(list(moved.weights.values())) == pytest.approx(1.0)
    back = ScaledAllocation.from_config(alloc.members, PruneConfig(ratio=None, per_layer=alloc.ratios(0.2)))
    # relative to the groups' mean ratio (0.35): that knob gives the same ratios back
    assert back.ratios(0.35) == pytest.approx(alloc.ratios(0.2))


def _digits_calibration(model_spec="1,1,8,8"):
    from presso.data import calibration_batches

    return calibration_batches("digits", presso.InputSpec.parse(model_spec), batches=2, batch_size=32)


def test_target_with_data_chooses_among_allocations_by_adapted_output():
    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=10, in_chans=1)
    calib = _digits_calibration()
    r = presso.compress(model, "1,1,8,8", PruneConfig(), target=Target(macs=0.5), calib=calib)
    search = r.extra["target"]["search"][0]
    cands = search["candidates"]
    names = [c["allocation"] for c in cands]
    assert {"uniform", "LAMP per unit cost", "LAMP x sensitivity"} <= set(names) and len(cands) >= 12
    judged = [c for c in cands if "distance" in c]
    assert all(abs(c["kept"] / 0.5 - 1) <= 0.03 for c in judged)
    winner = min(judged, key=lambda c: c["distance"])
    assert search["why"].startswith(winner["allocation"] + ":")
    assert abs(r.after["macs"] / r.before["macs"] / 0.5 - 1) <= 0.03 and r.extra["batchnorm_adapted"]
    # the returned model is the judged one: its distance is the winner's
    from presso.compress.allocate import batch_inputs as bi

    batches = bi(calib)
    with torch.no_grad():
        ref = [model.eval()(*x) for x in batches]
    assert output_distance(r.model, batches, ref) == pytest.approx(winner["distance"], rel=1e-3)


def test_time_per_mac_allocations_cut_slow_groups_harder():
    model = presso.load_model("torchvision:mobilenet_v2")
    inputs = presso.InputSpec.parse("1,3,64,64").example_inputs()
    members = channel_groups(model, inputs)
    allocs = dict(time_per_mac_allocations(model, inputs, members, alphas=(0.0, 1.0)))
    assert set(allocs["uniform"].weights.values()) == {1.0}
    w = allocs["time per MAC ^ 1"].weights
    # MobileNetV2's expanded groups run a depthwise convolution: more time per MAC than the dense-only groups
    dw = {k for k, layers in members.items() if any(dict(model.named_modules())[n].groups > 1 for n in layers)}
    dense = set(members) - dw
    assert dw and dense and np.mean([w[k] for k in dw]) > np.mean([w[k] for k in dense])


@pytest.mark.timing
def test_macs_target_on_a_device_picks_the_fastest_allocation():
    model = presso.load_model("torchvision:mobilenet_v2")
    inputs = presso.InputSpec.parse("1,3,64,64").example_inputs()
    r = presso.compress(model, inputs, PruneConfig(), target=Target(macs=0.5, device="local"))
    search = r.extra["target"]["search"][0]
    assert abs(r.after["macs"] / r.before["macs"] / 0.5 - 1) <= 0.03
    assert "fastest measured here" in search["why"]
    # every allocation reaches the budget (the knob's range covers groups with small weights) and is timed
    assert all(abs(c["kept"] / 0.5 - 1) <= 0.03 for c in search["candidates"])
    timed = [c for c in search["candidates"] if "ms" in c]
    assert len(timed) == len(search["candidates"]) >= 4
    assert search["why"].startswith(min(timed, key=lambda c: c["ms"])["allocation"])
