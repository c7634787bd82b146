"""Outputs never destroy user data (issue 18 item 3, issue 19 item 2): one rule for every verb that writes.

A non-empty output (a finished model too) is refused unless --overwrite; the model being read is never replaced;
writes go to a temporary sibling renamed into place; --overwrite keeps the old copy until the new one is in place;
a crash, a full disk or a kill -9 leaves the old output or the new one, never half of one, and the next run cleans
what a killed one left. The kill tests are in ``_kills.py``, shared with the fuzz benchmark.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import presso
from presso import outdir
from presso.convert import ConvertConfig
from presso.errors import OutputError
from presso.search.nas import SearchConfig
from presso.train import TrainConfig, partial_dir

from . import _kills

SHAPE = _kills.SHAPE
FAST = dict(epochs=1, batch_size=64, workers=0, augment=False)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A trained tiny model directory and its conversion (with preprocessing: a bundle needs it)."""
    return _kills.prepare_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def digits():
    from presso.data import load_data

    bundle = load_data(_kills.DATA)
    return dataclasses.replace(bundle, train=bundle.train.subset(np.arange(128)), val=bundle.val.subset(np.arange(64)))


def _tiny():
    return presso.load_model("presso:resnet8", num_classes=10)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _user_folder(path: Path, model: bool = True) -> dict[str, str]:
    """A folder holding a finished model (unless `model` is False) plus the user's notes.txt and images/."""
    if model:
        presso.save_model_dir(_tiny(), path, input_spec=SHAPE)
    (path / "images").mkdir(parents=True)
    (path / "notes.txt").write_text("three weeks of notes\n")
    (path / "images" / "cat.png").write_bytes(os.urandom(512))
    return _snapshot(path)


def _siblings(parent: Path) -> list[str]:
    return _kills.leftovers(parent)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- a user's folder as -o
def _write(verb: str, out: Path, inputs, digits, **kw):
    if verb == "compress":
        return presso.compress(_tiny(), SHAPE, presso.PruneConfig(ratio=0.5), output_dir=out, **kw)
    if verb == "train":
        return presso.train(_tiny(), digits, TrainConfig(**FAST), output_dir=out, **kw)
    if verb == "convert":
        return presso.convert(presso.load_model(str(inputs["model"])), SHAPE, ConvertConfig(eval_samples=0),
                              output_dir=out, **kw)  # fmt: skip
    if verb == "package":
        return presso.package(inputs["converted"], out.parent, name=out.name, **kw)
    if verb == "search":
        return _search(out, **kw)
    raise ValueError(verb)


def _search(out: Path, trials: int = 1, final: bool = True, **kw):
    cfg = SearchConfig(latency_ms=1.0, trials=trials, proxy_epochs=1, final_epochs=1, threads=1,
                       final=final)  # as the CLI's below  # fmt: skip
    return presso.search(_kills.DATA, cfg, output_dir=out, **kw)


@pytest.fixture
def cheap_search(monkeypatch):
    """A search without the device: every candidate predicted and measured at 0.01 ms (what is tested here is where
    it writes, not what it finds)."""
    from presso.search import nas

    monkeypatch.setattr(nas._Search, "ensure_profiled", lambda self: None)
    monkeypatch.setattr(nas._Search, "predict_ms", lambda self, arch: 0.01)
    monkeypatch.setattr(nas._Search, "measure_ms", lambda self, arch, model=None: 0.01)


class _Reached(Exception):
    """Raised where a run would start its first stage: the output check let it through."""


@pytest.fixture
def no_stages(monkeypatch):
    from presso import pipeline

    def reached(self):
        raise _Reached(str(self.out))

    monkeypatch.setattr(pipeline._Job, "original", reached)


