"""Compressor: structured pruning and low-rank decomposition of any PyTorch model.

``compress(model, example_inputs, config)`` looks the implementation up by the config's type, runs it on a copy of
the model, and returns the smaller model with its figures and the recipe step that reproduces it. A list of configs
runs in the order given, one recipe step each; ``[PruneConfig(...), DecomposeConfig(...)]`` (prune, then decompose
what remains) is the order the CLI uses.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from presso.compress.budget import Target
from presso.compress.decompose import DecomposeConfig, decompose_model
from presso.compress.prune import PruneConfig, load_layer_file, prune_model
from presso.errors import ConfigError
from presso.models.card import copy_card, ensure_card
from presso.models.figures import model_figures, set_mode
from presso.models.spec import InputSpec

__all__ = [
    "CompressResult",
    "DecomposeConfig",
    "PruneConfig",
    "Target",
    "compress",
    "layer_channels",
    "load_layer_file",
]


@dataclass
class CompressResult:
    """A compressed model and the figures that describe what was done."""

    model: nn.Module
    method: str
    config: dict[str, Any] | list[dict[str, Any]]
    before: dict[str, int]
    after: dict[str, int]
    per_layer: dict[str, dict[str, int]]
    skipped: list[dict[str, str]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, output_dir: str | None = None) -> dict[str, Any]:
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
            "output_dir": output_dir,
            **self.extra,
        }


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels / features of every convolution and linear layer, by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def _prune(model, inputs, config: PruneConfig, data, progress):
    outcome = prune_model(model, inputs, config, data=data, progress=progress)
    step = {"type": "prune", "config": config.to_json(), "ops": outcome.ops}
    extra = {"groups_pruned": outcome.groups_pruned, "groups_total": outcome.groups_total}
    return step, outcome.skipped, extra


def _decompose(model, inputs, config: DecomposeConfig, data, progress):
    outcome = decompose_model(model, inputs, config, progress=progress)
    step = {"type": "decompose", "config": config.to_json(), "layers": outcome.layers}
    return step, outcome.skipped, {"decomposed": outcome.layers}


# config type -> implementation (a new method is one new file plus one line here)
_METHODS: dict[type, Callable] = {PruneConfig: _prune, DecomposeConfig: _decompose}
Config = PruneConfig | DecomposeConfig


def compress(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple | InputSpec | str,
    config: Config | list[Config],
    *,
    data=None,
    inplace: bool = False,
    target: Target | None = None,
    recommend: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CompressResult:
    """Compress `model` as `config` says.

    example_inputs: a tensor, a tuple of tensors, or an input spec such as ``"1,3,224,224"``.
    config: a PruneConfig, a DecomposeConfig, or a list of them (applied in order).
    data: calibration batches: for ``taylor``, and for choosing per-layer ratios under a target.
    target: keep this share of MACs or parameters (or a latency); the methods in `config` are searched for it (the
        given ratio or ranks are then starting points, per-layer values set by the user are kept).
    recommend: under a target, choose the pruning ratio of each layer: with ``data``, the best of several
        allocations judged by their output after BatchNorm re-estimation on that data (EagleEye); under a latency
        target or ``Target(device=...)``, the best of allocations weighted by measured time per MAC; otherwise by
        LAMP scores. Default: on given ``data`` or a device, else off (one uniform ratio: LAMP alone lost to it,
        docs/benchmarks.md). Without a target, ``recommend=True`` spreads each PruneConfig's ratio (as the share
        of all channels) over the layers by LAMP scores (weighted by measured sensitivity when ``data`` is given).
    inplace: modify `model` itself instead of a copy.
    """
    if target is not None:
        from presso.compress.budget import compress_to_target

        configs = list(config) if isinstance(config, (list, tuple)) else [config]
        prune = next((c for c in configs if isinstance(c, PruneConfig)), None)
        decomp = next((c for c in configs if isinstance(c, DecomposeConfig)), None)
        ins = _as_inputs(example_inputs)
        return compress_to_target(model, ins, target, prune=prune, decompose=decomp, recommend=recommend, data=data,
                                  progress=progress)  # fmt: skip
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs:
        raise ConfigError("No compression config given.")
    if recommend:
        configs = [_recommended(model, _as_inputs(example_inputs), c, data) for c in configs]
    for c in configs:
        if type(c) not in _METHODS:
            raise ConfigError(f"No compression method for {type(c).__name__}; use one of {list(_METHODS)}.")
    inputs = _as_inputs(example_inputs)
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


def _recommended(model, inputs, config, data):
    """A PruneConfig whose global ratio is spread over layers by LAMP scores (the user's per-layer values win)."""
    if not isinstance(config, PruneConfig) or config.ratio is None or config.criterion == "index":
        return config
    import dataclasses

    from presso.compress.recommend import lamp_scores

    ratios = lamp_scores(model, inputs, data=data).ratios(config.ratio)
    return dataclasses.replace(config, ratio=None, per_layer={**ratios, **config.per_layer})


def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, (str, InputSpec)):
        return InputSpec.parse(example_inputs).example_inputs()
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


from presso._verbs import callable_package  # noqa: E402

callable_package(__name__, compress)
