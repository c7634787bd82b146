"""Weights for a model built from code: a file the user names (``--weights``), or a file already in the local
torchvision / timm cache (``--model-arg weights=DEFAULT``, ``--model-arg pretrained=true``). Nothing is downloaded.

The trust model (docs/security.md) holds: safetensors and weights-only state dicts are data; a full pickle is read
only with ``trust=True``. ``new_head``: weights whose classifier does not fit the model (another class count) load
without it; the classifier is found generically (``find_classifier``), and ``replace_head`` swaps it for a new one
and records that as a recipe step, so a saved model directory rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from presso.errors import ModelSourceError, UntrustedFileError, closest
from presso.models.card import ensure_card
from presso.models.recipe import register_replay, resolve
from presso.safeio import regular_file

NEVER_DOWNLOADS = "Presso never downloads"
ZOO = ("presso", "torchvision", "timm")  # registered builders: random init unless weights are given
_CHANNEL_ARG = {"presso": "in_chans", "timm": "in_chans"}  # builders that take the input channel count
# a torchvision weights enum name (DEFAULT, IMAGENET1K_V1, ResNet18_Weights.IMAGENET1K_V1), not a file path
_WEIGHTS_ENUM = re.compile(r"^([A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*$")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "module")
# torchvision's DenseNet checkpoints name 'norm.1' what the model calls 'norm1' (torchvision remaps them the same way)
_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


# --------------------------------------------------------------------------- reading
def looks_like_pickle(path: Path) -> bool:
    """A torch zip archive or a raw pickle stream (what only a full unpickle may read when weights-only fails)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20


