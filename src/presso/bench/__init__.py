"""Benchmarker: latency of a model on a device (this machine or a remote agent), the latency database, and a
latency predictor built from it."""

from presso.bench.api import benchmark, calibrate, predict_latency
from presso.bench.runner import Measurement, measure_model, measure_onnx

__all__ = ["Measurement", "benchmark", "calibrate", "measure_model", "measure_onnx", "predict_latency"]
