"""Data for every verb: one ``--data`` string names a dataset.

- ``digits`` / ``digits:size=16`` -- scikit-learn's 8x8 digits (ships with the package), RGB at ``size`` (32).
- ``shapes`` / ``shapes:n=2000,size=32,classes=6,seed=0`` -- procedurally generated geometric shapes.
- ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``) or ``fashion-mnist:DIR``; any folder of MNIST-style IDX files.
- a CIFAR batch folder (CIFAR-10 python or binary batches, CIFAR-100 python).
- a folder: ``train/`` + ``val/`` (or ``test/``) ImageFolders, one ImageFolder (a sub-folder per class), or loose
  images (unlabeled; ``unlabeled:DIR`` forces that reading) -- for distillation and calibration.
- ``labels.csv`` -- rows of ``path,label``.
- object detection (``task == "detect"``; ``presso.data.detection``): ``shapes-det``, ``fashion-scenes``, a COCO
  instances JSON, an Ultralytics dataset YAML, a Pascal VOC folder (``presso.data.detection_formats``).

Formats without a held-out split are split by seed (``val_fraction``). ``Preprocess`` (size, channels, mean, std)
is chosen once per model and recorded in its card, so training, export and prediction see identical inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from presso.data import builtin, detection, detection_formats, formats
from presso.data.detection import DetectionImages, _DetectionTensors
from presso.data.images import (
    IMAGE_SUFFIXES,
    ArrayImages,
    FileImages,
    ImageSet,
    Preprocess,
    _TensorImages,
    augment,
    collate,
    parse_image_size,
)
from presso.errors import ConfigError, DataError, closest
from presso.models.spec import InputSpec

__all__ = [
    "DataBundle",
    "IMAGE_SUFFIXES",
    "Preprocess",
    "augment",
    "batches",
    "calibration_batches",
    "load_data",
    "model_calibration_batches",
    "model_channels",
    "parse_image_size",
    "preprocess_for",
    "warn_if_labels_differ",
]

BUILTIN = ("digits", "shapes", "fashion-mnist", *detection_formats.DETECTION_BUILTIN)


@dataclass
class DataBundle:
    """A dataset resolved from its spec: a training set, a held-out set, class names (None when unlabeled)."""

    name: str
    train: ImageSet
    val: ImageSet
    classes: list[str] | None
    flip: bool = True  # whether a horizontal flip keeps the label (not for digits)
    val_from: str = "split"  # "split" (by seed) or the format's own held-out set
    task: str = "classify"  # or "detect": train/val are DetectionImages (targets of boxes and labels)

    @property
    def labeled(self) -> bool:
        return self.classes is not None and self.train.labels is not None

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def describe(self) -> dict[str, Any]:
        size, channels = self.train.native()
        out = {
            "data": self.name,
            "train": len(self.train),
            "val": len(self.val),
            "val_from": self.val_from,
            "classes": self.num_classes,
            "native_size": list(size) if size else None,
            "native_channels": channels,
            "task": self.task,
        }
        if isinstance(self.train, DetectionImages):
            out["boxes"] = detection.box_stats(self.train.targets, self.classes)
        return out


def load_data(spec: str | Path, *, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """Resolve a data spec (see the module docstring) into a train/val bundle."""
    text = str(spec).strip()
    if not text:
        raise DataError("Empty --data: give digits, shapes, fashion-mnist, a folder, or a CSV of path,label.")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), not {val_fraction}.")
    name, sep, arg = text.partition(":")
    flip = True
    path = Path(text)
    detected = detection_formats.load_detection(text, seed=seed)
    if detected is not None:
        train, val, classes = detected
        val_from = "given" if val is not None else "split"
        if val is None:
            train, val = _split(train, val_fraction, seed)
        return DataBundle(text, train, val, classes, flip=True, val_from=val_from, task="detect")
    if name in ("digits", "shapes") and not path.exists():
        opts = _options(arg, name)
        if name == "digits":
            train, classes = builtin.digits(**opts)
            flip = False
        else:
            opts.setdefault("seed", seed)
            train, classes = builtin.shapes(**opts)
        val = None
    elif name == "fashion-mnist" and not path.exists():
        train, val, classes = formats.read_idx_dir(
            formats.fashion_mnist_dir(arg or None), classes=formats.FASHION_MNIST_CLASSES
        )
    elif sep and name == "unlabeled":
        train, val, classes = formats.read_folder(Path(arg), unlabeled=True)
    elif sep and name == "cifar":
        train, val, classes = formats.read_cifar_dir(Path(arg))
    elif path.is_dir():
        if any(path.glob("train-images-idx3-ubyte*")):
            train, val, classes = formats.read_idx_dir(path)
        elif formats.is_cifar_dir(path):
            train, val, classes = formats.read_cifar_dir(path)
        else:
            train, val, classes = formats.read_folder(path)
    elif path.suffix.lower() == ".csv" and path.is_file():
        train, val, classes = formats.read_csv(path)
    elif path.suffix or "/" in text:
        raise DataError(f"Data '{text}' does not exist.")
    else:
        raise DataError(
            f"Unknown data '{text}': give {', '.join(BUILTIN)}, a folder (ImageFolder, IDX, CIFAR batches, "
            f"unlabeled images) or a CSV of path,label.{closest(name, BUILTIN)}"
        )
    if len(train) == 0:
        raise DataError(f"Data '{text}' is empty.")
    for images in (train, val):
        _check_labels(images, classes, text)
    val_from = "given"
    if val is None:
        train, val = _split(train, val_fraction, seed)
        val_from = "split"
    return DataBundle(text, train, val, classes, flip=flip, val_from=val_from)


def _check_labels(images: ImageSet | None, classes: list[str] | None, where: str) -> None:
    """Every label names one of the classes: checked once, here, rather than as an index error mid-training."""
    labels = None if images is None else images.labels
    if labels is None or classes is None or len(labels) == 0:
        return
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        raise DataError(
            f"Data '{where}' has {int(bad.sum())} label(s) outside 0..{len(classes) - 1} (e.g. {int(labels[bad][0])}) "
            f"for its {len(classes)} classes: the label file does not belong to these images or class names."
        )


def _options(arg: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"'{name}:{arg}': options are KEY=VALUE separated by commas, e.g. {name}:size=32.")
        try:
            out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise DataError(f"'{name}' option {key}={value}: the value must be a number.") from None
    allowed = {"digits": {"size"}, "shapes": {"n", "size", "classes", "seed", "noise"}}[name]
    if unknown := set(out) - allowed:
        raise DataError(f"'{name}' has no option {sorted(unknown)}; it takes {sorted(allowed)}.")
    return out


def _split(images: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    n = len(images)
    if n < 2:
        raise DataError("The data holds a single image; training needs at least two (one to hold out).")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return images.subset(np.sort(order[n_val:])), images.subset(np.sort(order[:n_val]))


# --------------------------------------------------------------------------- preprocessing for a model
def model_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: its card's input spec, else its first 2-D convolution."""
    from presso.models.card import get_card

    card = get_card(model)
    if card is not None and card.input_spec:
        shape = InputSpec.parse(card.input_spec).tensors[0].shape
        if len(shape) == 4:
            return int(shape[1])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def preprocess_for(
    bundle: DataBundle,
    model: nn.Module | None = None,
    *,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    stats_sample: int = 2000,
) -> Preprocess:
    """The model's recorded preprocessing when it has one (so fine-tuning sees what training saw); otherwise size
    from ``image_size``, the model card's input spec, or the data's own size; channels from the model; mean/std
    measured on the training set."""
    from presso.models.card import get_card

    card = get_card(model) if model is not None else None
    recorded = getattr(card, "preprocess", None) if card is not None else None
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if recorded:
        pp = Preprocess.from_json(recorded)
        if size is None or tuple(size) == pp.size:
            return pp
    native_size, native_channels = bundle.train.native()
    if size is None and card is not None and card.input_spec:
        shape = InputSpec.parse(card.input_spec).tensors[0].shape
        if len(shape) == 4:
            size = (int(shape[2]), int(shape[3]))
    if size is None:
        if native_size is None:
            sizes = sorted(bundle.train.sizes())[:3] if hasattr(bundle.train, "sizes") else []
            shown = ", ".join(f"{w}x{h}" for w, h in sizes)
            raise DataError(
                f"Images in '{bundle.name}' have different sizes ({shown}, ...); pass --image-size H[,W] to resize "
                "them all to one size."
            )
        size = native_size
    channels = channels or (model_channels(model) if model is not None else None) or native_channels
    sample = bundle.train.sample(stats_sample, channels, tuple(size)).float() / 255.0
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Preprocess(
        size=(int(size[0]), int(size[1])),
        channels=int(channels),
        mean=tuple(round(float(v), 4) for v in mean),
        std=tuple(round(float(v), 4) for v in std),
    )


