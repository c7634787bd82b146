"""Structured pruning of any PyTorch model, from its graph.

Coupled layers are found by Torch-Pruning's dependency graph (DepGraph). On top of it Presso adds what a plain
DepGraph recipe lacks for models it has never seen:

* **group-by-group pruning with a forward check and rollback** -- groups are applied in chunks; when the model no
  longer runs (or its output shapes change) the chunk is rolled back and retried group by group, and a group that
  breaks the model is left unpruned and reported with the reason. Rollback restores the touched modules' attribute
  dictionaries, so it costs no tensor copies;
* **errors contained per group** -- an index error in one concat/split/reshape mapping skips that group only;
* **grouped convolutions thinned by whole groups** -- a grouped convolution (ResNeXt, RegNet) loses whole groups
  (its ``groups`` falls, each group keeps its width) together with the matching input channels, instead of the same
  channels of every group: narrower groups cut MACs but barely time, since a grouped convolution's speed is set by
  its group width (``grouped="width"`` keeps the old way);
* **attention heads kept consistent** -- groups inside a module with ``num_heads`` are re-rooted on the attention's
  output projection and pruned per head (same head-dims in every head, or whole heads), and the module's
  ``head_dim``/``attn_dim``/``num_heads``/``scale`` are updated;
* **a replayable record** -- every pruning call is recorded (layer, function, indices), so loading a model directory
  replays it without a graph build.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from presso.compress.recipe import register_replay, resolve
from presso.errors import ConfigError, InputSpecError, PressoError, UnsupportedLayerError, closest
from presso.models.figures import run_model, set_mode

CRITERIA = ("l1", "l2", "gm", "taylor", "random", "index")
ATTENTION_MODES = ("head_dim", "heads")
GROUPED_MODES = ("groups", "width")
_CHECK_CHUNK = 16  # groups applied between two forward checks


@dataclass
class PruneConfig:
    """Structured (channel) pruning.

    ratio: fraction of channels removed from every prunable group (0 < ratio < 1); None prunes only the layers
        named in ``per_layer`` / ``indices``.
    criterion: l1 | l2 | gm (geometric median) | taylor (first-order, needs data) | random | index.
    per_layer: layer name (as in ``named_modules()``) -> ratio, overriding ``ratio`` for that layer's group.
    indices: for ``criterion="index"``: layer name -> output-channel indices to remove.
    ignore: layer names or glob patterns never pruned. Layers that produce the model's outputs (classifier heads,
        detection/segmentation heads) are never pruned, since that would change the output shapes.
    round_to: keep a multiple of this many channels in layers with at least twice as many (hardware-friendly).
    attention: "head_dim" removes the same dimensions from every head; "heads" removes whole heads.
    grouped: "groups" thins a grouped convolution by removing whole groups (with their input channels); "width"
        removes the same channels from every group.
    """

    ratio: float | None = 0.5
    criterion: str = "l2"
    per_layer: dict[str, float] = field(default_factory=dict)
    indices: dict[str, list[int]] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    round_to: int | None = 8
    attention: str = "head_dim"
    grouped: str = "groups"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"Unknown criterion '{self.criterion}': use one of {', '.join(CRITERIA)}.")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ConfigError(f"Pruning ratio {self.ratio} is outside (0, 1): e.g. 0.5 removes half the channels.")
        for name, r in self.per_layer.items():
            if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
                raise ConfigError(f"Per-layer ratio {r} for '{name}' is outside [0, 1).")
        if self.criterion == "index" and not self.indices:
            raise ConfigError("criterion 'index' needs channel indices per layer (--indices FILE.json).")
        if self.indices and self.criterion != "index":
            raise ConfigError("Channel indices were given but the criterion is not 'index'; use --criterion index.")
        for name, idx in self.indices.items():
            if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in idx):
                raise ConfigError(f"Indices for '{name}' must be a list of non-negative integers.")
        if self.ratio is None and not self.per_layer and not self.indices:
            raise ConfigError("Nothing to prune: give a ratio, per-layer ratios or channel indices.")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"round_to must be a positive integer or None, got {self.round_to}.")
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"Unknown attention mode '{self.attention}': use one of {', '.join(ATTENTION_MODES)}.")
        if self.grouped not in GROUPED_MODES:
            raise ConfigError(f"Unknown grouped mode '{self.grouped}': use one of {', '.join(GROUPED_MODES)}.")
        self.ignore = list(self.ignore)

    def to_json(self) -> dict[str, Any]:
        return {"method": "prune", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        return cls(**data)


def load_layer_file(path: str | Path, what: str) -> dict[str, Any]:
    """Read a per-layer JSON or YAML mapping (layer name -> value)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"Cannot read {what} file '{p}': {e.strerror}.") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"{what.capitalize()} file '{p}' is not valid {p.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what.capitalize()} file '{p}' must map layer names to values.")
    return data


