"""The trust model (docs/security.md): without --trust nothing a file says can run code.

Every hostile file here would create a marker file if its code ran. Each test asserts the marker is *not* created
and that the user gets one clear line naming what would run and how to allow it.
"""

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import presso
from presso.errors import ModelSourceError, PressoError, UntrustedFileError

runner = CliRunner()


def _evil_code(marker: Path) -> str:
    return (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "import torch\n"
        "def build(**kw):\n"
        "    return torch.nn.Linear(2, 2)\n"
    )


def _model_dir(tmp_path: Path, source: dict, code: str | None = None, code_at: str = "code/evil.py") -> Path:
    """A model directory whose card says `source`; weights of a Linear(2, 2)."""
    from safetensors.torch import save_model

    d = tmp_path / "downloaded-model"
    d.mkdir()
    if code is not None:
        (d / code_at).parent.mkdir(parents=True, exist_ok=True)
        (d / code_at).write_text(code)
    save_model(torch.nn.Linear(2, 2), str(d / "weights.safetensors"))
    card = {"format": "presso-model", "version": 1, "source": source, "input_spec": "1,2"}
    (d / "presso.json").write_text(json.dumps(card))
    return d


def _cli(*args: str):
    from presso.cli import app

    return runner.invoke(app, list(args))


# --------------------------------------------------------------------------- 1. a model directory's Python source
@pytest.mark.parametrize("where", ["inside", "parent", "absolute", "bare"])
def test_model_dir_code_never_runs_without_trust(tmp_path, where):
    marker = tmp_path / "MARKER"
    if where == "inside":
        d = _model_dir(tmp_path, {"source": "evil.py:build", "code": "code/evil.py", "kwargs": {}}, _evil_code(marker))
    else:
        outside = tmp_path / "outside.py"
        outside.write_text(_evil_code(marker))
        source = {
            "parent": {"source": "evil.py:build", "code": "../outside.py", "kwargs": {}},
            "absolute": {"source": "evil.py:build", "code": str(outside), "kwargs": {}},
            "bare": {"source": f"{outside}:build", "kwargs": {}},
        }[where]
        d = _model_dir(tmp_path, source)
    with pytest.raises(PressoError) as e:
        presso.load_model(str(d))
    assert not marker.exists()
    if where in ("inside", "bare"):
        assert isinstance(e.value, UntrustedFileError)
        assert "runs Python code" in str(e.value) and "build" in str(e.value) and "--trust" in str(e.value)
    else:  # saved code must stay inside its directory, trusted or not
        assert "inside the directory" in str(e.value) or "outside the model directory" in str(e.value)
        with pytest.raises(ModelSourceError):
            presso.load_model(str(d), trust=True)
        assert not marker.exists()


def test_model_dir_code_through_every_verb(tmp_path):
    marker = tmp_path / "MARKER"
    d = _model_dir(tmp_path, {"source": "evil.py:build", "code": "code/evil.py", "kwargs": {}}, _evil_code(marker))
    for args in (
        ["info", str(d)],
        ["eval", str(d), "--data", "digits"],
        ["convert", str(d), "-o", str(tmp_path / "conv")],
        ["run", "--data", "digits", "--model", str(d), "--target-macs", "0.5", "-o", str(tmp_path / "run")],
    ):
        r = _cli(*args)
        assert r.exit_code != 0, args
        assert not marker.exists(), args
        assert "Traceback" not in r.output and "--trust" in r.output, (args, r.output)
    # the user who trusts it says so on the command line, and then it runs
    assert _cli("info", str(d), "--trust").exit_code == 0
    assert marker.exists()


def test_user_file_source_needs_trust(tmp_path):
    marker = tmp_path / "MARKER"
    f = tmp_path / "mine.py"
    f.write_text(_evil_code(marker))
    with pytest.raises(UntrustedFileError, match=r"runs the Python file .*mine\.py.*'build'.*--trust"):
        presso.load_model(f"{f}:build")
    assert not marker.exists()
    assert isinstance(presso.load_model(f"{f}:build", trust=True), torch.nn.Linear)
    assert marker.exists()