# --------------------------------------------------------------------------- batches
def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1) -> np.ndarray:
    """This process's sample order for one epoch: the same permutation on every process (seeded by seed and
    epoch), padded to a multiple of ``world`` and dealt round-robin -- what DistributedSampler does."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if world > 1:
        pad = (-n) % world
        if pad:
            order = np.concatenate([order, order[:pad]])
        order = order[rank::world]
    return order


def batches(dataset, order: np.ndarray, batch_size: int, *, workers: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """uint8 image batches and labels in ``order`` (for detection: a list of target dicts). In-memory sets are
    sliced directly (no per-item overhead); file sets decode in ``workers`` processes."""
    if isinstance(dataset, _TensorImages):
        for start in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[start : start + batch_size])
            labels = dataset.labels[idx] if dataset.labels is not None else torch.full((len(idx),), -1)
            yield dataset.images[idx], labels
        return
    if isinstance(dataset, _DetectionTensors):
        for start in range(0, len(order), batch_size):
            yield dataset.take(order[start : start + batch_size])
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        collate_fn=getattr(dataset, "collate", collate),
        persistent_workers=False,
    )
    yield from loader


def calibration_batches(
    source: str | Path | DataBundle,
    spec: InputSpec,
    batches: int = 4,
    batch_size: int = 8,
    preprocess: Preprocess | None = None,
) -> list[torch.Tensor]:
    """Batches shaped like the model's first input, for data-driven criteria and quantization calibration.

    source: any data spec or a loaded ``DataBundle`` (images spread evenly over the training split, normalised by
        the model's recorded preprocessing, or by statistics of the data), or ``random`` for seeded Gaussian inputs
        -- enough to rank channels structurally, not to preserve accuracy.
    """
    first = spec.tensors[0]
    if not isinstance(source, DataBundle) and str(source) == "random":
        gen = torch.Generator().manual_seed(0)
        return [torch.randn((batch_size, *first.shape[1:]), generator=gen) for _ in range(batches)]
    if len(first.shape) != 4:
        raise DataError(f"Image calibration data needs a 4-D image input (N,C,H,W); the input spec is {spec}.")
    bundle = source if isinstance(source, DataBundle) else load_data(source)
    _, channels, height, width = first.shape
    if preprocess is None:
        preprocess = preprocess_for(bundle, image_size=(height, width), channels=channels, stats_sample=256)
    x = preprocess.normalize(bundle.train.sample(batches * batch_size, channels, (height, width)))
    return list(torch.split(x, batch_size))


def model_calibration_batches(
    model: nn.Module, source: str | Path | DataBundle, spec: InputSpec | str, *, batches: int = 4, batch_size: int = 32
) -> list[torch.Tensor]:
    """Calibration batches for compressing ``model``: ``calibration_batches`` normalised by the preprocessing
    recorded in the model's card (the inputs it was trained on), else by statistics of the data.

    The default, 4 batches of 32 (128 images), is what ``presso compress --calib`` and ``presso run`` use to score
    channels and to judge allocations under a target.
    """
    from presso.models.card import get_card

    recorded = getattr(get_card(model), "preprocess", None)
    pp = Preprocess.from_json(recorded) if recorded else None
    if not isinstance(source, DataBundle) and str(source) != "random":
        source = load_data(source)
    if isinstance(source, DataBundle):
        warn_if_labels_differ(model, source)
    return calibration_batches(source, InputSpec.parse(spec), batches=batches, batch_size=batch_size, preprocess=pp)


def warn_if_labels_differ(model: nn.Module, bundle: DataBundle, use: str = "calibration") -> str | None:
    """Warn (and return the line) when the model's card names classes other than the data's: calibrating a
    Fashion-MNIST model on digits runs, but its ranges and scores then describe other images."""
    from presso.models.card import get_card

    labels = getattr(get_card(model), "labels", None)
    if not labels or not bundle.classes or list(labels) == list(bundle.classes):
        return None

    def few(names: list[str]) -> str:
        return f"{len(names)} classes ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"

    line = (
        f"The model was trained on {few(list(labels))} but the {use} data '{bundle.name}' has "
        f"{few(list(bundle.classes))}: use data like the model's own inputs, or its figures describe other images."
    )
    warnings.warn(line, stacklevel=3)
    return line


# ArrayImages is part of the public surface for users who hold pixels in memory already.
__all__ += ["ArrayImages", "DetectionImages", "FileImages", "ImageSet", "epoch_order"]
