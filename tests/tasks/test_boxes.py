"""Decoding a YOLO-style dense output into boxes: filtering, class-aware NMS, torch and NumPy versions agreeing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from presso.convert.predict import decode_dense_numpy, nms_numpy
from presso.errors import ConfigError
from presso.tasks.boxes import box_iou, decode_dense, xywh_to_xyxy, xyxy_to_xywh

PREDICT = Path(__file__).resolve().parents[2] / "src" / "presso" / "convert" / "predict.py"


def dense(anchors: list[tuple[float, float, float, float, list[float]]]) -> torch.Tensor:
    """One image's dense output [1, 4 + classes, anchors] from (cx, cy, w, h, class probabilities) rows."""
    return torch.tensor([[*a[:4], *a[4]] for a in anchors], dtype=torch.float32).T[None]


def test_box_conversions_and_iou():
    xywh = torch.tensor([[5.0, 6.0, 4.0, 2.0]])
    assert xywh_to_xyxy(xywh).tolist() == [[3.0, 5.0, 7.0, 7.0]]
    assert xyxy_to_xywh(xywh_to_xyxy(xywh)).tolist() == xywh.tolist()
    a, b = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[2.5, 0, 12.5, 10], [20, 20, 30, 30]])
    assert box_iou(a, b).tolist() == [[pytest.approx(0.6), 0.0]]  # 75 / 125


def test_decode_filters_suppresses_per_class_and_sorts():
    y = dense([
        (10, 10, 10, 10, [0.9, 0.1]),  # class 0, kept
        (11, 10, 10, 10, [0.8, 0.1]),  # class 0, IoU 9/11 with the first: suppressed
        (11, 10, 10, 10, [0.1, 0.7]),  # same place, class 1: kept (NMS is per class)
        (40, 40, 6, 8, [0.25, 0.2]),  # best score == conf: not over it, dropped
        (40, 40, 6, 8, [0.3, 0.6]),  # class 1 elsewhere, kept
    ])  # fmt: skip
    (out,) = decode_dense(y, conf=0.25, iou=0.7)
    assert out["labels"].dtype == torch.int64
    assert out["labels"].tolist() == [0, 1, 1]
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.7, 0.6]))
    assert out["boxes"].tolist() == [[5, 5, 15, 15], [6, 5, 16, 15], [37, 36, 43, 44]]
    # over the two class-0 boxes' IoU (9/11) the threshold suppresses neither
    assert decode_dense(y, conf=0.25, iou=0.85)[0]["labels"].tolist() == [0, 0, 1, 1]
    assert decode_dense(y, conf=0.25, iou=0.7, max_det=2)[0]["labels"].tolist() == [0, 1]
    # max_nms caps the candidates before NMS: only the 2 best (0.9 and 0.8, overlapping) enter, one survives
    assert decode_dense(y, conf=0.25, iou=0.7, max_nms=2)[0]["scores"].tolist() == pytest.approx([0.9])


def test_negative_coordinates_do_not_leak_across_classes():
    # torchvision's offset trick shifts class 1 by (largest coordinate + 1) = 11: this class-1 box at -11..-1 would
    # land exactly on the class-0 box at 0..10 and suppress it, were the boxes not moved to >= 0 first
    y = dense([(-6, -6, 10, 10, [0.0, 0.9]), (5, 5, 10, 10, [0.8, 0.0])])
    (out,) = decode_dense(y, conf=0.25, iou=0.5)
    assert out["labels"].tolist() == [1, 0]
    (ref,) = decode_dense_numpy(y.numpy(), conf=0.25, iou=0.5)
    assert ref["labels"].tolist() == [1, 0]


def test_decode_empty_and_batch():
    y = torch.zeros(3, 6, 50)  # nothing scores over conf
    out = decode_dense(y, conf=0.25)
    assert len(out) == 3
    assert all(o["boxes"].shape == (0, 4) and o["scores"].shape == (0,) and o["labels"].shape == (0,) for o in out)
    half = decode_dense(torch.rand(2, 7, 30, dtype=torch.float16) * 50, conf=0.5)  # AMP output decodes in float32
    assert all(o["boxes"].dtype == torch.float32 for o in half)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(y=torch.zeros(2, 4, 10)), r"\[batch, 4 \+ classes, anchors\]"),
        (dict(y=torch.zeros(6, 10)), r"\[batch, 4 \+ classes, anchors\]"),
        (dict(y=torch.zeros(1, 6, 10), conf=1.5), "confidence threshold"),
        (dict(y=torch.zeros(1, 6, 10), iou=-0.1), "IoU threshold"),
        (dict(y=torch.zeros(1, 6, 10), max_det=0), "max_det"),
    ],
)
def test_decode_refuses_bad_input(bad, match):
    y = bad.pop("y")
    with pytest.raises(ConfigError, match=match):
        decode_dense(y, **bad)


