"""``make demo``: the main job on built-in material.

Until the end-to-end pipeline lands, the demo is the compressor: four real architectures of different families (a
ResNet, a mobile net with depthwise convolutions, a ConvNeXt, a Vision Transformer) are pruned to half their channels
with L2 importance, saved as Presso model directories, reloaded (checking the outputs are identical) and summarised.
Everything is offline: the models are randomly initialised.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

MODELS = [
    ("torchvision:resnet18", "1,3,224,224"),
    ("torchvision:mobilenet_v2", "1,3,224,224"),
    ("timm:convnext_atto", "1,3,224,224"),
    ("timm:vit_tiny_patch16_224", "1,3,224,224"),
]


def main(out_dir: str = "demo-out") -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    import presso

    console = Console()
    out = Path(out_dir)
    table = Table(title="presso demo: structured pruning, ratio 0.5, criterion l2")
    for col in ("model", "params (M)", "GMACs", "MACs kept", "groups", "reload", "s"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=True)
    for source, shape in MODELS:
        t0 = time.perf_counter()
        with console.status(f"pruning {source} ..."):
            model = presso.load_model(source)
            result = presso.compress(model, shape, presso.PruneConfig(ratio=0.5, criterion="l2"))
            target = out / source.replace(":", "_")
            presso.save_model_dir(result.model, target, input_spec=shape)
            reloaded = presso.load_model(str(target))
            x = presso.InputSpec.parse(shape).example_inputs()
            with torch.no_grad():
                same = torch.equal(result.model(*x), reloaded(*x))
        b, a = result.before, result.after
        table.add_row(
            source.split(":")[1],
            f"{b['params'] / 1e6:.2f}>{a['params'] / 1e6:.2f}",
            f"{b['macs'] / 1e9:.2f}>{a['macs'] / 1e9:.2f}",
            f"{a['macs'] / b['macs']:.1%}",
            f"{result.extra['groups_pruned']}/{result.extra['groups_total']}",
            "same" if same else "[red]DIFF[/red]",
            f"{time.perf_counter() - t0:.0f}",
        )
        if not same:
            console.print(f"[red]reloaded {source} differs from the pruned model[/red]")
            return 1
    console.print(table)
    console.print("groups: coupled channel groups pruned / found (the rest: output layers, or reported with a reason)")
    console.print(f"model directories in [bold]{out.resolve()}[/bold]")
    console.print(f"try: .venv/bin/presso info {out / 'timm_convnext_atto'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
