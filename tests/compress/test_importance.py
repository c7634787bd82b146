"""The importance-criteria registry as an extension point: a criterion registered here, with one decorator line,
is accepted by PruneConfig and by ``presso compress --criterion`` and really ranks the channels; unknown names are a
clear error naming the registered ones."""

import pytest
import torch
import torch_pruning as tp
from typer.testing import CliRunner

import presso
from presso.cli import app
from presso.compress import PruneConfig
from presso.compress.prune import criteria, needs_gradients, register_importance
from presso.errors import ConfigError
from presso.models import load_model, load_model_dir
from presso.testing import TinyCNN

CALLS = {"first-channels": 0}


class FirstChannelsFirst(tp.importance.Importance):
    """Scores channel i of a group by i, so the first channels are the least important (and removed first)."""

    def __call__(self, group):
        CALLS["first-channels"] += 1
        return torch.arange(len(group[0].idxs), dtype=torch.float32)


@register_importance("first-channels")
def _first_channels(cfg):
    return FirstChannelsFirst()


@register_importance("taylor-again", needs_gradients=True)
def _taylor_again(cfg):
    return tp.importance.GroupTaylorImportance()


def _convs(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_a_registered_criterion_is_usable_from_the_cli(tmp_path):
    before = CALLS["first-channels"]
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["compress", "presso:resnet8", "-s", "1,3,16,16", "--criterion", "first-channels", "--prune-ratio", "0.5",
         "-o", str(out), "--model-arg", "num_classes=3"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert CALLS["first-channels"] > before  # the criterion ranked the channels
    original = _convs(load_model("presso:resnet8", num_classes=3))
    pruned = _convs(load_model_dir(out))
    assert pruned.keys() == original.keys()
    assert all(pruned[n] <= original[n] for n in original)
    assert sum(pruned.values()) < 0.75 * sum(original.values())


def test_a_registered_criterion_decides_which_channels_go():
    model = TinyCNN().eval()
    before = model.stem[0].weight.detach().clone()
    r = presso.compress(model, "2,3,32,32", PruneConfig(ratio=0.5, criterion="first-channels", round_to=None))
    assert torch.equal(r.model.stem[0].weight, before[16:])  # channels 0..15 scored lowest


def test_a_criterion_that_needs_gradients_gets_them_from_data():
    assert needs_gradients("taylor") and needs_gradients("taylor-again") and not needs_gradients("first-channels")
    with pytest.raises(ConfigError, match="criterion 'taylor-again' needs a few batches of data"):
        presso.compress(TinyCNN(), "2,3,32,32", PruneConfig(criterion="taylor-again"))
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    r = presso.compress(TinyCNN().eval(), "2,3,32,32", PruneConfig(criterion="taylor-again", round_to=None), calib=data)
    assert r.after["macs"] < 0.8 * r.before["macs"]


def test_the_registry_is_the_list_of_criteria():
    assert criteria()[:6] == ["l1", "l2", "gm", "taylor", "random", "index"]
    assert "first-channels" in criteria()


def test_an_unknown_criterion_names_the_registered_ones():
    with pytest.raises(ConfigError, match="Unknown criterion 'l3'") as e:
        PruneConfig(criterion="l3")
    for name in ("l1", "l2", "gm", "taylor", "random", "index", "first-channels"):
        assert name in str(e.value)
    assert "Did you mean" in str(e.value)


def test_an_unknown_criterion_on_the_cli_is_one_clear_line(tmp_path):
    res = CliRunner().invoke(
        app,
        ["compress", "presso:resnet8", "-s", "1,3,16,16", "--criterion", "nope", "-o", str(tmp_path / "o"),
         "--model-arg", "num_classes=3"],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "Unknown criterion 'nope'" in res.stderr and "first-channels" in res.stderr
    assert not (tmp_path / "o").exists()
