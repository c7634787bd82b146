"""Object detection on fashion-scenes: a YOLOv8s-like model pruned to a YOLOv8n-like model's MACs vs that n model.

Both models are built from Ultralytics' YAMLs (``ultralytics:yolov8n.yaml`` / ``yolov8s.yaml``, 10 classes, 1 input
channel) and trained with Presso's trainer on the same epochs. The s model is pruned to the n model's MACs (per-layer
ratios chosen on calibration data) and recovered by distillation from the unpruned s; a second copy is pruned to
half its MACs the same way. All four are scored on the held-out scenes (COCO mAP50-95 / mAP50), converted to ONNX
FP32 and INT8 (calibrated on the data, INT8 mAP scored on the held-out scenes), and timed side by side with ONNX
Runtime on one thread, interleaved round by round. As a check on the trainer, the n model is also trained for the
same epochs by Ultralytics' own trainer (offline, plots off, in a subprocess) and its weights scored by Presso on
the same held-out scenes.

The pruned s models see the s model's epochs and then the recovery epochs. So that their win is not just more
training, n and s are also trained from scratch for that whole budget (--equal-budget n,s, the default), and the
first two checks hold against the better of each pair. The checks it prints (PASS / MISS, as measured):
1. the pruned s beats the n trained from scratch at equal MACs (mAP50-95);
2. the s pruned to half its MACs stays within 1 mAP50-95 point of the unpruned s;
3. Presso's n is within 1 mAP50-95 point of (or above) Ultralytics' n, both scored by Presso.

    python benchmarks/detect.py --quick           # smoke run: tiny models and data, every step, ~4 minutes on 2 cores
    python benchmarks/detect.py --data fashion-scenes:n=2500,val=500 --width-scale 0.5 --epochs 6 --lr 2e-3 \
        --threads 1 --keep /tmp/det-full          # the run in docs/benchmarks.md (~33 minutes on 2 cores)

--width-scale F multiplies both models' width by F (0.5: the s-like model is YOLOv8n's size). YOLO needs image sides
divisible by 32: fashion-scenes' 144 px canvases are resized to --image-size (160, the size Ultralytics itself rounds
imgsz=144 up to) by both trainers. --threads 1 on a shared machine: two threads contending with other processes for
two cores ran several times slower than one. --keep DIR keeps every trained model under DIR (one folder per set of
settings), and a rerun with the same settings reuses them. --ultralytics-extra KEY=VALUE,... trains the n model by
Ultralytics once more with those settings changed (e.g. Presso's optimizer and learning rate), as a second reference.
Results: benchmarks/results/detect.json (not written by --quick unless --out is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALES = {"n": [0.33, 0.25, 1024], "s": [0.33, 0.50, 1024]}  # YOLOv8's [depth, width, max_channels]
MEANINGFUL_POINTS = 5.0  # a check against a model under 5 mAP50-95 points compares noise
QUICK = {
    "data": "fashion-scenes:n=96,val=32",
    "epochs": 1,
    "batch_size": 16,
    "width_scale": 0.25,
    "rounds": 3,
    "threads": 1,
}


# --------------------------------------------------------------------------- the machine
def cpu_name() -> str:
    from presso.bench.env import cpu_model  # the one /proc/cpuinfo reader (``presso env``)

    return cpu_model()


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    import onnxruntime
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        from importlib.metadata import version

        versions["ultralytics"] = version("ultralytics")
    except Exception:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), **versions}


# --------------------------------------------------------------------------- models
def model_yaml(letter: str, width_scale: float, folder: Path) -> Path | None:
    """A copy of Ultralytics' yolov8.yaml whose one scale ``letter`` has its width multiplied by ``width_scale``
    (None at 1.0: the shipped file is used). The scale letter is in the file name, where both Presso and Ultralytics
    look for it."""
    if width_scale == 1.0:
        return None
    import yaml

    from presso.models.ultralytics import read_yaml, shipped_yamls

    cfg = read_yaml(shipped_yamls()["yolov8.yaml"])
    depth, width, max_channels = SCALES[letter]
    cfg["scales"] = {letter: [depth, round(width * width_scale, 6), max_channels]}
    cfg["scale"] = letter
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"yolov8{letter}-w{width_scale:g}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build(letter: str, width_scale: float, folder: Path, channels: int, classes: int):
    """The n- or s-like model, random init: the shipped YAML, or the width-scaled copy (``model_yaml``)."""
    import presso
    from presso.models import ultralytics as source

    kwargs = {"num_classes": classes, "ch": channels}
    if width_scale != 1.0 and "scale" in source.ACCEPTED:  # the source scales the shipped YAML itself
        depth, width, max_channels = SCALES[letter]
        return presso.load_model(f"ultralytics:yolov8{letter}.yaml", **kwargs,
                                 scale=[depth, width * width_scale, max_channels])  # fmt: skip
    path = model_yaml(letter, width_scale, folder)
    return presso.load_model(f"ultralytics:{path or f'yolov8{letter}.yaml'}", **kwargs)


def settings_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def epoch_printer(tag: str):
    def show(event):
        if event.stage == "epoch":
            keys = ("epoch", "train_loss", "map50_95", "map50", "seconds")
            print(f"  [{tag}] " + ", ".join(f"{k}={event.info.get(k)}" for k in keys), flush=True)

    return show


def train_or_reuse(tag: str, model, bundle, cfg, folder: Path, teacher=None, regularizer=None):
    """``model`` trained with ``cfg`` into ``folder`` (resuming an interrupted run there), or the model a previous
    run finished there; and the seconds spent."""
    import presso
    from presso.train.checkpoint import has_checkpoint

    t0 = time.perf_counter()
    if (folder / "presso.json").is_file():
        print(f"  [{tag}] reusing {folder}", flush=True)
        return presso.load_model(str(folder)), None
    folder.parent.mkdir(parents=True, exist_ok=True)
    result = presso.train(model, bundle, cfg, teacher=teacher, output_dir=folder, resume=has_checkpoint(folder),
                          regularizer=regularizer, progress=epoch_printer(tag))  # fmt: skip
    return result.model, round(time.perf_counter() - t0, 1)


def prune_or_reuse(model, spec: str, share: float, bundle, folder: Path):
    """``model`` pruned to keep ``share`` of its MACs, ratios chosen on ``bundle`` (saved in ``folder``)."""
    import presso
    from presso.compress import PruneConfig, Target

    t0 = time.perf_counter()
    if (folder / "presso.json").is_file():
        return presso.load_model(str(folder)), None
    folder.parent.mkdir(parents=True, exist_ok=True)
    result = presso.compress(model, spec, PruneConfig(ratio=0.3), calib=bundle, target=Target(macs=share),
                             output_dir=folder, overwrite=True)  # fmt: skip
    return result.model, round(time.perf_counter() - t0, 1)


class Ledger:
    """Seconds of each finished stage, kept beside the models (``seconds.json``), so that a rerun which reuses a
    model still reports what training it cost (and says it was reused)."""

    def __init__(self, folder: Path):
        self.path = folder / "seconds.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.reused: list[str] = []

    def note(self, key: str, seconds: float | None) -> float | None:
        if seconds is None:  # reused: the seconds of the run that made it, when recorded
            self.reused.append(key)
            return self.data.get(key)
        self.data[key] = seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        return seconds


def figures(model, spec: str) -> dict:
    from presso.models import InputSpec
    from presso.models.figures import model_figures

    f = model_figures(model, InputSpec.parse(spec).example_inputs())
    return {"params": f["params"], "macs": f["macs"]}


def scores(model, bundle, image_size: int) -> dict:
    import presso

    m = presso.evaluate(model, bundle, image_size=image_size).metrics
    return {"map50_95": round(float(m["map50_95"]), 4), "map50": round(float(m["map50"]), 4)}


# --------------------------------------------------------------------------- conversion and latency
def convert_all(models: dict, spec: str, bundle, folder: Path, eval_samples: int) -> dict:
    """Each model converted to ONNX FP32 and INT8 (calibrated on ``bundle``); INT8 scored on its held-out split."""
    import presso
    from presso.convert import ConvertConfig

    out = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        fp32 = presso.convert(model, spec, ConvertConfig(eval_samples=0), output_dir=folder / name / "fp32",
                              calib=bundle, overwrite=True)  # fmt: skip
        cfg = ConvertConfig(precision="int8", eval_samples=eval_samples)
        int8 = presso.convert(model, spec, cfg, output_dir=folder / name / "int8", calib=bundle, overwrite=True)
        acc = int8.accuracy or {}
        out[name] = {
            "fp32_path": fp32.path,
            "int8_path": int8.path,
            "fp32_bytes": fp32.size_bytes,
            "int8_bytes": int8.size_bytes,
            "onnx_fp32_map50_95": acc.get("fp32_map50_95"),
            "int8_map50_95": acc.get("converted_map50_95"),
            "int8_map50": acc.get("converted_map50"),
            "int8_eval_images": acc.get("samples"),
            "int8_snr_db": round(int8.int8.output_snr_db, 2) if int8.int8 else None,
            "int8_fallback_layers": int8.int8.fallback_layers if int8.int8 else None,
            "convert_seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"  [convert] {name}: INT8 mAP50-95 {out[name]['int8_map50_95']} "
              f"(ONNX FP32 {out[name]['onnx_fp32_map50_95']})", flush=True)  # fmt: skip
    return out


def time_all(converted: dict, rounds: int, block_seconds: float) -> dict:
    """Median latency of every FP32 and INT8 file, one ONNX Runtime thread, all files interleaved in each round (the
    order rotating), so that load from other processes falls on all of them alike."""
    from presso.pipeline.candidates import measure_interleaved

    paths = {f"{name}/{p}": c[f"{p}_path"] for name, c in converted.items() for p in ("fp32", "int8")}
    return measure_interleaved(paths, "local", 1, rounds=rounds, block_seconds=block_seconds)


# --------------------------------------------------------------------------- Ultralytics' own trainer
def write_yolo_layout(bundle, root: Path) -> Path:
    """The bundle's train and held-out images as image files (PNG, or a copy of the file they came from) with YOLO
    label files, and the ``data.yaml``."""
    import shutil

    import numpy as np
    import yaml
    from PIL import Image

    for split, images in (("train", bundle.train), ("val", bundle.val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(images.image_sizes):
            if images.files is not None:
                shutil.copyfile(images.files[i], root / "images" / split / f"{i:06d}{images.files[i].suffix}")
            else:
                pixels = np.ascontiguousarray(images.images[i])
                Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
                    root / "images" / split / f"{i:06d}.png"
                )
            t = images.targets[i]
            rows = [
                f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                for (x1, y1, x2, y2), c in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True)
            ]
            (root / "labels" / split / f"{i:06d}.txt").write_text("".join(r + "\n" for r in rows))
    data = {"path": str(root), "train": "images/train", "val": "images/val", "channels": bundle.train.channels,
            "names": dict(enumerate(bundle.classes))}  # fmt: skip
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def ultralytics_worker(job_file: str) -> int:
    """Runs in its own process (Ultralytics sets global torch state: deterministic algorithms, threads, seeds)."""
    job = json.loads(Path(job_file).read_text())
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    model = YOLO(job["model"])
    metrics = model.train(data=job["data"], epochs=job["epochs"], imgsz=job["imgsz"], batch=job["batch"],
                          plots=False, val=True, device="cpu", workers=0, amp=False, project=job["project"],
                          name="n", exist_ok=True, verbose=False, pretrained=False, seed=job["seed"],
                          **job["overrides"])  # fmt: skip
    run = Path(job["project"]) / "n" / "weights"
    best = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
    d = getattr(metrics, "results_dict", None) or {}
    out = {"weights": str(best), "seconds": round(time.perf_counter() - t0, 1), "overrides": job["overrides"],
           "own_map50_95": d.get("metrics/mAP50-95(B)"), "own_map50": d.get("metrics/mAP50(B)")}  # fmt: skip
    Path(job["result"]).write_text(json.dumps(out))
    return 0


def ultralytics_n(args, bundle, folder: Path, yaml_path: Path | None, dataset: Path, overrides: dict) -> dict:
    """The n model trained by Ultralytics, its settings but ``overrides`` (reused from ``folder`` when a previous
    run finished it). ``dataset``: where the YOLO layout of the data is (written there when missing)."""
    import torch

    result = folder / "result.json"
    if result.is_file():
        print(f"  [ultralytics] reusing {folder}", flush=True)
        return json.loads(result.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    data = dataset / "data.yaml"
    if not data.is_file():
        write_yolo_layout(bundle, dataset)
    job = {"model": str(yaml_path or "yolov8n.yaml"), "data": str(data), "epochs": args.epochs,
           "imgsz": args.image_size, "batch": args.batch_size, "project": str(folder / "runs"), "seed": args.seed,
           "threads": torch.get_num_threads(), "result": str(result), "overrides": overrides}  # fmt: skip
    (folder / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(folder / "settings"), "YOLO_VERBOSE": "False"}
    print(f"  [ultralytics] training {job['model']} for {args.epochs} epochs {overrides or ''}", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--ultralytics-worker", str(folder / "job.json")], env=env)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"Ultralytics' trainer failed (exit {proc.returncode}); its output is above.")
    return json.loads(result.read_text())


# --------------------------------------------------------------------------- the run
def run(args) -> dict:
    import torch

    import presso
    from presso.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = load_average()
    info = machine()
    print(json.dumps({**info, "load_average": load_start, "started": started}), flush=True)
    bundle = presso.load_data(args.data)
    print(json.dumps(bundle.describe()["boxes"] | {"train": len(bundle.train), "val": len(bundle.val)}), flush=True)
    size, ch, classes = args.image_size, bundle.train.channels, bundle.num_classes
    spec = f"1,{ch},{size},{size}"
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=(size, size),
                      seed=args.seed, workers=0)  # fmt: skip
    kd_cfg = dataclasses.replace(cfg, epochs=args.kd_epochs)
    tmp = tempfile.TemporaryDirectory(prefix="presso-detect-bench-")
    base = Path(args.keep) if args.keep else Path(tmp.name)
    # TrainConfig fields added later at their off value leave the key (and the --keep folders) as they were
    settings = {k: v for k, v in cfg.to_json().items() if not (k == "qat" and v is False)}
    key = settings_key(args.data, size, args.width_scale, settings, args.seed)
    work = base / f"w{args.width_scale:g}-e{args.epochs}-{key}"
    kd_work = work / f"kd{args.kd_epochs}"
    print(f"models under {work}", flush=True)
    seconds: dict[str, float | None] = {}
    ledger = Ledger(work)

    models, rows = {}, {}
    for letter in ("n", "s"):
        torch.manual_seed(args.seed)
        fresh = build(letter, args.width_scale, work / "yaml", ch, classes)
        models[letter], took = train_or_reuse(letter, fresh, bundle, cfg, work / letter)
        seconds[f"train_{letter}"] = ledger.note(f"train_{letter}", took)
    # Equal-budget controls: n and s trained from scratch for as many epochs as the pruned s saw in all (its s
    # teacher's epochs, then the recovery epochs), so that a pruned model's win is not just more training.
    total = args.epochs + args.kd_epochs
    for letter in [v for v in ("n", "s") if v in args.equal_budget]:
        torch.manual_seed(args.seed)
        fresh = build(letter, args.width_scale, work / "yaml", ch, classes)
        name = f"{letter}_equal_budget"
        models[name], took = train_or_reuse(name, fresh, bundle, dataclasses.replace(cfg, epochs=total),
                                            work / f"{letter}_e{total}")  # fmt: skip
        seconds[f"train_{name}"] = ledger.note(f"train_{letter}_e{total}", took)
    macs = {k: figures(m, spec)["macs"] for k, m in models.items()}
    share_n = macs["n"] / macs["s"]
    print(f"MACs n {macs['n'] / 1e6:.1f} M, s {macs['s'] / 1e6:.1f} M: n is {share_n:.3f} of s", flush=True)
    teacher, sparse = models["s"], ""
    if args.sparsity:  # sparsity training of s from scratch (same epochs), the model then pruned and the KD teacher
        import functools

        from presso.compress.prune.sparsity import GroupDecay

        torch.manual_seed(args.seed)
        fresh = build("s", args.width_scale, work / "yaml", ch, classes)
        sparse = f".sparse{args.sparsity:g}r{args.sparsity_ratio:g}"
        decay = functools.partial(GroupDecay, strength=args.sparsity, ratio=args.sparsity_ratio)
        models["s_sparse"], took = train_or_reuse("s_sparse", fresh, bundle, cfg, work / f"s{sparse}", None, decay)
        seconds["train_s_sparse"] = ledger.note(f"train_s{sparse}", took)
        teacher = models["s_sparse"]
    steps = args.prune_steps
    for name, share in (("s_at_n_macs", share_n), ("s_at_half_macs", 0.5)):
        if steps == 1:
            pruned, took = prune_or_reuse(teacher, spec, share, bundle, work / f"{name}{sparse}.pruned")
            seconds[f"prune_{name}"] = ledger.note(f"prune_{name}{sparse}", took)
            rows[name] = {"pruned_before_kd": scores(pruned, bundle, size)}
            models[name], took = train_or_reuse(name, pruned, bundle, kd_cfg, kd_work / f"{name}{sparse}", teacher)
            seconds[f"kd_{name}"] = ledger.note(f"kd{args.kd_epochs}_{name}{sparse}", took)
            continue
        # iterative: the same share in `steps` equal (geometric) cuts, each followed by its part of the KD epochs
        student, before = teacher, []
        parts = [args.kd_epochs // steps + (1 if i < args.kd_epochs % steps else 0) for i in range(steps)]
        for i in range(steps):
            tag = f"{name}{sparse}.{steps}steps.{i + 1}"
            pruned, took = prune_or_reuse(student, spec, share ** (1 / steps), bundle, work / f"{tag}.pruned")
            seconds[f"prune_{tag}"] = ledger.note(f"prune_{tag}", took)
            before.append(scores(pruned, bundle, size))
            step_cfg = dataclasses.replace(kd_cfg, epochs=max(1, parts[i]))
            student, took = train_or_reuse(tag, pruned, bundle, step_cfg, kd_work / tag, teacher)
            seconds[f"kd_{tag}"] = ledger.note(f"kd{parts[i]}_{tag}", took)
        rows[name] = {"pruned_before_kd": before[0], "pruned_before_each_kd": before, "prune_steps": steps}
        models[name] = student

    order = [k for k in ("n", "n_equal_budget", "s", "s_equal_budget", "s_sparse", "s_at_n_macs", "s_at_half_macs")
             if k in models]  # fmt: skip
    twins = {"n_equal_budget": "n", "s_equal_budget": "s"}  # same architecture: timed once
    for name in order:
        rows[name] = {**rows.get(name, {}), **figures(models[name], spec), **scores(models[name], bundle, size)}
        rows[name]["macs_of_s"] = round(rows[name]["macs"] / macs["s"], 4)
        print(f"  [eval] {name}: {rows[name]}", flush=True)

    t0 = time.perf_counter()
    converted = convert_all({k: models[k] for k in order}, spec, bundle, work / "onnx", args.eval_samples)
    seconds["convert"] = round(time.perf_counter() - t0, 1)
    load_timing = load_average()
    times = time_all({k: v for k, v in converted.items() if k not in twins}, args.rounds, args.block_seconds)
    for name in order:
        c = converted[name]
        rows[name].update({k: v for k, v in c.items() if not k.endswith("_path")})
        for p in ("fp32", "int8"):
            t, ref = times[f"{twins.get(name, name)}/{p}"], times[f"n/{p}"]
            rows[name][f"ort_{p}_ms"] = t["latency_ms"]
            rows[name][f"ort_{p}_noise_pct"] = t["noise_pct"]
            rows[name][f"ort_{p}_vs_n"] = round(t["latency_ms"] / ref["latency_ms"], 3)
    rows = {name: rows[name] for name in order}
    timing = {"runtime": "onnxruntime", "threads": 1, "rounds": args.rounds, "block_seconds": args.block_seconds,
              "load_average_before": load_timing, "load_average_after": load_average()}  # fmt: skip

    ultra, extra = None, None
    if not args.skip_ultralytics:
        yaml_path = model_yaml("n", args.width_scale, work / "yaml")
        variants = [("ultralytics", {})]
        if args.ultralytics_extra:
            variants.append((f"ultralytics-{settings_key(args.ultralytics_extra)}", args.ultralytics_extra))
        for name, overrides in variants:
            u = ultralytics_n(args, bundle, work / name, yaml_path, work / "ultralytics" / "dataset", overrides)
            theirs = presso.load_model(u["weights"], trust=True)  # our own file, written by the run above
            u |= {"presso_eval": scores(theirs, bundle, size), **figures(theirs, spec)}
            seconds["ultralytics_train" + ("_overrides" if overrides else "")] = u["seconds"]
            print(f"  [ultralytics] {u}", flush=True)
            ultra, extra = (ultra, u) if overrides else (u, extra)

    checks = verdicts(rows, ultra, extra)
    result = {
        "benchmark": "detect",
        "command": " ".join(["python", "benchmarks/detect.py", *sys.argv[1:]]),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {**info, "load_average_start": load_start, "load_average_end": load_average()},
        "data": {
            "spec": args.data,
            "train_images": len(bundle.train),
            "val_images": len(bundle.val),
            "image_size": size,
        },  # fmt: skip
        "train": {
            **cfg.to_json(),
            "kd_epochs": args.kd_epochs,
            "width_scale": args.width_scale,
            "prune_steps": args.prune_steps,
            "sparsity": args.sparsity and {"strength": args.sparsity, "ratio": args.sparsity_ratio},
        },
        "models": rows,
        "latency": timing,
        "ultralytics_n": ultra,
        "ultralytics_n_with_overrides": extra,
        "checks": checks,
        "seconds": seconds,
        "reused_from_an_earlier_run": ledger.reused,
    }
    tmp.cleanup()
    return result


def verdicts(rows: dict, ultra: dict | None, extra: dict | None = None) -> dict:
    """The three checks, in mAP50-95 points (100 x the mAP); with ``extra`` (Ultralytics' trainer with the
    overrides given), the third also against it. A check whose reference model is under ``MEANINGFUL_POINTS`` is
    marked inconclusive: its verdict is printed as measured, but it says nothing."""
    pts = {k: 100 * v["map50_95"] for k, v in rows.items() if "map50_95" in v}
    # the reference is the better of the model trained for the same epochs and its equal-budget control, if run
    n_ref = max(pts["n"], pts.get("n_equal_budget", -1.0))
    s_ref = max(pts["s"], pts.get("s_equal_budget", -1.0))
    out = {
        "pruned_s_beats_n_at_equal_macs": {
            "pruned_s": pts["s_at_n_macs"], "n": pts["n"], "n_equal_budget": pts.get("n_equal_budget"),
            "pass": pts["s_at_n_macs"] > n_ref, "ref": n_ref},
        "s_at_half_macs_within_1_point_of_s": {
            "s_at_half_macs": pts["s_at_half_macs"], "s": pts["s"], "s_equal_budget": pts.get("s_equal_budget"),
            "drop_points": s_ref - pts["s_at_half_macs"], "pass": s_ref - pts["s_at_half_macs"] <= 1.0,
            "ref": s_ref},
    }  # fmt: skip
    if ultra is not None:
        theirs, own = 100 * ultra["presso_eval"]["map50_95"], ultra.get("own_map50_95")
        out["presso_n_within_1_point_of_ultralytics_n"] = {
            "presso_n": pts["n"], "ultralytics_n": theirs, "ultralytics_n_own_val": None if own is None else 100 * own,
            "gap_points": theirs - pts["n"], "pass": theirs - pts["n"] <= 1.0, "ref": theirs}  # fmt: skip
    if extra is not None:
        theirs = 100 * extra["presso_eval"]["map50_95"]
        out["presso_n_within_1_point_of_ultralytics_n_with_overrides"] = {
            "presso_n": pts["n"], "ultralytics_n": theirs, "overrides": extra["overrides"],
            "gap_points": theirs - pts["n"], "pass": theirs - pts["n"] <= 1.0, "ref": theirs}  # fmt: skip
    for check in out.values():
        ref = check.pop("ref")
        for k, v in check.items():
            if isinstance(v, float):
                check[k] = round(v, 2)
        check["conclusive"] = ref >= MEANINGFUL_POINTS
    return out


def print_table(result: dict) -> None:
    rows = result["models"]
    total = result["train"]["epochs"] + result["train"]["kd_epochs"]
    names = {"n": "n (from scratch)", "n_equal_budget": f"n (from scratch, {total} epochs)", "s": "s (from scratch)",
             "s_equal_budget": f"s (from scratch, {total} epochs)", "s_sparse": "s (from scratch, sparsity training)",
             "s_at_n_macs": "s pruned to n's MACs + KD",
             "s_at_half_macs": "s pruned to 50% MACs + KD"}  # fmt: skip
    names = {k: v for k, v in names.items() if k in rows}
    print("\n| model | params | MACs (share of s) | mAP50-95 | mAP50 | INT8 mAP50-95 | ORT FP32 ms (vs n) | "
          "ORT INT8 ms (vs n) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, label in names.items():
        r = rows[key]
        int8 = "--" if r.get("int8_map50_95") is None else f"{r['int8_map50_95']:.4f}"
        print(f"| {label} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} M ({r['macs_of_s']:.2f}) | "
              f"{r['map50_95']:.4f} | {r['map50']:.4f} | {int8} | {r['ort_fp32_ms']:.2f} ({r['ort_fp32_vs_n']:.2f}x) | "
              f"{r['ort_int8_ms']:.2f} ({r['ort_int8_vs_n']:.2f}x) |")  # fmt: skip
    for key in ("ultralytics_n", "ultralytics_n_with_overrides"):
        u = result.get(key)
        if not u:
            continue
        own = "--" if u.get("own_map50_95") is None else f"{u['own_map50_95']:.4f}"
        how = "its defaults" if not u.get("overrides") else ", ".join(f"{k}={v}" for k, v in u["overrides"].items())
        print(f"| n by Ultralytics' trainer, {how} (Presso eval; its own val {own}) | {u['params'] / 1e6:.2f} M | "
              f"{u['macs'] / 1e6:.1f} M | {u['presso_eval']['map50_95']:.4f} | {u['presso_eval']['map50']:.4f} | "
              "| | |")  # fmt: skip
    print()
    for name, c in result["checks"].items():
        shown = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("pass", "conclusive") and v is not None)
        note = "" if c["conclusive"] else f"  (inconclusive: the reference is under {MEANINGFUL_POINTS} mAP points)"
        print(f"{'PASS' if c['pass'] else 'MISS'}  {name}: {shown}{note}")


def overrides(text: str) -> dict:
    """``lr0=0.002,cos_lr=True,optimizer=AdamW`` as a dict of numbers, booleans and strings."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"'{item}': give KEY=VALUE")
        out[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), _number(value.strip()))
    return out


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"smoke run, every step: {QUICK}")
    ap.add_argument("--data", default="fashion-scenes")
    ap.add_argument("--image-size", type=int, default=160, help="square side the models see (a multiple of 32)")
    ap.add_argument("--width-scale", type=float, default=1.0, help="multiply both models' width by this")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--kd-epochs", type=int, default=None, help="recovery epochs (default: --epochs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prune-steps", type=int, default=1,
                    help="prune in this many equal cuts, each followed by its share of the --kd-epochs (default 1: "
                         "one cut, then all the recovery)")  # fmt: skip
    ap.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="train the s to be pruned with Presso's group decay of this strength (train --sparsity)",
    )
    ap.add_argument("--sparsity-ratio", type=float, default=0.45, help="with --sparsity: share of channels to empty")
    ap.add_argument("--lr", type=float, default=None, help="default: TrainConfig's (AdamW 2e-3 x batch / 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="training threads (default: torch's)")
    ap.add_argument("--eval-samples", type=int, default=100000, help="held-out images the INT8 mAP is scored on")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds")
    ap.add_argument("--block-seconds", type=float, default=0.5, help="timed runs per model per round, in seconds")
    ap.add_argument("--skip-ultralytics", action="store_true", help="leave out Ultralytics' trainer")
    ap.add_argument(
        "--equal-budget",
        default="n,s",
        type=lambda t: [v for v in t.split(",") if v and v != "none"],
        help="which of n and s to also train from scratch for --epochs + --kd-epochs (the pruned s's whole "
        "training); the checks hold against the better of each pair (default: n,s; 'none')",
    )
    ap.add_argument(
        "--ultralytics-extra",
        type=overrides,
        default={},
        metavar="KEY=VALUE,...",
        help="also train the n model by Ultralytics with these settings changed (e.g. lr0=0.002)",
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep trained models here; reuse them when present")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/detect.json; "
                    "none with --quick)")  # fmt: skip
    ap.add_argument("--ultralytics-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ultralytics_worker:
        return ultralytics_worker(args.ultralytics_worker)
    if args.quick:
        for k, v in QUICK.items():
            if ap.get_default(k) == getattr(args, k):
                setattr(args, k, v)
    args.kd_epochs = args.kd_epochs or args.epochs
    if args.image_size % 32:
        ap.error(f"--image-size {args.image_size}: YOLO needs a multiple of 32 (e.g. 160)")
    out = args.out or (None if args.quick else Path("benchmarks/results/detect.json"))
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    print_table(result)
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
    print(f"\n{result['seconds']['total']:.0f} s in all; load average {result['machine']['load_average_start']} at "
          f"the start, {result['machine']['load_average_end']} at the end")  # fmt: skip
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
