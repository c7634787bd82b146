"""Applying a pruning plan: group by group, with forward checks and rollback, and a replayable record.

:class:`GraphPruner` builds the dependency graph (with :mod:`~presso.compress.prune.tp_patches` installed), has the
:class:`~presso.compress.prune.plan.Planner` plan every coupled group, then applies the plans in chunks: after each
chunk the model must still run with the same output shapes, else the chunk is rolled back and retried one group at a
time. Every pruning call is recorded (layer, function, indices) so a model directory replays it without a graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from presso.compress.prune import importance as criteria
from presso.compress.prune import tp_patches
from presso.compress.prune.config import PruneConfig
from presso.compress.prune.plan import Plan, Planner
from presso.errors import InputSpecError, UnsupportedLayerError
from presso.models.figures import run_model, set_mode

__all__ = ["GraphPruner", "PruneOutcome", "prune_model"]

_CHECK_CHUNK = 16  # groups applied between two forward checks


@dataclass
class PruneOutcome:
    ops: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    groups_pruned: int
    groups_total: int
    graph_seconds: float


class _Skip(Exception):
    pass


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


# --------------------------------------------------------------------------- the pruner
class GraphPruner:
    """Prunes one model according to a PruneConfig. Use through :func:`prune_model`."""

    def __init__(self, model: nn.Module, inputs: tuple, cfg: PruneConfig, data=None, progress=None):
        self.model = model
        self.inputs = inputs
        self.cfg = cfg
        self.data = data
        self.progress = progress
        self.planner = Planner(model, cfg)  # checks the config's layer names against the model
        self.names = self.planner.names
        self.skipped = self.planner.skipped  # one list: groups left unpruned by planning and by applying
        self.ops: list[dict[str, Any]] = []

    def _skip(self, name: str, reason: str) -> None:
        self.planner.skip(name, reason)

    # ---- main entry
    def run(self) -> PruneOutcome:
        model = self.model
        set_mode(model, False)
        try:
            self.reference = _signature(self.planner.reference_forward(self.inputs))
        except Exception as e:
            shapes = ", ".join(str(tuple(x.shape)) for x in self.inputs)
            raise InputSpecError(
                f"The model does not run on inputs of shape {shapes}: {type(e).__name__}: {str(e)[:300]}. "
                "Fix --input-shape."
            ) from None
        criterion = criteria.get_criterion(self.cfg.criterion)
        importance = criterion.factory(self.cfg)
        if criterion.needs_gradients:
            criteria.accumulate_gradients(model, self.data, criterion.name)
        dims = [getattr(m, a, None) for m in model.modules() for a in ("in_channels", "out_channels", "in_features",
                                                                           "out_features")]  # fmt: skip
        widest = max([d for d in dims if isinstance(d, int)] + [1])
        # both patches go in before the graph is built: the mappings it creates are the ones every walk then uses
        with tp_patches.patched(max_indices=4 * widest) as self.patches:
            t0 = time.perf_counter()
            try:
                self.DG = tp_patches.build_graph(model, self.inputs)
            except Exception as e:
                raise UnsupportedLayerError(
                    f"Torch-Pruning could not trace this model's graph ({type(e).__name__}: {str(e)[:300]}); "
                    "nothing was pruned. Try other example inputs, or report the model."
                ) from None
            graph_seconds = time.perf_counter() - t0
            self.patches.max_items = 4 * sum(len(n.dependencies) for n in self.DG.module2node.values()) + 100
            self.planner.attach_graph(self.DG, self.patches.blocked)
            plans, total = self.planner.plan(importance)
            pruned = self._apply(plans)
        model.zero_grad(set_to_none=True)
        return PruneOutcome(self.ops, self.skipped, pruned, total, graph_seconds)

    def coupled_groups(self) -> list[list[str]]:
        """Names of the layers whose output channels are pruned together, per prunable group -- what per-layer
        recommendations must treat as one unit (:meth:`Planner.coupled_groups`); nothing is pruned."""
        set_mode(self.model, False)
        with tp_patches.patched(max_indices=1 << 20) as self.patches:
            try:
                self.DG = tp_patches.build_graph(self.model, self.inputs)
            except Exception as e:
                raise UnsupportedLayerError(f"Torch-Pruning could not trace this model's graph ({e!s:.300})") from None
            self.planner.attach_graph(self.DG, self.patches.blocked)
            return self.planner.coupled_groups()

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
        modules: dict[int, nn.Module] = {id(m): m for m in extra}
        for d, _ in group:
            target = d.target.module
            if isinstance(target, nn.Parameter):
                pname = tp_patches.param_name(self.DG, target) or ""
                parent = self.model.get_submodule(pname.rpartition(".")[0]) if "." in pname else self.model
                modules[id(parent)] = parent
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
        return saved, tp_patches.snapshot_graph(self.DG, group)

    def _restore(self, snap) -> None:
        self.patches.mapping_dirty = True
        saved, graph = snap
        for m, d, params, bufs, mods in saved:
            d = dict(d)
            d["_parameters"], d["_buffers"], d["_modules"] = params, bufs, mods
            vars(m).clear()
            vars(m).update(d)
        tp_patches.restore_graph(self.DG, graph)

    def _record(self, group) -> list[dict[str, Any]]:
        ops = []
        for d, idxs in group:
            target = d.target.module
            if isinstance(target, nn.Parameter):
                name, kind = tp_patches.param_name(self.DG, target), "param"
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

    def _apply_one(self, plan: Plan):
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
            self.patches.mapping_dirty = True  # a placeholder node (concat, split, reshape, ...) is in this group
        try:
            group.prune(record_history=False)
            for mod, attr, value in plan.fixups:
                setattr(mod, attr, value)
                ops.append({"op": "setattr", "target": self.names[mod], "attr": attr, "value": value})
        except Exception as e:
            self._restore(snap)
            raise _Skip(f"pruning failed: {type(e).__name__}: {str(e)[:160]}") from None
        return snap, ops

    def _apply(self, plans: list[Plan]) -> int:
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


def prune_model(model: nn.Module, inputs: tuple, cfg: PruneConfig, data=None, progress=None) -> PruneOutcome:
    """Prune `model` in place; returns the replayable ops and the layers left unpruned (with reasons)."""
    torch.manual_seed(cfg.seed)
    return GraphPruner(model, inputs, cfg, data=data, progress=progress).run()
