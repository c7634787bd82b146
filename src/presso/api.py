"""Small verbs that compose the subpackages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from presso.compress import layer_channels
from presso.models.figures import model_figures, set_mode
from presso.models.spec import InputSpec
from presso.progress import ProgressCallback, reporter
from presso.results import Result


@dataclass
class InfoResult(Result):
    """A model's figures: parameters, MACs, size in bytes, output channels of every convolution and linear layer
    (``per_layer``), and the input shape they were counted at. Nothing is written (``output_dir`` is None)."""

    params: int
    macs: int
    size_bytes: int
    per_layer: dict[str, int] = field(default_factory=dict)
    input_shape: str | None = None
    output_dir: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "size_bytes": self.size_bytes,
            "per_layer": self.per_layer,
            "input_shape": self.input_shape,
            "output_dir": None if self.output_dir is None else str(self.output_dir),
        }


def info(
    model: nn.Module, example_inputs: str | InputSpec | tuple, *, progress: ProgressCallback | None = None
) -> InfoResult:
    """Params, MACs, size and per-layer channel counts of an (uncompressed) model. ``progress``: stage ``info``."""
    report = reporter(progress, "info")
    report(0, 1)
    spec = InputSpec.parse(example_inputs) if isinstance(example_inputs, (str, InputSpec)) else None
    inputs = spec.example_inputs() if spec is not None else tuple(example_inputs)
    set_mode(model, False)
    figs = model_figures(model, inputs)
    report(1, 1)
    return InfoResult(
        params=figs["params"],
        macs=figs["macs"],
        size_bytes=figs["size_bytes"],
        per_layer=layer_channels(model),
        input_shape=str(spec) if spec else None,
    )
