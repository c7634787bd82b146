"""The bench verbs: ``benchmark``, ``predict-latency``, and the ``devices``, ``agent`` and ``db`` command groups.

Each command is a thin layer over ``presso.bench``; nothing heavy (ONNX Runtime, SQLAlchemy, FastAPI) is imported
at module level, so ``presso --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import (
    JsonOpt,
    ModelArgOpt,
    ProgressBars,
    ShapeOpt,
    TrustOpt,
    _emit,
    _input_spec,
    _load,
    _run,
    app,
    err,
)

DeviceOpt = Annotated[str, typer.Option("--device", "-D", help="'local' or a device added with 'presso devices add'.")]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="Latency database: SQLAlchemy URL or file (default $PRESSO_HOME/latency.db).")
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Intra-op threads (default: all cores).")]


def _model_and_spec(source: str, trust: bool, model_arg, input_shape: str | None) -> tuple[Any, str | None]:
    """An .onnx path as it is (its own input shapes, unless given), or the loaded model and its input spec."""
    if source.endswith(".onnx"):
        return source, input_shape
    model, _ = _load(source, trust, model_arg)
    return model, str(_input_spec(source, model, input_shape))


devices = typer.Typer(help="Named benchmark devices (remote agents).", no_args_is_help=True)
agent = typer.Typer(help="The benchmark agent that runs on a device.", no_args_is_help=True)
db = typer.Typer(help="The latency database: list, export, import, profile a device.", no_args_is_help=True)
app.add_typer(devices, name="devices")
app.add_typer(agent, name="agent")
app.add_typer(db, name="db")


@app.command()
def benchmark(
    source: Annotated[str, typer.Argument(help="A model source (torchvision:NAME, ...), a model dir, or .onnx.")],
    device: DeviceOpt = "local",
    runtime: Annotated[str, typer.Option(help="onnxruntime | openvino | torch.")] = "onnxruntime",
    threads: ThreadsOpt = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Batch size (replaces the first dimension).")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | int8: checked against the model (default: as it is).")
    ] = None,
    input_shape: ShapeOpt = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 10,
    repeat: Annotated[int, typer.Option(help="Timed runs (at most).")] = 50,
    max_seconds: Annotated[float, typer.Option(help="Stop timing after this long (at least 3 runs).")] = 30.0,
    profile: Annotated[bool, typer.Option("--profile", help="Top operators by time (ONNX Runtime).")] = False,
    db_url: DbOpt = None,
    no_db: Annotated[bool, typer.Option("--no-db", help="Do not store the measurement.")] = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency of a model on a device: median/p90/p99, throughput, peak memory, noise; stored in the database."""

    def body():
        from presso.bench.api import benchmark as run

        model, spec = _model_and_spec(source, trust, model_arg, input_shape)
        with ProgressBars(describe={"benchmark": lambda e: f"[bold]benchmark on {device}[/bold]"}) as bars:
            result = run(
                model,
                device,
                input_shape=str(spec) if spec else None,
                runtime=runtime,
                threads=threads,
                batch=batch,
                precision=precision,
                warmup=warmup,
                repeat=repeat,
                max_seconds=max_seconds,
                profile=profile,
                db=False if no_db else db_url,
                progress=bars,
            )
        _emit({**result.summary(), "model": source}, as_json, _render_benchmark)

    _run(body)