def read_state_dict(path: str | Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a state dict read weights-only (``torch.load(weights_only=
    True)``); a checkpoint that wraps one (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped, a DDP
    ``module.`` prefix dropped. A full pickle (a whole pickled model) is read only with ``trust``."""
    p = Path(path)
    regular_file(p, "weights file", error=ModelSourceError)
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as e:  # a corrupt or foreign file: the safetensors reader says why
            raise ModelSourceError(f"'{p}' is not a readable safetensors file: {str(e)[:200]}.") from None
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure of the safe loader: decide from the file's bytes what to tell the user
        if not looks_like_pickle(p):
            raise ModelSourceError(
                f"'{p}' is not a weights file Presso can read ({type(e).__name__}); give safetensors or a state dict "
                "saved with torch.save(model.state_dict(), PATH)."
            ) from None
        if not trust:
            raise UntrustedFileError(
                f"'{p}' is a full pickle: loading it runs code from the file. If you trust its origin, pass "
                "--trust (trust=True); otherwise save the weights as safetensors or a plain state dict."
            ) from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)  # trusted by the user (--trust)
        except Exception as e2:
            raise ModelSourceError(f"'{p}' could not be unpickled: {type(e2).__name__}: {e2}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(3):  # checkpoints nest the state dict under a key or two
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise ModelSourceError(f"'{p}' holds a {type(obj).__name__}, not weights (a state dict of tensors).")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise ModelSourceError(f"'{p}' holds no tensors: it is not a weights file.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def file_record(path: str | Path, origin: str) -> dict[str, Any]:
    """What a card records of a weights file: where it came from, its absolute path and its SHA-256."""
    p = Path(path)
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"from": origin, "path": str(p.resolve()), "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- loading into a model
def find_classifier(model: nn.Module, classes: int | None = None) -> tuple[str, nn.Module]:
    """The model's classifier: the Linear (or 1x1 convolution) producing ``classes`` outputs (by default, as many
    as the last such layer). Found by kind and output count, not by model family; more than one candidate (a
    second head, a squeeze layer of the same width) is refused rather than guessed."""
    cands = [(n, m) for n, m in model.named_modules() if _outputs(m) is not None]
    if not cands:
        raise ModelSourceError("The model has no Linear or 1x1 convolution that could be its classifier.")
    target = classes if classes is not None else _outputs(cands[-1][1])
    matches = [(n, m) for n, m in cands if _outputs(m) == target]
    if len(matches) > 1 and sum(isinstance(m, nn.Linear) for _, m in matches) == 1:
        matches = [(n, m) for n, m in matches if isinstance(m, nn.Linear)]
    if len(matches) != 1:
        names = ", ".join(n for n, _ in matches[:4]) or "none"
        raise ModelSourceError(
            f"Cannot tell which layer is the classifier ({len(matches)} layers output {target}: {names}); "
            "replace the head in Python instead of --new-head."
        )
    return matches[0]


def _outputs(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
        return m.out_channels
    return None


def _fix_keys(state: dict[str, torch.Tensor], own: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        m = _DENSENET.match(k)
        out[m.group(1) + m.group(2) if m and k not in own and m.group(1) + m.group(2) in own else k] = v
    return out


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], *, where: str, new_head: bool = False) -> None:
    """Load ``state`` into ``model``, every tensor accounted for. When only the classifier differs, ``new_head``
    loads the rest and keeps the model's own (new) classifier; otherwise one line lists what does not fit."""
    own = model.state_dict()
    state = _fix_keys(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    bad = set(missing) | set(unexpected) | set(wrong)
    if bad:
        head = _head_only(model, bad)
        if head is None:
            parts = [f"{label} {', '.join(keys[:4])}" + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                     for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                     if keys]  # fmt: skip
            raise ModelSourceError(
                f"The weights {where} do not fit the model: {'; '.join(parts)}. Were they saved from this "
                "architecture, built with the same --model-arg values?"
            )
        name, module = head
        if not new_head:
            shape = next((tuple(state[k].shape) for k in (f"{name}.weight",) if k in state), None)
            theirs = f"{shape[0]} outputs in the file" if shape else "another classifier in the file"
            raise ModelSourceError(
                f"The weights {where} fit the model except its classifier '{name}' ({theirs}, {_outputs(module)} in "
                "the model): pass --new-head (new_head=True) to load the rest and start a new classifier, or build "
                "the model with the file's --model-arg num_classes."
            )
        state = {k: v for k, v in state.items() if k not in bad}
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=not bad)
    except RuntimeError as e:
        raise ModelSourceError(f"The weights {where} do not fit the model: {str(e)[:300]}") from None


def _head_only(model: nn.Module, bad: set[str]) -> tuple[str, nn.Module] | None:
    """The classifier, when every key that does not fit belongs to it; else None."""
    try:
        name, module = find_classifier(model)
    except ModelSourceError:
        return None
    return (name, module) if bad <= {f"{name}.weight", f"{name}.bias"} else None


def replace_head(model: nn.Module, classes: int, *, current: int | None = None) -> str:
    """Swap the classifier for a new one with ``classes`` outputs (same kind, inputs and bias, fresh init) and
    record it in the card's recipe when the class count changes, so the saved model rebuilds it. Returns its name."""
    name, module = find_classifier(model, current)
    step = {"type": "new_head", "layer": name, "classes": int(classes)}
    changed = _outputs(module) != classes
    _swap(model, name, module, int(classes))
    if changed:
        ensure_card(model).recipe.append(step)
    return name


def _swap(model: nn.Module, name: str, module: nn.Module, classes: int) -> None:
    parent, attr, _ = resolve(model, name)
    w = module.weight
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        new: nn.Module = nn.Linear(module.in_features, classes, bias=bias)
    else:
        new = nn.Conv2d(module.in_channels, classes, 1, stride=module.stride, bias=bias)  # type: ignore[attr-defined]
    new.to(device=w.device, dtype=w.dtype)
    new.train(module.training)
    setattr(parent, attr, new)


@register_replay("new_head")
def replay_new_head(model: nn.Module, step: dict[str, Any]) -> None:
    name, classes = step.get("layer"), step.get("classes")
    if not isinstance(name, str) or not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes:
        raise ModelSourceError(f"A new_head recipe step needs a layer name and a class count, not {step!r:.80}.")
    _, _, module = resolve(model, name)
    if _outputs(module) is None:
        raise ModelSourceError(f"The recipe's new head '{name}' is a {type(module).__name__}, not a classifier.")
    _swap(model, name, module, min(classes, 10**7))


# --------------------------------------------------------------------------- a source's weights
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag(value: Any, text: str) -> bool:
    """``pretrained=`` as given on the command line (true/false, 1/0, yes/no) or in Python."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ModelSourceError(f"'{text}': pretrained must be true or false, not {value!r}.")


def load_weights(model: nn.Module, text: str, weights: str | Path, *, trust: bool, new_head: bool) -> dict[str, Any]:
    """Load ``weights`` (a file, or for torchvision a weights enum name found in the local cache) into the model;
    the card's record of them: where from, path, SHA-256."""
    prefix, _, rest = text.partition(":")
    file = Path(str(weights)).expanduser()
    origin = "file"
    if prefix == "torchvision" and not file.exists() and _WEIGHTS_ENUM.match(str(weights)):
        enum, file = torchvision_weights(rest, str(weights))
        origin = f"torchvision cache ({enum})"
    elif not file.exists():
        raise ModelSourceError(f"Weights file '{weights}' does not exist.")
    state = read_state_dict(file, trust=trust)
    record = file_record(file, origin)
    if origin != "file" and (broken := check_hub_hash(file, record["sha256"])):
        warnings.warn(broken, stacklevel=3)
    apply_weights(model, state, where=f"in '{file}'", new_head=new_head)
    return record


def fit_to_data(
    source: str, kwargs: dict[str, Any], *, classes: int | None, channels: int | None, weights: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A zoo model built from random init (``presso:``, ``torchvision:``, ``timm:``, ``ultralytics:``,
    ``transformers:``; no weights) gets the data's class count, and its channel count where the builder takes one,
    unless the user gave them.
    Returns the builder kwargs and what was added (for the one line saying so)."""
    prefix, sep, rest = str(source).partition(":")
    if sep and prefix == "transformers":
        # the data's class count, unless the user gave one or a folder carries trained weights (its head fixes it)
        if not classes or weights is not None or {"num_classes", "num_labels"} & set(kwargs):
            return kwargs, {}
        if (Path(rest) / "model.safetensors").exists():
            return kwargs, {}
        return {**kwargs, "num_classes": int(classes)}, {"num_classes": int(classes)}
    if (
        not sep
        or prefix not in (*ZOO, "ultralytics")
        or weights is not None
        or flag(kwargs.get("pretrained", False), source)
    ):
        return kwargs, {}
    added: dict[str, Any] = {}
    if classes and "num_classes" not in kwargs:
        added["num_classes"] = int(classes) + (1 if _counts_background(source) else 0)
    arg = _CHANNEL_ARG.get(prefix)
    if arg and channels and channels != 3 and arg not in kwargs:
        added[arg] = int(channels)
    return {**kwargs, **added}, added


def _counts_background(source: str) -> bool:
    """torchvision's detectors count the background as a class: the data's 3 classes are their num_classes=4."""
    prefix, _, name = str(source).partition(":")
    if prefix != "torchvision":
        return False
    import torchvision

    try:
        return torchvision.models.get_model_builder(name).__module__.startswith("torchvision.models.detection")
    except ValueError:
        return False


# --------------------------------------------------------------------------- the local caches
def torch_hub_checkpoints() -> Path:
    """torch.hub's cache of downloaded weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def torchvision_weights(name: str, value: str) -> tuple[Any, Path]:
    """The torchvision weights enum named by ``value`` (``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet18_Weights.X``)
    for model ``name``, and the file torch.hub would keep it in. The file must exist: nothing is downloaded."""
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ModelSourceError(
            f"torchvision:{name} has no pretrained weights; give a weights file with --weights PATH."
        ) from None
    key = str(value).rpartition(".")[2]
    members = list(enum_cls.__members__)
    if key not in members:
        raise ModelSourceError(
            f"torchvision:{name} has no weights '{value}' (it has {', '.join(members)}).{closest(key, members)}"
        )
    weights = enum_cls[key]
    file = torch_hub_checkpoints() / os.path.basename(urlparse(weights.url).path)
    if not file.is_file():
        raise ModelSourceError(
            f"torchvision:{name} weights {weights} are not in the local cache: looked for {file}; copy that file "
            f"there (it is {weights.url}) or give a weights file with --weights PATH ({NEVER_DOWNLOADS})."
        )
    return weights, file


def check_hub_hash(file: Path, sha256: str) -> str | None:
    """torch.hub's integrity rule (the file name carries the start of its SHA-256): a warning when broken."""
    m = re.search(r"-([a-f0-9]+)\.", file.name)
    if m and not sha256.startswith(m.group(1)):
        return (
            f"'{file}' does not match the hash in its name ({m.group(1)}): it is not the published file (an "
            "interrupted download, or replaced); it was read weights-only."
        )
    return None


def timm_cached_file(name: str) -> Path:
    """A timm model's pretrained weights already on this machine: the Hugging Face cache (``model.safetensors``,
    ``pytorch_model.bin``) or torch.hub's (the file name of the weights' URL). Nothing is downloaded."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    hf_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    if cfg is None or not (hf_id or url or getattr(cfg, "file", None)):
        raise ModelSourceError(f"timm:{name} has no pretrained weights; give a weights file with --weights PATH.")
    looked: list[str] = []
    if getattr(cfg, "file", None) and Path(cfg.file).is_file():
        return Path(cfg.file)
    if hf_id:
        repo = hf_hub_cache() / f"models--{hf_id.split('@')[0].replace('/', '--')}"
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else [
            "model.safetensors", "pytorch_model.bin"]  # fmt: skip
        ref = repo / "refs" / "main"
        revisions = [ref.read_text().strip()] if ref.is_file() else []
        snapshots = repo / "snapshots"
        revisions += sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
        for rev in revisions:
            for n in names:
                if (snapshots / rev / n).is_file():
                    return snapshots / rev / n
        looked.append(str(snapshots / "*" / names[0]))
    if url:
        file = torch_hub_checkpoints() / os.path.basename(urlparse(url).path)
        if file.is_file():
            return file
        looked.append(str(file))
    raise ModelSourceError(
        f"timm:{name} pretrained weights are not in the local cache: looked for {' and '.join(looked)}; copy them "
        f"there from a machine that has them, or give a weights file with --weights PATH ({NEVER_DOWNLOADS})."
    )
