"""Ultralytics YOLO models as Presso model sources: ``ultralytics:NAME`` (the optional extra ``presso[yolo]``).

- ``ultralytics:yolov8n.yaml`` (or ``ultralytics:yolov8n``) -- any model YAML Ultralytics ships, random init; the
  scale letter in the name picks the scale (``yolov8n`` -> ``yolov8.yaml`` at scale ``n``), as Ultralytics does.
- ``ultralytics:path/to/custom.yaml`` -- a user's architecture YAML. It is data only if every row names one of
  Ultralytics' building blocks (a class of ``ultralytics.nn.modules`` or an ``nn.X`` torch module) and holds plain
  values: Ultralytics resolves the module names with ``globals()[name]`` in ``ultralytics.nn.tasks``, where names
  such as ``torch_safe_load`` would unpickle files, and ``eval()``s the ``activation``. Anything else needs trust.
- kwargs: ``num_classes`` (or Ultralytics' ``nc``) and ``ch`` (input channels).

The model class is Ultralytics' own, chosen from the YAML's head as ``guess_model_task`` does. In eval mode the model
returns one tensor, the dense predictions before NMS: ``[N, 4 + nc, A]`` for detection (xywh boxes in input pixels,
class probabilities; YOLOv10/YOLO26's one-to-many head, the one used with NMS); ``(predictions, prototypes)`` for
segmentation; ``[N, 4 + nc + extra, A]`` for pose (keypoints) and OBB (angle); class probabilities for
classification. Train mode keeps Ultralytics' own outputs (its losses need them). The card records the source and
kwargs; for a custom YAML it also records the checked YAML mapping (``source["yaml"]``), so a model directory
rebuilds without the file. A trusted Ultralytics checkpoint (``.pt``) gives its EMA model (:func:`from_checkpoint`).
docs/ultralytics.md lists what prunes, reloads and exports and what does not, and why (as data:
``models/ultralytics_support.py``).

Ultralytics is AGPL-3.0: it is imported only inside these functions, never when Presso is imported.
"""

from __future__ import annotations

import ast
import copy
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from presso.errors import ModelSourceError, UntrustedFileError, closest
from presso.models.ultralytics_support import OPEN_VOCABULARY, SUPPORTED, UNSUPPORTED  # noqa: F401 (the lists)
from presso.progress import quiet_logger

INSTALL_HINT = 'pip install "presso[yolo]"'
YAML_KEYS = frozenset({"nc", "scales", "scale", "backbone", "head", "activation", "end2end", "reg_max", "kpt_shape",
                       "depth_multiple", "width_multiple", "channels", "inplace", "text_model",
                       "yaml_file"})  # fmt: skip
MAX_YAML_BYTES = 1 << 20
MAX_ROWS, MAX_REPEATS, MAX_ARG = 512, 64, 100_000
TRUST_HINT = "Pass --trust (trust=True in Python) only if you trust where it came from."


# --------------------------------------------------------------------------- importing Ultralytics
def _config_dir() -> Path:
    # models/ stands below bench/ (bench.env.presso_home): the same rule, read here
    home = Path(os.environ.get("PRESSO_HOME") or Path.home() / ".presso").expanduser()
    return home / "ultralytics"


def import_ultralytics(source: str = "ultralytics:..."):
    """``ultralytics.nn.tasks``, imported offline, quiet, with its settings file under Presso's home; one
    ``ModelSourceError`` line naming the extra when the package is missing."""
    if "ultralytics" not in sys.modules:
        # Importing Ultralytics writes a settings file and checks the network: keep both out of the user's way
        os.environ.setdefault("YOLO_CONFIG_DIR", str(_config_dir()))
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ.setdefault("YOLO_VERBOSE", "False")
    from PIL import Image

    pil_open = Image.open
    try:
        import ultralytics.nn.tasks as tasks
    except ImportError:
        raise ModelSourceError(f"{source} needs the optional extra: {INSTALL_HINT}") from None
    finally:
        # Importing Ultralytics replaces PIL.Image.open process-wide by one that, on a file Pillow cannot identify,
        # tries to install pi-heif: Presso's readers would fail on a corrupt image instead of counting it.
        Image.open = pil_open
    return tasks


