"""presso run: the delivered model is the best one measured (the quantized original when compression buys no
speed, the compressed one when it does), the summary's headline and exit codes, reruns, the search flow, an
impossible budget, and the report in Chromium. The selection rule and the CLI's miss handling are also checked on
made-up figures (fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

DATA = "digits:size=16"
HEADLINE_KEYS = ("delivered", "speedup_vs_original_fp32", "speedup_vs_baseline_int8", "size_ratio",
                 "accuracy_drop_points", "budget_met", "accuracy_bound_met")  # fmt: skip


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "presso", "run", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _expected_exit(s: dict) -> int:
    met = s["budget_met"] and s["accuracy_bound_met"]
    return 0 if met or s["config"]["allow_miss"] else 3


def _cands(s: dict) -> dict[str, dict]:
    return {c["id"]: c for c in s["candidates"]}


@pytest.fixture(scope="module")
def latency_db(tmp_path_factory):
    from presso.bench import profile_device

    db = str(tmp_path_factory.mktemp("lat") / "latency.db")
    profile_device("local", size="quick", db=db)
    return db


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """ResNet-8 on 16x16 digits: its latency is mostly per-node overhead, so pruning a tenth of its MACs buys little
    measurable speed, while INT8 ran ~1.4x faster than FP32 on an AVX-512 VNNI CPU (one thread; not on AVX2)."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    args = ["--data", DATA, "--model", "presso:resnet8", "--target-macs", "0.9", "-o", str(out), "--train-epochs",
            "6", "--recover-epochs", "2", "--max-accuracy-drop", "0.08", "--threads", "1", "--db",
            str(tmp / "lat.db"), "--json"]  # fmt: skip
    t0 = time.perf_counter()
    r = _run(*args)
    assert r.returncode in (0, 3), r.stderr
    s = json.loads(r.stdout)
    assert r.returncode == _expected_exit(s), r.stderr
    return out, args, s, time.perf_counter() - t0


def _rule(s: dict) -> tuple[dict, str]:
    """What the selection rule (checked on made-up figures below) picks from a run's own measured candidates."""
    from presso.pipeline.candidates import select

    cfg = s["config"]
    return select([dict(c) for c in s["candidates"]], max_drop=cfg["max_accuracy_drop"], latency_ms=cfg["latency_ms"],
                  target_macs=cfg["target_macs"])  # fmt: skip


def test_the_run_delivers_what_the_rule_picks_from_its_measurements(model_run):
    """Which candidate wins is the CPU's to say: INT8 ran 1.4x FP32 on this model on an AVX-512 VNNI CPU, and 4%
    slower than FP32 on an AVX2 CPU without VNNI (7-bit weights, one thread), where the pruned FP32 model won."""
    out, _, s, _ = model_run
    c = _cands(s)
    assert set(c) == {"original-fp32", "original-int8", "compressed-fp32", "compressed-int8"}
    chosen, why = _rule(s)
    d = s["delivered"]
    assert d["candidate"] == chosen["id"] and d["why"] == why and d["label"] == chosen["label"]
    assert s["bundle"]["from"] == c[chosen["id"]]["dir"] and s["bundle"]["predicts"] is True
    assert s["speedup_vs_original_fp32"] == round(c["original-fp32"]["latency_ms"] / d["latency_ms"], 2)
    # a MACs budget stands for speed: what is as fast as the accurate compressed model meets it
    assert s["budget_met"] and s["accuracy_bound_met"] and _expected_exit(s) == 0
    assert c["compressed-int8"]["macs_ratio"] <= 0.9 * 1.03 and c["compressed-fp32"]["budget_ok"]
    # where INT8 runs faster and pruning a tenth of the MACs buys no measurable speed (the case this model was chosen
    # for, on a VNNI CPU), the quantized original is delivered, and the summary says why
    fastest_compressed = min(c["compressed-fp32"]["latency_ms"], c["compressed-int8"]["latency_ms"])
    if c["original-int8"]["latency_ms"] * (1 + 0.05) <= min(c["original-fp32"]["latency_ms"], fastest_compressed):
        assert d["candidate"] == "original-int8" and d["label"] == "baseline INT8", d["why"]
        assert "compression did not beat quantization alone" in d["why"] and s["speedup_vs_baseline_int8"] == 1.0


