"""``make demo``: the main job, ``presso run``, on built-in material, offline, in a few minutes on 2 cores.

A ResNet wide enough that arithmetic, not per-node overhead, is most of its latency (``presso:small_resnet``:
32-64-128 channels, 49 M MACs at 32x32, untrained) and the built-in digits go in with a budget of half the MACs
and an accuracy bound of 1 point. Out comes the model trained, pruned to the budget, recovered by distillation from
its original, quantized to INT8 with calibration; then the original and the compressed model, each at FP32 and
INT8, are measured side by side on this machine (one thread) and the fastest within the bound and the budget is
delivered, packaged as a bundle that runs without PyTorch -- with a report (``demo-out/report.html``). A second
run reuses every finished stage. docs/benchmarks.md ("Demo") records a run's figures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ARGS = ["run", "--data", "digits", "--model", "presso:small_resnet", "--target-macs", "0.5", "--precision", "int8",
        "--max-accuracy-drop", "0.01", "--threads", "1", "--train-epochs", "8", "--recover-epochs", "3"]  # fmt: skip


def main(out_dir: str = "demo-out") -> int:
    from rich.console import Console

    from presso.cli import app

    console = Console(stderr=True)
    args = [*ARGS, "-o", out_dir]
    console.print(f"[bold]presso {' '.join(args)}[/bold]", highlight=False)
    t0 = time.perf_counter()
    try:
        code = app(args, standalone_mode=False)
    except SystemExit as e:
        code = e.code
    summary = Path(out_dir) / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("delivered"):
            console.print(
                f"demo: delivered {s['delivered']['label']}, {s['speedup_vs_original_fp32']:.2f}x as fast as the "
                f"original FP32 ({s['speedup_vs_baseline_int8']:.2f}x the original merely quantized), accuracy drop "
                f"{s['accuracy_drop_points']:.2f} points",
                highlight=False,
            )
    if code:
        return int(code)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s; open [bold]{out_dir}/report.html[/bold]")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
