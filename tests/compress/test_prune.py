"""Pruning behaviour on tiny models: criteria, per-layer ratios, indices, ignored layers, rounding, attention heads,
rollback of groups that break the model, and the replayable recipe."""

import json

import pytest
import torch
from torch import nn

import presso
from presso.compress import PruneConfig, load_layer_file
from presso.errors import ConfigError, InputSpecError
from presso.testing import HardCodedWidth, TinyAttentionNet, TinyCNN
from presso.testing.models import Attention

SHAPE = "2,3,32,32"


def _x():
    return presso.InputSpec.parse(SHAPE).example_inputs()


@pytest.mark.parametrize("criterion", ["l1", "l2", "gm", "random", "taylor"])
@pytest.mark.parametrize("factory", [TinyCNN, TinyAttentionNet])
def test_every_criterion_prunes_and_keeps_outputs(criterion, factory):
    model = factory().eval()
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)] if criterion == "taylor" else None
    result = presso.compress(model, SHAPE, PruneConfig(ratio=0.5, criterion=criterion, round_to=None), calib=data)
    out = result.model(*_x())
    assert out.shape == (2, 10)
    assert result.after["macs"] < 0.8 * result.before["macs"]
    assert result.after["params"] < result.before["params"]
    # the original is untouched (compress works on a copy by default)
    assert model(*_x()).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == result.before["params"]


def test_l1_and_l2_remove_the_weakest_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        for i in range(8):
            model[0].weight[i].fill_(0.01 * (i + 1))  # channel i has magnitude growing with i
            model[0].bias[i] = 0.0
            model[2].weight[:, i].fill_(0.01 * (i + 1))
    for criterion in ("l1", "l2"):
        r = presso.compress(model, "1,3,8,8", PruneConfig(ratio=0.5, criterion=criterion, round_to=None))
        kept = r.model[0].weight[:, 0, 0, 0]
        assert torch.allclose(kept, torch.tensor([0.05, 0.06, 0.07, 0.08]))


def test_taylor_needs_data():
    with pytest.raises(ConfigError, match="data"):
        presso.compress(TinyCNN(), SHAPE, PruneConfig(criterion="taylor"))


def test_index_criterion_removes_exactly_the_given_channels():
    model = TinyCNN().eval()
    before = model.stem[0].weight.detach().clone()
    drop = [0, 3, 5, 31]
    cfg = PruneConfig(ratio=None, criterion="index", indices={"stem.0": drop})
    r = presso.compress(model, SHAPE, cfg)
    keep = [i for i in range(32) if i not in drop]
    assert torch.equal(r.model.stem[0].weight, before[keep])
    assert r.model.stem[1].num_features == 28
    assert r.per_layer["stem.0"] == {"before": 32, "after": 28, "ratio": 0.125}
    # layers not named in the file keep their channels
    assert r.model.branch_a.out_channels == 32


def test_index_out_of_range_is_a_clear_error():
    cfg = PruneConfig(ratio=None, criterion="index", indices={"stem.0": [40]})
    with pytest.raises(ConfigError, match="out of range.*32 channels"):
        presso.compress(TinyCNN(), SHAPE, cfg)


def test_per_layer_ratios_override_the_global_ratio():
    cfg = PruneConfig(ratio=None, per_layer={"stem.0": 0.75}, round_to=None)
    r = presso.compress(TinyCNN(), SHAPE, cfg)
    assert r.per_layer["stem.0"]["after"] == 8
    assert r.per_layer["branch_a"]["after"] == 32  # not listed, global ratio None: untouched


def test_unknown_layer_in_per_layer_file_names_the_closest(tmp_path):
    f = tmp_path / "ratios.json"
    f.write_text(json.dumps({"stem.O": 0.5}))
    with pytest.raises(ConfigError, match=r"'stem\.O'.*does not exist.*stem\.0"):
        presso.compress(TinyCNN(), SHAPE, PruneConfig(per_layer=load_layer_file(f, "per-layer ratio")))


def test_yaml_per_layer_file(tmp_path):
    f = tmp_path / "ratios.yaml"
    f.write_text("stem.0: 0.5\nbranch_a: 0.25\n")
    assert load_layer_file(f, "per-layer ratio") == {"stem.0": 0.5, "branch_a": 0.25}