def test_summary_json_headline_and_paths(model_run):
    out, _, s, _ = model_run
    on_disk = json.loads((out / "summary.json").read_text())
    for k in HEADLINE_KEYS:
        assert k in on_disk, k
    assert isinstance(s["budget_met"], bool) and isinstance(s["accuracy_bound_met"], bool)
    assert s["delivered"]["candidate"] and s["delivered"]["why"]
    c, d = _cands(s), s["delivered"]
    assert s["speedup_vs_original_fp32"] == round(c["original-fp32"]["latency_ms"] / d["latency_ms"], 2)
    assert s["size_ratio"] == round(d["size_bytes"] / c["original-fp32"]["size_bytes"], 3)
    # the original FP32 model is delivered where nothing beat it by more than the noise (a tie goes to the original:
    # on an AVX2 CPU INT8 can run slower, and a tenth of ResNet-8's MACs buys no measurable speed); anything else is
    # smaller: INT8 weights take a quarter of the bytes, the pruned model fewer of them
    if d["candidate"] == "original-fp32":
        from presso.pipeline.candidates import TIE

        ok = [x["latency_ms"] for x in c.values() if x["accuracy_ok"] and x["budget_ok"]]
        assert s["size_ratio"] == 1.0 and c["original-fp32"]["latency_ms"] <= min(ok) * (1 + TIE), d["why"]
    else:
        assert s["size_ratio"] < (0.5 if d["candidate"].endswith("int8") else 1.0)
    assert s["accuracy_drop_points"] == c[d["candidate"]]["accuracy_drop_points"]
    assert s["headline"][0].startswith(f"Delivered: {d['label']} (") and "Speed-up" in s["headline"][1]
    # every path and every folder a reproduce command writes is in OUT; nothing points into .work
    assert ".work" not in json.dumps(on_disk) and not (out / ".work").exists()
    for cand in s["candidates"]:
        assert (out / cand["path"]).is_file(), cand["path"]
    for cmd in s["commands"]:
        assert cmd.startswith("presso "), cmd
        if " -o " in cmd:
            assert (out / cmd.split(" -o ")[1].split()[0]).exists(), cmd


def test_model_flow_trains_compresses_recovers_and_packages(model_run):
    out, _, s, _ = model_run
    st = s["stages"]
    assert "trained on the data (it was not trained)" in st["original"]["how"]
    assert st["compress"]["macs"] < st["original"]["macs"] and st["recover"]["val_top1"] is not None
    assert s["accuracy"]["original"] > 0.8 and s["accuracy"]["within_bound"]
    assert (out / "deploy" / "bundle.zip").is_file()
    for stage in ("original", "baseline", "compress", "recover", "deploy"):
        assert (out / stage / "stage.json").is_file()
    assert (out / "original" / "model" / "weights.safetensors").is_file()
    text = (out / "report.html").read_text()
    assert 'id="headline"' in text and 'id="candidates"' in text and f"Delivered: {s['delivered']['label']}" in text