# --------------------------------------------------------------------------- 2. python: sources
def test_python_source_cannot_run_a_command(tmp_path):
    marker = tmp_path / "MARKER"
    source = {"source": "python:subprocess.Popen", "kwargs": {"args": ["touch", str(marker)]}}
    d = _model_dir(tmp_path, source)
    with pytest.raises(UntrustedFileError, match="imports the Python module 'subprocess'"):
        presso.load_model(str(d))
    with pytest.raises(ModelSourceError, match="not a torch.nn.Module class"):
        presso.load_model(str(d), trust=True)  # even trusted: a python: source names a module class, nothing else
    assert not marker.exists()


def test_python_source_of_presso_and_torch_classes_needs_no_trust(tmp_path):
    from presso.testing import TinyCNN

    presso.save_model_dir(TinyCNN(), tmp_path / "m", input_spec="1,3,8,8")
    assert json.loads((tmp_path / "m" / "presso.json").read_text())["source"]["source"].startswith("python:presso.")
    assert isinstance(presso.load_model(str(tmp_path / "m")), TinyCNN)


# --------------------------------------------------------------------------- 3. card kwargs cannot switch trust on
class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("key", ["trust", "build", "source", "__class__"])
def test_card_kwargs_cannot_carry_reserved_names(tmp_path, key):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Marker(marker)))
    d = _model_dir(tmp_path, {"source": str(evil), "kwargs": {key: True}})
    with pytest.raises(ModelSourceError, match=f"{key!r}|'{key}'"):
        presso.load_model(str(d))
    assert not marker.exists()
    from presso.models.sources import check_kwargs

    with pytest.raises(ModelSourceError):  # --model-arg trust=true on the command line is refused the same way
        check_kwargs({key: True}, "torchvision:resnet18")


def test_a_card_naming_a_pickle_still_needs_the_users_trust(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Marker(marker)))
    d = _model_dir(tmp_path, {"source": str(evil), "kwargs": {}})
    with pytest.raises(UntrustedFileError, match="full pickle"):
        presso.load_model(str(d))
    assert not marker.exists()


# --------------------------------------------------------------------------- 4. .pt2 archives
def _pt2(tmp_path: Path) -> Path:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    path = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(model.eval(), (torch.randn(1, 3, 8, 8),)), path)
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def test_pt2_with_pickled_sample_inputs_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save(_Marker(marker), buf)  # a torch zip pickle that weights_only refuses; torch retries it unsafely
    evil = _rewrite(_pt2(tmp_path), tmp_path / "evil.pt2",
                    lambda n, b: buf.getvalue() if n.endswith("sample_inputs/model.pt") else b)  # fmt: skip
    assert not marker.exists()
    with pytest.raises(UntrustedFileError, match="sample inputs.*--trust"):
        presso.load_model(str(evil))
    r = _cli("info", str(evil))
    assert r.exit_code != 0 and "--trust" in r.output and "Traceback" not in r.output
    assert not marker.exists()


def test_pt2_with_pickled_weights_or_legacy_members_is_refused(tmp_path):
    def pickled_weight(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    clean = _pt2(tmp_path)
    for bad, why in (
        (_rewrite(clean, tmp_path / "w.pt2", pickled_weight), "pickled tensor"),
        (_rewrite(clean, tmp_path / "l.pt2", lambda n, b: None if n.endswith("archive_format") else b), "legacy"),
        (_rewrite(clean, tmp_path / "x.pt2", lambda n, b: b), None),  # an unchanged copy loads
    ):
        if why is None:
            assert isinstance(presso.load_model(str(bad)), torch.nn.Module)
        else:
            with pytest.raises(UntrustedFileError, match=why):
                presso.load_model(str(bad))
    not_zip = tmp_path / "n.pt2"
    not_zip.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="not a torch.export"):
        presso.load_model(str(not_zip))


