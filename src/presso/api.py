"""Small verbs that compose the subpackages."""

from __future__ import annotations

from typing import Any

from torch import nn

from presso.compress import layer_channels
from presso.models.figures import model_figures, set_mode
from presso.models.spec import InputSpec


def info(model: nn.Module, example_inputs: str | InputSpec | tuple) -> dict[str, Any]:
    """Params, MACs, size and per-layer channel counts of an (uncompressed) model."""
    spec = InputSpec.parse(example_inputs) if isinstance(example_inputs, (str, InputSpec)) else None
    inputs = spec.example_inputs() if spec is not None else tuple(example_inputs)
    set_mode(model, False)
    figs = model_figures(model, inputs)
    return {**figs, "per_layer": layer_channels(model), "input_shape": str(spec) if spec else None}
