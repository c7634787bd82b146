"""INT8 vs FP32 on this CPU: latency (ONNX Runtime), speed-up, file size, and accuracy for a trained CNN.

For each model the same FP32 ONNX file is quantized twice with the same calibration images -- by ONNX Runtime's
default static QDQ recipe (``quantize_static`` with its defaults: per-tensor int8 weights and activations) and by
``presso convert --precision int8`` (pre-processing, per-channel weights, uint8 activations, reduce-range on CPUs
without VNNI, automatic precision) -- and the three files are timed side by side, interleaved round by round, so the
machine's noise hits them alike. Figures are medians; the spread across rounds is printed as the noise.

    python benchmarks/quantize.py --fashion-model DIR [--rounds 5] [--out benchmarks/results/quantize.jsonl]

DIR is a Presso model directory trained on Fashion-MNIST (``benchmarks/recover.py --keep DIR`` writes one); without
it, only ResNet-18 and MobileNetV2 (random init; timings do not depend on the weights) are measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_name() -> str:
    from presso.bench.env import cpu_model  # the one /proc/cpuinfo reader (``presso env``)

    return cpu_model()


def ort_default(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """ONNX Runtime's default static QDQ recipe, on the same calibration images."""
    from onnxruntime.quantization import quantize_static

    from presso.convert.quantize import _Reader, feeds_for

    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(fp32), str(out), _Reader(feeds_for(fp32, [calibration])))
    return out


def time_interleaved(paths: dict[str, Path], x: np.ndarray, rounds: int, runs: int, threads: int) -> dict:
    from presso.models.onnx import session

    sessions = {k: session(p, threads=threads) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(5):
            s.run(None, feeds[k])
    medians: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            samples = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                samples.append((time.perf_counter() - t0) * 1000)
            medians[k].append(statistics.median(samples))
    return {
        k: {
            "median_ms": round(statistics.median(v), 3),
            "spread_pct": round(100 * (max(v) - min(v)) / statistics.median(v), 1),
        }
        for k, v in medians.items()
    }


def run_model(name, model, shape, calib, args, out_rows, fashion=False):
    import presso
    from presso.convert import ConvertConfig, Int8Config

    with tempfile.TemporaryDirectory(prefix="presso-qbench-") as tmp:
        tmp = Path(tmp)
        eval_samples = 10000 if fashion else 0
        t0 = time.perf_counter()
        fp32 = presso.convert(
            model, shape, ConvertConfig(eval_samples=0), output_dir=tmp / "fp32", calib=calib if fashion else None
        )
        cfg = ConvertConfig(precision="int8", eval_samples=eval_samples, int8=Int8Config(samples=args.samples))
        int8 = presso.convert(model, shape, cfg, output_dir=tmp / "int8", calib=calib)
        seconds = time.perf_counter() - t0
        from presso.data import calibration_batches
        from presso.data.images import Preprocess

        card = getattr(model, "presso_card", None)
        pp = Preprocess.from_json(card.preprocess) if card is not None and card.preprocess else None
        spec = presso.InputSpec.parse(shape)
        calibration = torch.cat(calibration_batches(calib, spec, batches=1, batch_size=args.samples, preprocess=pp))
        default = ort_default(fp32.path, tmp / "ort_default.onnx", calibration[: args.samples].numpy())
        x = calibration[:1].numpy()
        times = time_interleaved(
            {"fp32": fp32.path, "ort_default_int8": default, "presso_int8": int8.path},
            x,
            args.rounds,
            args.runs,
            args.threads,
        )
        row = {
            "model": name,
            "input": shape,
            "threads": args.threads,
            "fp32_ms": times["fp32"]["median_ms"],
            "ort_default_int8_ms": times["ort_default_int8"]["median_ms"],
            "presso_int8_ms": times["presso_int8"]["median_ms"],
            "speedup_ort_default": round(times["fp32"]["median_ms"] / times["ort_default_int8"]["median_ms"], 2),
            "speedup_presso": round(times["fp32"]["median_ms"] / times["presso_int8"]["median_ms"], 2),
            "noise_pct": {k: v["spread_pct"] for k, v in times.items()},
            "fp32_bytes": fp32.size_bytes,
            "ort_default_int8_bytes": default.stat().st_size,
            "presso_int8_bytes": int8.size_bytes,
            "output_snr_db": round(int8.int8.output_snr_db, 2),
            "fallback_layers": int8.int8.fallback_layers,
            "settings": int8.int8.settings,
            "convert_seconds": round(seconds, 1),
        }
        if fashion and int8.accuracy:
            from presso.convert.launcher import _accuracy, _ort_runner
            from presso.data import load_data

            bundle = load_data(calib)
            default_top1, _ = _accuracy(_ort_runner(default), bundle, pp, 10000, 1)
            row.update(
                {
                    "fp32_top1": int8.accuracy["fp32_top1"],
                    "presso_int8_top1": int8.accuracy["converted_top1"],
                    "ort_default_int8_top1": round(default_top1, 4),
                    "test_images": int8.accuracy["samples"],
                }
            )
        print(json.dumps(row), flush=True)
        out_rows.append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-model", type=Path, help="Presso model directory trained on Fashion-MNIST.")
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision models at 224x224.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="Timed runs per round (after warm-up).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128, help="Calibration images.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize.jsonl"))
    args = parser.parse_args()

    import presso

    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {args.threads} threads, onnxruntime {__import__('onnxruntime').__version__}", flush=True)
    rows: list[dict] = []
    for name in [m for m in args.models.split(",") if m]:
        model = presso.load_model(f"torchvision:{name}")
        try:
            # random-init weights: calibration on Gaussian inputs (timings do not depend on the values)
            run_model(f"torchvision:{name}", model, "1,3,224,224", "random", args, rows)
        except Exception as e:  # a failure is a row, and the run goes on
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), flush=True)
    if args.fashion_model:
        model = presso.load_model(str(args.fashion_model))
        spec = model.presso_card.input_spec
        run_model(f"fashion-mnist CNN ({args.fashion_model.name})", model, spec, "fashion-mnist", args, rows, True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), **row}) + "\n")


if __name__ == "__main__":
    main()
