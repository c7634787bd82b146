"""INT8 vs FP32 on this CPU: latency (ONNX Runtime), speed-up, file size, and accuracy for a trained CNN.

For each torchvision model (random init: timings do not depend on the weights) the same FP32 ONNX file is quantized
twice with the same calibration images -- by ONNX Runtime's default static QDQ recipe (``quantize_static`` with its
defaults: per-tensor int8 weights and activations) and by ``presso convert --precision int8`` (pre-processing,
per-channel weights, uint8 activations, reduce-range on CPUs without VNNI, automatic precision) -- and the three
files are timed side by side, interleaved round by round, so the machine's noise hits them alike. Figures are
medians; the spread across rounds is printed as the noise.

With ``--fashion-model DIR`` (a Presso model directory trained on Fashion-MNIST, e.g. ``presso train presso:resnet8
--model-arg in_chans=1 --data fashion-mnist -o DIR``) that model goes through every INT8 recipe -- ORT's default,
Presso's SNR default, +CLE/bias correction, accuracy-aware, QAT, LiteRT INT8 -- scored on the 10,000 test images
and timed side by side (``fashion_variants``).

    python benchmarks/quantize.py --fashion-model DIR [--models resnet18,mobilenet_v2,efficientnet_b0] \
        [--threads 1] [--rounds 5] [--qat-epochs 2] [--out benchmarks/results/quantize.jsonl]
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


def run_model(name, model, shape, calib, args, out_rows):
    import presso
    from presso.convert import ConvertConfig, Int8Config

    with tempfile.TemporaryDirectory(prefix="presso-qbench-") as tmp:
        tmp = Path(tmp)
        eval_samples = 0
        t0 = time.perf_counter()
        fp32 = presso.convert(model, shape, ConvertConfig(eval_samples=0), output_dir=tmp / "fp32")
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
        print(json.dumps(row), flush=True)
        out_rows.append(row)


def fashion_variants(model_dir: Path, args, out_rows) -> None:
    """The trained Fashion-MNIST model through every INT8 recipe, scored on the 10,000 test images and timed side
    by side: FP32; ONNX Runtime's default static recipe; Presso's default (output SNR, automatic precision); the
    same with equalization and bias correction forced on; accuracy-aware (``--max-accuracy-drop``); QAT (``train
    --qat`` for ``--qat-epochs``, distilled from the FP32 model); LiteRT full-integer INT8 (timed on LiteRT's own
    interpreter, a different runtime: its latency is not in the ONNX Runtime comparison)."""
    import copy

    import presso
    from presso.convert import ConvertConfig, Int8Config
    from presso.convert.accuracy import Scorer
    from presso.convert.launcher import _ort_runner
    from presso.data import calibration_batches, load_data
    from presso.data.images import Preprocess
    from presso.train import TrainConfig

    model = presso.load_model(str(model_dir))
    spec = model.presso_card.input_spec
    pp = Preprocess.from_json(model.presso_card.preprocess)
    bundle = load_data("fashion-mnist")
    scorer = Scorer("classify", bundle, pp, 10000, 1)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="presso-qbench-") as tmp:
        tmp = Path(tmp)

        def convert(name, cfg, m=model):
            t0 = time.perf_counter()
            r = presso.convert(m, spec, cfg, output_dir=tmp / name, calib="fashion-mnist")
            rows[name] = {"path": r.path, "bytes": r.size_bytes, "convert_seconds": round(time.perf_counter() - t0, 1)}
            if r.int8 is not None:
                rows[name] |= {"fallback_layers": len(r.int8.fallback_layers), "output_snr_db": r.int8.output_snr_db,
                               "settings": r.int8.settings}  # fmt: skip
            print(f"  [{name}] converted in {rows[name]['convert_seconds']} s", flush=True)
            return r

        def int8(**kw):
            return ConvertConfig(precision="int8", eval_samples=0, int8=Int8Config(samples=args.samples, **kw))

        convert("fp32", ConvertConfig(eval_samples=0))
        x = torch.cat(calibration_batches("fashion-mnist", presso.InputSpec.parse(spec), batches=1,
                                          batch_size=args.samples, preprocess=pp))  # fmt: skip
        default = ort_default(rows["fp32"]["path"], tmp / "ort_default.onnx", x.numpy())
        rows["ort_default"] = {"path": default, "bytes": default.stat().st_size}
        convert("presso_snr", int8())
        convert("presso_cle_bc", int8(equalize="on", bias_correction="on"))
        convert(
            "presso_accuracy_aware",
            ConvertConfig(
                precision="int8", eval_samples=2000, int8=Int8Config(samples=args.samples, max_accuracy_drop=0.003)
            ),
        )
        if args.qat_epochs:
            t0 = time.perf_counter()
            qat = presso.train(copy.deepcopy(model), bundle, TrainConfig(epochs=args.qat_epochs, qat=True,
                                                                         batch_size=128))  # fmt: skip
            rows_qat_train = round(time.perf_counter() - t0, 1)
            r = convert("qat", ConvertConfig(precision="int8", eval_samples=0), qat.model)
            rows["qat"]["train_seconds"] = rows_qat_train
            qat.model.eval()
            with torch.no_grad():
                rows["qat"]["pytorch_fake_quant_top1"] = round(scorer.score(lambda i: [qat.model(i[0]).numpy()]), 4)
        litert = None
        try:
            litert = convert("litert_int8", ConvertConfig(to="litert", precision="int8", eval_samples=0))
        except Exception as e:  # the extra is optional: a missing runtime is a row, not a crash
            rows["litert_int8"] = {"error": f"{type(e).__name__}: {e}"}
        for name, r in rows.items():
            if "path" not in r:
                continue
            if str(r["path"]).endswith(".tflite"):
                from presso.convert.litert import LiteRTRunner

                run = LiteRTRunner(r["path"]).run
            else:
                run = _ort_runner(r["path"])
            r["top1"] = round(scorer.score(run), 4)
            print(f"  [{name}] top-1 {r['top1']}", flush=True)
        onnx_paths = {k: r["path"] for k, r in rows.items() if "path" in r and str(r["path"]).endswith(".onnx")}
        times = time_interleaved(onnx_paths, x[:1].numpy(), args.rounds, args.runs, args.threads)
        for k, t in times.items():
            rows[k] |= {"ort_ms": t["median_ms"], "noise_pct": t["spread_pct"],
                        "speedup": round(times["fp32"]["median_ms"] / t["median_ms"], 2)}  # fmt: skip
        if litert is not None:
            from presso.bench.api import benchmark

            b = benchmark(str(litert.path), runtime="litert", threads=args.threads, repeat=args.runs * args.rounds,
                          db=False)  # fmt: skip
            rows["litert_int8"] |= {"litert_ms": b.latency_ms["median"], "noise_pct": b.noise_pct}
    fp32_top1 = rows["fp32"]["top1"]
    for name, r in rows.items():
        r.pop("path", None)
        if "top1" in r:
            r["top1_change_points"] = round(100 * (r["top1"] - fp32_top1), 2)
        row = {"model": f"fashion-mnist CNN ({model_dir.name})", "variant": name, "input": spec,
               "threads": args.threads, "test_images": 10000, **r}  # fmt: skip
        print(json.dumps(row, default=str), flush=True)
        out_rows.append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-model", type=Path, help="Presso model directory trained on Fashion-MNIST.")
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision models at 224x224.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="Timed runs per round (after warm-up).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128, help="Calibration images.")
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tune of the Fashion model (0: none).")
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
        fashion_variants(args.fashion_model, args, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), **row}, default=str) + "\n")


if __name__ == "__main__":
    main()
