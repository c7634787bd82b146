"""The task layer: resolution (given, card, data, model), the registry, and a user's own task end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import presso
from presso.errors import ConfigError, UntrustedFileError
from presso.models.card import ModelCard, set_card
from presso.tasks import get_task, infer_task

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "balanced_task.py"


def test_tasks_are_found_by_name_with_their_headline():
    assert get_task("classify").headline == "val_top1"
    assert get_task("detect").headline == "map50_95"
    with pytest.raises(ConfigError, match="Unknown task 'detekt'.*detect"):
        get_task("detekt")


def test_the_task_comes_from_the_card_then_the_data_then_the_model():
    model = presso.load_model("presso:resnet8", num_classes=10)
    assert infer_task(model).name == "classify"
    digits = presso.load_data("digits")
    assert infer_task(model, digits).classes == [str(i) for i in range(10)]
    set_card(model, ModelCard(source={"source": "x", "kwargs": {}}, task="detect"))
    with pytest.raises(ConfigError, match="task is 'detect' but the data 'digits' is classify data"):
        infer_task(model, digits)
    import torchvision

    det = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert infer_task(det).name == "detect"


def test_a_user_task_runs_only_with_trust_and_is_named_on_the_card(tmp_path):
    spec = f"{EXAMPLE}:Balanced"
    with pytest.raises(UntrustedFileError, match="balanced_task.py"):
        get_task(spec)
    with pytest.raises(ConfigError, match="not a subclass of presso.tasks.Task"):
        get_task(f"{EXAMPLE}:F", trust=True)
    model = presso.load_model("presso:resnet8", num_classes=10)
    torch.manual_seed(0)
    cfg = presso.TrainConfig(epochs=2, batch_size=64, task=spec)
    result = presso.train(model, "digits:size=16", cfg, output_dir=tmp_path / "out", trust=True)
    rows = result.history
    assert [r["epoch"] for r in rows] == [1, 2] and all(0.0 <= r["balanced_acc"] <= 1.0 for r in rows)
    assert result.best["balanced_acc"] == max(r["balanced_acc"] for r in rows) > 0.5  # 10 classes: chance is 0.1
    card = presso.load_model(tmp_path / "out").presso_card
    assert card.task == spec and card.figures["balanced_acc"] == result.best["balanced_acc"]
