"""Candidate allocations of a pruning budget over the layers, and how the best is told apart.

- On calibration data: each candidate judged after re-estimating its BatchNorm statistics (adaptive BatchNorm,
  Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning", ECCV 2020).
- On a device: candidates weighted by each group's measured time per MAC (``time_per_mac_allocations``), judged by
  measured latency (``presso.compress.budget``).

Why a search and not a score: weight criteria (LAMP) and one-shot sensitivity probes rank layers by how much the
*unrepaired* output moves, and right after pruning every allocation is near chance because the BatchNorm statistics
no longer match the thinner layers (docs/benchmarks.md, "Compression quality"). EagleEye showed that once the
statistics are re-estimated on a few batches, the output quality of a pruned network predicts what fine-tuning
recovers far better. So each candidate allocation -- the uniform ratio, the LAMP ratios (with and without measured
sensitivity) and random per-group perturbations of the uniform one, all brought to the same budget -- is pruned,
its BatchNorm statistics re-estimated, and scored by how far its outputs are from the original's (the distillation
loss: KL on class scores, normalised MSE on any other output, so no labels and no task knowledge are needed). The
lowest wins; the uniform ratio is always a candidate, so the choice is never worse than it on this measure.

Written here rather than taken from a library: Torch-Pruning has no adaptive-BN evaluator, and the one in
EagleEye's reference code is tied to its ResNet/MobileNet training scripts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from presso.models.figures import run_model

N_RANDOM = 8  # random allocations around the uniform one
N_REFINE = 4  # random allocations around the best of the first round
LATENCY_ALPHAS = (0.0, 0.5, 1.0, 1.5)  # exponents of the time-per-MAC weights tried on a device
WEIGHT_CLIP = 8.0  # time-per-MAC weights stay within [1/8, 8] of the geometric mean
SPREAD = 0.5  # log-normal spread of a random allocation's per-group multipliers (first round; half when refining)


@dataclass
class ScaledAllocation:
    """Each group's ratio is the global knob times the group's multiplier (capped at ``max_ratio``)."""

    members: dict[str, list[str]]
    weights: dict[str, float]
    max_ratio: float = 0.9

    @property
    def knob_max(self) -> float:
        """The knob at which every group reaches ``max_ratio``: the end of the range a search must cover (a group
        with a small multiplier needs a knob above 1 before it is cut much)."""
        return self.max_ratio / max(min(self.weights.values(), default=1.0), 1e-6)

    def ratios(self, knob: float) -> dict[str, float]:
        out = {}
        for key, layers in self.members.items():
            r = round(float(min(self.max_ratio, max(0.0, knob * self.weights[key]))), 4)
            out.update({n: r for n in layers})
        return out

    @classmethod
    def from_config(cls, members: dict[str, list[str]], cfg) -> ScaledAllocation:
        """The allocation a PruneConfig made (its per-group ratios, relative to their mean), for perturbing."""
        ratio = {n: cfg.per_layer.get(n, 0.0) if cfg.ratio is None else cfg.ratio for g in members.values() for n in g}
        level = float(np.mean([ratio[g[0]] for g in members.values()])) or 1.0
        return cls(members, {k: max(ratio[g[0]], 1e-3) / level for k, g in members.items()})

    def perturbed(self, rng: np.random.Generator, spread: float) -> ScaledAllocation:
        keys = sorted(self.members)
        z = rng.standard_normal(len(keys))
        w = {k: self.weights[k] * math.exp(spread * zi) for k, zi in zip(keys, z, strict=True)}
        mean = float(np.mean(list(w.values())))
        return ScaledAllocation(self.members, {k: v / mean for k, v in w.items()}, self.max_ratio)


def batch_inputs(data) -> list[tuple]:
    """The model inputs of each calibration batch (labels dropped)."""
    out = []
    for b in data:
        x = b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b
        out.append((x,) if isinstance(x, torch.Tensor) else tuple(x))
    return out


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: list[tuple]) -> int:
    """Re-estimate the running statistics of every BatchNorm layer on ``batches`` (a cumulative average over them,
    everything else in eval mode, no weight changes). Returns how many layers were re-estimated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not batches:
        return 0
    was_training = model.training
    model.eval()
    saved = []
    for m in norms:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        for x in batches:
            run_model(model, x)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


@torch.no_grad()
def output_distance(model: nn.Module, batches: list[tuple], reference: list) -> float:
    """Mean distance of ``model``'s outputs from the original's ``reference`` outputs on the same batches, as the
    model's task measures it (``presso.tasks``: KL on class scores and normalised MSE elsewhere for classification;
    box and class errors where the original sees objects for detection)."""
    distance = _task_distance(model)
    was_training = model.training
    model.eval()
    try:
        losses = [float(distance(run_model(model, x), ref)) for x, ref in zip(batches, reference, strict=True)]
    finally:
        model.train(was_training)
    return float(np.mean(losses))


def _task_distance(model: nn.Module):
    from presso.errors import PressoError
    from presso.models.outputs import match_loss
    from presso.tasks import infer_task

    try:
        return infer_task(model).distance
    except PressoError:  # a user's task file needs --trust to run; judge by the generic output matching then
        return lambda out, ref: match_loss(out, ref, 1.0)


def time_per_mac_allocations(
    model: nn.Module, inputs: tuple, members: dict[str, list[str]], alphas=LATENCY_ALPHAS, threads: int | None = None
) -> list[tuple[str, ScaledAllocation]]:
    """Allocations that cut the groups costing the most *time per MAC* here harder: group weight
    ``(ms_g / MACs_g / geometric mean)^alpha``, from one ONNX Runtime profile of the model on this machine.

    Why: on a CPU a MAC is not a fixed amount of time. Depthwise and other memory-bound layers cost several times
    more per MAC than dense convolutions, and their MACs fall only linearly with the channels while a dense layer's
    fall with the square, so a uniform cut removes MACs much faster than time (MobileNetV2 at 1/4 of the MACs ran
    only ~3x faster, docs/benchmarks.md). alpha = 0 is the uniform ratio; larger alphas move the cut towards the
    slow-per-MAC groups."""
    from presso.compress.decompose import _layer_sizes
    from presso.compress.latency import layer_latency_ms

    ms = layer_latency_ms(model, inputs, threads=threads, elementwise=True)
    macs = {n: v[2] for n, v in _layer_sizes(model, inputs).items()}
    per_mac = {}
    for key, layers in members.items():
        t, m = sum(ms.get(n, 0.0) for n in layers), sum(macs.get(n, 0) for n in layers)
        if t > 0 and m > 0:
            per_mac[key] = t / m
    mean = math.exp(float(np.mean(np.log(list(per_mac.values()))))) if per_mac else 1.0
    out = []
    for alpha in alphas:
        # relative to the geometric mean and clipped: a few groups with extreme time per MAC (squeeze-excitation
        # layers at 1x1, charged with their element-wise time) must not flatten every other group's weight
        w = {k: min(WEIGHT_CLIP, max(1 / WEIGHT_CLIP, (per_mac.get(k, mean) / mean) ** alpha)) for k in members}
        name = "uniform" if alpha == 0 else f"time per MAC ^ {alpha:g}"
        out.append((name, ScaledAllocation(members, w)))
    return out
