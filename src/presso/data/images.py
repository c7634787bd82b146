"""Image sets and their preprocessing.

Every dataset format becomes one of two image sets: pixels already in memory (built-in sets, IDX, CIFAR batches) or
files decoded on access (folders, CSV). Both yield ``uint8`` tensors ``[C, H, W]`` at the model's input size; the
float conversion, augmentation and normalisation run on whole batches (``Preprocess``), so they are fast, seeded and
identical in training, evaluation, export and prediction.
"""

from __future__ import annotations

import abc
import math
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from presso.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PREPROCESS_VERSION = 1
MAX_IMAGE_SIDE = 4096  # model input height/width: 4096 x 4096 x 3 is 50 MB per image already


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model inputs: resize to ``size`` (H, W), convert to ``channels``, scale to [0, 1],
    normalise by ``mean``/``std``. Recorded in the model card so export and prediction reuse it exactly."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"Images must have 1 or 3 channels, not {self.channels}.")
        sides_ok = all(isinstance(v, (int, np.integer)) and 1 <= v <= MAX_IMAGE_SIDE for v in self.size)
        if len(self.size) != 2 or not sides_ok:
            raise ConfigError(f"Image size must be (height, width) of ints in [1, {MAX_IMAGE_SIDE}], not {self.size}.")
        values = (*self.mean, *self.std)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ConfigError(f"mean/std must be finite numbers (got {self.mean}, {self.std}).")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ConfigError(f"mean/std need {self.channels} values each, std > 0 (got {self.mean}, {self.std}).")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Preprocess:
        if d.get("version", 1) > PREPROCESS_VERSION:
            raise ConfigError("The model's preprocessing was written by a newer Presso; upgrade presso.")
        try:
            return cls(
                size=tuple(int(v) for v in d["size"]),  # type: ignore[arg-type]
                channels=int(d["channels"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                resize=str(d.get("resize", "bilinear")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # a card may come from anyone
            raise ConfigError(f"The recorded preprocessing is malformed ({type(e).__name__}: {e}).") from None

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> normalised float32."""
        x = batch.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, *self.size)


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"32"`` -> (32, 32), ``"224,160"`` or ``"224x160"`` -> (224, 160) (height, width); empty -> None (the
    size is then chosen by ``preprocess_for``). The text of ``--image-size``."""
    if not text:
        return None
    try:
        parts = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--image-size '{text}' must be H or H,W (e.g. 32 or 224,224).") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ConfigError(f"--image-size '{text}' must be H or H,W with positive sizes.")
    if max(parts) > MAX_IMAGE_SIDE:
        raise ConfigError(f"--image-size '{text}' is over {MAX_IMAGE_SIDE} pixels a side; give a smaller size.")
    return (parts[0], parts[-1])


def augment(batch: torch.Tensor, gen: torch.Generator, *, flip: bool, pad: int | None = None) -> torch.Tensor:
    """Light, seeded augmentation of a uint8 batch: random crop after zero padding (1/8 of the side), and a
    horizontal flip when the data allows it (not for digits or text)."""
    n, _, h, w = batch.shape
    pad = max(1, min(h, w) // 8) if pad is None else pad
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    out = torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offs.tolist())])
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


# --------------------------------------------------------------------------- image sets
class ImageSet(Dataset, abc.ABC):
    """Images (and labels, or none) at their native size; ``at(size, channels)`` gives the model-sized view."""

    labels: np.ndarray | None

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def native(self) -> tuple[tuple[int, int] | None, int]:
        """(H, W) when every image has that size (else None), and the channel count."""

    @abc.abstractmethod
    def at(self, size: tuple[int, int], channels: int) -> Dataset:
        """A dataset of uint8 [C, H, W] images at ``size`` with ``channels``, and labels (-1 when unlabeled)."""

    @abc.abstractmethod
    def subset(self, indices: np.ndarray) -> ImageSet:
        """The images at ``indices``."""

    def sample(self, n: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
        """Up to n images spread over the set, uint8 [n, C, H, W] (for normalisation statistics, calibration)."""
        ds = self.at(size, channels)
        idx = np.linspace(0, len(self) - 1, num=min(n, len(self))).astype(int)
        items = [ds[int(i)] for i in idx]
        return torch.stack([x for x, _ in items if x is not None])


class ArrayImages(ImageSet):
    """Pixels in memory: uint8 ``[N, H, W, C]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8:
            raise DataError(f"In-memory images must be uint8, not {images.dtype}.")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels: the files do not belong together.")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def native(self) -> tuple[tuple[int, int] | None, int]:
        return (int(self.images.shape[1]), int(self.images.shape[2])), int(self.images.shape[3])

    def subset(self, indices: np.ndarray) -> ArrayImages:
        return ArrayImages(self.images[indices], None if self.labels is None else self.labels[indices])

    def at(self, size: tuple[int, int], channels: int) -> Dataset:
        need = len(self.images) * channels * int(size[0]) * int(size[1])
        if need > memory_limit():
            raise DataError(
                f"{len(self.images)} images at {size[0]}x{size[1]} need {need / 2**30:.1f} GiB in memory, more than "
                f"half of this machine's; give a smaller --image-size."
            )
        return _TensorImages(_resize_array(self.images, size, channels), self.labels)


def memory_limit() -> int:
    """Bytes an in-memory image set may take: half the machine's memory (8 GiB where that is unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return 8 << 30


class _TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: np.ndarray | None):
        self.images = images
        self.labels = None if labels is None else torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], (self.labels[i] if self.labels is not None else torch.tensor(-1))


def _resize_array(images: np.ndarray, size: tuple[int, int], channels: int, chunk: int = 4096) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # N, C, H, W (a view)
    x = _convert_channels(x, channels)
    if tuple(x.shape[-2:]) == tuple(size):
        return x.contiguous()
    out = []
    for part in torch.split(x, chunk):  # bounded memory for 60k-image sets
        y = torch.nn.functional.interpolate(part.float(), size=size, mode="bilinear", antialias=True)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:  # ITU-R 601 luma, as PIL's "L"
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"Cannot convert {c}-channel images to {channels} channels.")


