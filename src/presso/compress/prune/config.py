"""What to prune: :class:`PruneConfig`, validated on creation, and the per-layer files that feed it.

The valid criteria are the names registered in :mod:`presso.compress.prune.importance`; this module holds no list of
its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from presso.compress.prune.importance import get_criterion
from presso.errors import ConfigError

__all__ = ["ATTENTION_MODES", "GROUPED_MODES", "PruneConfig", "load_layer_file"]

ATTENTION_MODES = ("head_dim", "heads")
GROUPED_MODES = ("groups", "width")


@dataclass
class PruneConfig:
    """Structured (channel) pruning.

    ratio: fraction of channels removed from every prunable group (0 < ratio < 1); None prunes only the layers
        named in ``per_layer`` / ``indices``.
    criterion: a registered importance criterion (:func:`~presso.compress.prune.importance.register_importance`);
        built in: l1 | l2 | gm (geometric median) | taylor (first-order, needs data) | random | index.
    per_layer: layer name (as in ``named_modules()``) -> ratio, overriding ``ratio`` for that layer's group.
    indices: for ``criterion="index"``: layer name -> output-channel indices to remove.
    ignore: layer names or glob patterns never pruned. Layers that produce the model's outputs (classifier heads,
        detection/segmentation heads) are never pruned, since that would change the output shapes.
    round_to: keep a multiple of this many channels in layers with at least twice as many (hardware-friendly).
    attention: "head_dim" removes the same dimensions from every head; "heads" removes whole heads.
    grouped: "groups" thins a grouped convolution by removing whole groups (with their input channels); "width"
        removes the same channels from every group.
    """

    ratio: float | None = 0.5
    criterion: str = "l2"
    per_layer: dict[str, float] = field(default_factory=dict)
    indices: dict[str, list[int]] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    round_to: int | None = 8
    attention: str = "head_dim"
    grouped: str = "groups"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        get_criterion(self.criterion)  # ConfigError naming the registered criteria
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ConfigError(f"Pruning ratio {self.ratio} is outside (0, 1): e.g. 0.5 removes half the channels.")
        for name, r in self.per_layer.items():
            if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
                raise ConfigError(f"Per-layer ratio {r} for '{name}' is outside [0, 1).")
        if self.criterion == "index" and not self.indices:
            raise ConfigError("criterion 'index' needs channel indices per layer (--indices FILE.json).")
        if self.indices and self.criterion != "index":
            raise ConfigError("Channel indices were given but the criterion is not 'index'; use --criterion index.")
        for name, idx in self.indices.items():
            if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in idx):
                raise ConfigError(f"Indices for '{name}' must be a list of non-negative integers.")
        if self.ratio is None and not self.per_layer and not self.indices:
            raise ConfigError("Nothing to prune: give a ratio, per-layer ratios or channel indices.")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"round_to must be a positive integer or None, got {self.round_to}.")
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"Unknown attention mode '{self.attention}': use one of {', '.join(ATTENTION_MODES)}.")
        if self.grouped not in GROUPED_MODES:
            raise ConfigError(f"Unknown grouped mode '{self.grouped}': use one of {', '.join(GROUPED_MODES)}.")
        self.ignore = list(self.ignore)

    def to_json(self) -> dict[str, Any]:
        return {"method": "prune", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        return cls(**data)


def load_layer_file(path: str | Path, what: str) -> dict[str, Any]:
    """Read a per-layer JSON or YAML mapping (layer name -> value)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"Cannot read {what} file '{p}': {e.strerror}.") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"{what.capitalize()} file '{p}' is not valid {p.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what.capitalize()} file '{p}' must map layer names to values.")
    return data
