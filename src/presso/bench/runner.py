"""Local latency measurement with ONNX Runtime: warm-up, then repeated runs; robust statistics (median, p90)."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Measurement:
    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    threads: int
    runtime: str
    runtime_version: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_onnx(
    path: str | Path,
    inputs: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 30.0,
) -> Measurement:
    """Time ``path`` on this machine's CPU with ONNX Runtime (``threads``: intra-op threads; default all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, inputs)
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(samples) < repeat and (len(samples) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(None, inputs)
        samples.append((time.perf_counter() - t0) * 1000)
    ordered = sorted(samples)
    return Measurement(
        median_ms=round(statistics.median(ordered), 4),
        p90_ms=round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        mean_ms=round(statistics.fmean(ordered), 4),
        std_ms=round(statistics.pstdev(ordered), 4),
        runs=len(ordered),
        threads=threads or 0,
        runtime="onnxruntime",
        runtime_version=ort.__version__,
    )


def measure_model(model, example_inputs: tuple, **kwargs) -> Measurement:
    """Export ``model`` to ONNX (``presso.convert.export_onnx``) and time it with ``measure_onnx``."""
    from presso.convert.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="presso-bench-") as tmp:
        path = export_onnx(model, example_inputs, Path(tmp) / "model.onnx")
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, example_inputs, strict=False)}
        return measure_onnx(path, feed, **kwargs)
