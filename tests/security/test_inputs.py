"""Inputs are validated at the edge (issue 19): every case a probe turned into "internal error ... report it" gives
one clear line instead -- numeric options, configs, bundles, data, the latency database, PRESSO_HOME, full or
read-only disks, and Ctrl-C in a command's first seconds.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from presso.cli import app
from presso.errors import BundleError, ConfigError, DataError, PressoError

runner = CliRunner()
NAN, INF = float("nan"), float("inf")
ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(result, *needles: str, code: int = 2) -> None:
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and "internal error" not in out, out
    for needle in needles:
        assert needle in out, (needle, out)


# ----------------------------------------------------------------------------- 1. numeric options
def test_every_numeric_option_has_a_declared_range():
    import typer.main

    from presso.cli.limits import numeric_options, range_for

    group = typer.main.get_command(app)
    options = list(numeric_options(group))
    assert len(options) > 50  # the walk does reach every command
    missing = [f"{cmd} {name}" for cmd, name, _, _ in options if range_for(cmd, name) is None]
    assert not missing, f"add these options to presso.cli.limits.RANGES: {missing}"


# (command line without the bad option, option, bad value): each fails in option parsing, before any work
NUMERIC_CASES = [
    (["compress", "presso:resnet8", "-o", "OUT", "-s", "1,3,32,32"], "--target-latency-ms", "nan"),
    (["compress", "presso:resnet8", "-o", "OUT", "-s", "1,3,32,32", "--target-macs", "0.5"], "--tolerance", "nan"),
    (["compress", "presso:resnet8", "-o", "OUT", "-s", "1,3,32,32"], "--target-macs", "inf"),
    (["compress", "presso:resnet8", "-o", "OUT", "-s", "1,3,32,32"], "--prune-ratio", "nan"),
    (["compress", "presso:resnet8", "-o", "OUT", "-s", "1,3,32,32"], "--threads", "-1"),
    (["compress", "presso:resnet8", "-o", "OUT", "-s", "1,3,32,32"], "--round-to", "-8"),
    (["train", "presso:resnet8", "-d", "digits", "-o", "OUT"], "--workers", "-2"),
    (["train", "presso:resnet8", "-d", "digits", "-o", "OUT"], "--lr", "inf"),
    (["train", "presso:resnet8", "-d", "digits", "-o", "OUT"], "--temperature", "nan"),
    (["train", "presso:resnet8", "-d", "digits", "-o", "OUT"], "--epochs", "0"),
    (["train", "presso:resnet8", "-d", "digits", "-o", "OUT"], "--seed", "-1"),
    (["eval", "presso:resnet8", "-d", "digits"], "--val-fraction", "nan"),
    (["convert", "presso:resnet8", "-o", "OUT"], "--tolerance", "nan"),
    (["convert", "presso:resnet8", "-o", "OUT"], "--snr-db", "inf"),
    (["convert", "presso:resnet8", "-o", "OUT"], "--calib-samples", "0"),
    (["predict", "BUNDLE", "IMAGE"], "--top-k", "0"),
    (["predict", "BUNDLE", "IMAGE"], "--top-k", "-3"),
    (["predict", "BUNDLE", "IMAGE"], "--threads", "-1"),
    (["benchmark", "presso:resnet8"], "--max-seconds", "nan"),
    (["benchmark", "presso:resnet8"], "--repeat", "0"),
    (["search", "-d", "digits", "-o", "OUT"], "--latency-ms", "nan"),
    (["search", "-d", "digits", "-o", "OUT", "--latency-ms", "5"], "--time-budget", "inf"),
    (["run", "-d", "digits", "-o", "OUT"], "--latency-ms", "-1"),
    (["run", "-d", "digits", "-o", "OUT", "--target-macs", "0.5"], "--max-accuracy-drop", "nan"),
    (["agent", "serve", "--token-file", "T"], "--port", "70000"),
    (["db", "list"], "--limit", "0"),
]


@pytest.mark.parametrize("args,option,value", NUMERIC_CASES, ids=[f"{a[0]}{o}={v}" for a, o, v in NUMERIC_CASES])
def test_numeric_options_are_checked_before_any_work(tmp_path, args, option, value):
    args = [str(tmp_path / a) if a in ("OUT", "BUNDLE", "IMAGE", "T") else a for a in args]
    t0 = time.perf_counter()
    result = runner.invoke(app, [*args, option, value])
    _one_line_error(result, option)
    assert time.perf_counter() - t0 < 5  # refused while parsing: no model loaded, no search started
    assert not (tmp_path / "OUT").exists()


def test_image_size_over_the_limit_is_one_line(tmp_path):
    result = runner.invoke(app, ["train", "presso:resnet8", "-d", "digits", "-o", str(tmp_path / "o"),
                                 "--image-size", "100000"])  # fmt: skip
    _one_line_error(result, "--image-size")


CONFIG_CASES = [  # (class, keyword arguments, the field the error must name)
    ("presso.compress:Target", {"latency_ms": NAN}, "latency_ms"),
    ("presso.compress:Target", {"macs": 0.5, "tolerance": NAN}, "tolerance"),
    ("presso.compress:Target", {"params": INF}, "params"),
    ("presso.train:TrainConfig", {"workers": -2}, "workers"),
    ("presso.train:TrainConfig", {"lr": INF}, "lr"),
    ("presso.train:TrainConfig", {"weight_decay": INF}, "weight_decay"),
    ("presso.train:TrainConfig", {"image_size": 100000}, "image_size"),
    ("presso.search.config:SearchConfig", {"latency_ms": INF}, "latency_ms"),
    ("presso.search.config:SearchConfig", {"latency_ms": 5, "measure_top": 0}, "measure_top"),
    ("presso.pipeline:RunConfig", {"latency_ms": NAN}, "latency_ms"),
    ("presso.pipeline:RunConfig", {"latency_ms": 5, "recover_epochs": 0}, "recover_epochs"),
    ("presso.convert:Int8Config", {"snr_db": NAN}, "snr_db"),
]


@pytest.mark.parametrize("cls,kwargs,field", CONFIG_CASES, ids=[f"{c.split(':')[1]}-{f}" for c, _, f in CONFIG_CASES])
def test_configs_refuse_nan_inf_and_out_of_range_naming_the_field(cls, kwargs, field):
    import importlib

    module, name = cls.split(":")
    with pytest.raises(ConfigError, match=field):
        getattr(importlib.import_module(module), name)(**kwargs)


# ----------------------------------------------------------------------------- 2. bundles
CLASSES = 4


def _model(*, channels=3, size=8, classes=CLASSES, batch="N", external=False, weights=None, rank3=False) -> bytes:
    """A tiny image classifier in ONNX: mean over H, W, then a [channels, classes] matrix."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])
    out_shape = [batch, classes, 1] if rank3 else [batch, classes]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    w_array = np.random.default_rng(0).normal(size=(channels, classes)).astype(np.float32)
    w = numpy_helper.from_array(w_array if weights is None else weights.astype(np.float32), "w")
    if external:
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[channels, classes])
        w.data_location = TensorProto.EXTERNAL
        entry = w.external_data.add()
        entry.key, entry.value = "location", "/etc/hostname"
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["y2" if rank3 else "y"])]  # fmt: skip
    inits = [w, axes]
    if rank3:
        nodes.append(helper.make_node("Unsqueeze", ["y2", "ax"], ["y"]))
        inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "ax"))
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _card(**pp) -> dict:
    preprocess = {"size": [8, 8], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], **pp}
    return {"bundle_format": "presso-bundle", "preprocess": preprocess, "labels": ["a", "b", "c", "d"]}


