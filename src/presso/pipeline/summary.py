"""``OUT/summary.json``: the headline (what was delivered and why, speed-ups, size ratios, accuracy drop, whether the
budget and the accuracy bound are met), every candidate measured, every stage's record, the commands to reproduce."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from presso.pipeline.candidates import TIE
from presso.pipeline.config import RunConfig
from presso.pipeline.stages import Job

NOISY_PCT = 25.0  # round-to-round spread above which the figures are flagged as noisy


def _ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a and b else None


def write_summary(job: Job, cfg: RunConfig, out: Path, t0: float, error: str | None = None) -> dict[str, Any]:
    recs = job.stages.records
    deploy = recs.get("deploy") or {}
    cands = {c["id"]: c for c in deploy.get("candidates") or []}
    delivered = dict(deploy.get("delivered") or {})
    d = cands.get(delivered.get("candidate"), {})
    ref = cands.get("original-fp32", {})
    base = cands.get("original-int8", {})
    delivered.update({k: d.get(k) for k in ("precision", "latency_ms", "noise_pct", "size_bytes", "accuracy",
                                            "accuracy_drop_points", "macs_ratio")} if d else {})  # fmt: skip
    budget_met = bool(d.get("budget_ok")) and not error
    bound_met = bool(d.get("accuracy_ok")) and not error
    budget: dict[str, Any] = {"latency_ms": cfg.latency_ms, "target_macs": cfg.target_macs, "device": cfg.device,
                              "threads": cfg.threads}  # fmt: skip
    if d:
        budget.update({"measured_ms": d["latency_ms"], "macs_ratio": d.get("macs_ratio"), "met": budget_met})
    budget["text"] = _budget_text(cfg, d, budget_met)
    original = recs.get("original", {})
    metric = job.headline if original.get(job.headline) is not None else "agreement"
    accuracy = {"metric": metric, "original": ref.get("accuracy"), "final": d.get("accuracy"),
                "drop": round(ref["accuracy"] - d["accuracy"], 4) if d.get("accuracy") is not None
                and ref.get("accuracy") is not None else None,
                "max_drop": cfg.max_accuracy_drop, "within_bound": bound_met,
                "scored_on": (d.get("accuracy_source") or "") + (f" ({metric})" if d else "")}  # fmt: skip
    summary: dict[str, Any] = {
        "delivered": delivered or None,
        "speedup_vs_original_fp32": _ratio(ref.get("latency_ms"), d.get("latency_ms")),
        "speedup_vs_baseline_int8": _ratio(base.get("latency_ms"), d.get("latency_ms")),
        "size_ratio": _ratio(d.get("size_bytes"), ref.get("size_bytes"), 3),
        "size_ratio_vs_baseline_int8": _ratio(d.get("size_bytes"), base.get("size_bytes"), 3),
        "accuracy_drop_points": d.get("accuracy_drop_points"),
        "budget_met": budget_met,
        "accuracy_bound_met": bound_met,
        "headline": [],
        "notes": [],
        "candidates": list(cands.values()),
        "data": job.data,
        "config": asdict(cfg),
        "budget": budget,
        "accuracy": accuracy,
        "stages": recs,
        "bundle": deploy.get("bundle"),
        "commands": [c for r in recs.values() for c in r.get("commands", [])],
        "seconds": round(time.perf_counter() - t0, 1),
        "error": error,
    }
    summary["headline"] = headline(summary) if d else []
    summary["notes"] = _notes(summary, cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _budget_text(cfg: RunConfig, d: dict[str, Any], met: bool) -> str:
    if cfg.latency_ms is not None:
        text = f"{cfg.latency_ms:g} ms on {cfg.device}"
        got = f"measured {d['latency_ms']:.3f} ms" if d else "not measured"
    else:
        text = f"{cfg.target_macs:.0%} of MACs"
        got = f"{d['macs_ratio']:.0%} of MACs, measured {d['latency_ms']:.3f} ms" if d.get("macs_ratio") else ""
    return f"{text}: {'met' if met else 'MISSED'}" + (f" ({got})" if got else "")


def headline(s: dict[str, Any]) -> list[str]:
    """The lines the console and the report open with."""
    d = s["delivered"]
    why = d["why"][len(d["label"]) + 1 :] if d["why"].startswith(d["label"] + " ") else f"-- {d['why']}"
    lines = [f"Delivered: {d['label']} {why} File: {d['path']}, packaged as deploy/bundle.zip."]
    speed = [f"{s['speedup_vs_original_fp32']:.2f}x vs original FP32"] if s["speedup_vs_original_fp32"] else []
    if s["speedup_vs_baseline_int8"]:
        speed.append(f"{s['speedup_vs_baseline_int8']:.2f}x vs baseline INT8")
    size = [f"{s['size_ratio']:.2f}x the original FP32"] if s["size_ratio"] else []
    if s["size_ratio_vs_baseline_int8"]:
        size.append(f"{s['size_ratio_vs_baseline_int8']:.2f}x baseline INT8")
    lines.append(f"Speed-up (measured on {s['budget']['device']}): {', '.join(speed) or 'not measured'}. "
                 f"Size: {', '.join(size) or 'unknown'}.")  # fmt: skip
    a = s["accuracy"]
    if s["accuracy_drop_points"] is not None:
        drop = s["accuracy_drop_points"]
        change = f"a drop of {drop:.2f} points" if drop >= 0 else f"a gain of {-drop:.2f} points"
        lines.append(
            f"Accuracy: {a['original']:.4f} -> {a['final']:.4f}, {change} "
            f"(bound {100 * a['max_drop']:g}): {'within' if s['accuracy_bound_met'] else 'BREACHED'}."
        )
    else:
        lines.append("Accuracy: not scored (the data has no labels and no agreement figure).")
    lines.append(f"Budget: {s['budget']['text']}.")
    return lines


def _notes(s: dict[str, Any], cfg: RunConfig) -> list[str]:
    notes = []
    d = s["delivered"] or {}
    compress = (s.get("stages") or {}).get("compress") or {}
    if compress.get("unreachable"):
        notes.append(f"Nothing was compressed: {compress['skipped']}.")
    if d and not (s["budget_met"] and s["accuracy_bound_met"]):
        missed = " and ".join(
            w for w, ok in (("the budget", s["budget_met"]), ("the accuracy bound", s["accuracy_bound_met"])) if not ok
        )
        notes.append(f"The delivered model misses {missed}" + (": accepted (--allow-miss)." if cfg.allow_miss else
                     ": the run exits non-zero; pass --allow-miss to accept it."))  # fmt: skip
    if d and d.get("precision") and d["precision"] != cfg.precision:
        model = d["candidate"].split("-")[0]
        other = next((c for c in s["candidates"] if c["id"] == f"{model}-{cfg.precision}"), {})
        p = cfg.precision.upper()
        if other.get("latency_ms") and other["latency_ms"] >= d["latency_ms"] / (1 + TIE):
            notes.append(f"Delivered at {d['precision'].upper()}, not {p}: the {p} file measured no faster on "
                         f"{cfg.device} ({other['latency_ms']:.3f} vs {d['latency_ms']:.3f} ms): for a model this "
                         f"small (or without fast {p} kernels here), the conversions cost what {p} saves.")  # fmt: skip
        elif other and not other.get("accuracy_ok", True):
            notes.append(f"Delivered at {d['precision'].upper()}, not {p}: the {p} file loses "
                         f"{other['accuracy_drop_points']:.1f} points, over the bound.")  # fmt: skip
    noisy = [c for c in s["candidates"] if (c.get("noise_pct") or 0) > NOISY_PCT]
    if noisy:
        notes.append("Noisy measurement (round-to-round spread " + ", ".join(f"{c['label']} {c['noise_pct']:.0f}%"
                     for c in noisy) + "): other load on the device; the medians compare the candidates under the "
                     "same load, but rerun on a quiet device for firm figures.")  # fmt: skip
    return notes
