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
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from presso.cli.panels import DATA, MODEL, OUTPUT, PressoApp
from presso.cli.panels import DECOMPOSE as DECOMPOSE  # the panel names, for the verbs (``presso.cli.panels``)
from presso.cli.panels import EXPORT as EXPORT
from presso.cli.panels import INT8 as INT8
from presso.cli.panels import MEASURE as MEASURE
from presso.cli.panels import PRUNE as PRUNE
from presso.cli.panels import TARGET as TARGET

if TYPE_CHECKING:
    from presso.progress import ProgressEvent

app = typer.Typer(
    name="presso",
    help="Make neural networks small and fast enough for edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=PressoApp,  # every numeric option's range checked before any command body runs; readable --help
)
err = Console(stderr=True)
_state: dict[str, Any] = {"debug": bool(os.environ.get("PRESSO_DEBUG")), "started": time.perf_counter()}


def _version(value: bool) -> None:
    if value:
        from presso import __version__

        typer.echo(f"presso {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print Presso's version and exit."),
    ] = False,
) -> None:
    _state["started"] = time.perf_counter()  # the command's clock (_elapsed): its whole wall time
    if debug:
        _state["debug"] = True


# --------------------------------------------------------------------------- option types
SourceArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL", help="torchvision:NAME, timm:NAME, ultralytics:NAME.yaml, file.py:FACTORY, a model dir or .pt2"
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape", "-s", metavar="SHAPE", rich_help_panel=MODEL,
        help="Input shape(s), e.g. 1,3,224,224 (several: ';').",
    ),
]  # fmt: skip
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        rich_help_panel=MODEL,
        help="Allow running code from the model: a file.py:FACTORY, a model directory built from Python code, a "
        "pickled .pt, or a .pt2 with pickled parts. Only for models you trust (docs/security.md).",
    ),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg", metavar="NAME=VALUE", rich_help_panel=MODEL,
        help="Builder keyword, NAME=VALUE (repeatable), e.g. num_classes=10.",
    ),
]  # fmt: skip
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print one JSON object on stdout.")]
OutputDirOpt = Annotated[
    Path, typer.Option("--output", "-o", metavar="DIR", rich_help_panel=OUTPUT, help="Output model directory.")
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        metavar="DATA",
        rich_help_panel=DATA,
        help="digits | shapes[:n=,size=,classes=] | fashion-mnist[:DIR] | an image folder | unlabeled:DIR | a CSV.",
    ),
]
ImageSizeOpt = Annotated[
    str | None, typer.Option("--image-size", metavar="H[,W]", rich_help_panel=DATA, help="Resize images to H or H,W.")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        rich_help_panel=OUTPUT,
        help="Replace what -o holds (a previous output too); the old copy is removed only once the new one is "
        "complete. Never the model being read.",
    ),
]


WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights", metavar="PATH", rich_help_panel=MODEL,
        help="Weights (safetensors or a state dict) for a model built from code. Cached ones, never downloaded: "
        "--model-arg weights=DEFAULT (torchvision), pretrained=true (timm).",
    ),
]  # fmt: skip
NewHeadOpt = Annotated[bool, typer.Option("--new-head", rich_help_panel=MODEL,
                                          help="A new classifier for the data's classes.")]  # fmt: skip
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        rich_help_panel=MODEL,
        help="classify | detect | file.py:Class (a user's task, with --trust). Default: from the model and data.",
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

    weights = out.pop("weights", None)  # torchvision's weights=DEFAULT: load_model's own weights= (the local cache)
    kwargs = check_kwargs(out, "--model-arg")  # plain names and values; never trust=, build=, ...
    return {**kwargs, "weights": weights} if weights is not None else kwargs


def _input_spec(source: str, model, given: str | None):
    """The input spec: given, else recorded in the model card, else the model's own default (timm)."""
    from presso.models.spec import input_spec_for

    return input_spec_for(model, given, source)


def _tristate(flag: str, mode: str) -> bool | None:
    """An ``auto | on | off`` option as None, True or False; anything else refused, naming the option."""
    from presso.errors import ConfigError

    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"{flag} is auto, on or off, not '{mode}'.")
    return {"auto": None, "on": True, "off": False}[mode]


def _check_output(output, overwrite: bool, *sources: str | None, what: str = "folder") -> None:
    """Refuse a taken -o (without --overwrite) or one that is a model being read, before any work is done."""
    import presso.outdir as outdir

    paths = [p for s in sources for p in outdir.cli_sources(s)]
    outdir.check(output, overwrite=overwrite, sources=paths, what=what)