def _bundle(path: Path, model: bytes, card, extra=None, method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("model.onnx", model)
        zf.writestr("presso.json", card if isinstance(card, (bytes, str)) else json.dumps(card))
        for name, (data, how) in (extra or {}).items():
            zf.writestr(name, data, compress_type=how)
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    p = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(p)
    return p


BUNDLE_CASES = {  # id -> (model.onnx, card, what the one line must mention); None: it predicts
    "good": (_model(), _card(), None),  # the bundle every other case breaks in one way
    "std-0": (_model(), _card(std=[0.0, 0.25, 0.25]), "std"),  # was: NaN scores and exit 0
    "std-negative": (_model(), _card(std=[-1.0, 0.25, 0.25]), "std"),
    "mean-nan": (_model(), _card(mean=[NAN, 0.5, 0.5]), "mean"),
    "channels": (_model(), _card(channels=1, mean=[0.5], std=[0.2]), "does not belong to this model"),
    "size": (_model(), _card(size=[16, 16]), "does not belong to this model"),
    "size-huge": (_model(), _card(size=[100000, 100000]), "size"),
    "size-text": (_model(), _card(size="big"), "size"),
    "labels": (_model(classes=5), _card(), "labels"),
    "output-rank": (_model(rank3=True), _card(), "not a classifier"),
    "nan-scores": (_model(weights=np.full((3, CLASSES), np.nan)), _card(), "NaN"),
    "garbage-model": (b"\x08\x07" + os.urandom(300), _card(), "ONNX"),
    "truncated-model": (_model()[:-7], _card(), "ONNX"),
    "external-data": (_model(external=True), _card(), "external data"),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_lying_or_damaged_bundles_are_one_line(tmp_path, image, case):
    model, card, message = BUNDLE_CASES[case]
    result = runner.invoke(app, ["predict", str(_bundle(tmp_path / "b.zip", model, card)), str(image), "--json"])
    if message is None:
        assert result.exit_code == 0 and len(json.loads(result.stdout)["predictions"]) == 1, result.output
    else:
        _one_line_error(result, message)


def test_predict_reads_only_what_the_model_needs(tmp_path, image):
    """Padding in a member predicting never reads costs no memory (it used to be read whole)."""
    from presso.convert.predict import Predictor, open_bundle

    padding = os.urandom(1 << 20) * 24  # 24 MiB, stored: the ratio check cannot see it
    bundle = _bundle(tmp_path / "b.zip", _model(), _card(), extra={"README.txt": (padding, zipfile.ZIP_STORED)})
    del padding
    tracemalloc.start()
    try:
        opened = open_bundle(bundle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert opened.members == ["README.txt", "model.onnx", "presso.json"]
    assert len(Predictor(opened).predict([image])) == 1


def test_a_card_over_its_declared_size_limit_is_refused_before_reading(tmp_path):
    from presso.convert.predict import open_bundle

    card = json.dumps(_card()) + " " * (17 << 20)  # 17 MiB of valid JSON, stored
    bundle = _bundle(tmp_path / "b.zip", _model(), card, method=zipfile.ZIP_STORED)
    with pytest.raises(BundleError, match="presso.json declares"):
        open_bundle(bundle)


def test_a_padded_model_is_refused(tmp_path):
    from presso.convert.predict import open_bundle

    rng = np.random.default_rng(0)
    padding = np.zeros(12 << 20, np.uint8)
    padding[rng.integers(0, padding.size, padding.size // 600)] = 7  # deflates ~125x: under the zip-bomb limit
    model = _model() + padding.tobytes()
    bundle = _bundle(tmp_path / "b.zip", model, _card())
    with pytest.raises(BundleError, match="padding"):
        open_bundle(bundle)


def test_top_k_prints_k_labels_with_k_scores(tmp_path, image):
    bundle = _bundle(tmp_path / "b.zip", _model(), _card())
    result = runner.invoke(app, ["predict", str(bundle), str(image), "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)["predictions"][0]["top"]
    assert len(top) == 3 and all(set(t) == {"class", "label", "score"} for t in top)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    table = runner.invoke(app, ["predict", str(bundle), str(image), "--top-k", "3"], env={"COLUMNS": "400"})
    row = next(line for line in table.stdout.splitlines() if "img.png" in line)
    assert row.count(" | ") == 4  # three labels and three scores, each joined by " | "
    for t in top:
        assert t["label"] in row and f"{t['score']:.4f}" in row


@pytest.mark.parametrize("k", [0, -3, CLASSES + 1])
def test_top_k_outside_the_classes_is_one_line(tmp_path, image, k):
    from presso.convert.predict import Predictor

    bundle = _bundle(tmp_path / "b.zip", _model(), _card())
    with pytest.raises(ConfigError, match=f"1..{CLASSES}"):
        Predictor(bundle).predict([image], top_k=k)
    if k > 0:
        _one_line_error(runner.invoke(app, ["predict", str(bundle), str(image), "--top-k", str(k)]), "top_k")


_NUMBERS = st.one_of(
    st.integers(-3, 10), st.integers(10**5, 10**7), st.floats(allow_nan=True, allow_infinity=True), st.booleans()
)
_VALUES = st.one_of(_NUMBERS, st.none(), st.text(max_size=4), st.lists(_NUMBERS, max_size=4))
_MODELS = st.sampled_from(["ok", "ok", "fixed", "garbage", "truncated", "external", "nan", "rank3", "classes5"])
_MEMBER_NAMES = st.sampled_from(["README.txt", "predict.py", "../evil.py", "/abs.txt", "a/b.bin", "model.onnx"])


@st.composite
def _bundles(draw):
    card = _card()
    for key in ("size", "channels", "mean", "std", "labels"):
        if draw(st.integers(0, 4)) == 4:  # Hypothesis favours small numbers: 0 leaves the field as it is
            value = draw(st.one_of(_VALUES, st.lists(st.text(max_size=3), max_size=6)))
            (card if key == "labels" else card["preprocess"])[key] = value
    how = draw(st.integers(0, 9))
    card_data = {7: "not json {", 8: json.dumps([card]), 9: json.dumps({"preprocess": card["preprocess"]})}.get(
        how, json.dumps(card)
    )
    kind = draw(st.one_of(st.just("ok"), _MODELS))
    model = {
        "ok": _model, "fixed": lambda: _model(batch=2), "external": lambda: _model(external=True),
        "nan": lambda: _model(weights=np.full((3, CLASSES), np.nan)), "rank3": lambda: _model(rank3=True),
        "classes5": lambda: _model(classes=5), "garbage": lambda: draw(st.binary(max_size=200)),
        "truncated": lambda: _model()[: draw(st.integers(0, len(_model()) - 1))],
    }[kind]()  # fmt: skip
    member = st.tuples(st.binary(max_size=64), st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    extra = draw(st.one_of(st.just({}), st.dictionaries(_MEMBER_NAMES, member, max_size=3)))
    return model, card_data, extra, draw(st.one_of(st.integers(1, CLASSES), st.integers(-1, 6)))


def test_any_bundle_gives_a_result_or_one_clear_error(tmp_path, image):
    from presso.convert.predict import Predictor

    outcomes: dict[str, int] = {}

    @settings(max_examples=50, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_bundles())
    def check(case):
        model, card, extra, k = case
        bundle = _bundle(tmp_path / "fuzz.zip", model, card, extra)
        try:
            result = Predictor(bundle).predict([image, image], top_k=k)
        except PressoError as e:
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            assert str(e) and "\n" not in str(e).strip()
            return
        outcomes["ok"] = outcomes.get("ok", 0) + 1
        assert len(result) == 2
        for r in result:
            assert len(r["top"]) == k and all(0 <= t["score"] <= 1 and isinstance(t["label"], str) for t in r["top"])

    check()
    assert outcomes.get("refused", 0) > 5 and outcomes.get("ok", 0) > 0, outcomes  # both paths are exercised


# ----------------------------------------------------------------------------- 3. data
def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_idx_labels_beyond_the_classes_fail_when_loaded(tmp_path):
    from presso.data import load_data

    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 255, (20, 8, 8)))
    _idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 200] * 5))  # fashion-mnist has 10 classes
    with pytest.raises(DataError, match="outside 0..9"):
        load_data(f"fashion-mnist:{tmp_path}")
    _idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3] * 5))
    _idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (4, 8, 8)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 11]))  # the test split names a class training lacks
    with pytest.raises(DataError, match="outside 0..9"):
        load_data(f"fashion-mnist:{tmp_path}")
    assert load_data(str(tmp_path)).num_classes == 12  # unnamed classes: as many as the labels say


