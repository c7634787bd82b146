"""Recovering a pruned model: CE fine-tuning vs distillation with labels vs label-free output matching.

For each dataset: train a small ResNet from scratch, prune it (uniform L2) to ~50% of its MACs, then fine-tune the
pruned model for the same number of epochs three ways -- (a) cross-entropy only, (b) KD from the original with
labels, (c) label-free output matching (labels removed) -- and print accuracy before/after and seconds, side by side.

    python benchmarks/recover.py                         # Fashion-MNIST (Debian's dataset-fashion-mnist) + shapes
    python benchmarks/recover.py --quick                 # a smoke run on small subsets
    python benchmarks/recover.py --out benchmarks/results/recover.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import presso
from presso.compress import PruneConfig
from presso.data import load_data
from presso.train import TrainConfig


def prune_to(model, spec, target: float, tol: float = 0.02):
    """Uniform L2 pruning, with the channel ratio bisected until MACs land within `tol` of `target` (kept share)."""
    lo, hi, best = 0.05, 0.9, None
    for _ in range(12):
        mid = (lo + hi) / 2
        result = presso.compress(model, spec, PruneConfig(ratio=mid, criterion="l2", round_to=None))
        kept = result.after["macs"] / result.before["macs"]
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (result, kept, mid)
        if abs(kept - target) <= tol:
            break
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    return best


def run_dataset(name, data, model_kwargs, epochs, ft_epochs, subset, log, keep: Path | None = None):
    bundle = load_data(data)
    if subset:
        bundle.train = bundle.train.subset(np.arange(min(subset, len(bundle.train))))
    print(f"\n== {name}: {bundle.describe()}", flush=True)
    torch.manual_seed(0)
    saved = keep / name if keep else None
    t0 = time.perf_counter()
    if saved is not None and (saved / "presso.json").is_file():  # reuse a model trained by an earlier run
        original = presso.load_model(saved)
        print(f"reusing {saved}")
    else:
        model = presso.load_model("presso:small_resnet", num_classes=bundle.num_classes, **model_kwargs)
        base = presso.train(model, bundle, TrainConfig(epochs=epochs, batch_size=128), output_dir=saved,
                            progress=_epoch_printer("train"))  # fmt: skip
        original = base.model
    train_s = time.perf_counter() - t0
    acc0 = presso.train.evaluate(original, bundle).val_top1
    spec = presso.InputSpec.parse(original.presso_card.input_spec)
    pruned, kept, ratio = prune_to(original, spec, 0.5)
    acc_pruned = presso.train.evaluate(pruned.model, bundle).val_top1
    row = {
        "dataset": name,
        "data": data,
        "model": model_kwargs,
        "train_epochs": epochs,
        "train_seconds": round(train_s, 1),
        "original_top1": acc0,
        "macs_kept": round(kept, 4),
        "prune_ratio": round(ratio, 4),
        "pruned_top1": acc_pruned,
        "ft_epochs": ft_epochs,
    }
    print(f"original top-1 {acc0:.4f}; pruned (ratio {ratio:.3f}, MACs kept {kept:.3f}) top-1 {acc_pruned:.4f}")
    unlabeled = dataclasses.replace(bundle, classes=None)
    modes = [("ce", bundle, None), ("kd", bundle, original), ("label_free", unlabeled, original)]
    ft_cfg = TrainConfig(epochs=ft_epochs, batch_size=128, lr=1e-3, warmup=0.0)
    for mode, data_for, teacher in modes:
        student = copy.deepcopy(pruned.model)
        t0 = time.perf_counter()
        presso.train(student, data_for, ft_cfg, teacher=teacher, progress=_epoch_printer(mode))
        seconds = time.perf_counter() - t0
        acc = presso.train.evaluate(student, bundle, teacher=original)
        row[f"{mode}_top1"] = acc.val_top1
        row[f"{mode}_agreement"] = acc.agreement
        row[f"{mode}_seconds"] = round(seconds, 1)
        print(f"  {mode:10s} top-1 {acc.val_top1:.4f} (agreement {acc.agreement:.4f}) in {seconds:.0f}s", flush=True)
    log(row)
    return row


def _epoch_printer(tag: str):
    def show(event):
        if event.stage == "epoch":
            shown = {k: event.info.get(k) for k in ("epoch", "train_loss", "val_top1", "val_loss", "seconds")}
            print(f"  [{tag}] {shown}", flush=True)

    return show


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subsets and few epochs (smoke run)")
    ap.add_argument("--only", choices=["fashion-mnist", "shapes"], default=None)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON row per dataset")
    ap.add_argument("--keep", type=Path, default=None, help="save trained originals here; reuse them when present")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }
    print(json.dumps(machine))

    def log(row):
        row = {**row, **machine, "date": time.strftime("%Y-%m-%d")}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    rows = []
    sets = [
        ("fashion-mnist", "fashion-mnist", {"in_chans": 1, "widths": [16, 32, 64], "blocks": [1, 1, 1]}),
        ("shapes", "shapes:n=4000,size=24,classes=8,noise=0.12", {"widths": [16, 32, 64], "blocks": [1, 1, 1]}),
    ]
    for name, data, kwargs in sets:
        if args.only and args.only != name:
            continue
        epochs, ft = (2, 1) if args.quick else (args.epochs, args.ft_epochs)
        subset = 3000 if args.quick else None
        try:
            rows.append(run_dataset(name, data, kwargs, epochs, ft, subset, log, keep=args.keep))
        except presso.PressoError as e:  # e.g. Fashion-MNIST not installed: record and go on
            print(f"{name}: {e}", file=sys.stderr)
            log({"dataset": name, "error": str(e)})
    print("\n| dataset | original | pruned (MACs kept) | CE | KD | label-free | epochs (train / fine-tune) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['original_top1']:.4f} | {r['pruned_top1']:.4f} ({r['macs_kept']:.2f}) | "
            f"{r['ce_top1']:.4f} | {r['kd_top1']:.4f} | {r['label_free_top1']:.4f} | "
            f"{r['train_epochs']} / {r['ft_epochs']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
