"""Distillation losses that need no knowledge of the task.

The student learns to reproduce its teacher's outputs, whatever their structure: every floating-point tensor in the
output (a tensor, or tensors nested in tuples, lists, dicts -- segmentation's ``{"out", "aux"}``, a detector's head
maps) is matched with the teacher's tensor at the same place. Class scores (``[N, C]``) are matched as distributions
(temperature-scaled KL, Hinton et al.); any other tensor by mean squared error normalised by the teacher's variance,
so heads of different scales weigh alike. Optional feature matching adds the same normalised error at intermediate
layers whose names and output shapes agree between teacher and student (pruning keeps names).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


class FeatureTaps:
    """Forward hooks on the layers (same name, same output shape in teacher and student) whose outputs are matched.

    Chosen on one batch: among modules with a child (blocks, stages) whose output is a float tensor of equal shape,
    up to ``count`` spread evenly from input to output; layers whose output is the model's output are left to
    output matching."""

    def __init__(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor, count: int = 4):
        s_shapes = _output_shapes(student, example)
        t_shapes = _output_shapes(teacher, example)
        t_modules = dict(teacher.named_modules())
        names = [
            n
            for n, m in student.named_modules()
            if n and n in t_shapes and s_shapes.get(n) == t_shapes[n] and any(True for _ in m.children())
        ]
        if not names:
            names = [n for n in s_shapes if n and n in t_shapes and s_shapes[n] == t_shapes[n]]
        if len(names) > count:
            step = len(names) / count
            names = [names[min(len(names) - 1, int(step * (k + 1)) - 1)] for k in range(count)]
        self.names = names
        self.active = True  # off during evaluation
        self._student: dict[str, torch.Tensor] = {}
        self._teacher: dict[str, torch.Tensor] = {}
        s_modules = dict(student.named_modules())
        self._hooks = [s_modules[n].register_forward_hook(self._keep(self._student, n)) for n in names]
        self._hooks += [t_modules[n].register_forward_hook(self._keep(self._teacher, n)) for n in names]

    def _keep(self, store: dict, name: str):
        def hook(_module, _inputs, output):
            if self.active and isinstance(output, torch.Tensor):
                store[name] = output

        return hook

    def loss(self) -> torch.Tensor | None:
        pairs = [(self._student[n], self._teacher[n]) for n in self.names if n in self._student and n in self._teacher]
        self._student.clear()
        self._teacher.clear()
        if not pairs:
            return None
        return torch.stack([normalized_mse(s, t.detach()) for s, t in pairs]).mean()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _output_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():

        def hook(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                shapes[name] = tuple(out.shape)

        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    final = {tuple(t.shape) for t in leaves(out)}
    return {n: s for n, s in shapes.items() if s not in final}
