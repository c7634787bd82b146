"""Compressor: structured pruning and low-rank decomposition of any PyTorch model.

``compress(model, example_inputs, config)`` looks the implementation up by the config's type, runs it on a copy of
the model, and returns the smaller model with its figures and the recipe step that reproduces it. A list of configs
runs in the order given, one recipe step each; ``[PruneConfig(...), DecomposeConfig(...)]`` (prune, then decompose
what remains) is the order the CLI uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from presso.compress.decompose import DecomposeConfig
from presso.compress.engine import CompressResult, apply, as_inputs, layer_channels, register_method
from presso.compress.prune import PruneConfig, load_layer_file
from presso.compress.target import Target
from presso.models.spec import InputSpec

__all__ = [
    "CompressResult",
    "DecomposeConfig",
    "PruneConfig",
    "Target",
    "compress",
    "layer_channels",
    "load_layer_file",
    "register_method",
]

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
    inputs = as_inputs(example_inputs)
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if target is not None:
        from presso.compress.budget import compress_to_target

        prune = next((c for c in configs if isinstance(c, PruneConfig)), None)
        decomp = next((c for c in configs if isinstance(c, DecomposeConfig)), None)
        return compress_to_target(model, inputs, target, prune=prune, decompose=decomp, recommend=recommend, data=data,
                                  progress=progress)  # fmt: skip
    if recommend:
        configs = [_recommended(model, inputs, c, data) for c in configs]
    return apply(model, inputs, configs, data=data, progress=progress, inplace=inplace)


def _recommended(model, inputs, config, data):
    """A PruneConfig whose global ratio is spread over layers by LAMP scores (the user's per-layer values win)."""
    if not isinstance(config, PruneConfig) or config.ratio is None or config.criterion == "index":
        return config
    from presso.compress.recommend import lamp_scores

    ratios = lamp_scores(model, inputs, data=data).ratios(config.ratio)
    return dataclasses.replace(config, ratio=None, per_layer={**ratios, **config.per_layer})


from presso._verbs import callable_package  # noqa: E402

callable_package(__name__, compress)
