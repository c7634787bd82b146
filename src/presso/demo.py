"""``make demo``: the main job on built-in material.

Until the end-to-end pipeline lands, the demo runs the compressor and the trainer:

1. four real architectures of different families (a ResNet, a mobile net with depthwise convolutions, a ConvNeXt, a
   Vision Transformer) are pruned to half their channels with L2 importance, saved as Presso model directories,
   reloaded (checking the outputs are identical) and summarised (random init: structure only);
2. a small ResNet is trained on the built-in digits, pruned (30% of its channels, about half its MACs), and
   recovered by label-free distillation from its original -- accuracy before and after each step.

Everything is offline.
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
    return recover(out, console)


def recover(out: Path, console) -> int:
    """Train -> prune -> distil without labels, on the built-in digits."""
    import copy

    import torch
    from rich.table import Table

    import presso
    from presso.data import load_data

    torch.manual_seed(0)
    data = load_data("digits:size=16")
    unlabeled = copy.copy(data)
    unlabeled.classes = None  # the distillation below sees images only
    t0 = time.perf_counter()
    with console.status("training presso:resnet8 on digits ..."):
        model = presso.load_model("presso:resnet8", num_classes=10)
        trained = presso.train(model, data, presso.TrainConfig(epochs=4, batch_size=64), output_dir=out / "digits")
    with console.status("pruning and distilling ..."):
        config = presso.PruneConfig(ratio=0.3, criterion="l2", round_to=None)
        pruned = presso.compress(trained.model, "1,3,16,16", config)
        before = presso.evaluate(pruned.model, data)["val_top1"]
        presso.train(pruned.model, unlabeled, presso.TrainConfig(epochs=3, batch_size=64, lr=1e-3),
                     teacher=trained.model, output_dir=out / "digits-pruned")  # fmt: skip
        after = presso.evaluate(presso.load_model(out / "digits-pruned"), data)["val_top1"]
    table = Table(title="presso demo: train, prune, recover without labels (digits, 16x16)")
    for col in ("model", "MACs", "val top-1"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("resnet8 trained 4 epochs", f"{pruned.before['macs'] / 1e6:.2f}M", f"{trained.best['val_top1']:.3f}")
    table.add_row("pruned (30% of channels)", f"{pruned.after['macs'] / 1e6:.2f}M", f"{before:.3f}")
    table.add_row("distilled 3 epochs, no labels", f"{pruned.after['macs'] / 1e6:.2f}M", f"{after:.3f}")
    console.print(table)
    console.print(
        f"done in {time.perf_counter() - t0:.0f}s; models in [bold]{(out / 'digits-pruned').resolve()}[/bold]"
    )
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
