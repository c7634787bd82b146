"""Automatic per-layer values from one global knob.

- Pruning ratios by **LAMP** (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021),
  made cost-aware (divided by what a channel of each group costs in MACs or parameters),
  applied to the output channels of each coupled channel group (layers pruned together, from the dependency graph):
  a channel's score is its squared L2 norm (summed over the group's layers) divided by the sum over the channels of
  its group that are at least as large. Scores are comparable across layers (the strongest channel of every layer scores
  1, so no layer is emptied), and one global threshold -- the knob: the share of all channels removed -- gives every
  layer its own ratio.
- With calibration data, each layer's scores are scaled by its **measured sensitivity**: how much the model's output
  moves when that group loses its weakest half of channels (masked at every layer of the group, not removed).
  Sensitive groups keep more. (Measured per layer instead, a residual branch looks harmless to cut because the
  other branch of the add still carries the signal -- and the group then loses both.)
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
# Each group's ratio stays within this factor of the overall share. Unbounded, the allocation concentrated the cuts
# (75% of the last stage's channels at 50% MACs on the Fashion-MNIST ResNet of docs/benchmarks.md) and lost 2-12
# points of top-1 to uniform pruning after the same fine-tune; bounded by 2 it lost 0.5-3 (see that section).
BAND = 2.0


@dataclass
class ChannelScores:
    """LAMP scores of the output channels of every prunable channel group (sensitivity-weighted with data).

    A group is the set of layers whose output channels are pruned together (a residual stage's convolutions, a
    convolution and its norm...): it is scored, measured and given a ratio as one unit, keyed by its first layer."""

    scores: dict[str, np.ndarray]
    members: dict[str, list[str]]
    sensitivity: dict[str, float] | None = None

    band: float | None = BAND

    def ratios(self, fraction: float, max_ratio: float = MAX_RATIO) -> dict[str, float]:
        """Per-layer pruning ratios removing about ``fraction`` of all candidate channels; each group's ratio stays
        within ``band`` (a factor) of ``fraction`` -- [fraction / band, min(max_ratio, fraction * band)] -- so the
        scores move channels between groups without emptying one stage (None: unbounded)."""
        if fraction <= 0 or not self.scores:
            return {n: 0.0 for key in self.scores for n in self.members[key]}
        pooled = np.sort(np.concatenate(list(self.scores.values())))
        k = min(len(pooled) - 1, max(0, int(round(fraction * len(pooled))) - 1))
        threshold = pooled[k]
        low, high = (fraction / self.band, fraction * self.band) if self.band else (0.0, 1.0)
        out = {}
        for key, s in self.scores.items():
            ratio = round(float(min(max_ratio, high, max(low, np.mean(s <= threshold)))), 4)
            out.update({n: ratio for n in self.members[key]})
        return out


def channel_groups(model: nn.Module, inputs: tuple) -> dict[str, list[str]]:
    """The prunable coupled channel groups (output-producing ones left out), keyed by their first layer: the
    convolution / linear layers of each with that layer's width (a grouped convolution's unit also holds the
    layers feeding it, which may be of another width; they follow its ratio)."""
    from presso.compress.prune import GraphPruner, PruneConfig

    modules = dict(model.named_modules())
    out = {}
    for names in GraphPruner(model, inputs, PruneConfig()).coupled_groups():
        layers = [n for n in names if isinstance(modules[n], (nn.Conv2d, nn.Linear))]
        if layers:
            out[layers[0]] = [n for n in layers if _out(modules[n]) == _out(modules[layers[0]])]
    return out


def lamp_scores(model: nn.Module, inputs: tuple, data=None, cost: str | None = "macs") -> ChannelScores:
    """LAMP scores of the output channels of every coupled channel group the pruner would touch.

    cost: "macs" or "params" divides each group's scores by what one of its channels costs (relative to the
    average), so a budget is met by removing the channels that matter least *per MAC (parameter) saved*; plain LAMP
    (None) would spend the budget on late, low-resolution layers whose channels are numerous but cheap, and need a
    far larger share of channels to reach a MACs target. (Time on a device is handled by
    ``allocate.time_per_mac_allocations``: weighting LAMP scores by measured time per layer ran slower per MAC
    removed than the uniform ratio, docs/benchmarks.md.)
    """
    from presso.compress.decompose import _layer_sizes

    modules = dict(model.named_modules())
    layer_macs = {n: v[2] for n, v in _layer_sizes(model, inputs).items()} if cost == "macs" else {}
    unit_cost: dict[str, float] = {}
    scores, members = {}, {}
    for key, layers in channel_groups(model, inputs).items():
        energy = sum(_channel_energy(modules[n]) for n in layers)
        order = np.argsort(energy)
        sorted_e = energy[order]
        tail = np.cumsum(sorted_e[::-1])[::-1]  # sum over the channels at least as large as each one
        lamp = np.empty_like(energy)
        lamp[order] = sorted_e / np.maximum(tail, 1e-30)
        scores[key], members[key] = lamp, layers
        if cost == "macs":
            unit_cost[key] = sum(layer_macs.get(n, 0) for n in layers) / len(energy)
        elif cost == "params":
            unit_cost[key] = sum(modules[n].weight.numel() for n in layers) / len(energy)
    if unit_cost:
        mean_cost = float(np.mean([c for c in unit_cost.values() if c > 0] or [1.0]))
        scores = {k: v / max(unit_cost[k] / mean_cost, 1e-6) for k, v in scores.items()}
    sens = None
    if data is not None:
        sens = group_sensitivity(model, data, scores, members, modules)
        positive = [v for v in sens.values() if v > 0]
        mean = float(np.mean(positive)) if positive else 1.0
        scores = {k: v * (sens[k] / mean) for k, v in scores.items()}
    return ChannelScores(scores, members, sens)


def _out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _channel_energy(m: nn.Module) -> np.ndarray:
    w = m.weight.detach().float()
    return w.reshape(w.shape[0], -1).pow(2).sum(1).double().cpu().numpy()


@torch.no_grad()
def group_sensitivity(model, data, scores, members, modules, probe: float = 0.5) -> dict[str, float]:
    """Output change (MSE normalised by the output's variance) when a group's weakest ``probe`` share of channels
    is zeroed at every layer of the group, averaged over the calibration batches. Masks, not removals: the model is
    left as it was."""
    from presso.compress.allocate import batch_inputs
    from presso.models.figures import run_model

    batches = batch_inputs(data)
    if not batches:
        return {k: 1.0 for k in scores}
    reference = [_first_tensor(run_model(model, x)) for x in batches]
    out = {}
    for key, layers in members.items():
        energy = sum(_channel_energy(modules[n]) for n in layers)
        weak = np.argsort(energy)[: int(probe * len(energy))]
        mask = torch.ones(len(energy))
        mask[torch.as_tensor(weak, dtype=torch.long)] = 0

        def hook(mod, _a, y, mask=mask):
            shape = [1, -1] + [1] * (y.ndim - 2) if isinstance(mod, nn.Conv2d) else [1] * (y.ndim - 1) + [-1]
            return y * mask.to(y.device, y.dtype).view(shape)

        hooks = [modules[n].register_forward_hook(hook) for n in layers]
        try:
            change = []
            for x, ref in zip(batches, reference, strict=True):
                y = _first_tensor(run_model(model, x))
                change.append(float(((y - ref) ** 2).mean() / (ref.var() + 1e-12)))
        finally:
            for h in hooks:
                h.remove()
        out[key] = float(np.mean(change))
    return out


def _first_tensor(out) -> torch.Tensor:
    from presso.models.outputs import leaves

    return leaves(out)[0].float()
