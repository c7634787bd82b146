"""``presso.convert``: from a PyTorch model to a verified deployable file (ONNX, OpenVINO IR or LiteRT; FP32, FP16,
INT8).

Flow: export (torch.export-based ONNX, opset 18) -> ONNX checker -> simplify (ONNX Runtime's basic optimizer) ->
verify against PyTorch (the export fails above a tolerance) -> FP16 or INT8 (calibration + automatic precision) ->
OpenVINO IR if asked (or LiteRT, converted from the PyTorch model by litert-torch) -> accuracy of FP32 vs the result
on labelled data. The output directory holds the model file, ``presso.json`` (the model card, with the conversion
recorded) and ``convert.json`` (the full report); all of it is assembled in a temporary sibling and appears in one
rename (``presso.outdir``).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import presso.outdir as outdir
from presso.convert.accuracy import Scorer, task_kind
from presso.convert.quantize import Int8Config, Int8Result, drop_idle_activations, quantize_int8, to_fp16
from presso.cpu import has_vnni
from presso.errors import ConfigError, ConversionError, check_fields
from presso.models.card import ensure_card
from presso.models.onnx import (
    DEFAULT_OPSET,
    compare_outputs,
    export_onnx,
    optimize_onnx,
    session,
    strip_debug_info,
    torch_outputs,
)
from presso.models.qat import WEIGHT_LEVELS, is_qat, weight_levels
from presso.models.spec import InputSpec
from presso.progress import ProgressCallback, reporter
from presso.results import Result
from presso.tasks import model_task

if TYPE_CHECKING:
    from presso.data import DataBundle

FORMATS = ("onnx", "openvino", "litert")
PRECISIONS = ("fp32", "fp16", "int8")
# Largest output difference relative to the largest output value that a conversion may show against PyTorch.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
CONVERT_VERSION = 1


@dataclass
class ConvertConfig:
    """to: ``onnx`` | ``openvino`` | ``litert``; precision: ``fp32`` | ``fp16`` | ``int8``.

    tolerance: the largest relative output difference against PyTorch accepted (FP32/FP16; INT8 is judged by
        ``int8.snr_db`` instead). ``None``: 1e-3 for FP32, 3e-2 for FP16.
    keep_io_types: FP16 models keep FP32 inputs and outputs.
    eval_samples: labelled held-out images scored with FP32 and the converted model (0: skip).
    """

    to: str = "onnx"
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    tolerance: float | None = None
    keep_io_types: bool = True
    int8: Int8Config = field(default_factory=Int8Config)
    eval_samples: int = 1000
    int8_io: bool = False  # LiteRT INT8: int8 inputs and outputs too (microcontrollers, NPUs)
    version: int = CONVERT_VERSION

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ConfigError(f"Unknown format '{self.to}'; use one of {', '.join(FORMATS)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"Unknown precision '{self.precision}'; use one of {', '.join(PRECISIONS)}.")
        if isinstance(self.opset, int) and self.opset < 17:
            raise ConfigError(f"opset {self.opset} is too old; Presso exports opset 17 or newer.")
        check_fields(self, opset=(17, 30), tolerance=(0, 1, "(]"), eval_samples=(0, 10**7))
        if self.to == "litert" and self.dynamic_batch:
            raise ConfigError("LiteRT files have a fixed batch size: drop --dynamic-batch with --to litert.")
        if isinstance(self.int8, dict):
            self.int8 = Int8Config(**self.int8)
        if self.int8_io and (self.to != "litert" or self.precision != "int8"):
            raise ConfigError("--int8-io is for full-integer LiteRT files: give it with --to litert -p int8.")
        if self.to == "litert" and self.precision == "int8" and self.int8.max_accuracy_drop is not None:
            raise ConfigError("LiteRT INT8 is full-integer, with no layer to fall back: drop --max-accuracy-drop.")

    @property
    def max_rel_diff(self) -> float | None:
        if self.precision == "int8":
            return None
        return self.tolerance if self.tolerance is not None else TOLERANCE[self.precision]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConvertResult(Result):
    """The converted model file (``path``) in ``output_dir``, its size, its difference from PyTorch, the INT8
    report, FP32 vs converted accuracy, and the files written."""

    format: str
    precision: str
    path: Path
    output_dir: Path
    size_bytes: int
    size_bytes_fp32: int
    diff: dict[str, Any]
    int8: Int8Result | None
    accuracy: dict[str, Any] | None
    seconds: float
    config: ConvertConfig
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "precision": self.precision,
            "path": str(self.path),
            "output_dir": str(self.output_dir),
            "files": self.files,
            "size_bytes": self.size_bytes,
            "size_bytes_fp32": self.size_bytes_fp32,
            **self.diff,
            "accuracy": self.accuracy,
            "seconds": round(self.seconds, 2),
            "config": self.config.to_json(),
        }
        if self.int8 is not None:
            out["fallback_layers"] = self.int8.fallback_layers
            out["int8"] = self.int8.to_json()
        return out


def _file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]))


def _ort_runner(path: Path) -> Callable[[tuple], list[np.ndarray]]:
    from presso.models.onnx import run_onnx

    sess = session(path)
    return lambda inputs: run_onnx(sess, inputs)


def _ov_runner(path: Path) -> Callable[[tuple], list[np.ndarray]]:
    from presso.convert.openvino import OpenVINORunner

    return OpenVINORunner(path).run


def _batches_of(x: torch.Tensor, batch: int | None) -> list[tuple[torch.Tensor]]:
    step = batch or 32
    return [(x[i : i + step],) for i in range(0, len(x), step)]


def convert(
    model: nn.Module,
    example_inputs: str | InputSpec | tuple,
    config: ConvertConfig | None = None,
    *,
    output_dir: str | Path,
    calib: str | Path | DataBundle | None = None,
    eval_data: str | Path | DataBundle | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert ``model`` into ``output_dir`` and verify it.

    ``output_dir`` appears complete (model, card, report) in one rename, or not at all; a non-empty one (an earlier
    conversion too) is refused unless ``overwrite``, and the folder the model was loaded from always is.

    example_inputs: an input spec (``"1,3,224,224"``) or example tensors; the export's batch size is theirs
        unless ``config.dynamic_batch``.
    calib: any data spec (``presso.load_data``) or a ``DataBundle``, for INT8 ranges; its held-out split, when
        labelled, also gives FP32 vs converted accuracy (or ``eval_data`` names another labelled set).
    progress: called with a ``ProgressEvent`` per step of each stage (exporting, verifying, calibrating, ...).
    """
    from presso.data import DataBundle, calibration_batches, load_data, warn_if_labels_differ
    from presso.data.images import Preprocess
    from presso.models.card import check_input_spec

    cfg = config or ConvertConfig()
    t0 = time.perf_counter()
    report = _Stages(progress)
    spec = InputSpec.parse(example_inputs) if isinstance(example_inputs, (str, InputSpec)) else None
    inputs = spec.example_inputs() if spec is not None else tuple(example_inputs)
    spec = spec or InputSpec.from_tensors(inputs)
    qat = is_qat(model)
    if qat and (cfg.precision != "int8" or cfg.to != "onnx" or cfg.int8.max_accuracy_drop is not None):
        raise ConfigError(
            "This model was trained with --qat: its ONNX export is its INT8 model, with the scales it learned. "
            "Convert it with --to onnx --precision int8 (no --max-accuracy-drop: nothing is left to fall back); "
            "for FP32, FP16, OpenVINO or LiteRT convert the model it was fine-tuned from."
        )
    if qat and weight_levels(model) == WEIGHT_LEVELS[0] and has_vnni() is False:
        # not refused: the file may be meant for another CPU; the accuracy check below shows what it costs here
        warnings.warn(
            "This QAT model learned full-range INT8 weights, and this x86 CPU has no VNNI: ONNX Runtime's kernels "
            "here can saturate on them (accuracy lost). For such CPUs, fine-tune again with --qat-reduce-range on.",
            stacklevel=2,
        )
    if cfg.precision == "int8" and not calib and not qat:
        raise ConfigError(
            "INT8 needs calibration data: give --calib DATA (a dataset like the deployment inputs; 'random' only "
            "checks that quantization runs, it does not keep accuracy)."
        )
    if cfg.precision == "int8" and cfg.int8.max_accuracy_drop is not None and not cfg.eval_samples:
        raise ConfigError("--max-accuracy-drop is measured on labelled held-out images: --eval-samples must be > 0.")
    output = Path(output_dir)
    card = ensure_card(model)
    check_input_spec(card, spec)  # the card's preprocessing and the exported file must take the same images
    sources = [card.source.get("code_from")]
    outdir.check(output, overwrite=overwrite, sources=sources)  # before the work, not after it
    pp = Preprocess.from_json(card.preprocess) if card.preprocess else None
    batch = None if cfg.dynamic_batch else int(inputs[0].shape[0])
    image = spec.tensors[0].shape if len(spec.tensors[0].shape) == 4 else None
    bundle = None  # the data meets the model: resized and channel-converted to its input, never the reverse
    if calib and (isinstance(calib, DataBundle) or str(calib) != "random"):
        bundle = calib if isinstance(calib, DataBundle) else load_data(calib)
        warn_if_labels_differ(model, bundle)
        if cfg.eval_samples and bundle.labeled:  # scored later: a detector's data must hold boxes, before the work
            task_kind(model, bundle)
        bounded = cfg.precision == "int8" and cfg.int8.max_accuracy_drop is not None
        if bounded and not bundle.labeled and eval_data is None:
            raise ConfigError(
                f"--max-accuracy-drop is measured on labelled images, but '{bundle.name}' has no labels: give "
                "--eval-data with labels (the calibration data may stay unlabelled), or bound the SNR (--snr-db)."
            )
        if pp is None and image is not None:  # recorded in the card, so prediction normalises as calibration did
            pp = model_task(model).preprocess(bundle, model, (image[2], image[3]), channels=image[1], stats_sample=256)

    # reference inputs: the example (random) inputs plus real images when calibration data is given
    calibration: list[np.ndarray] = []
    held_out: list[np.ndarray] = []  # INT8's error check: images the calibration did not see
    check_inputs: list[tuple] = [inputs]
    if calib:
        report("reading calibration data", 0, 1)
        ptq = cfg.precision == "int8" and not qat  # a QAT model needs no calibration: its ranges were learned
        need = cfg.int8.samples + cfg.int8.check_samples if ptq else 16
        x = torch.cat(calibration_batches(bundle or calib, spec, batches=1, batch_size=need, preprocess=pp))
        calibration = [x[: len(x) - cfg.int8.check_samples].numpy()] if ptq else []
        held = x[len(x) - cfg.int8.check_samples :] if ptq else x
        held_out = [held.numpy()]
        check_inputs += _batches_of(held, batch)[:4]  # verification against PyTorch: a few batches suffice

    with outdir.writing(output, overwrite=overwrite, sources=sources) as tmp:
        result = _convert(model, inputs, cfg, card, spec, pp, batch, check_inputs, calibration, held_out,
                          labelled=eval_data or bundle or calib, tmp=tmp, output=output, report=report,
                          t0=t0)  # fmt: skip
    report.close()
    return result


