"""Low-rank decomposition: exactness at full rank, VBMF and energy ranks, settings, and on real models."""

import re

import numpy as np
import pytest
import torch
from torch import nn

import presso
from presso.compress import DecomposeConfig, PruneConfig
from presso.compress.decompose import factorize
from presso.compress.vbmf import apply_offset, energy_rank, evbmf_rank
from presso.errors import ConfigError


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- exactness at full rank
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(12, 20, 3, padding=1),
        nn.Conv2d(12, 20, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(8, 6, (3, 5), stride=(1, 2), padding=(1, 2)),
    ],
    ids=["3x3", "strided-dilated", "3x5"],
)
def test_tucker_at_full_rank_reproduces_the_layer(conv):
    x = torch.randn(2, conv.in_channels, 11, 13)
    seq = factorize(conv, "tucker", (conv.out_channels, conv.in_channels))
    assert [type(m) for m in seq] == [nn.Conv2d] * 3
    with torch.no_grad():
        assert _rel(seq(x), conv(x)) < 1e-4


@pytest.mark.parametrize("layer", [nn.Linear(24, 16), nn.Conv2d(16, 24, 1, stride=2)], ids=["linear", "conv1x1"])
def test_svd_at_full_rank_reproduces_the_layer(layer):
    x = torch.randn(3, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 16, 9, 9)
    seq = factorize(layer, "svd", (16,))
    with torch.no_grad():
        assert _rel(seq(x), layer(x)) < 1e-4


def test_cp_recovers_a_weight_of_exact_cp_rank():
    torch.manual_seed(0)
    a, b, c, d = torch.randn(20, 5), torch.randn(12, 5), torch.randn(3, 5), torch.randn(3, 5)
    conv = nn.Conv2d(12, 20, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d))
    seq = factorize(conv, "cp", (5,))
    assert [m.groups for m in seq] == [1, 5, 5, 1]  # 1x1, depthwise kx1, depthwise 1xk, 1x1
    x = torch.randn(2, 12, 10, 10)
    with torch.no_grad():
        assert _rel(seq(x), conv(x)) < 1e-3


# --------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("rows,cols,rank,noise", [(64, 128, 10, 0.1), (128, 64, 5, 0.5), (48, 432, 8, 0.05)])
def test_vbmf_recovers_the_rank_of_low_rank_plus_noise(rows, cols, rank, noise):
    rng = np.random.default_rng(rank)
    signal = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols))
    assert evbmf_rank(signal + noise * rng.normal(size=(rows, cols))) == rank


def test_vbmf_keeps_nothing_of_pure_noise():
    assert evbmf_rank(np.random.default_rng(0).normal(size=(64, 200))) == 0


def test_energy_rank_and_offset():
    s = np.array([10.0, 5.0, 1.0, 0.5])
    # squared: 100, 25, 1, 0.25 -> cumulative shares 0.792, 0.990, 0.998, 1
    assert [energy_rank(s, e) for e in (0.75, 0.8, 0.995, 1.0)] == [1, 2, 3, 4]
    assert apply_offset(10, 100, 0.0) == 10 and apply_offset(10, 100, 1.0) == 100 and apply_offset(10, 100, -1.0) == 1
    assert apply_offset(10, 100, 0.5) == 55 and apply_offset(10, 100, -0.5) == 5


@pytest.mark.parametrize(
    "bad",
    [dict(method="qr"), dict(rank="magic"), dict(vbmf_offset=1.5), dict(energy=0.0), dict(per_layer={"a": -1})],
)
def test_bad_decomposition_settings_are_named(bad):
    message = {"method": "decomposition 'qr'", "rank": "rank rule 'magic'", "vbmf_offset": "vbmf_offset 1.5",
               "energy": "energy 0.0", "per_layer": "Rank for 'a'"}[next(iter(bad))]  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(message)):
        DecomposeConfig(**bad)


# --------------------------------------------------------------------------- on models
def _skips(result):
    return {s["name"]: s["reason"] for s in result.skipped}


def test_tucker_skips_what_it_cannot_or_should_not_decompose():
    model = presso.load_model("torchvision:mobilenet_v2")
    r = presso.compress(model, "1,3,64,64", DecomposeConfig("tucker", rank="ratio", rank_ratio=0.5))
    skips = _skips(r)
    assert "depthwise" in skips["features.1.conv.0.0"]
    assert "use svd" in skips["features.1.conv.1"]
    assert r.extra["decomposed"]["features.0.0"]["ranks"] == [14, 2]  # half of min(32, 3*3*3) and of 3
    full = presso.compress(model, "1,3,64,64", DecomposeConfig("tucker", per_layer={"features.0.0": [32, 3]}))
    assert "would keep" in _skips(full)["features.0.0"]


def test_per_layer_ranks_naming_an_unknown_or_ineligible_layer():
    model = presso.load_model("torchvision:resnet18")
    with pytest.raises(ConfigError, match="unknown layers"):
        presso.compress(model, "1,3,32,32", DecomposeConfig("tucker", per_layer={"layer9.conv": [4, 4]}))
    with pytest.raises(ConfigError, match="cannot decompose"):
        presso.compress(model, "1,3,32,32", DecomposeConfig("tucker", per_layer={"fc": [4, 4]}))


@pytest.mark.parametrize("method", ["tucker", "cp", "svd"])
def test_decomposed_model_reloads_exactly_and_exports_to_onnx(method, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=10)
    cfg = DecomposeConfig(method, rank="ratio", rank_ratio=0.25, cp_iterations=10)
    r = presso.compress(model, "1,3,32,32", cfg)
    assert r.extra["decomposed"] and r.after["macs"] < r.before["macs"]
    presso.save_model_dir(r.model, tmp_path / "m", input_spec="1,3,32,32")
    reloaded = presso.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = r.model(x)
        assert torch.equal(reloaded(x), expected)
    torch.onnx.export(reloaded, (x,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(y, expected.numpy(), atol=1e-4)


def test_prune_then_decompose_is_one_recipe_and_decomposed_layers_stay_prunable(tmp_path):
    model = presso.load_model("torchvision:resnet18", num_classes=10)
    both = presso.compress(model, "1,3,32,32", [PruneConfig(ratio=0.25), DecomposeConfig("tucker", rank="ratio")])
    card = both.model.presso_card
    assert [s["type"] for s in card.recipe] == ["prune", "decompose"] and both.method == "prune+decompose"
    again = presso.compress(both.model, "1,3,32,32", PruneConfig(ratio=0.5))
    assert again.after["macs"] < both.after["macs"]
    presso.save_model_dir(again.model, tmp_path / "m", input_spec="1,3,32,32")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(presso.load_model(tmp_path / "m")(x), again.model(x))
