"""Latency predictor accuracy on this machine: profile it, then predict and measure models it was not profiled on.

1. Profile (``presso.profile_device``): the full calibration kernel set (single-kernel ONNX models built with
   onnx.helper) and the calibration networks (seeded synthetic networks, ``presso.bench.networks``; no network below
   is one of them) are measured with ONNX Runtime on this CPU and stored in a fresh latency database.
2. For each model -- torchvision and timm networks at several resolutions, pruned variants (Presso's L2 pruning),
   and samples of a MobileNetV2/MNASNet width x resolution space -- export it through the project's ONNX path,
   predict it from the database (no run), and measure it in --rounds rounds (median of --repeat runs each). The
   machine is shared: before and after each round a reference convolution is timed, and a round counts only when
   the reference is within --quiet (10%) of its best time (the run waits up to --max-wait for that). The measured
   latency is the median of the quiet rounds (of all rounds, flagged, when none was quiet); the spread of the
   rounds is the benchmark's own noise. Error = predicted / measured - 1.

    python benchmarks/latency_predictor.py --threads 1 --out benchmarks/results/latency_predictor.jsonl

``--keep-models DIR`` keeps the exported models; ``--rescore RESULTS --keep-models DIR --db DB``
then predicts them again with the current predictor code from the same profile, against the same measurements
(nothing measured: for judging a predictor change on a busy machine).

Prints the share of models within +-10% and +-20% of measured, the median absolute error, and the noise
(median in-run block spread, and the median difference between the two measurements of a model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

Entry = tuple[str, str, object]  # (name, input shape, builder)


def _tv(name: str, **kw):
    import torchvision

    return lambda: getattr(torchvision.models, name)(**kw)


def _timm(name: str, **kw):
    import timm

    return lambda: timm.create_model(name, pretrained=False, **kw)


def _pruned(build, shape: str, ratio: float):
    def make():
        import presso
        from presso.compress import PruneConfig

        torch.manual_seed(0)
        return presso.compress(build(), shape, PruneConfig(ratio=ratio, criterion="l2")).model

    return make


def _decomposed(build, shape: str, method: str):
    def make():
        import presso
        from presso.compress import DecomposeConfig

        torch.manual_seed(0)
        return presso.compress(build(), shape, DecomposeConfig(method=method)).model

    return make


def _searched(seed: int, image: int, classes: int = 10):
    """A candidate of the searcher's own space (what a search predicts before training), sampled at random."""

    def make():
        import optuna

        from presso.search.space import get_space

        space = get_space("mobilenet", (image, image), 3, classes)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        return space.build(space.sample(trial))

    return make


