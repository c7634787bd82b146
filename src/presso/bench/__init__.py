"""Benchmarker: latency of a model on a device (this machine or a remote agent), the latency database, and a
latency predictor built from the kernels ``profile_device`` timed on the device."""

from presso.bench.api import benchmark, predict_latency
from presso.bench.predictor import LatencyPrediction
from presso.bench.profile import profile_device
from presso.bench.results import BenchmarkResult, ProfileResult
from presso.bench.runner import Measurement, measure_model, measure_onnx

__all__ = [
    "BenchmarkResult",
    "LatencyPrediction",
    "Measurement",
    "ProfileResult",
    "benchmark",
    "measure_model",
    "measure_onnx",
    "predict_latency",
    "profile_device",
]