# --------------------------------------------------------------------------- importance criteria (registry)
_IMPORTANCE: dict[str, Any] = {}


def register_importance(name: str):
    def deco(fn):
        _IMPORTANCE[name] = fn
        return fn

    return deco


@register_importance("l1")
def _l1(cfg):
    return tp.importance.GroupMagnitudeImportance(p=1)


@register_importance("l2")
def _l2(cfg):
    return tp.importance.GroupMagnitudeImportance(p=2)


@register_importance("gm")
def _gm(cfg):
    return tp.importance.FPGMImportance(p=2)


@register_importance("taylor")
def _taylor(cfg):
    return tp.importance.GroupTaylorImportance()


@register_importance("random")
def _random(cfg):
    return tp.importance.RandomImportance()


# --------------------------------------------------------------------------- results
@dataclass
class PruneOutcome:
    ops: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    groups_pruned: int
    groups_total: int
    graph_seconds: float


@dataclass
class _Plan:
    name: str  # the layer that names this group in reports
    root: Any
    fn: Any
    idxs: list[int]
    fixups: list[tuple[nn.Module, str, Any]]  # (module, attribute, new value) applied with the group
    # a second coupled group pruned in the same step -- (root, fn, idxs) -- and the module whose in-channel entry in
    # it is left out (a grouped convolution losing whole groups keeps its per-group weights; fixups set its sizes)
    also: tuple[Any, Any, list[int]] | None = None
    spare: nn.Module | None = None


# --------------------------------------------------------------------------- output signature / forward check
def _signature(out: Any) -> Any:
    """Structure and per-item shapes of a model output. The leading dimension is excluded: it is the batch, or a
    data-dependent count (detections), neither of which pruning may change in a way that matters."""
    if isinstance(out, torch.Tensor):
        return ("T", out.dim(), tuple(out.shape[1:]))
    if isinstance(out, dict):
        return ("D", tuple((k, _signature(v)) for k, v in out.items()))
    if isinstance(out, (list, tuple)):
        return ("L", tuple(_signature(v) for v in out))
    return (type(out).__name__,)


