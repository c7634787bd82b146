"""The models a run can deliver, measured side by side on the device, and the rule that picks one.

Candidates: the original at FP32 and at the deployment precision ("baseline INT8": the original merely quantized),
and the compressed (and recovered) model at both. They are timed in one interleaved run -- rounds in which every
candidate runs a block of back-to-back inferences, the order rotating from round to round -- so load from other
processes falls on all of them alike; a candidate's latency is the median of its block medians, its noise the spread
of those medians (their interquartile range, % of the median).

The rule (``select``):

1. A candidate keeps the accuracy when its top-1, scored on the same held-out images as the original FP32, is at
   most ``max_accuracy_drop`` below the original FP32's.
2. It meets a latency budget when its *measured* latency is within it. A MACs budget stands for speed: a candidate
   meets it by its MACs (within 3%), or by being measured as fast (within ``TIE``) as a candidate that keeps the
   accuracy and meets it by its MACs -- so the original merely quantized is delivered when compression does not
   beat it.
3. Of the candidates that do both, the fastest is delivered. Latencies within ``TIE`` of the fastest are a tie (a
   difference inside the measurement's noise); a tie goes to the original (a compression that buys no measurable
   speed is not delivered), then to the more accurate, then to the smaller file.
4. When none does both, the closest is delivered and the run reports a miss: the smallest sum of the accuracy miss
   (points over the bound, in units of the bound) and the budget miss (the share by which latency, or MACs, exceeds
   the budget); a tie goes to the faster. Never one that another candidate beats on both speed and accuracy: that
   one is delivered instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIE = 0.05  # latencies within 5% of each other are a tie: inside the noise of a shared machine's measurement
MACS_SLACK = 1.03  # a MACs budget is met within 3% (what `presso compress --target-macs` promises)


def label(model: str, precision: str) -> str:
    """``original FP32``, ``baseline INT8`` (the original merely converted), ``compressed INT8``, ..."""
    if model == "original" and precision != "fp32":
        return f"baseline {precision.upper()}"
    return f"{model} {precision.upper()}"


# --------------------------------------------------------------------------- interleaved measurement
def measure_interleaved(
    paths: dict[str, Path],
    device: str,
    threads: int | None,
    *,
    rounds: int = 7,
    block_seconds: float = 0.15,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median latency (ms) of each ONNX file in ``paths``, timed in ``rounds`` interleaved rounds on ``device``.

    Locally each file gets one ONNX Runtime session (``threads`` intra-op threads) and the same random input; a
    round runs each a block of about ``block_seconds`` (two discarded runs first, so the previous session's
    spinning threads go quiet). On a remote device each block is one ``benchmark`` call to its agent. Returns per
    name: ``latency_ms``, ``noise_pct`` (interquartile range of the round medians, % of the median), ``min_ms`` and
    ``max_ms`` (of the round medians), ``rounds``, ``runs_per_round``, ``threads``."""
    from presso.bench.devices import LOCAL
    from presso.bench.runner import input_feed, ort_session, resolve_threads, time_loop

    names = list(paths)
    n_threads = resolve_threads(threads)
    blocks: dict[str, Callable[[int], float]] = {}
    sizes: dict[str, int] = {}
    if device == LOCAL:
        feed = None
        for name in names:
            sess = ort_session(paths[name], n_threads)
            feed = feed if feed is not None else input_feed(sess)
            inp = {i.name: feed[k] for i, k in zip(sess.get_inputs(), feed, strict=False)}

            def block(n: int, sess=sess, inp=inp) -> float:
                for _ in range(2):
                    sess.run(None, inp)
                return statistics.median(time_loop(lambda: sess.run(None, inp), warmup=0, repeat=n,
                                                   max_seconds=block_seconds * 4))  # fmt: skip

            once = statistics.median(time_loop(lambda s=sess, i=inp: s.run(None, i), warmup=3, repeat=5))
            blocks[name], sizes[name] = block, max(5, min(1000, int(block_seconds * 1000 / max(once, 1e-3))))
    else:
        from presso.bench.api import benchmark

        for name in names:

            def block(n: int, path=paths[name]) -> float:
                r = benchmark(str(path), device, threads=threads, warmup=2, repeat=n, max_seconds=block_seconds * 4,
                              db=False)  # fmt: skip
                return float(r.latency_ms["median"])

            blocks[name], sizes[name] = block, 30
    medians: dict[str, list[float]] = {n: [] for n in names}
    total, done = rounds * len(names), 0
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no candidate always runs first
            medians[name].append(blocks[name](sizes[name]))
            done += 1
            if progress:
                progress(done, total)
    out = {}
    for name, ms in medians.items():
        med, q = statistics.median(ms), sorted(ms)
        iqr = q[(3 * len(q)) // 4] - q[len(q) // 4]  # robust to the odd round another process took over
        out[name] = {"latency_ms": round(med, 4), "noise_pct": round(iqr / med * 100, 1), "min_ms": round(q[0], 4),
                     "max_ms": round(q[-1], 4), "rounds": rounds, "runs_per_round": sizes[name],
                     "threads": n_threads}  # fmt: skip
    return out


# --------------------------------------------------------------------------- the rule
def assess(cands: list[dict[str, Any]], *, max_drop: float, latency_ms: float | None,
           target_macs: float | None) -> None:  # fmt: skip
    """Add to each candidate ``accuracy_drop_points`` (against the original FP32), ``accuracy_ok``, ``budget_ok``,
    ``macs_ratio`` and ``miss`` (0 when it meets both)."""
    ref = next(c for c in cands if c["id"] == "original-fp32")
    for c in cands:
        drop = None if c.get("accuracy") is None or ref.get("accuracy") is None else ref["accuracy"] - c["accuracy"]
        c["accuracy_drop_points"] = None if drop is None else round(100 * drop, 2)
        # unknown accuracy (no labels, no agreement figure) is not a breach it can be blamed for: it is said so
        c["accuracy_ok"] = drop is None or drop <= max_drop + 1e-9
        c["macs_ratio"] = round(c["macs"] / ref["macs"], 4) if c.get("macs") and ref.get("macs") else None
    if latency_ms is not None:
        for c in cands:
            c["budget_ok"] = c["latency_ms"] <= latency_ms
            c["budget_miss"] = max(0.0, c["latency_ms"] / latency_ms - 1)
    else:
        by_macs = [c for c in cands if c["macs_ratio"] is not None and c["macs_ratio"] <= target_macs * MACS_SLACK]
        kept = [m["latency_ms"] for m in by_macs if m["accuracy_ok"]]
        bar = min(kept) * (1 + TIE) if kept else None  # the speed the budget stands for, reached keeping accuracy
        for c in cands:
            c["budget_ok"] = any(c is m for m in by_macs) or (bar is not None and c["latency_ms"] <= bar)
            c["budget_miss"] = 0.0 if c["budget_ok"] else max(0.0, (c["macs_ratio"] or 1.0) / target_macs - 1)
    for c in cands:
        acc_miss = 0.0 if c["accuracy_ok"] else (c["accuracy_drop_points"] / 100 - max_drop) / max(max_drop, 1e-3)
        c["miss"] = round(acc_miss + c["budget_miss"], 4)


def select(cands: list[dict[str, Any]], *, max_drop: float, latency_ms: float | None,
           target_macs: float | None) -> tuple[dict[str, Any], str]:  # fmt: skip
    """The candidate to deliver (see the module docstring) and why, in a sentence or three."""
    assess(cands, max_drop=max_drop, latency_ms=latency_ms, target_macs=target_macs)
    both = [c for c in cands if c["accuracy_ok"] and c["budget_ok"]]
    bound = f"{100 * max_drop:g}-point accuracy bound"
    budget = f"{latency_ms:g} ms budget" if latency_ms is not None else f"{target_macs:.0%}-of-MACs budget"
    if both:
        fastest = min(both, key=lambda c: c["latency_ms"])
        tied = [c for c in both if c["latency_ms"] <= fastest["latency_ms"] * (1 + TIE)]
        chosen = max(tied, key=lambda c: (c["model"] == "original", c.get("accuracy") or 0.0, -c["size_bytes"]))
        why = [f"{chosen['label']} ({chosen['latency_ms']:.3f} ms, {_drop_text(chosen)}) is the fastest measured "
               f"candidate within the {bound} and the {budget}"]  # fmt: skip
        if chosen is not fastest:
            why[0] = (f"{chosen['label']} ({chosen['latency_ms']:.3f} ms, {_drop_text(chosen)}) ties with the fastest "
                      f"candidate within the {bound} and the {budget}, {fastest['label']} ({fastest['latency_ms']:.3f} "
                      f"ms, {_drop_text(fastest)}): within {TIE:.0%}, inside the measurement's noise, and a tie goes "
                      "to the original, then the more accurate, then the smaller")  # fmt: skip
    else:
        closest = min(cands, key=lambda c: (c["miss"], c["latency_ms"]))
        why = [f"no candidate meets both the {bound} and the {budget}; {closest['label']} is the closest "
               f"({closest['latency_ms']:.3f} ms, {_drop_text(closest)})"]  # fmt: skip
        # never one that another candidate beats on both speed and accuracy
        better = [c for c in cands if c is not closest and c["latency_ms"] <= closest["latency_ms"]
                  and (c.get("accuracy") or 0.0) >= (closest.get("accuracy") or 0.0)]  # fmt: skip
        chosen = min(better, key=lambda c: (c["miss"], c["latency_ms"])) if better else closest
        if chosen is not closest:
            why.append(f"{chosen['label']} ({chosen['latency_ms']:.3f} ms, {_drop_text(chosen)}) is faster and at "
                       "least as accurate, so it is delivered instead")  # fmt: skip
    for c in sorted(cands, key=lambda c: c["latency_ms"]):
        if c is chosen or c["latency_ms"] >= chosen["latency_ms"] or (c["accuracy_ok"] and c["budget_ok"]):
            continue
        reasons = [] if c["accuracy_ok"] else [_drop_text(c)]
        if not c["budget_ok"]:
            reasons.append("misses the budget" if latency_ms is not None else f"keeps {c['macs_ratio']:.0%} of MACs")
        why.append(f"{c['label']} is faster ({c['latency_ms']:.3f} ms) but " + " and ".join(reasons))
    prec = chosen["precision"]
    base = next((c for c in cands if c["model"] == "original" and c["precision"] == prec), None)
    comp = next((c for c in cands if c["model"] == "compressed" and c["precision"] == prec), None)
    if chosen["model"] == "original" and base is not None and comp is not None:
        why.append(f"compression did not beat {'quantization' if prec != 'fp32' else 'the original'} alone: "
                   f"{comp['label']} {comp['latency_ms']:.3f} ms ({_drop_text(comp)}) against {base['label']} "
                   f"{base['latency_ms']:.3f} ms")  # fmt: skip
    return chosen, "; ".join(why) + "."


def _drop_text(c: dict[str, Any]) -> str:
    d = c.get("accuracy_drop_points")
    if d is None:
        return "accuracy not scored"
    return f"loses {d:.1f} points" if d > 0 else f"gains {-d:.1f} points" if d < 0 else "no accuracy lost"
