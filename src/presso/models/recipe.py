"""The recipe: a replayable record of every structural change made to a model, and its replay.

A step is a JSON object ``{"type": ..., "config": ..., "ops": [...]}``. Replaying a step needs only the model and
the step -- no example inputs, no dependency graph, no data -- which is what makes loading a model directory fast
and exact. This module is on the ground floor (``models/``): loading a model directory replays its recipe with
Torch-Pruning's per-layer pruning functions and the factorized-layer builders below, and never imports the
compressor (its planner, criteria or searches). A new compression method registers the replay of its own step type
with ``@register_replay``.
"""

from __future__ import annotations

import re
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
    fn = _REPLAYERS.get(step.get("type")) if isinstance(step, dict) else None
    if fn is None:
        kind = step.get("type") if isinstance(step, dict) else step
        raise ModelSourceError(f"Unknown recipe step {kind!r} in presso.json; upgrade presso to load this model.")
    fn(model, step)


def replay_all(model: nn.Module, recipe: list[dict[str, Any]], where: str = "presso.json") -> None:
    """Replay every step; a malformed step (a card may come from anyone) is one clear error naming it.

    The replayers check names and values where they read them (``resolve``, ``_op``); what still fails inside torch
    or Torch-Pruning on hostile values (an index list that does not fit the layer) is caught here.
    """
    for i, step in enumerate(recipe):
        try:
            replay(model, step)
        except ModelSourceError as e:
            raise ModelSourceError(f"{where}, recipe step {i + 1}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, AssertionError) as e:
            raise ModelSourceError(
                f"{where}, recipe step {i + 1} ({step.get('type')}) is malformed or does not fit the model: "
                f"{type(e).__name__}: {str(e)[:200]}. Re-create the model directory."
            ) from None


_NAME = re.compile(r"^[^\s.]+(\.[^\s.]+)*$")  # dotted names as nn.Module names them (RegNet's "block4-11")
_PRUNER_FNS = ("prune_out_channels", "prune_in_channels")


def _checked_name(name: Any) -> str:
    if (
        not isinstance(name, str)
        or (name and not _NAME.match(name))
        or any(p.startswith("__") for p in name.split("."))
    ):
        raise ModelSourceError(f"The recipe names {name!r}, which is not a layer name.")
    return name


def _op(op: Any, key: str, kind: type | tuple[type, ...]):
    value = op.get(key) if isinstance(op, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ModelSourceError(f"A recipe operation's '{key}' is missing or has the wrong type ({value!r:.60}).")
    return value


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, Any]:
    """(parent module, attribute, object) for a dotted name of a module or parameter; '' is the model itself."""
    name = _checked_name(name)
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
    for op in _op(step, "ops", list):
        parent, attr, obj = resolve(model, _op(op, "target", str))
        if _op(op, "op", str) == "setattr":
            name, value = _op(op, "attr", str), op.get("value")
            if not name.isidentifier() or name.startswith("_"):
                raise ModelSourceError(f"The recipe sets attribute {name!r}, which is not a public attribute name.")
            if not all(isinstance(v, (int, float, bool)) for v in (value if isinstance(value, list) else [value])):
                raise ModelSourceError(f"The recipe sets '{name}' to {value!r:.60}, not a number or list of numbers.")
            setattr(obj, name, value)
            continue
        pruner = pruners.get(_op(op, "pruner", str))
        if pruner is None:
            raise UnsupportedLayerError(f"Recipe uses pruner '{op['pruner']}', unknown to this Presso version.")
        fn = _op(op, "fn", str)
        if fn not in _PRUNER_FNS:
            raise ModelSourceError(f"The recipe calls '{fn}', which is not a pruning function.")
        idxs = _op(op, "idxs", list)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idxs):
            raise ModelSourceError("A recipe operation's 'idxs' must be non-negative channel indices.")
        pruner.pruning_dim = _op(op, "dim", int)
        result = getattr(pruner, fn)(obj, idxs)
        if _op(op, "kind", str) == "param":
            setattr(parent, attr, result)


# --------------------------------------------------------------------------- decomposition
@register_replay("decompose")
def replay_decompose(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild each decomposed layer's structure (the weights come from the model directory)."""
    for name, info in _op(step, "layers", dict).items():
        parent, attr, module = resolve(model, name)
        method, ranks = _op(info, "method", str), _op(info, "ranks", list)
        if method not in ("svd", "tucker", "cp"):
            raise ModelSourceError(f"The recipe decomposes '{name}' with unknown method {method!r}.")
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ModelSourceError(f"The recipe decomposes '{name}', a {type(module).__name__}, not a conv or linear.")
        limit = module.weight.numel()
        if len(ranks) != (2 if method == "tucker" else 1) or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= limit for r in ranks
        ):
            raise ModelSourceError(f"The recipe's ranks {ranks!r:.60} for '{name}' do not fit the layer.")
        setattr(parent, attr, build(module, method, tuple(ranks)))


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
