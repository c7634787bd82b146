"""Hugging Face ``transformers`` DETR-style detectors as Presso model sources (the optional extra ``presso[hf]``).

- ``transformers:DetrForObjectDetection`` (or another class of :data:`DETECTORS`) -- built from its config, random
  init, offline. Model arguments are config keys (``d_model``, ``encoder_layers``, ``decoder_layers``,
  ``num_queries``, ``backbone`` (a timm name), ``backbone_config`` (a dict, e.g. HF's own small ResNet), ...);
  ``num_classes`` is ``num_labels``. Backbones are always built from their config: transformers 5 never loads
  pretrained backbone weights from a config, and ``use_pretrained_backbone=true`` is refused.
- ``transformers:path/to/dir`` -- a local folder holding ``config.json`` (and optionally ``model.safetensors``):
  read as data (size- and depth-bounded JSON), ``local_files_only=True``, safetensors only, never
  ``trust_remote_code``; a config naming custom code (``auto_map``, ``trust_remote_code``, ...) is refused.

The model is wrapped in :class:`HFDetection`: ``model(x)`` gives ``(logits [N, Q, C(+1)], boxes [N, Q, 4])`` --
normalised (cx, cy, w, h) boxes, DETR's logits with its "no object" class last, the sigmoid family's (Conditional /
Deformable / DAB-DETR, RT-DETR) without it -- tensors ONNX can export, in every mode; ``model(x, labels)`` adds the
model's own loss. HF's frozen BatchNorm layers become :class:`FrozenBatchNorm2d` (an ``nn.BatchNorm2d`` that always
normalises by its running statistics), so Torch-Pruning prunes the CNN backbone like any other. The card records the
source and the kwargs, and for a folder the checked config (``source["config"]``): a model directory rebuilds without
the folder and without downloads.

transformers is imported only inside these functions, never when Presso is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from presso.errors import ModelSourceError, closest

INSTALL_HINT = 'pip install "presso[hf]"'
# class name -> how its logits become probabilities: softmax over C+1 ("no object" last) or per-class sigmoid
DETECTORS = {
    "DetrForObjectDetection": "softmax",
    "ConditionalDetrForObjectDetection": "sigmoid",
    "DeformableDetrForObjectDetection": "sigmoid",
    "DabDetrForObjectDetection": "sigmoid",
    "RTDetrForObjectDetection": "sigmoid",
    "RTDetrV2ForObjectDetection": "sigmoid",
}
# config keys that make transformers import code from the Hub or the folder: refused, never honoured
REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code", "custom_pipelines", "code_revision"})
# keyword arguments the configs take besides their fields (consumed by their __post_init__)
_POST_INIT_KEYS = frozenset(
    {"backbone", "use_timm_backbone", "backbone_kwargs", "num_labels", "use_pretrained_backbone"}
)
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def import_transformers(source: str = "transformers:...") -> Any:
    """``transformers``, offline and quiet; one ``ModelSourceError`` line naming the extra when it is missing."""
    if "transformers" not in sys.modules:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach the Hub, whatever a config names
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(f"{source} needs the optional extra: {INSTALL_HINT}") from None
    return transformers


# --------------------------------------------------------------------------- the wrapper
class FrozenBatchNorm2d(nn.BatchNorm2d):
    """HF's frozen BatchNorm (fixed statistics and affine terms) as an ``nn.BatchNorm2d``: it normalises by its
    running statistics in train mode too and its affine terms do not train, as in HF; being a BatchNorm, pruning
    tools remove its channels with the convolution before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _unfreeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child).__name__.endswith("FrozenBatchNorm2d") and hasattr(child, "running_var"):
            n = child.weight.numel()
            bn = FrozenBatchNorm2d(n, eps=1e-5)
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
            module._modules[name] = bn
        else:
            _unfreeze_batchnorm(child)