@pytest.mark.parametrize("verb", ["compress", "train", "convert", "package", "run", "search"])
def test_a_users_folder_given_as_output_survives(verb, tmp_path, inputs, digits, no_stages):
    user = tmp_path / "mine"
    if verb == "package":  # the bundle's folder holds the user's files and an unrelated zip of the same name
        before = _user_folder(user, model=False)
        (user / "bundle.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an (empty) zip that is not a bundle
        before = _snapshot(user)
        with pytest.raises(OutputError, match="bundle.zip' already exists") as e:
            _write(verb, user / "bundle.zip", inputs, digits)
    else:
        before = _user_folder(user)
        with pytest.raises(OutputError, match=r"'.*mine' already exists and holds images/, notes.txt and 2 more") as e:
            if verb == "run":
                presso.run(_kills.DATA, presso.RunConfig(model="presso:resnet8", target_macs=0.5), output_dir=user)
            else:
                _write(verb, user, inputs, digits)
        assert not partial_dir(user).exists()
    assert "--overwrite" in _one_line(e) and "another output (-o)" in str(e.value)
    assert _snapshot(user) == before and _siblings(tmp_path) == [] and _siblings(user) == []


@pytest.mark.parametrize("verb", ["compress", "train", "convert", "package", "search"])
def test_overwrite_replaces_and_leaves_no_backup(verb, tmp_path, inputs, digits, cheap_search):
    user = tmp_path / "mine"
    _user_folder(user)
    out = user / "bundle.zip" if verb == "package" else user
    if verb == "package":
        out.write_bytes(b"not a bundle")
    _write(verb, out, inputs, digits, overwrite=True)
    assert _siblings(tmp_path) == [] and _siblings(user) == []
    if verb == "package":
        assert _kills.output_state(verb, out) == "complete" and (user / "notes.txt").is_file()
        return
    names = sorted(p.name for p in out.iterdir())
    assert "notes.txt" not in names and "images" not in names  # replaced, as asked
    if verb == "search":  # the search ran in a temporary sibling: what it says and wrote name the output itself
        written = json.loads((out / "search.json").read_text())
        assert {"study.db", "search.json", "trials.csv", "pareto.png", "model"} <= set(names), names
        assert written["best"]["model_dir"] == str(out / "model") and str(out / "study.db") in written["storage"]
        out = out / "model"
    assert _kills.output_state(verb, out) == "complete" and not partial_dir(out).exists()


def test_the_model_being_read_is_never_the_output_even_with_overwrite(tmp_path):
    from typer.testing import CliRunner

    from presso.cli import app

    runner = CliRunner()
    src = tmp_path / "m"
    presso.save_model_dir(_tiny(), src, input_spec=SHAPE)
    before = _snapshot(src)
    for extra in ([], ["--overwrite"]):
        for target in (src, tmp_path):  # the model's folder, and a folder holding it
            res = runner.invoke(app, ["compress", str(src), "-r", "0.5", "-o", str(target), *extra])
            assert res.exit_code == 2, res.output
            errors = [line for line in res.output.splitlines() if line.strip()]
            assert len(errors) == 1 and "would replace the model being read" in errors[0], res.output
            assert _snapshot(src) == before
    loaded = presso.load_model(str(src))  # the library checks too: the card says where the model was loaded from
    with pytest.raises(OutputError, match="model being read"):
        presso.compress(loaded, SHAPE, presso.PruneConfig(ratio=0.5), output_dir=src, overwrite=True)
    with pytest.raises(OutputError, match="model being read"):
        presso.convert(loaded, SHAPE, ConvertConfig(eval_samples=0), output_dir=src, overwrite=True)
    assert _snapshot(src) == before and _siblings(tmp_path) == []


# ----------------------------------------------------------------------------- crashes, full disks, kills
def test_a_crash_while_writing_keeps_the_old_output(tmp_path, monkeypatch, inputs, digits):
    import safetensors.torch

    from presso.convert import launcher

    out = tmp_path / "out"
    presso.save_model_dir(_tiny(), out, input_spec=SHAPE)
    before = _snapshot(out)

    def crash(*a, **k):
        raise RuntimeError("crash")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_model", crash)
        for verb in ("compress", "train"):
            with pytest.raises(RuntimeError, match="crash"):
                _write(verb, out, inputs, digits, overwrite=True)
            assert _snapshot(out) == before and _siblings(tmp_path) == []
        assert (partial_dir(out) / "last.pt").is_file()  # the training itself is kept, to --resume
    # convert: the model is written, the card is not (where a kill used to leave a half directory)
    with monkeypatch.context() as m:
        m.setattr(launcher, "_write_card", crash)
        with pytest.raises(RuntimeError, match="crash"):
            _write("convert", tmp_path / "new", inputs, digits)
        assert not (tmp_path / "new").exists()
        with pytest.raises(RuntimeError, match="crash"):
            _write("convert", out, inputs, digits, overwrite=True)
        assert _snapshot(out) == before and _siblings(tmp_path) == []
    # --overwrite: the second of the two renames fails; the old output is put back
    real = os.rename

    def second_fails(a, b):
        if outdir.is_presso_sibling(Path(a).name) and "-tmp-" in str(a):
            raise OSError(errno.EIO, "Input/output error")
        return real(a, b)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", second_fails)
        with pytest.raises(OSError, match="Input/output"):
            _write("compress", out, inputs, digits, overwrite=True)
    assert _snapshot(out) == before and _siblings(tmp_path) == []


def test_a_full_disk_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch, inputs, digits):
    import safetensors.torch

    dist = tmp_path / "dist"
    old = presso.package(inputs["converted"], dist, name="b.zip").path
    model = tmp_path / "m"
    presso.save_model_dir(_tiny(), model, input_spec=SHAPE)
    before = _snapshot(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    with pytest.raises(OutputError, match="No space left on device.*Nothing was replaced") as e:
        presso.package(inputs["converted"], dist, name="b.zip")
    assert str(old) in _one_line(e)
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(OutputError, match="No space left on device") as e:
        _write("compress", model, inputs, digits, overwrite=True)
    _one_line(e)
    assert _snapshot(tmp_path) == before and _siblings(dist) == [] and _siblings(tmp_path) == []


def test_the_next_run_cleans_what_a_killed_one_left(tmp_path, inputs, digits):
    dead = _dead_pid()
    out = tmp_path / "out"
    stale = [tmp_path / f".out.presso-tmp-{dead}-a1b2c3", tmp_path / f".out.presso-tmp-{dead}-d4e5f6"]
    stale[0].mkdir()
    (stale[0] / "weights.safetensors").write_bytes(b"half")
    stale[1].write_bytes(b"half a zip")
    kept = [tmp_path / ".out.presso-tmp-1-a1b2c3",  # a live process's (pid 1)
            tmp_path / f".other.presso-tmp-{dead}-a1b2c3",  # another output's
            tmp_path / ".out.presso-tmp-notes"]  # fmt: skip  # the user's own, named alike
    for p in kept:
        p.write_text("not mine to delete")
    _write("compress", out, inputs, digits)
    assert not any(p.exists() for p in stale) and all(p.read_text() == "not mine to delete" for p in kept)
    # killed between its two renames: the old copy is whole, the output missing -- it is put back, not deleted
    back = tmp_path / f".again.presso-old-{dead}-a1b2c3"
    presso.save_model_dir(_tiny(), back, input_spec=SHAPE)
    before = _snapshot(back)
    with pytest.raises(OutputError, match="'.*again' already exists"):
        _write("compress", tmp_path / "again", inputs, digits)
    assert _snapshot(tmp_path / "again") == before and not back.exists()


def test_run_resumes_its_own_folder_and_nothing_else(tmp_path, no_stages):
    cfg = presso.RunConfig(model="presso:resnet8", target_macs=0.5)
    own = tmp_path / "run"
    (own / "original").mkdir(parents=True)
    (own / "original" / "stage.json").write_text("{}")
    (own / ".work" / "baseline").mkdir(parents=True)
    (own / "summary.json").write_text("{}")
    before = _snapshot(own)
    with pytest.raises(_Reached, match=str(own)):  # its own stages: resumed, no --overwrite needed
        presso.run(_kills.DATA, cfg, output_dir=own)
    assert _snapshot(own) == before
    user = tmp_path / "mine"
    before = _user_folder(user, model=False)
    with pytest.raises(_Reached) as e:  # --overwrite: the run goes to a sibling, renamed into place when complete
        presso.run(_kills.DATA, cfg, output_dir=user, overwrite=True)
    assert ".mine.presso-tmp-" in str(e.value)
    assert _snapshot(user) == before and _siblings(tmp_path) == []


def test_search_resumes_its_own_folder_and_keeps_its_winner(tmp_path, cheap_search):
    from typer.testing import CliRunner

    from presso.cli import app

    out = tmp_path / "s"
    first = _search(out).summary()
    weights = out / "model" / "weights.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    again = _search(out).summary()  # its own folder, the same winner: kept as it was, not trained again
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp
    assert again["best"]["val_top1"] == first["best"]["val_top1"] and again["best"]["trial"] == first["best"]["trial"]
    # resumed: one more trial, no --overwrite needed (without the final step: the new trial may win, and a new
    # winner replaces the kept one only with --overwrite, as below)
    more = _search(out, trials=2, final=False).summary()
    assert more["trials"]["finished"] == 2 and more["study"] == first["study"]
    # OUT/model holding another model (the user's, or an earlier winner): refused, kept, one line naming the way out
    shutil.rmtree(out / "model")
    presso.save_model_dir(_tiny(), out / "model", input_spec=SHAPE)
    before = _snapshot(out / "model")
    with pytest.raises(OutputError, match=r"'.*s/model' holds a model that is not this search's winner") as e:
        _search(out, trials=2)
    assert "--overwrite" in _one_line(e) and _snapshot(out / "model") == before
    cli = ["search", "--data", _kills.DATA, "--latency-ms", "1", "--trials", "2", "--proxy-epochs", "1",
           "--final-epochs", "1", "--threads", "1", "-o", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, cli)
    assert res.exit_code == 2 and _snapshot(out / "model") == before, res.output
    assert [line for line in res.output.splitlines() if line.strip()][-1].count("--overwrite") == 1, res.output
    # the same through the command line with --overwrite: the winner replaces it, nothing is left beside it
    res = CliRunner().invoke(app, [*cli, "--overwrite", "--json"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "model" / "presso.json").read_text())
    assert card["source"]["source"] == "presso:mbnet" and _siblings(tmp_path) == [] and _siblings(out) == []


def test_a_finished_trainings_leftover_state_does_not_block_the_next(tmp_path, inputs, digits):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(inputs["model"], out)
    state = partial_dir(out)  # killed after writing OUT, before removing its state
    state.mkdir()
    (state / "last.pt").write_bytes(b"x")
    shutil.copy(out / "metrics.csv", state / "metrics.csv")
    with pytest.raises(OutputError, match="already exists"):
        _write("train", out, inputs, digits)
    assert not state.exists()  # the finished run's state was dropped; the model was not
    _write("train", out, inputs, digits, overwrite=True)
    assert _kills.output_state("train", out) == "complete" and _siblings(tmp_path) == []


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("verb", _kills.VERBS)
def test_a_killed_verb_leaves_old_or_new_and_reruns_clean(verb, seed, tmp_path, inputs):
    found = _kills.kill_case(verb, tmp_path, seed, inputs)
    assert found["user_files_intact"], found
    assert found["absent_or_complete"], found
    assert found["rerun_ok"], found
    assert found["output_after_rerun"] == "complete" and found["leftovers"] == [], found
