"""The ``presso`` Typer app and what every command shares: the root callback, option types, loading, output, errors.

Figures are printed as a Rich table, or as exactly one JSON object on stdout with ``--json`` (progress and messages
go to stderr). Errors are one red line and a non-zero exit; ``presso --debug ...`` shows the traceback.
Nothing here imports torch at module level, so ``presso --help`` stays instant. This module imports no verb module:
each verb module imports the app from here and adds its commands to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from presso.cli.limits import PressoGroup

if TYPE_CHECKING:
    from presso.progress import ProgressEvent

app = typer.Typer(
    name="presso",
    help="Make neural networks small and fast enough for edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=PressoGroup,  # checks every numeric option's range (presso.cli.limits) before any command body runs
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
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Allow running code from the model: a file.py:FACTORY, a model directory built from Python code, a "
        "pickled .pt, or a .pt2 with pickled parts. Only for models you trust (docs/security.md).",
    ),
]
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
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace what -o holds (a previous output too); the old copy is removed only once the new one is "
        "complete. Never the model being read.",
    ),
]


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
        except (json.JSONDecodeError, RecursionError, ValueError):
            out[key] = value
    from presso.models.sources import check_kwargs

    return check_kwargs(out, "--model-arg")  # plain names and values; never trust=, build=, ...


def _input_spec(source: str, model, given: str | None):
    """The input spec: given, else recorded in the model card, else the model's own default (timm)."""
    from presso.models.spec import input_spec_for

    return input_spec_for(model, given, source)


def _check_output(output, overwrite: bool, *sources: str | None, what: str = "folder") -> None:
    """Refuse a taken -o (without --overwrite) or one that is a model being read, before any work is done."""
    import presso.outdir as outdir

    paths = [p for s in sources for p in outdir.cli_sources(s)]
    outdir.check(output, overwrite=overwrite, sources=paths, what=what)


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


class ProgressBars:
    """The one adapter from the verbs' ``ProgressEvent``s (``presso.progress``) to Rich progress bars on stderr.

    One task per stage: a bar, done/total, the time taken and the time remaining; a spinner and the time taken
    while the total is unknown. A stage whose count starts again (a second training, the next conversion) restarts
    its task, so its remaining time is its own. The description is the stage and its scalar figures, or what
    ``describe[stage](event)`` says; stages in ``lines`` print one line per event above the bars instead (a
    training epoch's metrics, a search trial's result), so nothing a verb reports is lost when the bars go. The
    stages every verb shares (``train``, ``epoch``, ``trial``: training runs inside search and run too) are known
    here; a command adds its own. ``prune``: drop finished bars when a new stage starts (long jobs run many stages).
    """

    def __init__(
        self,
        *,
        describe: dict[str, Callable[[ProgressEvent], str]] | None = None,
        lines: dict[str, Callable[[ProgressEvent], str | None]] | None = None,
        prune: bool = False,
        console: Console | None = None,
    ):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or err,
        )
        self.describe = {**_DESCRIBE, **(describe or {})}
        self.lines = {**_LINES, **(lines or {})}
        self.prune = prune
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.stop()
        return False

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage in self.lines:
            text = self.lines[event.stage](event)
            if text:
                self.progress.console.print(text, highlight=False)
            return
        description = self.describe[event.stage](event) if event.stage in self.describe else _describe(event)
        task = self.tasks.get(event.stage)
        if task is None:
            if self.prune:
                for stage, t in list(self.tasks.items()):
                    if self._task(t).finished:
                        self.progress.remove_task(t)
                        del self.tasks[stage]
            task = self.tasks[event.stage] = self.progress.add_task(description, total=event.total)
        elif event.done < self._task(task).completed:  # the stage runs again: its clock starts over
            self.progress.reset(task, total=event.total, description=description)
        # always an update, even for a new task: only an update marks a task finished (one event may be its last)
        self.progress.update(task, total=event.total, completed=event.done, description=description)

    def _task(self, task_id):
        return next(t for t in self.progress.tasks if t.id == task_id)


def _train_step(e: ProgressEvent) -> str:
    return f"[bold]train[/bold] epoch {e.info['epoch']}/{e.info['epochs']} loss {e.info['loss']:.4f}"


def _epoch_line(e: ProgressEvent) -> str:
    parts = [f"epoch {e.done:g}/{e.total:g}", f"train loss {e.info['train_loss']:.4f}"]
    for key in ("val_top1", "val_loss", "agreement"):
        if e.info.get(key) is not None:
            parts.append(f"{key} {e.info[key]:.4f}")
    return "  ".join(parts)


def _trial_line(e: ProgressEvent) -> str:
    i = e.info
    what = f"skipped: predicted {i['predicted_ms']:.3f} ms" if i.get("skipped") else (
        f"top-1 {i['top1']:.4f} at {i['predicted_ms']:.3f} ms")  # fmt: skip
    return f"trial {i['number']}: {what}"


_DESCRIBE: dict[str, Callable[[ProgressEvent], str]] = {"train": _train_step}
_LINES: dict[str, Callable[[ProgressEvent], str | None]] = {"epoch": _epoch_line, "trial": _trial_line}


def _describe(event: ProgressEvent) -> str:
    """The stage in bold and its scalar figures, e.g. ``verifying`` or ``measure warm-start name tiny``."""
    parts = [f"[bold]{event.stage}[/bold]"]
    for key, value in event.info.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            parts.append(f"{key} {value}")
    return " ".join(parts)


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
        disk = _disk_error(e)
        if disk:  # the machine refused a write: not a bug, and the path says where
            err.print(f"[red]error:[/red] {disk}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {e} -- rerun with 'presso --debug ...' and report it.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


# errno -> what to do about it, for the errors a full, read-only or foreign disk gives whatever writes to it
_DISK_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere (-o)",
    errno.EDQUOT: "free some space or write elsewhere (-o)",
    errno.EROFS: "write elsewhere (-o), on a writable disk",
    errno.EACCES: "check that path's permissions, or write elsewhere (-o)",
    errno.EPERM: "check that path's permissions, or write elsewhere (-o)",
}


def _disk_error(e: BaseException) -> str | None:
    """One line naming the path and the cause when ``e`` (or what caused it) is a full/read-only/permission error."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            where = f" at '{e.filename}'" if e.filename else ""
            cause = e.strerror or os.strerror(e.errno)
            return f"{cause}{where}; {_DISK_ERRORS[e.errno]}."
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None
