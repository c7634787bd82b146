"""The range of every numeric option, checked in one place before a command body runs; and Ctrl-C at any time.

Every ``int``/``float`` option of every command must be listed in ``RANGES`` (``tests/security/test_inputs.py``
fails on one that is not), so a new option cannot skip the check. ``PressoGroup``, the class of the root command
group, walks its commands once when it is built and puts ``check`` in front of each numeric option's callback:
NaN, infinities and values out of range are refused with click's usage error naming the option -- before a model
is loaded or a search starts -- instead of failing minutes later, or never.

A range is ``(low, high, kind)``: ``kind`` says which ends are open -- ``"[]"``, ``"(]"``, ``"[)"`` or ``"()"``;
``None`` for an end means unbounded. The upper bounds are sanity limits (a typo of 100000 for 10000 is refused
before it asks for 40 GB); raise one where a real use needs more. The configs repeat the checks that matter to the
library (``presso.errors.check_range``), so API users get the same ranges as ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from presso.errors import range_problem

Range = tuple[float | None, float | None, str]

# option -> range, for every command that has the option (a command's own entry in COMMAND_RANGES wins)
RANGES: dict[str, Range] = {
    # compress
    "--prune-ratio": (0, 1, "()"),
    "--round-to": (0, 4096, "[]"),
    "--vbmf-offset": (-1, 1, "[]"),
    "--energy": (0, 1, "(]"),
    "--rank-ratio": (0, 1, "(]"),
    "--target-macs": (0, 1, "()"),
    "--target-params": (0, 1, "()"),
    "--target-latency-ms": (0, 1e7, "(]"),
    "--tolerance": (0, 1, "()"),
    # train, eval
    "--epochs": (1, 100_000, "[]"),
    "--batch-size": (1, 65_536, "[]"),
    "--lr": (0, 10, "(]"),
    "--weight-decay": (0, 10, "[]"),
    "--warmup": (0, 1, "[)"),
    "--label-smoothing": (0, 1, "[)"),
    "--kd-alpha": (0, 1, "[]"),
    "--sparsity": (0, 1e4, "()"),
    "--qat-epochs": (0, 10000, "[]"),
    "--sparsity-ratio": (0, 1, "()"),
    "--temperature": (0, 1000, "(]"),
    "--val-fraction": (0, 1, "()"),
    "--seed": (0, 2**32 - 1, "[]"),
    "--workers": (0, 256, "[]"),
    # convert, predict
    "--eval-samples": (0, 10_000_000, "[]"),
    "--calib-samples": (1, 1_000_000, "[]"),
    "--snr-db": (-1000, 1000, "[]"),
    "--max-fallback": (0, 1, "[]"),
    "--opset": (17, 30, "[]"),
    "--top-k": (1, 100_000, "[]"),
    "--conf": (0, 1, "[)"),  # a detector's lowest box score kept
    "--iou": (0, 1, "[]"),  # NMS overlap threshold
    "--threads": (1, 4096, "[]"),
    # benchmark
    "--batch": (1, 65_536, "[]"),
    "--repeat": (1, 1_000_000, "[]"),
    "--max-seconds": (0, 86_400, "(]"),
    # search, run
    "--latency-ms": (0, 1e7, "(]"),
    "--trials": (1, 100_000, "[]"),
    "--time-budget": (0, 10_000_000, "(]"),
    "--proxy-epochs": (1, 100_000, "[]"),
    "--proxy-fraction": (0, 1, "(]"),
    "--final-epochs": (1, 100_000, "[]"),
    "--measure-top": (1, 10_000, "[]"),
    "--max-params": (1, 2**40, "[]"),
    "--heartbeat": (1, 86_400, "[]"),
    "--train-epochs": (1, 100_000, "[]"),
    "--recover-epochs": (1, 100_000, "[]"),
    "--search-trials": (1, 100_000, "[]"),
    "--search-proxy-epochs": (1, 100_000, "[]"),
    "--max-accuracy-drop": (0, 1, "[]"),
    # agent, db
    "--port": (1, 65_535, "[]"),
    "--max-upload-mb": (0, 1_000_000, "(]"),
    "--measure-timeout": (0, 86_400, "(]"),
    "--max-input-elements": (1, 2**40, "[]"),
    "--limit": (1, 1_000_000_000, "[]"),
}
COMMAND_RANGES: dict[tuple[str, str], Range] = {
    ("benchmark", "--warmup"): (0, 1_000_000, "[]"),  # untimed runs, not train's warmup share
    ("run", "--target-macs"): (0, 1, "(]"),  # 1: only quantize, when the model already fits
    ("convert", "--tolerance"): (0, 1, "(]"),  # an output difference, not a target's tolerance
    # measuring: 0 threads is ONNX Runtime's default, all cores
    **{(cmd, "--threads"): (0, 4096, "[]") for cmd in ("benchmark", "predict-latency", "db profile", "db calibrate")},
}


def range_for(command: str, option: str) -> Range | None:
    return COMMAND_RANGES.get((command, option), RANGES.get(option))


def numeric_type(param: Any) -> type | None:
    """``int`` or ``float`` when the option takes a number (flags and counters excluded), else None."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation in (int, float) and not getattr(param, "is_flag", False) and not getattr(param, "count", False):
        return annotation
    return None


