"""Model sources and input specs: what loads, and the clear errors for what does not."""

import pickle

import pytest
import torch

import presso
from presso.errors import InputSpecError, ModelSourceError, UntrustedFileError
from presso.models import InputSpec


def test_torchvision_and_timm_sources_with_kwargs():
    m = presso.load_model("torchvision:resnet18", num_classes=7)
    assert m.fc.out_features == 7
    source = {"source": "torchvision:resnet18", "kwargs": {"num_classes": 7}, "weights": "random init"}
    assert m.presso_card.source == source
    t = presso.load_model("timm:resnet10t", num_classes=5)
    assert t(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize(
    "source,hint",
    [("torchvision:resnet1", "resnet18"), ("timm:mobilenetv3_smal_100", "mobilenetv3_small_100")],
)
def test_unknown_names_suggest_the_closest(source, hint):
    with pytest.raises(ModelSourceError, match=f"Did you mean: .*{hint}"):
        presso.load_model(source)


def test_user_file_factory(user_file):
    with pytest.raises(UntrustedFileError, match="runs the Python file .*my_models.py.*--trust"):
        presso.load_model(f"{user_file}:build", width=4)
    m = presso.load_model(f"{user_file}:build", trust=True, width=4)
    assert m.conv.out_channels == 4
    with pytest.raises(ModelSourceError, match="no callable 'biuld'.*build"):
        presso.load_model(f"{user_file}:biuld", trust=True)
    with pytest.raises(ModelSourceError, match="not a torch.nn.Module"):
        presso.load_model(f"{user_file}:not_a_model", trust=True)
    with pytest.raises(ModelSourceError, match="does not exist"):
        presso.load_model("missing.py:build", trust=True)


def test_a_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelSourceError, match="not a model file"):
        presso.load_model(str(f))
    with pytest.raises(ModelSourceError, match="Unknown model source"):
        presso.load_model("resnet18")


def test_state_dict_is_not_a_model(tmp_path):
    f = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), f)
    with pytest.raises(ModelSourceError, match="only weights"):
        presso.load_model(str(f))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_needs_trust(tmp_path, user_file):
    f = tmp_path / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), f)
    with pytest.raises(UntrustedFileError, match="--trust"):
        presso.load_model(str(f))
    m = presso.load_model(str(f), trust=True)
    assert isinstance(m, torch.nn.Sequential)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UntrustedFileError):
        presso.load_model(str(evil))


def test_pt2_source(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    loaded = presso.load_model(str(tmp_path / "m.pt2"))
    assert torch.allclose(loaded(x), model(x))


@pytest.mark.parametrize(
    "text,shapes",
    [
        ("1,3,224,224", [(1, 3, 224, 224)]),
        ("1x3x32x32", [(1, 3, 32, 32)]),
        ("1,3,32,32; 1,16:int64", [(1, 3, 32, 32), (1, 16)]),
    ],
)
def test_input_spec_parsing(text, shapes):
    spec = InputSpec.parse(text)
    assert [t.shape for t in spec.tensors] == shapes
    xs = spec.example_inputs()
    assert [tuple(x.shape) for x in xs] == shapes
    assert InputSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "1,3,,224", "a,b", "1,3,-2", "1,0,3", "1,3:complex"])
def test_malformed_input_specs(bad):
    with pytest.raises(InputSpecError):
        InputSpec.parse(bad)
