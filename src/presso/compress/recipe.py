"""The recipe: a replayable record of every structural change made to a model.

A step is a JSON object ``{"type": ..., "config": ..., "ops": [...]}``. Replaying a step needs only the model and
the step -- no example inputs, no dependency graph, no data -- which is what makes loading a model directory fast
and exact. Each step type registers one replay function here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from presso.errors import ModelSourceError

_REPLAYERS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {}


def register_replay(step_type: str):
    def deco(fn):
        _REPLAYERS[step_type] = fn
        return fn

    return deco


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    kind = step.get("type")
    if kind not in _REPLAYERS:
        _load_builtin_replayers()
    fn = _REPLAYERS.get(kind)
    if fn is None:
        raise ModelSourceError(f"Unknown recipe step '{kind}' in presso.json; upgrade presso to load this model.")
    fn(model, step)


def _load_builtin_replayers() -> None:
    import presso.compress.decompose  # noqa: F401  (registers "decompose")
    import presso.compress.prune  # noqa: F401  (registers "prune")


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