class HFDetection(nn.Module):
    """An HF ``*ForObjectDetection`` model as plain tensors.

    - eval mode, ``forward(x)`` -> the dense detections every Presso detector gives in eval mode (what ONNX export,
      the bundle's NumPy decoding and ``Detect.distance`` read): ``[N, 4 + C, Q]``, per query its box (centre x,
      centre y, width, height in input pixels) and its class probabilities (DETR's softmax without the "no object"
      class; the sigmoid family's per-class probabilities);
    - train mode, or inside :meth:`raw_outputs`: ``(logits [N, Q, K], boxes [N, Q, 4])``, boxes normalised, as HF
      returns them (what its loss and query-by-query distillation need);
    - ``forward(x, labels)`` -> ``(logits, boxes, loss)`` with HF's labels (``class_labels``, normalised cxcywh
      ``boxes``) and its own loss (Hungarian matching).
    """

    def __init__(self, hf: nn.Module, kind: str) -> None:
        super().__init__()
        self.hf = hf
        self.kind = kind  # "softmax" (a "no object" class last) or "sigmoid"
        self.raw = False
        # HF freezes a ResNet backbone's stem and first stage, a fine-tuning convention for pretrained backbones:
        # Presso trains what it builds (a random stem must learn) and traces every layer for pruning
        for p in hf.parameters():
            p.requires_grad_(True)
        _unfreeze_batchnorm(hf)

    @property
    def num_classes(self) -> int:
        return int(self.hf.config.num_labels)

    @contextlib.contextmanager
    def raw_outputs(self):
        """HF's own ``(logits, boxes)`` in eval mode too, for the block."""
        before, self.raw = self.raw, True
        try:
            yield self
        finally:
            self.raw = before

    def forward(self, pixel_values: torch.Tensor, labels: list[dict] | None = None):
        out = self.hf(pixel_values=pixel_values, labels=labels, return_dict=True)
        if labels is not None:
            return out.logits, out.pred_boxes, out.loss
        if self.training or self.raw:
            return out.logits, out.pred_boxes
        logits = out.logits.float()
        probs = logits.softmax(-1)[..., :-1] if self.kind == "softmax" else logits.sigmoid()
        h, w = pixel_values.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=probs.dtype, device=probs.device)
        return torch.cat([out.pred_boxes.float() * scale, probs], -1).transpose(1, 2)


# --------------------------------------------------------------------------- building
def build_transformers(
    name: str, kwargs: dict[str, Any], *, config: Any = None, where: str = "the model card"
) -> tuple[HFDetection, dict[str, Any], Any]:
    """``transformers:NAME`` -> (model, card extras, weights record). ``config``: a checked config recorded on a card
    (a model directory rebuilds from it, random init: the directory holds the weights)."""
    source = f"transformers:{name}"
    if config is not None:
        if not isinstance(config, dict):
            raise ModelSourceError(f"The card of {where} records a transformers config that is not a mapping.")
        _refuse_remote_code(config, f"The card of {where}")
        cls_name = _class_of(config, source)
        return _from_config(cls_name, {**config, **_config_kwargs(kwargs)}, source), {}, "random init"
    path = Path(name)
    if name in DETECTORS or (not path.exists() and "/" not in name and not name.endswith(".json")):
        if name not in DETECTORS:
            raise ModelSourceError(
                f"Presso does not build the transformers class '{name}'.{closest(name, DETECTORS)} Supported: "
                f"{', '.join(DETECTORS)}, or a local folder with config.json."
            )
        return _from_config(name, _config_kwargs(kwargs), source), {}, "random init"
    return _from_folder(path, kwargs, source)


def _config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    if "num_classes" in kw:
        if "num_labels" in kw and kw["num_labels"] != kw["num_classes"]:
            raise ModelSourceError("Give num_classes or num_labels, not both (they are the same setting).")
        kw["num_labels"] = kw.pop("num_classes")
    return kw


def _refuse_remote_code(data: Any, where: str, depth: int = 0) -> None:
    if depth > 16:
        return
    if isinstance(data, dict):
        for key, value in data.items():
            if key in REMOTE_CODE_KEYS:
                raise ModelSourceError(
                    f"{where} names custom code ('{key}'): Presso never runs a model's remote or bundled code "
                    "(trust_remote_code); use a built-in transformers architecture."
                )
            _refuse_remote_code(value, where, depth + 1)
    elif isinstance(data, list):
        for value in data:
            _refuse_remote_code(value, where, depth + 1)


