"""Hardware-aware search on Fashion-MNIST within a latency and a parameter budget, against hand-picked baselines and
the published table.

    python benchmarks/search.py [--search-minutes 60] [--max-params 100000] [--epochs 30] [--corr-models 5]
                                [--corr-epochs 10] [--threads 2] [--out benchmarks/results/search.jsonl]

1. Baselines (hand-picked small models): timm's MobileNetV3-Small at 0.5 width and Presso's ResNet-8, both for
   1x28x28 inputs. Their ONNX Runtime latency on this machine sets the latency budget (the larger of the two); the
   parameter budget is the published table's small class (< 100K).
2. ``presso.search`` on Fashion-MNIST within both budgets for ``--search-minutes`` of wall time (profiling this
   machine's kernels first when the latency database has none): trials trained vs skipped, the winner trained for
   ``--epochs`` on the 60,000 training images. The search scores candidates on images held out of the training
   split: the 10,000 test images judge the final models only.
3. The proxy's rank correlation with full training: ``--corr-models`` trained candidates, spread over the proxy's
   ranking, each trained on the full training split for ``--corr-epochs``; Spearman's rho (proxy top-1 vs test top-1).
4. The baselines trained with the same recipe and epochs; every model measured side by side at the end (3 rounds,
   median). Test top-1 is the model after its last epoch (no epoch picked on the test set); the best epoch is shown
   beside it.

On 2 cores a full run takes longer than one working session (the baselines' 30 epochs alone: ~80 min), and their
training does not depend on the search. ``--baselines-only FILE`` trains them and writes their rows (with the exact
recipe); ``--baselines-from FILE`` then takes their accuracy from there -- refused unless the recipe, epochs and
data match -- while their latency is still measured side by side with the searched model in the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

PUBLISHED = [  # from the Fashion-MNIST benchmark table (zalandoresearch/fashion-mnist README), test accuracy
    ("2 Conv + pooling (< 100K params)", 0.925),
    ("MobileNet", 0.950),
    ("ResNet18", 0.949),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-minutes", type=float, default=60.0, help="Wall time of the search phase.")
    parser.add_argument("--trials", type=int, default=10_000, help="Upper bound; the time budget stops it first.")
    parser.add_argument("--max-params", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=30, help="Training epochs of the winner and the baselines.")
    parser.add_argument("--proxy-epochs", type=int, default=2)
    parser.add_argument("--proxy-fraction", type=float, default=0.25)
    parser.add_argument("--corr-models", type=int, default=5, help="Candidates trained fully for the rank check.")
    parser.add_argument("--corr-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, help="Budget (default: the slower baseline's measured latency).")
    parser.add_argument("--db", default="/tmp/presso-search-bench/latency.db")
    parser.add_argument("--work", type=Path, default=Path("/tmp/presso-search-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search.jsonl"))
    parser.add_argument("--baselines-only", type=Path, help="Train the baselines only; write their rows here.")
    parser.add_argument("--baselines-from", type=Path, help="The baselines' accuracy from a --baselines-only file.")
    args = parser.parse_args()

    import optuna
    import torch
    from scipy.stats import spearmanr

    import presso
    from presso.bench import benchmark, predict_latency, profile_device
    from presso.bench.env import cpu_model
    from presso.errors import ConfigError
    from presso.models.figures import model_figures
    from presso.search import get_space
    from presso.search.nas import SearchConfig
    from presso.train import TrainConfig

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.work / f"run-{stamp}"
    shape = "1,1,28,28"
    data = "fashion-mnist"
    started = time.time()
    with open("/proc/loadavg") as fh:
        load_at_start = fh.read().split()[:3]

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def latency(model, input_shape=shape) -> float:
        r = benchmark(model, "local", input_shape=input_shape, threads=args.threads, repeat=200, max_seconds=20,
                      db=args.db)  # fmt: skip
        return float(r.latency_ms["median"])

    def figures(model, input_shape=shape):
        return model_figures(model, (torch.randn(*map(int, input_shape.split(","))),))

    def recipe(epochs: int, image_size=None) -> dict:
        return {**dataclasses.asdict(TrainConfig(epochs=epochs, seed=0, image_size=image_size)), "data": data}

    def full_train(model, name: str, epochs: int, image_size=None) -> dict:
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=epochs, seed=0, image_size=image_size)
        out = presso.train(model, data, cfg, output_dir=run_dir / name)
        hist = out.history
        return {"top1_last": hist[-1].get("val_top1"), "top1_best": out.best.get("val_top1"),
                "best_epoch": out.best.get("epoch"), "train_s": round(time.perf_counter() - t0, 1),
                "model": out.model}  # fmt: skip

    baselines = {
        "MobileNetV3-Small 0.5 (timm)": ("timm:mobilenetv3_small_050", {"in_chans": 1, "num_classes": 10}),
        "ResNet-8 (presso)": ("presso:resnet8", {"in_chans": 1, "num_classes": 10}),
    }

    def baseline_rows() -> list[dict]:
        """The baselines trained with the winner's recipe, or read from a --baselines-only file of that recipe."""
        want = recipe(args.epochs)
        if args.baselines_from:
            rows = [json.loads(line) for line in args.baselines_from.read_text().splitlines() if line.strip()]
            last = {r["model"]: r for r in rows if r.get("recipe") == want and r.get("model") in baselines}
            missing = sorted(set(baselines) - set(last))
            if missing:
                raise SystemExit(f"{args.baselines_from} has no row for {missing} trained with {want}")
            for r in last.values():
                log(f"baseline {r['model']}: accuracy from {args.baselines_from} (trained {r.get('trained_at')})")
            return [{k: v for k, v in last[name].items() if k not in ("recipe",)} for name in baselines]
        rows = []
        for name, (src, kw) in baselines.items():
            out = full_train(presso.load_model(src, **kw), name[:8].replace(" ", "_"), args.epochs)
            f = figures(out["model"])
            rows.append({"model": name, "params": f["params"], "macs": f["macs"], "input": shape,
                         "top1_last": out["top1_last"], "top1_best": out["top1_best"], "epochs": args.epochs,
                         "train_s": out["train_s"]})  # fmt: skip
            log(f"baseline: {rows[-1]}")
        return rows

    if args.baselines_only:
        stamp_rows = [{**r, "recipe": recipe(args.epochs), "trained_at": time.strftime("%Y-%m-%d %H:%M"),
                       "cpu": cpu_model(), "threads": args.threads} for r in baseline_rows()]  # fmt: skip
        args.baselines_only.parent.mkdir(parents=True, exist_ok=True)
        with args.baselines_only.open("a") as fh:
            for r in stamp_rows:
                fh.write(json.dumps(r, default=str) + "\n")
        log(f"baselines written to {args.baselines_only}")
        return

    try:
        predict_latency(presso.load_model("presso:resnet8", in_chans=1), "local", input_shape=shape,
                        threads=args.threads, db=args.db)  # fmt: skip
    except ConfigError:
        t0 = time.perf_counter()
        info = profile_device("local", threads=args.threads, db=args.db)
        log(
            f"profiled this machine: {info.kernels} kernels and {info.networks} calibration networks in "
            f"{time.perf_counter() - t0:.0f}s"
        )

    base_ms = {name: latency(presso.load_model(src, **kw)) for name, (src, kw) in baselines.items()}
    budget = args.latency_ms or max(base_ms.values())
    log(f"baseline latencies {base_ms}; budget {budget:.4f} ms and {args.max_params} parameters")

    # ---- the search, within its wall-time budget, then the winner's full training
    t0 = time.perf_counter()
    cfg = SearchConfig(latency_ms=budget, max_params=args.max_params, trials=args.trials,
                       time_budget_min=args.search_minutes, proxy_epochs=args.proxy_epochs,
                       proxy_fraction=args.proxy_fraction, final_epochs=args.epochs, threads=args.threads)  # fmt: skip
    phases: dict[str, float] = {}
    last_epoch: dict = {}  # the winner's last epoch, as its training reports it

    def progress(e):
        if e.stage == "trial":
            i = e.info
            what = f"skipped ({i.get('why')})" if i.get("skipped") else f"proxy top-1 {i['top1']:.4f}"
            log(f"trial {i['number']}: {what}, predicted {i['predicted_ms']:.3f} ms")
        elif e.stage == "train" and "search_s" not in phases:  # the winner's training starts: the search is over
            phases["search_s"] = time.perf_counter() - t0
            log(f"search phase over after {phases['search_s'] / 60:.1f} min; training the winner")
        elif e.stage == "epoch":
            last_epoch.clear()
            last_epoch.update(e.info)
            log(f"  epoch {e.done:g}/{e.total} {json.dumps(e.info, default=str)[:160]}")

    result = presso.search(data, cfg, output_dir=run_dir / "search", db=args.db, progress=progress)
    wall = time.perf_counter() - t0
    best = result.best
    searched = presso.load_model(best["model_dir"])
    f = figures(searched, best["input_shape"])
    rows = [{
        "model": "Presso search (mobilenet space)", "params": f["params"], "macs": f["macs"],
        "input": best["input_shape"], "top1_last": last_epoch.get("val_top1"),
        "top1_best": best["val_top1"], "epochs": args.epochs, "search_s": round(phases.get("search_s", wall), 1),
        "search_and_train_s": round(wall, 1), "trials": result.counts, "budget_ms": round(budget, 4),
        "max_params": args.max_params, "arch": best["arch"], "proxy_top1": best["proxy_top1"],
    }]  # fmt: skip
    log(f"searched: {json.dumps(rows[0], default=str)}")

    # ---- the proxy's rank correlation with full training
    study = optuna.load_study(study_name=result.study, storage=result.storage)
    trained = sorted({t.user_attrs["arch_key"]: t for t in study.trials if t.user_attrs.get("trained")}.values(),
                     key=lambda t: -t.values[0])  # fmt: skip
    k = min(args.corr_models, len(trained))
    picks = [trained[round(i * (len(trained) - 1) / max(k - 1, 1))] for i in range(k)]
    space = get_space("mobilenet", (28, 28), 1, 10)
    corr = []
    for t in picks:
        arch = dict(t.params)
        out = full_train(space.build(arch), f"corr-{t.number}", args.corr_epochs, space.resolution(arch))
        corr.append({"trial": t.number, "proxy_top1": round(t.values[0], 4), "full_top1_last": out["top1_last"],
                     "params": t.user_attrs.get("params_count"), "train_s": out["train_s"]})  # fmt: skip
        log(f"rank check: {corr[-1]}")
    rho = spearmanr([c["proxy_top1"] for c in corr], [c["full_top1_last"] for c in corr]).statistic if k > 2 else None
    rows[0]["proxy_rank_correlation"] = {"spearman": None if rho is None else round(float(rho), 3),
                                         "epochs": args.corr_epochs, "models": corr}  # fmt: skip

    # ---- the baselines, same recipe
    rows += baseline_rows()

    # ---- every model measured again, side by side, at the end
    models = {rows[0]["model"]: (searched, best["input_shape"])}
    models.update({r["model"]: (presso.load_model(baselines[r["model"]][0], **baselines[r["model"]][1]), shape)
                   for r in rows[1:]})  # fmt: skip
    for _ in range(3):
        for r in rows:
            m, s = models[r["model"]]
            r.setdefault("latency_runs_ms", []).append(latency(m, s))
    with open("/proc/loadavg") as fh:
        load_at_end = fh.read().split()[:3]
    header = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "threads": args.threads,
              "load_start": load_at_start, "load_end": load_at_end,
              "wall_s": round(time.time() - started, 1)}  # fmt: skip
    for r in rows:
        runs = sorted(r["latency_runs_ms"])
        r["latency_ms"] = runs[len(runs) // 2]
        r["latency_spread_pct"] = round(100 * (runs[-1] - runs[0]) / runs[len(runs) // 2], 1)
        print(json.dumps(r, default=str), flush=True)
    print(f"# published (test accuracy): {PUBLISHED}", flush=True)
    print(f"# {header}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps({"header": header}) + "\n")
        for r in rows:
            fh.write(json.dumps({"date": header["date"], **r}, default=str) + "\n")


if __name__ == "__main__":
    main()
