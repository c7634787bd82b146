"""INT8 and FP16 for ONNX models, with ONNX Runtime's quantization tools.

INT8 is static QDQ quantization (``onnxruntime.quantization.quantize_static``): pre-processing first (shape inference,
graph optimization), per-channel int8 weights, uint8 activations, ranges from calibration data (minmax, entropy or
percentile). What Presso adds is **automatic precision**: the whole model's output is compared with FP32 on held-out
calibration samples (signal-to-quantization-noise ratio, dB); when it falls below the threshold, each compute layer's
sensitivity is measured (the output SNR with only that layer quantized) and the most sensitive layers fall back to
FP32 one after another until the threshold is met. Calibration runs once; every re-quantization reuses its ranges.

Before any layer falls back, cheaper fixes are tried in order of cost (``Int8Config.equalize`` / ``bias_correction``,
``presso.convert.equalize``): cross-layer equalization of the FP32 graph (one more calibration), then bias
correction on top of it (one more pass over the calibration images); the first that meets the criterion is kept,
else the fallback starts from the best of them.

Over 500 lines because one ``_Quantizer`` (calibration, bias correction, sensitivity, per-layer error) serves the
criterion loop, and ``to_fp16``, ``snr_db`` and ``feeds_for`` are imported from here by the launcher and benchmarks;
moving ``_Quantizer`` to its own module is the split when this grows again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presso.convert.equalize import method_name, plan
from presso.cpu import has_vnni
from presso.errors import ConfigError, ConversionError, check_fields
from presso.progress import quiet_logger

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MODES = ("auto", "on", "off")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# what can fall back to FP32: the compute layers, and Concat -- it joins tensors whose ranges can differ by orders of
# magnitude (a YOLO head's box distributions and class logits), and one per-tensor uint8 scale over them rounds the
# smaller ones away: measured on a YOLOv8n-like detector, 1.5 dB output SNR with its Concats quantized, 20.8 without
FALLBACK_OPS = (*COMPUTE_OPS, "Concat")
CLIP_PERCENTILE = 99.99  # the clipped activation ranges tried when min-max ranges miss the criterion


def snr_db(reference: Iterable[Sequence[np.ndarray]], candidate: Iterable[Sequence[np.ndarray]]) -> float:
    """Signal-to-noise ratio of ``candidate`` against ``reference`` in dB: per batch, the model's outputs.

    Balanced over output channels (axis 1 of each output; the whole output when it has fewer axes): each channel's
    noise is measured against its own signal, and the ratio averaged, ``10 log10(K / sum_k noise_k / signal_k)``.
    A single SNR over everything is ruled by the largest values: a detector's box coordinates (tens of pixels) hid
    class scores (0..1) that INT8 had broken -- 21.6 dB overall with 7.5 mAP points lost, 10.6 dB on the scores
    alone (docs/benchmarks.md). For a classifier's logits, whose classes share one scale, both agree."""
    signal: dict[tuple[int, int], float] = {}
    noise: dict[tuple[int, int], float] = {}
    for r_batch, c_batch in zip(reference, candidate, strict=True):
        for k, (r, c) in enumerate(zip(r_batch, c_batch, strict=True)):
            r64 = np.asarray(r, dtype=np.float64)
            d = r64 - np.asarray(c, dtype=np.float64)
            axes = tuple(i for i in range(r64.ndim) if i != 1) if r64.ndim >= 2 else None
            s = np.atleast_1d(np.sum(r64 * r64, axis=axes))
            n = np.atleast_1d(np.sum(d * d, axis=axes))
            for ch in range(len(s)):
                signal[k, ch] = signal.get((k, ch), 0.0) + float(s[ch])
                noise[k, ch] = noise.get((k, ch), 0.0) + float(n[ch])
    if not any(noise.values()):
        return math.inf
    floor = 1e-12 * max(max(signal.values()), 1e-30)  # a channel that is all zero in FP32: against the largest
    ratio = sum(noise[key] / max(signal[key], floor) for key in signal)
    return 10.0 * math.log10(len(signal) / ratio)


