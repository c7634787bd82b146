"""Training throughput on this CPU: the same epochs with the model held in NCHW and in NHWC (channels_last).

``presso.train`` holds a classifier in NHWC where one forward shows the model takes it (``Task.channels_last``).
This script trains each model for one epoch on a share of Fashion-MNIST's training images twice per round -- with
that switch off, then on -- interleaved round by round, so the machine's noise hits both alike, and prints the
median images per second of each and their ratio. The whole ``presso.train`` epoch is timed: augmentation,
normalisation, forward, loss, backward, clipping, optimizer and scheduler steps (validation is on 256 images).

    python benchmarks/train_speed.py [--threads 1] [--rounds 3] [--images 6000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=6000, help="Training images per timed epoch.")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch

    import presso
    from presso.bench.env import cpu_model
    from presso.cpu import has_vnni
    from presso.data import DataBundle, load_data
    from presso.search import get_space
    from presso.tasks.classify import Classify
    from presso.train import TrainConfig

    torch.set_num_threads(args.threads)
    full = load_data("fashion-mnist")
    rng = np.random.default_rng(0)
    data = DataBundle(name="fashion-mnist-share", train=full.train.subset(np.sort(rng.permutation(len(full.train))[
        : args.images])), val=full.val.subset(np.arange(256)), classes=full.classes, flip=full.flip,
        val_from="split")  # fmt: skip
    space = get_space("mobilenet", (28, 28), 1, 10)
    models = {
        "ResNet-8 (presso)": lambda: presso.load_model("presso:resnet8", in_chans=1, num_classes=10),
        "MobileNetV3-Small 0.5 (timm)": lambda: presso.load_model(
            "timm:mobilenetv3_small_050", in_chans=1, num_classes=10
        ),  # fmt: skip
        "search space: fused-0.75": lambda: space.build(space.zoo()["fused-0.75"]),
        "search space: mnv2-0.75": lambda: space.build(space.zoo()["mnv2-0.75"]),
    }
    with open("/proc/loadavg") as fh:
        load_start = fh.read().split()[:3]
    print(f"# {cpu_model()} (VNNI {has_vnni()}), torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.images} images x 1 epoch, batch {args.batch_size}, load {load_start}", flush=True)  # fmt: skip
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0, workers=0)
    times: dict[str, dict[str, list[float]]] = {m: {"nchw": [], "nhwc": []} for m in models}
    default = Classify.channels_last
    try:
        for layout in ("nchw", "nhwc"):  # warm-up, not timed: first-call costs (kernels, allocator, data caches)
            Classify.channels_last = layout == "nhwc"
            presso.train(models["ResNet-8 (presso)"](), data, cfg)
        for r in range(args.rounds):
            for name, build in models.items():
                for layout in ("nchw", "nhwc"):
                    Classify.channels_last = layout == "nhwc"
                    torch.manual_seed(0)
                    model = build()
                    t0 = time.perf_counter()
                    presso.train(model, data, cfg)
                    times[name][layout].append(time.perf_counter() - t0)
                print(f"round {r + 1}: {name} NCHW {times[name]['nchw'][-1]:.1f} s, NHWC "
                      f"{times[name]['nhwc'][-1]:.1f} s", flush=True)  # fmt: skip
    finally:
        Classify.channels_last = default
    with open("/proc/loadavg") as fh:
        load_end = fh.read().split()[:3]
    rows = []
    for name, t in times.items():
        a, b = statistics.median(t["nchw"]), statistics.median(t["nhwc"])
        rows.append({"model": name, "nchw_img_s": round(args.images / a, 1), "nhwc_img_s": round(args.images / b, 1),
                     "speedup": round(a / b, 2), "spread_pct": round(100 * max(
                         (max(v) - min(v)) / statistics.median(v) for v in t.values()), 1)})  # fmt: skip
    print("| model | NCHW img/s | NHWC img/s | NHWC speed-up | round spread |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['nchw_img_s']} | {r['nhwc_img_s']} | {r['speedup']}x | {r['spread_pct']}% |")
    print(f"# load at the end {load_end}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "vnni": has_vnni(),
                  "threads": args.threads, "images": args.images, "load_start": load_start,
                  "load_end": load_end}  # fmt: skip
        with args.out.open("a") as fh:
            fh.write(json.dumps({"header": header}) + "\n")
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
