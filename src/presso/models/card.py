"""The model card: what a Presso model directory records next to its weights (``presso.json``)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from presso.errors import ModelSourceError

CARD_FORMAT = "presso-model"
CARD_VERSION = 1
CARD_ATTR = "presso_card"  # where a loaded model carries its card


@dataclass
class ModelCard:
    """Source, input spec, the recipe of every structural change, and the figures measured along the way."""

    source: dict[str, Any]  # {"source": "torchvision:resnet18", "kwargs": {...}}
    input_spec: str | None = None
    recipe: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # verbs run, with their settings and figures
    preprocess: dict[str, Any] | None = None  # presso.data.Preprocess.to_json(): how images become inputs
    labels: list[str] | None = None  # class names, in output order (recorded by supervised training)

    def to_json(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, "version": CARD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "presso.json") -> ModelCard:
        if not isinstance(data, dict) or data.get("format") != CARD_FORMAT:
            raise ModelSourceError(f'{where} is not a Presso model card (missing "format": "{CARD_FORMAT}").')
        if data.get("version", 0) > CARD_VERSION:
            raise ModelSourceError(
                f"{where} was written by a newer Presso (card version {data['version']}); upgrade presso to load it."
            )
        try:
            return cls(
                source=dict(data["source"]),
                input_spec=data.get("input_spec"),
                recipe=list(data.get("recipe", [])),
                figures=dict(data.get("figures", {})),
                history=list(data.get("history", [])),
                preprocess=data.get("preprocess"),
                labels=data.get("labels"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelSourceError(f"{where} is damaged ({e!r}); re-create the model directory.") from None


def get_card(model) -> ModelCard | None:
    return getattr(model, CARD_ATTR, None)


def set_card(model, card: ModelCard) -> None:
    # object.__setattr__ keeps nn.Module from treating the card specially; it is a plain Python attribute.
    object.__setattr__(model, CARD_ATTR, card)


def ensure_card(model, source: str | None = None) -> ModelCard:
    """The model's card, creating one for a model built in Python (its source is then its class)."""
    card = get_card(model)
    if card is None:
        cls = type(model)
        card = ModelCard(source={"source": source or f"python:{cls.__module__}.{cls.__qualname__}", "kwargs": {}})
        set_card(model, card)
    return card


def copy_card(src, dst) -> None:
    card = get_card(src)
    if card is not None:
        set_card(dst, copy.deepcopy(card))
