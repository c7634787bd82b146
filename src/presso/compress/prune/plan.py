"""Planning a pruning: which coupled channel groups, and which channel indices in each.

:class:`Planner` holds what planning needs about one model -- its layer names, the layers the config ignores, its
attention modules and their output projections, and (once built) the dependency graph and the nodes whose index
mapping failed -- and turns each coupled group into a :class:`Plan`, or into a reported reason it is left unpruned.
It changes nothing in the model; :mod:`presso.compress.prune.pruner` applies the plans.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from presso.compress.prune import tp_patches
from presso.compress.prune.config import PruneConfig
from presso.errors import ConfigError, PressoError, UnsupportedLayerError, closest
from presso.models.figures import run_model

__all__ = ["Plan", "Planner"]


@dataclass
class Plan:
    """One pruning step: a coupled group's root, its pruning function and indices, and what follows with it."""

    name: str  # the layer that names this group in reports
    root: Any
    fn: Any
    idxs: list[int]
    fixups: list[tuple[nn.Module, str, Any]]  # (module, attribute, new value) applied with the group
    # a second coupled group pruned in the same step -- (root, fn, idxs) -- and the module whose in-channel entry in
    # it is left out (a grouped convolution losing whole groups keeps its per-group weights; fixups set its sizes)
    also: tuple[Any, Any, list[int]] | None = None
    spare: nn.Module | None = None


