"""The one place a compression is applied: ``apply`` runs configs on a model and returns a ``CompressResult``.

``presso.compress`` calls it for a plain compression and the budget search (``compress.budget``) calls it for every
try, so nothing below calls back into the package's public function. ``combine`` builds the result of a staged
compression (prune, then decompose) from its stages, and ``with_target`` the result of a search: both return new
results, none is edited after it is made.

A new method is a config dataclass plus one function ``(model, inputs, config, data, progress) -> (recipe step,
skipped layers, extra figures)``, registered with ``@register_method(ConfigType)``, and the replay of its recipe step
registered with ``presso.models.recipe.register_replay``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from presso.compress.decompose import DecomposeConfig, decompose_model
from presso.compress.prune import PruneConfig, prune_model
from presso.errors import ConfigError
from presso.models.card import copy_card, ensure_card
from presso.models.figures import model_figures, set_mode
from presso.models.spec import InputSpec
from presso.results import Result


@dataclass
class CompressResult(Result):
    """A compressed model and the figures that describe what was done.

    ``output_dir``: the model directory it was saved to (``compress(..., output_dir=...)``), with ``files``, the
    per-layer files written beside it; None when it was not saved.
    """

    model: nn.Module
    method: str
    config: dict[str, Any] | list[dict[str, Any]]
    before: dict[str, int]
    after: dict[str, int]
    per_layer: dict[str, dict[str, int]]
    skipped: list[dict[str, str]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The flat JSON object the CLI prints with --json."""
        return {
            "method": self.method,
            "params_before": self.before["params"],
            "params_after": self.after["params"],
            "macs_before": self.before["macs"],
            "macs_after": self.after["macs"],
            "size_bytes_before": self.before["size_bytes"],
            "size_bytes_after": self.after["size_bytes"],
            "macs_ratio": self.after["macs"] / max(self.before["macs"], 1),
            "params_ratio": self.after["params"] / max(self.before["params"], 1),
            "per_layer": self.per_layer,
            "skipped_layers": self.skipped,
            "seconds": round(self.seconds, 3),
            "output_dir": str(self.output_dir) if self.output_dir is not None else None,
            **self.extra,
            "files": sorted(self.files),
        }


Method = Callable[..., tuple[dict[str, Any], list[dict[str, str]], dict[str, Any]]]
_METHODS: dict[type, Method] = {}


def register_method(config_type: type):
    """Register the implementation of a compression method for its config type."""

    def deco(fn: Method) -> Method:
        _METHODS[config_type] = fn
        return fn

    return deco


@register_method(PruneConfig)
def _prune(model, inputs, config: PruneConfig, data, progress):
    outcome = prune_model(model, inputs, config, data=data, progress=progress)
    step = {"type": "prune", "config": config.to_json(), "ops": outcome.ops}
    extra = {"groups_pruned": outcome.groups_pruned, "groups_total": outcome.groups_total}
    return step, outcome.skipped, extra


@register_method(DecomposeConfig)
def _decompose(model, inputs, config: DecomposeConfig, data, progress):
    outcome = decompose_model(model, inputs, config, progress=progress)
    step = {"type": "decompose", "config": config.to_json(), "layers": outcome.layers}
    return step, outcome.skipped, {"decomposed": outcome.layers}


def as_inputs(example_inputs) -> tuple:
    """Example inputs as a tuple of tensors, from a tensor, a tuple of them, or an input spec ("1,3,224,224")."""
    if isinstance(example_inputs, (str, InputSpec)):
        return InputSpec.parse(example_inputs).example_inputs()
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels / features of every convolution and linear layer, by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def apply(
    model: nn.Module, inputs: tuple, configs: list, *, data=None, progress=None, inplace: bool = False
) -> CompressResult:
    """Run `configs` in order on `model` (or a copy), one recipe step each; figures before and after."""
    if not configs:
        raise ConfigError("No compression config given.")
    for c in configs:
        if type(c) not in _METHODS:
            names = ", ".join(t.__name__ for t in _METHODS)
            raise ConfigError(f"No compression method for {type(c).__name__}; use one of {names}.")
    spec = InputSpec.from_tensors(inputs)
    t0 = time.perf_counter()
    ensure_card(model)  # the original gets a card too, so the copy inherits its lineage
    work = model if inplace else copy.deepcopy(model)
    if not inplace:
        copy_card(model, work)
    set_mode(work, False)
    before = model_figures(work, inputs)
    channels_before = layer_channels(work)
    card = ensure_card(work)
    steps, skipped, extra = [], [], {}
    for c in configs:
        step, step_skipped, step_extra = _METHODS[type(c)](work, inputs, c, data, progress)
        card.recipe.append(step)
        steps.append(step["type"])
        skipped += step_skipped
        extra.update(step_extra)
    after = model_figures(work, inputs)
    channels_after = layer_channels(work)
    per_layer: dict[str, dict[str, Any]] = {}
    for n, c in channels_before.items():
        if n in extra.get("decomposed", {}):
            per_layer[n] = {"before": c, "after": c, "ranks": extra["decomposed"][n]["ranks"]}
        elif n in channels_after:
            per_layer[n] = {"before": c, "after": channels_after[n], "ratio": round(1 - channels_after[n] / c, 4)}
    card.input_spec = card.input_spec or str(spec)
    card.figures.update({"params": after["params"], "macs": after["macs"], "size_bytes": after["size_bytes"]})
    config_json = [c.to_json() for c in configs] if len(configs) > 1 else configs[0].to_json()
    card.history.append({"verb": "compress", "config": config_json, "before": before, "after": after})
    seconds = time.perf_counter() - t0
    return CompressResult(work, "+".join(steps), config_json, before, after, per_layer, skipped, seconds, extra)


def combine(first: CompressResult, second: CompressResult) -> CompressResult:
    """One result for two stages run one after the other (the second on the first's model)."""
    per_layer = dict(first.per_layer)
    for name, info in second.per_layer.items():  # ranks of the second stage win; the first stage's channels stay
        per_layer[name] = {**per_layer.get(name, {}), **info} if "ranks" in info else per_layer.get(name, info)
    configs = [c for r in (first, second) for c in (r.config if isinstance(r.config, list) else [r.config])]
    return CompressResult(
        model=second.model,
        method=f"{first.method}+{second.method}",
        config=configs,
        before=first.before,
        after=second.after,
        per_layer=per_layer,
        skipped=first.skipped + second.skipped,
        seconds=first.seconds + second.seconds,
        extra={**first.extra, **second.extra},
    )


def with_target(result: CompressResult, target: dict[str, Any], before: dict[str, int]) -> CompressResult:
    """The result of a search for a target: the figures of the original model before, and how the target went."""
    return dataclasses.replace(result, before=before, extra={**result.extra, "target": target})