@devices.command("add")
def devices_add(
    name: Annotated[str, typer.Argument(help="A short name, used as --device NAME.")],
    url: Annotated[str, typer.Argument(help="The agent's URL, e.g. http://10.0.0.7:8765.")],
    token_file: Annotated[Path, typer.Option("--token-file", help="File holding the agent's bearer token.")],
    check: Annotated[bool, typer.Option("--check/--no-check", help="Contact the agent now.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Register a remote device running 'presso agent serve'."""

    def body():
        from dataclasses import asdict

        from presso.bench.devices import add_device

        d = add_device(name, url, token_file)
        payload: dict[str, Any] = asdict(d)
        if check:
            from presso.bench.client import AgentClient

            payload["info"] = AgentClient.for_device(name).info()
        _emit(payload, as_json, lambda p: err.print(f"added device [bold]{p['name']}[/bold] ({p['url']})"))

    _run(body)


@devices.command("list")
def devices_list(as_json: JsonOpt = False) -> None:
    """The registered devices ('local' is always there)."""

    def body():
        from dataclasses import asdict

        from presso.bench.devices import list_devices

        rows = [{"name": "local", "url": None, "token_file": None}] + [asdict(d) for d in list_devices()]

        def render(p):
            t = Table(title="presso devices")
            for col in ("name", "url", "token_file"):
                t.add_column(col)
            for r in p["devices"]:
                t.add_row(r["name"], r["url"] or "(this machine)", r["token_file"] or "")
            Console().print(t)

        _emit({"devices": rows}, as_json, render)

    _run(body)


@devices.command("remove")
def devices_remove(name: Annotated[str, typer.Argument(help="Device name.")]) -> None:
    """Forget a registered device."""

    def body():
        from presso.bench.devices import remove_device

        remove_device(name)
        err.print(f"removed device {name}")

    _run(body)


@agent.command("serve")
def agent_serve(
    token_file: Annotated[Path, typer.Option("--token-file", help="File holding the bearer token clients send.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    name: Annotated[str, typer.Option(help="The name this device reports.")] = "agent",
    max_upload_mb: Annotated[float, typer.Option(help="Largest model accepted (MiB).")] = 512.0,
    measure_timeout: Annotated[
        float,
        typer.Option(help="Wall-clock limit of one measurement (s), session creation and warm-up included."),
    ] = 60.0,
    max_input_elements: Annotated[
        int, typer.Option(help="Most input elements one request may ask for (all inputs together).")
    ] = 64 * 2**20,
) -> None:
    """Serve benchmarks of uploaded ONNX models on this device (one at a time, each in a child process with a time
    limit), behind a bearer token. SIGTERM or Ctrl-C stops it cleanly."""

    def body():
        from presso.bench.agent import serve
        from presso.bench.devices import read_token

        token = read_token(token_file)
        err.print(
            f"presso agent '{name}' on http://{host}:{port} (max upload {max_upload_mb:g} MiB, "
            f"{measure_timeout:g} s per measurement, {max_input_elements:,} input elements)"
        )
        serve(
            token,
            host,
            port,
            name=name,
            max_upload_mb=max_upload_mb,
            measure_timeout=measure_timeout,
            max_input_elements=max_input_elements,
        )
        err.print(f"presso agent '{name}' stopped")

    _run(body)


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
                    f"{r['noise_pct'] or 0:.1f}",
                )
            Console().print(t)

        _emit(payload, as_json, render)

    _run(body)


@db.command("export")
def db_export(
    path: Annotated[Path, typer.Argument(help="Output file: .json or .csv.")],
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write measurements to a JSON or CSV file (to share a device farm's measurements)."""

    def body():
        from presso.bench.latency_db import LatencyDB

        n = LatencyDB(db_url).export(path, device=device)
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


@db.command("profile")
def db_profile(
    device: DeviceOpt = "local",
    threads: ThreadsOpt = None,
    size: Annotated[str, typer.Option(help="full (a few minutes) | quick (seconds, a smoke test).")] = "full",
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Profile a device for the latency predictor: time the calibration kernel set there and store every kernel."""

    def body():
        from presso.bench.profile import profile_device

        with ProgressBars(describe={"profile": lambda e: f"[bold]profiling {device}[/bold]"}) as bars:
            result = profile_device(device, threads=threads, size=size, db=db_url, progress=bars)
        _emit(
            result.summary(),
            as_json,
            lambda p: err.print(
                f"profiled {p['kernels']} kernels on {p['device']} ({p['threads']} threads) in {p['seconds']}s"
            ),
        )

    _run(body)


@db.command("calibrate", hidden=True)
def db_calibrate(
    device: DeviceOpt = "local",
    threads: ThreadsOpt = None,
    size: Annotated[str, typer.Option(help="full | quick.")] = "full",
    db_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deprecated: 'presso db profile'."""
    err.print("[yellow]'presso db calibrate' is now 'presso db profile'.[/yellow]")
    db_profile(device=device, threads=threads, size=size, db_url=db_url, as_json=as_json)


@app.command("predict-latency")
def predict_latency(
    source: Annotated[str, typer.Argument(help="A model source, a model dir, or .onnx.")],
    device: DeviceOpt = "local",
    threads: ThreadsOpt = None,
    input_shape: ShapeOpt = None,
    db_url: DbOpt = None,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict a model's latency on a profiled device (sum of its kernels), without running it there."""

    def body():
        from presso.bench.api import predict_latency as predict

        model, spec = _model_and_spec(source, trust, model_arg, input_shape)
        with ProgressBars() as bars:
            pred = predict(model, device, input_shape=spec, threads=threads, db=db_url, progress=bars)
        payload = {"model": source, **pred.summary()}
        _emit(
            payload,
            as_json,
            lambda p: Console().print(
                f"predicted {p['latency_ms']:.3f} ms on {p['device']} ({p['kernels']} kernels: {p['looked_up']} "
                f"looked up, {p['estimated']} estimated, {p['unknown']} unknown)"
            ),
        )

    _run(body)


def _render_benchmark(s: dict[str, Any]) -> None:
    out = Console()
    lat = s["latency_ms"]
    t = Table(
        title=f"presso benchmark: {s['model']} on {s['device']} ({s['runtime']} {s['runtime_version']}, "
        f"{s['threads']} threads, batch {s['batch']})"
    )
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in ("median", "p90", "p99", "mean", "std", "min"):
        t.add_row(f"latency {k} (ms)", f"{lat[k]:.3f}")
    t.add_row("noise (block-median spread)", f"{s['noise_pct']:.1f}%")
    t.add_row("throughput (samples/s)", f"{s['throughput']:.1f}")
    t.add_row("peak memory (MB)", f"{s['peak_memory_mb']:.1f}")
    t.add_row("model size (bytes)", str(s["model_size_bytes"]))
    env = s["environment"]
    t.add_row("CPU", f"{env.get('cpu')} ({env.get('cores')} cores)")
    t.add_row("runs", str(s["runs"]))
    out.print(t)
    if s.get("profile"):
        pt = Table(title=f"top operators (ONNX Runtime profiler, {s['profile']['kernel_total_ms']:.3f} ms of kernels)")
        pt.add_column("op")
        pt.add_column("nodes", justify="right")
        pt.add_column("ms", justify="right")
        pt.add_column("share", justify="right")
        for o in s["profile"]["ops"]:
            pt.add_row(o["op"], str(o["nodes"]), f"{o['ms']:.3f}", f"{o['share']:.1%}")
        out.print(pt)
