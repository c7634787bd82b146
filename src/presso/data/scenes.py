"""Built-in detection sets, offline and seeded: ``shapes-det`` (generated shapes) and ``fashion-scenes`` (Fashion-MNIST
items placed on a canvas).

- ``shapes-det`` / ``shapes-det:n=400,size=64,classes=3,seed=0,max_objects=4,noise=0.04``: ``size`` px RGB images,
  each with 1..``max_objects`` filled shapes (circle, square, triangle, cross, ring, star, hexagon, crescent: the first
  ``classes`` kinds) of 15-45% of the side, in colours far from the background's, overlapping a little at most, on a
  background with pixel noise. Boxes are tight around each shape's own pixels (as drawn, before later shapes cover
  part of it). Held-out images are split off by seed.
- ``fashion-scenes`` / ``fashion-scenes:n=6000,val=1000,seed=0,size=144,max_objects=6`` (or ``fashion-scenes:DIR``
  for another folder of the Fashion-MNIST IDX files): 1..``max_objects`` Fashion-MNIST items, each scaled 0.8-2x,
  placed on a black gray-scale canvas of ``size`` x ``size`` px (``min_size``/``max_size`` instead give each image its
  own square size in that range: a multi-size set, then training needs ``--image-size``). The box is the item's
  tight box (its non-zero pixels after scaling); overlapping items merge by the brighter pixel. Training scenes use
  items of Fashion-MNIST's training file only, held-out scenes (``val``, default n/6) items of its test file, so no
  item is in both. Generated once per set of options and cached in ``$PRESSO_HOME/cache/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from presso.data import formats
from presso.data.builtin import SHAPES, _contrasting, _draw_shape
from presso.data.detection import DetectionImages
from presso.data.images import memory_limit
from presso.errors import ConfigError, DataError, check_range

SCENES_VERSION = 1  # part of the cache key: bump when the generator changes what a seed draws
MAX_OVERLAP = 0.3  # a new object may cover at most 30% of the smaller of it and any object placed before
OPTIONS = {
    "shapes-det": {"n", "size", "classes", "seed", "max_objects", "noise"},
    "fashion-scenes": {"n", "val", "seed", "size", "min_size", "max_size", "max_objects"},
}


def load(name: str, arg: str, seed: int) -> tuple[DetectionImages, DetectionImages | None, list[str]]:
    """The built-in set ``name`` with the options in ``arg`` (``KEY=VALUE,...``; for fashion-scenes also a folder)."""
    folder, opts = _options(name, arg)
    opts.setdefault("seed", seed)
    if name == "shapes-det":
        train, classes = shapes_det(**opts)
        return train, None, classes
    return fashion_scenes(folder, **opts)


def _options(name: str, arg: str) -> tuple[str | None, dict[str, Any]]:
    folder, out = None, {}
    for item in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if name != "fashion-scenes" or folder is not None:
                raise DataError(f"'{name}:{arg}': options are KEY=VALUE separated by commas, e.g. {name}:n=100.")
            folder = item
            continue
        try:
            out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise DataError(f"'{name}' option {key}={value}: the value must be a number.") from None
    if unknown := set(out) - OPTIONS[name]:
        raise DataError(f"'{name}' has no option {sorted(unknown)}; it takes {sorted(OPTIONS[name])}.")
    return folder, out


def _free_spot(rng: np.random.Generator, boxes: list, w: float, h: float, width: int, height: int):
    """A top-left corner for a w x h box inside the image overlapping no earlier box by more than MAX_OVERLAP of the
    smaller one; None after 20 tries (the object is left out)."""
    for _ in range(20):
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        ok = True
        for bx1, by1, bx2, by2 in boxes:
            inter = max(0.0, min(x + w, bx2) - max(x, bx1)) * max(0.0, min(y + h, by2) - max(y, by1))
            if inter > MAX_OVERLAP * min(w * h, (bx2 - bx1) * (by2 - by1)):
                ok = False
                break
        if ok:
            return x, y
    return None


def _tight(mask: np.ndarray) -> list[float] | None:
    """xyxy pixel box around a mask's True pixels (x2, y2 exclusive), None when it has none."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# --------------------------------------------------------------------------- shapes-det
