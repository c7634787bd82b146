"""Where models come from: ``torchvision:NAME``, ``timm:NAME``, ``presso:NAME``, ``ultralytics:NAME`` (YOLO YAMLs,
the optional extra ``presso[yolo]``), ``transformers:NAME`` (DETR-style detectors from a config or a local folder,
the optional extra ``presso[hf]``), a Presso model directory, ``model.pt2`` (torch.export), and -- only when
trusted -- ``path/to/file.py:factory`` and a full-pickle ``.pt`` (an Ultralytics checkpoint included).

The trust model (docs/security.md): without ``trust=True`` (``--trust``, given by the user, never read from a file)
Presso instantiates only registered builders and reads only data. Running a user's Python file, importing a
``python:`` class, unpickling, and a ``.pt2`` that holds pickled parts all need trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from presso.errors import ModelSourceError, UntrustedFileError, closest
from presso.models.card import CARD_ATTR, ModelCard, set_card
from presso.models.figures import set_mode
from presso.models.weights import (
    ZOO,
    file_record,
    flag,
    load_weights,
    looks_like_pickle,
    read_state_dict,
    timm_cached_file,
)
from presso.safeio import regular_file

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".ckpt")
# Keyword arguments a model's kwargs (from --model-arg or a card) may never carry: they are load_model's own.
RESERVED_KWARGS = frozenset({"trust", "build", "source", "weights", "new_head", "weights_only", "map_location"})
# Installed packages whose modules a python: source may import without trust: importing them runs only their own,
# already-installed code (a python: class from anywhere else could be any module on sys.path, even the cwd's).
SAFE_PACKAGES = frozenset({"presso", "torch", "torchvision", "timm"})
TRUST_HINT = "Pass --trust (trust=True in Python) only if you trust where it came from."


def load_model(
    source: str | Path,
    *,
    trust: bool = False,
    build: Callable[[], nn.Module] | None = None,
    weights: str | Path | None = None,
    new_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a model from a source string.

    - ``presso:resnet8`` -- Presso's small ResNets for small images (``presso.models.builtin``).
    - ``torchvision:resnet18`` -- torchvision's builder, random init; kwargs such as ``num_classes`` pass through.
    - ``timm:mobilenetv3_small_100`` -- ``timm.create_model(..., pretrained=False, **kwargs)``.
    - ``ultralytics:yolov8n.yaml`` -- an Ultralytics YOLO YAML it ships, or ``ultralytics:path/to/own.yaml``, random
      init; kwargs ``num_classes`` (or ``nc``) and ``ch``. A YAML naming anything but Ultralytics' building blocks
      needs ``trust=True``. In eval mode it returns its dense predictions ``[N, 4 + nc, A]`` (``presso.models.
      ultralytics``).
    - ``transformers:DetrForObjectDetection`` or ``transformers:path/to/dir`` -- DETR-style detectors from a config,
      offline, never running custom code; kwargs are config keys (``presso.models.transformers_hub``).
    - ``path/to/file.py:factory`` -- calls ``factory(**kwargs)`` from the user's own file; only with ``trust=True``
      (it runs the file).
    - a Presso model directory (holds ``presso.json``) -- rebuilt, recipe replayed, weights loaded; no pickle. One
      whose architecture comes from Python code (a ``.py`` factory or a ``python:`` class) needs ``trust=True``;
      ``build=callable`` rebuilds the architecture instead.
    - ``model.pt2`` -- a ``torch.export`` program; one holding pickled parts only with ``trust=True``.
    - ``model.pt`` holding a whole pickled module -- only with ``trust=True`` (unpickling runs arbitrary code); an
      Ultralytics checkpoint (``{"model", "ema", ...}``) gives its EMA (else its model) in float, dense eval output.

    Weights, for the sources built from code (``presso:``, ``torchvision:``, ``timm:``, ``ultralytics:``,
    ``file.py:factory``):

    - ``weights=PATH``: safetensors, or a state dict read weights-only (a full pickle only with ``trust=True``).
      ``new_head=True`` loads weights whose classifier has another class count without it.
    - ``torchvision:NAME`` with ``weights="DEFAULT"`` (or any of its weights enum names) or ``pretrained=True``, and
      ``timm:NAME`` with ``pretrained=True``: the file already in the local torch.hub / Hugging Face cache, or one
      error line naming the file looked for. Nothing is downloaded.

    The model is returned in eval mode and carries a model card (``presso_card``) naming its source and its weights
    (``source["weights"]``: the file's path and SHA-256, or ``"random init"``), so verbs can record lineage.
    """
    text = str(source).strip()
    if not text:
        raise ModelSourceError("Empty model source: give e.g. torchvision:resnet18, timm:resnet18 or file.py:factory.")
    if not isinstance(trust, bool):
        raise ModelSourceError(f"trust must be True or False, not {trust!r}.")
    kwargs = check_kwargs(kwargs, text)
    path = Path(text)
    if path.is_dir():
        from presso.models.directory import load_model_dir

        if kwargs:
            raise ModelSourceError(
                f"'{text}' is a Presso model directory: its card fixes how it is built, so model arguments "
                f"({', '.join(kwargs)}) do not apply; drop them."
            )
        _no_weights(weights, text)
        return load_model_dir(path, trust=trust, build=build)
    prefix, sep, rest = text.partition(":")
    zoo = bool(sep) and prefix in ZOO
    pretrained = flag(kwargs.pop("pretrained", False), text) if zoo else False
    if pretrained and weights is not None:
        raise ModelSourceError(
            f"'{text}': give either pretrained=true (the cached weights) or a weights file, not both."
        )
    if weights is not None and not (zoo or (sep and prefix.endswith(".py"))) and path.exists():
        _no_weights(weights, text)  # a .pt2 or a pickled model: refused before it is opened
    record: Any = "random init" if zoo else None
    card_extra: dict[str, Any] = {}
    if sep and prefix == "presso":
        if pretrained:
            raise ModelSourceError(
                f"presso:{rest} has no published pretrained weights; give a file with --weights PATH."
            )
        model = _builtin(rest, kwargs)
    elif sep and prefix == "torchvision":
        weights = "DEFAULT" if pretrained else weights
        model = _torchvision(rest, kwargs)
    elif sep and prefix == "timm":
        model, cached = _timm(rest, kwargs, pretrained, trust)
        record = cached or record
    elif sep and prefix == "ultralytics":
        from presso.models.ultralytics import build_ultralytics

        model, card_extra = build_ultralytics(rest, kwargs, trust=trust)
        record = "random init"
    elif sep and prefix == "transformers":
        from presso.models.transformers_hub import build_transformers

        _no_weights(weights, text)  # built from a config; trained weights come in the folder's model.safetensors
        model, card_extra, record = build_transformers(rest, kwargs)
    elif sep and prefix.endswith(".py"):
        if not trust:
            raise UntrustedFileError(
                f"Loading '{text}' runs the Python file '{prefix}' (its function '{rest}'). {TRUST_HINT}"
            )
        model = _from_file(Path(prefix), rest, kwargs)
        record = "as the factory builds them"
    elif path.suffix == ".py":
        raise ModelSourceError(f"'{text}' names a Python file but no factory: write it as {text}:FUNCTION_NAME.")
    elif path.suffix == ".pt2":
        model = _from_pt2(path, trust)
    elif path.suffix in PICKLE_SUFFIXES or path.is_file():
        model = _from_pickle(path, trust)
        if type(model).__module__.startswith("ultralytics."):  # its card names its YAML, not the pickle
            from presso.models.ultralytics import checkpoint_source

            card_extra = checkpoint_source(model, path)
    elif path.suffix or "/" in text:
        raise ModelSourceError(f"Model file '{text}' does not exist.")
    else:
        raise ModelSourceError(
            f"Unknown model source '{text}': use presso:NAME, torchvision:NAME, timm:NAME, ultralytics:NAME.yaml, "
            "transformers:NAME, path/to/file.py:FACTORY, a Presso model directory, or a .pt2 file."
        )
    if weights is not None:
        if not (zoo or prefix.endswith(".py") or (sep and prefix == "ultralytics")):
            _no_weights(weights, text)
        record = load_weights(model, text, weights, trust=trust, new_head=new_head)
    elif record is None:
        record = "in the model file"
    source = {"source": text, "kwargs": _jsonable(kwargs), "weights": record, **card_extra}
    set_card(model, ModelCard(source=source))
    return set_mode(model, False)


