"""The bench verbs: ``benchmark``, ``predict-latency``, and the ``devices`` and ``agent`` command groups (``db``:
``presso.cli.db``).

Each command is a thin layer over ``presso.bench``; nothing heavy (ONNX Runtime, SQLAlchemy, FastAPI) is imported
at module level, so ``presso --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.bench.results import NOISY_PCT
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
from presso.cli.panels import MEASURE, OUTPUT

DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", "-D", metavar="DEVICE", rich_help_panel=MEASURE,
        help="'local' or a device added with 'presso devices add'.",
    ),
]  # fmt: skip
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db", metavar="URL|FILE", rich_help_panel=OUTPUT,
        help="Latency database: SQLAlchemy URL or file (default $PRESSO_HOME/latency.db).",
    ),
]  # fmt: skip
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", rich_help_panel=MEASURE, help="Intra-op threads (default: all cores).")
]


def _model_and_spec(
    source: str, trust: bool, model_arg, input_shape: str | None, runtime: str | None = None
) -> tuple[Any, str | None]:
    """An export as it is -- an .onnx file, an OpenVINO .xml, a 'presso convert' folder: its own input shapes,
    unless given -- or the loaded model and its input spec. Exports are routed before any model loading."""
    from presso.bench.exports import export_path

    if export_path(source, runtime) is not None:
        return source, input_shape
    model, _ = _load(source, trust, model_arg)
    return model, str(_input_spec(source, model, input_shape))


devices = typer.Typer(help="Named benchmark devices (remote agents).", no_args_is_help=True)
agent = typer.Typer(help="The benchmark agent that runs on a device.", no_args_is_help=True)
app.add_typer(devices, name="devices")
app.add_typer(agent, name="agent")


@app.command()
def benchmark(
    source: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A model source (torchvision:NAME, ...), a model dir, an .onnx file, an OpenVINO .xml "
            "(--runtime openvino), a LiteRT .tflite (--runtime litert), or a folder from 'presso convert'.",
        ),
    ],
    device: DeviceOpt = "local",
    runtime: Annotated[
        str,
        typer.Option(metavar="NAME", rich_help_panel=MEASURE, help="onnxruntime | openvino | litert | torch."),
    ] = "onnxruntime",
    threads: ThreadsOpt = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch", rich_help_panel=MEASURE, help="Batch size (replaces the first dimension)."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            metavar="PRECISION",
            rich_help_panel=MEASURE,
            help="fp32 | fp16 | int8: checked against the model (default: as it is).",
        ),
    ] = None,
    input_shape: ShapeOpt = None,
    warmup: Annotated[int, typer.Option(rich_help_panel=MEASURE, help="Untimed runs first.")] = 10,
    repeat: Annotated[int, typer.Option(rich_help_panel=MEASURE, help="Timed runs (at most).")] = 50,
    max_seconds: Annotated[
        float, typer.Option(rich_help_panel=MEASURE, help="Stop timing after this long (at least 3 runs).")
    ] = 30.0,
    profile: Annotated[
        bool, typer.Option("--profile", rich_help_panel=MEASURE, help="Top operators by time (ONNX Runtime).")
    ] = False,
    db_url: DbOpt = None,
    no_db: Annotated[
        bool, typer.Option("--no-db", rich_help_panel=OUTPUT, help="Do not store the measurement.")
    ] = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency of a model on a device: median/p90/p99, throughput, peak memory, noise; stored in the database."""

    def body():
        from presso.bench.api import benchmark as run

        model, spec = _model_and_spec(source, trust, model_arg, input_shape, runtime)
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
        if result.noisy:
            err.print(
                f"[yellow]warning:[/yellow] this run's noise is {result.noise_pct:.0f}% (its block medians spread "
                f"more than {NOISY_PCT:g}%): the machine was busy. The measurement is flagged noisy in the database; "
                "rerun it when the machine is quiet.",
                highlight=False,
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
