"""The benchmarker's public verbs: ``benchmark``, ``calibrate`` (a device's kernels) and ``predict_latency``."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from presso.bench.devices import LOCAL
from presso.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
}


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

    def ort_feed(self):
        if self.feed is None:
            from presso.bench.runner import input_feed, ort_session

            self.feed = input_feed(ort_session(self.path, 1), self.shapes)
        return self.feed


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


def detect_precision(proto) -> str:
    ops = {n.op_type for n in proto.graph.node}
    if ops & _INT8_OPS:
        return "int8"
    from onnx import TensorProto

    if any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


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
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure ``model`` (an ``nn.Module``, a model source string, an ``.onnx`` path or ONNX bytes) on ``device``.

    Returns the measurement as a dict: ``latency_ms`` (median, p90, p99, mean, std, min), ``throughput``,
    ``peak_memory_mb``, ``model_size_bytes``, ``noise_pct``, ``environment``, ``device``, ``runtime``, and the
    fingerprints it is stored under. Every measurement is stored in the latency database (``db``: an SQLAlchemy URL
    or path; default ``$PRESSO_HOME/latency.db``; ``False`` stores nothing).
    """
    from presso.bench.kernels import graph_fingerprint
    from presso.bench.runner import RUNTIMES, measure_onnx, measure_torch

    if runtime not in RUNTIMES:
        raise ConfigError(f"Runtime '{runtime}': use one of {', '.join(RUNTIMES)}.")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch must be positive, not {batch}.")
    client = None
    if device != LOCAL:  # an unknown device fails before any export
        from presso.bench.client import AgentClient

        client = AgentClient.for_device(device)
    with tempfile.TemporaryDirectory(prefix="presso-bench-") as tmp:
        m = _Onnx(model, input_shape, batch, Path(tmp))
        prec = _check_precision(detect_precision(m.proto), precision, runtime)
        fp = graph_fingerprint(m.proto)
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
                    progress=progress,
                ).to_json()
                if profile:
                    raise ConfigError("--profile uses ONNX Runtime's profiler: run it with --runtime onnxruntime.")
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
                    progress=progress,
                ).to_json()
        else:
            if runtime == "torch":
                raise ConfigError("Remote devices run ONNX models: use --runtime onnxruntime or openvino.")
            if progress:
                progress(0, 1)
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
            if progress:
                progress(1, 1)
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
        result["db"] = {"url": _safe_url(store.url), "uid": store.add(row), "device_fp": row["device_fp"]}
    return result


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _result(meas: dict[str, Any], *, device: str, precision: str, model_fp: str, name: str, input_shape: str) -> dict:
    keys = ("median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms")
    return {
        "model": name,
        "device": device,
        "runtime": meas["runtime"],
        "runtime_version": meas["runtime_version"],
        "precision": precision,
        "threads": meas["threads"],
        "batch": meas["batch"],
        "input_shape": input_shape,
        "latency_ms": {k.removesuffix("_ms"): meas[k] for k in keys},
        "runs": meas["runs"],
        "noise_pct": meas["noise_pct"],
        "throughput": meas["throughput"],
        "peak_memory_mb": meas["peak_memory_mb"],
        "model_size_bytes": meas["model_size_bytes"],
        "model_fp": model_fp,
        "environment": meas["environment"],
        "profile": meas.get("profile"),
    }


# --------------------------------------------------------------------------- calibration and prediction
def device_env(device: str, threads: int | None) -> dict[str, Any]:
    """The environment a device's measurements are fingerprinted with (ONNX Runtime, ``threads``, fp32)."""
    from presso.bench.env import environment
    from presso.bench.runner import resolve_threads

    if device == LOCAL:
        import onnxruntime as ort

        return environment("onnxruntime", ort.__version__, resolve_threads(threads))
    from presso.bench.client import AgentClient

    env = dict(AgentClient.for_device(device).info()["environment"])
    env["threads"] = threads or env.get("cores") or env["threads"]
    return env


WINDOW = 20  # calibration specs measured between two looks at the reference kernel
QUIET = 1.1  # a window counts as quiet when the reference kernel is within 10% of its best time


