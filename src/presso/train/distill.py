"""Feature matching for distillation, which needs no knowledge of the task.

Output matching (KL on class scores, normalised MSE on any other tensor) is ``presso.models.outputs.match_loss``.
Optional feature matching here adds the same normalised error at intermediate layers whose names and output shapes
agree between teacher and student (pruning keeps names).
"""

from __future__ import annotations

import torch
from torch import nn

from presso.models.outputs import leaves, normalized_mse


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
