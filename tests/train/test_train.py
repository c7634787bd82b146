"""The trainer: learning, checkpoints and resume, distillation with and without labels, and bad input."""

import copy
import csv
import json

import pytest
import torch
from torch import nn

import presso
from presso.compress import PruneConfig
from presso.data import load_data
from presso.errors import ConfigError, DataError
from presso.models.outputs import leaves, match_loss
from presso.train import TrainConfig, partial_dir
from presso.train.distill import FeatureTaps

DIGITS = "digits:size=12"
FAST = dict(batch_size=64, workers=0)


@pytest.fixture(scope="module")
def digits():
    return load_data(DIGITS)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """resnet8 trained 3 epochs on digits, saved as a model directory (shared by several tests)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("trained") / "digits-r8"
    model = presso.load_model("presso:resnet8", num_classes=10)
    result = presso.train(model, digits, TrainConfig(epochs=3, **FAST), output_dir=out)
    return result, out


def test_training_learns_far_above_chance(trained):
    result, _ = trained
    assert result.best["val_top1"] > 0.6  # chance is 0.1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_output_directory_holds_model_card_metrics_and_no_partial_state(trained, digits):
    result, out = trained
    card = json.loads((out / "presso.json").read_text())
    assert card["preprocess"]["size"] == [12, 12] and card["preprocess"]["channels"] == 3
    assert card["input_spec"] == "1,3,12,12"
    assert card["figures"]["val_top1"] == result.best["val_top1"]
    assert card["history"][-1]["verb"] == "train" and card["history"][-1]["config"]["epochs"] == 3
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and "val_top1" in rows[0]
    assert not partial_dir(out).exists()
    reloaded = presso.load_model(out)
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(reloaded(x), result.model(x))
    assert presso.train.evaluate(reloaded, digits).val_top1 == result.best["val_top1"]


def _run(digits, out, epochs=2, interrupt_at=None, resume=False):
    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=10, widths=[8, 16, 16])

    def progress(event):
        if interrupt_at and event.stage == "train" and (event.info["epoch"], event.info["step"]) == interrupt_at:
            raise KeyboardInterrupt

    cfg = TrainConfig(epochs=epochs, **FAST)
    return presso.train(model, digits, cfg, output_dir=out, resume=resume, progress=progress)


@pytest.mark.parametrize("interrupt_at", [(1, 7), (2, 1), (1, 26)], ids=["mid-epoch", "second-epoch", "epoch-end"])
def test_resume_after_interrupt_gives_the_same_weights(digits, tmp_path, interrupt_at):
    straight = _run(digits, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(digits, tmp_path / "b", interrupt_at=interrupt_at)
    assert (partial_dir(tmp_path / "b") / "last.pt").is_file()
    assert not (tmp_path / "b").exists()  # no half-written model directory
    resumed = _run(digits, tmp_path / "b", resume=True)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [h["val_top1"] for h in straight.history] == [h["val_top1"] for h in resumed.history]
    assert (tmp_path / "b" / "presso.json").is_file() and not partial_dir(tmp_path / "b").exists()


def test_an_interrupted_run_is_never_overwritten_silently(digits, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(digits, tmp_path / "m", interrupt_at=(1, 3))
    with pytest.raises(ConfigError, match="--resume"):
        _run(digits, tmp_path / "m")
    with pytest.raises(ConfigError, match="other settings.*epochs"):
        _run(digits, tmp_path / "m", epochs=5, resume=True)


def test_resume_without_a_checkpoint_is_an_error(digits, tmp_path):
    with pytest.raises(ConfigError, match="Nothing to resume"):
        _run(digits, tmp_path / "none", resume=True)


def test_label_free_distillation_brings_a_pruned_student_closer_to_its_teacher(trained, digits):
    teacher = trained[0].model
    spec = presso.InputSpec.parse("1,3,12,12")
    student = presso.compress(teacher, spec, PruneConfig(ratio=0.5, round_to=None)).model
    unlabeled = copy.copy(digits)
    unlabeled.classes = None
    before = presso.train.evaluate(student, digits, teacher=teacher)
    result = presso.train(student, unlabeled, TrainConfig(epochs=2, lr=1e-3, **FAST), teacher=teacher)
    after = presso.train.evaluate(result.model, digits, teacher=teacher)
    assert "val_top1" not in result.history[0]  # no labels were used
    assert after.match_loss < 0.7 * before.match_loss
    assert after.agreement > before.agreement


def test_kd_with_labels_mixes_cross_entropy_and_soft_targets(trained, digits):
    teacher = trained[0].model
    spec = presso.InputSpec.parse("1,3,12,12")
    student = presso.compress(teacher, spec, PruneConfig(ratio=0.5, round_to=None)).model
    result = presso.train(student, digits, TrainConfig(epochs=2, lr=1e-3, **FAST), teacher=teacher)
    assert result.best["val_top1"] > 0.6
    assert result.history[-1]["agreement"] > 0.6


class _Seg(nn.Module):
    """A dense-prediction model with a dict output, like torchvision's segmentation models."""

    def __init__(self, width=8, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, classes, 1)
        self.aux = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        f = self.body(x)
        return {"out": self.head(f), "aux": self.aux(f)}


def test_label_free_matching_works_for_dict_outputs(digits):
    torch.manual_seed(0)
    teacher, student = _Seg(16), _Seg(4)
    unlabeled = copy.copy(digits)
    unlabeled.classes = None
    before = presso.train.evaluate(student, unlabeled, teacher=teacher).match_loss
    presso.train(student, unlabeled, TrainConfig(epochs=3, lr=1e-2, **FAST), teacher=teacher)
    after = presso.train.evaluate(student, unlabeled, teacher=teacher).match_loss
    assert after < 0.5 * before