def _no_weights(weights: Any, text: str) -> None:
    if weights is not None:
        raise ModelSourceError(
            f"'{text}' carries its own weights: --weights is for models built from code (torchvision:, timm:, "
            "presso:, file.py:factory)."
        )


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    import json

    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as e:
        raise ModelSourceError(f"Model kwargs must be plain JSON values (numbers, strings, lists): {e}.") from None
    return dict(kwargs)


_KWARG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
MAX_INT_KWARG = 10**7  # no real width, class count or size is larger; bigger values only exhaust memory


def check_kwargs(kwargs: Any, source: str) -> dict[str, Any]:
    """Model keyword arguments as given by a user or a card: a dict of plain names to plain JSON values.

    Refuses load_model's own names (``trust`` must come from the command line, never from a file), private or
    dunder names, and integers too large (or too negative) to be a layer size.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ModelSourceError(
            f"The model arguments of '{source}' must be name=value pairs (a JSON object), not {type(kwargs).__name__}."
        )
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _KWARG_NAME.match(key):
            raise ModelSourceError(
                f"Model argument name {key!r} of '{source}' is not a plain name (letters, digits, _)."
            )
        if key in RESERVED_KWARGS:
            raise ModelSourceError(
                f"Model argument '{key}' of '{source}' is reserved: it is an option of Presso itself"
                + (" (--trust is only taken from the command line)." if key == "trust" else ".")
            )
        for v in _leaves(value):
            if isinstance(v, bool) or v is None or isinstance(v, str):
                continue
            if isinstance(v, int) and abs(v) > MAX_INT_KWARG:
                raise ModelSourceError(f"Model argument {key}={v} of '{source}' is out of range (|value| <= 10^7).")
            if isinstance(v, float) and not math.isfinite(v):
                raise ModelSourceError(f"Model argument {key}={v} of '{source}' is not a finite number.")
    return _jsonable(kwargs)


def _leaves(value: Any, depth: int = 0):
    if depth > 8:
        raise ModelSourceError("Model arguments nest too deeply (over 8 levels).")
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v, depth + 1)
    else:
        yield value


def _call_builder(builder, name: str, kwargs: dict[str, Any]) -> nn.Module:
    # A registered builder given bad values fails in many ways (TypeError for an unknown name, ValueError or
    # AssertionError for a negative count, RuntimeError when an allocation fails, OSError when an argument names a
    # file it cannot read): each is the user's argument.
    try:
        return builder(**kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, MemoryError, OverflowError, OSError) as e:
        raise ModelSourceError(
            f"Could not build '{name}' with {kwargs or 'no arguments'}: {type(e).__name__}: {str(e)[:300]}."
        ) from None


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
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters and "weights_backbone" not in kwargs:
        # detectors and segmenters default to an ImageNet backbone, which torchvision would download: random init
        # here, like every other source (pretrained weights come from the local cache with pretrained=true)
        kwargs = {**kwargs, "weights_backbone": None}
    return _call_builder(lambda **kw: builder(weights=None, **kw), f"torchvision:{name}", kwargs)


# timm.create_model keywords that make timm open (or fetch) files itself, past Presso's checks and unrecorded in the
# card: weights come in through --weights (read weights-only, hashed in the card) or pretrained=true (the cache)
TIMM_FILE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm(name: str, kwargs: dict[str, Any], pretrained: bool, trust: bool) -> tuple[nn.Module, dict | None]:
    import timm

    given = [k for k in TIMM_FILE_KWARGS if k in kwargs]
    if given:
        raise ModelSourceError(
            f"timm:{name}: model argument '{given[0]}' would have timm read files itself, unchecked and unrecorded; "
            "give trained weights with --weights PATH (safetensors or a state dict), or pretrained=true (the cache)."
        )

    if not timm.is_model(name):
        raise ModelSourceError(f"timm has no model '{name}'.{closest(name, timm.list_models())}")
    if not pretrained:
        return _call_builder(lambda **kw: timm.create_model(name, pretrained=False, **kw), f"timm:{name}", kwargs), None
    # timm's own loader (its key filters, and a new classifier when num_classes differs), fed the cached file read
    # here weights-only: timm is never left to find, download or unpickle anything itself
    file = timm_cached_file(name)
    state = read_state_dict(file, trust=trust)
    overlay = {"state_dict": state, "source": ""}
    model = _call_builder(
        lambda **kw: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kw),
        f"timm:{name}",
        kwargs,
    )
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg.pop("state_dict", None)  # not a second copy of the weights kept on the model
    return model, file_record(file, "timm cache")


def _from_file(path: Path, factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import the user's file and call its factory. Callers check trust first: this runs the file."""
    if not factory.isidentifier():
        raise ModelSourceError(f"'{path}:{factory}': the factory must be a function name, e.g. {path}:build.")
    module = import_file(path)
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


