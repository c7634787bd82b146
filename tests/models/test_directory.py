"""The Presso model directory: exact round trips without pickle, atomic writes, damaged files."""

import json

import pytest
import torch

import presso
from presso.errors import ModelSourceError
from presso.testing import TinyCNN


def test_round_trip_of_a_pruned_user_model_gives_identical_outputs(tmp_path, user_file):
    f = user_file
    model = presso.load_model(f"{f}:build", trust=True, width=16)
    r = presso.compress(model, "1,3,16,16", presso.PruneConfig(ratio=0.5, round_to=None))
    out = presso.save_model_dir(r.model, tmp_path / "pruned", input_spec="1,3,16,16")
    assert sorted(p.name for p in out.iterdir()) == ["code", "presso.json", "weights.safetensors"]
    card = json.loads((out / "presso.json").read_text())
    assert card["format"] == "presso-model" and card["input_spec"] == "1,3,16,16"
    assert card["recipe"][0]["type"] == "prune"
    f.unlink()  # the user's file is gone: the copy kept in the directory rebuilds the model
    with pytest.raises(presso.UntrustedFileError, match="runs Python code.*code/my_models.py"):
        presso.load_model(str(out))  # the directory's code runs only when the user says so
    loaded = presso.load_model(str(out), trust=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), r.model.eval()(x))
    # and a second generation (compress the loaded model again) keeps both recipe steps
    r2 = presso.compress(loaded, "1,3,16,16", presso.PruneConfig(ratio=0.5, round_to=None))
    presso.save_model_dir(r2.model, tmp_path / "pruned2")
    again = presso.load_model(str(tmp_path / "pruned2"), trust=True)
    assert len(again.presso_card.recipe) == 2
    assert torch.equal(again(x), r2.model.eval()(x))


def test_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
    model = presso.load_model("torchvision:resnet18", num_classes=4)
    presso.save_model_dir(model, tmp_path / "m")
    before = (tmp_path / "m" / "weights.safetensors").read_bytes()

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError):
        presso.save_model_dir(model, tmp_path / "m", overwrite=True)  # a finished model is replaced only if asked
    assert (tmp_path / "m" / "weights.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no half-written temporary left behind
    assert presso.load_model(str(tmp_path / "m")).fc.out_features == 4


def test_damaged_directories_give_clear_errors(tmp_path):
    # a class importable by its module path rebuilds by name
    presso.save_model_dir(TinyCNN(), tmp_path / "m", input_spec="1,3,8,8")
    assert isinstance(presso.load_model(str(tmp_path / "m")), TinyCNN)

    class Local(TinyCNN):  # defined in a function: not importable, so the user must say how to build it
        pass

    presso.save_model_dir(Local(), tmp_path / "local", input_spec="1,3,8,8")
    with pytest.raises(ModelSourceError, match="cannot be rebuilt"):
        presso.load_model(str(tmp_path / "local"))
    assert isinstance(presso.load_model_dir(tmp_path / "local", build=Local), Local)
    (tmp_path / "m" / "presso.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="presso.json' is not valid JSON"):
        presso.load_model(str(tmp_path / "m"))
    (tmp_path / "m" / "presso.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelSourceError, match="not a Presso model card"):
        presso.load_model(str(tmp_path / "m"))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    presso.save_model_dir(presso.load_model("torchvision:resnet18", num_classes=4), tmp_path / "m")
    card = json.loads((tmp_path / "m" / "presso.json").read_text())
    card["source"]["kwargs"]["num_classes"] = 5
    (tmp_path / "m" / "presso.json").write_text(json.dumps(card))
    with pytest.raises(ModelSourceError, match="do not fit"):
        presso.load_model(str(tmp_path / "m"))


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "thesis.tex").write_text("precious")
    with pytest.raises(presso.OutputError, match="holds thesis.tex; choose another output"):
        presso.save_model_dir(TinyCNN(), tmp_path / "x")
    assert (tmp_path / "x" / "thesis.tex").read_text() == "precious"
