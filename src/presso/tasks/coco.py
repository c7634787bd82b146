"""COCO mAP of box predictions against ground truth, with faster-coco-eval (the standard COCO protocol, in C++).

Everything is built in memory -- no annotation files: image ids are the list index, category ids the class index +
1, every ground-truth box is a non-crowd object whose area is its box area. The evaluation is COCO's bbox one as
published: IoU thresholds 0.50:0.05:0.95, 101 recall points, at most 100 detections per image and class, every area.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from presso.errors import ConfigError

__all__ = ["coco_map"]

DIGITS = 5


def _array(value: Any, what: str) -> np.ndarray:
    """A numpy copy of an array or a tensor (on any device)."""
    if hasattr(value, "detach"):  # a torch tensor; duck-typed so this module does not need torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} is not an array of numbers ({e}).") from None


def _boxes(entry: Any, where: str, n_classes: int, scored: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes [K, 4], labels [K], scores [K])`` of one image's dict, checked (scores are ones for ground truth)."""
    need = ("boxes", "labels", "scores") if scored else ("boxes", "labels")
    if not isinstance(entry, dict) or any(k not in entry for k in need):
        raise ConfigError(f"The {where} must be a dict with {', '.join(repr(k) for k in need)}, not {entry!r:.80}.")
    boxes = _array(entry["boxes"], f"The {where}'s 'boxes'")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ConfigError(f"The {where}'s 'boxes' must be [K, 4] (x1, y1, x2, y2), not {list(boxes.shape)}.")
    labels = _array(entry["labels"], f"The {where}'s 'labels'").reshape(-1)
    scores = _array(entry["scores"], f"The {where}'s 'scores'").reshape(-1) if scored else np.ones(len(boxes))
    if len(labels) != len(boxes) or len(scores) != len(boxes):
        raise ConfigError(
            f"The {where} has {len(boxes)} boxes but {len(labels)} labels"
            + (f" and {len(scores)} scores" if scored else "")
            + "; give one of each per box."
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ConfigError(f"The {where} has a NaN or infinite box or score; the model or the data gave it.")
    bad = (labels != np.round(labels)) | (labels < 0) | (labels >= n_classes)
    if bad.any():
        raise ConfigError(
            f"The {where} has label {labels[bad][0]:g}, not a class id in 0..{n_classes - 1} ({n_classes} classes)."
        )
    if not scored and ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ConfigError(f"The {where} has a box whose x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2).")
    return boxes, labels.astype(np.int64), scores


def _coco_boxes(boxes: np.ndarray) -> np.ndarray:
    """xyxy -> COCO's [x, y, width, height]; a predicted box turned inside out counts as empty (it matches nothing)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clip(0)
    return np.concatenate([boxes[:, :2], wh], axis=1)


def coco_map(predictions: list[dict[str, Any]], targets: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """COCO mAP of ``predictions`` against ``targets`` (one dict per image, in the same order).

    A prediction is ``{"boxes": [K, 4] xyxy pixels, "scores": [K], "labels": [K]}``, a target ``{"boxes",
    "labels"}``; numpy arrays or torch tensors. Returns ``{"map50_95", "map50", "per_class": {name: AP50-95 or None
    when the class has no ground-truth box (it is then left out of the means)}, "images", "boxes" (ground truth),
    "detections"}``, rounded to 5 decimals. No predictions score 0.0; with no ground truth at all, 0.0 too. Prints
    nothing.
    """
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"coco_map needs the class names as a non-empty list of strings, not {classes!r:.80}.")
    if len(set(classes)) != len(classes):
        raise ConfigError("coco_map needs distinct class names; two classes share a name.")
    if len(predictions) != len(targets):
        raise ConfigError(
            f"coco_map got {len(predictions)} predictions for {len(targets)} images; give one prediction dict per "
            "image, in the targets' order."
        )
    n = len(classes)
    gts = [_boxes(t, f"target of image {i}", n, scored=False) for i, t in enumerate(targets)]
    dts = [_boxes(p, f"prediction for image {i}", n, scored=True) for i, p in enumerate(predictions)]
    n_boxes, n_dets = sum(len(g[0]) for g in gts), sum(len(d[0]) for d in dts)
    result: dict[str, Any] = {
        "map50_95": 0.0,
        "map50": 0.0,
        "per_class": {c: None for c in classes},
        "images": len(targets),
        "boxes": n_boxes,
        "detections": n_dets,
    }
    if n_boxes == 0:  # nothing to find: COCO's AP is undefined (-1); 0.0 keeps the result a number
        return result
    precision = _evaluate(gts, dts, classes)
    # precision [iou thresholds, 101 recall points, classes] at area "all", 100 detections; -1 where no ground truth
    aps = [None if (precision[:, :, k] < 0).all() else float(precision[:, :, k].mean()) for k in range(n)]
    ap50s = [None if ap is None else float(precision[0, :, k].mean()) for k, ap in enumerate(aps)]
    present = [ap for ap in aps if ap is not None]
    result["map50_95"] = round(float(np.mean(present)), DIGITS)
    result["map50"] = round(float(np.mean([ap for ap in ap50s if ap is not None])), DIGITS)
    result["per_class"] = {c: None if ap is None else round(ap, DIGITS) for c, ap in zip(classes, aps, strict=True)}
    return result


def _evaluate(gts: list[tuple], dts: list[tuple], classes: list[str]) -> np.ndarray:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise ConfigError("Detection metrics need the package faster-coco-eval: pip install faster-coco-eval") from None

    def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    images = [{"id": i} for i in range(len(gts))]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    annotations = []
    for i, (boxes, labels, _) in enumerate(gts):
        for box, label in zip(_coco_boxes(boxes).tolist(), labels.tolist(), strict=True):
            # ids from 1: the library reads annotation id 0 as "unmatched"
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i, "category_id": label + 1, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
    detections = [
        {"image_id": i, "category_id": label + 1, "bbox": box, "score": score}
        for i, (boxes, labels, scores) in enumerate(dts)
        for box, label, score in zip(_coco_boxes(boxes).tolist(), labels.tolist(), scores.tolist(), strict=True)
    ]
    # the library reports through print_function (and may print): keep both quiet, this is a library call
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO({"images": images, "categories": categories, "annotations": annotations}, print_function=quiet)
        dt = gt.loadRes(detections)
        ev = COCOeval_faster(gt, dt, "bbox", print_function=quiet)
        ev.evaluate()
        ev.accumulate()
    p = ev.params
    area, last = p.areaRngLbl.index("all"), p.maxDets.index(100)
    return np.asarray(ev.eval["precision"])[:, :, :, area, last]
