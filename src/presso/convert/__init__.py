"""Launcher: export (ONNX, OpenVINO IR), INT8/FP16 with calibration and automatic precision, deployable bundles.

``presso.convert(model, inputs, ConvertConfig(to="onnx", precision="int8"), output_dir="OUT", calib="digits")``;
``presso.package("OUT", output_dir="dist", name="model.zip")``.
Imports are lazy: ``presso.convert.predict`` (what a bundle runs on a device) must load without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

from presso._verbs import callable_package

_LAZY = {
    "ConvertConfig": "presso.convert.launcher",
    "ConvertResult": "presso.convert.launcher",
    "Int8Config": "presso.convert.quantize",
    "export_onnx": "presso.models.onnx",
    "package": "presso.convert.package",
    "PackageResult": "presso.convert.package",
    "Predictor": "presso.convert.predict",
    "open_bundle": "presso.convert.predict",
}

__all__ = ["convert", *_LAZY]


def convert(*args, **kwargs):
    """Convert a model for deployment; see ``presso.convert.launcher.convert``."""
    from presso.convert.launcher import convert as run

    return run(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'presso.convert' has no attribute '{name}'")


callable_package(__name__, convert, "presso.convert.launcher:convert")
