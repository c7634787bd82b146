"""Choosing a pruning allocation for a budget: each candidate allocation's global knob is searched until the model
keeps the target's share (bisection on MACs/params; interpolation on measured latency), and the best candidate wins.

- with calibration data: EagleEye-style candidates (uniform, LAMP, LAMP x sensitivity, random perturbations) judged
  by their outputs after BatchNorm re-estimation (``presso.compress.allocate``);
- on a device: allocations weighted by measured time per MAC, judged by what they keep within the time budget or
  how fast they run;
- otherwise one allocation (LAMP per unit cost, or the uniform ratio) with its knob bisected.
Every try is a real pruning run through ``presso.compress.engine.apply``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from presso.compress.engine import apply
from presso.compress.prune import PruneConfig, needs_gradients
from presso.compress.recommend import lamp_scores
from presso.compress.target import Target
from presso.errors import BudgetError, PressoError
from presso.models.figures import model_figures

MAX_TRIES = 16
LATENCY_TRIES = 8  # each try of a latency search is an ONNX export and a timed run


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
        self.label = {"latency_ms": "latency", "macs": "MACs", "params": "params"}[target.key]  # for progress
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
        n = done + len(tried)

        def inner(_k, _n, n=n, name=name, **info):  # a try of this candidate: the bar stays at candidates done
            if progress:
                progress(n, total, allocation=name, candidate=n + 1, **info)

        result, cfg, search = _bisect(model, inputs, meter, base, allocation, data, inner, name,
                                      tight=meter.target.tolerance / 4)  # fmt: skip
        entry = {"allocation": name, "kept": search["best"]}
        value = score(result, search, entry)
        if value is not None and (best is None or value < best[0]["score"]):
            entry["score"] = value
            best = (entry, result, cfg, search)
        tried.append(entry)
        if progress:
            # its score as measured: the output distance, or the time (ms); not the ranking's sign-flipped MACs
            progress(n + 1, total, allocation=name, candidate=n + 1, kept=search["best"], of=meter.label,
                     score=entry.get("distance", entry.get("ms")))  # fmt: skip
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

    if progress:
        progress(0, None, phase="scoring layers on the calibration data")
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
    result = dataclasses.replace(result, extra={**result.extra, "batchnorm_adapted": True})
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
    if progress:
        progress(0, None, phase="measuring each layer's time per MAC")
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

    def config(knob: float) -> PruneConfig:
        if scores is None:
            return dataclasses.replace(base, ratio=knob, per_layer=dict(base.per_layer))
        ratios = {**scores.ratios(knob), **base.per_layer}  # the user's own per-layer values win
        return dataclasses.replace(base, ratio=None, per_layer=ratios)

    def attempt(knob: float):
        result = apply(model, inputs, [config(knob)], data=data if needs_gradients(base.criterion) else None)
        return result, meter.kept(result)

    lo, hi = 0.0, getattr(scores, "knob_max", 0.95)
    best = None
    tries = []
    if meter.latency:
        lo_kept, hi_kept = 1.0, None  # the unpruned model keeps all its latency (not measured again)
    most = LATENCY_TRIES if meter.latency else MAX_TRIES  # the most tries this search can take
    for k in range(MAX_TRIES):
        knob = (lo + hi) / 2
        if meter.latency:
            knob = _interpolated_knob(lo, hi, lo_kept, hi_kept, meter.aim)
        result, kept = attempt(knob)
        tries.append([round(knob, 4), round(kept, 4)])
        if progress:
            progress(k + 1, most, attempt=k + 1, tries=most, kept=round(kept, 4), of=meter.label,
                     ms=round(kept * meter.base, 3) if meter.latency else None, knob=round(knob, 4))  # fmt: skip
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
    if progress:  # done: the bar ends at the tries taken, not at the most there could have been
        progress(len(tries), len(tries), attempt=len(tries), tries=len(tries), kept=round(kept, 4), of=meter.label,
                 ms=round(kept * meter.base, 3) if meter.latency else None, knob=round(knob, 4))  # fmt: skip
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
