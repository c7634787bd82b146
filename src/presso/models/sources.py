"""Where models come from: ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory``, a Presso model
directory, ``model.pt2`` (torch.export), and -- only when trusted -- a full-pickle ``.pt``."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from torch import nn

from presso.errors import ModelSourceError, UntrustedFileError, closest
from presso.models.card import CARD_ATTR, ModelCard, set_card
from presso.models.figures import set_mode

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".ckpt")


def load_model(source: str | Path, *, trust: bool = False, **kwargs: Any) -> nn.Module:
    """Build a model from a source string.

    - ``presso:resnet8`` -- Presso's small ResNets for small images (``presso.models.builtin``).
    - ``torchvision:resnet18`` -- torchvision's builder, random init; kwargs such as ``num_classes`` pass through.
    - ``timm:mobilenetv3_small_100`` -- ``timm.create_model(..., pretrained=False, **kwargs)``.
    - ``path/to/file.py:factory`` -- calls ``factory(**kwargs)`` from the user's own file.
    - a Presso model directory (holds ``presso.json``) -- rebuilt, recipe replayed, weights loaded; no pickle.
    - ``model.pt2`` -- a ``torch.export`` program.
    - ``model.pt`` holding a whole pickled module -- only with ``trust=True`` (unpickling runs arbitrary code).

    The model is returned in eval mode and carries a model card (``presso_card``) naming its source, so verbs can
    record lineage.
    """
    text = str(source).strip()
    if not text:
        raise ModelSourceError("Empty model source: give e.g. torchvision:resnet18, timm:resnet18 or file.py:factory.")
    path = Path(text)
    if path.is_dir():
        from presso.models.directory import load_model_dir

        return load_model_dir(path, **kwargs)
    prefix, sep, rest = text.partition(":")
    if sep and prefix == "presso":
        model = _builtin(rest, kwargs)
    elif sep and prefix == "torchvision":
        model = _torchvision(rest, kwargs)
    elif sep and prefix == "timm":
        model = _timm(rest, kwargs)
    elif sep and prefix.endswith(".py"):
        model = _from_file(Path(prefix), rest, kwargs)
    elif path.suffix == ".py":
        raise ModelSourceError(f"'{text}' names a Python file but no factory: write it as {text}:FUNCTION_NAME.")
    elif path.suffix == ".pt2":
        model = _from_pt2(path)
    elif path.suffix in PICKLE_SUFFIXES or path.is_file():
        model = _from_pickle(path, trust)
    elif path.suffix or "/" in text:
        raise ModelSourceError(f"Model file '{text}' does not exist.")
    else:
        raise ModelSourceError(
            f"Unknown model source '{text}': use presso:NAME, torchvision:NAME, timm:NAME, path/to/file.py:FACTORY, "
            "a Presso model directory, or a .pt2 file."
        )
    set_card(model, ModelCard(source={"source": text, "kwargs": _jsonable(kwargs)}))
    return set_mode(model, False)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    import json

    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ModelSourceError(f"Model kwargs must be plain JSON values (numbers, strings, lists): {e}.") from None
    return dict(kwargs)


def _call_builder(builder, name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return builder(**kwargs)
    except TypeError as e:
        raise ModelSourceError(f"Could not build '{name}' with {kwargs or 'no arguments'}: {e}.") from None


def _builtin(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from presso.models.builtin import BUILDERS

    if name not in BUILDERS:
        raise ModelSourceError(f"Presso has no built-in model '{name}' (it has {', '.join(BUILDERS)}).")
    return _call_builder(BUILDERS[name], f"presso:{name}", kwargs)


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelSourceError(f"torchvision has no model '{name}'.{closest(name, names)}")
    return _call_builder(
        lambda **kw: torchvision.models.get_model(name, weights=None, **kw), f"torchvision:{name}", kwargs
    )


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelSourceError(f"timm has no model '{name}'.{closest(name, timm.list_models())}")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    return _call_builder(lambda **kw: timm.create_model(name, pretrained=False, **kw), f"timm:{name}", kwargs)


def _from_file(path: Path, factory: str, kwargs: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise ModelSourceError(f"Model file '{path}' does not exist.")
    # A unique module name per file content keeps two user files with the same name apart.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    mod_name = f"presso_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSourceError(f"Cannot import '{path}' as Python.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling of user classes look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: report, don't crash deep inside
        del sys.modules[mod_name]
        raise ModelSourceError(f"Importing '{path}' failed: {type(e).__name__}: {e}") from e
    builder = getattr(module, factory, None)
    if builder is None or not callable(builder):
        members = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelSourceError(f"'{path}' has no callable '{factory}'.{closest(factory, members)}")
    model = _call_builder(builder, f"{path}:{factory}", kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"'{path}:{factory}' returned {type(model).__name__}, not a torch.nn.Module; make it return the model."
        )
    return model


def _from_pt2(path: Path) -> nn.Module:
    import torch

    if not path.is_file():
        raise ModelSourceError(f"Model file '{path}' does not exist.")
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ModelSourceError(f"'{path}' is not a readable torch.export (.pt2) program: {e}") from None
    return program.module()


def _from_pickle(path: Path, trust: bool) -> nn.Module:
    import torch

    if not path.is_file():
        raise ModelSourceError(f"Model file '{path}' does not exist.")
    if not trust:
        # A weights-only load is safe: it tells a state dict (not a model) from a pickled module without running code.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure of the safe loader: decide from the file's bytes what to tell the user
            if _looks_like_pickle(path):
                raise UntrustedFileError(
                    f"'{path}' is a full pickle: loading it runs code from the file. If you trust its origin, pass "
                    "--trust (trust=True); otherwise save the model as a Presso model directory or .pt2."
                ) from None
            raise ModelSourceError(f"'{path}' is not a model file Presso can read ({type(e).__name__}).") from None
        if isinstance(obj, dict):
            raise ModelSourceError(
                f"'{path}' holds only weights (a state dict), not a model: build the architecture from its source "
                "(e.g. torchvision:NAME or file.py:factory) and load the weights into it."
            )
        if isinstance(obj, nn.Module):
            return obj
        raise ModelSourceError(f"'{path}' holds a {type(obj).__name__}, not a model.")
    # Reached only with trust=True: the user explicitly trusts this file, so a full unpickle is allowed.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user (--trust)
    except Exception as e:
        raise ModelSourceError(f"'{path}' could not be unpickled: {type(e).__name__}: {e}") from None
    if not isinstance(obj, nn.Module):
        raise ModelSourceError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module.")
    return obj


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def build_from_card(card: ModelCard, base: Path | None = None) -> nn.Module:
    """Rebuild the *source* architecture a card names (before any recipe)."""
    src = card.source.get("source", "")
    kwargs = dict(card.source.get("kwargs", {}))
    prefix, sep, rest = src.partition(":")
    if sep and prefix.endswith(".py"):
        candidates = [Path(prefix)]
        if card.source.get("code") and base is not None:
            candidates.insert(0, base / card.source["code"])  # the copy saved with the model wins: it is what ran
        for cand in candidates:
            if cand.is_file():
                return _from_file(cand, rest, kwargs)
        raise ModelSourceError(f"The model's source file '{prefix}' is missing; restore it or rebuild the model.")
    if src.startswith("python:"):
        mod_name, _, qual = src[len("python:") :].rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod_name), qual)
            if not inspect.isclass(cls):
                raise TypeError
            return cls(**kwargs)
        except Exception:
            raise ModelSourceError(
                f"The model was built in Python ({src}) and cannot be rebuilt by name; save it from a source such as "
                "file.py:factory, or pass build=callable to presso.load_model."
            ) from None
    model = load_model(src, **kwargs)
    object.__delattr__(model, CARD_ATTR)
    return model
