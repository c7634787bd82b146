"""Built-in, offline datasets: ``digits`` (scikit-learn's 8x8 digits) and ``shapes`` (procedurally generated)."""

from __future__ import annotations

import math

import numpy as np

from presso.data.images import ArrayImages, memory_limit
from presso.errors import ConfigError, check_range

MAX_BUILTIN_SIZE = 1024  # generated sets are drawn at 4x this size first
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "hexagon", "crescent")


def digits(size: int = 32) -> tuple[ArrayImages, list[str]]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package), as RGB ``size`` x ``size``."""
    import torch
    from sklearn.datasets import load_digits

    if not isinstance(size, int) or not 1 <= size <= MAX_BUILTIN_SIZE:
        raise ConfigError(f"digits: size must be an integer in [1, {MAX_BUILTIN_SIZE}], not {size}.")
    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    return ArrayImages(x, d.target.astype(np.int64)), [str(k) for k in range(10)]


def shapes(n: int = 2000, size: int = 32, classes: int = 6, seed: int = 0, noise: float = 0.08):
    """``n`` RGB images of ``classes`` geometric shapes (circle, square, triangle, cross, ring, star, hexagon,
    crescent), balanced, seeded. Each varies in colour (shape and background, with a minimum contrast), position,
    scale and rotation, with a few distractor strokes and pixel noise, so a small CNN needs real training to
    separate ring from circle or hexagon from circle at low resolution."""
    from PIL import Image, ImageDraw

    for key, value in (("n", n), ("size", size), ("classes", classes)):
        check_range(value, f"shapes: {key}", 1, integer=True)
    check_range(seed, "shapes: seed", 0, 2**63 - 1, integer=True)
    check_range(noise, "shapes: noise", 0, 1)
    if not 2 <= classes <= len(SHAPES):
        raise ConfigError(f"shapes: classes must be in [2, {len(SHAPES)}], not {classes}.")
    if n < classes or size < 8:
        raise ConfigError(f"shapes: need n >= classes and size >= 8 (got n={n}, size={size}).")
    if size > MAX_BUILTIN_SIZE or n * size * size * 3 > memory_limit():
        raise ConfigError(
            f"shapes: n={n} images of {size}x{size} do not fit in memory (size at most {MAX_BUILTIN_SIZE}); "
            "ask for fewer or smaller images."
        )
    rng = np.random.default_rng(seed)
    s2 = size * 4  # draw large, then downsample: anti-aliased edges
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        bg = rng.integers(0, 256, 3)
        fg = _contrasting(rng, bg)
        im = Image.new("RGB", (s2, s2), tuple(int(v) for v in bg))
        draw = ImageDraw.Draw(im)
        for _ in range(rng.integers(0, 3)):  # distractor strokes
            pts = rng.uniform(0, s2, 4)
            col = tuple(int(v) for v in np.clip(bg + rng.integers(-60, 61, 3), 0, 255))
            draw.line([(pts[0], pts[1]), (pts[2], pts[3])], fill=col, width=int(s2 * 0.03) + 1)
        r = rng.uniform(0.22, 0.42) * s2
        cx, cy = rng.uniform(r, s2 - r, 2)
        _draw_shape(draw, SHAPES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), tuple(int(v) for v in fg), bg)
        small = np.asarray(im.resize((size, size), Image.BOX), dtype=np.float32)
        small += rng.normal(0, noise * 255, small.shape)
        out[i] = np.clip(small, 0, 255).astype(np.uint8)
    return ArrayImages(out, labels.astype(np.int64)), list(SHAPES[:classes])


def _contrasting(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    for _ in range(100):
        fg = rng.integers(0, 256, 3)
        if np.abs(fg.astype(int) - bg.astype(int)).sum() > 200:
            return fg
    return 255 - bg


def _polygon(cx: float, cy: float, r: float, k: int, rot: float, inner: float | None = None) -> list:
    pts = []
    steps = 2 * k if inner else k
    for j in range(steps):
        rr = r if (inner is None or j % 2 == 0) else r * inner
        a = rot + 2 * math.pi * j / steps
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw, name: str, cx: float, cy: float, r: float, rot: float, fg: tuple, bg) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "circle":
        draw.ellipse(box, fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(r * 0.35)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=fg)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fg)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fg)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fg)
    elif name == "cross":
        w = r * 0.32
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon(
                [
                    (cx - dx * r + px, cy - dy * r + py),
                    (cx + dx * r + px, cy + dy * r + py),
                    (cx + dx * r - px, cy + dy * r - py),
                    (cx - dx * r - px, cy - dy * r - py),
                ],
                fill=fg,
            )
    elif name == "crescent":
        draw.ellipse(box, fill=fg)
        off = r * 0.55
        ox, oy = cx + off * math.cos(rot), cy + off * math.sin(rot)
        draw.ellipse([ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85], fill=tuple(int(v) for v in bg))
