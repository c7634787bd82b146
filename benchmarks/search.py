"""Hardware-aware search on Fashion-MNIST at a latency budget on this CPU, against hand-picked baselines.

    python benchmarks/search.py [--trials 20] [--epochs 10] [--threads 2] [--out benchmarks/results/search.jsonl]

1. Baselines (hand-picked models of similar latency): timm's MobileNetV3-Small at 0.5 width and Presso's ResNet-8,
   both for 1x28x28 inputs. Their ONNX Runtime latency on this machine sets the budget (the larger of the two), so the
   searched model must be at equal or lower measured latency.
2. ``presso.search`` on Fashion-MNIST at that budget (profiling this machine's kernels first when the latency
   database has none): trials trained vs skipped by the predictor, wall time, the winner trained for ``--epochs``.
3. The baselines trained with the same recipe and epochs; every model measured side by side at the end.
The searched model is placed against Fashion-MNIST's published table (accuracy vs parameters).
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10, help="Training epochs of the winner and the baselines.")
    parser.add_argument("--proxy-epochs", type=int, default=2)
    parser.add_argument("--proxy-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, help="Budget (default: the slower baseline's measured latency).")
    parser.add_argument("--db", default="/tmp/presso-search-bench/latency.db")
    parser.add_argument("--work", type=Path, default=Path("/tmp/presso-search-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search.jsonl"))
    args = parser.parse_args()

    import presso
    from presso.bench import benchmark, predict_latency, profile_device
    from presso.errors import ConfigError
    from presso.models.figures import model_figures
    from presso.search.nas import SearchConfig
    from presso.train import TrainConfig

    args.work.mkdir(parents=True, exist_ok=True)
    shape = "1,1,28,28"
    data = "fashion-mnist"

    def latency(model, input_shape=shape) -> float:
        r = benchmark(model, "local", input_shape=input_shape, threads=args.threads, repeat=200, max_seconds=20,
                      db=args.db)  # fmt: skip
        return float(r.latency_ms["median"])

    def figures(model, input_shape=shape):
        import torch

        return model_figures(model, (torch.randn(*map(int, input_shape.split(","))),))

    baselines = {
        "MobileNetV3-Small 0.5 (timm)": ("timm:mobilenetv3_small_050", {"in_chans": 1, "num_classes": 10}),
        "ResNet-8 (presso)": ("presso:resnet8", {"in_chans": 1, "num_classes": 10}),
    }
    rows = []
    try:
        predict_latency(presso.load_model("presso:resnet8", in_chans=1), "local", input_shape=shape,
                        threads=args.threads, db=args.db)  # fmt: skip
    except ConfigError:
        t0 = time.perf_counter()
        info = profile_device("local", threads=args.threads, db=args.db)
        print(f"# profiled this machine: {info.kernels} kernels in {time.perf_counter() - t0:.0f}s", flush=True)

    untrained = {name: presso.load_model(src, **kw) for name, (src, kw) in baselines.items()}
    base_ms = {name: latency(m) for name, m in untrained.items()}
    budget = args.latency_ms or max(base_ms.values())
    print(f"# baseline latencies {base_ms}; budget {budget:.4f} ms", flush=True)

    t0 = time.perf_counter()
    cfg = SearchConfig(latency_ms=budget, trials=args.trials, proxy_epochs=args.proxy_epochs,
                       proxy_fraction=args.proxy_fraction, final_epochs=args.epochs, threads=args.threads)  # fmt: skip
    out = args.work / f"search-{int(time.time())}"
    result = presso.search(data, cfg, output_dir=out, db=args.db,
                           progress=lambda e: print(f"  {e.stage} {e.done:g}/{e.total} {e.info}", flush=True)
                           if e.stage != "train" else None)  # fmt: skip
    wall = time.perf_counter() - t0
    best = result.best
    searched = presso.load_model(best["model_dir"])
    rows.append({
        "model": "Presso search (mobilenet space)", "params": figures(searched, best["input_shape"])["params"],
        "macs": figures(searched, best["input_shape"])["macs"], "input": best["input_shape"],
        "top1": best["val_top1"], "epochs": args.epochs, "search_wall_s": round(wall, 1),
        "trials": result.counts, "budget_ms": round(budget, 4), "arch": best["arch"],
    })  # fmt: skip

    for name, (src, kw) in baselines.items():
        model = presso.load_model(src, **kw)
        t1 = time.perf_counter()
        trained = presso.train(model, data, TrainConfig(epochs=args.epochs, seed=0), output_dir=args.work / name[:8]
                               + str(int(time.time())))  # fmt: skip
        f = figures(trained.model)
        rows.append({"model": name, "params": f["params"], "macs": f["macs"], "input": shape,
                     "top1": trained.best.get("val_top1"), "epochs": args.epochs,
                     "train_s": round(time.perf_counter() - t1, 1)})  # fmt: skip

    # every model measured again, side by side, at the end
    models = {rows[0]["model"]: (searched, best["input_shape"])}
    models.update({r["model"]: (presso.load_model(baselines[r["model"]][0], **baselines[r["model"]][1]), shape)
                   for r in rows[1:]})  # fmt: skip
    for _ in range(3):
        for r in rows:
            m, s = models[r["model"]]
            r.setdefault("latency_runs_ms", []).append(latency(m, s))
    for r in rows:
        runs = sorted(r["latency_runs_ms"])
        r["latency_ms"] = runs[len(runs) // 2]
        r["latency_spread_pct"] = round(100 * (runs[-1] - runs[0]) / runs[len(runs) // 2], 1)
        print(json.dumps(r, default=str), flush=True)
    print(f"# published (test accuracy): {PUBLISHED}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"date": time.strftime("%Y-%m-%d"), **r}, default=str) + "\n")


if __name__ == "__main__":
    main()
