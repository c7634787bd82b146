"""Channel-importance criteria: the registry, the built-in criteria, and the gradients a criterion may need.

A criterion is a factory ``cfg -> Torch-Pruning importance object`` (a callable scoring every channel of a coupled
group), registered under its name. Adding one is a single decorated function, anywhere that is imported before
pruning runs::

    @register_importance("l1-reversed")
    def _l1_reversed(cfg):
        return MyImportance()

Its name is then accepted by :class:`~presso.compress.prune.config.PruneConfig` and by ``presso compress
--criterion``: the registry is the only list of criteria. ``needs_gradients=True`` declares that the criterion ranks
channels by gradients, which the pruner then accumulates from the data it is given before scoring.

This module does not import the config type: the factories receive a ``PruneConfig``, and the config validates its
criterion against this registry, so the dependency runs config -> importance only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from presso.errors import ConfigError, UnsupportedLayerError, closest
from presso.models.figures import run_model

__all__ = [
    "Criterion",
    "register_importance",
    "criteria",
    "get_criterion",
    "needs_gradients",
    "accumulate_gradients",
]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion. ``factory(cfg)`` returns the Torch-Pruning importance object, or None for a criterion
    that ranks nothing (``index``: the user names the channels)."""

    name: str
    factory: Callable[[Any], Any]
    needs_gradients: bool = False


_REGISTRY: dict[str, Criterion] = {}


def register_importance(name: str, *, needs_gradients: bool = False):
    """Register ``factory(cfg) -> importance`` as criterion ``name`` (a later registration of a name replaces it)."""

    def deco(fn):
        _REGISTRY[name] = Criterion(name, fn, needs_gradients)
        return fn

    return deco


def criteria() -> list[str]:
    """The registered criteria's names, in registration order (the built-ins first)."""
    return list(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; ConfigError naming the registered ones if there is none."""
    crit = _REGISTRY.get(name)
    if crit is None:
        raise ConfigError(f"Unknown criterion '{name}': use one of {', '.join(_REGISTRY)}.{closest(name, _REGISTRY)}")
    return crit


def needs_gradients(name: str) -> bool:
    """Whether criterion ``name`` ranks channels by gradients, so needs a few batches of data."""
    return get_criterion(name).needs_gradients


# --------------------------------------------------------------------------- built-in criteria
@register_importance("l1")
def _l1(cfg):
    return tp.importance.GroupMagnitudeImportance(p=1)


@register_importance("l2")
def _l2(cfg):
    return tp.importance.GroupMagnitudeImportance(p=2)


@register_importance("gm")
def _gm(cfg):
    return tp.importance.FPGMImportance(p=2)


@register_importance("taylor", needs_gradients=True)
def _taylor(cfg):
    return tp.importance.GroupTaylorImportance()


@register_importance("random")
def _random(cfg):
    return tp.importance.RandomImportance()


@register_importance("index")
def _index(cfg):
    return None  # the user gives the channel indices per layer (PruneConfig.indices): nothing to rank


# --------------------------------------------------------------------------- gradients for first-order criteria
def _loss_for_gradients(out: Any, labels: torch.Tensor | None) -> torch.Tensor:
    """A loss for first-order (Taylor) importance: cross-entropy with labels, else with the model's own predictions
    for logits, else the squared output magnitude for any other output structure."""
    tensors = [t for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise UnsupportedLayerError("The model returns no floating-point tensor to compute Taylor importance from.")
    first = tensors[0]
    if first.dim() == 2 and first.shape[1] > 1:
        target = labels if labels is not None else first.argmax(1).detach()
        return nn.functional.cross_entropy(first, target)
    return sum((t.float() ** 2).mean() for t in tensors)


def accumulate_gradients(model: nn.Module, data: Iterable | None, criterion: str) -> None:
    """Leave in ``model``'s parameters the gradients of :func:`_loss_for_gradients` summed over ``data`` (batches of
    inputs, or (inputs, labels) pairs), for a criterion that ranks channels by them."""
    if data is None:
        raise ConfigError(f"criterion '{criterion}' needs a few batches of data: pass data=... (CLI: --calib DIR).")
    model.zero_grad(set_to_none=True)
    n = 0
    for batch in data:
        inputs, labels = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        _loss_for_gradients(run_model(model, inputs), labels).backward()
        n += 1
    if n == 0:
        raise ConfigError(f"criterion '{criterion}' got an empty data iterable; give at least one batch.")
