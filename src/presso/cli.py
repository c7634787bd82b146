"""The ``presso`` command line: one thin command per verb over the Python API.

Figures are printed as a Rich table, or as exactly one JSON object on stdout with ``--json`` (progress and messages
go to stderr). Errors are one red line and a non-zero exit; ``presso --debug ...`` shows the traceback.
Nothing here imports torch at module level, so ``presso --help`` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="presso",
    help="Make neural networks small and fast enough for edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
_state = {"debug": bool(os.environ.get("PRESSO_DEBUG"))}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    if debug:
        _state["debug"] = True


# --------------------------------------------------------------------------- helpers
def _model_kwargs(items: list[str] | None) -> dict[str, Any]:
    from presso.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg '{item}' must look like NAME=VALUE (e.g. num_classes=10).")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _input_spec(source: str, model, given: str | None):
    """The input spec: given, else recorded in the model card, else the model's own default (timm)."""
    from presso.errors import InputSpecError
    from presso.models import InputSpec, get_card

    if given:
        return InputSpec.parse(given)
    card = get_card(model)
    if card is not None and card.input_spec:
        return InputSpec.parse(card.input_spec)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return InputSpec.parse((1, *cfg["input_size"]))
    raise InputSpecError(f"Give the input shape of '{source}', e.g. --input-shape 1,3,224,224.")


def _emit(payload: dict[str, Any], as_json: bool, render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        render(payload)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _run(fn):
    """Run a command body, turning Presso's errors into one red line and a non-zero exit."""
    from presso.errors import PressoError

    try:
        return fn()
    except PressoError as e:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
    except Exception as e:
        if _state["debug"]:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {e} -- rerun with 'presso --debug ...' and report it.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------- commands
SourceArg = Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, file.py:FACTORY, a model dir, or .pt2")]
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", "-s", help="Input shape(s), e.g. 1,3,224,224 (several: ';').")
]
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow unpickling a full-model .pt you trust.")]
ModelArgOpt = Annotated[
    list[str] | None, typer.Option("--model-arg", help="Builder keyword, NAME=VALUE (repeatable), e.g. num_classes=10.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


@app.command()
def compress(
    source: SourceArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    input_shape: ShapeOpt = None,
    prune_ratio: Annotated[
        float | None, typer.Option("--prune-ratio", "-r", help="Fraction of channels removed per group, in (0, 1).")
    ] = None,
    criterion: Annotated[str, typer.Option(help="l1 | l2 | gm | taylor | random | index.")] = "l2",
    per_layer: Annotated[
        Path | None, typer.Option("--per-layer", help="JSON/YAML: layer name -> pruning ratio.")
    ] = None,
    indices: Annotated[
        Path | None, typer.Option("--indices", help="JSON: layer name -> channel indices to remove (criterion index).")
    ] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer name or glob never pruned.")] = None,
    round_to: Annotated[int, typer.Option(help="Keep channel counts a multiple of this (0: off).")] = 8,
    attention: Annotated[
        str, typer.Option(help="head_dim: same dims from every head; heads: whole heads.")
    ] = "head_dim",
    calib: Annotated[
        str | None, typer.Option("--calib", help="Folder of images for taylor (or 'random' for synthetic inputs).")
    ] = None,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune a model structurally and save it as a Presso model directory."""

    def body():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        import presso
        from presso.compress import PruneConfig, load_layer_file
        from presso.errors import ConfigError

        per = load_layer_file(per_layer, "per-layer ratio") if per_layer else {}
        idx = load_layer_file(indices, "indices") if indices else {}
        ratio = prune_ratio if prune_ratio is not None else (None if (per or idx) else 0.5)
        cfg = PruneConfig(
            ratio=None if criterion == "index" and prune_ratio is None else ratio,
            criterion=criterion,
            per_layer=per,
            indices=idx,
            ignore=list(ignore or []),
            round_to=round_to or None,
            attention=attention,
        )
        with err.status(f"Loading {source} ..."):
            model = presso.load_model(source, trust=trust, **_model_kwargs(model_arg))
        spec = _input_spec(source, model, input_shape)
        data = None
        if criterion == "taylor":
            if not calib:
                raise ConfigError("criterion 'taylor' needs data: pass --calib DIR (or --calib random).")
            from presso.data import calibration_batches

            data = calibration_batches(calib, spec)
        with Progress(
            TextColumn("[bold]pruning[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
        ) as bar:
            task = bar.add_task("prune", total=None)
            result = presso.compress(
                model, spec, cfg, data=data, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
        with err.status(f"Saving {output} ..."):
            presso.save_model_dir(result.model, output, input_spec=spec)
        _emit(result.summary(str(output)), as_json, _render_compress)

    _run(body)


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

        with err.status(f"Loading {source} ..."):
            model = presso.load_model(source, trust=trust, **_model_kwargs(model_arg))
        spec = _input_spec(source, model, input_shape)
        figures = presso.info(model, spec)
        _emit({"source": source, **figures}, as_json, _render_info)

    _run(body)


@app.command()
def env(as_json: JsonOpt = False) -> None:
    """Versions and devices, for bug reports."""
    import importlib.metadata as md
    import platform

    import torch

    pkgs = {}
    for p in ("presso", "torch", "torchvision", "timm", "torch-pruning", "safetensors", "onnx", "onnxruntime"):
        try:
            pkgs[p] = md.version(p)
        except md.PackageNotFoundError:
            pkgs[p] = None
    payload = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "packages": pkgs,
        "presso_home": os.environ.get("PRESSO_HOME", str(Path.home() / ".presso")),
    }

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


# --------------------------------------------------------------------------- rendering
def _render_compress(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso compress ({s['method']})")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right")
    for key, label in (("params", "params"), ("macs", "MACs"), ("size_bytes", "size (bytes)")):
        b, a = s[f"{key}_before"], s[f"{key}_after"]
        t.add_row(label, _human(b), _human(a), f"{a / max(b, 1):.3f}")
    out.print(t)
    changed = {n: v for n, v in s["per_layer"].items() if v["before"] != v["after"]}
    if changed:
        lt = Table(title=f"channels per layer ({len(changed)} of {len(s['per_layer'])} layers changed)")
        lt.add_column("layer")
        lt.add_column("before", justify="right")
        lt.add_column("after", justify="right")
        for n, v in list(changed.items())[:40]:
            lt.add_row(n, str(v["before"]), str(v["after"]))
        if len(changed) > 40:
            lt.add_row(f"... {len(changed) - 40} more (see --json)", "", "")
        out.print(lt)
    if s["skipped_layers"]:
        st = Table(title="left unpruned")
        st.add_column("layer")
        st.add_column("reason")
        for item in s["skipped_layers"]:
            st.add_row(item["name"], item["reason"])
        out.print(st)
    out.print(f"saved to [bold]{s['output_dir']}[/bold] in {s['seconds']:.1f}s")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