def calibrate(
    device: str = LOCAL,
    *,
    threads: int | None = None,
    size: str = "full",
    runs: int = 12,
    db: str | None = None,
    specs: list | None = None,
    flush_mb: float = 4.0,
    quiet: bool | Any = True,
    wait_seconds: float = 10.0,
    redo_seconds: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure the calibration kernel set on ``device`` and store every kernel in the latency database.

    ``size``: ``full`` (a few minutes) or ``quick`` (seconds); ``specs``: an explicit list of
    ``presso.bench.calibration.Spec`` instead. ``flush_mb``: buffer written between profiled runs to evict the
    caches (local). ``quiet``: on this machine, look at a reference kernel every
    20 specs (or pass a ``QuietProbe`` to share one): pause while other processes slow it down by more than 10%,
    and measure again, at the end, the windows taken while the machine was busier than it later proved to be.
    ``wait_seconds``: longest pause per window; ``redo_seconds``: time allowed for measuring busy windows again.
    """
    import time

    from presso.bench.calibration import CacheFlush, QuietProbe, kernel_set, measure_spec_local
    from presso.bench.calibration import calibrate as run
    from presso.bench.env import device_fingerprint
    from presso.bench.latency_db import LatencyDB

    if specs is None and size not in ("full", "quick"):
        raise ConfigError(f"Calibration size '{size}': use full or quick.")
    env = device_env(device, threads)
    n_threads = env["threads"]
    fp = device_fingerprint(device, env, "fp32")
    store = LatencyDB(db)
    if device == LOCAL:
        flush = CacheFlush(flush_mb)

        def measure(data: bytes, wall: bool):
            return measure_spec_local(data, n_threads, runs, wall, flush)
    else:
        from presso.bench.client import AgentClient

        client = AgentClient.for_device(device)

        def measure(data: bytes, wall: bool):
            r = client.benchmark(
                data,
                threads=n_threads,
                warmup=2,
                repeat=max(runs * 3, 30) if wall else 3,
                max_seconds=5,
                profile=True,
                profile_top=0,
            )
            return {n["node"]: n.get("p25_ms", n["ms"]) for n in r["profile"]["nodes"]}, (
                r["median_ms"] if wall else None
            )

    started = time.time()
    base = {
        "device": device,
        "device_fp": fp,
        "cpu": env.get("cpu"),
        "gpu": env.get("gpu"),
        "runtime": "onnxruntime",
        "runtime_version": env.get("runtime_version"),
        "threads": n_threads,
        "precision": "fp32",
    }
    spec_list = specs if specs is not None else kernel_set(size)
    probe = quiet if isinstance(quiet, QuietProbe) else (QuietProbe(n_threads) if device == LOCAL and quiet else None)
    windows = [spec_list[k : k + WINDOW] for k in range(0, len(spec_list), WINDOW)]
    kept: dict[int, tuple[float, list]] = {}  # window -> (reference-kernel ms while it was measured, timings)
    done = 0

    def measure_window(w: int) -> None:
        nonlocal done
        ref = 0.0
        if probe is not None:
            probe.wait(tolerance=QUIET, max_seconds=wait_seconds)
            ref = probe.last_ms
        timings = list(run(measure, windows[w]))
        if probe is not None:
            probe.factor()
            ref = max(ref, probe.last_ms)
        if w not in kept or ref < kept[w][0]:  # keep the quietest measurement of each window
            kept[w] = (ref, timings)
        done += len(windows[w])
        if progress:
            progress(min(done, len(spec_list)), len(spec_list))

    for w in range(len(windows)):
        measure_window(w)
    redone = 0
    if probe is not None:
        # windows measured while the machine was busier than it later proved to be are measured again
        deadline = time.time() + redo_seconds
        while time.time() < deadline:
            busy = sorted((w for w, (ref, _) in kept.items() if ref > QUIET * probe.best), key=lambda w: -kept[w][0])
            if not busy:
                break
            for w in busy:
                if time.time() >= deadline:
                    break
                measure_window(w)
                redone += 1
    n_kernels = 0
    for w in sorted(kept):
        ref, timings = kept[w]
        rows = []
        for timing in timings:
            for node in timing.nodes:
                rows.append(
                    {
                        **base,
                        "kind": "kernel",
                        "kernel_key": node["family"],
                        "median_ms": node["ms"],
                        "model_name": timing.spec,
                        "features": {"signature": node["signature"], "x": node["features"]},
                        "extra": {"reference_ms": ref},
                    }
                )
            if timing.wall_ms is not None:
                rows.append(
                    {
                        **base,
                        "kind": "overhead",
                        "median_ms": timing.wall_ms,
                        "model_name": timing.spec,
                        "features": {"nodes": len(timing.nodes), "kernel_ms": sum(n["ms"] for n in timing.nodes)},
                        "extra": {"reference_ms": ref},
                    }
                )
            n_kernels += len(timing.nodes)
        store.add_many(rows)
    busy_left = sum(ref > QUIET * probe.best for ref, _ in kept.values()) if probe is not None else None
    return {
        "device": device,
        "device_fp": fp,
        "threads": n_threads,
        "kernels": n_kernels,
        "windows": len(windows),
        "windows_redone": redone,
        "windows_busy": busy_left,
        "seconds": round(time.time() - started, 1),
        "db": _safe_url(store.url),
    }


_PREDICTORS: dict[tuple[str, str], tuple[int, Any]] = {}


def _calibrated_fingerprint(store, device: str, threads: int | None) -> str:
    """The fingerprint under which ``device`` was calibrated (with ``threads``, if given; the most kernels wins)."""
    from collections import Counter

    rows = [r for r in store.rows(device=device, kind="kernel") if threads in (None, 0) or r["threads"] == threads]
    if not rows:
        raise ConfigError(
            f"No calibrated kernels for device '{device}'"
            + (f" with {threads} threads" if threads else "")
            + f" in the latency database: run 'presso db calibrate --device {device}' first."
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
):
    """Predict ``model``'s ONNX Runtime latency on ``device`` from the kernels calibrated there (no measurement).

    ``model``: an ``nn.Module`` (with ``input_shape``), a model source, an ``.onnx`` path or ONNX bytes. Returns a
    ``Prediction`` (``latency_ms``, overhead, how many kernels were looked up / estimated / unknown).
    """
    from presso.bench.env import device_fingerprint
    from presso.bench.kernels import decompose
    from presso.bench.latency_db import LatencyDB
    from presso.bench.predictor import LatencyPredictor

    store = LatencyDB(db)
    if device == LOCAL:
        fp = device_fingerprint(device, device_env(device, threads), "fp32")
    else:  # a remote device need not be reachable: its calibration is in the database
        fp = _calibrated_fingerprint(store, device, threads)
    count = len(store.rows(device_fp=fp, kind="kernel"))
    cached = _PREDICTORS.get((store.url, fp))
    if cached is None or cached[0] != count:  # fitting takes seconds: reuse it until the calibration changes
        cached = (count, LatencyPredictor.from_db(store, device=device, device_fp=fp))
        _PREDICTORS[(store.url, fp)] = cached
    predictor = cached[1]
    with tempfile.TemporaryDirectory(prefix="presso-predict-") as tmp:
        m = _Onnx(model, input_shape, batch, Path(tmp))
        return predictor.predict_kernels(decompose(m.path, m.shapes))
