"""Boxes: conversions, IoU, and the decoding of a YOLO-style detector's dense output into boxes per image.

A detector in eval mode gives one dense tensor ``y [N, 4 + classes, anchors]``: rows 0..3 the box centre x, centre
y, width and height in input pixels, the other rows the class probabilities (already sigmoid). ``decode_dense``
turns it into one ``{"boxes", "scores", "labels"}`` dict per image the way common YOLO post-processing does, and
``presso.convert.predict.decode_dense_numpy`` does the same on a device without PyTorch (they are tested to agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

from presso.errors import ConfigError

__all__ = ["MAX_NMS", "box_iou", "decode_dense", "xywh_to_xyxy", "xyxy_to_xywh"]

MAX_NMS = 30000  # candidates per image that go into NMS, the best first (YOLO's cap: NMS is quadratic)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Boxes ``[..., 4]`` as centre x, centre y, width, height -> corners x1, y1, x2, y2."""
    from torchvision.ops import box_convert

    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """Boxes ``[..., 4]`` as corners x1, y1, x2, y2 -> centre x, centre y, width, height."""
    from torchvision.ops import box_convert

    return box_convert(boxes, "xyxy", "cxcywh")


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[A, B]`` of every box of ``a [A, 4]`` with every box of ``b [B, 4]`` (xyxy)."""
    from torchvision.ops import box_iou as iou

    return iou(a, b)


def _check(conf: float, iou: float, max_det: int, max_nms: int) -> None:
    if not 0 <= conf < 1:
        raise ConfigError(f"The detection confidence threshold must be in [0, 1), not {conf!r}.")
    if not 0 <= iou <= 1:
        raise ConfigError(f"The NMS IoU threshold must be in [0, 1], not {iou!r}.")
    for name, n in (("max_det", max_det), ("max_nms", max_nms)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{name} must be a whole number of boxes >= 1, not {n!r}.")


def decode_dense(
    y: Tensor, *, conf: float = 0.001, iou: float = 0.7, max_det: int = 300, max_nms: int = MAX_NMS
) -> list[dict[str, Tensor]]:
    """Per image of a dense output ``y [N, 4 + classes, anchors]``: ``{"boxes": xyxy [K, 4], "scores": [K],
    "labels": int64 [K]}``, the best first.

    Each anchor keeps its best class (the first on a tie) when its probability is over ``conf``; the ``max_nms``
    best of those go through class-aware NMS (a box goes when its IoU with a better box of its class is over
    ``iou``); the ``max_det`` best survivors are returned. Equal scores keep anchor order. The defaults are the
    ones YOLO validation uses (predicting uses ``conf=0.25``).
    """
    from torchvision.ops import batched_nms

    if not isinstance(y, Tensor) or y.ndim != 3 or y.shape[1] < 5:
        shape = list(y.shape) if hasattr(y, "shape") else type(y).__name__
        raise ConfigError(f"A dense detection output is a tensor [batch, 4 + classes, anchors], not {shape}.")
    _check(conf, iou, max_det, max_nms)
    out = []
    for p in y.detach().float().transpose(1, 2):  # [anchors, 4 + classes]
        scores, labels = p[:, 4:].max(1)
        idx = torch.nonzero(scores > conf).flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)[:max_nms]]
        boxes, scores, labels = xywh_to_xyxy(p[idx, :4]), scores[idx], labels[idx]
        # batched_nms keeps classes apart by shifting each by a multiple of the largest coordinate, which assumes
        # none is negative (a box past the top-left edge would reach into the next class): move them all >= 0
        shifted = boxes - boxes.min() if len(boxes) else boxes
        keep = batched_nms(shifted, scores, labels, iou)
        # candidates are sorted best first, so index order is score order with ties in anchor order
        keep = keep.sort().values[:max_det]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep].long()})
    return out
