"""ONNX export: the one path every verb uses to get an ONNX file from a model (benchmarks, latency targets, and the
launcher's quantization and packaging).

``export_onnx`` gives a checked file; ``optimize_onnx`` simplifies it with ONNX Runtime's provider-independent
("basic") optimizer -- constant folding, BatchNorm folded into convolutions, redundant nodes removed -- which keeps
a standard ONNX file any runtime can load; ``compare_outputs`` verifies it against PyTorch.

It sits on the ground floor (``models/``), not in the launcher, because the benchmarker, the compressor's latency
targets and the searcher all export through it, and they stand below the launcher (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from presso.errors import ConversionError, UnsupportedLayerError
from presso.models.figures import set_mode

DEFAULT_OPSET = 18  # the newest opset the torch.export-based exporter emits natively


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
) -> Path:
    """Export ``model`` (eval mode) to ``path`` with torch.export-based ``torch.onnx.export`` and check the file.

    dynamic_batch: the first dimension of every input (and output) is symbolic (``batch``). torch.export
        specialises a size of 1, so the trace then runs on the example inputs repeated to batch 2.
    An operator the exporter cannot translate raises ``UnsupportedLayerError`` naming it, not a deep traceback.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(example_inputs)
    kwargs = {}
    if dynamic_batch:
        inputs = tuple(t.repeat(2, *([1] * (t.dim() - 1))) if t.shape[0] == 1 else t for t in inputs)
        batch = torch.export.Dim("batch", min=1, max=65536)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
    was_training = model.training
    set_mode(model, False)
    cached = _attributes(model)
    try:
        # The exporter reports its progress on stdout; keep stdout for the CLI's --json object.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(path), dynamo=True, opset_version=opset or DEFAULT_OPSET,
                              external_data=False, verbose=False, **kwargs)  # fmt: skip
    except Exception as e:
        hint = " (a layer's output size depends on the batch? export with a static batch)" if dynamic_batch else ""
        raise UnsupportedLayerError(
            f"ONNX export of {type(model).__name__} failed{hint}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}"
        ) from None
    finally:
        _restore_attributes(model, cached)
        set_mode(model, was_training)
    onnx.checker.check_model(str(path))
    return path


def _attributes(model: nn.Module) -> dict[nn.Module, dict[str, Any]]:
    """Every module's plain attributes: caches a forward may fill (a YOLO head's anchors, strides and input shape).
    The export's trace stores fake tensors and symbolic shapes there, which the next eager call would trip on."""
    return {m: dict(vars(m)) for m in model.modules()}


def _restore_attributes(model: nn.Module, before: dict[nn.Module, dict[str, Any]]) -> None:
    for m in model.modules():
        old = before.get(m)
        if old is None:
            continue
        for k in [k for k in vars(m) if k not in old]:
            delattr(m, k)  # set by the trace: the class's own default shows through again
        for k, v in old.items():
            if k != "training" and vars(m).get(k) is not v:
                object.__setattr__(m, k, v)


def optimize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Simplify ``src`` into ``dst`` with ONNX Runtime's basic (provider-independent) graph optimizations.

    Basic level only: the extended/layout levels write ORT-specific fused operators that other runtimes (OpenVINO,
    TensorRT) cannot read.
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    return Path(dst)


def strip_debug_info(path: str | Path) -> Path:
    """Remove, in place, what the exporter records on each node for debugging: the PyTorch stack trace (absolute
    paths and source lines of the machine that exported it), the FX node, module scopes and rewrite rules.

    A file that is shipped should not carry them: they tell anyone who opens it where the exporting user's code lives
    and what it says, and on a small network they outweigh the weights (a 0.35 M-parameter detector: 0.5 MB of node
    metadata beside 1.3 MB of FP32 weights). Presso reads the scopes only while quantizing (its per-layer report), so
    the launcher strips the files it delivers once quantization is done. Computation is untouched."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))

    def clean(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:  # control flow: If/Loop/Scan bodies
                if attr.g.node:
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)

    clean(model.graph)
    for fn in model.functions:
        del fn.metadata_props[:]
        clean(fn)
    onnx.save(model, str(path))
    return path


@dataclass
class OutputDiff:
    """How far an exported model's outputs are from the reference: the largest absolute difference, and that
    difference relative to the largest reference value (so it reads the same for logits of any scale)."""

    max_abs_diff: float
    max_rel_diff: float
    samples: int

    def to_json(self) -> dict[str, float | int]:
        return {"max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "samples": self.samples}


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, inputs: tuple) -> list[np.ndarray]:
    """Outputs of an ONNX Runtime session for torch or numpy inputs, fed in graph-input order."""
    names = [i.name for i in sess.get_inputs()]
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in inputs]
    feed = dict(zip(names, arrays, strict=True))
    return sess.run(None, feed)


def torch_outputs(model: nn.Module, inputs: tuple) -> list[np.ndarray]:
    from presso.models.outputs import leaves

    set_mode(model, False)
    with torch.no_grad():
        out = model(*inputs)
    return [t.detach().float().cpu().numpy() for t in leaves(out)]


def compare_outputs(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> OutputDiff:
    """Compare the outputs of several input batches, output by output."""
    max_abs, scale = 0.0, 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        if len(ref) != len(cand):
            raise ConversionError(f"The exported model has {len(cand)} outputs, PyTorch {len(ref)}.")
        for r, c in zip(ref, cand, strict=True):
            if r.shape != c.shape:
                raise ConversionError(f"An exported output has shape {c.shape}, PyTorch gives {r.shape}.")
            max_abs = max(max_abs, float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64)), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(r), initial=0.0)))
    return OutputDiff(max_abs_diff=max_abs, max_rel_diff=max_abs / max(scale, 1e-12), samples=len(reference))
