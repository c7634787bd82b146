"""``profile_device``: time the calibration kernel set on a device -- this machine or a remote agent -- for the
latency predictor.

One loop for both: each spec of the kernel set (``presso.bench.calibration``) is built as a single-kernel ONNX
model, decomposed into the kernels ONNX Runtime runs for it, timed (here: by the profiler, caches evicted between
runs; on an agent: profiled there, answered over HTTP), and every kernel it ran becomes a row of the latency database
(chains of tiny nodes also give an ``overhead`` row: the whole run's wall time). The specs go in windows of
``WINDOW``; on this machine a reference kernel (``QuietProbe``) is timed around each window, and the windows taken
while the machine was busier than it later proved to be are measured again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from presso.bench.devices import LOCAL
from presso.bench.results import ProfileResult
from presso.errors import ConfigError
from presso.progress import ProgressCallback, reporter

WINDOW = 20  # calibration specs measured between two looks at the reference kernel
QUIET = 1.1  # a window counts as quiet when the reference kernel is within 10% of its best time

# model bytes, whether the wall time is wanted -> per-node kernel times (ms), the wall median (ms) or None
Measure = Callable[[bytes, bool], tuple[dict[str, float], float | None]]


@dataclass
class KernelTiming:
    spec: str
    wall_ms: float | None  # whole-model wall time (chains and calibration networks)
    nodes: list[dict[str, Any]]  # one per node run: kernel family/signature/features and its time
    network: bool = False  # a calibration network: one row for the whole model (its kernels as features)


def device_env(device: str, threads: int | None) -> dict[str, Any]:
    """The environment a device's kernels are fingerprinted with (ONNX Runtime, ``threads``, fp32): what
    ``profile_device`` stores them under and ``predict_latency`` looks them up by."""
    from presso.bench.env import environment
    from presso.bench.runner import resolve_threads

    if device == LOCAL:
        import onnxruntime as ort

        return environment("onnxruntime", ort.__version__, resolve_threads(threads))
    from presso.bench.client import AgentClient

    env = dict(AgentClient.for_device(device).info()["environment"])
    env["threads"] = threads or env.get("cores") or env["threads"]
    return env


def profile_device(
    device: str = LOCAL,
    *,
    threads: int | None = None,
    size: str = "full",
    runs: int = 12,
    db: str | None = None,
    specs: list | None = None,
    flush_mb: float = 4.0,
    quiet: bool | Any = True,
    wait_seconds: float = 10.0,
    redo_seconds: float = 120.0,
    again: bool = False,
    progress: ProgressCallback | None = None,
) -> ProfileResult:
    """Time the calibration kernel set on ``device`` and store every kernel in the latency database, for
    ``predict_latency``.

    ``size``: ``full`` (1041 kernel models and 48 calibration networks, ``presso.bench.networks``: 1-5 minutes on a
    quiet 2-core machine, up to 12 on a busy one) or ``quick`` (29 and 4: about 4 seconds on an idle 2-core
    machine, up to about a minute under load; a smoke test);
    ``specs``: an explicit list of ``presso.bench.calibration.Spec`` instead.
    ``runs``: profiled runs per kernel model. ``flush_mb``: buffer written between profiled runs to evict
    the caches (local). ``quiet``: on this machine, look at a reference kernel every 20 specs (or pass a
    ``QuietProbe`` to share one): pause while other processes slow it down by more than 10%, and measure again, at
    the end, the windows taken while the machine was busier than it later proved to be. ``wait_seconds``: longest
    pause per window; ``redo_seconds``: most time allowed for measuring busy windows again (never more than the
    measuring itself took).

    Resumable: each kernel model's rows are stored as soon as it is timed, and the kernel models already stored for
    this device fingerprint (device, CPU, runtime and version, threads) with the same ``runs`` and ``flush_mb`` are
    not timed again -- a killed run picks up where it stopped. ``again``: time every kernel model again, each one's
    new rows replacing its old ones. ``progress`` gets stage ``profile`` events: kernel models done of the set
    (``resumed``: how many were already stored). Returns a ``ProfileResult``: device, fingerprint, threads, kernels
    stored by this run, kernel models resumed, windows (measured again / still busy), seconds, and the database's
    URL (password hidden).
    """
    from presso.bench.calibration import QuietProbe, kernel_set
    from presso.bench.env import device_fingerprint
    from presso.bench.latency_db import LatencyDB, safe_url
    from presso.bench.networks import network_set

    if specs is None and size not in ("full", "quick"):
        raise ConfigError(f"Kernel set size '{size}': use full or quick.")
    env = device_env(device, threads)
    n_threads = env["threads"]
    fp = device_fingerprint(device, env, "fp32")
    store = LatencyDB(db)
    measure = _measurer(device, n_threads, runs, flush_mb)
    started = time.time()
    base = {
        "device": device,
        "device_fp": fp,
        "cpu": env.get("cpu"),
        "gpu": env.get("gpu"),
        "runtime": "onnxruntime",
        "runtime_version": env.get("runtime_version"),
        "threads": n_threads,
        "precision": "fp32",
    }
    settings = {"runs": runs, "flush_mb": flush_mb}
    spec_list = specs if specs is not None else kernel_set(size) + network_set(size)
    stored = set() if again else profiled_specs(store, fp, settings)
    pending = [spec for spec in spec_list if spec.label() not in stored]
    resumed = len(spec_list) - len(pending)
    report = reporter(progress, "profile")
    report(resumed, len(spec_list), resumed=resumed)
    probe = None
    if pending:
        probe = (
            quiet if isinstance(quiet, QuietProbe) else (QuietProbe(n_threads) if device == LOCAL and quiet else None)
        )
    windows = [pending[k : k + WINDOW] for k in range(0, len(pending), WINDOW)]
    kept: dict[int, float] = {}  # window -> the reference kernel's ms while its stored rows were measured
    kernels: dict[str, int] = {}  # kernel model -> kernel rows stored for it by this run
    networks: set[str] = set()  # calibration networks stored by this run
    done = resumed

    def store_rows(ref: float, timings: list[KernelTiming]) -> None:
        store.replace_kernels(fp, [t.spec for t in timings], _rows(base, ref, timings, settings))
        kernels.update({t.spec: len(t.nodes) for t in timings if not t.network})
        networks.update(t.spec for t in timings if t.network and t.wall_ms is not None)

    def measure_window(w: int) -> None:
        nonlocal done
        first = w not in kept
        ref = 0.0
        if probe is not None:
            probe.wait(tolerance=QUIET, max_seconds=wait_seconds)
            ref = probe.last_ms
        timings = []
        for spec in windows[w]:
            timing = time_spec(measure, spec)
            timings.append(timing)
            if first:  # stored as it completes: a killed run resumes after it
                store_rows(ref, [timing])
                done += 1
                report(done, len(spec_list), resumed=resumed)
        if probe is not None:
            probe.factor()
            ref = max(ref, probe.last_ms)
        if first:
            kept[w] = ref
        elif ref < kept[w]:  # a quieter measurement of a busy window replaces it
            kept[w] = ref
            store_rows(ref, timings)

    for w in range(len(windows)):
        measure_window(w)
    redone = 0
    if probe is not None:
        # windows measured while the machine was busier than it later proved to be are measured again, for at most
        # as long as the measuring took (a quick set stays quick)
        deadline = time.time() + min(redo_seconds, time.time() - started)
        while time.time() < deadline:
            busy = sorted((w for w, ref in kept.items() if ref > QUIET * probe.best), key=lambda w: -kept[w])
            if not busy:
                break
            for w in busy:
                if time.time() >= deadline:
                    break
                report(done, len(spec_list), resumed=resumed, phase=f"measuring busy window {w + 1} again")
                measure_window(w)
                redone += 1
    busy_left = sum(ref > QUIET * probe.best for ref in kept.values()) if probe is not None else None
    return ProfileResult(
        device=device,
        device_fp=fp,
        threads=n_threads,
        kernels=sum(kernels.values()),
        windows=len(windows),
        windows_redone=redone,
        windows_busy=busy_left,
        seconds=round(time.time() - started, 1),
        db=safe_url(store.url),
        resumed=resumed,
        networks=len(networks),
    )


# a profile missing at most this share of a kernel set (or 3 kernel models) is whole: a few kernel models leave no
# row (ONNX Runtime folds their only node away), and which ones depends on the CPU and the runtime's version
MISSING = 0.05


def unfinished(labels: set[str]) -> tuple[int, int] | None:
    """(kernel models stored, kernel models in the set) when ``labels`` -- the kernel models stored for a device --
    are an interrupted profile of the full or quick kernel set; None when it is whole, or made of other kernels."""
    from presso.bench.calibration import kernel_set

    sets = [{spec.label() for spec in kernel_set(size)} for size in ("full", "quick")]
    if not labels or not labels <= sets[0] | sets[1]:
        return None
    best = max(sets, key=lambda s: len(labels & s) / len(s))
    done = len(labels & best)
    return (done, len(best)) if len(best) - done > max(3, MISSING * len(best)) else None


def profiled_specs(store, device_fp: str, settings: dict[str, Any]) -> set[str]:
    """The kernel models (labels) already profiled for ``device_fp`` with these ``settings`` (runs, flush_mb)."""
    return {
        r["model_name"]
        for kind in ("kernel", "overhead", "network")
        for r in store.rows(device_fp=device_fp, kind=kind)
        if (r["extra"] or {}).get("settings") == settings
    }


def _measurer(device: str, threads: int, runs: int, flush_mb: float) -> Measure:
    """How ``device`` times one kernel model: this machine's profiler (caches evicted) or its agent's."""
    if device == LOCAL:
        from presso.bench.calibration import CacheFlush, measure_spec_local

        flush = CacheFlush(flush_mb)
        return lambda data, wall: measure_spec_local(data, threads, runs, wall, flush)
    from presso.bench.client import AgentClient

    client = AgentClient.for_device(device)

    def measure(data: bytes, wall: bool) -> tuple[dict[str, float], float | None]:
        r = client.benchmark(
            data,
            threads=threads,
            warmup=2,
            repeat=max(runs * 3, 30) if wall else 3,
            max_seconds=5,
            profile=True,
            profile_top=0,
        )
        times = {n["node"]: n.get("p25_ms", n["ms"]) for n in r["profile"]["nodes"]}
        return times, (r["median_ms"] if wall else None)

    return measure


def time_spec(measure: Measure, spec) -> KernelTiming:
    """Build ``spec``'s kernel model, time it with ``measure``, and name each node it ran by its kernel (family,
    signature, features) as this machine's ONNX Runtime optimizes the model."""
    from presso.bench.calibration import build
    from presso.bench.kernels import kernels_of, optimized_model
    from presso.bench.networks import build_network

    network = spec.kind == "network"
    data = build_network(spec.params) if network else build(spec)
    kernels = {k.name: k for k in kernels_of(optimized_model(data))}
    times, wall_ms = measure(data, spec.kind == "chain" or network)
    nodes = []
    if network:  # every kernel the network runs, as the predictor will decompose it (its profiled time in context)
        for name, k in kernels.items():
            nodes.append({"family": k.family, "signature": k.signature, "features": k.features, "ms": times.get(name)})
        return KernelTiming(spec.label(), wall_ms, nodes, network=True)
    for name, ms in times.items():
        k = kernels.get(name)
        if k is None:  # a node the local optimizer did not produce (a different runtime on the device)
            continue
        nodes.append({"name": name, "family": k.family, "signature": k.signature, "features": k.features, "ms": ms})
    return KernelTiming(spec.label(), wall_ms, nodes)