def test_outputs_without_any_common_shape_cannot_be_matched():
    s = {"out": torch.randn(2, 3, 4, 4)}
    t = {"out": torch.randn(2, 5, 4, 4)}
    with pytest.raises(ConfigError, match="nothing to match"):
        match_loss(s, t, 4.0)
    assert [tuple(x.shape) for x in leaves(({"a": torch.ones(1)}, [torch.ones(2)]))] == [(1,), (2,)]


def test_feature_taps_pick_layers_with_equal_names_and_shapes():
    torch.manual_seed(0)
    teacher = presso.load_model("presso:resnet8", num_classes=10)
    student = copy.deepcopy(teacher)
    taps = FeatureTaps(student, teacher, torch.randn(2, 3, 12, 12), count=3)
    assert len(taps.names) == 3 and all(n in dict(student.named_modules()) for n in taps.names)
    student(torch.randn(2, 3, 12, 12))
    teacher(torch.randn(2, 3, 12, 12))
    assert taps.loss() is not None
    taps.remove()


def test_feature_matching_trains(trained, digits):
    teacher = trained[0].model
    student = copy.deepcopy(teacher)
    result = presso.train(student, digits, TrainConfig(epochs=1, feature_match=True, **FAST), teacher=teacher)
    assert result.best["val_top1"] > 0.5


def test_wrong_class_count_names_the_fix(digits):
    model = presso.load_model("presso:resnet8", num_classes=4)
    with pytest.raises(DataError, match="num_classes=10.*--new-head"):
        presso.train(model, digits, TrainConfig(epochs=1, **FAST))


def test_a_new_head_fits_the_data_and_is_rebuilt_from_the_card(digits, tmp_path):
    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=4, widths=[8, 8, 8])
    stem = model.stem[0].weight.detach().clone()
    result = presso.train(model, digits, TrainConfig(epochs=1, new_head=True, **FAST), output_dir=tmp_path / "m")
    assert result.model.fc.out_features == 10 and result.best["val_top1"] > 0.1
    assert result.model.presso_card.recipe == [{"type": "new_head", "layer": "fc", "classes": 10}]
    assert not torch.equal(result.model.stem[0].weight, stem)  # the whole model trained, not only the head
    again = presso.load_model(str(tmp_path / "m"))
    x = torch.randn(2, 3, 12, 12)
    assert again.fc.out_features == 10 and torch.equal(again(x), result.model(x))


def test_unlabeled_data_without_teacher_is_an_error(digits):
    unlabeled = copy.copy(digits)
    unlabeled.classes = None
    with pytest.raises(DataError, match="--teacher"):
        presso.train(presso.load_model("presso:resnet8"), unlabeled, TrainConfig(epochs=1, **FAST))


def test_wrong_input_channels_is_a_clear_error(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 10))
    with pytest.raises(DataError, match="does not accept the data's images"):
        presso.train(model, digits, TrainConfig(epochs=1, **FAST))


@pytest.mark.parametrize(
    "bad", [dict(epochs=0), dict(optimizer="adam"), dict(lr=-1.0), dict(warmup=1.5), dict(kd_alpha=2.0)]
)
def test_bad_settings_are_named(bad):
    with pytest.raises(ConfigError, match=f"TrainConfig: {next(iter(bad))} "):
        TrainConfig(**bad)


def test_sgd_recipe_also_learns(digits):
    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=10)
    result = presso.train(model, digits, TrainConfig(epochs=3, optimizer="sgd", lr=0.05, **FAST))
    assert result.best["val_top1"] > 0.5


def test_training_from_an_image_folder_decodes_files(tmp_path):
    from PIL import Image

    for k, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        for i in range(20):
            d = tmp_path / f"c{k}"
            d.mkdir(exist_ok=True)
            Image.new("RGB", (10, 10), (colour[0] - 5 * i, colour[1] + 5 * i, colour[2])).save(d / f"{i}.png")
    model = presso.load_model("presso:resnet8", num_classes=2, widths=[8, 8, 8])
    result = presso.train(model, tmp_path, TrainConfig(epochs=6, batch_size=8, workers=2, val_fraction=0.25))
    assert result.preprocess.size == (10, 10)
    assert result.best["val_top1"] >= 0.8  # colour separates the classes


class _FlattensConvOutput(nn.Module):
    """A user's LeNet-style model: ``.view()`` of a convolution's output, which NHWC strides do not allow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


@pytest.mark.parametrize("source", ["resnet8", "flattens"])
def test_training_runs_in_nhwc_where_the_model_takes_it_and_gives_it_back_in_nchw(digits, tmp_path, source):
    from presso.train.trainer import takes_channels_last

    model = presso.load_model("presso:resnet8", num_classes=10) if source == "resnet8" else _FlattensConvOutput()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    nhwc = source == "resnet8"
    x = torch.randn(2, 3, 12, 12)
    mode = model.training
    assert takes_channels_last(model, x) is nhwc and model.training == mode  # the probe leaves mode and layout alone
    assert conv.weight.is_contiguous()
    during = set()

    def progress(event):
        if event.stage == "train":
            during.add(conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous())

    result = presso.train(model, digits, TrainConfig(epochs=2, **FAST), output_dir=tmp_path / "m", progress=progress)
    assert during == {nhwc}
    assert result.best["val_top1"] > 0.5  # both learn (chance 0.1)
    assert all(p.is_contiguous() for p in model.parameters()) and all(b.is_contiguous() for b in model.buffers())
    if nhwc:  # saved and reloaded as any model: the same outputs
        reloaded = presso.load_model(tmp_path / "m")
        assert torch.equal(reloaded(x), result.model.eval()(x))