@dataclass
class Int8Config:
    """How to quantize to INT8.

    method: calibration -- ``minmax`` (ranges seen), ``entropy`` (KL-optimal clipping), ``percentile``.
    samples: calibration samples (the held-out ones for the error check come on top: ``check_samples``).
    snr_db: the whole model's output SNR against FP32 that automatic precision must reach (``None``: no fallback).
    max_accuracy_drop: instead of the SNR, the task's own metric on labelled held-out data (top-1, mAP50-95) may
        drop at most this share (0.005: half a point) from the FP32 file's; layers fall back to FP32 (ONNX Runtime's
        CPU kernels have no FP16 convolutions to fall back to) in order of sensitivity until it holds.
    max_fallback: the largest share of compute layers allowed to fall back to FP32.
    reduce_range: 7-bit weights, which avoids int16 saturation on x86 CPUs without VNNI (``None``: decide from
        this machine's CPU, as ONNX Runtime recommends).
    equalize: cross-layer equalization of Conv pairs before calibration -- ``on`` always, ``off`` never, ``auto``
        when plain INT8 misses the criterion, before any layer falls back.
    bias_correction: the FP32 bias of each quantized Conv/Gemm corrected by the mean error its INT8 weights add
        (``on`` / ``off`` / ``auto``: tried after equalization when that still misses the criterion).
    """

    method: str = "minmax"
    samples: int = 128
    check_samples: int = 32
    snr_db: float | None = 20.0
    max_accuracy_drop: float | None = None
    max_fallback: float = 0.5
    per_channel: bool = True
    reduce_range: bool | None = None
    percentile: float = 99.999
    equalize: str = "auto"
    bias_correction: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"Calibration method '{self.method}' is not one of {', '.join(CALIBRATION_METHODS)}.")
        for name in ("equalize", "bias_correction"):
            if getattr(self, name) not in MODES:
                raise ConfigError(f"{name} is auto, on or off, not '{getattr(self, name)}'.")
        check_fields(self, samples=(1, None), check_samples=(1, None), snr_db=(-1000, 1000), max_fallback=(0, 1),
                     percentile=(0, 100, "(]"), max_accuracy_drop=(0, 1))  # fmt: skip
        if not 0.0 <= self.max_fallback <= 1.0:
            raise ConfigError(f"max_fallback must be a share in [0, 1], not {self.max_fallback}.")


@dataclass
class LayerReport:
    node: str  # ONNX node name
    layer: str  # the PyTorch module it came from, when the exporter recorded it
    op: str
    snr_db: float | None = None  # output SNR of the whole model with only this layer quantized (when measured)
    activation_snr_db: float | None = None  # this layer's output in the INT8 model vs FP32 (accumulated error)
    fallback: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) and math.isfinite(v) else v) for k, v in vars(self).items()}


@dataclass
class Int8Result:
    path: Path
    output_snr_db: float
    output_snr_db_all_int8: float
    threshold_db: float | None
    met: bool
    layers: list[LayerReport] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    # accuracy-aware precision (``max_accuracy_drop``): the FP32 file's metric, the delivered file's, and every
    # file tried on the way ({"fallback": layers kept in FP32, "value": its metric or SNR, "met": within bound,
    # "method": "ptq" | "cle" | "bc" | "cle+bc", the fixes applied before quantizing})
    criterion: str = "snr_db"
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    max_accuracy_drop: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fallback_layers(self) -> list[str]:
        return [r.layer or r.node for r in self.layers if r.fallback]

    def to_json(self) -> dict[str, Any]:
        return {
            "output_snr_db": _round(self.output_snr_db),
            "output_snr_db_all_int8": _round(self.output_snr_db_all_int8),
            "snr_threshold_db": self.threshold_db,
            "threshold_met": self.met,
            "fallback_layers": self.fallback_layers,
            "layers": [r.to_json() for r in self.layers],
            "settings": self.settings,
            "criterion": self.criterion,
            "accuracy_fp32": self.accuracy_fp32,
            "accuracy_int8": self.accuracy_int8,
            "max_accuracy_drop": self.max_accuracy_drop,
            "steps": self.steps,
        }


def _round(v: float) -> float | str:
    return round(v, 2) if math.isfinite(v) else "inf"


