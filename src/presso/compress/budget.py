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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from presso.compress.decompose import DecomposeConfig, cost, full_ranks, plan_layers, ranks_for
from presso.compress.prune import PruneConfig
from presso.compress.recommend import lamp_scores
from presso.errors import BudgetError, ConfigError, PressoError
from presso.models.figures import model_figures

MAX_TRIES = 16
LATENCY_TRIES = 8  # each try of a latency search is an ONNX export and a timed run


@dataclass
class Target:
    """What the compressed model keeps: a share of MACs or of parameters (one of them), within ``tolerance``."""

    macs: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    device: str | None = None
    tolerance: float = 0.03
    threads: int | None = None  # intra-op threads a latency is measured with here (None: ONNX Runtime's default)
    # device: where a latency target is measured ("local": this machine). With a MACs target it makes the
    # recommended ratios latency-aware: of allocations weighted by measured time per MAC, the fastest there wins.

    def __post_init__(self) -> None:
        given = [k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("Give exactly one target: --target-macs, --target-params or --target-latency-ms.")
        if self.device not in (None, "local"):
            raise ConfigError(
                f"Device '{self.device}': latency is measured on this machine (--device local) in this version; "
                "remote devices come with the benchmarker's agent."
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads must be a positive number of threads, not {self.threads}.")
        if self.latency_ms is not None:
            if self.latency_ms <= 0:
                raise BudgetError(f"A latency budget must be positive, not {self.latency_ms} ms.")
            return
        share = self.macs if self.macs is not None else self.params
        if not 0.0 < share < 1.0:
            raise BudgetError(f"A target share must be in (0, 1), e.g. 0.5 keeps half; got {share}.")

    @property
    def key(self) -> str:
        return "latency_ms" if self.latency_ms is not None else ("macs" if self.macs is not None else "params")

    @property
    def share(self) -> float:
        if self.latency_ms is not None:
            raise AttributeError("a latency target's share depends on the measured original")
        return float(self.macs if self.macs is not None else self.params)  # type: ignore[arg-type]

    def met(self, achieved: float) -> bool:
        return abs(achieved / self.share - 1.0) <= self.tolerance


class _Meter:
    """What a search compares against its target: a share of MACs/params (exact), or of the original's latency
    measured with ONNX Runtime on this machine (noisy: a budget to stay under, approached from below)."""

    LATENCY_WINDOW = 0.10  # stop once within 10% under the budget; below that the search keeps less pruning

    def __init__(self, target: Target, model: nn.Module, inputs: tuple, before: dict):
        self.target, self.inputs = target, inputs
        self.latency = target.latency_ms is not None
        if self.latency:
            self.base = self.ms(model)
            self.share = target.latency_ms / self.base  # type: ignore[operator]
            if self.share >= 1.0:
                raise BudgetError(
                    f"The model already runs in {self.base:.2f} ms here (median), within the {target.latency_ms} ms "
                    "budget; nothing to compress for it."
                )
        else:
            self.base, self.share = float(before[target.key]), target.share
        # what a measured search aims at: the middle of the window it accepts
        self.aim = self.share * (1 - self.LATENCY_WINDOW / 2 + target.tolerance / 2) if self.latency else self.share

    def ms(self, model: nn.Module) -> float:
        """Median ONNX Runtime latency of `model` here, with the target's threads."""
        from presso.bench.runner import measure_model

        return measure_model(model, self.inputs, repeat=40, warmup=10, threads=self.target.threads).median_ms

    def kept(self, result) -> float:
        if self.latency:
            return self.ms(result.model) / self.base
        return result.after[self.target.key] / self.base

    def met(self, kept: float) -> bool:
        if self.latency:
            return self.share * (1 - self.LATENCY_WINDOW) <= kept <= self.share * (1 + self.target.tolerance)
        return self.target.met(kept)

    def better(self, kept: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.latency:  # under budget beats over; among those under, the least pruned wins
            ok, best_ok = (
                kept <= self.share * (1 + self.target.tolerance),
                best <= self.share * (1 + self.target.tolerance),
            )
            return (ok and not best_ok) or (ok == best_ok and (kept > best if ok else kept < best))
        return abs(kept - self.share) < abs(best - self.share)


def compress_to_target(
    model: nn.Module,
    inputs: tuple,
    target: Target,
    *,
    prune: PruneConfig | None = None,
    decompose: DecomposeConfig | None = None,
    recommend: bool | None = True,
    data=None,
    progress: Callable[[int, int], None] | None = None,
):
    from presso.compress import compress

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
        meter = _Meter(target, model, inputs, before)
        result, cfg, search = _search_prune(model, inputs, meter, prune, recommend, data, progress)
        result.before = before
        ms = meter.base * search["best"]
        result.extra["target"] = {"latency_ms": target.latency_ms, "device": target.device or "local",
                                  "original_ms": round(meter.base, 3), "achieved_ms": round(ms, 3),
                                  "within_tolerance": ms <= target.latency_ms * (1 + target.tolerance),
                                  "tolerance": target.tolerance, "search": [search]}  # fmt: skip
        if not result.extra["target"]["within_tolerance"]:
            raise BudgetError(
                f"Could not bring the model under {target.latency_ms} ms here (original {meter.base:.2f} ms, closest "
                f"{ms:.2f} ms); try decomposition with a MACs target, or a looser budget."
            )
        return result
    if prune is not None and decompose is not None:
        stage = Target(**{target.key: target.share**0.5}, tolerance=target.tolerance)
        stage_meter = _Meter(stage, model, inputs, before)
        pruned, cfg, search = _search_prune(model, inputs, stage_meter, prune, recommend, data, progress)
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
        meter = _Meter(target, model, inputs, before)
        result, cfg, search = _search_prune(model, inputs, meter, prune, recommend, data, progress)
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


def _search_prune(model, inputs, meter: _Meter, base: PruneConfig, recommend: bool, data, progress):
    """Prune to the meter's target.

    With ``recommend``, several allocations of the cut over the layers are each brought to the target and the best
    is kept (``_choose``): on a device (latency target, or a MACs target with ``device``) allocations weighted by
    measured time per MAC, judged by what they keep within the time budget / how fast they run; with calibration
    data, EagleEye-style candidates judged by their output after BatchNorm re-estimation. Otherwise one allocation
    -- LAMP scores per unit cost (no data), or the uniform ratio -- with its knob bisected."""
    cost = "params" if meter.target.key == "params" else "macs"
    if recommend and (meter.latency or meter.target.device is not None):
        found = _search_on_device(model, inputs, meter, base, data, progress)
        if found is not None:
            return found
        recommend = False  # no allocation met the budget: the uniform ratio's search reports the closest
    elif recommend and data is not None:
        found = _search_allocations(model, inputs, meter, base, cost, data, progress)
        if found is not None:
            return found
    scores = lamp_scores(model, inputs, data=data, cost=cost) if recommend else None
    if not recommend:
        why = "uniform ratio"
    elif data is not None:
        why = "LAMP scores per unit cost x sensitivity measured on calibration data"
    else:
        why = "LAMP weight scores per unit cost"
    return _bisect(model, inputs, meter, base, scores, data, progress, why)


def _bisect(
    model, inputs, meter: _Meter, base: PruneConfig, allocation, data, progress, why: str, tight: float | None = None
):
    """Bisect the knob of one allocation (None: the uniform ratio); when channel rounding (``round_to``) makes the
    figures jump past the tolerance -- small models, few channels per layer -- search again with finer rounding
    (8 -> 4 -> 2 -> none) and say so."""
    round_to = base.round_to
    while True:
        cfg = dataclasses.replace(base, round_to=round_to)
        result, chosen, search = _search_prune_once(model, inputs, meter, cfg, allocation, data, progress, why, tight)
        # a latency target keeps the rounding: finer channel counts run slower per MAC on CPUs (docs/benchmarks.md)
        if meter.met(search["best"]) or not round_to or meter.latency:
            if round_to != base.round_to:
                search["why"] += f"; channel rounding relaxed from {base.round_to} to {round_to} to meet the target"
            return result, chosen, search
        round_to = round_to // 2 if round_to > 2 else None


class _Judge:
    """Scores a compressed candidate by its outputs against the original's on calibration batches, after its
    BatchNorm statistics are re-estimated there (presso.compress.allocate). ``ok`` is False when the outputs cannot
    be compared (e.g. detections, whose number depends on the weights)."""

    def __init__(self, model, data):
        import torch

        from presso.compress.allocate import batch_inputs, output_distance
        from presso.models.figures import run_model, set_mode

        self.batches = batch_inputs(data) if data is not None else []
        self.ok = bool(self.batches)
        if self.ok:
            set_mode(model, False)
            with torch.no_grad():
                self.reference = [run_model(model, x) for x in self.batches]
            try:
                output_distance(model, self.batches[:1], self.reference[:1])
            except PressoError:
                self.ok = False

    def __call__(self, compressed) -> float:
        from presso.compress.allocate import adapt_batchnorm, output_distance

        adapt_batchnorm(compressed, self.batches)
        return round(output_distance(compressed, self.batches, self.reference), 5)


def _choose(model, inputs, meter: _Meter, base: PruneConfig, data, progress, candidates, score, total: int, done=0):
    """Bring each (name, allocation) candidate to the target and keep the lowest ``score(result, search, entry)``
    (None: the candidate is out). Returns (best, tried) with best = (entry, result, config, search) or None."""
    tried: list[dict] = []
    best = None
    for name, allocation in candidates:
        result, cfg, search = _bisect(model, inputs, meter, base, allocation, data, None, name,
                                      tight=meter.target.tolerance / 4)  # fmt: skip
        entry = {"allocation": name, "kept": search["best"]}
        value = score(result, search, entry)
        if value is not None and (best is None or value < best[0]["score"]):
            entry["score"] = value
            best = (entry, result, cfg, search)
        tried.append(entry)
        if progress:
            progress(done + len(tried), total)
    return best, tried


def _search_allocations(model, inputs, meter: _Meter, base: PruneConfig, cost: str, data, progress):
    """EagleEye-style choice among allocations (presso.compress.allocate): the uniform ratio, LAMP per unit cost,
    LAMP x measured sensitivity, and random per-group perturbations -- each brought to the target by its own knob,
    its BatchNorm statistics re-estimated on the calibration batches, and scored by the distillation loss of its
    outputs against the original's there; then a second, narrower round around the best. Returns None (and the
    caller falls back to LAMP x sensitivity) when the outputs cannot be compared (e.g. data-dependent shapes)."""
    import numpy as np

    from presso.compress.allocate import N_RANDOM, N_REFINE, SPREAD, ScaledAllocation
    from presso.compress.recommend import ChannelScores, group_sensitivity

    judge = _Judge(model, data)
    lamp = lamp_scores(model, inputs, cost=cost)
    if not judge.ok or not lamp.scores:
        return None
    sens = group_sensitivity(model, data, lamp.scores, lamp.members, dict(model.named_modules()))
    mean = float(np.mean([v for v in sens.values() if v > 0] or [1.0]))
    weighted = ChannelScores({k: v * (sens[k] / mean) for k, v in lamp.scores.items()}, lamp.members, sens)
    uniform = ScaledAllocation(lamp.members, {k: 1.0 for k in lamp.members})
    rng = np.random.default_rng(base.seed)
    first = [("uniform", None), ("LAMP per unit cost", lamp), ("LAMP x sensitivity", weighted)]
    first += [(f"random {i + 1}", uniform.perturbed(rng, SPREAD)) for i in range(N_RANDOM)]
    total = len(first) + N_REFINE

    def score(result, search, entry):
        if not meter.met(search["best"]):
            return None
        entry["distance"] = judge(result.model)
        return entry["distance"]

    best, tried = _choose(model, inputs, meter, base, data, progress, first, score, total)
    if best is None:
        return None
    # second round: narrower perturbations of the winner's per-group ratios
    around = ScaledAllocation.from_config(lamp.members, best[2])
    winner = best[0]["allocation"]
    second = [(f"around {winner} {i + 1}", around.perturbed(rng, SPREAD / 2)) for i in range(N_REFINE)]
    more, tried_more = _choose(model, inputs, meter, base, data, progress, second, score, total, done=len(tried))
    tried += tried_more
    if more is not None and more[0]["score"] < best[0]["score"]:
        best = more
    entry, result, cfg, search = best
    result.extra["batchnorm_adapted"] = True
    search = {**search, "why": (
        f"{entry['allocation']}: the lowest output distance from the original (distillation loss after BatchNorm "
        f"statistics were re-estimated on the {len(judge.batches)} calibration batches) among {len(tried)} "
        "allocations brought to the same target"), "candidates": tried}  # fmt: skip
    return result, cfg, search


def _search_on_device(model, inputs, meter: _Meter, base: PruneConfig, data, progress):
    """Latency-aware allocations (presso.compress.allocate.time_per_mac_allocations): each group's share of the cut
    weighted by (its measured time per MAC)^alpha, alpha = 0 being the uniform ratio. Under a latency budget the
    winner keeps the most MACs within the budget -- the most capacity for the time -- or, with calibration data,
    the lowest output distance after BatchNorm re-estimation; under a MACs budget on a device it runs fastest."""
    from presso.compress.allocate import time_per_mac_allocations
    from presso.compress.recommend import channel_groups

    members = channel_groups(model, inputs)
    if not members:
        return None
    candidates = time_per_mac_allocations(model, inputs, members, threads=meter.target.threads)
    judge = _Judge(model, data) if data is not None else None
    macs = model_figures(model, inputs)["macs"]
    limit = meter.share * (1 + meter.target.tolerance)

    def score(result, search, entry):
        entry["macs_kept"] = round(result.after["macs"] / macs, 4)
        if meter.latency:
            if search["best"] > limit:
                return None
            if judge is not None and judge.ok:
                entry["distance"] = judge(result.model)
                return entry["distance"]
            return -entry["macs_kept"]
        if not meter.met(search["best"]):
            return None
        entry["ms"] = round(meter.ms(result.model), 3)
        return entry["ms"]

    best, tried = _choose(model, inputs, meter, base, data, progress, candidates, score, len(candidates))
    if best is None:
        return None
    entry, result, cfg, search = best
    if meter.latency:
        rule = (
            "the lowest output distance from the original within the time budget"
            if "distance" in entry
            else "the most MACs kept within the time budget"
        )
    else:
        rule = "the fastest measured here at the same MACs"
    search = {**search, "why": f"{entry['allocation']}: {rule}, among {len(tried)} allocations weighted by measured "
              "time per MAC (ONNX Runtime here)", "candidates": tried}  # fmt: skip
    return result, cfg, search


def _search_prune_once(
    model, inputs, meter: _Meter, base: PruneConfig, scores, data, progress, why: str, tight: float | None = None
):
    """Bisect one allocation's knob until the target is met -- and, with ``tight``, until within that relative
    distance of it when the channel granularity allows (allocations compared with each other must keep the same
    MACs, not merely any share inside the tolerance)."""
    from presso.compress import compress

    def config(knob: float) -> PruneConfig:
        if scores is None:
            return dataclasses.replace(base, ratio=knob, per_layer=dict(base.per_layer))
        ratios = {**scores.ratios(knob), **base.per_layer}  # the user's own per-layer values win
        return dataclasses.replace(base, ratio=None, per_layer=ratios)

    def attempt(knob: float):
        result = compress(model, inputs, config(knob), data=data if base.criterion == "taylor" else None)
        return result, meter.kept(result)

    lo, hi = 0.0, getattr(scores, "knob_max", 0.95)
    best = None
    tries = []
    if meter.latency:
        lo_kept, hi_kept = 1.0, None  # the unpruned model keeps all its latency (not measured again)
    for k in range(MAX_TRIES):
        knob = (lo + hi) / 2
        if meter.latency:
            knob = _interpolated_knob(lo, hi, lo_kept, hi_kept, meter.aim)
        result, kept = attempt(knob)
        tries.append([round(knob, 4), round(kept, 4)])
        if progress:
            progress(k + 1, MAX_TRIES)
        if meter.better(kept, best[1] if best else None):
            best = (result, kept, knob)
        close = tight is None or meter.latency or abs(kept / meter.share - 1) <= tight
        if (meter.met(kept) and close) or (meter.latency and k + 1 >= LATENCY_TRIES):
            break
        if kept > meter.share:
            lo, lo_kept = knob, kept
        else:
            hi, hi_kept = knob, kept
    assert best is not None
    result, kept, knob = best
    search = {"method": "prune", "knob": "channel_share" if scores is not None else "ratio",
              "best_knob": round(knob, 4), "best": round(kept, 4), "why": why, "tries": tries}  # fmt: skip
    return result, config(knob), search


def _interpolated_knob(lo: float, hi: float, lo_kept: float, hi_kept: float | None, aim: float) -> float:
    """Next pruning knob for a measured (latency) target: each try costs an export and timed runs, so instead of
    bisecting, interpolate in sqrt(kept) -- what a network keeps falls about as (1 - share of channels removed)^2
    -- between the bracket's ends (from the unpruned end alone on the first try), kept away from the ends so a
    curved relation still shrinks the bracket."""
    import math

    top = hi_kept if hi_kept is not None else 0.0  # no lower end measured yet: (1 - knob)^2 reaches 0 at knob 1
    top_knob = hi if hi_kept is not None else 1.0
    a, b, t = math.sqrt(max(lo_kept, 0.0)), math.sqrt(max(top, 0.0)), math.sqrt(max(aim, 0.0))
    knob = lo + (top_knob - lo) * (a - t) / max(a - b, 1e-9)
    margin = 0.1 * (hi - lo)
    return min(hi - margin, max(lo + margin, knob))


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


def _merge_per_layer(first: dict, second: dict) -> dict:
    merged = dict(first)
    for name, info in second.items():
        merged[name] = {**merged.get(name, {}), **info} if "ranks" in info else merged.get(name, info)
    return merged
