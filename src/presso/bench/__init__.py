"""Benchmarker: latency of a model on a device (today: this machine, ONNX Runtime)."""

from presso.bench.runner import Measurement, measure_model, measure_onnx

__all__ = ["Measurement", "measure_model", "measure_onnx"]
