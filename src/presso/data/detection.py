"""Images with boxes: the dataset type every detection format becomes, its box-aware augmentation and its batches.

Boxes are ``xyxy`` in pixels of the image as stored (continuous coordinates: the image spans 0..W and 0..H, so a box
tight around pixel columns 3..7 is x1=3, x2=8). ``DetectionImages.at(size, channels)`` gives the model-sized view:
images resized (plain bilinear resize, no letterbox, as classification) and boxes scaled with them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from presso.data.images import ImageSet, _resize_array, load_image, memory_limit
from presso.errors import DataError

__all__ = ["DetectionImages", "augment_detection", "box_stats", "detection_collate", "empty_target"]

MIN_KEPT_FRACTION = 0.2  # augmentation drops a box left with under 20% of its area inside the image
MIN_KEPT_SIDE = 2.0  # ... or under 2 px wide or high


def empty_target() -> dict[str, np.ndarray]:
    """A target with no boxes (K=0)."""
    return {"boxes": np.zeros((0, 4), dtype=np.float32), "labels": np.zeros((0,), dtype=np.int64)}


def detection_collate(items: list) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A batch: uint8 ``[B, C, H, W]`` and the B target dicts; items whose image failed to decode (None, each
    warned about by name) are dropped with their targets."""
    kept = [(x, t) for x, t in items if x is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), []
    return torch.stack([x for x, _ in kept]), [t for _, t in kept]


