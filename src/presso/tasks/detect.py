"""Object detection: boxes against boxes.

- **data**: COCO JSON, the Ultralytics YOLO layout, Pascal VOC, ``shapes-det`` and ``fashion-scenes``
  (``presso.data.detection``); inputs in 0..1 (mean 0, std 1), the convention of YOLO and of torchvision's
  detectors, which normalise inside;
- **augmentation**: flips and scale/translate that move the boxes with the pixels;
- **loss**: the detector's own (``tasks/detectors.py``: Ultralytics' loss, torchvision's train-mode losses);
- **metric**: COCO mAP50-95 (the headline), mAP50 and per-class AP by faster-coco-eval (``tasks/coco.py``);
- **postprocess**: class-aware NMS of the dense outputs (``tasks/boxes.py``; in NumPy in the bundle);
- **distill**: the dense head outputs before NMS (YOLO), backbone features and the teacher's boxes (torchvision);
- **calibration distance**: boxes and class scores of the dense outputs, weighted where the original sees objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from presso.errors import ConfigError, DataError
from presso.models.figures import set_mode
from presso.models.outputs import leaves, match_loss
from presso.tasks import register_task
from presso.tasks.base import Task
from presso.tasks.detectors import detector_for, unwrap


@register_task
class Detect(Task):
    name = "detect"
    headline = "map50_95"
    data_kind = "detect"
    # detectors learn from many small steps: batch 16 (a whole-set batch of 128 gives a few steps per epoch on small
    # data), a higher peak rate for AdamW, a longer warm-up (tests/tasks/test_detect.py: the tiny YOLO's recipe)
    train_defaults = {"batch_size": 16, "lr": 1e-2, "warmup": 0.1}
    recover_defaults = {"batch_size": 16, "lr": 5e-3, "warmup": 0.1}

    def preprocess(
        self, bundle: Any, model: nn.Module | None, image_size: Any = None, *, channels: int | None = None,
        stats_sample: int = 2000,
    ) -> Any:  # fmt: skip
        """The model's recorded preprocessing; else pixels scaled to 0..1 and no mean/std: detectors (YOLO, and
        torchvision's, which normalise inside) expect that, whatever the data's statistics."""
        from presso.data import Preprocess, preprocess_for
        from presso.models.card import get_card

        pp = preprocess_for(bundle, model, image_size=image_size, channels=channels, stats_sample=8)
        recorded = getattr(get_card(model), "preprocess", None) if model is not None else None
        if recorded and Preprocess.from_json(recorded).channels == pp.channels:  # its statistics, at this size
            return dataclasses.replace(Preprocess.from_json(recorded), size=pp.size)
        return dataclasses.replace(pp, mean=(0.0,) * pp.channels, std=(1.0,) * pp.channels)

    def prepare(self, model: nn.Module, bundle: Any, example: torch.Tensor, cfg: Any) -> None:
        detector_for(model).prepare(tuple(example.shape[-2:]))

    def check(self, model: nn.Module, example: torch.Tensor, bundle: Any, teacher: nn.Module | None) -> None:
        det = detector_for(model)
        if bundle.labeled:
            n_model, n_data = det.num_classes(), bundle.num_classes or 0
            if n_model != n_data:
                extra = " (+1 for the background: torchvision counts it)" if "Torchvision" in type(det).__name__ else ""
                n_arg = n_data + (1 if extra else 0)
                raise DataError(
                    f"The detector predicts {n_model} classes but '{bundle.name}' has {n_data}; build it with "
                    f"--model-arg num_classes={n_arg}{extra}."
                )
        set_mode(model, False)
        try:
            with torch.no_grad():
                det.predict(model, example)
        except ConfigError:
            raise
        except Exception as e:
            raise DataError(
                f"The detector does not accept the data's images ({tuple(example.shape)}): {type(e).__name__}: "
                f"{str(e)[:200]}. Check --image-size (YOLO models need sides divisible by 32)."
            ) from None

    def augment(self, x: torch.Tensor, targets: Any, gen: torch.Generator, *, flip: bool) -> tuple[torch.Tensor, Any]:
        from presso.data.detection import augment_detection

        if targets is None:  # label-free: pixels only (the teacher sees the same augmented images)
            return augment_detection(x, [_no_boxes() for _ in range(len(x))], gen, flip=flip)[0], None
        return augment_detection(x, targets, gen, flip=flip)

    def to_device(self, targets: Any, device: torch.device) -> Any:
        if targets is None:
            return None
        return [{"boxes": t["boxes"].to(device).float(), "labels": t["labels"].to(device).long()} for t in targets]

    def loss(self, model: nn.Module, x: torch.Tensor, targets: Any, *, teacher: nn.Module | None, cfg: Any):
        det = detector_for(model)
        if teacher is None:
            if targets is None:
                raise DataError("Supervised detection training needs boxes; give a teacher to distil from.")
            return det.loss(model, x, targets)
        if targets is None and getattr(cfg, "pseudo_labels", False):
            with torch.no_grad():
                set_mode(teacher, False)
                preds = det.predict(teacher, x)
            targets = [{"boxes": p["boxes"][p["scores"] >= 0.3], "labels": p["labels"][p["scores"] >= 0.3]}
                       for p in preds]  # fmt: skip
            return det.loss(model, x, targets)
        return det.distill(model, teacher, x, targets, cfg)

    def metric(
        self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], *, teacher: nn.Module | None, cfg: Any,
        dist: Any,
    ) -> dict[str, Any]:  # fmt: skip
        from presso.tasks.coco import coco_map

        det = detector_for(model)
        predictions: list[dict] = []
        targets: list[dict] = []
        n, match_sum = 0, 0.0
        labeled = True
        for x, y in batches:
            preds = det.predict(model, x)
            predictions += [{k: v.detach().cpu().numpy() for k, v in p.items()} for p in preds]
            if y is None:
                labeled = False
            else:
                targets += [{"boxes": t["boxes"].cpu().numpy(), "labels": t["labels"].cpu().numpy()} for t in y]
            if teacher is not None and match_sum is not None:
                try:
                    match_sum += float(self.distance(model(x), teacher(x))) * len(x)
                except ConfigError:  # outputs after NMS (torchvision) have no fixed shape to compare
                    match_sum = None
            n += len(x)
        predictions = dist.gather(predictions)
        targets = dist.gather(targets)
        totals = dist.sum(torch.tensor([float(n), match_sum or 0.0], dtype=torch.float64))
        row: dict[str, Any] = {"val_n": int(totals[0])}
        if labeled and targets:
            classes = self.classes or [str(i) for i in range(det.num_classes())]
            scores = coco_map(predictions, targets, list(classes))
            row.update({"map50_95": scores["map50_95"], "map50": scores["map50"], "per_class": scores["per_class"]})
        if teacher is not None and match_sum is not None:
            row["match_loss"] = round(float(totals[1]) / max(float(totals[0]), 1.0), 5)
            row["val_loss"] = row["match_loss"]
        return row

    def postprocess(self, outputs: Any) -> Any:
        from presso.tasks.boxes import decode_dense

        y = leaves(outputs)
        return decode_dense(y[0], conf=0.25, iou=0.7) if y else outputs

    def distance(self, student_out: Any, teacher_out: Any) -> torch.Tensor:
        """Dense YOLO outputs ``[N, 4+nc, A]``: box error relative to the box's size plus class-probability error,
        both weighted by the original's confidence, plus the class error everywhere (false positives count too).
        Other output structures: the generic output matching."""
        s, t = leaves(student_out), leaves(teacher_out)
        if not (s and t and s[0].ndim == 3 and s[0].shape == t[0].shape and s[0].shape[1] > 4):
            return match_loss(student_out, teacher_out, 1.0)
        s0, t0 = s[0].float(), t[0].float()
        conf = t0[:, 4:].amax(1)  # [N, A]
        weight = conf / conf.sum().clamp_min(1e-6)
        scale = (t0[:, 2:4] ** 2).sum(1).clamp_min(1.0)
        box = ((s0[:, :4] - t0[:, :4]) ** 2).sum(1) / scale
        cls = ((s0[:, 4:] - t0[:, 4:]) ** 2).sum(1)
        everywhere = F.mse_loss(s0[:, 4:], t0[:, 4:]) / (t0[:, 4:].var() + 1e-6)
        return (weight * (box + cls)).sum() + 0.1 * everywhere


def _no_boxes() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)}


def model_task_classes(model: nn.Module) -> int:
    """How many classes a detector predicts (for messages and the card)."""
    return detector_for(unwrap(model)).num_classes()
