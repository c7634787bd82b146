"""The benchmarker's public verbs ``benchmark`` and ``predict_latency`` (``profile_device``: ``bench/profile.py``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from presso.bench.devices import LOCAL
from presso.bench.exports import detect_precision
from presso.bench.results import NOISY_PCT, BenchmarkResult
from presso.errors import ConfigError, check_range
from presso.progress import ProgressCallback, reporter

if TYPE_CHECKING:
    from presso.bench.predictor import LatencyPrediction

PRECISIONS = ("fp32", "fp16", "int8")


class _Onnx:
    """A model as an ONNX file (exported through ``presso.convert`` when it is a PyTorch model) and its feed."""

    def __init__(self, model, input_shape, batch: int | None, tmp: Path):
        import onnx

        self.torch_model, self.example_inputs, self.feed = None, None, None
        self.name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
        if isinstance(model, bytes):
            self.path = tmp / "model.onnx"
            self.path.write_bytes(model)
        elif isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
            self.path = Path(model)
            if not self.path.is_file():
                raise ConfigError(f"ONNX file '{model}' does not exist.")
        else:
            from presso.bench.runner import export_with_feed
            from presso.models.spec import input_spec_for

            module = model
            if isinstance(model, (str, Path)):
                from presso.models.sources import load_model

                module = load_model(model)
            spec = input_spec_for(module, input_shape)
            self.example_inputs = spec.example_inputs(batch=batch)
            self.torch_model = module
            self.path, self.feed = export_with_feed(module, self.example_inputs, tmp / "model.onnx")
        self.proto = onnx.load(str(self.path), load_external_data=False)
        self.shapes = _input_shapes(self.proto, input_shape, batch)
        self.input_shape = ";".join(",".join(str(d) for d in s) for s in self.shapes)

    @property
    def precision(self) -> str:
        return detect_precision(self.proto)

    @property
    def fingerprint(self) -> str:
        from presso.bench.kernels import graph_fingerprint

        return graph_fingerprint(self.proto)

    def ort_feed(self):
        if self.feed is None:
            from presso.bench.runner import input_feed, ort_session

            self.feed = input_feed(ort_session(self.path, 1), self.shapes)
        return self.feed


def _model_file(model, input_shape, batch: int | None, tmp: Path, runtime: str | None, device: str = LOCAL):
    """The model to measure as a file: an export read back as it is (an ONNX file, an OpenVINO IR, a ``presso
    convert`` folder: ``presso.bench.exports``), else exported to ONNX here."""
    from presso.bench.exports import LiteRTFile, OpenVinoIR, export_path, is_ir, is_tflite

    path = export_path(model, runtime) if isinstance(model, (str, Path)) else None
    if path is not None and is_tflite(path):
        if runtime != "litert":
            raise ConfigError(f"'{path}' is a LiteRT file: measure it with --runtime litert.")
        if device != LOCAL:
            raise ConfigError("Remote devices run ONNX models: give the .onnx file, or measure the .tflite locally.")
        return LiteRTFile(path, input_shape, batch)
    if runtime == "litert":
        raise ConfigError(
            "Runtime 'litert' runs LiteRT files: convert the model first (presso convert MODEL --to litert -o DIR, "
            "with -p fp16 or -p int8 --calib DATA for those), then benchmark DIR or its model.tflite."
        )
    if path is None:
        return _Onnx(model, input_shape, batch, tmp)
    if is_ir(path):
        if runtime != "openvino":
            raise ConfigError(f"'{path}' is an OpenVINO IR: measure it with --runtime openvino (or its ONNX file).")
        if device != LOCAL:
            raise ConfigError("Remote devices run ONNX models: give the .onnx file (a convert folder has model.onnx).")
        return OpenVinoIR(path, input_shape, batch)
    return _Onnx(str(path), input_shape, batch, tmp)


def _input_shapes(proto, input_shape, batch) -> list[tuple[int, ...]]:
    inits = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    given = None
    if input_shape is not None:
        from presso.models import InputSpec

        given = [t.shape for t in InputSpec.parse(input_shape).tensors]
    out = []
    for i, vi in enumerate(graph_inputs):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        shape = list(given[i]) if given and i < len(given) else dims
        if batch is not None and shape:
            shape[0] = batch
        if any(d < 1 for d in shape):
            raise ConfigError(f"Input '{vi.name}' has a dynamic shape {dims}: give the input shape (--input-shape).")
        fixed = [(a, b) for a, b in zip(dims, shape, strict=False) if a > 0 and a != b]
        if fixed or (dims and len(dims) != len(shape)):
            raise ConfigError(
                f"Input '{vi.name}' of the ONNX file has the fixed shape {dims}, not {shape}: benchmark it as it is, "
                "or export it with a dynamic batch (presso convert ... --dynamic-batch) or at the shape you want."
            )
        out.append(tuple(shape))
    return out


def _check_precision(detected: str, asked: str | None, runtime: str) -> str:
    if asked is None:
        return detected
    if asked not in PRECISIONS:
        raise ConfigError(f"Precision '{asked}': use one of {', '.join(PRECISIONS)}.")
    if asked != detected:
        raise ConfigError(
            f"The model is {detected}, not {asked}: the benchmark runs a model as it is. Produce the {asked} model "
            f"first (presso convert ... --precision {asked}) and benchmark that file."
        )
    if runtime == "torch" and asked != "fp32":
        raise ConfigError("The torch runtime benchmarks fp32 models only; use onnxruntime for fp16/int8 files.")
    return asked


def benchmark(
    model,
    device: str = LOCAL,
    *,
    input_shape: str | None = None,
    runtime: str = "onnxruntime",
    threads: int | None = None,
    batch: int | None = None,
    precision: str | None = None,
    warmup: int = 10,
    repeat: int = 50,
    max_seconds: float = 30.0,
    profile: bool = False,
    db: str | None | bool = None,
    progress: ProgressCallback | None = None,
) -> BenchmarkResult:
    """Measure ``model`` (an ``nn.Module``, a model source string, an ``.onnx`` path or ONNX bytes, an OpenVINO
    ``.xml`` IR with ``runtime="openvino"``, a LiteRT ``.tflite`` with ``runtime="litert"``, or a folder written by
    ``presso convert``) on ``device``.

    Returns a ``BenchmarkResult``: ``latency_ms`` (median, p90, p99, mean, std, min), ``throughput``,
    ``peak_memory_mb``, ``model_size_bytes``, ``noise_pct``, ``environment``, ``device``, ``runtime``, and the
    fingerprints it is stored under. Every measurement is stored in the latency database (``db``: an SQLAlchemy URL
    or path; default ``$PRESSO_HOME/latency.db``; ``False`` stores nothing). ``progress`` gets stage ``benchmark``
    events: runs done (warm-up included) of the most there will be.
    """
    from presso.bench.runner import RUNTIMES, measure_litert, measure_onnx, measure_torch

    if runtime not in RUNTIMES:
        raise ConfigError(f"Runtime '{runtime}': use one of {', '.join(RUNTIMES)}.")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch must be positive, not {batch}.")
    check_range(max_seconds, "max_seconds", 0, None, low_open=True)  # NaN would never stop the timing loop early
    report = reporter(progress, "benchmark")
    client = None
    if device != LOCAL:  # an unknown device fails before any export
        from presso.bench.client import AgentClient

        client = AgentClient.for_device(device)
    with tempfile.TemporaryDirectory(prefix="presso-bench-") as tmp:
        m = _model_file(model, input_shape, batch, Path(tmp), runtime, device)
        prec = _check_precision(m.precision, precision, runtime)
        fp = m.fingerprint
        if device == LOCAL:
            if runtime == "torch":
                if m.torch_model is None:
                    raise ConfigError("The torch runtime needs a PyTorch model, not an ONNX file.")
                meas = measure_torch(
                    m.torch_model,
                    m.example_inputs,
                    threads=threads,
                    warmup=warmup,
                    repeat=repeat,
                    max_seconds=max_seconds,
                    progress=report,
                ).to_json()
                if profile:
                    raise ConfigError("--profile uses ONNX Runtime's profiler: run it with --runtime onnxruntime.")
            elif runtime == "litert":
                if profile:
                    raise ConfigError("--profile uses ONNX Runtime's profiler: run it with --runtime onnxruntime.")
                meas = measure_litert(m, threads=threads, warmup=warmup, repeat=repeat, max_seconds=max_seconds,
                                      progress=report).to_json()  # fmt: skip
            else:
                meas = measure_onnx(
                    m.path,
                    m.ort_feed(),
                    threads=threads,
                    warmup=warmup,
                    repeat=repeat,
                    max_seconds=max_seconds,
                    runtime=runtime,
                    profile=profile,
                    progress=report,
                ).to_json()
        else:
            if runtime == "torch":
                raise ConfigError("Remote devices run ONNX models: use --runtime onnxruntime or openvino.")
            report(0, 1)
            meas = client.benchmark(
                m.path,
                runtime=runtime,
                threads=threads,
                warmup=warmup,
                repeat=repeat,
                max_seconds=max_seconds,
                profile=profile,
                input_shape=m.input_shape,
            )
            report(1, 1)
    result = _result(meas, device=device, precision=prec, model_fp=fp, name=m.name, input_shape=m.input_shape)
    if db is not False:
        from presso.bench.latency_db import LatencyDB, measurement_row

        store = LatencyDB(db or None)
        row = measurement_row(
            meas,
            device=device,
            precision=prec,
            model_fp=fp,
            model_name=m.name,
            input_shape=m.input_shape,
            extra={"profile": meas.get("profile")},
        )
        result.db = {"url": _safe_url(store.url), "uid": store.add(row), "device_fp": row["device_fp"]}
    return result


def _safe_url(url: str) -> str:
    from presso.bench.latency_db import safe_url

    return safe_url(url)


def _result(
    meas: dict[str, Any], *, device: str, precision: str, model_fp: str, name: str, input_shape: str
) -> BenchmarkResult:
    keys = ("median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms")
    return BenchmarkResult(
        model=name,
        device=device,
        runtime=meas["runtime"],
        runtime_version=meas["runtime_version"],
        precision=precision,
        threads=meas["threads"],
        batch=meas["batch"],
        input_shape=input_shape,
        latency_ms={k.removesuffix("_ms"): meas[k] for k in keys},
        runs=meas["runs"],
        noise_pct=meas["noise_pct"],
        noisy=meas["noise_pct"] > NOISY_PCT,
        throughput=meas["throughput"],
        peak_memory_mb=meas["peak_memory_mb"],
        model_size_bytes=meas["model_size_bytes"],
        model_fp=model_fp,
        environment=meas["environment"],
        profile=meas.get("profile"),
    )


# --------------------------------------------------------------------------- prediction
_PREDICTORS: dict[tuple[str, str], tuple[int, Any]] = {}


def _profiled_fingerprint(store, device: str, threads: int | None) -> str:
    """The fingerprint under which ``device`` was profiled (with ``threads``, if given; the most kernels wins)."""
    from collections import Counter

    rows = [r for r in store.rows(device=device, kind="kernel") if threads in (None, 0) or r["threads"] == threads]
    if not rows:
        raise ConfigError(
            f"No profiled kernels for device '{device}'"
            + (f" with {threads} threads" if threads else "")
            + f" in the latency database: run 'presso db profile --device {device}' first."
        )
    return Counter(r["device_fp"] for r in rows).most_common(1)[0][0]


def predict_latency(
    model,
    device: str = LOCAL,
    *,
    input_shape: str | None = None,
    threads: int | None = None,
    batch: int | None = None,
    db: str | None = None,
    progress: ProgressCallback | None = None,
) -> LatencyPrediction:
    """Predict ``model``'s ONNX Runtime latency on ``device`` from the kernels profiled there (no measurement).

    ``model``: an ``nn.Module`` (with ``input_shape``), a model source, an ``.onnx`` path or ONNX bytes. Returns a
    ``LatencyPrediction`` (``latency_ms``, overhead, how many kernels were looked up / estimated / unknown).
    ``progress`` gets stage ``predict latency`` events: predictor fitted, model decomposed, kernels predicted.
    """
    from presso.bench.env import device_fingerprint
    from presso.bench.kernels import decompose
    from presso.bench.latency_db import LatencyDB
    from presso.bench.predictor import LatencyPredictor
    from presso.bench.profile import device_env, unfinished

    report = reporter(progress, "predict latency")
    report(0, 3)
    store = LatencyDB(db)
    if device == LOCAL:
        fp = device_fingerprint(device, device_env(device, threads), "fp32")
    else:  # a remote device need not be reachable: its profile is in the database
        fp = _profiled_fingerprint(store, device, threads)
    kernel_rows = store.rows(device_fp=fp, kind="kernel")
    count = len(kernel_rows)
    # an interrupted profile of this machine (an agent's runtime may leave more kernel models without rows)
    if count and device == LOCAL and (left := unfinished({r["model_name"] for r in kernel_rows})):
        raise ConfigError(
            f"The profile of device '{device}' is unfinished ({left[0]} of {left[1]} kernel models: it was "
            f"interrupted); run 'presso db profile --device {device}' again: it times only the missing ones."
        )
    count += len(store.rows(device_fp=fp, kind="network"))  # a resumed profile adds its networks last
    cached = _PREDICTORS.get((store.url, fp))
    if cached is None or cached[0] != count:  # fitting takes seconds: reuse it until the profile changes
        cached = (count, LatencyPredictor.from_db(store, device=device, device_fp=fp))
        _PREDICTORS[(store.url, fp)] = cached
    predictor = cached[1]
    report(1, 3)
    with tempfile.TemporaryDirectory(prefix="presso-predict-") as tmp:
        m = _model_file(model, input_shape, batch, Path(tmp), "onnxruntime")
        kernels = decompose(m.path, m.shapes)
        report(2, 3)
        prediction = predictor.predict_kernels(kernels)
    report(3, 3)
    return prediction
