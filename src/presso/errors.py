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
