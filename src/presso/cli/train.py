"""``presso train`` and ``presso eval``: train or distil a model on a dataset, and score it on the held-out split."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import (
    DataOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelArgOpt,
    NewHeadOpt,
    OverwriteOpt,
    ProgressBars,
    SourceArg,
    TaskOpt,
    TrustOpt,
    WeightsOpt,
    _check_output,
    _duration,
    _elapsed,
    _emit,
    _load,
    _run,
    _tristate,
    app,
    err,
)


@app.command()
def train(
    source: SourceArg,
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Global batch size (split across torchrun processes).")] = 128,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-3 adamw, 0.1 sgd, per 128).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default: 0.05 adamw, 5e-4 sgd.")] = None,
    warmup: Annotated[float, typer.Option(help="Fraction of steps warming the learning rate up.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.1,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop (and flip).")] = True,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="Distil from this model (the original of a compressed one).")
    ] = None,
    kd_alpha: Annotated[float, typer.Option(help="Weight of distillation vs cross-entropy when labels exist.")] = 0.7,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 4.0,
    feature_match: Annotated[
        bool, typer.Option("--feature-match", help="Also match layers with the same name and shape.")
    ] = False,
    pseudo_labels: Annotated[
        bool,
        typer.Option("--pseudo-labels", help="Detection without labels: learn from the teacher's boxes after NMS."),
    ] = False,
    qat: Annotated[
        bool,
        typer.Option(
            "--qat",
            help="Quantization-aware fine-tune of a trained model (distilled from it unless "
            "--teacher): then 'presso convert -p int8' exports the INT8 model it learned.",
        ),
    ] = False,
    qat_reduce_range: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="With --qat: 7-bit weights for x86 CPUs without VNNI, where full-range INT8 saturates: "
            "auto (as this CPU needs) | on | off. Choose for the CPU that will run the model.",
        ),
    ] = "auto",
    sparsity: Annotated[
        float | None,
        typer.Option(
            help="Sparsity training before a cut: decay the weakest --sparsity-ratio of every prunable "
            "channel group by lr x this per step (e.g. 50); then compress with criterion l2."
        ),
    ] = None,
    sparsity_ratio: Annotated[
        float, typer.Option(help="With --sparsity: the share of each group's channels to empty (the cut to come).")
    ] = 0.5,
    task: TaskOpt = None,
    image_size: ImageSizeOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share when the data has no split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for split, order, augmentation and init.")] = 0,
    device: Annotated[
        str, typer.Option("--torch-device", metavar="DEVICE", help="Where PyTorch trains: auto | cpu | cuda | cuda:N.")
    ] = "auto",
    amp: Annotated[str, typer.Option(help="auto (bf16 on CUDA) | on | off.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Image decoding processes (folders).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run kept in OUTPUT.partial.")
    ] = False,
    overwrite: OverwriteOpt = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    new_head: NewHeadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a dataset, or recover a compressed one by distilling from its original (--teacher).

    Runs data-parallel under torchrun: torchrun --nproc-per-node 2 -m presso train ...
    """

    def body():
        import torch

        import presso
        from presso.data import parse_image_size
        from presso.train import TrainConfig, partial_dir
        from presso.train.distributed import setup

        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            label_smoothing=label_smoothing,
            augment=augment,
            amp=amp,
            device=device,
            seed=seed,
            val_fraction=val_fraction,
            image_size=parse_image_size(image_size),
            workers=workers,
            kd_alpha=kd_alpha,
            temperature=temperature,
            feature_match=feature_match,
            new_head=new_head,
            task=task,
            pseudo_labels=pseudo_labels,
            qat=qat,
            qat_reduce_range=_tristate("--qat-reduce-range", qat_reduce_range),
        )
        main = setup().is_main
        _check_output(output, overwrite, source, teacher)
        regularizer = None
        if sparsity is not None:
            import functools

            from presso.compress.prune.sparsity import GroupDecay

            GroupDecay.check(sparsity, sparsity_ratio)  # before the data is read
            regularizer = functools.partial(GroupDecay, strength=sparsity, ratio=sparsity_ratio)
        # the data first: a zoo model built from random init takes its class and channel counts from it
        bundle = presso.load_data(data, val_fraction=val_fraction, seed=seed)
        torch.manual_seed(seed)  # the same initial weights on every torchrun process
        model, original = _load(source, trust, model_arg, teacher, show=main, weights=weights, new_head=new_head,
                                fit=bundle)  # fmt: skip
        bars = ProgressBars() if main else None  # a bar over the run's steps, a line per epoch
        try:
            with bars or contextlib.nullcontext():
                result = presso.train(
                    model,
                    bundle,
                    cfg,
                    teacher=original,
                    output_dir=output,
                    resume=resume,
                    overwrite=overwrite,
                    trust=trust,
                    regularizer=regularizer,
                    progress=bars,
                )
        except KeyboardInterrupt:
            if main:
                err.print(
                    f"[yellow]interrupted[/yellow]: the run is kept in {partial_dir(output)}; continue it with the "
                    "same command and --resume."
                )
            raise typer.Exit(130) from None
        if main:
            _emit({**result.summary(), "wall_seconds": round(_elapsed(), 1)}, as_json, _render_train)

    _run(body)


@app.command(name="eval")
def evaluate(
    source: SourceArg,
    data: DataOpt,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Also measure agreement with this model.")] = None,
    image_size: ImageSizeOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share when the data has no split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    task: TaskOpt = None,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a model on the held-out split of a dataset: top-1 and loss (classification), COCO mAP50-95, mAP50 and
    per-class AP (detection); and agreement with a teacher."""

    def body():
        import presso
        from presso.data import parse_image_size

        model, original = _load(source, trust, model_arg, teacher, weights=weights)
        with ProgressBars() as bars:
            result = presso.evaluate(
                model, data, teacher=original, image_size=parse_image_size(image_size), seed=seed,
                val_fraction=val_fraction, task=task, trust=trust, progress=bars,
            )  # fmt: skip
        _emit({"source": source, **result.summary()}, as_json, _render_eval)

    _run(body)


def _render_train(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso train: {s['data'].get('data')}")
    cols = [
        k
        for k in ("epoch", "train_loss", "val_top1", "map50_95", "map50", "val_loss", "agreement", "seconds")
        if s["history"] and k in s["history"][0]
    ]
    for c in cols:
        t.add_column(c, justify="right")
    for row in s["history"]:
        t.add_row(*[f"{row[c]:.4f}" if isinstance(row[c], float) and c != "seconds" else str(row[c]) for c in cols])
    out.print(t)
    if s.get("map50_95") is not None:
        best = f"mAP50-95 {s['map50_95']:.4f}, mAP50 {s['map50']:.4f}"
    elif s.get("val_top1") is not None:
        best = f"top-1 {s['val_top1']:.4f}"
    else:
        best = f"loss {s['val_loss']:.4f}"
    took = _duration(s.get("wall_seconds", s["seconds"]))
    out.print(f"best epoch {s['best_epoch']} ({best}); saved to [bold]{s['output_dir']}[/bold] in {took}")


def _render_eval(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso eval: {s['source']} on {s['data']['data']} ({s['val_n']} images)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key in ("val_top1", "map50_95", "map50", "val_loss", "agreement", "match_loss"):
        if s.get(key) is not None:
            t.add_row(key, f"{s[key]:.4f}")
    for name, ap in (s.get("per_class") or {}).items():
        t.add_row(f"AP50-95 {name}", "-" if ap is None else f"{ap:.4f}")
    out.print(t)
