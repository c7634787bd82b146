"""Data for the verbs that need some: here, calibration batches for data-driven pruning criteria.

(The trainer's datasets -- ImageFolder, IDX, CIFAR batches, built-in digits/shapes -- will extend this module.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from presso.errors import ConfigError
from presso.models.spec import InputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def calibration_batches(source: str | Path, spec: InputSpec, batches: int = 4, batch_size: int = 8) -> list:
    """Batches shaped like the model's first input.

    source: a folder of images (searched recursively; resized to the spec's H x W, ImageNet-normalised), or the word
        ``random`` for seeded Gaussian inputs -- enough to rank channels structurally, not to preserve accuracy.
    """
    first = spec.tensors[0]
    if str(source) == "random":
        gen = torch.Generator().manual_seed(0)
        return [torch.randn((batch_size, *first.shape[1:]), generator=gen) for _ in range(batches)]
    if len(first.shape) != 4:
        raise ConfigError(f"Image calibration data needs a 4-D image input (N,C,H,W); the input spec is {spec}.")
    root = Path(source)
    if not root.is_dir():
        raise ConfigError(f"Calibration data '{root}' is not a folder of images (or the word 'random').")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"Calibration folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    _, channels, height, width = first.shape
    images, unreadable = [], 0
    for f in _take(files, batches * batch_size):
        arr = _load_image(f, channels, height, width)
        if arr is None:
            unreadable += 1
        else:
            images.append(arr)
    if not images:
        raise ConfigError(f"None of the images in '{root}' could be read ({unreadable} unreadable).")
    if unreadable:
        import warnings

        warnings.warn(f"Skipped {unreadable} unreadable image(s) in '{root}'.", stacklevel=2)
    x = torch.from_numpy(np.stack(images))
    return list(torch.split(x, batch_size))


def _take(files: list[Path], n: int) -> Iterator[Path]:
    step = max(1, len(files) // n)
    return iter(files[::step][:n])


def _load_image(path: Path, channels: int, height: int, width: int) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if arr.ndim == 2:
        arr = arr[None]
        mean, std = np.array([0.5], np.float32), np.array([0.5], np.float32)
    else:
        arr = arr.transpose(2, 0, 1)
        mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    return (arr - mean[:, None, None]) / std[:, None, None]
