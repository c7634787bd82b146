"""What every verb returns: a result dataclass with ``.summary()`` (a JSON-ready dict, what ``--json`` prints),
``.output_dir`` (where it wrote, or None) and ``.to_json()``."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class Result(ABC):
    """Base of every verb's result. Subclasses are dataclasses with an ``output_dir`` field and a ``summary``."""

    output_dir: Path | None

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """The flat, JSON-ready figures of the result."""

    def to_json(self, **kwargs: Any) -> str:
        """The summary as JSON text (paths and other non-JSON values as strings)."""
        return json.dumps(self.summary(), default=str, **kwargs)
