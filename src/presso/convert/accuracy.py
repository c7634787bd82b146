"""FP32 vs converted accuracy on labelled held-out images, by the model's task.

- ``classify``: top-1 of the class scores (``fp32_top1``, ``converted_top1``, ``top1_change``);
- ``detect``: COCO mAP50-95 and mAP50 of the dense YOLO-style output ``[N, 4 + classes, anchors]``, decoded as
  validation does (``presso.tasks.boxes.decode_dense``, conf 0.001, IoU 0.7) and scored by
  ``presso.tasks.coco.coco_map`` against the boxes scaled to the model's input size.

Both models see the same images, normalised as the card's preprocessing says, in batches the exported file accepts
(a fixed batch is padded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from presso.errors import ConfigError, ConversionError

__all__ = ["Scorer", "compare_accuracy", "held_out", "run_batched", "task_kind"]

Runner = Callable[[tuple], list[np.ndarray]]
READ_BATCH = 256  # images decoded and normalised at a time
# the decoding COCO validation uses: every box over a low confidence, YOLO's NMS IoU
VAL_CONF, VAL_IOU = 0.001, 0.7


def task_kind(model: Any, bundle: Any) -> str:
    """``detect`` or ``classify``: how to score ``model`` on the labelled ``bundle`` -- the model's task (its card,
    else its class: ``presso.tasks.infer_task``), which the data must match. A user's own task (``file.py:Class`` on
    the card) is scored by its data's kind."""
    from presso.models.card import get_card
    from presso.tasks import infer_task

    kind = getattr(bundle, "task", "classify")
    recorded = getattr(get_card(model), "task", None)
    if recorded and recorded not in ("classify", "detect"):
        return kind
    task = infer_task(model).name
    if kind != task:
        what = {"detect": "boxes", "classify": "class labels"}
        raise ConfigError(
            f"The model is a {task} model but the labelled data '{bundle.name}' holds {what.get(kind, kind)}; give "
            f"--eval-data with {what[task]} (or --eval-samples 0 to only calibrate on it)."
        )
    return task


def held_out(bundle: Any, n: int) -> np.ndarray:
    """Indices of up to ``n`` held-out images spread evenly over the split."""
    return np.unique(np.linspace(0, len(bundle.val) - 1, num=min(n, len(bundle.val))).astype(int))


def run_batched(run: Runner, x: torch.Tensor, batch: int | None) -> np.ndarray:
    """The first output of ``run`` over ``x`` in chunks of ``batch`` (the exported file's fixed batch, the last
    chunk padded with zeros; None: dynamic, 32 at a time)."""
    step, outs = batch or 32, []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        if batch and len(chunk) < batch:
            chunk = torch.cat([chunk, chunk.new_zeros((batch - len(chunk), *chunk.shape[1:]))])
        outs.append(np.asarray(run((chunk,))[0])[: min(step, len(x) - i)])
    return np.concatenate(outs)


class Scorer:
    """Scores exported models on up to ``n`` held-out images of the labelled ``bundle`` by the task's metric
    (``kind``: ``classify`` -> top-1, ``detect`` -> COCO mAP50-95 and mAP50), the images normalised by ``pp`` and
    run in batches the file accepts (``batch``; None: dynamic). The images are read again for each model (no copy
    of a large validation set is kept in memory)."""

    def __init__(self, kind: str, bundle: Any, pp: Any, n: int, batch: int | None) -> None:
        self.kind, self.bundle, self.pp, self.batch = kind, bundle, pp, batch
        self.indices = held_out(bundle, n)
        self.headline = "map50_95" if kind == "detect" else "top1"

    def _runs(self, runners: dict[str, Runner]) -> tuple[dict[str, list], list]:
        from presso.data import batches

        dataset = self.bundle.val.at(self.pp.size, self.pp.channels)
        runs: dict[str, list] = {k: [] for k in runners}
        targets: list = []
        for x, y in batches(dataset, self.indices, READ_BATCH):
            xs = self.pp.normalize(x)
            for name, run in runners.items():
                out = run_batched(run, xs, self.batch)
                runs[name].append(out.argmax(axis=1) if self.kind == "classify" else _decode(out, self.classes))
            targets += [y] if self.kind == "classify" else [{"boxes": t["boxes"], "labels": t["labels"]} for t in y]
        return runs, targets

    @property
    def classes(self) -> int:
        return len(self.bundle.classes)

    def metrics(self, runners: dict[str, Runner]) -> dict[str, dict[str, float]]:
        """Each runner's metrics: ``{"top1"}`` or ``{"map50_95", "map50"}``; plus ``"_n"``, the images scored."""
        runs, targets = self._runs(runners)
        if self.kind == "detect":
            from presso.tasks.coco import coco_map

            classes = list(self.bundle.classes)
            out = {k: coco_map([p for part in v for p in part], targets, classes) for k, v in runs.items()}
            return {k: {"map50_95": m["map50_95"], "map50": m["map50"], "_n": len(targets)} for k, m in out.items()}
        labels = torch.cat(targets).numpy() if targets else np.zeros(0, dtype=np.int64)
        return {k: {"top1": float((np.concatenate(v) == labels).mean()) if len(labels) else 0.0, "_n": len(labels)}
                for k, v in runs.items()}  # fmt: skip

    def score(self, run: Runner) -> float:
        """The headline metric (top-1, mAP50-95) of one model."""
        return float(self.metrics({"m": run})["m"][self.headline])

    def compare(self, fp32: Runner, converted: Runner) -> dict[str, Any]:
        """FP32 vs converted, as ``ConvertResult.accuracy`` reports it."""
        m = self.metrics({"fp32": fp32, "converted": converted})
        f, c = m["fp32"], m["converted"]
        if self.kind == "detect":
            return {
                "metric": "map50_95",
                "data": self.bundle.name,
                "n": f["_n"],
                "samples": f["_n"],
                "fp32_map50_95": f["map50_95"],
                "converted_map50_95": c["map50_95"],
                "map50_95_change": round(c["map50_95"] - f["map50_95"], 5),
                "fp32_map50": f["map50"],
                "converted_map50": c["map50"],
            }
        return {
            "data": self.bundle.name,
            "samples": f["_n"],
            "fp32_top1": round(f["top1"], 4),
            "converted_top1": round(c["top1"], 4),
            "top1_change": round(c["top1"] - f["top1"], 4),
        }


def compare_accuracy(
    kind: str, fp32: Runner, converted: Runner, bundle: Any, pp: Any, n: int, batch: int | None
) -> dict[str, Any]:
    """FP32 vs converted on up to ``n`` held-out images of ``bundle`` (``kind``: ``classify`` | ``detect``)."""
    return Scorer(kind, bundle, pp, n, batch).compare(fp32, converted)


def _decode(out: np.ndarray, classes: int) -> list[dict[str, Any]]:
    from presso.tasks.boxes import decode_dense

    if out.ndim != 3 or out.shape[1] != 4 + classes:
        raise ConversionError(
            f"The model outputs {list(out.shape)}, not the dense detections [batch, 4 + {classes} classes, anchors] "
            "a detector's mAP is computed from; give --eval-samples 0 to skip the accuracy step."
        )
    preds = decode_dense(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), conf=VAL_CONF, iou=VAL_IOU)
    return [{k: v.numpy() for k, v in p.items()} for p in preds]