def import_file(path: Path, what: str = "model file") -> Any:
    """Import a user's Python file as a module. Callers check trust first: this runs the file."""
    if not path.is_file():
        raise ModelSourceError(f"{what.capitalize()} '{path}' does not exist.")
    regular_file(path, what, error=ModelSourceError)
    # A unique module name per file path keeps two user files with the same name apart.
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
    return module


def _from_pt2(path: Path, trust: bool) -> nn.Module:
    import torch

    if not path.is_file():
        raise ModelSourceError(f"Model file '{path}' does not exist.")
    regular_file(path, "model file", error=ModelSourceError)
    if not trust:
        from presso.models.pt2 import check_pt2

        check_pt2(path)  # raises UntrustedFileError where torch would unpickle
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ModelSourceError(f"'{path}' is not a readable torch.export (.pt2) program: {str(e)[:300]}") from None
    return program.module()


def _from_pickle(path: Path, trust: bool) -> nn.Module:
    import torch

    if not path.is_file():
        raise ModelSourceError(f"Model file '{path}' does not exist.")
    regular_file(path, "model file", error=ModelSourceError)
    if not trust:
        # A weights-only load is safe: it tells a state dict (not a model) from a pickled module without running code.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure of the safe loader: decide from the file's bytes what to tell the user
            if looks_like_pickle(path):
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
    if "ultralytics" not in sys.modules:
        from presso.models.ultralytics import import_ultralytics, needs_ultralytics

        if needs_ultralytics(path):
            import_ultralytics(f"'{path}' (an Ultralytics checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user (--trust)
    except Exception as e:
        raise ModelSourceError(f"'{path}' could not be unpickled: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) or type(obj).__module__.startswith("ultralytics."):
        from presso.models.ultralytics import from_checkpoint, is_ultralytics

        if is_ultralytics(obj):
            return from_checkpoint(obj, str(path))
    if not isinstance(obj, nn.Module):
        raise ModelSourceError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module.")
    return obj


def build_from_card(card: ModelCard, base: Path | None = None, *, trust: bool = False) -> nn.Module:
    """Rebuild the *source* architecture a card names (before any recipe).

    Nothing a card says can switch trust on: ``trust`` is the caller's (the command line's). A ``.py`` source runs
    only the copy saved inside the model directory (``code``, which must stay inside it) or, for a card without a
    copy, the file it names -- both only with trust. A ``python:`` source must name an ``nn.Module`` subclass.
    """
    where = f"'{base}'" if base is not None else "the model card"
    src = card.source.get("source", "")
    if not isinstance(src, str) or not src.strip():
        raise ModelSourceError(f"The card of {where} names no source; re-create the model directory.")
    kwargs = check_kwargs(card.source.get("kwargs", {}), src)
    prefix, sep, rest = src.partition(":")
    if sep and prefix in ZOO:
        kwargs.pop("pretrained", None)  # the architecture only: the weights are the directory's (older cards kept it)
    if sep and prefix.endswith(".py"):
        code = card.source.get("code")
        if code is not None:
            if base is None:
                raise ModelSourceError(f"The card names saved code '{code}' but no model directory holds it.")
            file = _inside(base, code)
        else:
            file = Path(prefix)
        if not trust:
            raise UntrustedFileError(
                f"Opening {where} runs Python code: the function '{rest}' of '{file}'. {TRUST_HINT}"
            )
        if not file.is_file():
            raise ModelSourceError(f"The model's source file '{file}' is missing; restore it or rebuild the model.")
        return _from_file(file, rest, kwargs)
    if src.startswith("python:"):
        return _from_python_name(src, kwargs, where, trust)
    if sep and prefix == "ultralytics":
        from presso.models.ultralytics import build_ultralytics

        recorded = card.source.get("yaml")
        if recorded is not None and not isinstance(recorded, dict):
            raise ModelSourceError(f"The card of {where} records a model YAML that is not a mapping; re-create it.")
        return build_ultralytics(rest, kwargs, trust=trust, cfg=recorded)[0]
    if sep and prefix == "transformers":  # the checked config a card records (a folder's), else the kwargs
        from presso.models.transformers_hub import build_transformers

        return build_transformers(rest, kwargs, config=card.source.get("config"), where=where)[0]
    if base is not None and Path(src).is_dir():
        raise ModelSourceError(
            f"The card of {where} names another model directory ('{src}') as its source; a model directory's source "
            "is a builder (torchvision:, timm:, presso:, file.py:factory) or a model file."
        )
    model = load_model(src, trust=trust, **kwargs)
    object.__delattr__(model, CARD_ATTR)
    return model


def _inside(base: Path, rel: Any) -> Path:
    """``base/rel`` if ``rel`` is a relative path that stays inside ``base`` (symlinks resolved)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ModelSourceError(f"The card of '{base}' names code {rel!r}: it must be a path inside the directory.")
    try:
        root, file = base.resolve(), (base / rel).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise ModelSourceError(f"The card of '{base}' names code {rel!r}, which is not a usable path ({e}).") from None
    if not file.is_relative_to(root):
        raise ModelSourceError(
            f"The card of '{base}' names code '{rel}', outside the model directory; refusing to run it."
        )
    return file


def _from_python_name(src: str, kwargs: dict[str, Any], where: str, trust: bool) -> nn.Module:
    """A ``python:module.Class`` source: importing the module runs its code, so it needs trust; then the name must
    be an ``nn.Module`` subclass (never an arbitrary callable such as ``subprocess.Popen``)."""
    name = src[len("python:") :]
    mod_name, _, qual = name.rpartition(".")
    hint = "save it from a source such as file.py:factory, or pass build=callable to presso.load_model"
    if not mod_name or not all(part.isidentifier() for part in name.split(".")):
        raise ModelSourceError(f"The model was built in Python ({src}) and cannot be rebuilt by name; {hint}.")
    if not trust and mod_name.split(".")[0] not in SAFE_PACKAGES:
        raise UntrustedFileError(
            f"Opening {where} imports the Python module '{mod_name}' to build the class '{qual}'. {TRUST_HINT} "
            f"(Or {hint}.)"
        )
    try:
        obj = getattr(importlib.import_module(mod_name), qual)
    except Exception:
        raise ModelSourceError(
            f"The model was built in Python ({src}) and cannot be rebuilt by name; {hint}."
        ) from None
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ModelSourceError(f"The card of {where} names '{src}', which is not a torch.nn.Module class; refused.")
    return _call_builder(obj, src, kwargs)
