"""What ``presso.benchmark`` and ``presso.profile_device`` return (``presso.predict_latency`` returns
``predictor.LatencyPrediction``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from presso.results import Result

NOISY_PCT = 20.0  # a run whose block medians spread more than this (% of its median) is flagged noisy: not to trust


@dataclass
class BenchmarkResult(Result):
    """One measurement of a model on a device: ``latency_ms`` (median, p90, p99, mean, std, min), throughput, peak
    memory, model size, the run's own noise, the environment, ONNX Runtime's per-operator ``profile`` when asked
    for, and ``db`` (where it was stored: url, uid, device fingerprint; None when not stored). ``noisy``: the run's
    noise is above ``NOISY_PCT`` -- the machine was busy; the row is flagged so in the database. Nothing is written
    to disk besides the database (``output_dir`` is None)."""

    model: str
    device: str
    runtime: str
    runtime_version: str
    precision: str
    threads: int
    batch: int
    input_shape: str
    latency_ms: dict[str, float]
    runs: int
    noise_pct: float
    throughput: float
    peak_memory_mb: float
    model_size_bytes: int
    model_fp: str
    environment: dict[str, Any]
    profile: dict[str, Any] | None = None
    db: dict[str, Any] | None = None
    output_dir: Path | None = None
    noisy: bool = False

    @property
    def median_ms(self) -> float:
        return self.latency_ms["median"]

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        if self.db is None:  # nothing stored: no database entry to name
            del out["db"]
        out["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        return out


@dataclass
class ProfileResult(Result):
    """A device profiled for the latency predictor: ``kernels`` rows stored for ``device`` (fingerprint
    ``device_fp``, ``threads``) in ``db`` (URL, password hidden), in ``windows`` windows of kernels, of which
    ``windows_redone`` were measured again and ``windows_busy`` stayed busier than the quietest (None: no probe);
    ``resumed``: kernel models already in the database from an earlier, interrupted run (not timed again);
    ``networks``: calibration networks timed whole by this run (their kernels are not counted in ``kernels``).
    Nothing is written to disk besides the database (``output_dir`` is None)."""

    device: str
    device_fp: str
    threads: int
    kernels: int
    windows: int
    windows_redone: int
    windows_busy: int | None
    seconds: float
    db: str
    output_dir: Path | None = None
    resumed: int = 0
    networks: int = 0

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "output_dir": None}
