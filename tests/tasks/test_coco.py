"""COCO mAP: known cases worked out by hand, and random cases against an independent single-class AP written here."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from presso.errors import ConfigError
from presso.tasks.coco import coco_map

pytest.importorskip("faster_coco_eval")

THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's IoU thresholds
RECALLS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points


def pred(boxes, scores, labels=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels)
    return {"boxes": boxes, "scores": np.asarray(scores, dtype=np.float64), "labels": labels}


def target(boxes, labels=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return {"boxes": boxes, "labels": np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels)}


# ----------------------------------------------------------------------------- an independent reference
def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_ap(gts: list[np.ndarray], dets: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> float:
    """One class's AP at one IoU threshold, COCO's way: per image, detections best first (at most 100) each take the
    unmatched ground truth they overlap most (IoU >= threshold); then precision over all images by score, made
    non-increasing from the right, read at 101 recall points (0 past the highest recall reached)."""
    found = []  # (score, is a true positive)
    for g, (boxes, scores) in zip(gts, dets, strict=True):
        taken: set[int] = set()
        for j in np.argsort(-scores, kind="stable")[:100]:
            best, best_iou = -1, min(threshold, 1 - 1e-10)
            for k in range(len(g)):
                if k not in taken and (v := iou(boxes[j], g[k])) >= best_iou:
                    best, best_iou = k, v
            if best >= 0:
                taken.add(best)
            found.append((scores[j], best >= 0))
    n_gt = sum(len(g) for g in gts)
    found.sort(key=lambda f: -f[0])
    tp = np.cumsum([f[1] for f in found])
    fp = np.cumsum([not f[1] for f in found])
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1)
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    at = np.searchsorted(recall, RECALLS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))


def reference_map(gts, dets) -> tuple[float, float]:
    aps = [reference_ap(gts, dets, t) for t in THRESHOLDS]
    return float(np.mean(aps)), aps[0]


# ----------------------------------------------------------------------------- cases worked out by hand
def test_perfect_predictions_score_one():
    targets = [
        target([[0, 0, 10, 10], [20, 20, 50, 40]], [0, 1]),
        target([]),  # an image with nothing in it
        target([[5, 5, 30, 25]], [1]),
    ]
    preds = [pred(t["boxes"], np.linspace(0.9, 0.5, len(t["boxes"])), t["labels"]) for t in targets]
    m = coco_map(preds, targets, ["cat", "dog"])
    assert m == {
        "map50_95": 1.0,
        "map50": 1.0,
        "per_class": {"cat": 1.0, "dog": 1.0},
        "images": 3,
        "boxes": 3,
        "detections": 3,
    }


def test_iou_of_exactly_0_6_counts_at_three_of_ten_thresholds():
    gt, box = [0, 0, 10, 10], [2.5, 0, 12.5, 10]  # shifted by 2.5: overlap 75, union 125
    assert iou(gt, box) == 0.6
    m = coco_map([pred([box], [0.9])], [target([gt])], ["a"])
    # a match at IoU 0.50, 0.55 and 0.60 (IoU >= threshold) gives AP 1 there, 0 at the 7 thresholds above
    assert m["map50"] == 1.0
    assert m["map50_95"] == 0.3 == reference_map([np.array([gt])], [(np.array([box]), np.array([0.9]))])[0]


def test_a_false_positive_ranked_first_halves_ap():
    # one object; a false positive scored 0.9 comes before the true positive at 0.8. Precision after each: 0/1, then
    # 1/2 at recall 1; made non-increasing from the right it is 0.5 at all 101 recall points: AP = 0.5
    m = coco_map([pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8])], [target([[0, 0, 10, 10]])], ["a"])
    assert m["map50"] == m["map50_95"] == 0.5
    # the same false positive scored below the true positive costs nothing: recall 1 is reached at precision 1
    m = coco_map([pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.7, 0.8])], [target([[0, 0, 10, 10]])], ["a"])
    assert m["map50_95"] == 1.0


def test_a_false_positive_between_two_true_positives():
    # two objects; TP 0.9, FP 0.8, TP 0.7: (recall, precision) = (.5, 1), (.5, .5), (1, 2/3). Interpolated: 1 at the
    # 51 recall points 0.00..0.50, 2/3 at the 50 points 0.51..1.00
    gts = [[0, 0, 10, 10], [20, 20, 30, 30]]
    m = coco_map([pred([gts[0], [50, 50, 60, 60], gts[1]], [0.9, 0.8, 0.7])], [target(gts)], ["a"])
    by_hand = (51 * 1.0 + 50 * 2 / 3) / 101
    assert m["map50_95"] == m["map50"] == round(by_hand, 5) == 0.83498


def test_a_false_positive_on_an_image_without_objects_counts():
    preds = [pred([[0, 0, 10, 10]], [0.8]), pred([[0, 0, 10, 10]], [0.9])]
    m = coco_map(preds, [target([[0, 0, 10, 10]]), target([])], ["a"])
    assert m["map50_95"] == 0.5 and m["images"] == 2 and m["boxes"] == 1 and m["detections"] == 2


def test_a_class_without_ground_truth_is_none_and_left_out_of_the_mean():
    targets = [target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 2])]
    # class 0 found; class 1 has no object (its detection is ignored, not a false positive); class 2 missed
    preds = [pred([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.9], [0, 1])]
    m = coco_map(preds, targets, ["a", "b", "c"])
    assert m["per_class"] == {"a": 1.0, "b": None, "c": 0.0}
    assert m["map50_95"] == m["map50"] == 0.5


def test_no_predictions_score_zero():
    targets = [target([[0, 0, 10, 10]]), target([[1, 1, 5, 5]])]
    empty = [pred(np.zeros((0, 4)), [])] * 2
    assert coco_map(empty, targets, ["a"]) == {
        "map50_95": 0.0,
        "map50": 0.0,
        "per_class": {"a": 0.0},
        "images": 2,
        "boxes": 2,
        "detections": 0,
    }
    # nothing to find at all: still a number, every class None
    m = coco_map([pred([[0, 0, 1, 1]], [0.5])], [target([])], ["a", "b"])
    assert m["map50_95"] == 0.0 and m["per_class"] == {"a": None, "b": None}
    assert coco_map([], [], ["a"])["images"] == 0


def test_torch_tensors_are_accepted_and_nothing_is_printed(capfd):
    p = {"boxes": torch.tensor([[2.5, 0, 12.5, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    t = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0]), "image_id": 7}
    assert coco_map([p], [t], ["a"])["map50_95"] == 0.3
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ----------------------------------------------------------------------------- against the reference
def random_case(seed: int):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(int(rng.integers(3, 7))):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (n, 2))
        g = np.concatenate([xy, xy + rng.uniform(8, 40, (n, 2))], axis=1)
        # detections: most objects found with some jitter (various IoUs), plus false positives anywhere
        hit = g[rng.uniform(size=n) < 0.8]
        found = hit + rng.normal(0, 1.5, hit.shape)
        found[:, 2:] = np.maximum(found[:, 2:], found[:, :2] + 1)
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 100, (m, 2))
        boxes = np.concatenate([found, np.concatenate([xy, xy + rng.uniform(5, 30, (m, 2))], axis=1)])
        gts.append(g)
        dets.append((boxes, rng.uniform(0.05, 1, len(boxes))))
    return gts, dets


@pytest.mark.parametrize("seed", range(8))
def test_matches_an_independent_reference(seed):
    gts, dets = random_case(seed)
    m = coco_map([pred(b, s) for b, s in dets], [target(g) for g in gts], ["a"])
    map50_95, map50 = reference_map(gts, dets)
    assert 0 < map50_95 < map50 < 1  # a case that exercises partial matches
    assert m["map50_95"] == pytest.approx(map50_95, abs=6e-6)
    assert m["map50"] == pytest.approx(map50, abs=6e-6)
    assert m["boxes"] == sum(len(g) for g in gts) and m["detections"] == sum(len(b) for b, _ in dets)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "preds, targets, classes, match",
    [
        ([], [target([[0, 0, 1, 1]])], ["a"], "0 predictions for 1 images"),
        ([pred([[0, 0, np.nan, 1]], [0.5])], [target([[0, 0, 1, 1]])], ["a"], "prediction for image 0 has a NaN"),
        ([pred([[0, 0, 1, 1]], [np.nan])], [target([[0, 0, 1, 1]])], ["a"], "NaN"),
        ([pred([], [])], [target([[0, 0, np.inf, 1]])], ["a"], "target of image 0 has a NaN or infinite"),
        ([pred([[0, 0, 1, 1]], [0.5], [3])], [target([[0, 0, 1, 1]])], ["a"], "label 3, not a class id in 0..0"),
        ([pred([], [])], [target([[5, 0, 1, 1]])], ["a"], "x2 < x1"),
        ([pred([[0, 0, 1, 1]], [0.5, 0.4])], [target([])], ["a"], "1 boxes but 1 labels and 2 scores"),
        ([{"boxes": np.zeros((1, 4))}], [target([])], ["a"], "prediction for image 0 must be a dict with"),
        ([pred([], [])], [target([])], [], "class names"),
        ([pred([], [])], [target([])], ["a", "a"], "distinct class names"),
    ],
)
def test_refuses_bad_input_with_one_clear_line(preds, targets, classes, match):
    with pytest.raises(ConfigError, match=match) as e:
        coco_map(preds, targets, classes)
    assert "\n" not in str(e.value)


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(ConfigError, match="pip install faster-coco-eval"):
        coco_map([pred([[0, 0, 1, 1]], [0.5])], [target([[0, 0, 1, 1]])], ["a"])
