"""Launcher: export (ONNX first). Quantization and packaging build on ``export_onnx``."""

from presso.convert.onnx import export_onnx

__all__ = ["export_onnx"]
