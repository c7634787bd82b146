"""Sparsity training before a cut (presso.compress.prune.sparsity.GroupDecay, ``presso train --sparsity``)."""

import copy
import functools
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import presso
from presso.cli import app
from presso.compress import PruneConfig
from presso.compress.prune.sparsity import GroupDecay
from presso.data import load_data
from presso.errors import ConfigError, UnsupportedLayerError
from presso.testing.models import tiny_cnn
from presso.train import TrainConfig

DIGITS = "digits:size=12"
X = torch.randn(2, 3, 12, 12)


@pytest.fixture(scope="module")
def digits():
    return load_data(DIGITS)


def _train(digits, strength, tmp=None):
    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=10)
    decay = functools.partial(GroupDecay, strength=strength, ratio=0.5) if strength else None
    cfg = TrainConfig(epochs=4, batch_size=64, workers=0)
    return presso.train(model, digits, cfg, regularizer=decay, output_dir=tmp)


def _cut(model, digits, ratio):
    pruned = presso.compress(copy.deepcopy(model), (X,), PruneConfig(ratio=ratio, criterion="l2")).model
    return presso.train.evaluate(pruned, digits).val_top1


@pytest.fixture(scope="module")
def dense_and_sparse(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "r8"
    return _train(digits, None), _train(digits, 80.0, out), out


def test_sparsity_training_empties_half_of_every_group_and_the_cut_keeps_the_accuracy(dense_and_sparse, digits):
    # Measured once (resnet8, digits 12 px, 4 epochs, strength 80, ratio 0.5): dense 0.967 -> cut 0.100 (chance);
    # sparse 0.944 -> cut 0.939.
    dense, sparse, _ = dense_and_sparse
    assert sparse.best["val_top1"] >= 0.90
    norms = GroupDecay(sparse.model, (X,), 1.0).norms()
    for norm in norms:  # in every group the weakest half is near zero, the strongest half is not
        ordered = norm.sort().values
        half = len(ordered) // 2
        assert ordered[half - 1] < 0.05 * ordered[-1]
        assert ordered[half] > 0.05 * ordered[-1]
    assert _cut(dense.model, digits, 0.5) <= 0.35
    assert _cut(sparse.model, digits, 0.5) >= 0.85


def test_the_card_records_the_regularizer(dense_and_sparse):
    _, _, out = dense_and_sparse
    card = json.loads((out / "presso.json").read_text())
    entry = card["history"][-1]
    assert entry["verb"] == "train"
    assert entry["regularizer"] == {"kind": "group-decay", "strength": 80.0, "ratio": 0.5, "groups": 6, "ignore": []}


def test_only_groups_the_cut_may_remove_are_decayed():
    model = tiny_cnn(width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decay = GroupDecay(model, (torch.randn(2, 3, 16, 16),), 50.0, ratio=0.5, ignore=["stem.0"])
    names = [name for name, _, _ in decay.groups]
    assert names and "stem.0" not in names and "head" not in names  # ignored layer, output layer
    decay.after_step(0.01)  # shrink by 1 - 0.5
    after = model.state_dict()
    assert torch.equal(after["head.bias"], before["head.bias"])  # the output layer's own channels: untouched
    names_of = {id(p): n for n, p in model.named_parameters()}
    for name, channels, slices in decay.groups:
        # a 1-D slice (a BatchNorm's scale, a bias) is decayed by its own group only
        one_d = next(s for s in slices if s.param.dim() == 1)
        key = names_of[id(one_d.param)]
        ratio = (after[key][one_d.idxs] / before[key][one_d.idxs]).tolist()
        assert sum(abs(r - 0.5) < 1e-5 for r in ratio) == round(0.5 * channels), name
        assert sum(abs(r - 1.0) < 1e-6 for r in ratio) == channels - round(0.5 * channels), name


@pytest.mark.parametrize(("strength", "ratio"), [(0.0, 0.5), (float("nan"), 0.5), (-1.0, 0.5), (10.0, 1.0)])
def test_bad_settings_name_the_option(strength, ratio):
    with pytest.raises(ConfigError, match="--sparsity"):
        GroupDecay(tiny_cnn(), (torch.randn(1, 3, 16, 16),), strength, ratio=ratio)


def test_a_model_without_a_prunable_group_is_refused_in_one_line():
    with pytest.raises(UnsupportedLayerError, match="no prunable channel group"):
        GroupDecay(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), (torch.randn(1, 3, 2, 2),), 10.0)


def test_cli_train_sparsity(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["train", "presso:resnet8", "--data", DIGITS, "-o", str(tmp_path / "x"), "--sparsity",
                              "-3"])  # fmt: skip
    assert bad.exit_code == 2 and "--sparsity" in bad.output
    assert not (tmp_path / "x").exists()
    args = ["train", "presso:resnet8", "--data", DIGITS, "-o", str(tmp_path / "m"), "--epochs", "1", "--batch-size",
            "64", "--sparsity", "40", "--sparsity-ratio", "0.25", "--json"]  # fmt: skip
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    entry = json.loads((tmp_path / "m" / "presso.json").read_text())["history"][-1]
    assert entry["regularizer"]["strength"] == 40.0 and entry["regularizer"]["ratio"] == 0.25
