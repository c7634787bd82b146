"""ONNX export: the one path every verb uses to get an ONNX file from a model (benchmarks, latency targets, and the
launcher's quantization and packaging)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from presso.errors import UnsupportedLayerError
from presso.models.figures import set_mode


def export_onnx(model: nn.Module, example_inputs: tuple, path: str | Path, *, opset: int | None = None) -> Path:
    """Export ``model`` (eval mode) to ``path`` with torch.export-based ``torch.onnx.export`` and check the file.

    An operator the exporter cannot translate raises ``UnsupportedLayerError`` naming it, not a deep traceback.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    set_mode(model, False)
    try:
        # The exporter reports its progress on stdout; keep stdout for the CLI's --json object.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(example_inputs), str(path), dynamo=True, opset_version=opset,
                              external_data=False, verbose=False)  # fmt: skip
    except Exception as e:
        raise UnsupportedLayerError(
            f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    finally:
        set_mode(model, was_training)
    onnx.checker.check_model(str(path))
    return path
