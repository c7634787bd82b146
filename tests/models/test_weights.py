"""Weights for models built from code: --weights files, the local torchvision/timm caches (never a download), the
card's record of them, and new classifiers (--new-head)."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import presso
from presso.errors import ModelSourceError, UntrustedFileError
from presso.models import load_model_dir, save_model_dir
from presso.models.weights import find_classifier, fit_to_data, replace_head

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _random(source, **kwargs):
    torch.manual_seed(1)  # other weights than load_model's default draw
    return presso.load_model(source, **kwargs)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["torchvision", "timm", "user file"])
def test_weights_file_loads_exactly_and_is_recorded(tmp_path, user_file, kind):
    source, kwargs = {
        "torchvision": ("torchvision:resnet18", {"num_classes": 10}),
        "timm": ("timm:resnet10t", {"num_classes": 5}),
        "user file": (f"{user_file}:build", {"width": 4, "trust": True}),
    }[kind]
    saved = _random(source, **kwargs)
    f = tmp_path / ("w.safetensors" if kind == "timm" else "w.pt")
    if kind == "timm":
        save_file(saved.state_dict(), str(f))
    else:
        torch.save(saved.state_dict(), f)
    loaded = presso.load_model(source, weights=f, **kwargs)
    assert torch.equal(loaded(X), saved(X))
    record = loaded.presso_card.source["weights"]
    assert record == {"from": "file", "path": str(f.resolve()), "sha256": _sha(f)}
    assert "weights" not in loaded.presso_card.source["kwargs"]
    assert presso.load_model(source, **kwargs).presso_card.source["weights"] == (
        "as the factory builds them" if kind == "user file" else "random init"
    )


def test_the_record_survives_a_model_directory(tmp_path):
    saved = _random("torchvision:resnet18", num_classes=10)
    torch.save(saved.state_dict(), tmp_path / "w.pt")
    loaded = presso.load_model("torchvision:resnet18", weights=tmp_path / "w.pt", num_classes=10)
    save_model_dir(loaded, tmp_path / "m")
    (tmp_path / "w.pt").unlink()  # the directory holds the weights: the file is not read again
    again = load_model_dir(tmp_path / "m")
    assert again.presso_card.source["weights"] == loaded.presso_card.source["weights"]
    assert torch.equal(again(X), saved(X))


def test_a_full_pickle_needs_trust(tmp_path):
    model = _random("presso:resnet8", num_classes=3)
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(UntrustedFileError, match="full pickle: loading it runs code.*--trust"):
        presso.load_model("presso:resnet8", num_classes=3, weights=tmp_path / "full.pt")
    loaded = presso.load_model("presso:resnet8", num_classes=3, weights=tmp_path / "full.pt", trust=True)
    assert torch.equal(loaded(X), model(X))


def test_mismatches_are_one_line_and_a_new_head_loads_the_rest(tmp_path):
    saved = _random("torchvision:resnet18", num_classes=10)
    torch.save(saved.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelSourceError, match=r"except its classifier 'fc' \(10 outputs .* 1000 .*--new-head") as e:
        presso.load_model("torchvision:resnet18", weights=tmp_path / "w.pt")
    assert "\n" not in str(e.value)
    fresh = presso.load_model("torchvision:resnet18", weights=tmp_path / "w.pt", new_head=True)
    assert fresh.fc.out_features == 1000 and torch.equal(fresh.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)
    with pytest.raises(ModelSourceError, match=r"do not fit the model: missing layer1\.2\..*\(\+\d+ more\)") as e:
        presso.load_model("torchvision:resnet34", weights=tmp_path / "w.pt", new_head=True)
    assert "\n" not in str(e.value)
    save_model_dir(fresh, tmp_path / "m")
    with pytest.raises(ModelSourceError, match="carries its own weights"):
        presso.load_model(str(tmp_path / "m"), weights=tmp_path / "w.pt")
    with pytest.raises(ModelSourceError, match="does not exist"):
        presso.load_model("presso:resnet8", weights=tmp_path / "missing.safetensors")


def _no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_without_a_cached_file_names_the_file(tmp_path, monkeypatch):
    hub = _no_cache(tmp_path, monkeypatch)
    for kwargs in ({"weights": "DEFAULT"}, {"pretrained": True}, {"weights": "ResNet18_Weights.IMAGENET1K_V1"}):
        with pytest.raises(ModelSourceError, match="not in the local cache: looked for .*--weights PATH") as e:
            presso.load_model("torchvision:resnet18", **kwargs)
        assert str(hub / "resnet18-f37072fd.pth") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelSourceError, match="no weights 'IMAGENET9K'"):
        presso.load_model("torchvision:resnet18", weights="IMAGENET9K")
    with pytest.raises(ModelSourceError, match="not in the local cache") as e:
        presso.load_model("timm:resnet10t", pretrained="true")
    message = str(e.value)
    assert "models--timm--resnet10t.c3_in1k" in message and str(hub / "resnet10t_176_c3-f3215ab1.pth") in message
    with pytest.raises(ModelSourceError, match="no published pretrained weights"):
        presso.load_model("presso:resnet8", pretrained=True)


def test_pretrained_from_the_local_caches(tmp_path, monkeypatch):
    hub = _no_cache(tmp_path, monkeypatch)
    hub.mkdir(parents=True)
    tv = _random("torchvision:resnet18")  # saved under the name torch.hub keeps the published file in
    torch.save(tv.state_dict(), hub / "resnet18-f37072fd.pth")
    with pytest.warns(UserWarning, match="does not match the hash in its name"):  # it is not the published file
        loaded = presso.load_model("torchvision:resnet18", weights="DEFAULT")
    assert torch.equal(loaded(X), tv(X))
    record = loaded.presso_card.source["weights"]
    assert record["from"] == "torchvision cache (ResNet18_Weights.IMAGENET1K_V1)"
    assert (
        record["path"] == str((hub / "resnet18-f37072fd.pth").resolve()) and loaded.presso_card.source["kwargs"] == {}
    )
    with pytest.warns(UserWarning):  # pretrained=true means the default weights; another class count a new head
        ten = presso.load_model("torchvision:resnet18", pretrained=True, num_classes=10, new_head=True)
    assert ten.fc.out_features == 10 and torch.equal(ten.conv1.weight, tv.conv1.weight)

    snapshot = tmp_path / "hf" / "hub" / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    tm = _random("timm:resnet10t")
    save_file(tm.state_dict(), str(snapshot / "model.safetensors"))
    loaded = presso.load_model("timm:resnet10t", pretrained=True)
    assert torch.equal(loaded(X), tm(X))
    assert loaded.presso_card.source["weights"]["from"] == "timm cache"
    assert loaded.presso_card.source["weights"]["sha256"] == _sha(snapshot / "model.safetensors")
    assert "pretrained" not in loaded.presso_card.source["kwargs"]
    assert presso.load_model("timm:resnet10t", pretrained=True, num_classes=4).fc.out_features == 4  # timm's new head
    save_model_dir(loaded, tmp_path / "m")
    (snapshot / "model.safetensors").unlink()  # rebuilding a saved model never looks in the cache
    assert torch.equal(load_model_dir(tmp_path / "m")(X), tm(X))


def test_card_kwargs_cannot_name_weights(tmp_path):
    model = _random("presso:resnet8")
    save_model_dir(model, tmp_path / "m")
    card = (tmp_path / "m" / "presso.json").read_text()
    (tmp_path / "m" / "presso.json").write_text(card.replace('"kwargs": {}', '"kwargs": {"weights": "/etc/passwd"}'))
    with pytest.raises(ModelSourceError, match="'weights' .* is reserved"):
        presso.load_model(str(tmp_path / "m"))


def test_classifier_found_generically_and_replaced_in_the_recipe(tmp_path):
    model = _random("torchvision:mobilenet_v3_small", num_classes=6)
    assert find_classifier(model)[0] == "classifier.3"
    replace_head(model, 4)
    assert model(X).shape == (2, 4) and model.presso_card.recipe[-1] == {
        "type": "new_head", "layer": "classifier.3", "classes": 4}  # fmt: skip
    save_model_dir(model, tmp_path / "m")
    assert torch.equal(load_model_dir(tmp_path / "m")(X), model(X))
    two_heads = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 5))
    with pytest.raises(ModelSourceError, match="Cannot tell which layer is the classifier .*0, 2"):
        find_classifier(two_heads)


def test_zoo_models_built_from_random_init_fit_the_data():
    assert fit_to_data("torchvision:resnet18", {}, classes=10, channels=3) == ({"num_classes": 10}, {"num_classes": 10})
    assert fit_to_data("timm:resnet10t", {}, classes=10, channels=1)[1] == {"num_classes": 10, "in_chans": 1}
    assert fit_to_data("presso:resnet8", {"num_classes": 3}, classes=10, channels=3)[1] == {}  # the user's choice
    assert fit_to_data("torchvision:resnet18", {}, classes=10, channels=3, weights="w.pt")[1] == {}
    assert fit_to_data("timm:resnet10t", {"pretrained": True}, classes=10, channels=3)[1] == {}
    assert fit_to_data("some/dir", {}, classes=10, channels=3)[1] == {}
