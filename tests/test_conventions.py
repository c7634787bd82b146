"""One convention for every public verb: ``output_dir=`` where it writes, data as a data string or a ``DataBundle``,
a ``presso.Result`` (``.summary()``, ``.to_json()``, ``.output_dir``) and ``ProgressEvent``s to ``progress=``."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import presso
from presso.data import load_data, model_calibration_batches
from presso.progress import ProgressEvent
from presso.results import Result

DATA = "digits:size=16"
SHAPE = "1,3,16,16"
VERBS = [
    "compress",
    "train",
    "evaluate",
    "convert",
    "package",
    "search",
    "run",
    "benchmark",
    "predict_latency",
    "profile_device",
    "info",
]
WRITES = {"compress", "train", "convert", "package", "search", "run"}


def _tiny(num_classes: int = 3):
    torch.manual_seed(0)
    return presso.load_model("presso:resnet8", num_classes=num_classes)


def _check_result(result, wrote: bool) -> dict:
    """The summary is strict JSON (no default=str needed), to_json() is that JSON, output_dir says where it wrote."""
    assert isinstance(result, Result)
    summary = result.summary()
    text = json.dumps(summary)
    assert json.loads(result.to_json()) == json.loads(text)
    assert "output_dir" in summary
    if wrote:
        assert result.output_dir is not None and Path(result.output_dir).exists()
        assert summary["output_dir"] == str(result.output_dir)
    else:
        assert result.output_dir is None and summary["output_dir"] is None
    return summary


@pytest.fixture(scope="module")
def digits():
    """A loaded DataBundle, cut small: every verb takes it wherever it takes a data string."""
    bundle = load_data(DATA)
    return dataclasses.replace(bundle, train=bundle.train.subset(np.arange(256)), val=bundle.val.subset(np.arange(64)))


@pytest.fixture(scope="module")
def flow(tmp_path_factory, digits):
    """train -> compress -> convert -> package on a tiny model, each verb's progress events recorded."""
    out = tmp_path_factory.mktemp("flow")
    events: dict[str, list] = defaultdict(list)

    def recorder(verb):
        return events[verb].append

    cfg = presso.TrainConfig(epochs=1, batch_size=64, workers=0)
    trained = presso.train(_tiny(10), digits, cfg, output_dir=out / "trained", progress=recorder("train"))
    compressed = presso.compress(trained.model, SHAPE, presso.PruneConfig(ratio=0.5), calib=digits,
                                 output_dir=out / "compressed", progress=recorder("compress"))  # fmt: skip
    converted = presso.convert(compressed.model, SHAPE, presso.ConvertConfig(eval_samples=16), calib=digits,
                               output_dir=out / "converted", progress=recorder("convert"))  # fmt: skip
    packaged = presso.package(converted.output_dir, out / "dist", name="m.zip", progress=recorder("package"))
    return {"train": trained, "compress": compressed, "convert": converted, "package": packaged, "events": events}


# ----------------------------------------------------------------------------- results
def test_results_of_the_verbs_that_write(flow):
    train = _check_result(flow["train"], wrote=True)
    assert train["epochs"] == 1 and (flow["train"].output_dir / "presso.json").is_file()

    compress = _check_result(flow["compress"], wrote=True)
    out = flow["compress"].output_dir
    assert (
        (out / "presso.json").is_file()
        and compress["files"] == ["per_layer.yaml"]
        and (out / "per_layer.yaml").is_file()
    )
    again = presso.load_model(out)  # the saved directory is a model, with the compressed channels
    assert presso.info(again, SHAPE).params == compress["params_after"]

    convert = _check_result(flow["convert"], wrote=True)
    assert convert["accuracy"]["samples"] == 16  # the DataBundle given as calib also scored the conversion

    package = _check_result(flow["package"], wrote=True)
    assert flow["package"].path == flow["package"].output_dir / "m.zip" and package["size_bytes"] > 0


def test_results_of_the_verbs_that_only_report(flow, digits):
    model = flow["train"].model
    scores = _check_result(presso.evaluate(model, digits), wrote=False)
    assert scores["val_n"] == 64 and scores["val_top1"] == flow["train"].best["val_top1"]
    info = _check_result(presso.info(_tiny(), SHAPE), wrote=False)
    assert info["params"] > 0 and info["input_shape"] == SHAPE
    bench = presso.benchmark(_tiny(), input_shape=SHAPE, threads=1, warmup=1, repeat=3, max_seconds=2, db=False)
    measured = _check_result(bench, wrote=False)
    assert measured["latency_ms"]["median"] == bench.median_ms > 0 and "db" not in measured