class Planner:
    """Plans the pruning of one model by a PruneConfig: validates the config's layer names against the model on
    creation, then, given the dependency graph (:meth:`attach_graph`), plans every coupled group."""

    def __init__(self, model: nn.Module, cfg: PruneConfig):
        self.model = model
        self.cfg = cfg
        self.names = {m: n for n, m in model.named_modules()}
        self.by_name = {n: m for m, n in self.names.items()}
        self.skipped: list[dict[str, str]] = []
        self.ignored = self._resolve_ignored()
        self._validate_names()
        self.attn_parent = self._attention_children()
        self.attn_proj: dict[nn.Module, nn.Module] = {}
        self.DG: Any = None
        self.blocked: dict[Any, str] = {}

    def attach_graph(self, DG: tp.DependencyGraph, blocked: dict[Any, str]) -> None:
        """Plan on ``DG``; ``blocked`` (filled while it is built) holds the nodes whose index mapping failed."""
        self.DG = DG
        self.blocked = blocked

    def skip(self, name: str, reason: str) -> None:
        """Report layer ``name`` as left unpruned, with the reason."""
        self.skipped.append({"name": name, "reason": reason})

    # ---- configuration checks against the model
    def _resolve_ignored(self) -> set[nn.Module]:
        ignored = set()
        for pat in self.cfg.ignore:
            hits = [m for n, m in self.by_name.items() if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
            if not hits:
                raise ConfigError(f"Ignored layer '{pat}' matches no layer of the model.{closest(pat, self.by_name)}")
            for m in hits:
                ignored.update(m.modules())
        return ignored

    def _validate_names(self) -> None:
        for what, mapping in (("per-layer ratio", self.cfg.per_layer), ("indices", self.cfg.indices)):
            for name in mapping:
                if name not in self.by_name or name == "":
                    raise ConfigError(
                        f"Layer '{name}' in the {what} file does not exist in the model.{closest(name, self.by_name)}"
                    )

    def _attention_children(self) -> dict[nn.Module, nn.Module]:
        """Linear layers that are direct children of an attention module (one with an integer ``num_heads``)."""
        parent = {}
        for m in self.model.modules():
            heads = getattr(m, "num_heads", None)
            if isinstance(m, nn.MultiheadAttention) or not isinstance(heads, int) or heads < 2:
                continue
            for child in m.children():
                if isinstance(child, nn.Linear):
                    parent[child] = m
        return parent

    def reference_forward(self, inputs: tuple) -> Any:
        """Run the model once and return its output; note which attention child linear runs last in each attention
        module: that is its output projection, the others produce the heads (q/k/v/qkv, gates)."""
        order: list[nn.Module] = []
        hooks = [lin.register_forward_hook(lambda mod, i, o: order.append(mod)) for lin in self.attn_parent]
        try:
            with torch.no_grad():
                out = run_model(self.model, inputs)
        finally:
            for h in hooks:
                h.remove()
        self.attn_proj = {}
        for lin in order:  # the last call wins
            self.attn_proj[self.attn_parent[lin]] = lin
        return out

    # ---- planning: which groups, which indices
    def _groups(self):
        """Each coupled out-channel group once: (root module, its name, the full group, out-channel members)."""
        DG = self.DG
        roots = [m for m in DG.module2node if isinstance(m, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR))]
        if not roots:
            raise UnsupportedLayerError(
                "The model has no convolution or linear *modules* to prune (a torch.export .pt2 program has its "
                "layers inlined as functions); prune the source model instead."
            )
        visited: set[Any] = set()
        deferred = []  # groups holding only some chunks of a channel split: after the group producing the split
        for m in roots:
            if m in visited or m in self.ignored:
                continue
            name = self.names.get(m, str(type(m).__name__))
            try:
                pruner = DG.get_pruner_of_module(m)
                channels = DG.get_out_channels(m)
                if pruner is None or channels is None or channels < 2:
                    continue
                full = DG.get_pruning_group(m, pruner.prune_out_channels, list(range(channels)))
            except Exception as e:
                visited.add(m)
                self.skip(name, f"dependency graph failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            members = [d.target.module for d, _ in full if DG.is_out_channel_pruning_fn(d.handler)]
            if tp_patches.split_chunks(full) == tp_patches.SPLIT_PARTIAL:
                deferred.append((m, name, full, members))
                continue
            visited.update(members)
            yield m, name, full, members
        for m, name, full, members in deferred:
            if m not in visited:
                visited.update(members)
                yield m, name, full, members

    def plan(self, importance) -> tuple[list[Plan], int]:
        """The plans for every coupled group, and the number of groups considered. ``importance`` is the criterion's
        Torch-Pruning importance object (None for criterion "index": the config names the channels)."""
        plans: list[Plan] = []
        total = 0
        entries = list(self._groups())
        pairs = self._whole_group_pairs(entries)
        partners = {y for y, _ in pairs.values()}
        for i, (m, name, full, members) in enumerate(entries):
            if i in partners:  # pruned with the grouped convolution it feeds
                continue
            total += 1
            try:
                if i in pairs:
                    y, conv = pairs[i]
                    plan = self._plan_whole_groups(conv, entries[i], entries[y], importance)
                else:
                    plan = self._plan_group(m, name, full, members, importance)
            except PressoError:
                raise
            except Exception as e:  # a broken mapping inside TP for this group only
                self.skip(name, f"could not rank channels: {type(e).__name__}: {str(e)[:160]}")
                continue
            if plan is not None:
                plans.append(plan)
        return plans, total

    @staticmethod
    def _grouped_conv(mod) -> bool:
        """A grouped convolution that is not depthwise (ResNeXt, RegNet): 1 < groups < channels."""
        return isinstance(mod, tp.ops.TORCH_CONV) and 1 < mod.groups < mod.out_channels

    def _whole_group_pairs(self, entries) -> dict[int, tuple[int, nn.Module]]:
        """With ``grouped="groups"``: entry index of a grouped convolution's output group -> (entry index of the
        group feeding its input, the convolution). Paired only when both groups are prunable and neither involves
        another grouping (a second grouped convolution, a GroupNorm, attention heads) that whole-group removal would
        have to respect too; everything else keeps per-group channel removal."""
        if self.cfg.grouped != "groups" or self.cfg.criterion == "index":
            return {}
        DG = self.DG
        kinds = tp.ops.OPTYPE
        relayout = {kinds.RESHAPE, kinds.SPLIT, kinds.UNBIND, kinds.EXPAND, kinds.SLICE}
        feeds: dict[nn.Module, int] = {}  # grouped conv -> entry holding its input channels
        for i, (_m, _n, full, _members) in enumerate(entries):
            for d, _ in full:
                if self._grouped_conv(d.target.module) and DG.is_in_channel_pruning_fn(d.handler):
                    feeds[d.target.module] = i

        def others(full, conv) -> bool:  # any grouping besides `conv` itself, or a node re-laying channels out
            for d, _ in full:
                mod = d.target.module
                if d.target.type in relayout:  # e.g. ResNeSt's view by radix: whole groups would mix its splits
                    return True
                if mod is conv:
                    continue
                if isinstance(mod, (nn.GroupNorm, nn.MultiheadAttention)) or mod in self.attn_parent:
                    return True
                if isinstance(mod, tp.ops.TORCH_CONV) and mod.groups > 1:
                    return True
            return False

        pairs: dict[int, tuple[int, nn.Module]] = {}
        used: set[int] = set()
        for i, (_m, _n, full, members) in enumerate(entries):
            convs = [mod for mod in members if self._grouped_conv(mod)]
            if len(convs) != 1:
                continue
            conv = convs[0]
            y = feeds.get(conv)
            if y is None or y == i or y in used or y in pairs or i in used:
                continue
            coupled = any(d.target.module is conv and DG.is_in_channel_pruning_fn(d.handler) for d, _ in full)
            if coupled or others(full, conv) or others(entries[y][2], conv):
                continue
            if self._unprunable(full, members) or self._unprunable(entries[y][2], entries[y][3]):
                continue
            pairs[i] = (y, conv)
            used.update((i, y))
        return pairs

    def _plan_whole_groups(self, conv, out_entry, in_entry, importance) -> Plan | None:
        """Remove whole groups of a grouped convolution: its output channels of those groups (with their coupled
        layers) and the input channels feeding them (with theirs), and lower ``groups``; the kept groups' weights are
        untouched. Groups are ranked by the mean importance of their output plus input channels."""
        DG = self.DG
        _m, name, out_full, out_members = out_entry
        _, _, in_full, in_members = in_entry
        name = self.names.get(conv, name)
        ratio = self._ratio_for(out_members + in_members)
        if not ratio or importance is None:
            return None
        G = conv.groups
        wo, wi = conv.out_channels // G, conv.in_channels // G
        imp_out, imp_in = importance(out_full), importance(in_full)
        if imp_out is None or imp_in is None or len(imp_out) != conv.out_channels or len(imp_in) != conv.in_channels:
            self.skip(name, "no importance scores for this group (no weights to rank)")
            return None
        score = imp_out.detach().float().cpu().view(G, wo).mean(1) + imp_in.detach().float().cpu().view(G, wi).mean(1)
        keep = G - round(ratio * G)
        r = self.cfg.round_to
        if r and min(conv.out_channels, conv.in_channels) >= 2 * r:
            step = math.lcm(r // math.gcd(r, wo), r // math.gcd(r, wi))
            keep = max(step, int(round(keep / step)) * step)
        keep = min(max(keep, 1), G)
        if keep == G:
            return None
        drop = torch.argsort(score)[: G - keep].tolist()
        pruner = DG.get_pruner_of_module(conv)
        out_idxs = sorted(g * wo + j for g in drop for j in range(wo))
        in_idxs = sorted(g * wi + j for g in drop for j in range(wi))
        fixups = [(conv, "in_channels", keep * wi), (conv, "groups", keep)]
        return Plan(name, conv, pruner.prune_out_channels, out_idxs, fixups,
                     also=(conv, pruner.prune_in_channels, in_idxs), spare=conv)  # fmt: skip

    def coupled_groups(self) -> list[list[str]]:
        """Names of the layers whose output channels are pruned together, per prunable group (groups producing
        the model's outputs left out) -- what per-layer recommendations must treat as one unit. A grouped
        convolution thinned by whole groups forms one unit with the group feeding it, its own layers first."""
        entries = list(self._groups())
        pairs = self._whole_group_pairs(entries)
        partners = {y for y, _ in pairs.values()}
        out = []
        for i, (_m, _name, full, members) in enumerate(entries):
            if i in partners or self._feeds_output(full):
                continue
            if i in pairs:  # a grouped convolution's output group and the group feeding it: one unit
                members = members + entries[pairs[i][0]][3]
            names = [self.names[x] for x in members if x in self.names and hasattr(x, "weight")]
            if names:
                out.append(names)
        return out

    def _ratio_for(self, members: list) -> float | None:
        for mod in members:
            n = self.names.get(mod)
            if n in self.cfg.per_layer:
                return float(self.cfg.per_layer[n])
        return self.cfg.ratio

    def _feeds_output(self, full) -> bool:
        """Whether a coupled group produces (part of) the model's output: a layer whose output has no consumer."""
        DG = self.DG
        return any(
            d.target.type == tp.ops.OPTYPE.OUTPUT or (DG.is_out_channel_pruning_fn(d.handler) and not d.target.outputs)
            for d, _ in full
        )

    def _unprunable(self, full, members) -> str | None:
        """Why a coupled group may not be pruned at all, if it may not."""
        if self._feeds_output(full):
            return "produces the model's output; pruning it would change the output shape"
        blocked = [self.blocked[d.target] for d, _ in full if d.target in self.blocked]
        if blocked:
            return f"channels pass through a node whose index mapping failed ({blocked[0]})"
        hit = [self.names[mod] for mod in members if mod in self.ignored and mod in self.names]
        if hit:
            return f"coupled with ignored layer {hit[0]}"
        chunks = tp_patches.split_chunks(full)
        return chunks if isinstance(chunks, str) else None

    def _plan_group(self, root, name, full, members, importance) -> Plan | None:
        DG = self.DG
        reason = self._unprunable(full, members)
        if reason:
            self.skip(name, reason)
            return None

        # criterion "index": the user names a layer and its output channels
        if self.cfg.criterion == "index":
            named = [mod for mod in members if self.names.get(mod) in self.cfg.indices]
            if not named:
                return None
            layer = named[0]
            idxs = sorted(set(self.cfg.indices[self.names[layer]]))
            channels = DG.get_out_channels(layer)
            if idxs and idxs[-1] >= channels:
                raise ConfigError(
                    f"Index {idxs[-1]} for layer '{self.names[layer]}' is out of range: it has {channels} channels."
                )
            if len(idxs) >= channels:
                raise ConfigError(f"Indices for '{self.names[layer]}' would remove all {channels} channels.")
            layer_pruner = DG.get_pruner_of_module(layer)
            return Plan(self.names[layer], layer, layer_pruner.prune_out_channels, idxs, [])

        ratio = self._ratio_for(members)
        if not ratio:
            return None

        fn = DG.get_pruner_of_module(root).prune_out_channels
        group = full
        channels = DG.get_out_channels(root)
        fixups_for = None  # attention module whose attributes follow the pruning
        heads = 1
        # inside an attention module: a head-producing linear (q/k/v/qkv) is pruned on its outputs
        attn = {
            self.attn_parent[mod]
            for mod in members
            if mod in self.attn_parent and self.attn_proj.get(self.attn_parent[mod]) is not mod
        }
        if attn:
            if len(attn) > 1:
                self.skip(name, "couples the insides of several attention modules; left unpruned")
                return None
            (parent,) = attn
            heads = parent.num_heads
            proj = self.attn_proj.get(parent)
            coupled = any(d.target.module is proj and DG.is_in_channel_pruning_fn(d.handler) for d, _ in full)
            if proj is None or not coupled or proj.in_features % heads:
                self.skip(name, "attention heads could not be matched to an output projection; left unpruned")
                return None
            # Root the group on the projection's inputs, laid out as [heads, head_dim]: indices chosen per head there
            # map through Torch-Pruning's reshape/unbind index mapping to the same head dims in q, k and v.
            root, channels = proj, proj.in_features
            fn = DG.get_pruner_of_module(root).prune_in_channels
            group = DG.get_pruning_group(root, fn, list(range(channels)))
            name = self.names.get(root, name)
            fixups_for = parent

        chunks = tp_patches.split_chunks(group)
        if isinstance(chunks, str):
            self.skip(name, chunks)
            return None
        ch_groups = math.lcm(heads, chunks)  # a chunked layer loses the same channels in every chunk
        for d, _ in group:
            mod = d.target.module
            if isinstance(mod, nn.MultiheadAttention):
                ch_groups = math.lcm(ch_groups, mod.num_heads)
            elif isinstance(mod, tp.ops.TORCH_CONV) and mod.groups > 1 and mod.groups != mod.out_channels:
                ch_groups = math.lcm(ch_groups, mod.groups)
            elif isinstance(mod, nn.GroupNorm):
                ch_groups = math.lcm(ch_groups, mod.num_groups)
        if channels % ch_groups:
            self.skip(name, f"{channels} channels do not split into {ch_groups} equal groups")
            return None
        per = channels // ch_groups

        if importance is None:
            return None
        imp = importance(group)
        if imp is None or len(imp) != channels:
            self.skip(name, "no importance scores for this group (no weights to rank)")
            return None
        imp = imp.detach().float().cpu()

        if fixups_for is not None and self.cfg.attention == "heads":
            head_imp = imp.view(heads, per).mean(1)
            keep = max(1, heads - round(ratio * heads))
            drop_heads = torch.argsort(head_imp)[: heads - keep].tolist()
            if not drop_heads:
                return None
            idxs = sorted(h * per + d for h in drop_heads for d in range(per))
            fixups = self._attention_fixups(fixups_for, heads=keep, head_dim=per)
            return Plan(name, root, fn, idxs, fixups)

        keep = per - round(ratio * per)
        if self.cfg.round_to and channels >= 2 * self.cfg.round_to:
            step = self.cfg.round_to // math.gcd(self.cfg.round_to, ch_groups)
            keep = max(step, int(round(keep / step)) * step)
        keep = min(max(keep, 1), per)
        if keep == per:
            return None
        offsets = torch.argsort(imp.view(ch_groups, per).mean(0))[: per - keep].tolist()
        idxs = sorted(g * per + o for g in range(ch_groups) for o in offsets)
        fixups = self._attention_fixups(fixups_for, heads=heads, head_dim=keep) if fixups_for is not None else []
        return Plan(name, root, fn, idxs, fixups)

    @staticmethod
    def _attention_fixups(parent: nn.Module, heads: int, head_dim: int) -> list[tuple[nn.Module, str, Any]]:
        """Attribute updates that keep an attention module's reshapes consistent with its pruned projections."""
        fix: list[tuple[nn.Module, str, Any]] = []
        old_hd = getattr(parent, "head_dim", None)
        if heads != parent.num_heads:
            fix.append((parent, "num_heads", heads))
        if isinstance(old_hd, int) and old_hd != head_dim:
            fix.append((parent, "head_dim", head_dim))
            scale = getattr(parent, "scale", None)
            # keep the explicit-softmax path equal to the fused one (SDPA scales by the actual head dim)
            if isinstance(scale, float) and math.isclose(scale, old_hd**-0.5, rel_tol=1e-6):
                fix.append((parent, "scale", head_dim**-0.5))
        for attr in ("attn_dim", "all_head_dim", "inner_dim"):
            if isinstance(getattr(parent, attr, None), int):
                fix.append((parent, attr, heads * head_dim))
        return fix
