"""Named errors raised at Presso's edges.

Every message says what was wrong and what to do about it. The CLI prints one red line per error and exits
non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "PressoError",
    "ModelSourceError",
    "InputSpecError",
    "ConfigError",
    "UnsupportedLayerError",
    "UntrustedFileError",
    "BudgetError",
    "DataError",
    "ConversionError",
    "BundleError",
    "closest",
]


class PressoError(Exception):
    """Base class of every error Presso raises on purpose."""


class ModelSourceError(PressoError):
    """A model source could not be resolved or loaded."""


class InputSpecError(PressoError):
    """An input shape / spec is malformed or does not fit the model."""


class ConfigError(PressoError, ValueError):
    """A configuration value (ratio, criterion, per-layer file, ...) is invalid."""


class UnsupportedLayerError(PressoError):
    """A layer cannot be handled by the requested method."""


class UntrustedFileError(PressoError):
    """A file would need unpickling, which runs arbitrary code; the user has not said they trust it."""


class BudgetError(PressoError):
    """A budget (MACs, params, latency) cannot be met."""


class DataError(PressoError):
    """A dataset is missing, empty, unreadable or does not fit the model."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A human-readable hint listing the candidates closest to `name`, or '' when nothing is close."""
    cands = list(candidates)
    matches = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not matches:
        low = name.lower()
        matches = [c for c in cands if low in c.lower()][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


class ConversionError(PressoError):
    """A model could not be converted, or the converted model does not reproduce the original within tolerance."""


class BundleError(PressoError):
    """A deployable bundle is missing, damaged, or unsafe to open."""


class DeviceError(PressoError):
    """A benchmark device (local runtime, remote agent, latency database) is unreachable, refused or failed."""


__all__.append("DeviceError")


class OutputError(PressoError):
    """An output cannot be written: it holds other data (pass another -o, or --overwrite), it is the model being
    read, or the disk refused the write (full, read-only, no permission); the old output is left as it was."""


__all__.append("OutputError")


# --------------------------------------------------------------------------- numeric settings
def range_problem(
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> str | None:
    """None when `value` is a finite number in the range, else what it must be ("a finite number in (0, 1]").

    The one definition of a valid number, shared by the CLI's option check and the configs' ``__post_init__``:
    NaN and infinities are never valid (every comparison with NaN is false, so a NaN budget would pass a plain
    ``x <= 0`` test and make a search run for minutes before failing).
    """
    import math
    import numbers

    def show(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if low is not None and high is not None:
        what = f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    elif low is not None:
        what = f"{'>' if low_open else '>='} {show(low)}"
    elif high is not None:
        what = f"{'<' if high_open else '<='} {show(high)}"
    else:
        what = ""
    kind = "an integer" if integer else "a finite number"
    expected = f"{kind} {what}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy numbers are Real (and Integral)
        return expected
    if integer and not isinstance(value, numbers.Integral):
        return expected
    if not math.isfinite(value):
        return expected
    if low is not None and (value <= low if low_open else value < low):
        return expected
    if high is not None and (value >= high if high_open else value > high):
        return expected
    return None


def check_range(
    value: object,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ConfigError`` naming `name` unless `value` is a finite number in the range (or None, if optional)."""
    if optional and value is None:
        return
    problem = range_problem(value, low, high, low_open=low_open, high_open=high_open, integer=integer)
    if problem:
        raise ConfigError(f"{name} must be {problem}, not {value!r}.")


def check_fields(obj: object, **ranges: tuple) -> None:
    """``check_range`` on fields of a dataclass, each given as ``name=(low, high)`` or ``(low, high, ends)``.

    ``ends`` is ``"[]"`` (default), ``"(]"``, ``"[)"`` or ``"()"``. A field annotated ``int`` must hold an integer; one
    annotated ``... | None`` may be None. Messages name the class and the field: ``TrainConfig: lr must be ...``.
    """
    import dataclasses

    types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
             for f in dataclasses.fields(obj)}  # type: ignore[arg-type]  # fmt: skip
    for name, (low, high, *rest) in ranges.items():
        ends = rest[0] if rest else "[]"
        kinds = {t.strip() for t in types[name].split("|")}
        check_range(getattr(obj, name), f"{type(obj).__name__}: {name}", low, high, low_open=ends[0] == "(",
                    high_open=ends[1] == ")", integer="int" in kinds, optional="None" in kinds)  # fmt: skip


__all__ += ["range_problem", "check_range", "check_fields"]