def test_ignored_layers_and_output_layers_stay_whole():
    r = presso.compress(TinyCNN(), SHAPE, PruneConfig(ratio=0.5, ignore=["stem.*"], round_to=None))
    assert r.model.stem[0].out_channels == 32
    assert r.model.head.out_features == 10
    reasons = {s["name"]: s["reason"] for s in r.skipped}
    assert "output" in reasons["head"]
    with pytest.raises(ConfigError, match="matches no layer"):
        presso.compress(TinyCNN(), SHAPE, PruneConfig(ignore=["nope"]))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ConfigError, match=r"outside \(0, 1\)"):
        PruneConfig(ratio=ratio)


def test_round_to_keeps_hardware_friendly_widths():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 10, 1))
    r = presso.compress(model, "1,3,16,16", PruneConfig(ratio=0.3, round_to=8))
    assert r.model[0].out_channels % 8 == 0 and r.model[2].out_channels % 8 == 0
    assert r.model[0].out_channels == 48  # 64 * 0.7 = 44.8 -> nearest multiple of 8
    small = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 10, 1))
    r = presso.compress(small, "1,3,16,16", PruneConfig(ratio=0.5, round_to=8))
    assert r.model[0].out_channels == 6  # fewer than 16 channels: no rounding


def test_attention_head_dims_pruned_consistently():
    model = TinyAttentionNet(dim=64, num_heads=4).eval()
    r = presso.compress(model, SHAPE, PruneConfig(ratio=0.5, round_to=None))
    attn = r.model.attn
    assert attn.num_heads == 4
    assert attn.head_dim * attn.num_heads == attn.proj.in_features
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert r.model(*_x()).shape == (2, 10)


def test_whole_heads_removed_without_changing_the_function():
    """A head whose value and output-projection weights are zero contributes nothing: removing it (the weakest head
    by magnitude) must leave the attention output unchanged."""
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4).eval()
    with torch.no_grad():
        hd = 8
        dead = 2
        attn.qkv.weight[64 + dead * hd : 64 + (dead + 1) * hd].zero_()  # v of head 2
        attn.qkv.bias[64 + dead * hd : 64 + (dead + 1) * hd].zero_()
        attn.qkv.weight[dead * hd : (dead + 1) * hd].mul_(1e-3)  # q, k of head 2: tiny
        attn.qkv.weight[32 + dead * hd : 32 + (dead + 1) * hd].mul_(1e-3)
        attn.proj.weight[:, dead * hd : (dead + 1) * hd].zero_()
    x = torch.randn(2, 5, 32)
    ref = attn(x)
    r = presso.compress(attn, (x,), PruneConfig(ratio=0.25, attention="heads", round_to=None))
    assert r.model.num_heads == 3 and r.model.head_dim == 8
    assert torch.allclose(r.model(x), ref, atol=1e-5)
    assert [s for s in r.skipped if "attention" in s["reason"]] == []


def test_group_that_breaks_the_model_is_rolled_back_and_reported():
    model = HardCodedWidth().eval()
    r = presso.compress(model, "1,3,8,8", PruneConfig(ratio=0.5, round_to=None))
    assert r.model.a.out_channels == 16  # rolled back: the forward hard-codes 16
    assert r.model.b.out_channels == 16  # still pruned
    reasons = {s["name"]: s["reason"] for s in r.skipped}
    assert "no longer runs" in reasons["a"]
    assert r.model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_recipe_replays_exactly(tmp_path):
    from presso.models.recipe import replay

    model = TinyCNN().eval()
    r = presso.compress(model, SHAPE, PruneConfig(ratio=0.5, criterion="gm"))
    fresh = TinyCNN().eval()
    replay(fresh, r.model.presso_card.recipe[-1])
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in r.model.state_dict().items()}


def test_model_that_does_not_run_on_the_input_shape_is_an_input_error():
    with pytest.raises(InputSpecError, match="does not run on inputs of shape"):
        presso.compress(TinyCNN(), "1,4,32,32", PruneConfig())


def test_config_json_round_trip():
    cfg = PruneConfig(ratio=0.3, criterion="gm", per_layer={"a": 0.1}, ignore=["x"], round_to=None)
    assert PruneConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.to_json()["version"] == 1