def test_nms_numpy_by_hand():
    boxes = np.array([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # box 1 overlaps box 0 at IoU exactly 0.6: suppressed only when the threshold is under 0.6
    assert nms_numpy(boxes, scores, 0.6).tolist() == [0, 1, 3]
    assert nms_numpy(boxes, scores, 0.59).tolist() == [0, 3]
    # class-aware: box 2 (identical to box 0) survives when it is another class
    assert nms_numpy(boxes, scores, 0.5, labels=[0, 0, 1, 0]).tolist() == [0, 2, 3]
    assert nms_numpy(boxes, scores, 0.5, labels=[0, 0, 1, 0], max_det=2).tolist() == [0, 2]
    # equal scores: the lower index first
    assert nms_numpy(boxes, np.ones(4), 0.5).tolist() == [0, 3]
    empty = nms_numpy(np.zeros((0, 4)), np.zeros(0), 0.5, labels=np.zeros(0))
    assert empty.dtype == np.int64 and empty.shape == (0,)


def random_dense(seed: int, n: int, classes: int, anchors: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.empty((n, 4 + classes, anchors), dtype=np.float32)
    y[:, 0:2] = rng.uniform(-10, 74, (n, 2, anchors))  # centres, some past the image's edges
    y[:, 2:4] = rng.uniform(2, 30, (n, 2, anchors))
    y[:, 4:] = rng.uniform(0, 1, (n, classes, anchors)) ** 2
    if kind == "empty":  # every score under 0.5
        y[:, 4:] *= 0.49
    if kind == "ties":  # coarse scores (many equal, also between classes of one anchor) and exact duplicate boxes
        y[:, 4:] = np.round(y[:, 4:] * 10) / 10
        y[:, :, anchors // 2 :] = y[:, :, : anchors - anchors // 2]
    return y


def canonical(d: dict) -> np.ndarray:
    """One row (x1, y1, x2, y2, score, label) per box, sorted: the set of boxes, whatever their order."""
    rows = np.concatenate(
        [np.asarray(d["boxes"], np.float64), np.asarray(d["scores"], np.float64)[:, None],
         np.asarray(d["labels"], np.float64)[:, None]], axis=1,
    )  # fmt: skip
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize(
    "seed, classes, anchors, kind, conf, iou, max_det",
    [
        (0, 3, 200, "plain", 0.25, 0.7, 300),
        (1, 3, 200, "ties", 0.25, 0.7, 300),
        (2, 1, 300, "ties", 0.001, 0.5, 300),
        (3, 5, 400, "plain", 0.1, 0.3, 20),
        (4, 80, 120, "ties", 0.05, 0.7, 300),
        (5, 2, 3000, "plain", 0.001, 0.7, 300),  # > 1000 candidates: torchvision's per-class path
        (6, 3, 100, "empty", 0.5, 0.7, 300),  # nothing over conf
    ],
)
def test_numpy_and_torch_decoders_agree(seed, classes, anchors, kind, conf, iou, max_det):
    y = random_dense(seed, 2, classes, anchors, kind)
    theirs = decode_dense(torch.from_numpy(y), conf=conf, iou=iou, max_det=max_det)
    ours = decode_dense_numpy(y, conf=conf, iou=iou, max_det=max_det)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(theirs, ours, strict=True):
        assert len(a["scores"]) == len(b["scores"]) <= max_det
        np.testing.assert_allclose(canonical(a), canonical(b), rtol=0, atol=1e-5)
        assert np.all(np.diff(b["scores"]) <= 0) and np.all(np.diff(a["scores"].numpy()) <= 0)  # best first
        assert b["labels"].dtype == np.int64
    if kind == "empty":
        assert all(len(o["scores"]) == 0 for o in ours)
    else:
        assert all(len(o["scores"]) > 0 for o in ours)


def test_numpy_decoder_runs_without_torch():
    # predict.py travels alone in a bundle: its detection helpers must not need torch (nor presso)
    code = (
        "import sys, importlib.util, numpy as np; sys.modules['torch'] = None; sys.modules['presso'] = None\n"
        f"spec = importlib.util.spec_from_file_location('predict', {str(PREDICT)!r})\n"
        "m = sys.modules['predict'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "y = np.zeros((1, 6, 3), np.float32); y[0, :4] = 10; y[0, 4] = [0.9, 0.8, 0.1]\n"
        "(d,) = m.decode_dense_numpy(y); print(d['boxes'].tolist(), d['scores'].tolist(), d['labels'].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[[5.0, 5.0, 15.0, 15.0]] [0.8999999761581421] [0]"
    with pytest.raises(ConfigError, match="anchors"):
        decode_dense_numpy(np.zeros((4, 10)))
