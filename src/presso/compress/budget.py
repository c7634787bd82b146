"""Compression to a budget: search the global knob(s) until the model keeps the asked share of MACs or parameters.

Knobs, each monotone in what the model keeps:
- pruning: the share of all channels removed, spread over layers by an allocation -- LAMP scores without data;
  with calibration data the best of several allocations judged after BatchNorm re-estimation (EagleEye); on a
  device (latency budget, or ``Target(device=...)``) the best of allocations weighted by measured time per MAC --
  or, with ``recommend=False``, the uniform ratio;
- decomposition: the VBMF calibration offset (or the energy / rank ratio of the other rank rules). Its MACs and
  parameters follow from the ranks in closed form, so the search costs no factorisation; only the final choice is
  decomposed.
Both together: pruning first, to the square root of the target (half the reduction), then decomposition to the target.
The target is ``compress.target.Target``; how a pruning allocation is chosen for it is ``compress.choose``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from presso.compress.choose import _Meter, _search_prune
from presso.compress.decompose import DecomposeConfig, cost, full_ranks, plan_layers, ranks_for
from presso.compress.engine import CompressResult, apply, combine, with_target
from presso.compress.prune import PruneConfig
from presso.compress.target import Target
from presso.errors import BudgetError, ConfigError
from presso.models.figures import model_figures

__all__ = ["Target", "compress_to_target"]


def compress_to_target(
    model: nn.Module,
    inputs: tuple,
    target: Target,
    *,
    prune: PruneConfig | None = None,
    decompose: DecomposeConfig | None = None,
    recommend: bool | None = True,
    data=None,
    progress: Callable[..., None] | None = None,
) -> CompressResult:
    """Search the knob(s) of ``prune`` / ``decompose`` until the model meets ``target``.

    ``progress(done, total, **info)`` (``presso.progress.reporter``) gets every try of the search: ``attempt`` of
    ``tries``, the share ``kept`` ``of`` MACs/params/latency (``ms`` for a latency), and, while several allocations
    are compared, the ``allocation``, its ``candidate`` number and ``score``.
    """
    if recommend is None:
        # choose per layer where there is evidence to choose by: calibration data, or a device to measure on.
        # Without either, LAMP weight scores lost to the uniform ratio after the same fine-tune (0.6 and 2.1 points
        # at 50% and 25% of MACs, docs/benchmarks.md), so the uniform ratio is the default there.
        recommend = data is not None or target.latency_ms is not None or target.device is not None

    if prune is None and decompose is None:
        prune = PruneConfig()
    before = model_figures(model, inputs)
    searches: list[dict[str, Any]] = []
    if target.latency_ms is not None:
        if decompose is not None:
            raise ConfigError(
                "A latency target searches pruning; for decomposition give --target-macs/--target-params."
            )
        if progress:
            progress(0, None, phase="measuring the original's latency")
        meter = _Meter(target, model, inputs, before)
        result, cfg, search = _search_prune(model, inputs, meter, prune, recommend, data, progress)
        ms = meter.base * search["best"]
        outcome = {"latency_ms": target.latency_ms, "device": target.device or "local",
                   "original_ms": round(meter.base, 3), "achieved_ms": round(ms, 3),
                   "within_tolerance": ms <= target.latency_ms * (1 + target.tolerance),
                   "tolerance": target.tolerance, "search": [search]}  # fmt: skip
        if not outcome["within_tolerance"]:
            raise BudgetError(
                f"Could not bring the model under {target.latency_ms} ms here (original {meter.base:.2f} ms, closest "
                f"{ms:.2f} ms); try decomposition with a MACs target, or a looser budget."
            )
        return with_target(result, outcome, before)
    if prune is not None and decompose is not None:
        stage = Target(**{target.key: target.share**0.5}, tolerance=target.tolerance)
        stage_meter = _Meter(stage, model, inputs, before)
        pruned, cfg, search = _search_prune(model, inputs, stage_meter, prune, recommend, data, progress)
        searches.append(search)
        mid_share = pruned.after[target.key] / before[target.key]
        rest = Target(**{target.key: min(0.999, target.share / mid_share)}, tolerance=target.tolerance / 2)
        dcfg, search = _search_decompose(pruned.model, inputs, rest, decompose, pruned.after)
        searches.append(search)
        result = combine(pruned, apply(pruned.model, inputs, [dcfg]))
    elif prune is not None:
        meter = _Meter(target, model, inputs, before)
        result, cfg, search = _search_prune(model, inputs, meter, prune, recommend, data, progress)
        searches.append(search)
    else:
        assert decompose is not None
        dcfg, search = _search_decompose(model, inputs, target, decompose, before)
        searches.append(search)
        result = apply(model, inputs, [dcfg])
    achieved = result.after[target.key] / before[target.key]
    outcome = {
        target.key: target.share,
        "achieved": round(achieved, 4),
        "within_tolerance": target.met(achieved),
        "tolerance": target.tolerance,
        "search": searches,
    }
    if not target.met(achieved):
        closest = ", ".join(f"{s['knob']}={s['best_knob']} -> {s['best']:.3f}" for s in searches)
        raise BudgetError(
            f"Could not bring the model to {target.share:.0%} of its {target.key} within {target.tolerance:.0%} "
            f"(closest: {achieved:.1%}; {closest}); the layers that can shrink may not hold enough of the "
            f"{target.key} -- try another method (--decompose) or a looser target."
        )
    return with_target(result, outcome, before)


def _search_decompose(model, inputs, target: Target, base: DecomposeConfig, figures_now):
    """Search the decomposition knob on closed-form MACs/params (ranks from cached spectra)."""
    plans, _ = plan_layers(model, inputs, base)
    knob_name, lo, hi = {"vbmf": ("vbmf_offset", -1.0, 1.0), "energy": ("energy", 0.01, 1.0),
                         "ratio": ("rank_ratio", 0.01, 1.0)}[base.rank]  # fmt: skip

    def config(knob: float) -> DecomposeConfig:
        return dataclasses.replace(base, **{knob_name: round(knob, 4)})

    def saving(plan, cfg: DecomposeConfig, ranks) -> float:
        if ranks is None:
            return 0.0
        share = cost(plan.module, cfg.method, ranks, plan.in_hw, plan.out_hw)
        if share >= cfg.max_cost:
            return 0.0
        if target.key == "macs":
            return plan.macs * (1 - share)
        return plan.module.weight.numel() - _factor_params(plan.module, cfg.method, ranks)

    def predicted(knob: float) -> float:
        cfg = config(knob)
        saved = sum(saving(plan, cfg, ranks_for(plan, cfg, offset=cfg.vbmf_offset)) for plan in plans)
        return (figures_now[target.key] - saved) / figures_now[target.key]

    tries = []
    best = None
    for _ in range(40):  # closed form: cheap, so bisect to a fine resolution
        knob = (lo + hi) / 2
        kept = predicted(knob)
        tries.append([round(knob, 4), round(kept, 4)])
        if best is None or abs(kept - target.share) < abs(best[1] - target.share):
            best = (knob, kept)
        if target.met(kept) and abs(kept - target.share) < target.tolerance * target.share / 4:
            break
        lo, hi = (lo, knob) if kept > target.share else (knob, hi)
    assert best is not None
    search = {"method": "decompose", "knob": knob_name, "best_knob": round(best[0], 4), "best": round(best[1], 4),
              "why": f"{base.rank} ranks from each layer's weight spectrum", "tries": tries[-8:]}  # fmt: skip
    chosen = config(best[0])
    if abs(best[1] - target.share) >= target.tolerance * target.share / 2:
        chosen, kept, moved = _adjust_ranks(plans, chosen, target, figures_now[target.key], saving, best[1])
        if moved:
            search["best"] = round(kept, 4)
            search["why"] += f"; then {moved} single-layer rank step(s) to close the gap the integer ranks left"
    return chosen, search


def _adjust_ranks(plans, cfg: DecomposeConfig, target: Target, total: float, saving, kept: float):
    """The global knob moves every layer's ranks at once, and integer ranks can jump past the tolerance on small
    models. Close the gap greedily: step one rank of one layer by one, each time the step that brings the predicted
    share closest to the target, until within half the tolerance or no step helps. The stepped layers' ranks are
    written into the config's ``per_layer``, so the result is reproducible and editable like any other choice."""
    ranks = {p.name: ranks_for(p, cfg, offset=cfg.vbmf_offset) for p in plans if p.name not in cfg.per_layer}
    ranks = {n: list(r) for n, r in ranks.items() if r is not None}
    by_name = {p.name: p for p in plans}
    caps = {n: full_ranks(by_name[n].module, cfg.method) for n in ranks}
    goal = target.share
    changed: set[str] = set()
    moved = 0
    for _ in range(1000):
        if abs(kept - goal) < target.tolerance * goal / 2:
            break
        step = 1 if kept < goal else -1  # keep more MACs: raise a rank; keep fewer: lower one
        best = None
        for name, r in ranks.items():
            plan = by_name[name]
            now = saving(plan, cfg, tuple(r))
            for d in range(len(r)):
                if not 1 <= r[d] + step <= caps[name][d]:
                    continue
                trial = list(r)
                trial[d] += step
                new_kept = kept + (now - saving(plan, cfg, tuple(trial))) / total
                if best is None or abs(new_kept - goal) < abs(best[0] - goal):
                    best = (new_kept, name, trial)
        if best is None or abs(best[0] - goal) >= abs(kept - goal):
            break
        kept, name, ranks[name] = best
        changed.add(name)
        moved += 1
    if not moved:
        return cfg, kept, 0
    fixed = {n: (ranks[n] if cfg.method == "tucker" else ranks[n][0]) for n in sorted(changed)}
    return dataclasses.replace(cfg, per_layer={**cfg.per_layer, **fixed}), kept, moved


def _factor_params(module: nn.Module, method: str, ranks: tuple[int, ...]) -> int:
    if isinstance(module, nn.Linear):
        return ranks[0] * (module.in_features + module.out_features)
    o, i, kh, kw = module.weight.shape
    if method == "svd":
        return ranks[0] * (i + o)
    if method == "tucker":
        ro, ri = ranks
        return i * ri + ri * ro * kh * kw + ro * o
    return ranks[0] * (i + kh + kw + o)
