"""The recipe: a replayable record of every structural change made to a model, and its replay.

A step is a JSON object ``{"type": ..., "config": ..., "ops": [...]}``. Replaying a step needs only the model and
the step -- no example inputs, no dependency graph, no data -- which is what makes loading a model directory fast
and exact. This module is on the ground floor (``models/``): loading a model directory replays its recipe with
Torch-Pruning's per-layer pruning functions and the factorized-layer builders below, and never imports the
compressor (its planner, criteria or searches). A new compression method registers the replay of its own step type
with ``@register_replay``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from presso.errors import ModelSourceError, UnsupportedLayerError

_REPLAYERS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {}


def register_replay(step_type: str):
    def deco(fn):
        _REPLAYERS[step_type] = fn
        return fn

    return deco


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    fn = _REPLAYERS.get(step.get("type"))
    if fn is None:
        raise ModelSourceError(
            f"Unknown recipe step '{step.get('type')}' in presso.json; upgrade presso to load this model."
        )
    fn(model, step)


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, Any]:
    """(parent module, attribute, object) for a dotted name of a module or parameter; '' is the model itself."""
    if name == "":
        return model, "", model
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        obj = getattr(parent, attr)
    except AttributeError:
        raise ModelSourceError(
            f"The recipe names '{name}', which the rebuilt model does not have; was its source code changed?"
        ) from None
    return parent, attr, obj


# --------------------------------------------------------------------------- pruning
@register_replay("prune")
def replay_prune(model: nn.Module, step: dict[str, Any]) -> None:
    """Re-run every recorded pruning call (layer, Torch-Pruning function, indices) and attribute fix-up."""
    # Torch-Pruning's per-layer functions only (imported here: a model without pruning steps never loads it)
    from torch_pruning.pruner.function import PrunerBox

    pruners = {type(p).__name__: p for p in PrunerBox.values() if p is not None}
    for op in step.get("ops", []):
        parent, attr, obj = resolve(model, op["target"])
        if op["op"] == "setattr":
            setattr(obj, op["attr"], op["value"])
            continue
        pruner = pruners.get(op["pruner"])
        if pruner is None:
            raise UnsupportedLayerError(f"Recipe uses pruner '{op['pruner']}', unknown to this Presso version.")
        pruner.pruning_dim = op["dim"]
        result = getattr(pruner, op["fn"])(obj, op["idxs"])
        if op["kind"] == "param":
            setattr(parent, attr, result)


# --------------------------------------------------------------------------- decomposition
@register_replay("decompose")
def replay_decompose(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild each decomposed layer's structure (the weights come from the model directory)."""
    for name, info in step["layers"].items():
        parent, attr, module = resolve(model, name)
        setattr(parent, attr, build(module, info["method"], tuple(info["ranks"])))


def build(module: nn.Module, method: str, ranks: tuple[int, ...]) -> nn.Sequential:
    """The replacement's structure (weights uninitialised: set by ``factorize`` or loaded from a model directory)."""
    dev, dtype = module.weight.device, module.weight.dtype
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        (r,) = ranks
        seq = nn.Sequential(nn.Linear(module.in_features, r, bias=False), nn.Linear(r, module.out_features, has_bias))
        return seq.to(dev, dtype)
    o, i, kh, kw = module.weight.shape
    stride, padding, dilation = module.stride, module.padding, module.dilation
    if method == "svd":
        (r,) = ranks
        seq = nn.Sequential(nn.Conv2d(i, r, 1, stride=stride, bias=False), nn.Conv2d(r, o, 1, bias=has_bias))
    elif method == "tucker":
        ro, ri = ranks
        seq = nn.Sequential(
            nn.Conv2d(i, ri, 1, bias=False),
            nn.Conv2d(ri, ro, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.Conv2d(ro, o, 1, bias=has_bias),
        )
    else:
        (r,) = ranks
        seq = nn.Sequential(
            nn.Conv2d(i, r, 1, bias=False),
            nn.Conv2d(r, r, (kh, 1), stride=(stride[0], 1), padding=(padding[0], 0), dilation=(dilation[0], 1),
                      groups=r, bias=False),
            nn.Conv2d(r, r, (1, kw), stride=(1, stride[1]), padding=(0, padding[1]), dilation=(1, dilation[1]),
                      groups=r, bias=False),
            nn.Conv2d(r, o, 1, bias=has_bias),
        )  # fmt: skip
    return seq.to(dev, dtype)
