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

    # {"source": "torchvision:resnet18", "kwargs": {...}, "weights": "random init" | {"from", "path", "sha256"}}
    source: dict[str, Any]
    input_spec: str | None = None
    recipe: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # verbs run, with their settings and figures
    preprocess: dict[str, Any] | None = None  # presso.data.Preprocess.to_json(): how images become inputs
    labels: list[str] | None = None  # class names, in output order (recorded by supervised training)
    task: str | None = None  # "classify", "detect", or a user's "file.py:Class" (presso.tasks); None: inferred

    def to_json(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, "version": CARD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "presso.json") -> ModelCard:
        """A card from its JSON, every field's type checked: a card may come from anyone, so a wrong type is a
        clear error here rather than a crash wherever the field is first used."""
        if not isinstance(data, dict) or data.get("format") != CARD_FORMAT:
            raise ModelSourceError(f'{where} is not a Presso model card (missing "format": "{CARD_FORMAT}").')
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ModelSourceError(f"{where} has an invalid card version {version!r}; re-create the model directory.")
        if version > CARD_VERSION:
            raise ModelSourceError(
                f"{where} was written by a newer Presso (card version {version}); upgrade presso to load it."
            )
        source = _field(data, "source", dict, where, required=True)
        if not isinstance(source.get("source"), str):
            raise ModelSourceError(f'{where}: "source.source" must be a string such as "torchvision:resnet18".')
        if not isinstance(source.get("kwargs", {}), dict):
            raise ModelSourceError(f'{where}: "source.kwargs" must be an object of name: value pairs.')
        if "weights" in source and not isinstance(source["weights"], (str, dict)):
            raise ModelSourceError(f'{where}: "source.weights" must be a string or an object (file, sha256).')
        if "code" in source and not isinstance(source["code"], str):
            raise ModelSourceError(f'{where}: "source.code" must be a relative path inside the directory.')
        recipe = _field(data, "recipe", list, where)
        if not all(isinstance(step, dict) for step in recipe):
            raise ModelSourceError(f'{where}: every "recipe" step must be an object.')
        labels = _field(data, "labels", list, where, default=None)
        if labels is not None and not all(isinstance(x, str) for x in labels):
            raise ModelSourceError(f'{where}: "labels" must be a list of strings.')
        return cls(
            source=dict(source),
            input_spec=_field(data, "input_spec", str, where, default=None),
            recipe=list(recipe),
            figures=dict(_field(data, "figures", dict, where)),
            history=list(_field(data, "history", list, where)),
            preprocess=_field(data, "preprocess", dict, where, default=None),
            labels=labels,
            task=_field(data, "task", str, where, default=None),
        )


_EMPTY = {dict: dict, list: list}


def _field(data: dict[str, Any], key: str, kind: type, where: str, *, required: bool = False, **default):
    """``data[key]`` checked to be a `kind` (absent or null: the default, or the kind's empty value)."""
    value = data.get(key)
    if value is None:
        if required:
            raise ModelSourceError(f'{where} has no "{key}"; re-create the model directory.')
        return default["default"] if "default" in default else _EMPTY[kind]()
    if not isinstance(value, kind):
        raise ModelSourceError(
            f'{where}: "{key}" must be a {kind.__name__.replace("dict", "JSON object").replace("list", "JSON list")}'
            f", not {type(value).__name__}; re-create the model directory."
        )
    return value


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


def check_input_spec(card: ModelCard | None, spec) -> None:
    """Refuse an input spec (``presso.models.spec.InputSpec``) whose image size or channel count differs from the
    preprocessing recorded in the card: the model was trained on those inputs, the card keeps them for prediction,
    and a file exported at another size would fail there (or, size-agnostic, quietly see other pixels)."""
    from presso.errors import InputSpecError

    pp = card.preprocess if card is not None else None
    shape = spec.tensors[0].shape if spec.tensors else ()
    if not isinstance(pp, dict) or len(shape) != 4:
        return
    try:
        h, w = (int(v) for v in pp["size"])
        c = int(pp["channels"])
    except (KeyError, TypeError, ValueError):
        return  # a malformed record is reported where it is read
    if tuple(shape[1:]) != (c, h, w):
        raise InputSpecError(
            f"--input-shape {spec} does not match the model: it was trained on {h}x{w} images with {c} channel"
            f"{'s' if c != 1 else ''} (input {shape[0]},{c},{h},{w}, recorded in its card). Drop -s to use that, "
            f"or retrain it at the new size first (presso train MODEL --data DATA --image-size "
            f"{shape[2]},{shape[3]})."
        )