# --------------------------------------------------------------------------- finding and reading a YAML
def shipped_yamls() -> dict[str, Path]:
    """File name -> path of every model YAML the installed Ultralytics ships."""
    tasks = import_ultralytics()
    root = Path(tasks.__file__).resolve().parents[1] / "cfg" / "models"
    return {p.name: p for p in sorted(root.rglob("*.yaml"))}


def _scale_of(name: str) -> str:
    """The scale letter a model name implies (``yolov8n`` -> ``n``), as Ultralytics' ``guess_model_scale``."""
    m = re.search(r"yolo(e-)?[v]?\d+([nslmx])", Path(name).stem)
    return m.group(2) if m else ""


def _find_shipped(name: str) -> Path:
    index = shipped_yamls()
    file = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    stem, suffix = file.rsplit(".", 1)
    if re.fullmatch(r"yolov[58][nsmlx]6", stem):  # Ultralytics' old P6 names: yolov8n6 -> yolov8n-p6
        stem = re.sub(r"(\d+)([nslmx])6$", r"\1\2-p6", stem)
    for candidate in (f"{stem}.{suffix}", re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", stem) + f".{suffix}"):
        if candidate in index:
            return index[candidate]
    raise ModelSourceError(
        f"Ultralytics has no model YAML '{name}'.{closest(file, index)} Give a shipped name (e.g. "
        "ultralytics:yolov8n.yaml) or a path to your own YAML."
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """A model YAML read as data: a regular file, at most 1 MiB, ``yaml.safe_load``."""
    import yaml

    from presso.safeio import read_bytes

    data = read_bytes(path, "model YAML", max_bytes=MAX_YAML_BYTES, error=ModelSourceError)
    try:
        cfg = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelSourceError(f"The model YAML '{path}' is not UTF-8 text.") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ModelSourceError(f"The model YAML '{path}' is not valid YAML: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(cfg, dict):
        raise ModelSourceError(f"The model YAML '{path}' must be a mapping with 'backbone' and 'head' rows.")
    return cfg


# --------------------------------------------------------------------------- the data-only check
def _literal(value: Any, depth: int = 0) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return not isinstance(value, str) or len(value) <= 200
    if isinstance(value, int):
        return abs(value) <= MAX_ARG
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= MAX_ARG
    if isinstance(value, list) and depth < 2:
        return len(value) <= 64 and all(_literal(v, depth + 1) for v in value)
    return False


def _building_block(tasks, name: str) -> bool:
    """Whether a row's module name resolves, in ``parse_model``, to one of Ultralytics' nn.Module blocks."""
    import torch

    if name.startswith("nn."):
        obj = getattr(torch.nn, name[3:], None)
        return isinstance(obj, type) and issubclass(obj, nn.Module)
    import ultralytics.nn.modules as blocks

    obj = getattr(blocks, name, None) if name in getattr(blocks, "__all__", ()) else None
    return (
        isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and obj.__module__.startswith("ultralytics.nn.modules")
        and vars(tasks).get(name) is obj
    )


def _safe_activation(text: Any) -> bool:
    """``nn.SiLU()``, ``torch.nn.LeakyReLU(0.1)``: a torch.nn module class called with plain constants."""
    import torch

    try:
        call = ast.parse(str(text), mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return False
    if not isinstance(call, ast.Call) or not all(
        isinstance(a, ast.Constant) for a in [*call.args, *(k.value for k in call.keywords)]
    ):
        return False
    parts, f = [], call.func
    while isinstance(f, ast.Attribute):
        parts.insert(0, f.attr)
        f = f.value
    if not isinstance(f, ast.Name):
        return False
    parts.insert(0, f.id)
    if parts[:-1] not in (["nn"], ["torch", "nn"]):
        return False
    obj = getattr(torch.nn, parts[-1], None)
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def check_yaml(cfg: dict[str, Any], where: str, *, trust: bool = False) -> dict[str, Any]:
    """A checked, normalized copy of a model YAML mapping.

    Malformed content (unknown keys, rows that are not ``[from, repeats, module, args]`` of plain values) is a
    ``ModelSourceError`` naming the key or row. A row whose module is not an Ultralytics building block, or an
    ``activation`` that is not a plain ``nn.X(...)`` call, would run code: ``UntrustedFileError`` naming it, unless
    ``trust``. A ``TorchVision`` row gets weights ``None``: Presso downloads nothing, and this source is random init.
    """
    tasks = import_ultralytics()
    unknown = sorted(str(k) for k in cfg if k not in YAML_KEYS)
    if unknown:
        raise ModelSourceError(
            f"{where}: unknown key '{unknown[0]}'; an Ultralytics model YAML has {', '.join(sorted(YAML_KEYS))}."
        )
    out = copy.deepcopy(cfg)
    for key, kind in (("nc", int), ("reg_max", int), ("channels", int), ("end2end", bool), ("inplace", bool),
                      ("depth_multiple", (int, float)), ("width_multiple", (int, float)), ("scale", str),
                      ("text_model", str), ("yaml_file", str)):  # fmt: skip
        value = out.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ModelSourceError(
                f"{where}: '{key}' must be {getattr(kind, '__name__', 'a number')}, not {value!r:.60}."
            )
    if "kpt_shape" in out and not (isinstance(out["kpt_shape"], list) and _literal(out["kpt_shape"], 1)):
        raise ModelSourceError(f"{where}: 'kpt_shape' must be a list of numbers, e.g. [17, 3].")
    scales = out.get("scales")
    if scales is not None and not (
        isinstance(scales, dict)
        and all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 3 and _literal(v, 1) for k, v in scales.items()
        )
    ):
        raise ModelSourceError(f"{where}: 'scales' must map a letter to [depth, width, max_channels].")
    if "activation" in out and not _safe_activation(out["activation"]) and not trust:
        raise UntrustedFileError(
            f"{where}: activation {out['activation']!r:.80} is not a plain nn.X(...) call, and Ultralytics runs it "
            f"with eval(). {TRUST_HINT}"
        )
    rows = []
    for part in ("backbone", "head"):
        if not isinstance(out.get(part), list) or not out[part]:
            raise ModelSourceError(f"{where}: '{part}' must be a non-empty list of [from, repeats, module, args] rows.")
        rows += [(part, i, row) for i, row in enumerate(out[part])]
    if len(rows) > MAX_ROWS:
        raise ModelSourceError(f"{where}: {len(rows)} rows, over the limit of {MAX_ROWS}.")
    for part, i, row in rows:
        here = f"{where}, {part} row {i} ({str(row)[:80]})"
        if not isinstance(row, list) or len(row) != 4:
            raise ModelSourceError(f"{here}: a row must be [from, repeats, module, args].")
        frm, repeats, module, args = row
        froms = frm if isinstance(frm, list) else [frm]
        if not froms or not all(isinstance(f, int) and not isinstance(f, bool) and abs(f) <= MAX_ROWS for f in froms):
            raise ModelSourceError(f"{here}: 'from' must be a layer index or a list of them.")
        if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= MAX_REPEATS:
            raise ModelSourceError(f"{here}: 'repeats' must be an integer from 1 to {MAX_REPEATS}.")
        if not isinstance(module, str) or not module:
            raise ModelSourceError(f"{here}: 'module' must be a module name such as Conv or nn.Upsample.")
        if not isinstance(args, list) or not all(_literal(a, 1) for a in args):
            raise ModelSourceError(f"{here}: 'args' must be a list of plain values (numbers, strings, lists of them).")
        if module == "Silence" and part == "backbone" and i == 0:
            continue  # Ultralytics replaces YOLOv9's old first layer by nn.Identity itself
        if not _building_block(tasks, module) and not trust:
            raise UntrustedFileError(
                f"{here}: '{module}' is not an Ultralytics building block (a class of ultralytics.nn.modules or "
                f"nn.X); Ultralytics would call whatever that name is in its own module. {TRUST_HINT}"
            )
        if module == "TorchVision" and len(args) >= 2:
            row[3] = [args[0], args[1], None, *args[3:]]  # never the pretrained download Ultralytics defaults to
    return out


# --------------------------------------------------------------------------- building
ACCEPTED = ("num_classes", "nc", "ch", "scale", "reg_max")


def _model_class(tasks, cfg: dict[str, Any]):
    if str(cfg["head"][-1][2]) == "RTDETRDecoder":
        return tasks.RTDETRDetectionModel
    task = tasks.guess_model_task(cfg)
    by_task = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel",
               "classify": "ClassificationModel", "obb": "OBBModel", "semantic": "SemanticSegmentationModel",
               "depth": "DepthModel"}  # fmt: skip
    return getattr(tasks, by_task.get(task, "DetectionModel"))


def build_ultralytics(
    name: str, kwargs: dict[str, Any], *, trust: bool = False, cfg: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``ultralytics:NAME`` names, and what its card records besides source and kwargs.

    ``cfg``: the YAML mapping a card recorded (checked again: a card may come from anyone), used instead of the
    file. The model has the dense single-tensor eval output (:func:`dense_eval_output`).
    """
    source = f"ultralytics:{name}"
    tasks = import_ultralytics(source)
    unknown = [k for k in kwargs if k not in ACCEPTED]
    if unknown:
        raise ModelSourceError(
            f"{source} takes the model arguments {', '.join(ACCEPTED)}, not '{unknown[0]}' (the scale comes from "
            "the name, yolov8s.yaml, or scale=[depth, width, max_channels]; Presso downloads no weights: load a "
            "trusted Ultralytics .pt with --trust)."
        )
    nc = kwargs.get("num_classes", kwargs.get("nc"))
    if "num_classes" in kwargs and "nc" in kwargs and kwargs["num_classes"] != kwargs["nc"]:
        raise ModelSourceError(f"{source}: num_classes={kwargs['num_classes']} and nc={kwargs['nc']} disagree.")
    ch = kwargs.get("ch", 3)
    for key, value, top in (("num_classes", nc, 100_000), ("ch", ch, 64)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top):
            raise ModelSourceError(f"{source}: {key} must be an integer from 1 to {top}, not {value!r:.40}.")
    own = cfg is not None or _is_path(name)  # a user's YAML (or one a card recorded), not one Ultralytics ships
    if cfg is not None:
        where = f"The model YAML recorded in the card of {source}"
    elif _is_path(name):
        cfg, where = read_yaml(Path(name)), f"'{name}'"
    else:
        path = _find_shipped(name)
        cfg, where = read_yaml(path), f"Ultralytics' {path.name}"
    cfg = _rescaled(check_yaml(cfg, where, trust=trust), kwargs, source)
    head = str(cfg["head"][-1][2])
    if head in OPEN_VOCABULARY:
        raise ModelSourceError(f"{source} is not supported: {OPEN_VOCABULARY[head]}.")
    if isinstance(cfg.get("scales"), dict) and cfg["scales"]:
        scale = cfg.get("scale") if kwargs.get("scale") is not None else None
        scale = scale or cfg.get("scale") or _scale_of(name) or next(iter(cfg["scales"]))
        if scale not in cfg["scales"]:
            raise ModelSourceError(f"{where} has no scale '{scale}' (it has {', '.join(cfg['scales'])}).")
        cfg["scale"] = scale
    cfg.setdefault("yaml_file", Path(name).name)
    # a shipped name is rebuilt from the installed Ultralytics; a user's YAML travels in the card (checked again)
    extra = {"yaml": copy.deepcopy(cfg)} if own else {}
    try:
        with quiet_logger("ultralytics"):
            model = _model_class(tasks, cfg)(copy.deepcopy(cfg), ch=ch, nc=nc, verbose=False)
    except Exception as e:  # a checked YAML that still does not build: its values do not fit together
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ModelSourceError(f"Ultralytics could not build {where}: {type(e).__name__}: {msg}") from None
    return dense_eval_output(model), extra


def _rescaled(cfg: dict[str, Any], kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    """The YAML at the ``scale`` (a letter, or ``[depth, width, max_channels]``: a size Ultralytics does not ship,
    without writing a YAML) and with the ``reg_max`` (DFL bins per box side, 16) the user asked for."""
    scale = kwargs.get("scale")
    if isinstance(scale, str):
        cfg["scale"] = scale
    elif scale is not None:
        ok = (isinstance(scale, (list, tuple)) and len(scale) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
              and 0 < scale[0] <= 4 and 0 < scale[1] <= 4 and 1 <= scale[2] <= 8192)  # fmt: skip
        if not ok:
            raise ModelSourceError(
                f"{source}: scale must be a scale letter or [depth, width, max_channels] (e.g. [0.33, 0.25, 1024]), "
                f"not {scale!r:.60}."
            )
        cfg["scales"] = {"custom": [float(scale[0]), float(scale[1]), int(scale[2])]}
        cfg["scale"] = "custom"
    reg_max = kwargs.get("reg_max")
    if reg_max is not None:
        if not isinstance(reg_max, int) or isinstance(reg_max, bool) or not 1 <= reg_max <= 64:
            raise ModelSourceError(f"{source}: reg_max must be an integer from 1 to 64, not {reg_max!r:.40}.")
        cfg["reg_max"] = reg_max
    return cfg


def _is_path(name: str) -> bool:
    """A user's YAML file (a path, or a file in the working directory), rather than a name Ultralytics ships."""
    return "/" in name or os.sep in name or Path(name).is_file()


def dense_eval_output(model: nn.Module) -> nn.Module:
    """Make an Ultralytics model's eval forward return its export output: one tensor of dense predictions (or the
    tuple of tensors a segmentation head exports), not ``(predictions, raw dict)``.

    Ultralytics' heads read ``export`` at every forward (``y if self.export else (y, preds)``); a head that also
    has a one-to-one branch (YOLOv10, YOLO26) is set to infer with its one-to-many branch, whose output is the dense
    ``[N, 4 + nc, A]`` (its one-to-one output is top-k selected instead). Set on the instance, nothing in the
    state dict: rebuilding through the source applies it again."""
    with quiet_logger("ultralytics"):
        for m in model.modules():
            if hasattr(type(m), "export") and isinstance(type(m).export, bool):
                m.export = True
            if getattr(m, "one2one_cv2", None) is not None and hasattr(type(m), "end2end"):
                m.end2end = False
    return model


# --------------------------------------------------------------------------- checkpoints (trusted)
def is_ultralytics(obj: Any) -> bool:
    """Whether an unpickled object is an Ultralytics model or training checkpoint ({"model", "ema", ...})."""
    if isinstance(obj, dict):
        obj = _checkpoint_model(obj)
    return isinstance(obj, nn.Module) and type(obj).__module__.startswith("ultralytics.")


def _checkpoint_model(ckpt: dict) -> Any:
    ema = ckpt.get("ema")
    return ema if ema is not None else ckpt.get("model")


def needs_ultralytics(path: Path) -> bool:
    """Whether a pickle file names Ultralytics classes (read from its opcodes, nothing is unpickled): unpickling it
    imports Ultralytics, which must then be imported the offline, quiet way first."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save zip archive: torch.load will say what it is
        return False
    return any(n.startswith("ultralytics.") for n in names)


def checkpoint_source(model: nn.Module, path: Path) -> dict[str, Any]:
    """What the card of a model unpickled from an Ultralytics checkpoint records instead of the pickle: its own YAML
    (``model.yaml``, checked like any user's YAML), so its model directory rebuilds without unpickling, and without
    trust. Empty -- the card names the pickle, as for any pickled model -- when the YAML does not pass the check or
    does not rebuild the same layers (a fused or edited model)."""
    from presso.models.weights import file_record

    cfg = getattr(model, "yaml", None)
    if not isinstance(cfg, dict):
        return {}
    kwargs = {k: v for k, v in (("nc", cfg.get("nc")), ("ch", cfg.get("channels"))) if isinstance(v, int)}
    name = Path(str(cfg.get("yaml_file") or "checkpoint.yaml")).name
    try:
        rebuilt, extra = build_ultralytics(name, kwargs, cfg=copy.deepcopy(cfg))
    except (ModelSourceError, UntrustedFileError):
        return {}
    mine, theirs = rebuilt.state_dict(), model.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        return {}
    return {"source": f"ultralytics:{name}", "kwargs": kwargs, "weights": file_record(path, "Ultralytics checkpoint"),
            **extra}  # fmt: skip


def from_checkpoint(obj: Any, where: str) -> nn.Module:
    """The model of an unpickled Ultralytics checkpoint (its EMA weights when it has them), float, with the dense
    eval output. Reached only with trust: the caller unpickled it."""
    model = _checkpoint_model(obj) if isinstance(obj, dict) else obj
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"'{where}' holds no Ultralytics model under 'ema' or 'model'.")
    return dense_eval_output(model.float())
