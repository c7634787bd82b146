"""Sparsity training before a cut: a group decay that empties the channels the cut will remove.

Cutting two thirds of a trained network's channels in one step leaves it with little function (a YOLOv8s-like
detector cut to an n's MACs scored 0.0-0.14 mAP before recovery; docs/benchmarks.md). The remedy of structured
pruning's literature is to train first with a *group* regularizer (DepGraph, Fang et al., CVPR 2023, sec. 3.3;
growing regularization, Wang et al., ICLR 2021): every parameter slice coupled to one channel -- the producing
convolution's filter and bias, its BatchNorm scale and shift, the consuming layers' input slices -- is decayed
together, so the network moves its function into the channels it keeps and the later cut (``l2`` group norm, the
default criterion) removes channels that are already near zero.

Which channels: in every prunable group, the ``ratio`` share with the smallest group norm *at each step* (as the
cut would choose them). Decaying every channel, the weakest harder (DepGraph's ``alpha ** rank`` weighting), was
tried first: in a few epochs -- the budget a user retrains with -- a strength that empties the weakest channels also
shrinks the strong ones and the model does not learn (resnet8 on digits, 4 epochs: 0.97 top-1 to 0.09); decaying
only the channels that will go leaves the rest free, and a channel that becomes useful again leaves the decayed set.

Why it is written here and not taken from Torch-Pruning's ``GroupNormPruner.regularize``:

* that pruner builds its own dependency graph, without Presso's patches (channel splits, dead-end branches, bounded
  index walks), over *all* groups; this one decays exactly the groups :class:`~presso.compress.prune.plan.Planner`
  would cut -- ignored layers, output layers and unsplittable groups stay untouched;
* it adds a penalty to the *gradient*, which Adam's per-parameter normalisation turns into a different penalty per
  parameter; here the decay is **decoupled** (applied to the weights after the optimizer step, scaled by the
  learning rate, as AdamW decouples weight decay), so it means the same under AdamW and SGD and fades with the
  learning-rate schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from presso.compress.prune import tp_patches
from presso.compress.prune.config import PruneConfig
from presso.compress.prune.plan import Planner
from presso.errors import ConfigError, UnsupportedLayerError
from presso.models.figures import set_mode

__all__ = ["GroupDecay"]


@dataclass
class _Slice:
    param: nn.Parameter
    dim: int  # the dimension the channel indexes
    idxs: torch.Tensor  # indices along ``dim``
    root: torch.Tensor  # the root channel each index belongs to (into the group's norm vector)


class GroupDecay:
    """Decoupled group decay of the weakest channels of every prunable group of ``model`` (module docstring).

    Build it once on the model and an example input, then call :meth:`after_step` with the current learning rate
    after every optimizer step (``presso.train(..., regularizer=GroupDecay(...))`` does). Each step shrinks the
    ``ratio`` share of each group's channels with the smallest group norm by ``1 - lr * strength``; ``ignore``
    takes the same layer-name patterns as ``PruneConfig.ignore``.
    """

    def __init__(self, model: nn.Module, inputs: tuple, strength: float, *, ratio: float = 0.5,
                 ignore: list[str] | None = None):  # fmt: skip
        self.check(strength, ratio)
        self.strength = float(strength)
        self.ratio = float(ratio)
        self.ignore = list(ignore or [])
        self.groups: list[tuple[str, int, list[_Slice]]] = []
        self._build(model, inputs)
        if not self.groups:
            raise UnsupportedLayerError(
                "--sparsity: the model has no prunable channel group to regularize (every group produces an output, "
                "is ignored or could not be mapped); train without --sparsity."
            )

    @staticmethod
    def check(strength: float, ratio: float) -> None:
        """Refuse settings outside their ranges, in one line naming the option."""
        if not 0 < strength < 1e4:  # NaN fails too
            raise ConfigError(f"--sparsity must be a positive decay strength (e.g. 20 to 100), not {strength}.")
        if not 0 < ratio < 1:
            raise ConfigError(f"--sparsity-ratio is the share of channels to empty, in (0, 1), not {ratio}.")

    # ------------------------------------------------------------------ building the slices once
    def _build(self, model: nn.Module, inputs: tuple) -> None:
        planner = Planner(model, PruneConfig(ratio=0.5, ignore=self.ignore))
        was_training = model.training
        set_mode(model, False)
        try:
            planner.reference_forward(inputs)
            with tp_patches.patched(max_indices=1 << 20) as patches:
                try:
                    DG = tp_patches.build_graph(model, inputs)
                except Exception as e:
                    raise UnsupportedLayerError(
                        f"--sparsity: Torch-Pruning could not trace this model's graph ({type(e).__name__}: "
                        f"{str(e)[:300]}); train without --sparsity."
                    ) from None
                planner.attach_graph(DG, patches.blocked)
                for root, name, full, members in planner._groups():
                    if planner._unprunable(full, members):
                        continue
                    channels = DG.get_out_channels(root)
                    slices = self._slices(DG, full)
                    if slices and channels and channels >= 2:
                        self.groups.append((name, channels, slices))
        finally:
            set_mode(model, was_training)

    @staticmethod
    def _slices(DG, group) -> list[_Slice]:
        out: list[_Slice] = []
        for i, (dep, idxs) in enumerate(group):
            mod = dep.target.module
            if not idxs:
                continue
            idx = torch.as_tensor([int(v) for v in idxs], dtype=torch.long)
            root = torch.as_tensor([int(v) for v in group[i].root_idxs], dtype=torch.long)
            out_fn = DG.is_out_channel_pruning_fn(dep.handler)
            if isinstance(mod, tp.ops.TORCH_CONV):
                transposed = bool(getattr(mod, "transposed", False))
                if out_fn:
                    out.append(_Slice(mod.weight, 1 if transposed else 0, idx, root))
                    if mod.bias is not None:
                        out.append(_Slice(mod.bias, 0, idx, root))
                elif mod.groups == 1:  # a grouped convolution's inputs follow its outputs (decayed there)
                    out.append(_Slice(mod.weight, 0 if transposed else 1, idx, root))
            elif isinstance(mod, tp.ops.TORCH_LINEAR):
                out.append(_Slice(mod.weight, 0 if out_fn else 1, idx, root))
                if out_fn and mod.bias is not None:
                    out.append(_Slice(mod.bias, 0, idx, root))
            elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and out_fn:
                for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                    if isinstance(p, nn.Parameter) and p.dim() == 1:
                        out.append(_Slice(p, 0, idx, root))
        # an index beyond a parameter's size (a mapping through a reshape the parameter does not follow) is dropped
        return [s for s in out if s.idxs.numel() and int(s.idxs.max()) < s.param.shape[s.dim]]

    # ------------------------------------------------------------------ every step
    @torch.no_grad()
    def norms(self) -> list[torch.Tensor]:
        """Each group's per-channel L2 norm over all its coupled parameter slices."""
        result = []
        for _, channels, slices in self.groups:
            sq = torch.zeros(channels, dtype=torch.float32, device=slices[0].param.device)
            for s in slices:
                w = s.param.detach().index_select(s.dim, s.idxs.to(s.param.device)).float()
                per = w.transpose(0, s.dim).reshape(w.shape[s.dim], -1).pow(2).sum(1)
                sq.index_add_(0, s.root.to(sq.device), per)
            result.append(sq.sqrt())
        return result

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Shrink the weakest ``ratio`` of each group's channels by ``1 - lr * strength``."""
        decay = max(0.0, 1.0 - lr * self.strength)
        for (_, channels, slices), norm in zip(self.groups, self.norms(), strict=True):
            cut = int(round(self.ratio * channels))
            if cut < 1:
                continue
            shrink = torch.ones_like(norm)
            shrink[torch.argsort(norm)[:cut]] = decay
            for s in slices:
                factor = shrink.to(s.param.device)[s.root.to(s.param.device)].to(s.param.dtype)
                shape = [1] * s.param.dim()
                shape[s.dim] = -1
                view = s.param.data.index_select(s.dim, s.idxs.to(s.param.device)) * factor.view(shape)
                s.param.data.index_copy_(s.dim, s.idxs.to(s.param.device), view)

    def to_json(self) -> dict[str, Any]:
        """What the training card records."""
        return {"kind": "group-decay", "strength": self.strength, "ratio": self.ratio, "groups": len(self.groups),
                "ignore": self.ignore}  # fmt: skip