class FileImages(ImageSet):
    """Image files decoded on access. Unreadable files found while scanning are skipped and counted; a file that
    fails later (truncated data) is dropped from its batch with a warning naming it."""

    def __init__(self, files: list[Path], labels: np.ndarray | None, *, scan: bool = True, where: str = ""):
        self.where = where
        self.skipped: list[Path] = []
        sizes: set[tuple[int, int]] = set()
        modes: set[str] = set()
        if scan:
            kept, kept_labels = [], []
            for i, f in enumerate(files):
                info = _probe(f)
                if info is None:
                    self.skipped.append(f)
                    continue
                sizes.add(info[0])
                modes.add(info[1])
                kept.append(f)
                if labels is not None:
                    kept_labels.append(labels[i])
            files = kept
            labels = None if labels is None else np.asarray(kept_labels, dtype=np.int64)
            if self.skipped:
                warnings.warn(
                    f"Skipped {len(self.skipped)} unreadable image(s) in {where or 'the data'}, e.g. "
                    f"{self.skipped[0]}; remove or replace them.",
                    stacklevel=3,
                )
            if not files:
                raise DataError(f"None of the images in {where or 'the data'} could be read ({len(self.skipped)}).")
        self.files = list(files)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._sizes = sizes
        self._channels = 1 if modes and modes <= {"L", "1", "I;16", "I", "F"} else 3

    def __len__(self) -> int:
        return len(self.files)

    def native(self) -> tuple[tuple[int, int] | None, int]:
        if len(self._sizes) == 1:
            w, h = next(iter(self._sizes))
            return (h, w), self._channels
        return None, self._channels

    def sizes(self) -> set[tuple[int, int]]:
        return set(self._sizes)

    def subset(self, indices: np.ndarray) -> FileImages:
        out = FileImages.__new__(FileImages)
        out.where, out.skipped = self.where, []
        out.files = [self.files[int(i)] for i in indices]
        out.labels = None if self.labels is None else self.labels[indices]
        out._sizes, out._channels = self._sizes, self._channels
        return out

    def at(self, size: tuple[int, int], channels: int) -> Dataset:
        return _DecodedFiles(self.files, self.labels, size, channels)


class _DecodedFiles(Dataset):
    def __init__(self, files: list[Path], labels: np.ndarray | None, size: tuple[int, int], channels: int):
        self.files, self.labels, self.size, self.channels = files, labels, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        arr = load_image(self.files[i], self.channels, self.size)
        label = torch.tensor(int(self.labels[i]) if self.labels is not None else -1)
        if arr is None:
            warnings.warn(
                f"Could not decode {self.files[i]}; dropped from its batch. Remove or replace it.", stacklevel=2
            )
            return None, label
        return torch.from_numpy(arr), label


def collate(items):
    """Stack a batch, dropping images that failed to decode (each was warned about by name)."""
    kept = [(x, y) for x, y in items if x is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in kept]), torch.stack([y for _, y in kept])


def _probe(path: Path) -> tuple[tuple[int, int], str] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever; a device never ends
            return None
        with Image.open(path) as im:
            return im.size, im.mode
    # ImportError: a library may replace Image.open process-wide (Ultralytics does, when a user's script imports it)
    # with one that tries to import a plugin for files Pillow cannot identify: still an unreadable image here
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImportError):
        return None


def load_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray | None:
    """Decode one image to uint8 ``[C, H, W]`` at ``size`` (H, W); None if it cannot be decoded.

    The decoder is the bundle's own (``presso.convert.predict``), so training and deployed prediction see the same
    pixels.
    """
    from presso.convert.predict import load_image as decode
    from presso.errors import BundleError

    try:
        return decode(path, channels, size)
    except BundleError:
        return None


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
