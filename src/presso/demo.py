"""``make demo``: the main job, ``presso run``, on built-in material, offline, in a few minutes on 2 cores.

A small ResNet (``presso:resnet8``, untrained) and the built-in digits go in with a budget of half the MACs; out
comes the model trained, pruned to the budget, recovered by distillation from its original, quantized to INT8 with
calibration, measured on this machine, packaged as a bundle that runs without PyTorch -- and a report
(``demo-out/report.html``). A second run reuses every finished stage.
"""

from __future__ import annotations

import sys
import time


def main(out_dir: str = "demo-out") -> int:
    from rich.console import Console

    from presso.cli import app

    console = Console(stderr=True)
    args = ["run", "--data", "digits", "--model", "presso:resnet8", "--target-macs", "0.5", "--precision", "int8",
            "--train-epochs", "10", "--recover-epochs", "5", "-o", out_dir]  # fmt: skip
    console.print(f"[bold]presso {' '.join(args)}[/bold]", highlight=False)
    t0 = time.perf_counter()
    try:
        code = app(args, standalone_mode=False)
    except SystemExit as e:
        code = e.code
    if code:
        return int(code)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s; open [bold]{out_dir}/report.html[/bold]")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
