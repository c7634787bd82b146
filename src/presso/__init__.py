"""Presso: make neural networks small and fast enough for edge devices.

The public API is re-exported here lazily, so ``import presso`` stays fast and loads neither ONNX Runtime nor CUDA
(and ``presso --help`` does not even import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "presso.models",
    "save_model_dir": "presso.models",
    "load_model_dir": "presso.models",
    "InputSpec": "presso.models",
    "ModelCard": "presso.models",
    "compress": "presso.compress",
    "CompressResult": "presso.compress",
    "PruneConfig": "presso.compress",
    "info": "presso.api",
    "train": "presso.train",
    "TrainConfig": "presso.train",
    "TrainResult": "presso.train",
    "evaluate": "presso.train",
    "load_data": "presso.data",
    "convert": "presso.convert",
    "search": "presso.search",
    "run": "presso.pipeline",
    "ConvertConfig": "presso.convert",
    "benchmark": "presso.bench",
    "predict_latency": "presso.bench",
}
_ERRORS = [
    "PressoError",
    "ModelSourceError",
    "InputSpecError",
    "ConfigError",
    "UnsupportedLayerError",
    "UntrustedFileError",
    "BudgetError",
    "DataError",
    "ConversionError",
    "BundleError",
]

__all__ = sorted([*_EXPORTS, *_ERRORS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs only
    from presso.api import info  # noqa: F401
    from presso.compress import CompressResult, PruneConfig, compress  # noqa: F401
    from presso.convert import ConvertConfig, convert  # noqa: F401
    from presso.data import load_data  # noqa: F401
    from presso.errors import *  # noqa: F403
    from presso.models import InputSpec, ModelCard, load_model, load_model_dir, save_model_dir  # noqa: F401
    from presso.search import search  # noqa: F401
    from presso.train import TrainConfig, TrainResult, evaluate, train  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        # a verb named like its subpackage (compress) is that subpackage, made callable (see presso._verbs)
        return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    if name in _ERRORS:
        return getattr(importlib.import_module("presso.errors"), name)
    raise AttributeError(f"module 'presso' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