def test_rerun_skips_finished_stages_and_a_changed_setting_reruns_from_there(model_run):
    out, args, first, seconds = model_run
    t0 = time.perf_counter()
    r = _run(*[a for a in args if a != "--json"])  # the console summary this time
    assert r.returncode == _expected_exit(first), r.stderr
    assert time.perf_counter() - t0 < max(60.0, seconds / 3)
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"Delivered: {first['delivered']['label']} (") and "Speed-up" in r.stdout
    assert "Budget: " in r.stdout
    assert "{'" not in r.stdout  # no raw Python dict
    again = json.loads((out / "summary.json").read_text())
    assert all(rec["cached"] for rec in again["stages"].values())
    assert again["candidates"] == first["candidates"]
    # another precision: original/compress/recover are reused, baseline and deploy rerun
    r = _run(*args, "--precision", "fp16")
    assert r.returncode in (0, 3), r.stderr
    s = json.loads(r.stdout)
    assert r.returncode == _expected_exit(s)
    cached = {k: v["cached"] for k, v in s["stages"].items()}
    assert cached["original"] and cached["compress"] and cached["recover"]
    assert not cached["baseline"] and not cached["deploy"] and "fp16" in s["stages"]["deploy"]
    ids = {c["id"] for c in s["candidates"]}
    assert ids == {"original-fp32", "original-fp16", "compressed-fp32", "compressed-fp16"}


def test_when_compression_wins_the_compressed_model_is_delivered(tmp_path):
    """A ResNet with 32-128 channels at 24 px: most of its latency is arithmetic, which pruning to 40% of the MACs
    cuts (quiet, one thread: FP32 0.97 -> 0.43 ms, INT8 0.69 -> 0.39 ms on an AVX2 CPU). At 16 px the cut was 0.68x
    in INT8 and, measured beside other tests, once inside the noise. Whether the compressed INT8 or FP32 file wins
    is the CPU's to say (they tie on AVX2 at this size): the run must deliver what its rule picks from its own
    measurements, and that is a compressed model."""
    out = tmp_path / "out"
    r = _run("--data", "digits", "--image-size", "24", "--model", "presso:small_resnet", "--model-arg",
             "num_classes=10", "--target-macs", "0.4", "-o", str(out), "--train-epochs", "2", "--recover-epochs",
             "1", "--max-accuracy-drop", "0.5", "--threads", "1", "--db", str(tmp_path / "lat.db"),
             "--json")  # fmt: skip
    assert r.returncode in (0, 3), r.stderr
    s = json.loads(r.stdout)
    assert r.returncode == _expected_exit(s) == 0
    c, d = _cands(s), s["delivered"]
    assert s["stages"]["original"]["input_shape"] == "1,3,24,24"
    chosen, why = _rule(s)
    assert d["candidate"] == chosen["id"] and d["why"] == why
    assert d["candidate"] in ("compressed-int8", "compressed-fp32"), d["why"]
    precision = d["candidate"].split("-")[1]
    # measured in the same interleaved run: clearly faster than the original at the same precision, not a tie
    assert c[d["candidate"]]["latency_ms"] < 0.9 * c[f"original-{precision}"]["latency_ms"], d["why"]
    assert s["speedup_vs_baseline_int8"] > 1.1 and s["speedup_vs_original_fp32"] > 1.1
    assert s["bundle"]["from"] == c[d["candidate"]]["dir"] == f"deploy/{precision}" and s["bundle"]["predicts"] is True


