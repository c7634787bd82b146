"""``presso search``: a MobileNet-style model for a dataset and a latency budget (a thin layer over presso.search)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import DataOpt, JsonOpt, OverwriteOpt, ProgressBars, _duration, _elapsed, _emit, _run, app
from presso.cli.db import _profile_step


@app.command()
def search(
    data: DataOpt,
    latency_ms: Annotated[float, typer.Option("--latency-ms", help="Latency budget on --device (batch 1).")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output directory (study, report, model): new, empty, or an earlier search's (resumed); see "
            "--overwrite.",
        ),
    ],
    device: Annotated[str, typer.Option(help="local, or a device added with 'presso devices add'.")] = "local",
    trials: Annotated[int, typer.Option(help="Finished trials the study should hold (trained + skipped).")] = 30,
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Stop this worker after MIN minutes.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage: SQLAlchemy URL (postgresql://...) shared by workers, or a path."),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name (workers joining one study use the same).")] = None,
    db: Annotated[str | None, typer.Option(help="Latency database URL or path.")] = None,
    space: Annotated[str, typer.Option(help="Search space.")] = "mobilenet",
    proxy_epochs: Annotated[int, typer.Option(help="Proxy training epochs per candidate.")] = 2,
    proxy_fraction: Annotated[float, typer.Option(help="Share of the training split for proxies.")] = 0.25,
    final_epochs: Annotated[int, typer.Option(help="Epochs of the winner's full training.")] = 15,
    measure_top: Annotated[int, typer.Option(help="Best candidates measured on the device.")] = 3,
    threads: Annotated[int | None, typer.Option(help="Runtime threads the budget is for.")] = None,
    seed: Annotated[int, typer.Option(help="Sampler and training seed.")] = 0,
    max_params: Annotated[
        int | None, typer.Option("--max-params", help="Parameter budget: larger candidates are skipped untrained.")
    ] = None,
    final: Annotated[
        bool, typer.Option("--final/--no-final", help="Train the winner (one worker of a shared study).")
    ] = True,
    heartbeat: Annotated[
        int, typer.Option(help="Seconds between worker heartbeats; 4 missed: the trial is retried elsewhere.")
    ] = 10,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Search a MobileNet-style model for a dataset and a latency budget (Optuna; latency predicted first).

    Candidates predicted over the budget are skipped before training; the best feasible ones are measured on
    the device and the winner is trained fully into OUTPUT/model, with OUTPUT/pareto.png and trials.csv.
    Workers on many machines share a study with --storage postgresql://... --study NAME. A folder holding only an
    earlier search's files is resumed; the winner it holds is kept, and replaced by another only with --overwrite.
    """

    def body():
        import presso
        from presso.search.nas import SearchConfig

        cfg = SearchConfig(
            latency_ms=latency_ms, device=device, trials=trials, time_budget_min=time_budget, space=space,
            proxy_epochs=proxy_epochs, proxy_fraction=proxy_fraction, final_epochs=final_epochs,
            measure_top=measure_top, threads=threads, seed=seed, final=final, heartbeat_s=heartbeat,
            max_params=max_params,
        )  # fmt: skip
        # a bar over finished trials, a line per trial, the winner's training; the device's kernels first if the
        # latency database has none for it (kernel models done of the set, as 'presso db profile' shows them)
        with ProgressBars(describe={"profile": _profile_step(device)}) as bars:
            result = presso.search(data, cfg, output_dir=output, storage=storage, study=study, db=db, progress=bars,
                                   overwrite=overwrite)  # fmt: skip
        _emit({**result.summary(), "wall_seconds": round(_elapsed(), 1)}, as_json, _render_search)

    _run(body)


def _render_search(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"Pareto front (feasible, proxy top-1 vs predicted latency) -- study {s['study']}")
    for col in ("trial", "params", "predicted ms", "measured ms", "proxy top-1", "warm start"):
        t.add_column(col, justify="right")
    for r in s["pareto"]:
        measured = f"{r['measured_ms']:.3f}" if r["measured_ms"] else "-"
        t.add_row(str(r["number"]), str(r["params"]), f"{r['predicted_ms']:.3f}", measured, f"{r['proxy_top1']:.4f}",
                  r["zoo"] or "")  # fmt: skip
    out.print(t)
    n = s["trials"]
    out.print(
        f"trials: {n['finished']} finished -- {n['trained']} trained, {n['skipped_by_predictor']} skipped by the "
        f"latency predictor, {n.get('skipped_over_params', 0)} over the parameter budget, {n['duplicates']} "
        f"duplicates reused, {n['failed']} failed",
        highlight=False,
    )
    if s.get("best"):
        b = s["best"]
        out.print(
            f"chosen: trial {b['trial']} ({b['params']} params, input {b['input_shape']}): top-1 {b['val_top1']:.4f} "
            f"after {b['epochs']} epochs, measured {b['measured_ms']:.3f} ms (budget {s['config']['latency_ms']:g})",
            highlight=False,
        )
        out.print(f"model: [bold]{b['model_dir']}[/bold]")
    took = _duration(s.get("wall_seconds", s["seconds"]))
    out.print(f"report: {s['output_dir']}/pareto.png, trials.csv, search.json ({took})")
