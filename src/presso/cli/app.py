"""The ``presso`` Typer app and what every command shares: the root callback, option types, loading, output, errors.

Figures are printed as a Rich table, or as exactly one JSON object on stdout with ``--json`` (progress and messages
go to stderr). Errors are one red line and a non-zero exit; ``presso --debug ...`` shows the traceback.
Nothing here imports torch at module level, so ``presso --help`` stays instant. This module imports no verb module:
each verb module imports the app from here and adds its commands to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

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


# --------------------------------------------------------------------------- option types
SourceArg = Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, file.py:FACTORY, a model dir, or .pt2")]
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", "-s", help="Input shape(s), e.g. 1,3,224,224 (several: ';').")
]
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow unpickling a full-model .pt you trust.")]
ModelArgOpt = Annotated[
    list[str] | None, typer.Option("--model-arg", help="Builder keyword, NAME=VALUE (repeatable), e.g. num_classes=10.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="digits | shapes[:n=,size=,classes=] | fashion-mnist[:DIR] | an image folder | unlabeled:DIR | a CSV.",
    ),
]
ImageSizeOpt = Annotated[str | None, typer.Option("--image-size", help="Resize images to H or H,W.")]


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
    from presso.models.spec import input_spec_for

    return input_spec_for(model, given, source)


def _load(source: str, trust: bool, model_arg: list[str] | None, teacher: str | None = None, show: bool = True):
    """The model named on the command line (builder kwargs from --model-arg), and its teacher if one is named."""
    import presso

    with err.status(f"Loading {source} ...") if show else contextlib.nullcontext():
        model = presso.load_model(source, trust=trust, **_model_kwargs(model_arg))
        original = presso.load_model(teacher, trust=trust) if teacher else None
    return model, original


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


def _bar(label: str):
    """A Rich progress bar on stderr: the label, the bar, done/total and the time taken."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )


def _run(fn):
    """Run a command body, turning Presso's errors into one red line and a non-zero exit."""
    from presso.errors import PressoError

    try:
        return fn()
    except typer.Exit:
        raise
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
