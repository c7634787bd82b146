"""Presso: make neural networks small and fast enough for edge devices.

The public API is re-exported here lazily, so ``import presso`` stays fast and loads neither ONNX Runtime nor CUDA
(and ``presso --help`` does not even import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from presso import errors as _errors

__version__ = "0.1.0"

_EXPORTS = {
    # verbs
    "load_model": "presso.models",
    "save_model_dir": "presso.models",
    "load_model_dir": "presso.models",
    "compress": "presso.compress",
    "train": "presso.train",
    "evaluate": "presso.train",
    "load_data": "presso.data",
    "convert": "presso.convert",
    "package": "presso.convert.package",  # not via presso.convert: its submodule of that name shadows the function
    "search": "presso.search",
    "run": "presso.pipeline",
    "benchmark": "presso.bench",
    "predict_latency": "presso.bench",
    "profile_device": "presso.bench",
    "info": "presso.api",
    # configs and inputs
    "InputSpec": "presso.models",
    "ModelCard": "presso.models",
    "PruneConfig": "presso.compress",
    "DecomposeConfig": "presso.compress",
    "Target": "presso.compress",
    "TrainConfig": "presso.train",
    "ConvertConfig": "presso.convert",
    "Int8Config": "presso.convert",
    "SearchConfig": "presso.search.nas",
    "RunConfig": "presso.pipeline",
    "DataBundle": "presso.data",
    # results: every verb returns one (presso.results.Result: .summary(), .output_dir, .to_json())
    "Result": "presso.results",
    "CompressResult": "presso.compress",
    "TrainResult": "presso.train",
    "EvalResult": "presso.train",
    "ConvertResult": "presso.convert",
    "PackageResult": "presso.convert.package",
    "SearchResult": "presso.search.nas",
    "RunResult": "presso.pipeline",
    "BenchmarkResult": "presso.bench",
    "ProfileResult": "presso.bench",
    "LatencyPrediction": "presso.bench",
    "InfoResult": "presso.api",
    # progress: every verb's progress= takes a ProgressCallback
    "ProgressEvent": "presso.progress",
    "ProgressCallback": "presso.progress",
}
_ERRORS = [name for name in _errors.__all__ if name != "closest"]  # presso.errors is light: stdlib only

__all__ = sorted([*_EXPORTS, *_ERRORS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs only
    from presso.api import InfoResult, info  # noqa: F401
    from presso.bench import (  # noqa: F401
        BenchmarkResult,
        LatencyPrediction,
        ProfileResult,
        benchmark,
        predict_latency,
        profile_device,
    )
    from presso.compress import CompressResult, DecomposeConfig, PruneConfig, Target, compress  # noqa: F401
    from presso.convert import (  # noqa: F401
        ConvertConfig,
        ConvertResult,
        Int8Config,
        PackageResult,
        convert,
        package,
    )
    from presso.data import DataBundle, load_data  # noqa: F401
    from presso.errors import *  # noqa: F403
    from presso.models import InputSpec, ModelCard, load_model, load_model_dir, save_model_dir  # noqa: F401
    from presso.pipeline import RunConfig, RunResult, run  # noqa: F401
    from presso.progress import ProgressCallback, ProgressEvent  # noqa: F401
    from presso.results import Result  # noqa: F401
    from presso.search import search  # noqa: F401
    from presso.search.nas import SearchConfig, SearchResult  # noqa: F401
    from presso.train import EvalResult, TrainConfig, TrainResult, evaluate, train  # noqa: F401


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
