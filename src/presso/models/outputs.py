"""Helpers on a model's outputs, whatever their structure, used by every verb that compares two models.

A model's output may be a tensor, or tensors nested in tuples, lists and dicts (segmentation's ``{"out", "aux"}``, a
detector's head maps). ``leaves`` flattens it in a stable order; ``match_loss`` compares a student's outputs with a
teacher's without knowing the task: class scores (``[N, C]``) as distributions (temperature-scaled KL, Hinton et
al.), any other tensor by mean squared error normalised by the teacher's variance, so heads of different scales
weigh alike. The trainer distils with it, the compressor scores allocations with it, the exporter checks outputs
with ``leaves``: so it lives on the ground floor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from presso.errors import ConfigError


def leaves(out: Any) -> list[torch.Tensor]:
    """Tensors of a nested output, in a stable order (dicts by insertion order, as models build them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    return []


def is_class_scores(t: torch.Tensor) -> bool:
    return t.ndim == 2 and t.shape[1] > 1 and t.is_floating_point()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, scaled by T^2 so its gradients keep their size as T changes."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student.float() / t, dim=1),
        F.log_softmax(teacher.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float()) / (teacher.float().var() + 1e-6)


def output_pairs(student_out: Any, teacher_out: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s, t in zip(leaves(student_out), leaves(teacher_out), strict=False):
        if s.is_floating_point() and t.is_floating_point() and s.shape == t.shape:
            yield s, t


def match_loss(student_out: Any, teacher_out: Any, temperature: float) -> torch.Tensor:
    """Label-free output matching (KL on class scores, normalised MSE elsewhere), averaged over matched tensors."""
    losses = [
        kd_loss(s, t, temperature) if is_class_scores(t) else normalized_mse(s, t)
        for s, t in output_pairs(student_out, teacher_out)
    ]
    if not losses:
        raise ConfigError(
            "The student's outputs share no tensor of the same shape with the teacher's, so there is nothing to "
            "match; distil a student whose outputs keep the teacher's shapes (pruning keeps them), or use "
            "--feature-match alone."
        )
    return torch.stack(losses).mean()
