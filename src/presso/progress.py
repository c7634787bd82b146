"""One progress protocol for every verb.

A verb's ``progress=`` argument is any callable taking one :class:`ProgressEvent`: the CLI passes one that draws
Rich bars (with time remaining), the API passes nothing or the user's own. Inside the library a long step reports
through :func:`reporter`, which binds the callback to a stage name, so internal code calls ``report(done, total)``
and never checks for ``None``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` (``total`` None: unknown); ``info`` carries the stage's figures, e.g.
    a training epoch's metrics or a search trial's result."""

    stage: str
    done: float
    total: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


ProgressCallback = Callable[[ProgressEvent], None]


def reporter(callback: ProgressCallback | None, stage: str) -> Callable[..., None]:
    """``report(done, total=None, **info)`` for one stage; a no-op without a callback."""

    def report(done: float, total: float | None = None, **info: Any) -> None:
        if callback is not None:
            callback(ProgressEvent(stage, done, total, info))

    return report


@contextlib.contextmanager
def quiet_logger(name: str | None = None, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the logger ``name`` (None: the root logger) to ``level`` for the block: libraries that log advice on
    stdout or the root logger (Ultralytics, ONNX Runtime's quantizer) would otherwise mix it into the CLI's output
    (its ``--json`` goes to stdout)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
