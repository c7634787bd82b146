"""Latency predictor: a model's latency on a device as the sum of its kernels' latencies, from the database.

In the manner of nn-Meter and Once-for-All's lookup tables: the model (any ONNX graph) is decomposed into the kernels
ONNX Runtime runs (``presso.bench.kernels``); each kernel is looked up by its exact signature among the device's
calibration measurements, or estimated from measured kernels of the same family at other shapes; the per-run and
per-node overhead measured on chains of tiny nodes is added.

Per family, the estimate is a ridge regression of log-latency on log-features (MACs, bytes in/out/weights,
channels, spatial size, kernel size, stride, fused activation/sum) -- a power law, which extrapolates -- corrected
by extremely randomized trees fitted on its residuals, which capture the efficiency steps of real kernels (channel
blocks, cache sizes) between measured shapes.

Kernels are fitted both as timed alone (the calibration kernel set) and as timed inside the calibration networks
(``presso.bench.networks``): alone, a kernel finds its weights and input evicted from the caches; inside a network,
the layer before it has just written its input, and small networks keep their weights in cache from run to run.
Fitting the in-context times beside the isolated ones took 60 unseen models from 45.0% to 46.7% within +-10% of
measured on the same measurements (median error 11.5% -> 10.8%; depthwise convolutions' bias -28% -> -9%, but the
thin decomposed chains got worse: docs/benchmarks.md, "Latency prediction"); a whole-model correction fitted on the
networks' wall times did not help, so those are not used (they stay in the database, kind ``network``).

A power law extrapolated below the profiled shapes can predict a kernel at a small fraction of a microsecond, while
the chains' per-node overhead is negative (the profiler adds about two microseconds to every node it times): summed
over a small network, the two cancelled to a whole-model prediction near zero. Every estimate is therefore floored
at the fastest kernel profiled on the device -- each profiled time includes the profiler's own per-node cost, so no
profiled kernel can take less -- and the per-node overhead cannot remove more than that floor from a node.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presso.bench.kernels import FEATURES, Kernel
from presso.errors import ConfigError
from presso.results import Result

logger = logging.getLogger(__name__)

MIN_FOR_TREES = 15
MIN_FOR_RIDGE = 4


@dataclass
class LatencyPrediction(Result):
    """What ``presso.predict_latency`` returns: the predicted latency and how its kernels were found. Nothing is
    written (``output_dir`` is None)."""

    latency_ms: float
    overhead_ms: float
    device: str
    device_fp: str
    kernels: int
    looked_up: int  # kernels found with their exact signature
    estimated: int  # kernels estimated from their family's regression
    unknown: int  # kernels of a family never measured on this device (estimated from all kernels by bytes)
    by_family: dict[str, float] = field(default_factory=dict)
    unknown_families: list[str] = field(default_factory=list)
    output_dir: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "output_dir": None if self.output_dir is None else str(self.output_dir)}


Prediction = LatencyPrediction  # its name before every verb's result was a Result


class _FamilyModel:
    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int = 0):
        from sklearn.linear_model import Ridge

        self.mu, self.sd = X.mean(0), X.std(0) + 1e-6
        Z = (X - self.mu) / self.sd
        self.ridge = Ridge(alpha=1.0).fit(Z, y)
        self.trees = None
        if len(y) >= MIN_FOR_TREES:
            from sklearn.ensemble import ExtraTreesRegressor

            resid = y - self.ridge.predict(Z)
            self.trees = ExtraTreesRegressor(n_estimators=200, min_samples_leaf=2, random_state=seed).fit(Z, resid)

    def predict(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mu) / self.sd
        out = self.ridge.predict(Z)
        if self.trees is not None:
            out = out + self.trees.predict(Z)
        return np.exp(out)


class LatencyPredictor:
    """Fitted from one device's kernel and overhead rows of the latency database."""

    def __init__(
        self,
        kernel_rows: list[dict],
        overhead_rows: list[dict],
        *,
        network_rows: list[dict] = (),
        device: str = "",
        device_fp: str = "",
    ):
        if not kernel_rows:
            raise ConfigError(
                f"No profiled kernels for device '{device}' (fingerprint {device_fp}) in the latency database: "
                f"run 'presso db profile --device {device or 'local'}' first (same threads and runtime)."
            )
        self.device, self.device_fp = device, device_fp
        self.table: dict[str, list[float]] = defaultdict(list)
        fam: dict[str, list[tuple[list[float], float]]] = defaultdict(list)
        for r in [*kernel_rows, *in_context(network_rows)]:
            feats = r["features"] or {}
            ms = float(r["median_ms"])
            if ms <= 0:
                ms = 5e-4  # below the profiler's microsecond resolution
            self.table[feats["signature"]].append(ms)
            fam[r["kernel_key"]].append(([float(feats["x"].get(f, 0.0)) for f in FEATURES], ms))
        self.models: dict[str, _FamilyModel] = {}
        self.ratio: dict[str, float] = {}
        for family, pts in fam.items():
            X = np.array([p[0] for p in pts])
            y = np.log(np.array([p[1] for p in pts]))
            if len(pts) >= MIN_FOR_RIDGE:
                self.models[family] = _FamilyModel(X, y)
            else:  # too few points: latency per byte moved, from the nearest measured kernel
                self.ratio[family] = float(np.median(y - np.log(np.exp(X[:, 1]) + np.exp(X[:, 2]))))
        allX = np.array([[p[0][1], p[0][2], p[0][0]] for pts in fam.values() for p in pts])
        ally = np.log(np.array([p[1] for pts in fam.values() for p in pts]))
        from sklearn.linear_model import Ridge

        self.fallback = Ridge(alpha=1.0).fit(allX, ally)
        # The fastest kernel profiled here (a tiny Add of the overhead chains, ~2 us): a profiled time includes the
        # profiler's per-node cost, so it bounds every kernel from below. Not the fastest of each family: a family
        # profiled only at large shapes (the quick set has one depthwise convolution) would floor its small
        # kernels far above their real time. Times of 0 (under the profiler's resolution) say nothing of the bound.
        self.floor_ms = min((ms for pts in fam.values() for _, ms in pts if ms > 5e-4), default=5e-4)
        self.per_run_ms, self.per_node_ms = _fit_overhead(overhead_rows)
        if self.per_node_ms < -self.floor_ms:
            # more than the profiler can have added to a node: a noisy overhead fit (the chains' wall times taken
            # during a burst of other work), which would make each node cost negative time
            logger.warning(
                "Per-node overhead %.4f ms of device '%s' removes more than its fastest profiled kernel (%.4f ms); "
                "using -%.4f ms (profile the device again on a quieter machine).",
                self.per_node_ms, device, self.floor_ms, self.floor_ms,
            )  # fmt: skip
            self.per_node_ms = -self.floor_ms

    @classmethod
    def from_db(cls, db, *, device: str, device_fp: str) -> LatencyPredictor:
        kernels = db.rows(device_fp=device_fp, kind="kernel")
        overhead = db.rows(device_fp=device_fp, kind="overhead")
        networks = db.rows(device_fp=device_fp, kind="network")
        return cls(kernels, overhead, network_rows=networks, device=device, device_fp=device_fp)

    def kernel_ms(self, kernels: list[Kernel]) -> list[tuple[float, str]]:
        """Each kernel's latency (ms) and how it was found: 'table', 'regression' or 'unknown'."""
        out: list[tuple[float, str] | None] = [None] * len(kernels)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, k in enumerate(kernels):
            hit = self.table.get(k.signature)
            if hit:
                out[i] = (statistics.median(hit), "table")
            else:
                groups[k.family].append(i)
        for family, idx in groups.items():
            X = np.array([kernels[i].vector() for i in idx])
            if family in self.models:
                ms, how = self.models[family].predict(X), "regression"
            elif family in self.ratio:
                ms, how = np.exp(self.ratio[family]) * (np.exp(X[:, 1]) + np.exp(X[:, 2])), "regression"
            else:
                ms, how = np.exp(self.fallback.predict(X[:, [1, 2, 0]])), "unknown"
            low = ms < self.floor_ms
            if low.any():
                logger.info(
                    "%d %s kernel(s) estimated at %.2g ms, under the fastest kernel profiled on '%s' (%.4f ms): "
                    "counted at that floor (a power law extrapolated below the profiled shapes).",
                    int(low.sum()), family, float(ms.min()), self.device, self.floor_ms,
                )  # fmt: skip
                ms = np.maximum(ms, self.floor_ms)
            for j, i in enumerate(idx):
                out[i] = (float(ms[j]), how)
        return [o for o in out if o is not None]

    def predict_kernels(self, kernels: list[Kernel]) -> LatencyPrediction:
        timed = self.kernel_ms(kernels)
        by_family: dict[str, float] = defaultdict(float)
        for k, (ms, _) in zip(kernels, timed, strict=True):
            by_family[k.family] += ms
        overhead = self.per_run_ms + self.per_node_ms * len(kernels)
        hows = [h for _, h in timed]
        unknown = sorted({k.family for k, (_, h) in zip(kernels, timed, strict=True) if h == "unknown"})
        return LatencyPrediction(
            latency_ms=round(sum(ms for ms, _ in timed) + overhead, 4),
            overhead_ms=round(overhead, 4),
            device=self.device,
            device_fp=self.device_fp,
            kernels=len(kernels),
            looked_up=hows.count("table"),
            estimated=hows.count("regression"),
            unknown=hows.count("unknown"),
            by_family={f: round(v, 4) for f, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
            unknown_families=unknown,
        )


def in_context(network_rows: list[dict]) -> list[dict]:
    """The kernels of the calibration networks as kernel rows: each with its time profiled inside its network."""
    return [
        {"kernel_key": k["family"], "median_ms": k["ms"], "features": {"signature": k["signature"], "x": k["features"]}}
        for r in network_rows
        for k in (r["features"] or {}).get("kernels", [])
        if k.get("ms") is not None
    ]


def _fit_overhead(rows: list[dict]) -> tuple[float, float]:
    """wall - sum(kernels) = per_run + per_node * nodes, least squares over the chain models.

    ``per_node`` is usually negative: the profiler that timed the calibration kernels adds a few microseconds to
    every node it times, which an unprofiled run does not pay."""
    pts = [(r["features"]["nodes"], r["median_ms"] - r["features"]["kernel_ms"]) for r in rows if r.get("features")]
    if len(pts) == 1 and pts[0][1] < 0 and pts[0][0] > 0:
        # one chain cannot separate the two; only the profiler's per-node cost makes the difference negative, and
        # a negative per-run overhead would be subtracted from every model whatever its size
        return 0.0, pts[0][1] / pts[0][0]
    if len(pts) < 2:
        return (pts[0][1] if pts else 0.0), 0.0
    n = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    slope, intercept = np.polyfit(n, y, 1)
    return max(float(intercept), 0.0), float(slope)
