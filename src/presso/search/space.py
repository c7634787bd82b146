"""Search spaces: what an architecture search may build.

A space turns an Optuna trial into an architecture (a JSON-able dict) and an architecture into an ordinary
``nn.Module`` that every other verb accepts. A new space is one new file with a ``@register_space`` class.
"""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Any, ClassVar

from torch import nn

from presso.errors import ConfigError, closest

SPACES: dict[str, type[SearchSpace]] = {}


def register_space(cls: type[SearchSpace]) -> type[SearchSpace]:
    SPACES[cls.name] = cls
    return cls


class SearchSpace(abc.ABC):
    """An architecture family for images of ``image_size`` (H, W) with ``in_chans`` channels and ``num_classes``."""

    name: ClassVar[str]

    def __init__(self, image_size: tuple[int, int], in_chans: int, num_classes: int):
        self.image_size, self.in_chans, self.num_classes = tuple(image_size), in_chans, num_classes

    @abc.abstractmethod
    def sample(self, trial) -> dict[str, Any]:
        """Draw an architecture with ``trial.suggest_*`` (an Optuna trial, or a ``FixedTrial``)."""

    @abc.abstractmethod
    def build(self, arch: dict[str, Any]) -> nn.Module:
        """The model of ``arch`` (random init), carrying a model card so it saves and reloads like any model."""

    @abc.abstractmethod
    def zoo(self) -> dict[str, dict[str, Any]]:
        """Known-good architectures of this space, by name, as Optuna parameters: the search's warm start."""

    @abc.abstractmethod
    def smallest(self) -> dict[str, Any]:
        """The member with the lowest latency: the search refuses a budget it cannot meet."""

    def resolution(self, arch: dict[str, Any]) -> tuple[int, int]:
        r = arch.get("resolution")
        return (int(r), int(r)) if r else self.image_size

    def input_shape(self, arch: dict[str, Any]) -> str:
        h, w = self.resolution(arch)
        return f"1,{self.in_chans},{h},{w}"


def arch_key(arch: dict[str, Any]) -> str:
    """A stable identity of an architecture: equal dicts give equal keys on every machine."""
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def get_space(name: str, image_size: tuple[int, int], in_chans: int, num_classes: int) -> SearchSpace:
    if name not in SPACES:
        raise ConfigError(f"Unknown search space '{name}'.{closest(name, SPACES)} Spaces: {', '.join(SPACES)}.")
    return SPACES[name](image_size, in_chans, num_classes)