def test_results_of_search_run_and_prediction_are_json(tmp_path):
    # the real runs are tests/search and tests/test_pipeline; here only the result types, built as those verbs do
    from presso.bench.predictor import LatencyPrediction
    from presso.pipeline import RunResult
    from presso.search.nas import SearchConfig, SearchResult

    counts = {"finished": 2, "trained": 1}
    search = SearchResult(output_dir=tmp_path, study="s", storage="sqlite:///s.db", best=None, pareto=[],
                          counts=counts, seconds=1.0, config=SearchConfig(latency_ms=1.0))  # fmt: skip
    assert _check_result(search, wrote=True)["trials"] == counts
    run = RunResult(output_dir=tmp_path, figures={"stages": {"original": {"val_top1": 0.9}}, "seconds": 3.0})
    assert _check_result(run, wrote=True)["stages"]["original"]["val_top1"] == 0.9
    pred = LatencyPrediction(latency_ms=1.5, overhead_ms=0.1, device="local", device_fp="f", kernels=3, looked_up=3,
                             estimated=0, unknown=0)  # fmt: skip
    assert _check_result(pred, wrote=False)["latency_ms"] == 1.5


# ----------------------------------------------------------------------------- parameters and progress
@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_takes_progress_and_output_dir_where_it_writes(verb):
    params = inspect.signature(getattr(presso, verb)).parameters
    assert "progress" in params
    assert ("output_dir" in params) == (verb in WRITES)
    assert "output" not in params
    if verb == "compress":  # calibration data is calib=, as in convert
        assert "calib" in params and "data" not in params


def test_compress_convert_and_train_report_progress_events(flow):
    events = flow["events"]
    for verb in ("train", "compress", "convert", "package"):
        assert events[verb] and all(isinstance(e, ProgressEvent) for e in events[verb]), verb
    stages = {verb: {e.stage for e in events[verb]} for verb in events}
    assert {"train", "epoch"} <= stages["train"]
    assert {"calibration data", "compress", "save"} <= stages["compress"]
    assert {"exporting to ONNX", "verifying"} <= stages["convert"]
    steps = [e for e in events["train"] if e.stage == "train"]
    assert steps[-1].done == steps[-1].total and {"epoch", "step", "loss"} <= set(steps[-1].info)
    last = {e.stage: e for e in events["convert"]}
    assert all(e.done == e.total for e in last.values())  # every conversion stage is reported finished


def test_compress_reads_a_data_string_as_convert_does():
    model = _tiny()
    cfg = presso.PruneConfig(ratio=0.5, criterion="taylor", round_to=None)  # the data decides which channels go
    named = presso.compress(model, SHAPE, cfg, calib=DATA)
    given = presso.compress(model, SHAPE, cfg, calib=model_calibration_batches(model, DATA, SHAPE))
    assert named.per_layer == given.per_layer
    a, b = named.model.state_dict(), given.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the public names
def test_every_public_name_resolves():
    for name in presso.__all__:
        assert getattr(presso, name) is not None, name
    wanted = {"Target", "DecomposeConfig", "SearchConfig", "RunConfig", "Int8Config", "CompressResult",
              "ConvertResult", "SearchResult", "RunResult", "BenchmarkResult", "EvalResult", "InfoResult",
              "ProgressEvent", "Result", *VERBS}  # fmt: skip
    assert wanted <= set(presso.__all__)
    results = [n for n in presso.__all__ if n.endswith("Result") and n != "Result"] + ["LatencyPrediction"]
    assert all(issubclass(getattr(presso, n), presso.Result) for n in results)


def test_cli_progress_adapter_draws_a_task_per_stage_and_prints_lines():
    from rich.console import Console
    from rich.progress import TimeRemainingColumn

    from presso.cli.app import ProgressBars

    console = Console(file=io.StringIO(), width=150)
    with ProgressBars(console=console) as bars:
        bars(ProgressEvent("compress", 0, 4))
        bars(ProgressEvent("compress", 4, 4))
        bars(ProgressEvent("save", 0))  # total unknown: a spinner and the time taken
        bars(ProgressEvent("compress", 1, 2))  # the stage runs again: its task starts over
        bars(ProgressEvent("epoch", 1, 2, {"epoch": 1, "train_loss": 0.5, "val_top1": 0.75}))
        bars(ProgressEvent("trial", 1, 1, {"number": 3, "top1": 0.5, "predicted_ms": 1.25}))
    tasks = {t.description.split("[/bold]")[0].removeprefix("[bold]"): t for t in bars.progress.tasks}
    assert set(tasks) == {"compress", "save"}  # epochs and trials are lines, not bars
    assert (tasks["compress"].completed, tasks["compress"].total) == (1, 2) and tasks["save"].total is None
    assert any(isinstance(c, TimeRemainingColumn) for c in bars.progress.columns)
    text = console.file.getvalue()
    assert "epoch 1/2  train loss 0.5000  val_top1 0.7500" in text and "trial 3: top-1 0.5000 at 1.250 ms" in text