class _Reader:
    """A rewindable ``CalibrationDataReader`` over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0

    def __iter__(self):
        return iter(self.feeds)


def _layer_name(node) -> str:
    """The PyTorch module ``node`` came from: its weight's parameter name (which the exporter keeps even when it
    folds a BatchNorm into the convolution), else the deepest name scope the exporter recorded."""
    if len(node.input) > 1 and node.input[1].endswith(".weight"):
        return node.input[1][: -len(".weight")]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast

                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 2 else (scopes[0] if scopes else "")
    return ""


def feeds_for(path: Path, batches: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Input feeds for ``path`` from image batches: split to the model's static batch size when it has one."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConversionError(f"Calibration feeds image batches to a model with one input; this one has {len(inputs)}.")
    dim0 = inputs[0].type.tensor_type.shape.dim[0]
    static = dim0.dim_value if dim0.HasField("dim_value") else 0
    x = np.concatenate([np.asarray(b, dtype=np.float32) for b in batches])
    step = static or 16
    return [{inputs[0].name: x[i : i + step]} for i in range(0, len(x) - (len(x) % step if static else 0), step)]


class _Quantizer:
    """One calibration, many quantizations (different fallback sets) of one pre-processed FP32 model.

    tag: names this quantizer's files in ``work`` (one per FP32 graph: plain, equalized). reference: the FP32
    outputs on ``check`` when already known (an equalized graph computes the same function)."""

    def __init__(self, fp32: Path, calib: list[dict], check: list[dict], cfg: Int8Config, work: Path, *,
                 tag: str = "", reference: list[list[np.ndarray]] | None = None):  # fmt: skip
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantType

        self.fp32, self.cfg, self.work = fp32, cfg, work
        self.calib, self.check = calib, check

        self.reduce_range = cfg.reduce_range if cfg.reduce_range is not None else (has_vnni() is False)
        self.method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.method]
        self.kwargs = dict(
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=cfg.per_channel,
            reduce_range=self.reduce_range,
            calibrate_method=self.method,
            extra_options={"CalibPercentile": cfg.percentile} if cfg.method == "percentile" else {},
        )
        self.tag = tag
        self.cache = work / f"calibration{tag}.cache"
        self.deltas: dict[str, np.ndarray] | None = None  # bias correction per node, once enabled
        self.plain: Path | None = None  # the all-INT8 file without bias correction
        graph = onnx.load(str(fp32), load_external_data=False).graph
        self.tail = _tail(graph)
        tail = set(self.tail)
        self.nodes = [n for n in graph.node if n.op_type in FALLBACK_OPS and n.name not in tail]
        self.layer_of = {n.name: _layer_name(n) for n in self.nodes}
        consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        self.activation_after = {
            t: c[0].output[0]
            for t, c in consumers.items()
            if len(c) == 1 and c[0].op_type in ("Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid")
        }
        self.reference = reference if reference is not None else self._run(fp32, check)
        self.count = 0

    def _run(self, path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
        from presso.models.onnx import session

        sess = session(path)
        return [sess.run(None, feed) for feed in feeds]

    def quantize(self, exclude: list[str] = (), only: list[str] | None = None) -> Path:
        from onnxruntime.quantization import QuantFormat, quantize_static

        self.count += 1
        out = self.work / f"int8{self.tag}_{self.count}.onnx"
        source = self.fp32
        if self.deltas is not None:  # the corrected biases of the layers this file quantizes, the others as they were
            from presso.convert.equalize import apply_bias

            chosen = {k: v for k, v in self.deltas.items() if k not in exclude and (not only or k in only)}
            source = apply_bias(self.fp32, self.work / f"fp32{self.tag}_bc_{self.count}.onnx", chosen)
        # ONNX Runtime's quantizer logs advice at WARNING on the root logger, and its histogram calibrators print
        # their settings to stdout (where the CLI's --json goes)
        with quiet_logger(), contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(source),
                str(out),
                _Reader(self.calib),
                quant_format=QuantFormat.QDQ,
                nodes_to_exclude=[*exclude, *self.tail],
                nodes_to_quantize=list(only) if only else None,
                calibration_cache_path=str(self.cache),
                **self.kwargs,
            )
        if self.deltas is None and not exclude and not only and self.plain is None:
            self.plain = out
        return out

    def correct_biases(self) -> None:
        """Bias correction from now on: the weight error of the all-INT8 file against the calibration means."""
        from presso.convert.equalize import bias_corrections

        plain = self.plain or self.quantize()
        self.deltas = bias_corrections(self.fp32, plain, self.calib)

    def output_snr(self, path: Path) -> float:
        return snr_db(self.reference, self._run(path, self.check))

    def activation_snr(self, qdq: Path) -> dict[str, float]:
        """Each compute layer's output in the INT8 model against FP32 (ONNX Runtime's QDQ debugging tools)."""
        from onnxruntime.quantization.qdq_loss_debug import (
            collect_activations,
            compute_activation_error,
            create_activation_matching,
            modify_model_output_intermediate_tensors,
        )

        aug_f, aug_q = self.work / "aug_fp32.onnx", self.work / "aug_int8.onnx"
        feeds = self.check[: max(1, min(len(self.check), 4))]
        with quiet_logger():
            modify_model_output_intermediate_tensors(str(self.fp32), str(aug_f))
            modify_model_output_intermediate_tensors(str(qdq), str(aug_q))
            float_acts = collect_activations(str(aug_f), _Reader(feeds))
            qdq_acts = collect_activations(str(aug_q), _Reader(feeds))
        errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
        out = {}
        for n in self.nodes:
            tensor = n.output[0]
            # an activation after the layer (Relu, Clip) is folded into the quantized output: read its output then
            while tensor not in errors and tensor in self.activation_after:
                tensor = self.activation_after[tensor]
            if "xmodel_err" in errors.get(tensor, {}):
                out[n.name] = float(errors[tensor]["xmodel_err"])
        return out


def _tail(graph) -> list[str]:
    """The nodes after the last compute layer on every path to the outputs (a detector's box decoding, the sigmoid of
    its class scores, their concatenation): they stay FP32. One INT8 scale for a tensor holding pixel coordinates
    and probabilities rounds the probabilities away, and these cheap nodes gain nothing from INT8."""
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            consumers.setdefault(i, []).append(k)
    feeds_compute = [False] * len(nodes)
    for k in reversed(range(len(nodes))):  # ONNX graphs are topologically sorted: consumers come later
        n = nodes[k]
        after = [c for o in n.output for c in consumers.get(o, [])]
        feeds_compute[k] = n.op_type in COMPUTE_OPS or any(feeds_compute[c] for c in after)
    return [n.name for n, f in zip(nodes, feeds_compute, strict=True) if not f and n.name]


def quantize_int8(
    fp32: str | Path,
    out: str | Path,
    calibration: list[np.ndarray],
    check: list[np.ndarray],
    cfg: Int8Config | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    accuracy: Callable[[Path], float] | None = None,
    metric: str = "accuracy",
) -> Int8Result:
    """Quantize the FP32 ONNX model ``fp32`` to ``out`` (QDQ), falling back sensitive layers to FP32 as needed.

    calibration / check: image batches (already normalised) for the ranges and for the error check; keep them
    disjoint so the check is honest. What "as needed" means: the output SNR on ``check`` reaches ``cfg.snr_db``; or,
    with ``cfg.max_accuracy_drop``, ``accuracy(file)`` -- the task's metric (``metric``: its name) of an ONNX file on
    labelled held-out data -- is within that drop of the FP32 file's. Either way the layers are tried in order of
    sensitivity (the output SNR with only that layer quantized): a growing set until the criterion holds, then the
    least sensitive of the last step put back one by one while it still holds.
    """
    from onnxruntime.quantization import quant_pre_process

    cfg = cfg or Int8Config()
    by_accuracy = cfg.max_accuracy_drop is not None
    if by_accuracy and accuracy is None:
        raise ConfigError(
            "An accuracy bound for INT8 (--max-accuracy-drop) needs labelled data to measure it on: give --calib "
            "(or --eval-data) with labels and --eval-samples above 0, or bound the output SNR instead (--snr-db)."
        )
    out = Path(out)
    report = progress or (lambda _stage, _i, _n: None)
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="presso-int8-") as tmp:
        work = Path(tmp)
        pre = work / "fp32_pre.onnx"
        with quiet_logger():
            try:
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
            except Exception:  # symbolic shape inference fails on some graphs; ONNX's own inference suffices then
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        calib_feeds, check_feeds = feeds_for(pre, calibration), feeds_for(pre, check)
        if not calib_feeds or not check_feeds:
            raise ConversionError("INT8 needs calibration samples: give --calib DATA (at least one batch).")
        report("calibrating", 0, 1)
        quantizers: dict[bool, _Quantizer] = {}
        equalization: dict[str, Any] | None = None

        def quantizer(equalized: bool) -> _Quantizer:
            nonlocal equalization
            if equalized not in quantizers:
                source, known = pre, next(iter(quantizers.values())).reference if quantizers else None
                if equalized:
                    from presso.convert.equalize import equalize

                    report("cross-layer equalization", 0, 1)
                    source = work / "fp32_cle.onnx"
                    equalization = equalize(pre, source).to_json()
                tag = ("_cle" if equalized else "") + ("_clip" if ranges is not cfg else "")
                quantizers[equalized] = _Quantizer(source, calib_feeds, check_feeds, ranges, work, tag=tag,
                                                   reference=known)  # fmt: skip
            return quantizers[equalized]

        ranges = cfg  # the calibration the quantizers use: the configured one, or clipped ranges when those win

        reference = None
        if by_accuracy:
            report(f"scoring FP32 ({metric})", 0, 1)
            reference = accuracy(pre)
        method = "ptq"

        def judge(path: Path, fallback: list[str], snr: float | None = None) -> tuple[bool, float]:
            if by_accuracy:
                value = accuracy(path)
                ok = reference - value <= cfg.max_accuracy_drop + 1e-9
            else:
                value = q.output_snr(path) if snr is None else snr
                ok = cfg.snr_db is None or value >= cfg.snr_db
            steps.append({"fallback": len(fallback), "value": round(value, 5) if math.isfinite(value) else "inf",
                          "met": ok, "method": method})  # fmt: skip
            return ok, value

        # all INT8, then the cheaper fixes in order of cost while the criterion is missed; keep the first that meets
        # it, else go on from the best of them
        fallback: list[str] = []
        tried = []

        def attempt(q: _Quantizer, equalized: bool, corrected: bool) -> tuple[bool, float]:
            """All INT8 with ``q`` (its graph and ranges), judged and recorded in ``tried``."""
            path = q.quantize()
            snr_all = q.output_snr(path)
            ok, value = judge(path, fallback, snr_all)
            tried.append((value, -len(tried), method, equalized, corrected, path, snr_all, ok))
            return ok, value

        for equalized, corrected in plan(cfg.equalize, cfg.bias_correction):
            if corrected and {t[3] for t in tried} == {False, True} and not any(t[4] for t in tried):
                equalized = max(tried, key=lambda t: t[:2])[3]  # on top of the better graph: CLE can lose SNR
            method = method_name(equalized, corrected)
            q = quantizer(equalized)
            if corrected:
                report("bias correction", 0, 1)
                q.correct_biases()
            ok, value = attempt(q, equalized, corrected)
            if ok:
                break
            if len(tried) == 1 and cfg.method == "minmax" and cfg.equalize == "auto":
                # min-max ranges stretched by a few outlier activations: try clipped ranges first (the cheapest fix;
                # a YOLOv8n-like detector: 3.8 dB with min-max over 128 images, 19.9 with the 99.99th percentile)
                method, plain = "clip", quantizers.pop(False)
                ranges = dataclasses.replace(cfg, method="percentile", percentile=CLIP_PERCENTILE)
                ok, clipped = attempt(quantizer(False), False, False)
                if ok:
                    break
                if clipped <= value:  # min-max stays: every later step builds on the better calibration
                    quantizers[False], ranges = plain, cfg
        all_int8 = tried[0][6]
        value, _, method, equalized, corrected, current, _, ok = tried[-1] if ok else max(tried, key=lambda t: t[:2])
        q = quantizer(equalized)
        if not corrected:
            q.deltas = None  # the same graph may have been tried with corrected biases after this one
        layers = [LayerReport(node=n.name, layer=q.layer_of[n.name], op=n.op_type) for n in q.nodes]
        by_node = {r.node: r for r in layers}
        if not ok and q.nodes:
            # sensitivity of each compute layer: the model's output SNR with only that layer quantized
            for i, n in enumerate(q.nodes):
                report("measuring layer sensitivity", i, len(q.nodes))
                by_node[n.name].snr_db = q.output_snr(q.quantize(only=[n.name]))
            order = sorted(q.nodes, key=lambda n: by_node[n.name].snr_db)
            limit = int(cfg.max_fallback * len(q.nodes))
            k = 0
            while not ok and k < limit:
                k = min(limit, max(k + 1, int(k * 1.5)))
                fallback = [n.name for n in order[:k]]
                report("falling back sensitive layers", k, limit)
                current = q.quantize(exclude=fallback)
                ok, value = judge(current, fallback)
            # a smaller set may already suffice: drop the least sensitive of the last step back in one by one
            while ok and len(fallback) > 1:
                trial = fallback[:-1]
                candidate = q.quantize(exclude=trial)
                trial_ok, trial_value = judge(candidate, trial)
                if not trial_ok:
                    break
                fallback, current, value = trial, candidate, trial_value
        for name in fallback:
            by_node[name].fallback = True
        snr = value if not by_accuracy else q.output_snr(current)
        report("per-layer error", 0, 1)
        for name, act in q.activation_snr(current).items():
            by_node[name].activation_snr_db = act
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(current, out)
    return Int8Result(
        path=out,
        output_snr_db=snr,
        output_snr_db_all_int8=all_int8,
        threshold_db=None if by_accuracy else cfg.snr_db,
        met=ok,
        layers=layers,
        settings={
            "method": ranges.method,  # the calibration the delivered file's ranges came from
            **({"percentile": ranges.percentile} if ranges.method == "percentile" else {}),
            "samples": sum(len(next(iter(f.values()))) for f in calib_feeds),
            "check_samples": sum(len(next(iter(f.values()))) for f in check_feeds),
            "per_channel": cfg.per_channel,
            "reduce_range": q.reduce_range,
            "activations": "uint8",
            "weights": "int8",
            "format": "QDQ",
            "equalize": equalized,
            "bias_correction": corrected,
            "methods_tried": [t[2] for t in tried],
            **({"equalization": equalization} if equalization is not None else {}),
        },
        criterion=metric if by_accuracy else "snr_db",
        accuracy_fp32=None if reference is None else round(reference, 5),
        accuracy_int8=round(value, 5) if by_accuracy else None,
        max_accuracy_drop=cfg.max_accuracy_drop,
        steps=steps,
    )


def to_fp16(src: str | Path, dst: str | Path, *, keep_io_types: bool = True) -> Path:
    """FP16 weights and compute, FP32 inputs/outputs unless ``keep_io_types`` is False (ONNX Runtime's converter)."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=keep_io_types)
    # a tensor two FP32-only ops read (the scales of two Resize nodes in a YOLO) gets the same Cast twice: keep one
    unique = {n.SerializeToString(): n for n in model.graph.node}
    if len(unique) < len(model.graph.node):
        nodes = list(unique.values())
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    # the converter appends its input casts at the end of the node list; the ONNX checker wants topological order
    graph = ir.from_proto(model)
    graph.graph.sort()
    onnx.save(ir.to_proto(graph), str(dst))
    onnx.checker.check_model(str(dst))
    return Path(dst)


def drop_idle_activations(src: str | Path, dst: str | Path) -> int:
    """Write ``src`` to ``dst`` without the Relu and Clip nodes that read a DequantizeLinear whose values they cannot
    change: a Relu after a uint8 zero point of 0 (every value is >= 0), a Clip whose bounds hold the whole range the
    zero point and scale can express. Returns how many were removed; the outputs are bit-identical.

    Why by hand: a QAT model applies its activation before the output quantizer (so ONNX Runtime fuses it into the
    integer kernel), and PyTorch's activation module then runs once more on the quantized values, where it is the
    identity. ONNX Runtime keeps such a node when its output has other readers (a residual sum), and the float node
    between DequantizeLinear and QuantizeLinear stops the next integer kernel's fusion. No ONNX or ORT pass removes it.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # Constant nodes too (the exporter's scalars)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {out: n for n in graph.node for out in n.output}
    outputs = {o.name for o in graph.output}

    def dq_range(name: str) -> tuple[float, float] | None:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            return None
        scale, zero = consts.get(dq.input[1]), consts.get(dq.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or float(scale) <= 0:
            return None
        info = np.iinfo(zero.dtype)
        return (float(info.min) - float(zero)) * float(scale), (float(info.max) - float(zero)) * float(scale)

    def idle(node) -> bool:
        span = dq_range(node.input[0]) if node.input else None
        if span is None or node.output[0] in outputs:
            return False
        if node.op_type == "Relu":
            return span[0] >= 0.0
        if node.op_type == "Clip":
            low = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            high = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if (len(node.input) > 1 and node.input[1] and low is None) or (
                len(node.input) > 2 and node.input[2] and high is None
            ):
                return False  # a bound computed at run time
            return (low is None or span[0] >= float(low)) and (high is None or span[1] <= float(high))
        return False

    removed = {id(n): n for n in graph.node if n.op_type in ("Relu", "Clip") and idle(n)}
    rename = {n.output[0]: n.input[0] for n in removed.values()}
    keep = [n for n in graph.node if id(n) not in removed]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    onnx.save(model, str(dst))
    return len(removed)