def shapes_det(
    n: int = 400, size: int = 64, classes: int = 3, seed: int = 0, max_objects: int = 4, noise: float = 0.04
) -> tuple[DetectionImages, list[str]]:
    """``n`` RGB ``size`` x ``size`` scenes of 1..max_objects shapes, with tight boxes (see the module docstring)."""
    from PIL import Image, ImageDraw

    for key, value, low, high in (("n", n, 1, None), ("size", size, 16, 1024), ("max_objects", max_objects, 1, 32)):
        check_range(value, f"shapes-det: {key}", low, high, integer=True)
    check_range(classes, "shapes-det: classes", 1, len(SHAPES), integer=True)
    check_range(seed, "shapes-det: seed", 0, 2**63 - 1, integer=True)
    check_range(noise, "shapes-det: noise", 0, 1)
    if n * size * size * 3 > memory_limit():
        raise ConfigError(f"shapes-det: n={n} images of {size}x{size} do not fit in memory; ask for fewer or smaller.")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    targets = []
    for i in range(n):
        bg = rng.integers(0, 256, 3)
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = bg
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            label = int(rng.integers(classes))
            r = rng.uniform(0.075, 0.225) * size  # diameter 15-45% of the side
            spot = _free_spot(rng, boxes, 2 * r, 2 * r, size, size)
            rot, fg = rng.uniform(0, 2 * np.pi), _contrasting(rng, bg)
            if spot is None:
                continue
            mask_im = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask_im), SHAPES[label], spot[0] + r, spot[1] + r, r, rot, 255, (0,))
            mask = np.asarray(mask_im) > 127
            box = _tight(mask)
            if box is None:
                continue
            canvas[mask] = fg
            boxes.append(box)
            labels.append(label)
        if noise:
            canvas += rng.normal(0.0, noise * 255.0, canvas.shape).astype(np.float32)
        images[i] = np.clip(canvas, 0, 255).round().astype(np.uint8)
        targets.append({"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.asarray(labels)})
    names = list(SHAPES[:classes])
    return DetectionImages(targets, names, images=images, where=f"shapes-det (seed {seed})"), names


# --------------------------------------------------------------------------- fashion-scenes
def presso_home() -> Path:
    """``$PRESSO_HOME`` (default ``~/.presso``): the same lookup as ``presso.bench.env.presso_home`` (data cannot
    import bench: they share a floor)."""
    return Path(os.environ.get("PRESSO_HOME") or Path.home() / ".presso").expanduser()


def fashion_scenes(
    folder: str | None = None,
    *,
    n: int = 6000,
    val: int | None = None,
    seed: int = 0,
    size: int = 144,
    min_size: int | None = None,
    max_size: int | None = None,
    max_objects: int = 6,
) -> tuple[DetectionImages, DetectionImages, list[str]]:
    """Fashion-MNIST scenes (see the module docstring): train from the training items, val from the test items."""
    val = max(1, n // 6) if val is None else val
    lo, hi = (min_size or size, max_size or size) if (min_size or max_size) else (size, size)
    for key, value, low, high in (("n", n, 1, None), ("val", val, 1, None), ("size", lo, 32, 1024),
                                  ("max_size", hi, lo, 1024), ("max_objects", max_objects, 1, 32)):  # fmt: skip
        check_range(value, f"fashion-scenes: {key}", low, high, integer=True)
    check_range(seed, "fashion-scenes: seed", 0, 2**63 - 1, integer=True)
    if (n + val) * hi * hi > memory_limit():
        raise ConfigError(f"fashion-scenes: {n + val} images of up to {hi}x{hi} do not fit in memory; ask for fewer.")
    try:
        root = formats.fashion_mnist_dir(folder)
    except DataError as e:  # its advice names fashion-mnist:DIR; here the folder is given as fashion-scenes:DIR
        raise DataError(str(e).replace("fashion-mnist:DIR", "fashion-scenes:DIR")) from None
    opts = {"n": n, "val": val, "seed": seed, "min_size": lo, "max_size": hi, "max_objects": max_objects}
    stamp = sorted((p.name, p.stat().st_size) for p in root.iterdir() if "idx" in p.name)
    key = json.dumps({"version": SCENES_VERSION, "root": str(root.resolve()), "files": stamp, **opts}, sort_keys=True)
    cache = presso_home() / "cache" / f"fashion-scenes-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    arrays = _read_cache(cache)
    if arrays is None:
        train_items, test_items, _ = formats.read_idx_dir(root, classes=formats.FASHION_MNIST_CLASSES)
        if test_items is None:
            raise DataError(f"'{root}' lacks Fashion-MNIST's test files (t10k-*), which the held-out scenes use.")
        rng = np.random.default_rng([seed, SCENES_VERSION])
        arrays = {
            **_scenes(rng, train_items.images[..., 0], train_items.labels, n, lo, hi, max_objects, "train"),
            **_scenes(rng, test_items.images[..., 0], test_items.labels, val, lo, hi, max_objects, "val"),
        }
        _write_cache(cache, arrays)
    classes = list(formats.FASHION_MNIST_CLASSES)
    train, held_out = (_unpack(arrays, part, classes, f"fashion-scenes {part}") for part in ("train", "val"))
    return train, held_out, classes


def _scenes(rng, items: np.ndarray, item_labels, n: int, lo: int, hi: int, max_objects: int, part: str) -> dict:
    from PIL import Image

    canvases, boxes, labels, counts = [], [], [], []
    for _ in range(n):
        side = int(rng.integers(lo, hi + 1))
        canvas = np.zeros((side, side), dtype=np.uint8)
        placed: list[list[float]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(rng.integers(len(items)))
            d = int(round(28 * rng.uniform(0.8, 2.0)))
            item = np.asarray(Image.fromarray(items[k]).resize((d, d), Image.BILINEAR))
            box = _tight(item > 0)
            if box is None:  # a blank item: nothing to detect
                continue
            x1, y1, x2, y2 = (int(v) for v in box)
            crop = item[y1:y2, x1:x2]
            spot = _free_spot(rng, placed, x2 - x1, y2 - y1, side, side)
            if spot is None:
                continue
            x, y = int(spot[0]), int(spot[1])
            region = canvas[y : y + crop.shape[0], x : x + crop.shape[1]]
            np.maximum(region, crop, out=region)
            placed.append([float(x), float(y), float(x + crop.shape[1]), float(y + crop.shape[0])])
            labels.append(int(item_labels[k]))
        canvases.append(canvas)
        boxes += placed
        counts.append(len(placed))
    shapes = np.asarray([c.shape for c in canvases], dtype=np.int64)
    return {
        f"{part}_pixels": np.concatenate([c.reshape(-1) for c in canvases]),
        f"{part}_shapes": shapes,
        f"{part}_boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        f"{part}_labels": np.asarray(labels, dtype=np.int64),
        f"{part}_counts": np.asarray(counts, dtype=np.int64),
    }


def _unpack(arrays: dict, part: str, classes: list[str], where: str) -> DetectionImages:
    shapes, counts = arrays[f"{part}_shapes"], arrays[f"{part}_counts"]
    pixels, boxes, labels = arrays[f"{part}_pixels"], arrays[f"{part}_boxes"], arrays[f"{part}_labels"]
    ends = np.cumsum(counts)
    spans = zip(counts.tolist(), ends.tolist(), strict=True)
    targets = [{"boxes": boxes[e - c : e], "labels": labels[e - c : e]} for c, e in spans]
    if len({tuple(s) for s in shapes.tolist()}) == 1:
        images: Any = pixels.reshape(len(shapes), *shapes[0], 1)
    else:
        offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])])
        parts = zip(offsets[:-1], offsets[1:], shapes.tolist(), strict=True)
        images = [pixels[a:b].reshape(h, w, 1) for a, b, (h, w) in parts]
    return DetectionImages(targets, classes, images=images, where=where)


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (a damaged cache is regenerated, never trusted)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        for part in ("train", "val"):
            shapes, counts = arrays[f"{part}_shapes"], arrays[f"{part}_counts"]
            ok = (
                arrays[f"{part}_pixels"].dtype == np.uint8
                and int((shapes[:, 0] * shapes[:, 1]).sum()) == arrays[f"{part}_pixels"].size
                and len(counts) == len(shapes)
                and int(counts.sum()) == len(arrays[f"{part}_boxes"]) == len(arrays[f"{part}_labels"])
            )
            if not ok:
                return None
        return arrays
    except (OSError, KeyError, ValueError, IndexError, EOFError):
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically (a temporary file renamed into place): a concurrent reader sees the old file or the whole new one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:  # a cache: an unwritable PRESSO_HOME costs the next load a regeneration, nothing more
        warnings.warn(f"Could not cache fashion-scenes in '{path.parent}': {e.strerror or e}.", stacklevel=3)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