def _loss_for_gradients(out: Any, labels: torch.Tensor | None) -> torch.Tensor:
    """A loss for first-order (Taylor) importance: cross-entropy with labels, else with the model's own predictions
    for logits, else the squared output magnitude for any other output structure."""
    tensors = [t for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise UnsupportedLayerError("The model returns no floating-point tensor to compute Taylor importance from.")
    first = tensors[0]
    if first.dim() == 2 and first.shape[1] > 1:
        target = labels if labels is not None else first.argmax(1).detach()
        return nn.functional.cross_entropy(first, target)
    return sum((t.float() ** 2).mean() for t in tensors)


# --------------------------------------------------------------------------- the pruner
class GraphPruner:
    """Prunes one model according to a PruneConfig. Use through :func:`prune_model`."""

    def __init__(self, model: nn.Module, inputs: tuple, cfg: PruneConfig, data=None, progress=None):
        self.model = model
        self.inputs = inputs
        self.cfg = cfg
        self.data = data
        self.progress = progress
        self.names = {m: n for n, m in model.named_modules()}
        self.by_name = {n: m for m, n in self.names.items()}
        self.skipped: list[dict[str, str]] = []
        self.ops: list[dict[str, Any]] = []
        self.ignored = self._resolve_ignored()
        self._validate_names()
        self.attn_parent = self._attention_children()

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

    def _reference_forward(self) -> Any:
        """Run the model once; note which attention child linear runs last in each attention module: that is its
        output projection, the others produce the heads (q/k/v/qkv, gates)."""
        order: list[nn.Module] = []
        hooks = [lin.register_forward_hook(lambda mod, i, o: order.append(mod)) for lin in self.attn_parent]
        try:
            with torch.no_grad():
                out = run_model(self.model, self.inputs)
        finally:
            for h in hooks:
                h.remove()
        self.attn_proj = {}
        for lin in order:  # the last call wins
            self.attn_proj[self.attn_parent[lin]] = lin
        return out

    # ---- main entry
    def run(self) -> PruneOutcome:
        model = self.model
        set_mode(model, False)
        try:
            self.reference = _signature(self._reference_forward())
        except Exception as e:
            shapes = ", ".join(str(tuple(x.shape)) for x in self.inputs)
            raise InputSpecError(
                f"The model does not run on inputs of shape {shapes}: {type(e).__name__}: {str(e)[:300]}. "
                "Fix --input-shape."
            ) from None
        importance = _IMPORTANCE[self.cfg.criterion](self.cfg) if self.cfg.criterion != "index" else None
        if self.cfg.criterion == "taylor":
            self._accumulate_gradients()
        dims = [getattr(m, a, None) for m in model.modules() for a in ("in_channels", "out_channels", "in_features",
                                                                           "out_features")]  # fmt: skip
        widest = max([d for d in dims if isinstance(d, int)] + [1])
        limits: dict[str, int] = {}
        # both patches go in before the graph is built: the mappings it creates are the ones every walk then uses
        with self._robust_index_mapping(), _bounded_traversal(max_indices=4 * widest, limits=limits):
            t0 = time.perf_counter()
            try:
                self.DG = tp.DependencyGraph().build_dependency(model, example_inputs=self.inputs, verbose=False)
            except Exception as e:
                raise UnsupportedLayerError(
                    f"Torch-Pruning could not trace this model's graph ({type(e).__name__}: {str(e)[:300]}); "
                    "nothing was pruned. Try other example inputs, or report the model."
                ) from None
            graph_seconds = time.perf_counter() - t0
            limits["items"] = 4 * sum(len(n.dependencies) for n in self.DG.module2node.values()) + 100
            plans, total = self._plan(importance)
            pruned = self._apply(plans)
        model.zero_grad(set_to_none=True)
        return PruneOutcome(self.ops, self.skipped, pruned, total, graph_seconds)

    def _accumulate_gradients(self) -> None:
        if self.data is None:
            raise ConfigError("criterion 'taylor' needs a few batches of data: pass data=... (CLI: --calib DIR).")
        self.model.zero_grad(set_to_none=True)
        n = 0
        for batch in self.data:
            inputs, labels = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            _loss_for_gradients(run_model(self.model, inputs), labels).backward()
            n += 1
        if n == 0:
            raise ConfigError("criterion 'taylor' got an empty data iterable; give at least one batch.")

    @contextlib.contextmanager
    def _robust_index_mapping(self):
        """DepGraph's index-mapping update, made robust and incremental.

        Written by hand (a 10-line dispatch loop replacing Torch-Pruning's ``update_index_mapping``) because:

        * one unmappable node aborts Torch-Pruning's whole graph build -- a channel shuffle's ``view`` divides by
          zero (ShuffleNet). Here the node is recorded in ``self.blocked`` with the reason, and every group whose
          channels pass through it is left unpruned and reported: guessing a mapping could silently permute channels;
        * Torch-Pruning recomputes every mapping of the graph on each ``get_pruning_group`` call, which makes planning
          O(groups x nodes) (70% of the time on DenseNet). Mappings derive from sizes held by placeholder nodes
          (concat, split, reshape, ...), which change only when a group through such a node is pruned or rolled
          back; ``self._mapping_dirty`` tracks exactly that.
        """
        from torch_pruning.dependency import index_mapping as im

        original = im.update_index_mapping
        kinds = tp.ops.OPTYPE
        updaters = {
            kinds.CONCAT: im.update_concat_index_mapping,
            kinds.SPLIT: im.update_split_index_mapping,
            kinds.RESHAPE: im.update_reshape_index_mapping,
            kinds.UNBIND: im.update_unbind_index_mapping,
            kinds.EXPAND: im.update_expand_index_mapping,
            kinds.SLICE: im.update_slice_index_mapping,
        }
        self._mapping_dirty = True
        self.blocked: dict[Any, str] = {}

        def update(graph):
            if not self._mapping_dirty:
                return
            for node in list(graph.module2node.values()):
                fn = updaters.get(node.type)
                if fn is None:
                    continue
                try:
                    fn(graph, node)
                except Exception as e:
                    self.blocked[node] = f"{node.type.name.lower()} node: {type(e).__name__}: {e}"[:160]
            self._mapping_dirty = False

        im.update_index_mapping = update
        try:
            yield
        finally:
            im.update_index_mapping = original

    # ---- planning: which groups, which indices
    def _skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

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
                self._skip(name, f"dependency graph failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            members = [d.target.module for d, _ in full if DG.is_out_channel_pruning_fn(d.handler)]
            visited.update(members)
            yield m, name, full, members

    def _plan(self, importance) -> tuple[list[_Plan], int]:
        plans: list[_Plan] = []
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
                self._skip(name, f"could not rank channels: {type(e).__name__}: {str(e)[:160]}")
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

    def _plan_whole_groups(self, conv, out_entry, in_entry, importance) -> _Plan | None:
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
            self._skip(name, "no importance scores for this group (no weights to rank)")
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
        return _Plan(name, conv, pruner.prune_out_channels, out_idxs, fixups,
                     also=(conv, pruner.prune_in_channels, in_idxs), spare=conv)  # fmt: skip

    def coupled_groups(self) -> list[list[str]]:
        """Names of the layers whose output channels are pruned together, per prunable group (groups producing
        the model's outputs left out) -- what per-layer recommendations must treat as one unit. A grouped
        convolution thinned by whole groups forms one unit with the group feeding it, its own layers first."""
        set_mode(self.model, False)
        with self._robust_index_mapping(), _bounded_traversal(max_indices=1 << 20, limits={}):
            try:
                self.DG = tp.DependencyGraph().build_dependency(self.model, example_inputs=self.inputs, verbose=False)
            except Exception as e:
                raise UnsupportedLayerError(f"Torch-Pruning could not trace this model's graph ({e!s:.300})") from None
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
        return None

    def _plan_group(self, root, name, full, members, importance) -> _Plan | None:
        DG = self.DG
        reason = self._unprunable(full, members)
        if reason:
            self._skip(name, reason)
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
            return _Plan(self.names[layer], layer, layer_pruner.prune_out_channels, idxs, [])

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
                self._skip(name, "couples the insides of several attention modules; left unpruned")
                return None
            (parent,) = attn
            heads = parent.num_heads
            proj = self.attn_proj.get(parent)
            coupled = any(d.target.module is proj and DG.is_in_channel_pruning_fn(d.handler) for d, _ in full)
            if proj is None or not coupled or proj.in_features % heads:
                self._skip(name, "attention heads could not be matched to an output projection; left unpruned")
                return None
            # Root the group on the projection's inputs, laid out as [heads, head_dim]: indices chosen per head there
            # map through Torch-Pruning's reshape/unbind index mapping to the same head dims in q, k and v.
            root, channels = proj, proj.in_features
            fn = DG.get_pruner_of_module(root).prune_in_channels
            group = DG.get_pruning_group(root, fn, list(range(channels)))
            name = self.names.get(root, name)
            fixups_for = parent

        ch_groups = heads
        for d, _ in group:
            mod = d.target.module
            if isinstance(mod, nn.MultiheadAttention):
                ch_groups = math.lcm(ch_groups, mod.num_heads)
            elif isinstance(mod, tp.ops.TORCH_CONV) and mod.groups > 1 and mod.groups != mod.out_channels:
                ch_groups = math.lcm(ch_groups, mod.groups)
            elif isinstance(mod, nn.GroupNorm):
                ch_groups = math.lcm(ch_groups, mod.num_groups)
        if channels % ch_groups:
            self._skip(name, f"{channels} channels do not split into {ch_groups} equal groups")
            return None
        per = channels // ch_groups

        if importance is None:
            return None
        imp = importance(group)
        if imp is None or len(imp) != channels:
            self._skip(name, "no importance scores for this group (no weights to rank)")
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
            return _Plan(name, root, fn, idxs, fixups)

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
        return _Plan(name, root, fn, idxs, fixups)

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

    # ---- applying with forward checks and rollback
    def _forward_ok(self) -> str | None:
        try:
            with torch.no_grad():
                sig = _signature(run_model(self.model, self.inputs))
        except Exception as e:
            return f"model no longer runs: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if sig != self.reference:
            return "output shapes changed"
        return None

    def _snapshot(self, group, extra: list[nn.Module]) -> tuple:
        DG = self.DG
        modules: dict[int, nn.Module] = {id(m): m for m in extra}
        nodes = []
        for d, _ in group:
            target = d.target.module
            if isinstance(target, nn.Parameter):
                pname = DG._param_to_name.get(target, "")
                parent = self.model.get_submodule(pname.rpartition(".")[0]) if "." in pname else self.model
                modules[id(parent)] = parent
                nodes.append((d.target, target))
            elif isinstance(target, nn.Module):
                for sub in target.modules():
                    modules[id(sub)] = sub
        saved = [
            (
                m,
                dict(vars(m)),
                dict(m._parameters),
                dict(m._buffers),
                dict(m._modules),
            )
            for m in modules.values()
        ]
        return saved, nodes, dict(DG._param_to_name), dict(DG.module2node)

    def _restore(self, snap) -> None:
        self._mapping_dirty = True
        saved, nodes, p2n, m2n = snap
        for m, d, params, bufs, mods in saved:
            d = dict(d)
            d["_parameters"], d["_buffers"], d["_modules"] = params, bufs, mods
            vars(m).clear()
            vars(m).update(d)
        for node, module in nodes:
            node.module = module
        self.DG._param_to_name.clear()
        self.DG._param_to_name.update(p2n)
        self.DG.module2node.clear()
        self.DG.module2node.update(m2n)

    def _record(self, group) -> list[dict[str, Any]]:
        ops = []
        for d, idxs in group:
            target = d.target.module
            if isinstance(target, nn.Parameter):
                name, kind = self.DG._param_to_name.get(target), "param"
            else:
                name, kind = self.names.get(target), "module"
            if name is None or not idxs:  # Torch-Pruning's own placeholder ops (concat, split, ...) hold no state
                continue
            ops.append(
                {
                    "op": "prune",
                    "target": name,
                    "kind": kind,
                    "pruner": type(d.handler.__self__).__name__,
                    "fn": d.handler.__name__,
                    "dim": d.target.pruning_dim,
                    "idxs": [int(i) for i in idxs],
                }
            )
        return ops

    def _apply_one(self, plan: _Plan):
        """Apply a plan; return (snapshot, ops) or raise with the reason it could not be applied."""
        group = self.DG.get_pruning_group(plan.root, plan.fn, plan.idxs)
        if plan.also is not None:
            for d, idxs in self.DG.get_pruning_group(*plan.also):
                if not (d.target.module is plan.spare and self.DG.is_in_channel_pruning_fn(d.handler)):
                    group.add_dep(d, idxs)
        if not self.DG.check_pruning_group(group):
            raise _Skip("would remove every channel of a coupled layer")
        snap = self._snapshot(group, [mod for mod, _, _ in plan.fixups])
        ops = self._record(group)
        if any(not isinstance(d.target.module, nn.Parameter) and d.target.module not in self.names for d, _ in group):
            self._mapping_dirty = True  # a placeholder node (concat, split, reshape, ...) is in this group
        try:
            group.prune(record_history=False)
            for mod, attr, value in plan.fixups:
                setattr(mod, attr, value)
                ops.append({"op": "setattr", "target": self.names[mod], "attr": attr, "value": value})
        except Exception as e:
            self._restore(snap)
            raise _Skip(f"pruning failed: {type(e).__name__}: {str(e)[:160]}") from None
        return snap, ops

    def _apply(self, plans: list[_Plan]) -> int:
        pruned = 0
        for start in range(0, len(plans), _CHECK_CHUNK):
            chunk = plans[start : start + _CHECK_CHUNK]
            applied = []
            for plan in chunk:
                try:
                    applied.append((plan, *self._apply_one(plan)))
                except _Skip as s:
                    self._skip(plan.name, str(s))
                except Exception as e:
                    self._skip(plan.name, f"dependency graph failed: {type(e).__name__}: {str(e)[:160]}")
            if self._forward_ok() is None:
                for _, _, ops in applied:
                    self.ops.extend(ops)
                pruned += len(applied)
            else:  # roll the chunk back, then retry it one group at a time
                for _, snap, _ in reversed(applied):
                    self._restore(snap)
                for plan, _, _ in applied:
                    try:
                        snap, ops = self._apply_one(plan)
                    except Exception as e:
                        self._skip(plan.name, str(e) if isinstance(e, _Skip) else f"{type(e).__name__}: {e}"[:200])
                        continue
                    reason = self._forward_ok()
                    if reason is None:
                        self.ops.extend(ops)
                        pruned += 1
                    else:
                        self._restore(snap)
                        self._skip(plan.name, reason)
            if self.progress is not None:
                self.progress(min(start + _CHECK_CHUNK, len(plans)), len(plans))
        return pruned


class _Skip(Exception):
    pass


class _IndexExplosion(RuntimeError):
    pass


_GROUP_SECONDS = 2.0  # a dependency walk longer than this is cycling, not working (the largest real ones take <0.5 s)


@contextlib.contextmanager
def _bounded_traversal(max_indices: int, limits: dict[str, int]):
    """Bound the dependency walks Torch-Pruning makes to build a group.

    Written by hand because no library option exists. DepGraph guesses reshape semantics from inferred channel
    counts; on channels-last window reshapes (Swin, MaxViT) it guesses a flatten on one side of a residual loop only,
    and indices are multiplied by the stride on every trip around the loop until memory runs out; on detection heads
    shared across feature levels the walk revisits the same layers with ever new index sets and never ends. A real
    walk cannot yield more indices than the widest layer has channels, nor more items than the graph has
    dependencies, nor take minutes: past those bounds the group is abandoned and reported, instead of exhausting
    memory or time. Installed only while Presso prunes.
    """
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.group import Group

    original_flatten = index_mapping._FlattenIndexMapping
    original_add = Group.add_dep

    walk = {"t0": time.perf_counter()}  # start of the current walk: get_pruning_group adds its root first

    def check_time():
        if time.perf_counter() - walk["t0"] > _GROUP_SECONDS:
            raise _IndexExplosion("the dependency walk does not converge (layers revisited with ever new indices)")

    class Bounded(original_flatten):
        def __call__(self, idxs):
            if not self.reverse and len(idxs) * self._stride > max_indices:  # refuse before building the list
                raise _IndexExplosion(
                    "channel indices explode through a reshape (Torch-Pruning cannot map channels through it)"
                )
            check_time()
            return super().__call__(idxs)

    def add_dep(self, dep, idxs):
        if not self._group:
            walk["t0"] = time.perf_counter()
        elif len(self._group) > limits.get("items", 1 << 62):
            raise _IndexExplosion("the dependency walk does not converge (layers revisited with ever new indices)")
        else:
            check_time()
        original_add(self, dep, idxs)

    index_mapping._FlattenIndexMapping = Bounded
    Group.add_dep = add_dep
    try:
        yield
    finally:
        index_mapping._FlattenIndexMapping = original_flatten
        Group.add_dep = original_add


def prune_model(model: nn.Module, inputs: tuple, cfg: PruneConfig, data=None, progress=None) -> PruneOutcome:
    """Prune `model` in place; returns the replayable ops and the layers left unpruned (with reasons)."""
    torch.manual_seed(cfg.seed)
    return GraphPruner(model, inputs, cfg, data=data, progress=progress).run()


# --------------------------------------------------------------------------- replay
def _pruner_registry() -> dict[str, Any]:
    reg = {type(p).__name__: p for p in tp.pruner.function.PrunerBox.values() if p is not None}
    return reg


@register_replay("prune")
def replay_prune(model: nn.Module, step: dict[str, Any]) -> None:
    pruners = _pruner_registry()
    for op in step.get("ops", []):
        parent, attr, obj = resolve(model, op["target"])
        if op["op"] == "setattr":
            setattr(obj, op["attr"], op["value"])
            continue
        pruner = pruners.get(op["pruner"])
        if pruner is None:
            raise UnsupportedLayerError(f"Recipe uses pruner '{op['pruner']}', unknown to this Presso version.")
        pruner.pruning_dim = op["dim"]
        result = getattr(pruner, op["fn"])(obj, op["idxs"])
        if op["kind"] == "param":
            setattr(parent, attr, result)
