"""Compression to a budget: search the global knob(s) until the model keeps the asked share of MACs or parameters.

Knobs, each monotone in what the model keeps:
- pruning: the share of all channels removed, spread over layers by LAMP scores (sensitivity-weighted with data) --
  or, with ``recommend=False``, the uniform ratio;
- decomposition: the VBMF calibration offset (or the energy / rank ratio of the other rank rules). Its MACs and
  parameters follow from the ranks in closed form, so the search costs no factorisation; only the final choice is
  decomposed.
Both together: pruning first, to the square root of the target (half the reduction), then decomposition to the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from presso.compress.decompose import DecomposeConfig, cost, plan_layers, ranks_for
from presso.compress.prune import PruneConfig
from presso.compress.recommend import lamp_scores
from presso.errors import BudgetError, ConfigError
from presso.models.figures import model_figures

MAX_TRIES = 16


@dataclass
class Target:
    """What the compressed model keeps: a share of MACs or of parameters (one of them), within ``tolerance``."""

    macs: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    device: str | None = None
    tolerance: float = 0.03

    def __post_init__(self) -> None:
        given = [k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("Give exactly one target: --target-macs, --target-params or --target-latency-ms.")
        if self.latency_ms is not None:
            raise ConfigError(
                "--target-latency-ms needs latency measurements from the benchmarker, which this version does not "
                "have yet; give --target-macs or --target-params."
            )
        share = self.macs if self.macs is not None else self.params
        if not 0.0 < share < 1.0:
            raise BudgetError(f"A target share must be in (0, 1), e.g. 0.5 keeps half; got {share}.")

    @property
    def key(self) -> str:
        return "macs" if self.macs is not None else "params"

    @property
    def share(self) -> float:
        return float(self.macs if self.macs is not None else self.params)  # type: ignore[arg-type]

    def met(self, achieved: float) -> bool:
        return abs(achieved / self.share - 1.0) <= self.tolerance


def compress_to_target(
    model: nn.Module,
    inputs: tuple,
    target: Target,
    *,
    prune: PruneConfig | None = None,
    decompose: DecomposeConfig | None = None,
    recommend: bool = True,
    data=None,
    progress: Callable[[int, int], None] | None = None,
):
    from presso.compress import compress

    if prune is None and decompose is None:
        prune = PruneConfig()
    before = model_figures(model, inputs)
    searches: list[dict[str, Any]] = []
    if prune is not None and decompose is not None:
        stage = Target(**{target.key: target.share**0.5}, tolerance=target.tolerance)
        pruned, cfg, search = _search_prune(model, inputs, stage, prune, recommend, data, before, progress)
        searches.append(search)
        mid_share = pruned.after[target.key] / before[target.key]
        rest = Target(**{target.key: min(0.999, target.share / mid_share)}, tolerance=target.tolerance / 2)
        dcfg, search = _search_decompose(pruned.model, inputs, rest, decompose, pruned.after)
        searches.append(search)
        result = compress(pruned.model, inputs, dcfg)
        result.config = [cfg.to_json(), dcfg.to_json()]
        result.method = "prune+decompose"
        result.extra["groups_pruned"] = pruned.extra.get("groups_pruned")
        result.skipped = pruned.skipped + result.skipped
        result.per_layer = _merge_per_layer(pruned.per_layer, result.per_layer)
    elif prune is not None:
        result, cfg, search = _search_prune(model, inputs, target, prune, recommend, data, before, progress)
        searches.append(search)
    else:
        assert decompose is not None
        dcfg, search = _search_decompose(model, inputs, target, decompose, before)
        searches.append(search)
        result = compress(model, inputs, dcfg)
    achieved = result.after[target.key] / before[target.key]
    result.before = before
    result.extra["target"] = {
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
    return result


def _search_prune(model, inputs, target: Target, base: PruneConfig, recommend: bool, data, before, progress):
    from presso.compress import compress

    scores = lamp_scores(model, inputs, data=data) if recommend else None
    why = (
        "uniform ratio"
        if not recommend
        else ("LAMP scores x sensitivity measured on calibration data" if data is not None else "LAMP weight scores")
    )

    def config(knob: float) -> PruneConfig:
        if scores is None:
            return dataclasses.replace(base, ratio=knob, per_layer=dict(base.per_layer))
        ratios = {**scores.ratios(knob), **base.per_layer}  # the user's own per-layer values win
        return dataclasses.replace(base, ratio=None, per_layer=ratios)

    def attempt(knob: float):
        result = compress(model, inputs, config(knob), data=data if base.criterion == "taylor" else None)
        return result, result.after[target.key] / before[target.key]

    lo, hi = 0.0, 0.95
    best = None
    tries = []
    for k in range(MAX_TRIES):
        knob = (lo + hi) / 2
        result, kept = attempt(knob)
        tries.append([round(knob, 4), round(kept, 4)])
        if progress:
            progress(k + 1, MAX_TRIES)
        if best is None or abs(kept - target.share) < abs(best[1] - target.share):
            best = (result, kept, knob)
        if target.met(kept):
            break
        lo, hi = (knob, hi) if kept > target.share else (lo, knob)
    assert best is not None
    result, kept, knob = best
    search = {"method": "prune", "knob": "channel_share" if recommend else "ratio", "best_knob": round(knob, 4),
              "best": round(kept, 4), "why": why, "tries": tries}  # fmt: skip
    return result, config(knob), search


def _search_decompose(model, inputs, target: Target, base: DecomposeConfig, figures_now):
    """Search the decomposition knob on closed-form MACs/params (ranks from cached spectra)."""
    plans, _ = plan_layers(model, inputs, base)
    knob_name, lo, hi = {"vbmf": ("vbmf_offset", -1.0, 1.0), "energy": ("energy", 0.01, 1.0),
                         "ratio": ("rank_ratio", 0.01, 1.0)}[base.rank]  # fmt: skip

    def config(knob: float) -> DecomposeConfig:
        return dataclasses.replace(base, **{knob_name: round(knob, 4)})

    def predicted(knob: float) -> float:
        cfg = config(knob)
        saved = 0.0
        for plan in plans:
            ranks = ranks_for(plan, cfg, offset=cfg.vbmf_offset)
            if ranks is None:
                continue
            share = cost(plan.module, cfg.method, ranks, plan.in_hw, plan.out_hw)
            if share >= cfg.max_cost:
                continue
            if target.key == "macs":
                saved += plan.macs * (1 - share)
            else:
                saved += plan.module.weight.numel() - _factor_params(plan.module, cfg.method, ranks)
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
    return config(best[0]), search


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


def _merge_per_layer(first: dict, second: dict) -> dict:
    merged = dict(first)
    for name, info in second.items():
        merged[name] = {**merged.get(name, {}), **info} if "ranks" in info else merged.get(name, info)
    return merged
