"""``presso run``: the whole pipeline, from data to a measured, packaged model and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import DataOpt, JsonOpt, OverwriteOpt, ProgressBars, TrustOpt, _emit, _run, app


@app.command(name="run")
def run_(
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (stages, report, bundle).")],
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="Latency budget on --device.")] = None,
    target_macs: Annotated[float | None, typer.Option("--target-macs", help="Keep this share of MACs.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Your model (any source); else one is searched.")] = None,
    device: Annotated[str, typer.Option(help="local, or a device added with 'presso devices add'.")] = "local",
    precision: Annotated[str, typer.Option("--precision", "-p", help="fp32 | fp16 | int8.")] = "int8",
    train_epochs: Annotated[
        int, typer.Option(help="Epochs when the model must be trained (or the searched one).")
    ] = 10,
    recover_epochs: Annotated[int, typer.Option(help="Distillation epochs after compression.")] = 5,
    search_trials: Annotated[int, typer.Option(help="Trials when searching a model.")] = 16,
    search_proxy_epochs: Annotated[int, typer.Option(help="Proxy training epochs per searched candidate.")] = 2,
    max_accuracy_drop: Annotated[float, typer.Option(help="Accuracy drop the run may accept (reported).")] = 0.02,
    threads: Annotated[int | None, typer.Option(help="Runtime threads the budget is for.")] = None,
    db: Annotated[str | None, typer.Option(help="Latency database URL or path.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data splits, training and search.")] = 0,
    overwrite: OverwriteOpt = False,
    trust: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """From data (and your model, if any) to a compressed, quantized, measured and packaged model + report.

    Reruns skip finished stages whose settings are unchanged; a killed run resumes.
    """

    def body():
        from presso.pipeline import RunConfig, run

        cfg = RunConfig(
            device=device, latency_ms=latency_ms, target_macs=target_macs, model=model, precision=precision,
            train_epochs=train_epochs, recover_epochs=recover_epochs, search_trials=search_trials,
            search_proxy_epochs=search_proxy_epochs,
            max_accuracy_drop=max_accuracy_drop, threads=threads, db=db, seed=seed,
        )  # fmt: skip
        # a bar over the pipeline's stages (and a line as each starts), below it the bars of what the stage runs
        with ProgressBars(describe={"pipeline": _stage_text}, prune=True) as bars:

            def progress(event) -> None:
                if event.stage == "pipeline" and "name" in event.info:
                    bars.progress.console.print(_stage_text(event), highlight=False)
                bars(event)

            result = run(data, cfg, output_dir=output, progress=progress, trust=trust, overwrite=overwrite)
        _emit(result.summary(), as_json, lambda s: _render_run(s, output))

    _run(body)


def _stage_text(event) -> str:
    if "name" not in event.info:
        return "[bold]pipeline[/bold]: done"
    return f"[bold]{event.info['name']}[/bold]: {'reusing' if event.info['cached'] else 'running'}"


def _render_run(s: dict[str, Any], output: Path) -> None:
    out = Console()
    prec = s["config"]["precision"]
    t = Table(title=f"presso run: {s['data']}")
    for col in ("stage", "top-1", "latency ms", "size (bytes)", "time s", "note"):
        t.add_column(col)
    st = s["stages"]
    for name in ("original", "compress", "recover"):
        r = st.get(name) or {}
        if r:
            acc = r.get("val_top1")
            t.add_row(name, f"{acc:.4f}" if acc is not None else "-", "-", str(r.get("size_bytes", "-")),
                      f"{r.get('seconds', 0):.0f}", r.get("skipped") or r.get("how") or r.get("why") or "")  # fmt: skip
    for name in ("baseline", "deploy"):
        for p in ("fp32", prec):
            r = (st.get(name) or {}).get(p)
            if r:
                a = (r.get("accuracy") or {}).get("converted_top1")
                t.add_row(f"{name} {p}", f"{a:.4f}" if a is not None else "-", f"{r['latency_ms']:.3f}",
                          str(r.get("size_bytes")), "", ", ".join(r.get("fallback_layers") or []))  # fmt: skip
    out.print(t)
    for note in s.get("notes") or []:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    b, a = s["budget"], s["accuracy"]
    if "met" in b:
        out.print(f"budget {'met' if b['met'] else 'MISSED'}: {b}", highlight=False)
    if a.get("drop") is not None:
        out.print(f"accuracy {a['original']:.4f} -> {a['final']:.4f} (drop {a['drop']:+.4f})", highlight=False)
    out.print(f"bundle: [bold]{output / 'deploy' / 'bundle.zip'}[/bold]")
    out.print(f"report: [bold]{output / 'report.html'}[/bold]  (summary.json beside it; {s['seconds']:.0f}s)")