def test_a_fifo_listed_in_a_csv_is_skipped_not_waited_for(tmp_path):
    from PIL import Image

    from presso.data import load_data

    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "labels.csv").write_text("a.png,0\nfifo.png,1\nb.png,1\nc.png,0\n")
    done: list = []
    thread = threading.Thread(target=lambda: done.append(load_data(str(tmp_path / "labels.csv"))), daemon=True)
    thread.start()
    thread.join(15)
    assert done, "load_data blocked on a FIFO"
    assert len(done[0].train) + len(done[0].val) == 3


# ----------------------------------------------------------------------------- 4. latency database and PRESSO_HOME
def test_a_corrupt_latency_db_is_one_line_saying_what_to_do(home):
    home.mkdir(parents=True)
    (home / "latency.db").write_bytes(os.urandom(5000))
    _one_line_error(runner.invoke(app, ["db", "list"]), "not a Presso latency database", "mv ")


def test_a_foreign_sqlite_file_is_not_taken_for_a_latency_db(home):
    import sqlite3

    home.mkdir(parents=True)
    with sqlite3.connect(home / "latency.db") as conn:
        conn.execute("create table measurements (a int)")
    _one_line_error(runner.invoke(app, ["db", "list"]), "not a Presso latency database")


@pytest.mark.parametrize("args", [["db", "list"], ["devices", "add", "x", "http://h:1", "--token-file", "TOKEN",
                                                   "--no-check"]])  # fmt: skip