def test_search_flow_without_a_model(tmp_path, latency_db):
    out = tmp_path / "out"
    r = _run("--data", DATA, "--latency-ms", "5", "-o", str(out), "--search-trials", "4", "--search-proxy-epochs", "1",
             "--train-epochs", "3", "--max-accuracy-drop", "0.1", "--db", latency_db, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    st = s["stages"]
    assert st["original"]["how"].startswith("searched") and st["original"]["search"]["counts"]["finished"] == 4
    assert "already runs in" in st["compress"]["skipped"] and st["recover"]["skipped"]
    assert s["budget_met"] and s["budget"]["measured_ms"] <= 5 and s["delivered"]["candidate"].startswith("original")
    assert s["bundle"]["predicts"] is True
    assert (out / "original" / "search" / "pareto.png").is_file()


def test_an_unreachable_budget_delivers_the_closest_original_and_says_why(model_run, tmp_path):
    """A latency budget below what 90% pruning reaches: nothing is compressed (no hours lost on a hopeless search),
    the original's files are measured and the closest is delivered; exit 3, or 0 with --allow-miss."""
    out, args, _, _ = model_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    swapped = list(args)
    i = swapped.index("--target-macs")
    swapped[i : i + 2] = ["--latency-ms", "0.0001"]
    swapped[swapped.index("-o") + 1] = str(copy)
    r = _run(*swapped)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert s["stages"]["original"]["cached"] and s["stages"]["compress"]["unreachable"]
    assert "smallest latency reachable" in s["stages"]["compress"]["skipped"]
    assert s["stages"]["recover"]["skipped"] and not s["error"]
    assert {c["model"] for c in s["candidates"]} == {"original"}
    fastest = min(s["candidates"], key=lambda c: c["latency_ms"])
    assert s["delivered"]["candidate"] == fastest["id"] and s["budget_met"] is False
    assert any(n.startswith("Nothing was compressed: the smallest latency") for n in s["notes"])
    assert (copy / "deploy").is_dir() and s["bundle"]["predicts"] is True
    allowed = _run(*swapped, "--allow-miss")  # every stage reused: only the verdict changes
    assert allowed.returncode == 0, allowed.stderr[-2000:]


# --------------------------------------------------------------------------- the rule, on made-up figures
def _cand(model, precision, ms, acc, macs, size):
    from presso.pipeline.candidates import label

    return {"id": f"{model}-{precision}", "label": label(model, precision), "model": model, "precision": precision,
            "latency_ms": ms, "accuracy": acc, "macs": macs, "size_bytes": size}  # fmt: skip


def _four(fp32=1.0, int8=0.35, cfp32=0.6, cint8=0.2, acc=(0.95, 0.95, 0.94, 0.94)):
    return [
        _cand("original", "fp32", fp32, acc[0], 100, 400),
        _cand("original", "int8", int8, acc[1], 100, 100),
        _cand("compressed", "fp32", cfp32, acc[2], 50, 200),
        _cand("compressed", "int8", cint8, acc[3], 50, 50),
    ]


def test_rule_delivers_the_fastest_within_bound_and_budget():
    from presso.pipeline.candidates import select

    chosen, why = select(_four(), max_drop=0.02, latency_ms=None, target_macs=0.5)
    assert chosen["id"] == "compressed-int8" and "fastest" in why
    # the compressed INT8 loses 5 points: the quantized original is as fast as the accurate compressed FP32 and wins
    chosen, why = select(_four(acc=(0.95, 0.95, 0.94, 0.90)), max_drop=0.02, latency_ms=None, target_macs=0.5)
    assert chosen["id"] == "original-int8" and "loses 5.0 points" in why
    # a tie within 5% goes to the original; so does a slower compressed model
    for cint8 in (0.34, 0.4):
        chosen, why = select(_four(cint8=cint8), max_drop=0.02, latency_ms=None, target_macs=0.5)
        assert chosen["id"] == "original-int8" and "compression did not beat quantization alone" in why
    # INT8 slower than FP32 (a tiny model): FP32 is delivered
    chosen, _ = select(_four(fp32=0.1, int8=0.12, cfp32=0.1, cint8=0.12), max_drop=0.02, latency_ms=None,
                       target_macs=0.5)  # fmt: skip
    assert chosen["id"] == "original-fp32"


def test_rule_never_delivers_a_compressed_model_slower_and_less_accurate_than_the_quantized_original():
    from presso.pipeline.candidates import select

    # both compressed candidates lose 2.5 points (over the 2-point bound: a miss of a quarter bound), and the
    # compressed INT8 is slower than the original merely quantized, which keeps 100% of MACs (a miss of one budget):
    # nothing meets both; the closest is the compressed INT8, but the quantized original beats it on both counts
    cands = _four(cint8=0.37, acc=(0.95, 0.95, 0.925, 0.925))
    chosen, why = select(cands, max_drop=0.02, latency_ms=None, target_macs=0.5)
    assert chosen["id"] == "original-int8" and chosen["accuracy_ok"] and not chosen["budget_ok"], why
    assert why.startswith("no candidate meets both") and "delivered instead" in why


def test_rule_delivers_the_closest_when_none_meets_both():
    from presso.pipeline.candidates import select

    # latency budget 0.25 ms: only the compressed INT8 meets it, half a point over the 2-point bound (a miss of a
    # quarter of the bound) -- closer than the quantized original, 40% over the budget: the bound is breached
    cands = _four(acc=(0.95, 0.95, 0.94, 0.925))
    chosen, why = select(cands, max_drop=0.02, latency_ms=0.25, target_macs=None)
    assert chosen["id"] == "compressed-int8" and not chosen["accuracy_ok"] and chosen["budget_ok"]
    assert why.startswith("no candidate meets both")
    # far over the bound (15 points): the quantized original is closer, and misses the budget
    chosen, _ = select(_four(acc=(0.95, 0.95, 0.9, 0.8)), max_drop=0.02, latency_ms=0.25, target_macs=None)
    assert chosen["id"] == "original-int8" and chosen["accuracy_ok"] and not chosen["budget_ok"]


def test_report_plots_only_trained_search_candidates():
    from presso.report import _trained_pareto

    skipped = {"skipped": "predicted over budget", "state": "PRUNED"}
    rows = [
        {"predicted_ms": 1.0, "proxy_top1": 0.9, "trained": True, "state": "COMPLETE"},
        {"predicted_ms": 2.0, "proxy_top1": None, **skipped},
        {"predicted_ms": 3.0, "proxy_top1": 0.1, **skipped},
    ]
    assert _trained_pareto({"pareto": rows}) == [(1.0, 0.9)]


def test_cli_miss_is_a_red_line_and_exit_3_unless_allowed(monkeypatch, tmp_path):
    """A delivered model that breaches the accuracy bound: the console says so in red and the run exits 3;
    with --allow-miss it exits 0 (the pipeline itself is stubbed: the figures are made up)."""
    from typer.testing import CliRunner

    import presso.pipeline
    from presso.cli import app
    from presso.pipeline import RunResult

    runner = CliRunner()

    def fake_run(data, cfg, *, output_dir, **kw):
        line = "Accuracy: 0.9500 -> 0.9200, a drop of 3.00 points (bound 2): BREACHED."
        cands = [{**c, "accuracy_ok": c["id"] != "compressed-int8", "budget_ok": True, "accuracy_drop_points": 0.0}
                 for c in _four()]  # fmt: skip
        figures = {"delivered": {"candidate": "compressed-int8", "label": "compressed INT8"}, "budget_met": True,
                   "accuracy_bound_met": False, "headline": ["Delivered: compressed INT8.", line], "notes": [],
                   "candidates": cands, "stages": {}, "budget": {"device": "local"}, "bundle": None, "data": data,
                   "config": asdict(cfg), "seconds": 1.0, "error": None}  # fmt: skip
        return RunResult(output_dir=Path(output_dir), figures=figures)

    monkeypatch.setattr(presso.pipeline, "run", fake_run)
    args = ["run", "--data", DATA, "--model", "presso:resnet8", "--target-macs", "0.5", "-o", str(tmp_path / "o")]
    r = runner.invoke(app, args)
    assert r.exit_code == 3, r.output
    assert "BREACHED" in r.output and "misses the accuracy bound" in r.output and "--allow-miss" in r.output
    r = runner.invoke(app, [*args, "--allow-miss"])
    assert r.exit_code == 0, r.output


def _find_chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _chromium() -> str:
    found = _find_chromium()
    if found is None:  # reached only in CI (see the skipif below), where a missing browser is a failure
        raise AssertionError("Chromium not found: install Debian's chromium package (.ci/run does).")
    return found


# Outside CI a machine without Chromium skips this one test with the reason; in CI (CI=true) it must run.
@pytest.mark.skipif(
    _find_chromium() is None and not os.environ.get("CI"),
    reason="Chromium is not installed (apt-get install chromium); CI installs it and runs this test",
)
def test_report_renders_in_headless_chromium(model_run, tmp_path):
    out, _, _, _ = model_run
    report = out / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    assert 'id="stages"' in text and 'id="accuracy-plot"' in text and 'id="channels-plot"' in text
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", f"--screenshot={shot}", "--window-size=1200,2600", report.as_uri()]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr
    assert "CONSOLE" not in r.stderr and "Uncaught" not in r.stderr
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    pixels = list(img.getdata())

    def near(rgb, tol=12):
        return sum(all(abs(p[i] - rgb[i]) <= tol for i in range(3)) for p in pixels)

    assert near((246, 247, 249), 2) > 2000  # table header cells (#f6f7f9)
    assert near((45, 114, 210), 20) > 200  # the plots' blue: the original's markers and the kept-channel bars
    assert near((15, 153, 96), 20) > 50  # the compressed model's markers (and the headline's green)


def test_a_detection_run_bounds_map_points_and_shows_boxes(tmp_path):
    """``run --task detect``: a tiny YOLO on shapes-det, compressed to half its MACs; accuracy is mAP50-95."""
    pytest.importorskip("ultralytics")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two threads per process on the two shared cores crawl
    args = ["run", "--data", "shapes-det", "--task", "detect", "--model", "ultralytics:yolov8n.yaml", "--model-arg",
            "scale=[0.33,0.0625,1024]", "--model-arg", "reg_max=8", "--target-macs", "0.5", "--train-epochs", "10",
            "--recover-epochs", "4", "--max-accuracy-drop", "0.05", "--threads", "1", "--db",
            str(tmp_path / "lat.db"), "-o", str(out), "--json"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "presso", *args], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert r.returncode == _expected_exit(s), r.stderr[-2000:]
    assert s["accuracy"]["metric"] == "map50_95"
    st = s["stages"]
    assert st["original"]["map50_95"] > 0.0 and 0.45 <= st["compress"]["macs_ratio"] <= 0.55
    assert st["recover"]["map50_95"] > st["compress"]["map50_95"]  # distillation recovered what pruning cost
    for c in s["candidates"]:  # every candidate scored by mAP after conversion, on the held-out images
        assert 0.0 <= c["accuracy"] <= 1.0 and c["accuracy_source"].startswith("converted"), c
    assert s["bundle"]["predicts"] is True  # the bundle's boxes are ONNX Runtime's
    assert "--batch-size 16" in " ".join(s["commands"])  # the detection recipe, written as it ran
    html = (out / "report.html").read_text()
    assert "mAP50-95" in html and "Detections on held-out images" in html
    assert html.count('class="example"') == len(st["deploy"]["examples"]) == 4
    # where its architecture stands: yolov8n.yaml is in the tested list; both whole lists are in the report
    arch = st["original"]["architecture"]
    assert arch["status"] == "tested" and arch["row"] == "yolov8n.yaml" and len(arch["supported"]) >= 40
    assert "Ultralytics architectures" in html and html.count("<tr><td>yolo") >= len(arch["supported"]) - 3


def test_run_starts_from_a_weights_file_and_records_it(tmp_path):
    """``run --weights PATH``: the original is built, loaded from the file (recorded in its card with the file's
    SHA-256) and fine-tuned; the reproduce command names the file; --weights without --model, or given twice, is one
    ConfigError."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    import presso
    from presso.errors import ConfigError
    from presso.models.weights import fit_to_data
    from presso.pipeline import RunConfig
    from presso.pipeline.stages import Job

    bundle = presso.load_data(DATA)
    kwargs, _ = fit_to_data("presso:resnet8", {}, classes=10, channels=1)
    torch.manual_seed(1)
    donor = presso.load_model("presso:resnet8", **kwargs)
    weights = tmp_path / "donor.safetensors"
    save_file(donor.state_dict(), str(weights))
    # with a weights file the model is built as the user says (--model-arg), never refitted to the data
    cfg = RunConfig(model="presso:resnet8", model_args=kwargs, weights=str(weights), target_macs=0.5, train_epochs=1)
    job = Job(bundle, cfg, tmp_path / "out", None)
    record = job.original()
    card = json.loads((tmp_path / "out" / "original" / "model" / "presso.json").read_text())
    assert card["source"]["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"--weights {weights}" in record["commands"][0]
    with pytest.raises(ConfigError, match="apply to a given --model"):
        RunConfig(weights=str(weights), latency_ms=1.0)
    with pytest.raises(ConfigError, match="Give the weights once"):
        RunConfig(model="torchvision:resnet18", model_args={"weights": "DEFAULT"}, weights="w.pt", target_macs=0.5)


@pytest.mark.parametrize(("drop", "text"), [(0.55, "a drop of 0.55 points"), (-0.55, "a gain of 0.55 points")])
def test_the_headline_says_drop_or_gain(drop, text):
    from presso.pipeline.summary import headline

    s = {"delivered": {"label": "compressed INT8", "why": "fastest", "path": "deploy/model.onnx"},
         "speedup_vs_original_fp32": 2.0,
         "speedup_vs_baseline_int8": 1.2, "size_ratio": 0.3, "size_ratio_vs_baseline_int8": 0.9,
         "accuracy_drop_points": drop, "accuracy_bound_met": True, "budget": {"device": "local", "text": "met"},
         "accuracy": {"original": 0.95, "final": 0.95 - drop / 100, "max_drop": 0.02}}  # fmt: skip
    line = next(x for x in headline(s) if x.startswith("Accuracy:"))
    assert f"{text} (bound 2): within." in line and "-" not in line.split(",")[1]


def test_qat_epochs_add_a_learned_int8_candidate(tmp_path):
    """--qat-epochs: the recovered model fine-tuned with QAT is one more INT8 candidate, converted from what it
    learned (no fallback), measured beside the others; its commands reproduce it."""
    out = tmp_path / "out"
    r = _run("--data", DATA, "--model", "presso:resnet8", "--target-macs", "0.7", "-o", str(out), "--train-epochs",
             "3", "--recover-epochs", "1", "--qat-epochs", "1", "--max-accuracy-drop", "0.5", "--threads", "1",
             "--db", str(tmp_path / "lat.db"), "--json")  # fmt: skip
    assert r.returncode in (0, 3), r.stderr
    s = json.loads(r.stdout)
    c = _cands(s)
    assert {"original-fp32", "original-int8", "compressed-fp32", "compressed-int8", "compressed-qat-int8"} <= set(c)
    qat = c["compressed-qat-int8"]
    assert qat["label"] == "compressed-qat INT8" and qat["path"] == "deploy/qat/model.onnx"
    assert qat["latency_ms"] > 0 and qat["accuracy"] > 0.3 and not qat["fallback_layers"]
    card = json.loads((out / "deploy" / "qat-model" / "presso.json").read_text())
    assert card["recipe"][-1]["type"] == "qat"
    assert any("--qat" in cmd for cmd in s["commands"]) or any(
        "--qat" in cmd for st in s["stages"].values() if isinstance(st, dict) for cmd in st.get("commands", [])
    )
    bad = _run("--data", DATA, "--model", "presso:resnet8", "--target-macs", "0.7", "-o", str(tmp_path / "x"),
               "--qat-epochs", "1", "--precision", "fp16")  # fmt: skip
    assert bad.returncode == 2 and "--qat-epochs fine-tunes for INT8" in bad.stderr