def models(seed: int = 0) -> list[Entry]:
    import torchvision

    s224 = "1,3,224,224"
    out: list[Entry] = []
    for name in [
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "mnasnet0_5",
        "mnasnet1_0",
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "regnet_x_400mf",
        "regnet_y_400mf",
        "squeezenet1_1",
    ]:
        out.append((f"tv:{name}@224", s224, _tv(name)))
    out.append(("tv:efficientnet_b1@240", "1,3,240,240", _tv("efficientnet_b1")))
    for name, res in [
        ("resnet18", 160),
        ("mobilenet_v2", 160),
        ("mobilenet_v2", 128),
        ("mobilenet_v3_large", 192),
        ("efficientnet_b0", 192),
        ("mnasnet1_0", 192),
        ("resnet50", 160),
        ("regnet_x_800mf", 224),
    ]:
        out.append((f"tv:{name}@{res}", f"1,3,{res},{res}", _tv(name)))
    for name, res in [
        ("lcnet_050", 224),
        ("lcnet_100", 224),
        ("tinynet_a", 192),
        ("tinynet_e", 106),
        ("efficientnet_lite0", 224),
        ("mobilenetv2_050", 224),
        ("ghostnet_100", 224),
        ("resnet10t", 224),
        ("mnasnet_small", 224),
        ("fbnetc_100", 224),
        ("spnasnet_100", 224),
        ("semnasnet_075", 224),
    ]:
        out.append((f"timm:{name}@{res}", f"1,3,{res},{res}", _timm(name)))
    for name, ratio in [
        ("resnet18", 0.3),
        ("resnet18", 0.5),
        ("mobilenet_v2", 0.3),
        ("mobilenet_v2", 0.5),
        ("efficientnet_b0", 0.3),
        ("mobilenet_v3_large", 0.4),
        ("resnet50", 0.5),
        ("regnet_x_400mf", 0.3),
    ]:
        out.append((f"pruned:{name}-l2-{ratio}@224", s224, _pruned(_tv(name), s224, ratio)))
    for name, method in [("resnet18", "tucker"), ("resnet34", "tucker"), ("vgg11_bn", "tucker"),
                         ("resnet18", "cp")]:  # fmt: skip
        out.append((f"decomposed:{name}-{method}@224", s224, _decomposed(_tv(name), s224, method)))
    for i in range(6):  # the searcher's candidates, at the sizes a search on small images uses
        image = (32, 64, 96)[i % 3]
        out.append((f"searched:mobilenet-space#{i}@{image}", f"1,3,{image},{image}", _searched(i, image)))
    rng = random.Random(seed)  # samples of a width x resolution space (Once-for-All style)
    for _ in range(6):
        w, r = rng.choice([0.35, 0.5, 0.75, 1.0, 1.3]), rng.choice([128, 160, 192, 224])
        out.append(
            (f"space:mobilenet_v2(w={w})@{r}", f"1,3,{r},{r}", lambda w=w: torchvision.models.MobileNetV2(width_mult=w))
        )
    for _ in range(2):
        a, r = rng.choice([0.5, 0.75, 1.3]), rng.choice([160, 192, 224])
        out.append((f"space:mnasnet(a={a})@{r}", f"1,3,{r},{r}", lambda a=a: torchvision.models.MNASNet(a)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (profiling and runs)")
    ap.add_argument("--db", default="/tmp/presso-latency-bench/latency.db", help="latency database file")
    ap.add_argument(
        "--reuse-profile", "--reuse-calibration", action="store_true", help="keep the database's profiled kernels"
    )
    ap.add_argument("--repeat", type=int, default=40, help="timed runs per measurement round")
    ap.add_argument("--rounds", type=int, default=3, help="measurement rounds per model")
    ap.add_argument("--quiet", type=float, default=1.1, help="a round counts when the probe is within this factor")
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per round")
    ap.add_argument("--final-pass", type=float, default=600.0, help="seconds for measuring busy models again")
    ap.add_argument("--limit", type=int, default=0, help="only the first N models")
    ap.add_argument("--only", default="", help="only models whose name contains this")
    ap.add_argument("--out", default="benchmarks/results/latency_predictor.jsonl")
    ap.add_argument("--stop-at", type=float, default=0.0, help="Unix time after which no new model starts")
    ap.add_argument("--summarize", default="", help="only print the summary of the last run in this JSONL file")
    ap.add_argument("--keep-models", default="", help="keep each exported model here (what --rescore predicts again)")
    ap.add_argument(
        "--rescore",
        default="",
        help="predict again, from --db's profile, the models a run kept in --keep-models, against the measurements "
        "of the last run in this JSONL file (nothing is measured: for judging a predictor change)",
    )
    args = ap.parse_args()
    if args.rescore:
        rescore(Path(args.rescore), Path(args.keep_models), args)
        return
    if args.summarize:
        print(json.dumps(summarize(last_run(Path(args.summarize)), remembered_reference(args.threads)), indent=1))
        return

    from presso.bench.calibration import QuietProbe
    from presso.bench.env import device_fingerprint
    from presso.bench.kernels import decompose
    from presso.bench.latency_db import LatencyDB
    from presso.bench.predictor import LatencyPredictor
    from presso.bench.profile import device_env, profile_device
    from presso.bench.runner import export_with_feed
    from presso.models import InputSpec

    probe = QuietProbe(args.threads)  # one reference for profiling and measurements alike
    db_path = Path(args.db)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if not args.reuse_profile:
        for suffix in ("", "-wal", "-shm"):
            Path(str(db_path) + suffix).unlink(missing_ok=True)
        t0 = time.time()
        cal = profile_device(
            threads=args.threads,
            size="full",
            db=str(db_path),
            quiet=probe,
            progress=lambda e: (
                print(f"  profiled {e.done}/{e.total} kernel models", flush=True) if e.done % 200 == 0 else None
            ),
        )
        print(
            f"profiled {cal.kernels} kernels and {cal.networks} calibration networks in {time.time() - t0:.0f}s "
            f"({args.threads} threads; "
            f"{cal.windows_redone} of {cal.windows} windows measured again, {cal.windows_busy} still "
            "taken on a busy machine)",
            flush=True,
        )
    env = device_env("local", args.threads)
    fp = device_fingerprint("local", env, "fp32")
    t0 = time.time()
    predictor = LatencyPredictor.from_db(LatencyDB(str(db_path)), device="local", device_fp=fp)
    print(
        f"predictor fitted in {time.time() - t0:.1f}s; overhead {predictor.per_run_ms * 1000:.1f} us/run "
        f"{predictor.per_node_ms * 1000:+.2f} us/node",
        flush=True,
    )

    entries = [e for e in models() if args.only in e[0]]
    if args.limit:
        entries = entries[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "run": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": env["cpu"],
        "threads": args.threads,
        "ort": env["runtime_version"],
        "python": platform.python_version(),
        "repeat": args.repeat,
    }
    rows: list[dict] = []
    pending: list[tuple] = []
    keep = Path(args.keep_models) if args.keep_models else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    with out.open("a") as log, tempfile.TemporaryDirectory(prefix="presso-latbench-") as tmp:
        log.write(json.dumps({"header": header}) + "\n")
        for i, (name, shape, build) in enumerate(entries):
            if args.stop_at and time.time() > args.stop_at:
                print(f"stopping: --stop-at reached; {len(entries) - i} models not run", flush=True)
                break
            row = {"model": name, "input_shape": shape}
            try:
                torch.manual_seed(0)
                model = build().eval()
                inputs = InputSpec.parse(shape).example_inputs()
                path, feed = export_with_feed(model, inputs, (keep or Path(tmp)) / _file_name(name))
                t0 = time.perf_counter()
                kernels = decompose(path, [tuple(x.shape) for x in inputs])
                pred = predictor.predict_kernels(kernels)
                predict_s = time.perf_counter() - t0
                rounds = [measure_round(probe, path, feed, args) for _ in range(args.rounds)]
                profiled = profile_kernels(path, args.threads)
                pending.append((row, path, feed))
                row.update(
                    predicted_ms=pred.latency_ms,
                    kernels=pred.kernels,
                    looked_up=pred.looked_up,
                    estimated=pred.estimated,
                    unknown=pred.unknown,
                    unknown_families=pred.unknown_families,
                    predict_s=round(predict_s, 3),
                    profiled=profiled,
                    families=by_family(predictor, kernels, profiled),
                )
                finish(row, rounds, probe.best, args.quiet)
                show(row)
            except Exception as e:  # a failing model is a row with its error; the run goes on
                row["error_message"] = f"{type(e).__name__}: {e}"
                print(f"{name:40s} FAILED {row['error_message'][:200]}", flush=True)
                traceback.print_exc()
            rows.append(row)
            log.write(json.dumps({k: v for k, v in row.items() if k != "rounds"}) + "\n")
            log.flush()
        # rounds are judged against the quietest reference time of the whole run; models without a quiet round
        # are measured again while time allows
        deadline = time.time() + args.final_pass
        if args.stop_at:
            deadline = min(deadline, args.stop_at + 300)
        for row, _, _ in pending:
            finish(row, row["rounds"], probe.best, args.quiet)
        for row, path, feed in pending:
            if row["quiet_rounds"] == 0 and time.time() < deadline:
                extra = [measure_round(probe, path, feed, args) for _ in range(args.rounds)]
                finish(row, row["rounds"] + extra, probe.best, args.quiet)
                print("again:", end=" ")
                show(row)
        for row, _, _ in pending:
            finish(row, row["rounds"], probe.best, args.quiet)
            log.write(json.dumps({"final": row}) + "\n")
        summary = summarize(rows, probe.best)
        summary["header"] = header
        log.write(json.dumps({"summary": summary}) + "\n")
    print(json.dumps(summary, indent=1))


def _file_name(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in model) + ".onnx"


def rescore(results: Path, kept: Path, args) -> None:
    """The last run's models predicted again by the current predictor code, from the same profile, against the
    same measurements: a predictor change judged without measuring anything again. Printed twice: fitted on the
    isolated kernels only, and with the calibration networks' in-context kernels (what ``from_db`` uses)."""
    from presso.bench.env import device_fingerprint
    from presso.bench.kernels import decompose
    from presso.bench.latency_db import LatencyDB
    from presso.bench.predictor import LatencyPredictor
    from presso.bench.profile import device_env

    env = device_env("local", args.threads)
    fp = device_fingerprint("local", env, "fp32")
    db = LatencyDB(args.db)
    kernels, overhead = db.rows(device_fp=fp, kind="kernel"), db.rows(device_fp=fp, kind="overhead")
    variants = {
        "isolated kernels only": LatencyPredictor(kernels, overhead, device="local", device_fp=fp),
        "with in-context kernels": LatencyPredictor.from_db(db, device="local", device_fp=fp),
    }
    measured = [r for r in last_run(results) if "error" in r and (not args.only or args.only in r["model"])]
    graphs = {}
    for row in measured:
        shape = tuple(int(d) for d in row["input_shape"].split(","))
        graphs[row["model"]] = decompose(kept / _file_name(row["model"]), [shape], threads=args.threads)
    for label, predictor in variants.items():
        rows = []
        for row in measured:
            pred = predictor.predict_kernels(graphs[row["model"]])
            row = {**row, "predicted_ms": pred.latency_ms, "looked_up": pred.looked_up, "kernels": pred.kernels}
            if row.get("profiled"):
                row["families"] = by_family(predictor, graphs[row["model"]], row["profiled"])
            row["error"] = round(pred.latency_ms / row["measured_ms"] - 1, 4)
            print(f"{row['model']:40s} measured {row['measured_ms']:9.3f} ms  predicted {row['predicted_ms']:9.3f} "
                  f"ms  error {row['error']:+7.1%}", flush=True)  # fmt: skip
            rows.append(row)
        print(f"## {label}\n" + json.dumps(summarize(rows), indent=1), flush=True)


def profile_kernels(path: Path, threads: int) -> dict[str, float]:
    """Each node's time in this model under ONNX Runtime's profiler, as the calibration networks are profiled
    (first quartile of 12 runs, caches evicted between runs): what the per-family errors compare against."""
    from presso.bench.calibration import CacheFlush, measure_spec_local

    times, _ = measure_spec_local(path.read_bytes(), threads, 12, False, CacheFlush(4.0))
    return {name: round(ms, 5) for name, ms in times.items()}


def by_family(predictor, kernels, profiled: dict[str, float]) -> dict[str, list[float]]:
    """Per kernel family: [predicted ms, profiled ms], summed over the model's kernels the profiler timed."""
    out: dict[str, list[float]] = {}
    for k, (ms, _) in zip(kernels, predictor.kernel_ms(kernels), strict=True):
        if k.name in profiled:
            pair = out.setdefault(k.family, [0.0, 0.0])
            pair[0] += ms
            pair[1] += profiled[k.name]
    return {f: [round(p, 4), round(m, 4)] for f, (p, m) in out.items()}


def measure_round(probe, path, feed, args) -> dict:
    """Wait for a quiet machine, measure, and record the reference kernel's time before and after."""
    from presso.bench.runner import measure_onnx

    probe.wait(tolerance=args.quiet, max_seconds=args.max_wait)
    before = probe.last_ms
    m = measure_onnx(path, feed, threads=args.threads, warmup=5, repeat=args.repeat, max_seconds=60)
    probe.factor()
    return {
        "median_ms": m.median_ms,
        "noise_pct": m.noise_pct,
        "reference_ms": [round(before, 4), round(probe.last_ms, 4)],
        "load": round(os.getloadavg()[0], 2),
    }


def finish(row: dict, rounds: list[dict], best: float, tolerance: float) -> None:
    """Measured latency: median of the quiet rounds (all rounds when none was quiet); error; spread of rounds."""
    quiet = [r for r in rounds if max(r["reference_ms"]) <= tolerance * best]
    used = quiet or rounds
    meds = [r["median_ms"] for r in used]
    measured = statistics.median(meds)
    row.update(
        rounds=rounds,
        quiet_rounds=len(quiet),
        measured_ms=round(measured, 4),
        error=round(row["predicted_ms"] / measured - 1, 4),
        repeat_diff=round((max(meds) - min(meds)) / measured, 4),
        noise_pct=[r["noise_pct"] for r in used],
    )


def show(row: dict) -> None:
    print(
        f"{row['model']:40s} measured {row['measured_ms']:9.3f} ms  predicted {row['predicted_ms']:9.3f} ms  "
        f"error {row['error']:+7.1%}  (rounds differ {row['repeat_diff']:.1%}, {row['quiet_rounds']}/"
        f"{len(row['rounds'])} quiet; kernels {row['kernels']}: {row['looked_up']} table, {row['estimated']} "
        f"regression, {row['unknown']} unknown)",
        flush=True,
    )


def remembered_reference(threads: int) -> float | None:
    """The quietest reference-kernel time seen on this machine (kept by QuietProbe under PRESSO_HOME)."""
    import onnxruntime as ort

    from presso.bench.env import cpu_model, presso_home

    try:
        data = json.loads((presso_home() / "quiet_reference.json").read_text())
        return float(data[f"{cpu_model()}|{ort.__version__}|{threads}"])
    except (OSError, ValueError, KeyError):
        return None


def last_run(path: Path) -> list[dict]:
    """The model rows of the last run in a results file (final verdicts where the run got that far)."""
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "header" in rec:
            rows = {}
        elif "final" in rec:
            rows[rec["final"]["model"]] = rec["final"]
        elif "model" in rec:
            rows[rec["model"]] = rec
    return list(rows.values())


def corrected_error(row: dict, reference_best_ms: float) -> float | None:
    """Error against the measurement scaled by the reference kernel's slowdown in the same round (other processes'
    time slices slow every kernel alike): an estimate of what the model would take on a quiet machine."""
    rounds = row.get("rounds") or []
    if not rounds or not reference_best_ms:
        return None
    quiet_ms = [r["median_ms"] * reference_best_ms / statistics.fmean(r["reference_ms"]) for r in rounds]
    return round(row["predicted_ms"] / statistics.median(quiet_ms) - 1, 4)


def summarize(rows: list[dict], reference_best_ms: float | None = None) -> dict:
    ok = [r for r in rows if "error" in r]
    if not ok:
        return {"models": 0, "failed": len(rows)}
    errs = [abs(r["error"]) for r in ok]
    diffs = [r["repeat_diff"] for r in ok]
    by_group: dict[str, list[float]] = {}
    for r in ok:
        by_group.setdefault(r["model"].split(":")[0], []).append(abs(r["error"]))
    return {
        "models": len(ok),
        "failed": len(rows) - len(ok),
        "within_10": round(sum(e <= 0.10 for e in errs) / len(ok), 3),
        "within_20": round(sum(e <= 0.20 for e in errs) / len(ok), 3),
        "median_abs_error": round(statistics.median(errs), 4),
        "mean_error": round(statistics.fmean(r["error"] for r in ok), 4),
        "noise_in_run_median_pct": round(statistics.median(n for r in ok for n in r["noise_pct"]), 2),
        "noise_between_runs_median": round(statistics.median(diffs), 4),
        "models_with_a_quiet_round": sum(r["quiet_rounds"] > 0 for r in ok),
        "noise_between_runs_max": round(max(diffs), 4),
        "by_group_median_abs_error": {g: round(statistics.median(v), 4) for g, v in by_group.items()},
        "by_kernel_family": _family_errors(ok),
        "kernels_looked_up_share": round(sum(r["looked_up"] for r in ok) / sum(r["kernels"] for r in ok), 3),
        **_corrected(ok, reference_best_ms),
    }


def _family_errors(ok: list[dict]) -> dict:
    """Per kernel family, over the models that run it: the median absolute error of its summed prediction against
    its summed profiled time, and its share of all profiled kernel time."""
    errs: dict[str, list[float]] = {}
    time_ms: dict[str, float] = {}
    for r in ok:
        for fam, (pred, meas) in (r.get("families") or {}).items():
            time_ms[fam] = time_ms.get(fam, 0.0) + meas
            if meas > 0:
                errs.setdefault(fam, []).append(pred / meas - 1)
    total = sum(time_ms.values()) or 1.0
    return {
        f: {"models": len(e), "median_abs_error": round(statistics.median(abs(x) for x in e), 4),
            "median_error": round(statistics.median(e), 4), "time_share": round(time_ms[f] / total, 4)}
        for f, e in sorted(errs.items(), key=lambda kv: -time_ms[kv[0]])
    }  # fmt: skip


def _corrected(ok: list[dict], reference_best_ms: float | None) -> dict:
    quiet = [abs(r["error"]) for r in ok if r.get("quiet_rounds")]
    out: dict = {"quiet_models": len(quiet)}
    if quiet:
        out.update(
            quiet_within_10=round(sum(e <= 0.1 for e in quiet) / len(quiet), 3),
            quiet_within_20=round(sum(e <= 0.2 for e in quiet) / len(quiet), 3),
            quiet_median_abs_error=round(statistics.median(quiet), 4),
        )
    corr = [c for c in (corrected_error(r, reference_best_ms or 0) for r in ok) if c is not None]
    if corr:
        errs = [abs(c) for c in corr]
        out.update(
            corrected_models=len(corr),
            corrected_within_10=round(sum(e <= 0.1 for e in errs) / len(errs), 3),
            corrected_within_20=round(sum(e <= 0.2 for e in errs) / len(errs), 3),
            corrected_median_abs_error=round(statistics.median(errs), 4),
            corrected_mean_error=round(statistics.fmean(corr), 4),
        )
    return out


if __name__ == "__main__":
    main()
