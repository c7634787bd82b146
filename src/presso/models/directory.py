"""The Presso model directory: ``presso.json`` (the card) + ``weights.safetensors``.

Loading rebuilds the source architecture, replays the recipe of structural changes, then loads the weights. Nothing
is unpickled, and a user's own module classes survive because they are rebuilt from their own code.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from presso.errors import ModelSourceError
from presso.models.card import ModelCard, ensure_card, get_card, set_card
from presso.models.figures import set_mode

CARD_FILE = "presso.json"
WEIGHTS_FILE = "weights.safetensors"


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CARD_FILE).is_file()


def save_model_dir(
    model: nn.Module,
    out_dir: str | Path,
    *,
    input_spec=None,
    figures: dict | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Presso model directory, atomically: a crash never leaves a half-written model that loads.

    extra_files: name -> content written beside the weights (e.g. the trainer's metrics.csv), in the same atomic step.
    overwrite: replace what `out_dir` holds (a finished model too); without it a non-empty folder is refused
        (``presso.outdir``). The directory the model was loaded from is never replaced.
    """
    from safetensors.torch import save_model

    import presso.outdir as outdir

    out = Path(out_dir)
    card = copy.deepcopy(ensure_card(model))
    if input_spec is not None:
        card.input_spec = str(input_spec)
    if figures:
        card.figures.update(figures)
    with outdir.writing(out, overwrite=overwrite, sources=[card.source.get("code_from")]) as tmp:
        src = card.source.get("source", "")
        prefix, sep, _ = src.partition(":")
        if sep and prefix.endswith(".py"):
            code_file = Path(prefix)
            if card.source.get("code") and is_model_dir(src_dir := Path(card.source.get("code_from", ""))):
                code_file = src_dir / card.source["code"]
            if code_file.is_file():
                (tmp / "code").mkdir()
                shutil.copy2(code_file, tmp / "code" / code_file.name)
                card.source["code"] = f"code/{code_file.name}"
        card.source.pop("code_from", None)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CARD_FILE).write_text(json.dumps(card.to_json(), indent=2, default=_json_default) + "\n")
    return out


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_card(path: str | Path) -> ModelCard:
    """The card of a model directory; size, nesting and file type bounded (it may come from anyone)."""
    from presso.safeio import read_json

    p = Path(path) / CARD_FILE
    data = read_json(p, "model card", error=ModelSourceError)
    return ModelCard.from_json(data, str(p))


def load_model_dir(path: str | Path, *, trust: bool = False, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a saved model: source architecture -> replay recipe -> load weights (strict).

    ``trust`` is needed only when the architecture comes from Python code (docs/security.md); ``build`` rebuilds the
    source architecture instead of the card's source.
    """
    from safetensors import SafetensorError

    import presso.models.qat  # noqa: F401  # registers the replay of "qat" steps
    from presso.models.recipe import replay_all
    from presso.models.sources import build_from_card
    from presso.safeio import regular_file

    path = Path(path)
    card = read_card(path)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise ModelSourceError(f"'{path}' has no {WEIGHTS_FILE}; the directory is incomplete.")
    regular_file(weights, "weights file", error=ModelSourceError)
    model = build() if build is not None else build_from_card(card, base=path, trust=trust)
    replay_all(model, card.recipe, where=str(path / CARD_FILE))
    try:
        missing, unexpected = _load_weights(model, weights)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise ModelSourceError(f"Weights in '{weights}' do not fit the rebuilt model: {str(e)[:400]}") from None
    if missing or unexpected:
        raise ModelSourceError(
            f"Weights in '{weights}' do not match the rebuilt model (missing: {list(missing)[:5]}, unexpected: "
            f"{list(unexpected)[:5]}); was the source code changed since the model was saved?"
        )
    set_mode(model, False)
    card.source["code_from"] = str(path)
    set_card(model, card)
    return model


def _load_weights(model: nn.Module, path: Path):
    """Load safetensors weights into `model` (no pickle).

    Done here rather than with ``safetensors.torch.load_model`` because that drops the per-module state-dict
    versions some modules require when loading (torchvision's MNASNet raises without them); shared tensors that
    ``save_model`` de-duplicated are restored from the aliases it recorded in the file's metadata.
    """
    from collections import OrderedDict

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        aliases = f.metadata() or {}
    state = OrderedDict(load_file(str(path)))
    expected = model.state_dict()
    for removed, kept in aliases.items():
        if removed in expected and removed not in state and kept in state:
            state[removed] = state[kept]
    state._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    result = model.load_state_dict(state, strict=False)
    return result.missing_keys, result.unexpected_keys


__all__ = ["save_model_dir", "load_model_dir", "read_card", "is_model_dir", "get_card"]