def test_removing_dead_channels_keeps_the_function():
    """Channels whose every consumer ignores them carry no information: pruning exactly those (through a residual add,
    a depthwise conv and two branches) must leave the model's output unchanged -- a check that the coupled layers
    are cut at the same positions, not only to the same sizes."""
    model = TinyCNN().eval()
    dead = [1, 5, 17]
    with torch.no_grad():
        for layer in (model.block[0], model.branch_a, model.branch_b[1]):
            layer.weight[:, dead] = 0.0
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    r = presso.compress(model, (x,), PruneConfig(ratio=None, criterion="index", indices={"stem.0": dead}))
    assert r.model.stem[0].out_channels == 29 and r.model.block[3].out_channels == 29
    assert r.model.branch_b[0].groups == 29
    assert torch.allclose(r.model(x), ref, atol=1e-5)


class _GroupedBlock(nn.Module):
    """ResNeXt/RegNet bottleneck: 1x1 -> grouped 3x3 (4 groups of 8) -> 1x1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 1)
        self.b = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.c = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_grouped_conv_loses_a_whole_group_without_changing_the_function():
    """Group 2 of the grouped convolution is weak and feeds nothing (its columns in the next 1x1 are zero): removing
    it as a whole -- the inputs feeding it, its filters, and the next layer's columns -- must leave the output
    unchanged, which holds only if the kept groups' weights stay aligned with their inputs."""
    torch.manual_seed(0)
    model = _GroupedBlock().eval()
    dead = slice(16, 24)
    with torch.no_grad():
        model.a.weight[dead] *= 1e-3
        model.b.weight[dead] *= 1e-3
        model.c.weight[:, dead] = 0.0
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    r = presso.compress(model, (x,), PruneConfig(ratio=0.25, round_to=None))
    b = r.model.b
    assert (b.groups, b.in_channels, b.out_channels) == (3, 24, 24)
    assert r.model.a.out_channels == 24 and r.model.c.in_channels == 24
    assert torch.allclose(r.model(x), ref, atol=1e-5)


def test_grouped_width_mode_keeps_the_group_count():
    model = _GroupedBlock().eval()
    r = presso.compress(model, "2,3,8,8", PruneConfig(ratio=0.5, round_to=None, grouped="width"))
    b = r.model.b
    assert (b.groups, b.in_channels, b.out_channels) == (4, 16, 16)
    with pytest.raises(ConfigError, match="grouped mode"):
        PruneConfig(grouped="rows")


@pytest.mark.parametrize(
    "source", ["torchvision:regnet_x_400mf", "torchvision:resnext50_32x4d", "timm:regnety_002", "timm:resnext26ts"]
)
def test_grouped_convs_of_real_models_keep_their_group_width(source, tmp_path):
    """RegNet and ResNeXt thinned by whole groups: every grouped convolution keeps its group width, most lose groups,
    and the model directory reloads to identical outputs."""
    model = presso.load_model(source).eval()
    before = {n: (m.in_channels // m.groups, m.out_channels // m.groups, m.groups) for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels}  # fmt: skip
    r = presso.compress(model, "1,3,64,64", PruneConfig(ratio=0.5, round_to=None))
    after = {n: m for n, m in r.model.named_modules() if n in before}
    widths = {n: (m.in_channels // m.groups, m.out_channels // m.groups) for n, m in after.items()}
    assert [n for n in after if widths[n] != before[n][:2]] == []
    thinned = [n for n, m in after.items() if m.groups < before[n][2]]
    assert len(thinned) >= 0.9 * len(before)
    x = torch.randn(1, 3, 64, 64)
    presso.save_model_dir(r.model, tmp_path / "m", input_spec="1,3,64,64")
    with torch.no_grad():
        assert torch.equal(presso.load_model(tmp_path / "m").eval()(x), r.model(x))


class _RadixBlock(nn.Module):
    """A grouped convolution whose output is viewed by radix and summed (ResNeSt's split attention, reduced)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        n, ch, h, w = y.shape
        return self.c(y.view(n, 2, ch // 2, h, w).sum(1))


def test_grouped_conv_behind_a_channel_reshape_keeps_per_group_pruning():
    """Removing a whole group here would remove a radix split: such convolutions are not paired with their input
    group, which is then still thinned the same way in every group."""
    r = presso.compress(_RadixBlock().eval(), "1,3,8,8", PruneConfig(ratio=0.5, round_to=None))
    assert (r.model.b.groups, r.model.b.in_channels, r.model.a.out_channels) == (2, 8, 8)
    assert r.model(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


def test_grouped_conv_unit_is_one_recommendation_group():
    from presso.compress.recommend import channel_groups

    units = channel_groups(_GroupedBlock().eval(), (torch.randn(1, 3, 8, 8),))
    assert list(units.values()) == [["b", "a"]]
