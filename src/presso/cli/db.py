"""``presso db``: the latency database -- list, export, import -- and profiling a device for the latency predictor.

Nothing heavy (SQLAlchemy, ONNX Runtime) is imported at module level, so ``presso --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import JsonOpt, ProgressBars, _duration, _elapsed, _emit, _run, app, err
from presso.cli.bench import DbOpt, DeviceOpt, ThreadsOpt

db = typer.Typer(help="The latency database: list, export, import, profile a device.", no_args_is_help=True)
app.add_typer(db, name="db")


@db.command("list")
def db_list(
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    kind: Annotated[str, typer.Option(help="model | kernel | overhead | all.")] = "model",
    limit: Annotated[int, typer.Option(help="At most this many rows (latest).")] = 50,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measurements in the latency database."""

    def body():
        from presso.bench.latency_db import LatencyDB

        store = LatencyDB(db_url)
        rows = store.rows(device=device, kind=None if kind == "all" else kind)[-limit:]
        keep = (
            "created_at",
            "kind",
            "device",
            "model_name",
            "input_shape",
            "runtime",
            "threads",
            "precision",
            "median_ms",
            "p90_ms",
            "noise_pct",
            "noisy",
            "model_fp",
            "device_fp",
            "kernel_key",
        )
        payload = {"count": store.count(), "rows": [{k: r[k] for k in keep} for r in rows]}

        def render(p):
            t = Table(title=f"latency database ({p['count']} rows)")
            for col in ("device", "model", "shape", "runtime/threads", "median ms", "p90 ms", "noise %"):
                t.add_column(col)
            for r in p["rows"]:
                t.add_row(
                    r["device"],
                    str(r["model_name"] or r["kernel_key"]),
                    str(r["input_shape"] or ""),
                    f"{r['runtime']}/{r['threads']}",
                    f"{r['median_ms']:.3f}",
                    f"{r['p90_ms'] or 0:.3f}",
                    f"{r['noise_pct'] or 0:.1f}" + (" noisy" if r["noisy"] else ""),
                )
            Console().print(t)

        _emit(payload, as_json, render)

    _run(body)


@db.command("export")
def db_export(
    path: Annotated[Path, typer.Argument(help="Output file: .json or .csv.")],
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    db_url: DbOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace FILE if it exists (it is replaced only once the export is complete)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write measurements to a JSON or CSV file (to share a device farm's measurements); an existing file is kept
    unless --overwrite."""

    def body():
        from presso.bench.latency_db import LatencyDB

        n = LatencyDB(db_url).export(path, device=device, overwrite=overwrite)
        _emit({"exported": n, "path": str(path)}, as_json, lambda p: err.print(f"exported {n} rows to {path}"))

    _run(body)


@db.command("import")
def db_import(
    path: Annotated[Path, typer.Argument(help="A file written by 'presso db export'.")],
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add the measurements of an export; rows already present are skipped."""

    def body():
        from presso.bench.latency_db import LatencyDB

        added, skipped = LatencyDB(db_url).import_(path)
        _emit(
            {"added": added, "skipped": skipped},
            as_json,
            lambda p: err.print(f"imported {added} rows ({skipped} already present)"),
        )

    _run(body)


SizeOpt = Annotated[
    str,
    typer.Option(
        metavar="SIZE",
        help="full: 1041 kernel models and 48 calibration networks, 1-5 min on a quiet 2-core machine, up to 12 min "
        "on a busy one (it waits for quiet moments) | quick: 29 and 4, about 4 s on an idle 2-core machine, up to "
        "about a minute under load (a smoke test: too few kernels to predict from).",
    ),
]
AgainOpt = Annotated[
    bool,
    typer.Option(
        "--again",
        help="Time every kernel again (each one's new rows replace its old ones). Without it a run resumes: the "
        "kernels already stored for this device and settings are skipped.",
    ),
]


def _profile_step(device: str):
    def describe(e) -> str:
        resumed = e.info.get("resumed")
        text = f"[bold]profiling {device}[/bold] kernel models"
        if resumed:
            text += f" ({resumed:g} stored by an earlier run)"
        return text + (f" -- {e.info['phase']}" if e.info.get("phase") else "")

    return describe


@db.command("profile")
def db_profile(
    device: DeviceOpt = "local",
    threads: ThreadsOpt = None,
    size: SizeOpt = "full",
    again: AgainOpt = False,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Profile a device for the latency predictor: time the calibration kernel set there and store every kernel.

    Each kernel is stored as soon as it is timed: an interrupted run, started again, goes on where it stopped.
    """

    def body():
        from presso.bench.profile import profile_device

        with ProgressBars(describe={"profile": _profile_step(device)}) as bars:
            result = profile_device(device, threads=threads, size=size, db=db_url, again=again, progress=bars)
        _emit(
            {**result.summary(), "wall_seconds": round(_elapsed(), 1)},
            as_json,
            lambda p: err.print(
                f"profiled {p['kernels']} kernels"
                + (f" and {p['networks']} calibration networks" if p["networks"] else "")
                + f" on {p['device']} ({p['threads']} threads) in "
                f"{_duration(p['wall_seconds'])}"
                + (f"; {p['resumed']} kernel models were already stored (--again times them anew)" if p["resumed"]
                   else ""),
                soft_wrap=True,
            ),
        )  # fmt: skip

    _run(body)


@db.command("calibrate", hidden=True)
def db_calibrate(
    device: DeviceOpt = "local",
    threads: ThreadsOpt = None,
    size: SizeOpt = "full",
    again: AgainOpt = False,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deprecated: 'presso db profile'."""
    err.print("[yellow]'presso db calibrate' is now 'presso db profile'.[/yellow]")
    db_profile(device=device, threads=threads, size=size, again=again, db_url=db_url, as_json=as_json)