def _class_of(config: dict, where: str) -> str:
    archs = config.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if arch in DETECTORS:
            return arch
    model_type = str(config.get("model_type", ""))
    for cls_name in DETECTORS:
        if cls_name.lower() == f"{model_type.replace('_', '')}forobjectdetection":
            return cls_name
    raise ModelSourceError(
        f"{where}: the config is not one of the detectors Presso builds (architectures {archs}, model_type "
        f"'{model_type}'); supported: {', '.join(DETECTORS)}."
    )


def _from_config(cls_name: str, kw: dict[str, Any], source: str) -> HFDetection:
    transformers = import_transformers(source)
    _refuse_remote_code(kw, f"The model arguments of '{source}'")
    if kw.get("use_pretrained_backbone"):
        raise ModelSourceError(
            f"'{source}': use_pretrained_backbone=true would download weights; Presso builds the backbone from its "
            "config (random init). Give a local folder with model.safetensors for trained weights."
        )
    kw.pop("use_pretrained_backbone", None)
    cls = getattr(transformers, cls_name)
    config_cls = cls.config_class
    known = _config_keys(config_cls)
    for key in kw:
        if key not in known:
            raise ModelSourceError(
                f"'{source}' has no config key '{key}'.{closest(key, known)} See {config_cls.__name__} in the "
                "transformers documentation."
            )
    for key in ("model_type", "transformers_version", "_name_or_path"):
        kw.pop(key, None)
    labels = kw.get("id2label")
    if "num_labels" in kw and isinstance(labels, dict) and len(labels) != kw["num_labels"]:
        kw.pop("id2label")  # a new class count: the folder's class names no longer apply
        kw.pop("label2id", None)
    try:
        config = config_cls(**kw)
        config.use_pretrained_backbone = False
        model = cls(config)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, AttributeError) as e:
        raise ModelSourceError(f"Could not build '{source}' with {kw or 'no arguments'}: "
                               f"{type(e).__name__}: {str(e)[:300]}") from None  # fmt: skip
    return HFDetection(model, DETECTORS[cls_name]).eval()


def _config_keys(config_cls: type) -> set[str]:
    import dataclasses

    keys = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    keys |= set(getattr(config_cls, "attribute_map", {}) or {})
    return keys | _POST_INIT_KEYS | {"model_type", "transformers_version", "_name_or_path"}


def _from_folder(path: Path, kwargs: dict[str, Any], source: str) -> tuple[HFDetection, dict[str, Any], Any]:
    from presso.safeio import read_json, regular_file

    if not path.is_dir():
        raise ModelSourceError(
            f"'{source}' is neither a transformers detector class ({', '.join(DETECTORS)}) nor a folder holding "
            f"{CONFIG_FILE}."
        )
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ModelSourceError(f"'{path}' holds no {CONFIG_FILE}; give the folder an HF model was saved to.")
    data = read_json(file, "transformers config", error=ModelSourceError)
    if not isinstance(data, dict):
        raise ModelSourceError(f"The transformers config '{file}' must be a JSON object.")
    _refuse_remote_code(data, f"The transformers config '{file}'")
    cls_name = _class_of(data, f"'{file}'")
    config = {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")}
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelSourceError(
                f"'{path}' holds pickled weights (.bin/.pt) but no {WEIGHTS_FILE}; Presso reads safetensors only "
                "(save the model with save_pretrained(..., safe_serialization=True))."
            )
        return _from_config(cls_name, {**config, **_config_kwargs(kwargs)}, source), {"config": config}, "random init"
    regular_file(weights, "weights file", error=ModelSourceError)
    model = _from_config(cls_name, {**config, **_config_kwargs(kwargs)}, source)
    transformers = import_transformers(source)
    cls = getattr(transformers, cls_name)
    try:
        hf = cls.from_pretrained(
            str(path), config=model.hf.config, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as e:  # HF raises many kinds for a file that does not fit; each is the user's folder
        raise ModelSourceError(f"Could not load '{weights}': {type(e).__name__}: {str(e)[:300]}") from None
    from presso.models.weights import file_record

    return HFDetection(hf, DETECTORS[cls_name]).eval(), {"config": config}, file_record(weights, "file")