def _load(source: str, trust: bool, model_arg: list[str] | None, teacher: str | None = None, show: bool = True, *,
          weights: Path | None = None, new_head: bool = False, fit=None):  # fmt: skip
    """The model named on the command line (builder kwargs from --model-arg, weights from --weights or the local
    cache), and its teacher if one is named. ``fit``: a ``DataBundle`` a zoo model built from random init takes its
    class and channel counts from, unless --model-arg gives them (one line says so)."""
    import presso
    from presso.errors import ConfigError
    from presso.models.weights import fit_to_data

    kwargs = _model_kwargs(model_arg)
    if weights is not None and "weights" in kwargs:
        raise ConfigError("Give the weights once: --weights PATH, or --model-arg weights=NAME (torchvision's cache).")
    weights = kwargs.pop("weights", weights)
    if fit is not None and fit.labeled:
        kwargs, added = fit_to_data(source, kwargs, classes=fit.num_classes, channels=fit.train.native()[1],
                                    weights=weights)  # fmt: skip
        if added and show:
            said = ", ".join(f"{k}={v}" for k, v in added.items())
            err.print(f"building {source} for '{fit.name}': {said} (from the data; --model-arg to choose)",
                      highlight=False, soft_wrap=True)  # fmt: skip
    with err.status(f"Loading {source} ...") if show else contextlib.nullcontext():
        model = presso.load_model(source, trust=trust, weights=weights, new_head=new_head, **kwargs)
        original = presso.load_model(teacher, trust=trust) if teacher else None
    return model, original


@contextlib.contextmanager
def _warning_lines():
    """The library's warnings (labels that differ, unreadable images, a cache file with a wrong hash) as one yellow
    line each on stderr, instead of Python's file:line format."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings():  # the filters stay as they are; only the display changes
        warnings.showwarning = show
        yield


def _checked_spec(source: str, model, given: str | None):
    """``_input_spec``, refusing a given shape that the preprocessing recorded in the model's card contradicts."""
    from presso.models.card import check_input_spec, get_card

    spec = _input_spec(source, model, given)
    if given:
        check_input_spec(get_card(model), spec)
    return spec


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
            # started where the stage stands (a resumed profile): a first jump would make the remaining time a guess
            task = self.tasks[event.stage] = self.progress.add_task(
                description, total=event.total, completed=event.done
            )
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


def _search_step(e: ProgressEvent) -> str:
    """A budget search's latest try, e.g. ``search — allocation 3/8 uniform — try 7/16 — 0.52 of MACs — score 0.01``."""
    from rich.markup import escape

    i = e.info
    parts = ["[bold]search[/bold]"]
    if i.get("phase"):
        parts.append(escape(str(i["phase"])))
    if i.get("allocation"):
        parts.append(f"allocation {i['candidate']}/{e.total:g} {escape(str(i['allocation']))}")
    if i.get("attempt"):
        parts.append(f"try {i['attempt']}/{i['tries']}")
    if i.get("kept") is not None:
        ms = f" ({i['ms']:.3g} ms)" if i.get("ms") is not None else ""
        parts.append(f"{i['kept']:.3g} of {i.get('of', 'the original')}{ms}")
    if i.get("score") is not None:
        parts.append(f"score {i['score']:.4g}")
    return " — ".join(parts)


def _trial_line(e: ProgressEvent) -> str:
    i = e.info
    if i.get("skipped"):
        what = f"skipped: {i['why']}" if i.get("why") else f"skipped: predicted {i['predicted_ms']:.3f} ms"
    else:
        what = f"top-1 {i['top1']:.4f} at {i['predicted_ms']:.3f} ms"
    return f"trial {i['number']}: {what}"


def _profile_step(e: ProgressEvent) -> str:
    """The device profile a search (or ``run`` without --model) starts when the latency database has none."""
    text = "[bold]profiling the device[/bold] kernel models (once per device)"
    if e.info.get("resumed"):
        text += f" ({e.info['resumed']:g} stored by an earlier run)"
    return text + (f" -- {e.info['phase']}" if e.info.get("phase") else "")


_DESCRIBE: dict[str, Callable[[ProgressEvent], str]] = {"train": _train_step, "search": _search_step,
                                                         "profile": _profile_step}  # fmt: skip
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


def _elapsed() -> float:
    """Seconds since the command started (its whole wall time so far: loading, searching, saving)."""
    return time.perf_counter() - _state["started"]


def _duration(seconds: float) -> str:
    """``0.4s``, ``42s``, ``5 min 30 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _run(fn):
    """Run a command body, turning Presso's errors into one red line and a non-zero exit."""
    from presso.errors import PressoError

    try:
        with _warning_lines():
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
