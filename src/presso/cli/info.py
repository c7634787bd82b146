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
    """Params, MACs, size and per-layer channels of a model; of an export (.onnx, OpenVINO .xml, a 'presso convert'
    folder): its inputs, outputs, opset, size and parameter count, read from the graph."""

    def body():
        import presso
        from presso.bench.exports import export_info, export_path

        path = export_path(source)  # an export is read as a graph, never loaded as a PyTorch model
        if path is not None:
            _emit({"source": source, **export_info(path)}, as_json, _render_export)
            return
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


def _render_export(s: dict[str, Any]) -> None:
    from rich.markup import escape

    def tensors(items: list[dict[str, Any]]) -> str:
        return escape(", ".join(f"{t['name']} {t['type']}[{','.join(str(d) for d in t['shape'])}]" for t in items))

    t = Table(title=f"presso info: {s['source']} ({s['format']})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("inputs", tensors(s["inputs"]))
    t.add_row("outputs", tensors(s["outputs"]))
    if s.get("opset") is not None:
        t.add_row("opset", str(s["opset"]))
    t.add_row("precision", s["precision"])
    t.add_row("params", f"{_human(s['params'])} ({s['params']})")
    t.add_row("size (bytes)", f"{_human(s['size_bytes'])} ({s['size_bytes']})")
    t.add_row("nodes", str(s["nodes"]))
    Console().print(t, highlight=False)


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