class DetectionImages(ImageSet):
    """Images with boxes. ``targets[i] = {"boxes": float32 [K, 4] xyxy in pixels of image i as stored, "labels":
    int64 [K]}`` (K may be 0).

    The pixels are in memory (``images``: one uint8 ``[N, H, W, C]`` array, or a list of ``[H, W, C]`` arrays of
    different sizes) or in files decoded on access (``files``, with each file's (H, W) from the scan). ``skipped``
    counts the unreadable images left out when the source was read (a subset keeps its source's count).
    """

    collate = staticmethod(detection_collate)

    def __init__(
        self,
        targets: list[dict[str, np.ndarray]],
        classes: list[str],
        *,
        images: np.ndarray | list[np.ndarray] | None = None,
        files: list[Path] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        channels: int | None = None,
        skipped: int = 0,
        where: str = "",
    ):
        if (images is None) == (files is None):
            raise ValueError("DetectionImages holds either images (in memory) or files, not both or neither.")
        self.classes = list(classes)
        self.targets = [_as_target(t) for t in targets]
        self.skipped = int(skipped)
        self.where = where
        self.files = None if files is None else [Path(f) for f in files]
        if images is not None:
            if isinstance(images, np.ndarray) and images.ndim == 3:
                images = images[..., None]
            arrays = [images] if isinstance(images, np.ndarray) else images
            if any(a.dtype != np.uint8 for a in arrays):
                raise DataError("In-memory detection images must be uint8.")
            if isinstance(images, list):
                images = [a[..., None] if a.ndim == 2 else a for a in images]
                image_sizes = [(int(a.shape[0]), int(a.shape[1])) for a in images]
                channels = int(images[0].shape[2]) if images else 3
            else:
                image_sizes = [(int(images.shape[1]), int(images.shape[2]))] * len(images)
                channels = int(images.shape[3])
        elif image_sizes is None or len(image_sizes) != len(files or []):
            raise ValueError("File-backed DetectionImages need one (H, W) per file.")
        self.images = images
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self.channels = int(channels or 3)
        if len(self.targets) != len(self.image_sizes):
            raise DataError(
                f"{len(self.image_sizes)} images but {len(self.targets)} targets in {where or 'the data'}: "
                "the annotations do not belong to these images."
            )

    # -------------------------------------------------------------- the ImageSet surface
    @property
    def labels(self) -> list[dict[str, np.ndarray]]:
        """The targets (non-None: a detection set is labeled)."""
        return self.targets

    def __len__(self) -> int:
        return len(self.image_sizes)

    def native(self) -> tuple[tuple[int, int] | None, int]:
        sizes = set(self.image_sizes)
        return (next(iter(sizes)) if len(sizes) == 1 else None), self.channels

    def sizes(self) -> set[tuple[int, int]]:
        """The distinct image sizes as (width, height) pairs: PIL's order, as ``FileImages.sizes``."""
        return {(w, h) for h, w in self.image_sizes}

    def subset(self, indices: np.ndarray) -> DetectionImages:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        out = DetectionImages.__new__(DetectionImages)
        out.classes, out.skipped, out.where, out.channels = self.classes, self.skipped, self.where, self.channels
        out.targets = [self.targets[i] for i in idx]
        out.image_sizes = [self.image_sizes[i] for i in idx]
        out.files = None if self.files is None else [self.files[i] for i in idx]
        if isinstance(self.images, np.ndarray):
            out.images = self.images[np.asarray(idx, dtype=np.int64)]
        else:
            out.images = None if self.images is None else [self.images[i] for i in idx]
        return out

    def at(self, size: tuple[int, int], channels: int) -> Dataset:
        """The model-sized view: items ``(uint8 [C, H, W], {"boxes", "labels", "image_id", "orig_size"})``, boxes
        scaled to ``size``. In-memory images are resized once, here; files are decoded per item."""
        size = (int(size[0]), int(size[1]))
        if self.images is None:
            return _DetectionFiles(self.files or [], self.targets, self.image_sizes, size, channels)
        need = len(self) * channels * size[0] * size[1]
        if need > memory_limit():
            raise DataError(
                f"{len(self)} images at {size[0]}x{size[1]} need {need / 2**30:.1f} GiB in memory, more than half of "
                "this machine's; give a smaller --image-size."
            )
        return _DetectionTensors(self._resized(np.arange(len(self)), size, channels), self.targets, self.image_sizes)

    def sample(self, n: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
        """Up to n images spread evenly over the set, uint8 ``[n, C, H, W]`` (normalisation statistics, calibration)."""
        idx = np.linspace(0, len(self) - 1, num=min(n, len(self))).astype(int)
        size = (int(size[0]), int(size[1]))
        if self.images is not None:
            return self._resized(idx, size, channels)
        view = _DetectionFiles([self.files[i] for i in idx], [self.targets[i] for i in idx],  # type: ignore[index]
                               [self.image_sizes[i] for i in idx], size, channels)  # fmt: skip
        x, _ = detection_collate([view[i] for i in range(len(view))])
        return x

    def _resized(self, idx: np.ndarray, size: tuple[int, int], channels: int) -> torch.Tensor:
        if isinstance(self.images, np.ndarray):
            return _resize_array(self.images[idx], size, channels)
        if len(idx) == 0:
            return torch.empty((0, channels, *size), dtype=torch.uint8)
        return torch.cat([_resize_array(self.images[int(i)][None], size, channels) for i in idx])  # type: ignore[index]


def _as_target(t: dict[str, Any]) -> dict[str, np.ndarray]:
    boxes = np.asarray(t.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(t.get("labels", np.zeros((0,))), dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise DataError(f"A target has {len(boxes)} boxes but {len(labels)} labels.")
    return {"boxes": boxes, "labels": labels}


def _scaled(target: dict[str, np.ndarray], orig: tuple[int, int], size: tuple[int, int], i: int) -> dict[str, Any]:
    scale = np.array([size[1] / orig[1], size[0] / orig[0]] * 2, dtype=np.float32)
    return {
        "boxes": torch.from_numpy(target["boxes"] * scale),
        "labels": torch.from_numpy(target["labels"].copy()),
        "image_id": i,
        "orig_size": orig,
    }


class _DetectionTensors(Dataset):
    """In-memory model-sized view: images resized once; ``take`` slices a whole batch without per-item overhead."""

    collate = staticmethod(detection_collate)

    def __init__(self, images: torch.Tensor, targets: list[dict], orig_sizes: list[tuple[int, int]]):
        self.images = images
        size = (int(images.shape[-2]), int(images.shape[-1]))
        self.targets = [_scaled(t, o, size, i) for i, (t, o) in enumerate(zip(targets, orig_sizes, strict=True))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        return self.images[torch.from_numpy(np.asarray(idx, dtype=np.int64))], [self.targets[int(i)] for i in idx]


class _DetectionFiles(Dataset):
    collate = staticmethod(detection_collate)

    def __init__(self, files: list[Path], targets: list[dict], orig_sizes: list[tuple[int, int]], size, channels: int):
        self.files, self.targets, self.orig_sizes = files, targets, orig_sizes
        self.size, self.channels = (int(size[0]), int(size[1])), int(channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        target = _scaled(self.targets[i], self.orig_sizes[i], self.size, i)
        arr = load_image(self.files[i], self.channels, self.size)
        if arr is None:
            warnings.warn(
                f"Could not decode {self.files[i]}; dropped from its batch. Remove or replace it.", stacklevel=2
            )
            return None, target
        return torch.from_numpy(arr), target


# --------------------------------------------------------------------------- augmentation
def augment_detection(
    x: torch.Tensor,
    targets: list[dict[str, Any]],
    gen: torch.Generator,
    *,
    flip: bool,
    scale: tuple[float, float] = (0.75, 1.25),
    shift: float = 0.1,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Box-aware, seeded augmentation of a batch ``[B, C, H, W]`` (uint8 or float; returned in the same dtype).

    Per image: a horizontal flip with probability 1/2 (when ``flip``), then a zoom by a factor in ``scale`` about
    the image centre and a shift of up to ``shift`` of the side in each direction, areas uncovered filled with
    zeros. Boxes move with the pixels and are clipped to the image; a box left with under 20% of its area or under
    2 px a side is dropped with its label. Only ``gen`` draws the random numbers, so a seed repeats the batch.
    """
    n, _, h, w = x.shape
    if len(targets) != n:
        raise DataError(f"augment_detection: {n} images but {len(targets)} targets.")
    flips = (torch.rand(n, generator=gen) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    s = torch.empty(n).uniform_(float(scale[0]), float(scale[1]), generator=gen)
    t = torch.empty(n, 2).uniform_(-float(shift), float(shift), generator=gen) * torch.tensor([w, h])
    out = x.clone()
    if flips.any():
        out[flips] = out[flips].flip(-1)
    if not (torch.all(s == 1.0) and torch.all(t == 0.0)):
        out = _affine(out, s, t)
    return out, [_move_boxes(tg, bool(f), float(k), (float(dx), float(dy)), (h, w))
                 for tg, f, k, (dx, dy) in zip(targets, flips, s, t.tolist(), strict=True)]  # fmt: skip


def _affine(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Zoom each image by s about its centre and shift it by t pixels (output pixel p samples input (p-c-t)/s+c)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s
    theta[:, 0, 2] = -(2.0 * t[:, 0] / w) / s  # the shift in grid_sample's [-1, 1] coordinates
    theta[:, 1, 2] = -(2.0 * t[:, 1] / h) / s
    grid = torch.nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    y = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if x.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(x.dtype)


def _move_boxes(target: dict[str, Any], flipped: bool, s: float, t: tuple[float, float], hw: tuple[int, int]):
    boxes, labels = target["boxes"], target["labels"]
    as_numpy = isinstance(boxes, np.ndarray)
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).clone()
    lab = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    h, w = hw
    if flipped:
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    c = torch.tensor([w / 2, h / 2, w / 2, h / 2])
    b = (b - c) * s + c + torch.tensor([t[0], t[1], t[0], t[1]])
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    keep = (bw * bh >= MIN_KEPT_FRACTION * area) & (bw >= MIN_KEPT_SIDE) & (bh >= MIN_KEPT_SIDE)
    out = dict(target)
    out["boxes"], out["labels"] = b[keep], lab[keep]
    if as_numpy:
        out["boxes"], out["labels"] = out["boxes"].numpy(), out["labels"].numpy()
    return out


# --------------------------------------------------------------------------- statistics
def box_stats(targets: list[dict[str, Any]], classes: list[str] | None = None) -> dict[str, Any]:
    """Boxes in all, images without any, boxes per class (by name when ``classes`` is given), for ``describe()``."""
    labels = [np.asarray(t["labels"], dtype=np.int64).reshape(-1) for t in targets]
    flat = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    n_classes = len(classes) if classes is not None else (int(flat.max()) + 1 if flat.size else 0)
    counts = np.bincount(flat, minlength=n_classes) if flat.size else np.zeros(n_classes, dtype=np.int64)
    names = classes if classes is not None else [str(k) for k in range(len(counts))]
    return {
        "boxes": int(flat.size),
        "images_without_boxes": sum(1 for lab in labels if lab.size == 0),
        "max_per_image": max((int(lab.size) for lab in labels), default=0),
        "per_class": {str(name): int(c) for name, c in zip(names, counts, strict=False)},
    }
