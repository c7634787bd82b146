"""Classification: class scores ``[N, classes]`` against class indices.

Supervised: cross-entropy with label smoothing. Distilled: Hinton's soft targets mixed with the cross-entropy when
labels exist and the teacher scores the same classes, else label-free output matching (any output structure).
Metric: top-1 and cross-entropy on labels; top-1 agreement and the matching loss against a teacher.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from presso.data.images import augment
from presso.errors import ConfigError, DataError
from presso.models.figures import set_mode
from presso.models.outputs import is_class_scores, kd_loss, leaves, match_loss
from presso.tasks import register_task
from presso.tasks.base import Task


@register_task
class Classify(Task):
    name = "classify"
    headline = "val_top1"
    data_kind = "classify"
    channels_last = True  # cross-entropy and distillation read (N, classes) logits, whatever the model's layout

    def prepare(self, model: nn.Module, bundle: Any, example: torch.Tensor, cfg: Any) -> None:
        if getattr(cfg, "new_head", False) and bundle.labeled:
            _new_head(model, example, bundle.num_classes or 0)

    def check(self, model: nn.Module, example: torch.Tensor, bundle: Any, teacher: nn.Module | None) -> None:
        set_mode(model, True)
        try:
            with torch.no_grad():
                out = model(example)
        except Exception as e:
            raise DataError(
                f"The model does not accept the data's images ({tuple(example.shape)}): {type(e).__name__}: "
                f"{str(e)[:200]}. Check --image-size and that the model's input channels match."
            ) from None
        first = leaves(out)
        if bundle.labeled and teacher is None:
            if not first or not is_class_scores(first[0]):
                raise ConfigError(
                    "Supervised training needs a classifier (output [N, classes]); this model outputs "
                    f"{[tuple(t.shape) for t in first][:3]}. Distil it from its original instead (--teacher), or "
                    "give --task if it is not a classifier."
                )
        if bundle.labeled and first and is_class_scores(first[0]):
            n_out, n_cls = first[0].shape[1], bundle.num_classes or 0
            if n_out < n_cls or (n_out != n_cls and teacher is None):
                raise DataError(
                    f"The model outputs {n_out} classes but '{bundle.name}' has {n_cls}; build it with "
                    f"--model-arg num_classes={n_cls}, or pass --new-head to give it a new classifier."
                )

    def augment(self, x: torch.Tensor, targets: Any, gen: torch.Generator, *, flip: bool) -> tuple[torch.Tensor, Any]:
        return augment(x, gen, flip=flip), targets

    def loss(self, model: nn.Module, x: torch.Tensor, targets: Any, *, teacher: nn.Module | None, cfg: Any):
        out = model(x)
        scores = leaves(out)
        labeled = targets is not None and bool((targets >= 0).all())
        if teacher is None:
            return F.cross_entropy(scores[0].float(), targets, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            t_out = teacher(x)
        t_scores = leaves(t_out)
        if labeled and same_class_scores(scores, t_scores):
            ce = F.cross_entropy(scores[0].float(), targets, label_smoothing=cfg.label_smoothing)
            return (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kd_loss(scores[0], t_scores[0], cfg.temperature)
        return match_loss(out, t_out, cfg.temperature)

    def metric(
        self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], *, teacher: nn.Module | None, cfg: Any,
        dist: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """Top-1 and cross-entropy on labels; with a teacher, agreement (same top-1 class) and the label-free
        matching loss. Under torchrun each process scores its share and the sums are reduced."""
        temperature = getattr(cfg, "temperature", 4.0)
        sums = torch.zeros(6, dtype=torch.float64)  # n, correct, ce, agree, match, labelled n
        for x, y in batches:
            out = model(x)
            scores = leaves(out)
            n = len(x)
            sums[0] += n
            if y is not None:
                sums[5] += n
                if scores and is_class_scores(scores[0]):
                    sums[1] += float((scores[0].argmax(1) == y).sum())
                    sums[2] += float(F.cross_entropy(scores[0].float(), y, reduction="sum"))
            if teacher is not None:
                t_out = teacher(x)
                t_scores = leaves(t_out)
                if same_class_scores(scores, t_scores):
                    sums[3] += float((scores[0].argmax(1) == t_scores[0].argmax(1)).sum())
                sums[4] += float(match_loss(out, t_out, temperature)) * n
        sums = dist.sum(sums)
        n = max(float(sums[0]), 1.0)
        row: dict[str, Any] = {"val_n": int(sums[0])}
        if float(sums[5]) > 0:
            row["val_top1"] = round(float(sums[1]) / float(sums[5]), 5)
            row["val_loss"] = round(float(sums[2]) / float(sums[5]), 5)
        if teacher is not None:
            row["agreement"] = round(float(sums[3]) / n, 5)
            row["match_loss"] = round(float(sums[4]) / n, 5)
            row.setdefault("val_loss", row["match_loss"])
        return row

    def postprocess(self, outputs: Any) -> Any:
        scores = leaves(outputs)
        return scores[0].argmax(1) if scores and is_class_scores(scores[0]) else outputs


def _new_head(model: nn.Module, example: torch.Tensor, classes: int) -> None:
    """Replace the classifier of ``model`` by a new one with ``classes`` outputs (found by the outputs it gives)."""
    from presso.models.weights import replace_head

    set_mode(model, False)
    with torch.no_grad():
        first = leaves(model(example))
    current = int(first[0].shape[1]) if first and is_class_scores(first[0]) else None
    if current is None:
        raise ConfigError("--new-head: the model does not output class scores [N, classes]; it has no classifier.")
    replace_head(model, classes, current=current)


def same_class_scores(scores: list[torch.Tensor], t_scores: list[torch.Tensor]) -> bool:
    """Whether the student's first output and the teacher's are class scores over the same classes: then they are
    compared class by class (soft targets when training, top-1 agreement when scoring)."""
    return bool(scores and t_scores and is_class_scores(scores[0]) and scores[0].shape == t_scores[0].shape)
