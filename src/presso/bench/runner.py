"""Local latency measurement: warm-up, then repeated runs until a count or time budget; robust statistics.

Runtimes: ONNX Runtime (default, CPU execution provider), OpenVINO (when installed), LiteRT (ai-edge-litert's
interpreter with XNNPACK, with the extra ``presso[litert]``) and eager PyTorch. Every
measurement also reports its own noise -- the spread of the medians of consecutive blocks of runs -- so a difference
between two models can be told from the machine's jitter.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from presso.errors import ConfigError

RUNTIMES = ("onnxruntime", "openvino", "litert", "torch")
NOISE_BLOCKS = 5


@dataclass
class Measurement:
    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    threads: int
    runtime: str
    runtime_version: str
    p99_ms: float = 0.0
    min_ms: float = 0.0
    batch: int = 1
    throughput: float = 0.0  # samples per second at the median latency
    peak_memory_mb: float = 0.0  # peak resident memory the run added to the process (session + buffers)
    model_size_bytes: int = 0
    noise_pct: float = 0.0  # spread (max - min) of the medians of consecutive blocks of runs, % of the median
    environment: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_threads(threads: int | None) -> int:
    from presso.bench.env import cpu_cores

    if threads is not None and threads < 0:
        raise ConfigError(f"--threads must be 0 (all cores) or positive, not {threads}.")
    return threads or cpu_cores()


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, percentiles, mean, std and the block-median spread of a list of run times (ms)."""
    ordered = sorted(samples)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))]

    median = statistics.median(ordered)
    size = max(1, n // NOISE_BLOCKS)
    blocks = [statistics.median(samples[i : i + size]) for i in range(0, n - size + 1, size)]
    noise = (max(blocks) - min(blocks)) / median * 100 if len(blocks) > 1 and median > 0 else 0.0
    return {
        "median_ms": round(median, 4),
        "p90_ms": round(pct(0.9), 4),
        "p99_ms": round(pct(0.99), 4),
        "min_ms": round(ordered[0], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
        "std_ms": round(statistics.pstdev(ordered), 4),
        "noise_pct": round(noise, 2),
    }


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the peak above the level at entry."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = round((self._peak - self._base) / 2**20, 2)


def time_loop(
    run: Callable[[], Any],
    *,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Run ``warmup`` times, then until ``repeat`` runs or ``max_seconds`` (at least 3 runs); run times in ms."""
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat must be >= 1 and warmup >= 0 (got repeat={repeat}, warmup={warmup}).")
    total = warmup + repeat
    for i in range(warmup):
        run()
        if progress:
            progress(i + 1, total)
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(samples) < repeat and (len(samples) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1000)
        if progress:
            progress(warmup + len(samples), total)
    if progress:
        progress(total, total)
    return samples


# --------------------------------------------------------------------------- ONNX Runtime
def ort_session(
    model: str | Path | bytes,
    threads: int,
    *,
    profile_prefix: str | None = None,
    optimized_path: str | Path | None = None,
):
    """An ONNX Runtime CPU session with all graph optimizations, ``threads`` intra-op threads, one inter-op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # the NCHWc serialization warning is expected when optimized_path is given
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def node_times(
    session, feed: dict[str, np.ndarray], runs: int, between: Callable[[], Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Run a profiling session ``runs`` times; per node: op type, median and first-quartile kernel time (ms).

    ``between`` runs between two runs, outside the timed kernels (e.g. evicting the caches)."""
    for _ in range(runs):
        if between is not None:
            between()
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    per: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        rec = per.setdefault(name, {"op": e.get("args", {}).get("op_name", "?"), "samples": []})
        rec["samples"].append(e["dur"] / 1000)
    for rec in per.values():
        # the first profiled run carries first-touch costs; drop it when there are enough runs
        samples = rec.pop("samples")
        samples = sorted(samples[1:] if len(samples) > 2 else samples)
        rec["ms"] = statistics.median(samples)
        # the first quartile: on a shared machine, a kernel preempted by another process is slower in a few runs;
        # on a quiet one it is within a percent or two of the median
        rec["p25"] = samples[len(samples) // 4]
    return per


def profile_onnx(
    path: str | Path, feed: dict[str, np.ndarray], *, threads: int, runs: int = 10, top: int = 15
) -> dict[str, Any]:
    """ONNX Runtime's profiler: time per operator type and the slowest nodes (median over ``runs``)."""
    with tempfile.TemporaryDirectory(prefix="presso-prof-") as tmp:
        session = ort_session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(2):
            session.run(None, feed)
        nodes = node_times(session, feed, runs)
    total = sum(r["ms"] for r in nodes.values()) or 1.0
    ops: dict[str, dict[str, Any]] = {}
    for rec in nodes.values():
        o = ops.setdefault(rec["op"], {"op": rec["op"], "ms": 0.0, "nodes": 0})
        o["ms"] += rec["ms"]
        o["nodes"] += 1
    by_op = sorted(ops.values(), key=lambda o: -o["ms"])
    for o in by_op:
        o["share"] = round(o["ms"] / total, 4)
        o["ms"] = round(o["ms"], 4)
    slow = sorted(nodes.items(), key=lambda kv: -kv[1]["ms"])[: top or None]
    return {
        "kernel_total_ms": round(total, 4),
        "runs": runs,
        "ops": by_op[: top or None],
        "nodes": [
            {
                "node": n,
                "op": r["op"],
                "ms": round(r["ms"], 4),
                "p25_ms": round(r["p25"], 4),
                "share": round(r["ms"] / total, 4),
            }
            for n, r in slow
        ],
    }


def input_feed(session, shapes: list[tuple[int, ...]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every input of an ONNX Runtime session; dynamic dimensions need ``shapes``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i, arg in enumerate(session.get_inputs()):
        shape = shapes[i] if shapes and i < len(shapes) else None
        if shape is None:
            if any(not isinstance(d, int) or d < 0 for d in arg.shape):
                raise ConfigError(
                    f"Input '{arg.name}' has a dynamic shape {arg.shape}: give the input shape, e.g. "
                    "--input-shape 1,3,224,224."
                )
            shape = tuple(arg.shape)
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise ConfigError(f"Input '{arg.name}' has type {arg.type}, which Presso cannot generate inputs for.")
        if np.issubdtype(dtype, np.floating):
            feed[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[arg.name] = np.ones(shape, dtype=dtype)
        else:
            feed[arg.name] = rng.integers(0, 2, shape).astype(dtype)
    return feed


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def measure_onnx(
    path: str | Path,
    inputs: dict[str, np.ndarray] | None = None,
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 30.0,
    runtime: str = "onnxruntime",
    profile: bool = False,
    profile_top: int = 15,
    progress: Callable[[int, int], None] | None = None,
) -> Measurement:
    """Time the ONNX file ``path`` on this machine's CPU (``threads``: intra-op threads; default all cores).

    ``inputs``: a feed by input name; default random inputs of the model's static shapes. ``profile``: add ONNX
    Runtime's per-operator profile (``profile_top`` slowest nodes; 0: every node).
    """

    if runtime not in ("onnxruntime", "openvino"):
        raise ConfigError(f"Runtime '{runtime}' does not run ONNX files: use onnxruntime or openvino.")
    n_threads = resolve_threads(threads)
    with PeakMemory() as mem:
        if runtime == "openvino":
            run, version, feed = _openvino_runner(path, inputs, n_threads)
        else:
            import onnxruntime as ort

            session = ort_session(path, n_threads)
            feed = inputs if inputs is not None else input_feed(session)
            version = ort.__version__

            def run():
                return session.run(None, feed)

        samples = time_loop(run, warmup=warmup, repeat=repeat, max_seconds=max_seconds, progress=progress)
    batch = _batch_of(feed)
    stats = summarize(samples)
    prof = (
        profile_onnx(path, feed, threads=n_threads, top=profile_top) if profile and runtime == "onnxruntime" else None
    )
    if profile and runtime != "onnxruntime":
        raise ConfigError("--profile uses ONNX Runtime's profiler: run it with --runtime onnxruntime.")
    size = sum(f.stat().st_size for f in _model_files(Path(path)))
    return _measurement(samples, stats, n_threads, runtime, version, batch, mem.peak_mb, size, profile=prof)


def _measurement(samples: list[float], stats: dict[str, float], threads: int, runtime: str, version: str, batch: int,
                 peak_mb: float, size: int, profile: dict[str, Any] | None = None) -> Measurement:  # fmt: skip
    """A Measurement from a run's samples and their summary (every runtime reports the same fields)."""
    from presso.bench.env import environment

    return Measurement(
        **stats,
        runs=len(samples),
        threads=threads,
        runtime=runtime,
        runtime_version=version,
        batch=batch,
        throughput=round(batch * 1000 / stats["median_ms"], 3) if stats["median_ms"] > 0 else 0.0,
        peak_memory_mb=peak_mb,
        model_size_bytes=int(size),
        environment=environment(runtime, version, threads),
        profile=profile,
    )


def _model_files(path: Path) -> list[Path]:
    """The files a model is: an OpenVINO IR is its .xml and its .bin."""
    return [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]


def _batch_of(feed: dict[str, Any]) -> int:
    for v in feed.values():
        shape = getattr(v, "shape", ())
        if len(shape) >= 1:
            return int(shape[0])
    return 1


def _openvino_runner(path, inputs, threads: int):
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError(
            "Runtime 'openvino' is not installed here: pip install openvino (or use onnxruntime)."
        ) from None
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    if inputs is None:
        feed = {}
        rng = np.random.default_rng(0)
        for port in compiled.inputs:
            shape = port.get_partial_shape()
            if shape.is_dynamic:
                raise ConfigError(f"Input '{port.any_name}' has a dynamic shape: give --input-shape.")
            feed[port.any_name] = rng.standard_normal([d.get_length() for d in shape]).astype(np.float32)
    else:
        feed = inputs
    request = compiled.create_infer_request()
    return (lambda: request.infer(feed)), ov.get_version(), feed


# --------------------------------------------------------------------------- LiteRT
def measure_litert(
    model,
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> Measurement:
    """Time a LiteRT flatbuffer (``presso.bench.exports.LiteRTFile``) with ai-edge-litert's interpreter on the CPU
    (XNNPACK delegate, ``threads`` threads): inputs set once, then ``invoke`` timed -- what an app's inference call
    costs."""
    from presso.bench.exports import litert_interpreter

    n_threads = resolve_threads(threads)
    with PeakMemory() as mem:
        interp = litert_interpreter(model.path, n_threads)
        for detail, value in zip(interp.get_input_details(), model.feed(), strict=True):
            interp.set_tensor(detail["index"], value)
        samples = time_loop(interp.invoke, warmup=warmup, repeat=repeat, max_seconds=max_seconds, progress=progress)
    from ai_edge_litert import __version__ as version

    stats = summarize(samples)
    batch = model.shapes[0][0] if model.shapes and model.shapes[0] else 1
    return _measurement(samples, stats, n_threads, "litert", version, batch, mem.peak_mb, model.path.stat().st_size)


# --------------------------------------------------------------------------- PyTorch (eager)
def measure_torch(
    model,
    example_inputs: tuple,
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeat: int = 30,
    max_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> Measurement:
    """Time ``model`` in eager PyTorch on the CPU (inference mode, ``threads`` intra-op threads)."""
    import torch

    from presso.models.figures import set_mode

    n_threads = resolve_threads(threads)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    was_training = model.training
    set_mode(model, False)
    try:
        with PeakMemory() as mem, torch.inference_mode():

            def run():
                return model(*example_inputs)

            samples = time_loop(run, warmup=warmup, repeat=repeat, max_seconds=max_seconds, progress=progress)
    finally:
        torch.set_num_threads(old_threads)
        set_mode(model, was_training)
    stats = summarize(samples)
    batch = int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    return _measurement(samples, stats, n_threads, "torch", torch.__version__, batch, mem.peak_mb, size)


def measure_model(model, example_inputs: tuple, **kwargs) -> Measurement:
    """Export ``model`` to ONNX (``presso.convert.export_onnx``) and time it with ``measure_onnx``."""
    with tempfile.TemporaryDirectory(prefix="presso-bench-") as tmp:
        path, feed = export_with_feed(model, example_inputs, Path(tmp) / "model.onnx")
        return measure_onnx(path, feed, **kwargs)


def export_with_feed(model, example_inputs: tuple, path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Export through the project's one ONNX path and pair the example inputs with the graph's input names."""
    import onnx

    from presso.models.onnx import export_onnx

    path = export_onnx(model, example_inputs, path)
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, example_inputs, strict=False)}
    return path, feed