def _rows(
    base: dict[str, Any], ref: float, timings: list[KernelTiming], settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """The database rows of timed kernel models: a ``kernel`` row per node run, an ``overhead`` row per chain's wall
    time; each with the reference kernel's time meanwhile and the profile's settings (what a resumed run matches)."""
    rows = []
    for timing in timings:
        if timing.network:
            if timing.wall_ms is not None:
                rows.append(
                    {
                        **base,
                        "kind": "network",
                        "median_ms": timing.wall_ms,
                        "model_name": timing.spec,
                        "features": {"kernels": timing.nodes},
                        "extra": {"reference_ms": ref, "settings": settings},
                    }
                )
            continue
        for node in timing.nodes:
            rows.append(
                {
                    **base,
                    "kind": "kernel",
                    "kernel_key": node["family"],
                    "median_ms": node["ms"],
                    "model_name": timing.spec,
                    "features": {"signature": node["signature"], "x": node["features"]},
                    "extra": {"reference_ms": ref, "settings": settings},
                }
            )
        if timing.wall_ms is not None:
            rows.append(
                {
                    **base,
                    "kind": "overhead",
                    "median_ms": timing.wall_ms,
                    "model_name": timing.spec,
                    "features": {"nodes": len(timing.nodes), "kernel_ms": sum(n["ms"] for n in timing.nodes)},
                    "extra": {"reference_ms": ref, "settings": settings},
                }
            )
    return rows
