"""Compression quality at equal MACs, and whether fewer MACs means faster.

Part A (accuracy, Fashion-MNIST): a small ResNet (or --arch) is trained (or loaded with --original), then compressed
to 50% and 25% of its MACs by (a) uniform L2 pruning (grouped convolutions losing whole groups; or, "uniform,
grouped=width", the same channels of every group), (b) recommended per-layer ratios (LAMP x sensitivity on calibration
data; and without data, LAMP per MAC alone), (c) Tucker-2 decomposition (VBMF ranks, offset searched), (d) both;
accuracy right after compression and after the same short fine-tune (KD from the original, with labels) is printed
side by side.

Part B (speed, ONNX Runtime on this CPU): MobileNetV2, EfficientNet-B0, RegNetX-400MF and ResNet-18 at 224x224
(random init), compressed to ~1/4 of their MACs by uniform L2 pruning (Torch-Pruning's recipe: no channel rounding;
and rounded to 8), by latency-aware ratios (``Target(macs=..., device="local")``: of allocations weighted by
measured time per MAC, the fastest here), and under a latency target of 1/4 of the original's measured time
(``Target(latency_ms=..., device="local")``; uniform ratio, or latency-aware: the allocation keeping the most MACs
within the budget). Every variant is exported to ONNX and timed with --threads intra-op
threads in interleaved rounds next to its original (--repeat rounds of 10 back-to-back runs each, medians), and
speedup / MACs-reduction is printed.

    python benchmarks/compress_quality.py                       # both parts
    python benchmarks/compress_quality.py --part speed --repeat 30
    python benchmarks/compress_quality.py --part accuracy --original out/fm --save-original out/fm
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import presso
from presso.compress import DecomposeConfig, PruneConfig, Target
from presso.data import calibration_batches, load_data
from presso.train import TrainConfig

METHODS = {
    "uniform": lambda: dict(config=PruneConfig(criterion="l2"), recommend=False),
    "uniform, grouped=width": lambda: dict(config=PruneConfig(criterion="l2", grouped="width"), recommend=False),
    "recommended": lambda: dict(config=PruneConfig(criterion="l2"), recommend=True, calib=True),
    "recommended, no data": lambda: dict(config=PruneConfig(criterion="l2"), recommend=True),
    "decompose": lambda: dict(config=DecomposeConfig("tucker", rank="vbmf")),
    "both": lambda: dict(config=[PruneConfig(criterion="l2"), DecomposeConfig("tucker", rank="vbmf")], calib=True),
}


def part_accuracy(args, log) -> list[dict]:
    data = load_data("fashion-mnist")
    if args.original and Path(args.original).is_dir():
        original = presso.load_model(args.original)
    else:
        torch.manual_seed(0)
        extra = {"widths": [16, 32, 64]} if args.arch == "presso:small_resnet" else {}
        model = presso.load_model(args.arch, num_classes=10, in_chans=1, **extra)
        original = presso.train(model, data, TrainConfig(epochs=args.epochs), progress=_epochs("train")).model
        if args.save_original:
            presso.save_model_dir(original, args.save_original)
    top1 = presso.evaluate(original, data).val_top1
    spec = presso.InputSpec.parse("1,1,28,28")
    pp = presso.data.Preprocess.from_json(original.presso_card.preprocess)
    calib = calibration_batches("fashion-mnist", spec, batches=4, batch_size=32, preprocess=pp)
    rows = []
    print(f"original top-1 {top1:.4f}")
    for share in args.targets:
        for name, make in METHODS.items():
            if args.methods and name not in args.methods:
                continue
            m = make()
            t0 = time.perf_counter()
            try:
                kwargs = dict(recommend=m.get("recommend", True), calib=calib if m.get("calib") else None)
                r = presso.compress(original, spec, m["config"], target=Target(macs=share), **kwargs)
            except presso.PressoError as e:
                row = {"part": "accuracy", "target": share, "method": name, "error": str(e)}
                print(row)
                log(row)
                continue
            seconds = time.perf_counter() - t0
            after = presso.evaluate(r.model, data).val_top1
            student = copy.deepcopy(r.model)
            ft = TrainConfig(epochs=args.ft_epochs, lr=1e-3, warmup=0.0)
            presso.train(student, data, ft, teacher=original)
            tuned = presso.evaluate(student, data).val_top1
            row = {"part": "accuracy", "target": share, "method": name, "macs_kept": round(r.after["macs"] /
                   r.before["macs"], 4), "top1_original": top1, "top1_compressed": after, "top1_finetuned": tuned,
                   "compress_seconds": round(seconds, 1), "ft_epochs": args.ft_epochs,
                   "chosen": r.extra["target"]["search"][0]["why"].split(":")[0]}  # fmt: skip
            print(json.dumps(row), flush=True)
            log(row)
            rows.append(row)
    return rows


SPEED_MODELS = ("torchvision:mobilenet_v2", "torchvision:efficientnet_b0", "torchvision:regnet_x_400mf",
                "torchvision:resnet18")  # fmt: skip


def part_speed(args, log) -> list[dict]:
    from presso.bench.runner import measure_model

    rows = []
    shape = "1,3,224,224"
    x = presso.InputSpec.parse(shape).example_inputs()
    for source in args.models or SPEED_MODELS:
        model = presso.load_model(source)
        variants = {"original": (model, 1.0, None, None)}
        base_ms = measure_model(model, x, threads=args.threads, repeat=args.repeat, warmup=args.warmup).median_ms
        budget = base_ms * args.share
        here = dict(device="local", threads=args.threads)
        candidates = {
            "uniform L2, no rounding (Torch-Pruning's recipe)": (
                PruneConfig(round_to=None, grouped="width"), dict(target=Target(macs=args.share), recommend=False)),
            "uniform L2, channels rounded to 8, grouped convs thinned per group (grouped=width)": (
                PruneConfig(round_to=8, grouped="width"), dict(target=Target(macs=args.share), recommend=False)),
            "uniform L2, channels rounded to 8": (
                PruneConfig(round_to=8), dict(target=Target(macs=args.share), recommend=False)),
            "MACs target, latency-aware (time per MAC), rounded to 8": (
                PruneConfig(round_to=8), dict(target=Target(macs=args.share, **here), recommend=True)),
            f"latency target {args.share:g} x original, uniform ratio, rounded to 8": (
                PruneConfig(round_to=8), dict(target=Target(latency_ms=budget, tolerance=0.05, **here),
                                              recommend=False)),
            f"latency target {args.share:g} x original, latency-aware (time per MAC), rounded to 8": (
                PruneConfig(round_to=8), dict(target=Target(latency_ms=budget, tolerance=0.05, **here),
                                              recommend=True)),
        }  # fmt: skip
        for name, (config, kwargs) in candidates.items():
            if args.variants and not any(v in name for v in args.variants):
                continue
            t0 = time.perf_counter()
            try:
                r = presso.compress(model, shape, config, **kwargs)
                why = r.extra["target"]["search"][-1]["why"].split(":")[0]
                variants[name] = (r.model, r.after["macs"] / r.before["macs"], round(time.perf_counter() - t0, 1), why)
            except presso.PressoError as e:
                row = {"part": "speed", "model": source, "method": name, "error": str(e)}
                print(json.dumps(row), flush=True)
                log(row)
        times = _interleaved_ms({k: v[0] for k, v in variants.items()}, x, args)
        for name, (_, kept, seconds, why) in variants.items():
            if name == "original":
                continue
            speedup = times["original"] / times[name]
            row = {"part": "speed", "model": source, "method": name, "macs_kept": round(kept, 4),
                   "ms_original": round(times["original"], 2), "ms": round(times[name], 2),
                   "speedup": round(speedup, 3), "macs_reduction": round(1 / kept, 3),
                   "speedup_over_macs_reduction": round(speedup * kept, 3), "compress_seconds": seconds, "chosen": why,
                   "ort_threads": args.threads}  # fmt: skip
            print(json.dumps(row), flush=True)
            log(row)
            rows.append(row)
    return rows


def _interleaved_ms(models: dict, x: tuple, args, block: int = 10) -> dict[str, float]:
    """Median ONNX Runtime latency of each model, timed in interleaved rounds, so that load from other processes on
    a shared machine falls on all of them alike. In each round every model runs a block of ``block`` back-to-back
    runs in its own session (ONNX Runtime's defaults, as deployed) after two discarded ones; a model's figure is
    the median over rounds of its block medians.

    Why blocks and not one run per model per round (as before 2026-11-29 06:20 UTC): after a run ONNX Runtime's
    intra-op threads spin waiting for more work, and with several sessions alive in one process the spinning
    threads of the session that just ran steal the cores from the next one (MobileNetV2, 2 threads: 5.3 ms back to
    back, 25.8 ms when each run follows another session's). Turning spinning off instead removes that, but also
    adds a thread wake-up to every node, which is not how the model runs deployed (2.5 ms vs ~1.4 ms for a
    quarter-MACs MobileNetV2). The two discarded runs let the previous session's threads go quiet."""
    import onnxruntime as ort

    from presso.models.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for k, (name, m) in enumerate(models.items()):
            path = export_onnx(m, x, Path(tmp) / f"variant{k}.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads or 0
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            sessions[name] = (sess, {sess.get_inputs()[0].name: x[0].numpy()})
        for _ in range(args.warmup):
            for sess, feed in sessions.values():
                sess.run(None, feed)
        medians: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.repeat):
            for name, (sess, feed) in sessions.items():
                for _ in range(2):
                    sess.run(None, feed)
                samples = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    samples.append(time.perf_counter() - t0)
                medians[name].append(statistics.median(samples))
    return {name: statistics.median(v) * 1000 for name, v in medians.items()}


def _epochs(tag):
    def show(e):
        if e.stage == "epoch":
            print(f"  [{tag}] epoch {e.info['epoch']} val_top1 {e.info.get('val_top1')}", flush=True)

    return show


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["accuracy", "speed", "all"], default="all")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument(
        "--arch",
        default="presso:small_resnet",
        help="part A: the network trained (any model source "
        "taking num_classes and in_chans, e.g. timm:regnetx_002 for grouped convolutions)",
    )
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--original", help="a trained Fashion-MNIST model directory to reuse")
    ap.add_argument("--save-original", help="where to keep the model trained here")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25], help="part A: MACs shares to keep")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="part A: only these methods")
    ap.add_argument("--share", type=float, default=0.25, help="part B: MACs share / latency share to compress to")
    ap.add_argument("--models", nargs="*", help="part B: model sources (default: the four of the issue)")
    ap.add_argument("--variants", nargs="*", help="part B: only the methods whose names contain one of these")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    machine = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(machine))

    def log(row):
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(json.dumps({**row, **machine, "date": time.strftime("%Y-%m-%d")}) + "\n")

    if args.part in ("accuracy", "all"):
        part_accuracy(args, log)
    if args.part in ("speed", "all"):
        part_speed(args, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
