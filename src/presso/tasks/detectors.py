"""Detector families: what differs between detectors that the detection task needs, behind one small interface.

A detector comes from the customer, so its family is recognised from its class, not assumed:

- **Ultralytics** (YOLOv3u..YOLO11/26, ``ultralytics:yolov8n.yaml`` or a trusted checkpoint): Ultralytics' own loss
  (``model.init_criterion()``: v8 detection loss or its end-to-end variant, default hyper-parameters); predictions
  are the dense head output ``[N, 4+nc, A]`` decoded by class-aware NMS; distillation matches the dense head outputs
  before NMS (class logits, box distributions).
- **torchvision** (Faster/Mask R-CNN, RetinaNet, FCOS, SSD): the model's own losses in train mode; predictions as it
  returns them (its NMS); distillation matches the backbone/FPN features, and label-free recovery learns from the
  teacher's boxes (pseudo-labels), because these models compute their losses only against boxes.
- **HF transformers** (DETR, Conditional/Deformable/DAB-DETR, RT-DETR; ``transformers:...``, wrapped by
  ``presso.models.transformers_hub.HFDetection``): the model's own set loss (Hungarian matching); predictions by HF's
  post-processing (DETR: softmax, the "no object" class dropped; the sigmoid family: top scores over queries x
  classes), no NMS; distillation matches each query's class distribution and box before any threshold.

Targets are per-image dicts ``{"boxes": [K,4] xyxy pixels, "labels": [K] in 0..C-1}``; predictions the same plus
``"scores"``.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from presso.errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


class Detector(abc.ABC):
    """The family interface: ``num_classes``, ``prepare``, ``loss``, ``predict``, ``distill``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abc.abstractmethod
    def num_classes(self) -> int:
        """Classes the detector predicts (without a background class)."""

    def prepare(self, size: tuple[int, int]) -> None:  # noqa: B027 (optional hook)
        """Adapt the model to inputs of ``size`` (H, W) when it resizes internally."""

    @abc.abstractmethod
    def loss(self, net: nn.Module, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """The detector's own training loss on a batch with boxes (``net`` may be DDP-wrapped)."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, x: torch.Tensor, conf: float = 0.001, iou: float = 0.7) -> list[dict]:
        """Boxes after NMS, per image: ``{"boxes", "scores", "labels"}`` (labels 0..C-1)."""

    @abc.abstractmethod
    def distill(
        self, net: nn.Module, teacher: nn.Module, x: torch.Tensor, targets: list[dict] | None, cfg: Any
    ) -> torch.Tensor:
        """The distillation loss from ``teacher`` (mixed with the supervised loss when ``targets`` are given)."""


def detector_for(model: nn.Module) -> Detector:
    """The family adapter for ``model``, or one ConfigError naming what is supported."""
    inner = unwrap(model)
    kind = type(inner)
    if (kind.__module__ or "").startswith("ultralytics.") and kind.__name__ != "DetectionModel":
        raise ConfigError(
            f"An Ultralytics {kind.__name__} prunes, reloads and exports with Presso, but the detect task trains "
            "detection models (DetectionModel: yolov8n.yaml, yolo11n.yaml, ...); its own task is not trained yet."
        )
    for cls in kind.__mro__:
        module = cls.__module__ or ""
        if module.startswith("ultralytics.") and cls.__name__ == "DetectionModel":
            return UltralyticsDetector(inner)
        if module.startswith("torchvision.models.detection") and cls.__name__ in (
            "GeneralizedRCNN", "RetinaNet", "FCOS", "SSD",
        ):  # fmt: skip
            return TorchvisionDetector(inner)
    if kind.__module__ == "presso.models.transformers_hub" and kind.__name__ == "HFDetection":
        return HFDetector(inner)
    raise ConfigError(
        f"The detect task does not know how to train a {type(inner).__name__}: Presso trains Ultralytics YOLO "
        "models (ultralytics:yolov8n.yaml, ...), torchvision detectors (fasterrcnn_*, retinanet_*, fcos_*, ssd*) "
        "and transformers DETR-style detectors (transformers:DetrForObjectDetection, ...); for another detector "
        "give your own task (--task file.py:Class, docs/tasks.md)."
    )


# --------------------------------------------------------------------------- Ultralytics
class UltralyticsDetector(Detector):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.head = model.model[-1]
        self._criterion = None

    def num_classes(self) -> int:
        return int(self.head.nc)

    def criterion(self):
        if self._criterion is None:
            from ultralytics.cfg import get_cfg

            if not hasattr(self.model, "args") or isinstance(self.model.args, dict):
                self.model.args = get_cfg()  # Ultralytics' default hyper-parameters (box 7.5, cls 0.5, dfl 1.5)
            self._criterion = self.model.init_criterion()
        return self._criterion

    @staticmethod
    def batch(x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Presso's per-image targets as Ultralytics' flat batch (image index, class, normalised xywh)."""
        h, w = x.shape[-2:]
        idx, cls, boxes = [], [], []
        for i, t in enumerate(targets):
            b = t["boxes"].float()
            idx.append(torch.full((len(b),), float(i), device=x.device))
            cls.append(t["labels"].float().view(-1, 1))
            cx, cy = (b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h
            xywh = torch.stack([cx, cy, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
            boxes.append(xywh)
        return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls), "bboxes": torch.cat(boxes)}

    def loss(self, net: nn.Module, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        preds = net(x)
        return self._supervised(preds, x, targets)

    def _supervised(self, preds, x, targets) -> torch.Tensor:
        # Ultralytics returns the loss times the batch size (its optimiser settings expect that); Presso's optimiser
        # settings are per-sample means, as for every other task.
        total, _ = self.criterion()(preds, self.batch(x, targets))
        return total.sum() / len(x)

    def predict(self, model: nn.Module, x: torch.Tensor, conf: float = 0.001, iou: float = 0.7) -> list[dict]:
        from presso.tasks.boxes import decode_dense

        out = model(x)
        y = out[0] if isinstance(out, (tuple, list)) else out
        return decode_dense(y, conf=conf, iou=iou, max_det=300)

    @contextlib.contextmanager
    def _raw_head(self, model: nn.Module):
        """The dense head outputs before decoding (what the loss sees) from a model in eval mode: only the head's own
        flag is switched, so its BatchNorm layers keep their running statistics."""
        head = unwrap(model).model[-1]
        before = head.training
        head.training = True
        try:
            yield
        finally:
            head.training = before

    def dense(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._raw_head(model):
            return _one2many(model(x))

    def distill(self, net, teacher, x, targets, cfg) -> torch.Tensor:
        preds = net(x)
        with torch.no_grad():
            t = self.dense(teacher, x)
        kd = dense_kd(_one2many(preds), t, self.head.reg_max, cfg.temperature)
        if targets is not None:
            return (1 - cfg.kd_alpha) * self._supervised(preds, x, targets) + cfg.kd_alpha * kd
        return kd


def _one2many(preds: Any) -> dict[str, torch.Tensor]:
    if isinstance(preds, tuple):  # (inference, dict) from a head in eval mode
        preds = preds[1]
    return preds["one2many"] if "one2many" in preds else preds


def dense_kd(s: dict[str, torch.Tensor], t: dict[str, torch.Tensor], reg_max: int, temperature: float):
    """Distillation on a YOLO head's dense outputs: class logits against the teacher's probabilities (binary
    cross-entropy, summed over classes, averaged over anchors) and, where the teacher sees an object, each box side's
    distribution (DFL bins) against the teacher's (KL at ``temperature``), weighted by the teacher's confidence."""
    s_cls, t_cls = s["scores"].float(), t["scores"].float()  # [N, nc, A] logits
    t_prob = t_cls.sigmoid()
    cls_kd = F.binary_cross_entropy_with_logits(s_cls, t_prob, reduction="none").sum(1).mean()
    weight = t_prob.amax(1)  # [N, A]: the teacher's confidence that an object is there
    if reg_max > 1:
        n, _, a = s["boxes"].shape
        tau = max(1.0, temperature / 4)  # distributions over 16 bins are sharp: a mild temperature
        s_box = F.log_softmax(s["boxes"].float().view(n, 4, reg_max, a) / tau, dim=2)
        t_box = F.log_softmax(t["boxes"].float().view(n, 4, reg_max, a) / tau, dim=2)
        kl = (t_box.exp() * (t_box - s_box)).sum(2).sum(1)  # [N, A]
        box_kd = (kl * weight).sum() / weight.sum().clamp_min(1e-6) * tau * tau
    else:
        err = ((s["boxes"].float() - t["boxes"].float()) ** 2).sum(1)
        box_kd = (err * weight).sum() / weight.sum().clamp_min(1e-6)
    return cls_kd + box_kd


# --------------------------------------------------------------------------- torchvision
class TorchvisionDetector(Detector):
    """torchvision's detectors count the background as class 0: Presso's labels 0..C-1 are passed as 1..C."""

    def num_classes(self) -> int:
        m = self.model
        head = getattr(m, "roi_heads", None)
        if head is not None:
            return int(head.box_predictor.cls_score.out_features) - 1
        if hasattr(m, "head") and hasattr(m.head, "classification_head"):
            return int(m.head.classification_head.num_classes) - 1
        raise ConfigError(f"Cannot tell how many classes the {type(m).__name__} predicts.")

    def prepare(self, size: tuple[int, int]) -> None:
        t = getattr(self.model, "transform", None)
        if t is not None and getattr(t, "fixed_size", None) is None:
            # its transform would resize every image to 800 px: keep the data's size (Presso resized already)
            t.min_size = (int(min(size)),)
            t.max_size = int(max(size))

    @staticmethod
    def _shift(targets: list[dict]) -> list[dict]:
        return [{"boxes": t["boxes"].float(), "labels": t["labels"].long() + 1} for t in targets]

    def loss(self, net, x, targets) -> torch.Tensor:
        losses = net(list(x), self._shift(targets))
        return sum(losses.values())

    def predict(self, model, x, conf: float = 0.0, iou: float | None = None) -> list[dict]:
        """The model's own post-processing (its NMS); ``conf`` drops boxes scored below it."""
        out = model(list(x))
        return [{"boxes": o["boxes"][keep], "scores": o["scores"][keep], "labels": o["labels"][keep] - 1}
                for o in out for keep in [o["scores"] >= conf]]  # fmt: skip

    def pseudo_labels(self, teacher: nn.Module, x: torch.Tensor, threshold: float = 0.3) -> list[dict]:
        with torch.no_grad():
            preds = self.predict(teacher, x)
        return [{"boxes": p["boxes"][p["scores"] >= threshold], "labels": p["labels"][p["scores"] >= threshold]}
                for p in preds]  # fmt: skip

    def distill(self, net, teacher, x, targets, cfg) -> torch.Tensor:
        # the losses of these models need boxes: without labels the teacher's confident boxes stand in for them
        boxes = targets if targets is not None else self.pseudo_labels(teacher, x)
        student_feats: list = []
        hook = unwrap(net).backbone.register_forward_hook(lambda m, i, o: student_feats.append(o))
        try:
            sup = self.loss(net, x, boxes)
        finally:
            hook.remove()
        with torch.no_grad():
            t_model = unwrap(teacher)
            images, _ = t_model.transform(list(x))
            t_feats = t_model.backbone(images.tensors)
        from presso.models.outputs import leaves, normalized_mse

        pairs = [(s, t) for s, t in zip(leaves(student_feats[0]), leaves(t_feats), strict=False) if s.shape == t.shape]
        if not pairs:
            return sup
        feat = torch.stack([normalized_mse(s, t) for s, t in pairs]).mean()
        return (1 - cfg.kd_alpha) * sup + cfg.kd_alpha * feat


# --------------------------------------------------------------------------- HF transformers (DETR-style)
class HFDetector(Detector):
    """DETR-style detectors: a fixed set of queries, each a class distribution and a box (normalised cx, cy, w, h)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.softmax = model.kind == "softmax"  # DETR: C+1 logits, "no object" last; else per-class sigmoid

    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @staticmethod
    def labels(x: torch.Tensor, targets: list[dict]) -> list[dict]:
        """Presso's targets (xyxy pixels) as HF's: ``class_labels`` and ``boxes`` as normalised (cx, cy, w, h)."""
        h, w = x.shape[-2:]
        out = []
        for t in targets:
            b = t["boxes"].float()
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                  (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)  # fmt: skip
            out.append({"class_labels": t["labels"].long(), "boxes": cxcywh})
        return out

    def loss(self, net, x, targets) -> torch.Tensor:
        return net(x, self.labels(x, targets))[2]

    def predict(self, model, x, conf: float = 0.001, iou: float = 0.7) -> list[dict]:
        """Boxes from the dense eval output (each query's best class, then class-aware NMS, as for YOLO): the same
        decoding the exported file gets in ``convert`` and in the bundle, so PyTorch and ONNX mAP agree. DETR rarely
        has two queries on one object, so NMS at 0.7 seldom removes anything."""
        from presso.tasks.boxes import decode_dense

        was = model.training
        model.eval()
        try:
            return decode_dense(model(x), conf=conf, iou=iou)
        finally:
            model.train(was)

    def pseudo_labels(self, teacher: nn.Module, x: torch.Tensor, threshold: float = 0.3) -> list[dict]:
        with torch.no_grad():
            preds = self.predict(teacher, x, conf=threshold)
        return [{"boxes": p["boxes"], "labels": p["labels"]} for p in preds]

    def distill(self, net, teacher, x, targets, cfg) -> torch.Tensor:
        out = net(x, self.labels(x, targets)) if targets is not None else net(x)
        with torch.no_grad(), unwrap(teacher).raw_outputs():
            t_logits, t_boxes = teacher(x)[:2]
        kd = query_kd(out[0], out[1], t_logits, t_boxes, softmax=self.softmax, temperature=cfg.temperature)
        if targets is not None:
            return (1 - cfg.kd_alpha) * out[2] + cfg.kd_alpha * kd
        return kd


def _xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def query_kd(s_logits, s_boxes, t_logits, t_boxes, *, softmax: bool, temperature: float) -> torch.Tensor:
    """Distillation on a set predictor's dense outputs, query by query (a pruned student keeps its teacher's
    queries): the class distribution at ``temperature`` (KL over C+1 classes for DETR, binary cross-entropy per class
    for the sigmoid family) on every query, plus L1 and GIoU between the boxes, weighted by the teacher's confidence
    that the query holds an object."""
    from torchvision.ops import generalized_box_iou_loss

    s, t = s_logits.float(), t_logits.float()
    if softmax:
        tau = float(temperature)
        t_log = F.log_softmax(t / tau, -1)
        cls = (t_log.exp() * (t_log - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau * tau
        weight = t.softmax(-1)[..., :-1].amax(-1)  # [N, Q]: 1 - p(no object), at most
    else:
        t_prob = t.sigmoid()
        cls = F.binary_cross_entropy_with_logits(s, t_prob, reduction="none").sum(-1).mean()
        weight = t_prob.amax(-1)
    sb, tb = s_boxes.float(), t_boxes.float()
    l1 = (sb - tb).abs().sum(-1)
    giou = generalized_box_iou_loss(_xyxy(sb).reshape(-1, 4), _xyxy(tb).reshape(-1, 4)).view_as(l1)
    box = ((l1 + giou) * weight).sum() / weight.sum().clamp_min(1e-6)
    return cls + box
