"""Automatic per-layer values from one global knob.

- Pruning ratios by **LAMP** (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021),
  applied to output channels: a channel's score is its squared L2 norm divided by the sum over the channels of its
  layer that are at least as large. Scores are comparable across layers (the strongest channel of every layer scores
  1, so no layer is emptied), and one global threshold -- the knob: the share of all channels removed -- gives every
  layer its own ratio.
- With calibration data, each layer's scores are scaled by its **measured sensitivity**: how much the model's output
  moves when that layer loses its weakest half of channels (masked, not removed). Sensitive layers keep more.
- Decomposition ranks by VBMF (``decompose.choose_ranks``), the knob being the calibration offset.

The chosen per-layer values are plain ``{layer: ratio}`` / ``{layer: rank}`` mappings; the CLI writes them next to
the model for the user to edit and feed back (``--per-layer``, ``--ranks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MAX_RATIO = 0.9  # never remove more than this share of one layer's channels


@dataclass
class ChannelScores:
    """LAMP scores of every candidate layer's output channels (sensitivity-weighted when data was given)."""

    scores: dict[str, np.ndarray]
    sensitivity: dict[str, float] | None = None

    def ratios(self, fraction: float, max_ratio: float = MAX_RATIO) -> dict[str, float]:
        """Per-layer pruning ratios removing about ``fraction`` of all candidate channels."""
        if fraction <= 0 or not self.scores:
            return {n: 0.0 for n in self.scores}
        pooled = np.sort(np.concatenate(list(self.scores.values())))
        k = min(len(pooled) - 1, max(0, int(round(fraction * len(pooled))) - 1))
        threshold = pooled[k]
        out = {}
        for name, s in self.scores.items():
            out[name] = round(float(min(max_ratio, np.mean(s <= threshold))), 4)
        return out


def lamp_scores(model: nn.Module, inputs: tuple, data=None, layers: list[str] | None = None) -> ChannelScores:
    """LAMP scores of the output channels of every Conv2d and Linear that the inputs reach (or of ``layers``)."""
    reached = _reached(model, inputs)
    names = layers or [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n in reached]
    modules = dict(model.named_modules())
    scores = {}
    for name in names:
        w = modules[name].weight.detach().float()
        energy = w.reshape(w.shape[0], -1).pow(2).sum(1).double().cpu().numpy()
        order = np.argsort(energy)
        sorted_e = energy[order]
        tail = np.cumsum(sorted_e[::-1])[::-1]  # sum of channels at least as large as each one
        lamp = np.empty_like(energy)
        lamp[order] = sorted_e / np.maximum(tail, 1e-30)
        scores[name] = lamp
    sens = None
    if data is not None:
        sens = layer_sensitivity(model, inputs, data, list(scores))
        mean = float(np.mean([v for v in sens.values() if v > 0])) if any(v > 0 for v in sens.values()) else 1.0
        for name in scores:
            scores[name] = scores[name] * (sens[name] / mean if mean > 0 else 1.0)
    return ChannelScores(scores, sens)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, inputs: tuple, data, layers: list[str], probe: float = 0.5) -> dict[str, float]:
    """Output change (MSE normalised by the output's variance) when each layer's weakest ``probe`` share of output
    channels is zeroed, averaged over the calibration batches. Masks, not removals: nothing about the model changes."""
    from presso.models.figures import run_model

    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    if not batches:
        return {n: 1.0 for n in layers}
    reference = [_first_tensor(run_model(model, (b,))) for b in batches]
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        m = modules[name]
        w = m.weight.detach()
        energy = w.reshape(w.shape[0], -1).pow(2).sum(1)
        weak = torch.argsort(energy)[: int(probe * w.shape[0])]
        mask = torch.ones(w.shape[0], device=w.device, dtype=w.dtype)
        mask[weak] = 0

        def hook(_m, _a, y, mask=mask):
            shape = [1, -1] + [1] * (y.ndim - 2) if isinstance(_m, nn.Conv2d) else [1] * (y.ndim - 1) + [-1]
            return y * mask.view(shape)

        h = m.register_forward_hook(hook)
        try:
            change = []
            for b, ref in zip(batches, reference, strict=True):
                y = _first_tensor(run_model(model, (b,)))
                change.append(float(((y - ref) ** 2).mean() / (ref.var() + 1e-12)))
        finally:
            h.remove()
        out[name] = float(np.mean(change))
    return out


def _first_tensor(out) -> torch.Tensor:
    from presso.train.distill import leaves

    return leaves(out)[0].float()


def _reached(model: nn.Module, inputs: tuple) -> set[str]:
    from presso.models.figures import run_model

    seen: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda *_a, n=n: seen.add(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen
