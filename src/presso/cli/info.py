"""``presso info`` and ``presso env``: a model's figures, and the versions and devices for bug reports."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from presso.cli.app import (
    JsonOpt,
    ModelArgOpt,
    ShapeOpt,
    SourceArg,
    TrustOpt,
    _emit,
    _human,
    _input_spec,
    _load,
    _run,
    app,
)


@app.command()
def info(
    source: SourceArg,
    input_shape: ShapeOpt = None,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Params, MACs, size and per-layer channels of a model."""

    def body():
        import presso

        model, _ = _load(source, trust, model_arg)
        spec = _input_spec(source, model, input_shape)
        figures = presso.info(model, spec)
        _emit({"source": source, **figures.summary()}, as_json, _render_info)

    _run(body)


@app.command()
def env(as_json: JsonOpt = False) -> None:
    """Versions and devices, for bug reports."""
    from presso.bench.env import bug_report

    payload = bug_report()

    def render(p):
        t = Table(title="presso env")
        t.add_column("item")
        t.add_column("value")
        for k, v in p.items():
            if k != "packages":
                t.add_row(k, str(v))
        for k, v in p["packages"].items():
            t.add_row(k, str(v))
        Console().print(t)

    _emit(payload, as_json, render)


def _render_info(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso info: {s['source']} @ {s['input_shape']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("params", f"{_human(s['params'])} ({s['params']})")
    t.add_row("MACs", f"{_human(s['macs'])} ({s['macs']})")
    t.add_row("size (bytes)", f"{_human(s['size_bytes'])} ({s['size_bytes']})")
    t.add_row("conv/linear layers", str(len(s["per_layer"])))
    out.print(t)
