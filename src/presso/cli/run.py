"""``presso run``: the whole pipeline, from data to a measured, packaged model and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import (
    DATA,
    MEASURE,
    MODEL,
    OUTPUT,
    TARGET,
    DataOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelArgOpt,
    NewHeadOpt,
    OverwriteOpt,
    ProgressBars,
    ShapeOpt,
    TaskOpt,
    TrustOpt,
    WeightsOpt,
    _duration,
    _elapsed,
    _emit,
    _human,
    _model_kwargs,
    _run,
    app,
    err,
)

MISS_EXIT = 3  # a model was delivered, but it misses the budget or the accuracy bound (and --allow-miss was not given)


@app.command(name="run")
def run_(
    data: DataOpt,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", metavar="DIR", rich_help_panel=OUTPUT, help="Output directory (stages, report, bundle)."
        ),  # fmt: skip
    ],
    latency_ms: Annotated[
        float | None, typer.Option("--latency-ms", rich_help_panel=TARGET, help="Latency budget on --device.")
    ] = None,
    target_macs: Annotated[
        float | None, typer.Option("--target-macs", rich_help_panel=TARGET, help="Keep this share of MACs.")
    ] = None,
    max_accuracy_drop: Annotated[
        float,
        typer.Option(
            rich_help_panel=TARGET,
            help="Accuracy bound: the drop of the task's metric (top-1, mAP50-95) the delivered model may have "
            "(0.02: 2 points).",
        ),  # fmt: skip
    ] = 0.02,
    allow_miss: Annotated[
        bool,
        typer.Option(
            "--allow-miss",
            rich_help_panel=TARGET,
            help="Accept a delivered model that misses the budget or the accuracy bound (exit 0; default: exit 3).",
        ),  # fmt: skip
    ] = False,
    model: Annotated[
        str | None,
        typer.Option("--model", rich_help_panel=MODEL, help="Your model (any source); else one is searched."),
    ] = None,
    model_arg: ModelArgOpt = None,
    input_shape: ShapeOpt = None,
    image_size: ImageSizeOpt = None,
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            metavar="DATA",
            rich_help_panel=DATA,
            help="Data for INT8 calibration and for judging compressions (default: --data).",
        ),  # fmt: skip
    ] = None,
    device: Annotated[
        str, typer.Option(rich_help_panel=MEASURE, help="local, or a device added with 'presso devices add'.")
    ] = "local",
    precision: Annotated[str, typer.Option("--precision", "-p", rich_help_panel=TARGET, help="fp32 | fp16 | int8.")] = (
        "int8"
    ),
    train_epochs: Annotated[
        int, typer.Option(help="Epochs when the model must be trained (or the searched one).")
    ] = 10,
    recover_epochs: Annotated[int, typer.Option(help="Distillation epochs after compression.")] = 5,
    qat_epochs: Annotated[
        int,
        typer.Option(
            help="Also fine-tune the recovered model with QAT for this many epochs: one more INT8 "
            "candidate, its INT8 learned rather than calibrated (0: off)."
        ),
    ] = 0,
    search_trials: Annotated[int, typer.Option(help="Trials when searching a model.")] = 16,
    search_proxy_epochs: Annotated[int, typer.Option(help="Proxy training epochs per searched candidate.")] = 2,
    threads: Annotated[
        int | None, typer.Option(rich_help_panel=MEASURE, help="Runtime threads the budget is for (default: all).")
    ] = None,
    db: Annotated[str | None, typer.Option(rich_help_panel=MEASURE, help="Latency database URL or path.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data splits, training and search.")] = 0,
    overwrite: OverwriteOpt = False,
    task: TaskOpt = None,
    weights: WeightsOpt = None,
    new_head: NewHeadOpt = False,
    trust: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """From data (and your model, if any) to a compressed, quantized, measured and packaged model + report.

    The original and the compressed model, each at FP32 and at --precision, are measured side by side on the
    device; the fastest that keeps the accuracy bound and meets the budget is delivered (deploy/bundle.zip), and the
    summary says why. When none does both, the closest is delivered and the run exits 3 (0 with --allow-miss).
    Reruns skip finished stages whose settings are unchanged; a killed run resumes.
    """

    def body():
        from presso.pipeline import RunConfig, run

        cfg = RunConfig(
            device=device, latency_ms=latency_ms, target_macs=target_macs, model=model,
            model_args=_model_kwargs(model_arg), image_size=_image_size(image_size, input_shape), calib=calib,
            precision=precision, train_epochs=train_epochs, recover_epochs=recover_epochs, qat_epochs=qat_epochs,
            search_trials=search_trials, search_proxy_epochs=search_proxy_epochs,
            max_accuracy_drop=max_accuracy_drop, allow_miss=allow_miss, threads=threads, db=db, seed=seed, task=task,
            weights=weights, new_head=new_head,
        )  # fmt: skip
        # a bar over the pipeline's stages (and a line as each starts), below it the bars of what the stage runs
        with ProgressBars(describe={"pipeline": _stage_text}, prune=True) as bars:

            def progress(event) -> None:
                if event.stage == "pipeline" and "name" in event.info:
                    bars.progress.console.print(_stage_text(event), highlight=False)
                bars(event)

            result = run(data, cfg, output_dir=output, progress=progress, trust=trust, overwrite=overwrite)
        _emit(result.summary(), as_json, lambda s: _render_run(s, output))
        if not result.ok:
            f = result.figures
            met = (("the budget", f["budget_met"]), ("the accuracy bound", f["accuracy_bound_met"]))
            missed = [what for what, ok in met if not ok]
            err.print(f"[red]missed:[/red] the delivered model ({result.figures['delivered']['label']}) misses "
                      f"{' and '.join(missed)}; it is kept in {output}. Pass --allow-miss to accept it.",
                      highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(MISS_EXIT)

    _run(body)


def _image_size(image_size: str | None, input_shape: str | None) -> tuple[int, int] | None:
    """(H, W) from --image-size, or from --input-shape 1,C,H,W; both given must agree."""
    from presso.data import parse_image_size
    from presso.errors import ConfigError
    from presso.models.spec import InputSpec

    size = parse_image_size(image_size)
    if input_shape:
        tensors = InputSpec.parse(input_shape).tensors
        if len(tensors) != 1 or len(tensors[0].shape) != 4:
            raise ConfigError(f"--input-shape '{input_shape}': presso run takes one image input, N,C,H,W.")
        hw = tuple(int(v) for v in tensors[0].shape[-2:])
        if size is not None and size != hw:
            raise ConfigError(f"--input-shape {input_shape} and --image-size {image_size} disagree: give one.")
        size = hw
    return size


def _stage_text(event) -> str:
    if "name" not in event.info:
        return "[bold]pipeline[/bold]: done"
    k = f"stage {int(event.done) + 1}/{int(event.total)} " if event.total else ""
    return f"{k}[bold]{event.info['name']}[/bold]: {'reusing' if event.info['cached'] else 'running'}"


def _render_run(s: dict[str, Any], output: Path) -> None:
    out = Console()
    if s.get("delivered"):
        for i, line in enumerate(s.get("headline") or []):
            bad = "BREACHED" in line or "MISSED" in line
            out.print(f"[red]{line}[/red]" if bad else f"[bold]{line}[/bold]" if i == 0 else line, highlight=False,
                      soft_wrap=True)  # fmt: skip
    t = Table(title=f"candidates, measured side by side on {s['budget']['device']} (* delivered)")
    for col in ("candidate", "ms", "speed-up", "size", "top-1", "drop", "bound", "budget"):
        t.add_column(col)
    cands = s.get("candidates") or []
    ref = next((c for c in cands if c["id"] == "original-fp32"), {})
    chosen = (s.get("delivered") or {}).get("candidate")
    for c in sorted(cands, key=lambda c: c["latency_ms"]):
        speed = f"{ref['latency_ms'] / c['latency_ms']:.2f}x" if ref.get("latency_ms") else "-"
        acc = f"{c['accuracy']:.4f}" if c.get("accuracy") is not None else "-"
        drop = f"{c['accuracy_drop_points']:+.2f}" if c.get("accuracy_drop_points") is not None else "-"
        name = f"[bold]* {c['label']}[/bold]" if c["id"] == chosen else c["label"]
        size = _human(c["size_bytes"]) + "B" if c.get("size_bytes") else "-"
        t.add_row(name, f"{c['latency_ms']:.3f}", speed, size, acc, drop,
                  "ok" if c.get("accuracy_ok") else "[red]over[/red]",
                  "met" if c.get("budget_ok") else "[red]missed[/red]")  # fmt: skip
    out.print(t)
    stages = Table(title=f"stages of presso run: {s['data']}")
    for col in ("stage", "top-1", "MACs", "time s", "note"):
        stages.add_column(col)
    for name in ("original", "compress", "recover"):
        r = (s.get("stages") or {}).get(name) or {}
        if r:
            acc = r.get("val_top1")
            note = r.get("skipped") or r.get("how") or r.get("why") or ""
            top1 = f"{acc:.4f}" if acc is not None else "-"
            stages.add_row(name, top1, str(r.get("macs", "-")), f"{r.get('seconds', 0):.0f}", note)
    out.print(stages)
    for note in s.get("notes") or []:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    if s.get("bundle"):
        out.print(f"bundle: [bold]{output / 'deploy' / 'bundle.zip'}[/bold] (from {s['bundle'].get('from')})")
    out.print(f"report: [bold]{output / 'report.html'}[/bold]  (summary.json beside it; {_duration(_elapsed())})")