def test_presso_home_that_is_a_file_is_one_line(tmp_path, monkeypatch, args):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    (tmp_path / "token").write_text("secret\n")
    monkeypatch.setenv("PRESSO_HOME", str(home))
    result = runner.invoke(app, [str(tmp_path / "token") if a == "TOKEN" else a for a in args])
    _one_line_error(result, "PRESSO_HOME", "is a file")


# ----------------------------------------------------------------------------- 5. full and read-only disks
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_disk_errors_name_the_path_and_the_cause(tmp_path, monkeypatch, home, code):
    from presso.bench.latency_db import LatencyDB

    target = tmp_path / "out" / "rows.json"

    def refuse(self, path, *args, **kwargs):
        try:
            raise OSError(code, os.strerror(code), str(path))
        except OSError as e:
            raise RuntimeError("while writing the export") from e  # found through the cause chain too

    monkeypatch.setattr(LatencyDB, "export", refuse)
    _one_line_error(runner.invoke(app, ["db", "export", str(target)]), str(target), os.strerror(code), code=1)


# ----------------------------------------------------------------------------- 6. Ctrl-C
def test_the_cli_imports_timm_before_torch_pruning_wherever_that_is_imported():
    """Torch-Pruning's bare ``except:`` around ``import timm`` swallows a Ctrl-C during that import; a model
    directory's recipe imports Torch-Pruning without presso.compress (whose own order the next tests check)."""
    code = (
        "import sys, presso.cli\nseen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch_pruning.utils.op_counter':  # where Torch-Pruning tries timm\n"
        "            seen.append('timm' in sys.modules)\n"
        "sys.meta_path.insert(0, Spy())\nimport torch_pruning\nassert seen == [True], seen\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ctrl_c_held_during_tracing_is_raised_after_it():
    from presso.compress.prune.tp_patches import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in the CLI
    try:
        swallowed = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                try:  # what Torch-Pruning's build_dependency does around the forward
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.05)
                except:  # noqa: E722
                    swallowed.append(True)
        assert not swallowed and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def _compress(out: Path, prelude: str | None = None) -> subprocess.Popen:
    """``python -m presso compress`` of a small model (about 5 s), or the same after ``prelude`` runs."""
    args = ["compress", "presso:resnet8", "-s", "1,3,96,96", "-r", "0.5", "-o", str(out)]
    command = [sys.executable, "-m", "presso", *args]
    if prelude is not None:
        run = "runpy.run_module('presso', run_name='__main__')"
        code = f"import runpy, sys\n{prelude}\nsys.argv = ['presso', *{args!r}]\n{run}"
        command = [sys.executable, "-c", code]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # Ctrl-C as from a terminal: a test run started as a background job of a non-interactive shell has SIGINT
    # ignored, and an ignored signal stays ignored in every child (the interrupt would never arrive)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _assert_interrupted(proc: subprocess.Popen, what: str) -> None:
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip() and "━" not in line]
    assert proc.returncode in (130, -signal.SIGINT), (what, proc.returncode, lines[-5:])
    # A SIGINT that lands while the interpreter is still starting (0.3 s, under load) ends the process before Python
    # or Presso can print anything: status -2 (or 130) and an empty stderr. That is the right outcome too: the status
    # says "interrupted" and nothing misleading was printed. Anything printed must end with "interrupted".
    assert not lines or lines[-1].strip() == "interrupted", (what, lines[-5:])
    assert not any(w in stderr for w in ("Traceback", "error:", "--input-shape")), (what, lines[-5:])


def test_a_ctrl_c_inside_the_timm_import_stops_compress(tmp_path):
    """The case that was lost: a KeyboardInterrupt raised deep inside ``import timm`` (deterministically here)."""
    prelude = (
        "class Boom:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'timm.layers':\n"
        "            sys.meta_path.remove(self)\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Boom())"
    )
    proc = _compress(tmp_path / "out", prelude)
    _assert_interrupted(proc, "KeyboardInterrupt in import timm")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.4, 2.0, 2.6])
def test_ctrl_c_in_the_first_seconds_stops_compress(tmp_path, delay):
    proc = _compress(tmp_path / "out")
    time.sleep(delay)
    if proc.poll() is not None:  # finished before the interrupt could land: then it must have finished cleanly
        _, stderr = proc.communicate()
        assert proc.returncode == 0 and (tmp_path / "out" / "presso.json").is_file(), stderr[-2000:]
        return
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, f"SIGINT after {delay} s")