def _convert(model, inputs, cfg, card, spec, pp, batch, check_inputs, calibration, held_out, *, labelled, tmp: Path,
             output: Path, report, t0: float) -> ConvertResult:  # fmt: skip
    """Everything a conversion writes, into ``tmp`` (renamed to ``output`` by the caller once this returns)."""
    from presso.data import DataBundle, load_data

    work = tmp / ".scratch"  # the intermediate ONNX files; removed before the rename
    work.mkdir()
    # PyTorch first: a model that caches tensors on its first call (a YOLO head's anchors) would otherwise cache the
    # export trace's fake tensors in itself; ones cached before the export are restored after it
    reference = [torch_outputs(model, i) for i in check_inputs]
    report("exporting to ONNX", 0, 1)
    raw = export_onnx(model, inputs, work / "raw.onnx", opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
    fp32 = optimize_onnx(raw, work / "model.fp32.onnx")
    fp32_diff = compare_outputs(reference, [_ort_runner(fp32)(i) for i in check_inputs])
    qat = is_qat(model)  # the export is already the INT8 (QDQ) model: checked against PyTorch's fake quantization
    if qat:
        pass  # checked below, at INT8's tolerance, as the converted file
    elif fp32_diff.max_rel_diff > TOLERANCE["fp32"] if cfg.tolerance is None else cfg.tolerance:
        raise ConversionError(
            f"The exported ONNX model differs from PyTorch by {fp32_diff.max_abs_diff:.3g} "
            f"({fp32_diff.max_rel_diff:.2%} of the output scale, tolerance "
            f"{TOLERANCE['fp32'] if cfg.tolerance is None else cfg.tolerance:.2%}); a layer exports wrongly -- "
            "rerun with --debug, or raise --tolerance if the difference is acceptable."
        )

    # the labelled held-out data FP32 and the converted file are scored on (and, with an INT8 accuracy bound, every
    # INT8 candidate on the way)
    scorer = None
    named_random = not isinstance(labelled, DataBundle) and str(labelled) == "random"
    if cfg.eval_samples and labelled and not named_random:
        bundle = labelled if isinstance(labelled, DataBundle) else load_data(labelled)
        if bundle.labeled:
            shape = spec.tensors[0].shape  # at the model's input size, whatever the data's own
            size = (shape[2], shape[3]) if len(shape) == 4 else None
            eval_pp = pp or model_task(model).preprocess(bundle, model, size)
            scorer = Scorer(task_kind(model, bundle), bundle, eval_pp, cfg.eval_samples, batch)

    int8 = None
    onnx_out = tmp / "model.onnx"
    if cfg.to == "litert":
        pass  # LiteRT converts the PyTorch model and quantizes its own graph (below), from the same calibration
    elif qat:  # a QAT model's export is its INT8 model; activations its layers already applied are dropped
        drop_idle_activations(fp32, onnx_out)
    elif cfg.precision == "fp32":
        shutil.copyfile(fp32, onnx_out)
    elif cfg.precision == "fp16":
        report("converting to FP16", 0, 1)
        to_fp16(fp32, onnx_out, keep_io_types=cfg.keep_io_types)
    else:
        score = (lambda path: scorer.score(_ort_runner(path))) if scorer is not None else None
        int8 = quantize_int8(fp32, onnx_out, calibration, held_out, cfg.int8, progress=report, accuracy=score,
                             metric=scorer.headline if scorer is not None else "accuracy")  # fmt: skip
    # the exporter's stack traces and scopes leave the files delivered (and the FP32 one sized beside them): only the
    # quantizer's per-layer report reads them, and it is done
    for path in (fp32, onnx_out):
        if path.exists():
            strip_debug_info(path)

    files: list[str] = []
    if cfg.to == "onnx":
        final = onnx_out
        runner = _ort_runner(final)
    elif cfg.to == "litert":
        from presso.convert.litert import LiteRTRunner, to_litert

        report(f"converting to LiteRT ({cfg.precision.upper()})", 0, 1)
        final = to_litert(model, inputs, tmp / "model.tflite", precision=cfg.precision, calibration=calibration,
                          int8_io=cfg.int8_io)  # fmt: skip
        runner = LiteRTRunner(final).run
    else:
        from presso.convert.openvino import to_openvino

        report("converting to OpenVINO IR", 0, 1)
        source = fp32 if cfg.precision == "fp16" else onnx_out  # FP16 IR: compressed weights of the FP32 graph
        final = to_openvino(source, tmp, fp16_weights=cfg.precision == "fp16")
        files.append("model.onnx")  # the runtime-neutral file travels along
        runner = _ov_runner(final)
    files = [final.name, *([final.with_suffix(".bin").name] if final.suffix == ".xml" else []), *files]

    report("verifying", 0, 1)
    # INT8 is compared on real images only when there are some: random inputs lie outside the calibrated ranges
    compared = range(1, len(check_inputs)) if cfg.precision == "int8" and len(check_inputs) > 1 else None
    if qat:  # the same fake quantization on both sides: random inputs are as fair a check as images
        compared = None
    compared = list(compared) if compared is not None else list(range(len(check_inputs)))
    diff = compare_outputs([reference[i] for i in compared], [runner(check_inputs[i]) for i in compared])
    limit = cfg.max_rel_diff
    if limit is not None and diff.max_rel_diff > limit:
        raise ConversionError(
            f"The {cfg.precision.upper()} {cfg.to} model differs from PyTorch by {diff.max_rel_diff:.2%} of the "
            f"output scale (tolerance {limit:.2%}); use a higher precision or raise --tolerance."
        )

    accuracy = None
    if scorer is not None:  # top-1 for a classifier, COCO mAP for a detector
        report("scoring FP32 and converted models", 0, 1)
        if qat:  # what PyTorch measured in the fine-tune against what ONNX Runtime runs
            accuracy = {k.replace("fp32", "pytorch_qat"): v
                        for k, v in scorer.compare(lambda x: torch_outputs(model, x), runner).items()}  # fmt: skip
        else:
            accuracy = scorer.compare(_ort_runner(fp32), runner)

    result = ConvertResult(
        format=cfg.to,
        precision=cfg.precision,
        path=output / final.name,
        output_dir=output,
        size_bytes=_file_size(final),
        size_bytes_fp32=fp32.stat().st_size,
        diff={
            "max_abs_diff": diff.max_abs_diff,
            "max_rel_diff": diff.max_rel_diff,
            "verified_batches": diff.samples,
            "fp32_max_abs_diff": fp32_diff.max_abs_diff,
        },  # fmt: skip
        int8=int8,
        accuracy=accuracy,
        seconds=time.perf_counter() - t0,
        config=cfg,
        files=files,
    )
    shutil.rmtree(work)
    _write_card(tmp, card, spec, result, pp)
    return result


class _Stages:
    """The conversion's stages as progress events: each stage reports where it starts (``report(stage, i, n)``,
    as the quantizer does too), and is reported done when the next one starts, or at the end."""

    def __init__(self, progress: ProgressCallback | None):
        self.progress = progress
        self.current: tuple[str, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.current is not None and self.current[0] != stage:
            self.close()
        self.current = (stage, max(total, 1))
        reporter(self.progress, stage)(done, max(total, 1))

    def close(self) -> None:
        if self.current is not None:
            stage, total = self.current
            reporter(self.progress, stage)(total, total)
            self.current = None


def _write_card(output: Path, card, spec: InputSpec, result: ConvertResult, pp=None) -> None:
    summary = result.summary()
    data = card.to_json()
    data["input_spec"] = data.get("input_spec") or str(spec)
    if not data.get("preprocess") and pp is not None:  # chosen for calibration: the file's input, and its pixels
        data["preprocess"], data["input_spec"] = pp.to_json(), str(spec)
    data["conversion"] = {k: v for k, v in summary.items() if k not in ("int8",)}
    data["history"] = [*data.get("history", []), {"verb": "convert", **data["conversion"]}]
    (output / "presso.json").write_text(json.dumps(data, indent=2, default=str))
    (output / "convert.json").write_text(json.dumps(summary, indent=2, default=str))
    result.files += ["presso.json", "convert.json"]