# --------------------------------------------------------------------------- malformed cards and recipes: one line
@pytest.mark.parametrize(
    "card,words",
    [
        ({"version": "abc"}, "invalid card version"),
        ({"source": {"source": "torchvision:resnet18", "kwargs": [1, 2]}}, "name: value pairs"),
        ({"source": {"source": "torchvision:resnet18", "kwargs": {"num_classes": -3}}}, "Could not build"),
        ({"source": {"source": "torchvision:resnet18", "kwargs": {"num_classes": 10**12}}}, "out of range"),
        ({"input_spec": "1," * 40 + "1"}, "Malformed|dimensions"),
        ({"recipe": [{"type": "prune"}]}, "recipe step 1"),
        ({"recipe": [{"type": "prune", "ops": [{"op": "prune", "target": "fc.__class__"}]}]}, "not a layer name"),
        (
            {
                "recipe": [
                    {"type": "prune", "ops": [{"op": "setattr", "target": "fc", "attr": "__class__", "value": 1}]}
                ]
            },
            "public attribute",
        ),  # fmt: skip
        (
            {
                "recipe": [
                    {
                        "type": "prune",
                        "ops": [
                            {
                                "op": "prune",
                                "target": "fc",
                                "kind": "module",
                                "pruner": "LinearPruner",
                                "fn": "__init__",
                                "dim": 0,
                                "idxs": [0],
                            }
                        ],
                    }
                ]
            },
            "not a pruning function",
        ),  # fmt: skip
        ({"recipe": [{"type": "decompose", "layers": {"fc": {"method": "svd", "ranks": [10**9]}}}]}, "ranks"),
        ({"recipe": "x"}, "must be a JSON list"),
        ({"labels": [1, 2]}, "list of strings"),
        ({"source": {"source": "evil.py:build", "code": "code/\u0000.py", "kwargs": {}}}, "not a usable path"),
    ],
)
def test_malformed_cards_give_one_clear_line(tmp_path, card, words):
    presso.save_model_dir(
        presso.load_model("torchvision:resnet18", num_classes=4), tmp_path / "m", input_spec="1,3,32,32"
    )
    path = tmp_path / "m" / "presso.json"
    data = json.loads(path.read_text())
    data.update(card)
    path.write_text(json.dumps(data))
    with pytest.raises(PressoError, match=words):
        from presso.models.spec import input_spec_for

        input_spec_for(presso.load_model(str(tmp_path / "m")))


def test_hostile_card_files(tmp_path):
    presso.save_model_dir(torch.nn.Linear(2, 2), tmp_path / "m", input_spec="1,2")
    card = tmp_path / "m" / "presso.json"
    for content, words in (
        ("[" * 100_000 + "]" * 100_000, "nests 100000 levels"),
        (json.dumps({"format": "presso-model", "version": 1, "source": {"source": str(tmp_path / "m")}}), "another"),
    ):
        card.write_text(content)
        with pytest.raises(ModelSourceError, match=words):
            presso.load_model(str(tmp_path / "m"))
    card.unlink()
    card.symlink_to("/dev/zero")
    with pytest.raises(ModelSourceError, match="not a regular file"):
        presso.load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_card_kwargs_cannot_make_timm_read_a_file(tmp_path, key):
    """A card (or --model-arg) naming a file for timm to read itself: one line pointing to --weights, nothing read."""
    outside = tmp_path / "outside.safetensors"  # would be read as the weights while the card says "random init"
    value = str(outside) if key == "checkpoint_path" else {"file": str(outside)}
    d = _model_dir(tmp_path, {"source": "timm:resnet18", "kwargs": {key: value}})
    with pytest.raises(ModelSourceError, match=f"'{key}' would have timm read files itself.*--weights PATH"):
        presso.load_model(str(d))
    r = _cli("info", str(d))
    assert r.exit_code == 2 and "internal error" not in r.output and "--weights PATH" in r.output