def option_name(param: Any) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


def numeric_options(group: Any, path: tuple[str, ...] = ()):
    """(command path, option name, param, number type) for every numeric option under a click group."""
    for name, cmd in getattr(group, "commands", {}).items():
        if getattr(cmd, "commands", None) is not None:
            yield from numeric_options(cmd, (*path, name))
            continue
        for param in cmd.params:
            kind = numeric_type(param)
            if kind is not None:
                yield " ".join((*path, name)), option_name(param), param, kind


def check(value: Any, low: float | None, high: float | None, kind: str, integer: bool) -> str | None:
    """What ``value`` must be when it is out of range (None when it is fine, or not given)."""
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        problem = range_problem(v, low, high, low_open=kind[0] == "(", high_open=kind[1] == ")", integer=integer)
        if problem:
            return f"{v!r} is not {problem}"
    return None


def _checked(param: Any, command: str, kind: type) -> None:
    rng = range_for(command, option_name(param))
    if rng is None:  # an unlisted option: still no NaN or infinity (the test makes sure none stays unlisted)
        rng = (None, None, "[]")
    low, high, ends = rng
    previous = param.callback

    def callback(ctx, p, value):
        problem = check(value, low, high, ends, integer=kind is int)
        if problem:
            raise typer.BadParameter(problem, ctx=ctx, param=p)
        return previous(ctx, p, value) if previous is not None else value

    param.callback = callback


def harden(group: Any) -> None:
    """Put the range check in front of every numeric option under ``group`` (once per built command)."""
    for command, _name, param, kind in numeric_options(group):
        if not getattr(param, "_presso_checked", False):
            _checked(param, command, kind)
            param._presso_checked = True


class PressoGroup(TyperGroup):
    """The root group: built by Typer for each run (``presso ...``, ``CliRunner.invoke``), then hardened.

    It also ends a Ctrl-C that lands outside a command body (while a command's options are parsed) the way
    ``_run`` ends one inside: the line ``interrupted`` and status 130, never a traceback or another error.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        harden(self)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted()


class _TimmBeforeTorchPruning(importlib.abc.MetaPathFinder):
    """Imports timm just before Torch-Pruning is first imported, wherever that is (a model directory's recipe
    imports it too): Torch-Pruning's bare ``except:`` around its own ``import timm`` would swallow a Ctrl-C pressed
    during that import (see ``presso.compress.prune.tp_patches``). Finds nothing itself."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch_pruning" and "timm" not in sys.modules:
            with contextlib.suppress(ImportError):
                import timm  # noqa: F401
        return None


if not any(isinstance(f, _TimmBeforeTorchPruning) for f in sys.meta_path):
    sys.meta_path.insert(0, _TimmBeforeTorchPruning())


def interrupted() -> NoReturn:
    """The one way the CLI ends on Ctrl-C: one line on stderr and exit status 130 (128 + SIGINT)."""
    sys.stderr.write("interrupted\n")
    raise typer.Exit(130)


__all__ = [
    "COMMAND_RANGES",
    "RANGES",
    "PressoGroup",
    "check",
    "harden",
    "interrupted",
    "numeric_options",
    "range_for",
]
