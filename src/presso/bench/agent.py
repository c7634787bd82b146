"""The benchmark agent: a small authenticated HTTP server (FastAPI + uvicorn) that runs on a device.

Protocol: ``GET /info`` (the device, its runtimes and limits); ``POST /benchmark?runtime=&threads=&warmup=&repeat=&
max_seconds=&profile=&profile_top=&input_shape=`` with the ONNX model as the raw body (application/octet-stream),
answered with the same JSON as a local ``presso benchmark``. Every request needs ``Authorization: Bearer TOKEN``.
Each check comes before what it protects:

1. A pure ASGI guard, before FastAPI reads a byte: failed authentications rate-limited per client address (429 with
   Retry-After), then the token, compared in constant time (401). Error answers close the connection, so uvicorn
   does not go on reading (to discard) an upload nobody will look at.
2. The parameters: runtime, threads 0..os.cpu_count() (0: the runtime's default), ranges, and the input shapes
   against ``max_input_elements`` (all inputs of a request together).
3. The upload: 413 from Content-Length before reading, then streamed to a temporary file and cut with a 413 as soon
   as it passes the limit, whatever Content-Length said (or with none: chunked).
4. The measurement, in a child process ('spawn': a fork of a threaded server could inherit held locks), one at a
   time (the others wait in line): ONNX parse and checker (no external data: nothing on the agent's disk is read),
   an ONNX Runtime session, input shapes -- dynamic ones resolved from the model -- checked against the element
   limit before anything is allocated, the timed runs. ``measure_timeout`` seconds of wall clock cover all of it;
   past them the child is killed (408) and a fresh one serves the next request. A model's own failures (bad shape,
   a Reshape failing at run time, an unsupported op, out of memory, a crash of the runtime) are 4xx with the
   runtime's message; only the agent's own faults are 5xx.

SIGTERM and SIGINT stop a served agent cleanly (exit code 0): the running measurement is killed, open requests are
answered 503, and uvicorn returns.
"""

import asyncio
import contextlib
import hmac
import importlib
import importlib.util
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from presso.errors import ConfigError, PressoError

DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_MEASURE_TIMEOUT = 60.0
DEFAULT_MAX_INPUT_ELEMENTS = 64 * 2**20
AUTH_FAILURES, AUTH_WINDOW_S = 10, 60.0
WORKER_START_TIMEOUT = 120.0  # importing ONNX Runtime in a fresh child; not counted in a measurement's limit
MAX_DETAIL = 800


class AgentError(Exception):
    """An answer: an HTTP status and the message sent back as ``detail``."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class _AuthLimiter:
    """Failed authentications per client address, kept in memory only: simple on purpose (a restart forgets them;
    behind a reverse proxy every client shares the proxy's address). After ``failures`` failures within ``window``
    seconds, an address gets 429 until the oldest of them leaves the window. The token is not compared meanwhile, or
    429-versus-200 would still tell a right guess. Addresses that never fail are never slowed down."""

    MAX_ADDRESSES = 10_000  # bounded memory whatever the number of addresses trying

    def __init__(self, failures: int, window: float):
        self.failures, self.window = failures, window
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, addr: str) -> float:
        if self.failures <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            q = self._seen.get(addr)
            if not q or len(q) < self.failures:
                return 0.0
            return max(0.0, q[0] + self.window - now)

    def failed(self, addr: str) -> None:
        if self.failures <= 0:
            return
        now = time.monotonic()
        with self._lock:
            while addr not in self._seen and len(self._seen) >= self.MAX_ADDRESSES:
                del self._seen[next(iter(self._seen))]  # forget the address that failed first
            self._seen.setdefault(addr, deque(maxlen=self.failures)).append(now)


async def _answer(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start_headers += [(b"connection", b"close"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """Pure ASGI middleware: rate limit and bearer token before the app (and so before any body is read)."""

    def __init__(self, app, *, token: bytes, limiter: _AuthLimiter):
        self.app, self.token, self.limiter = app, token, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        addr = (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.retry_after(addr)
        if wait > 0:
            retry = str(math.ceil(wait)).encode()
            detail = "Too many failed authentications from this address: wait, then retry with the right token."
            return await _answer(send, 429, detail, [(b"retry-after", retry)])
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
            self.limiter.failed(addr)
            return await _answer(send, 401, "Missing or wrong bearer token.", [(b"www-authenticate", b"Bearer")])

        async def send_closing(message):
            # an error may leave the upload unread: closing stops uvicorn from reading the rest to discard it
            if message["type"] == "http.response.start" and message["status"] >= 400:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_closing)


class _Worker:
    """The measurement child process: reused across measurements, killed and replaced when one overruns, killed
    when the agent stops. ``run`` serves one job at a time, whoever calls it."""

    def __init__(self) -> None:
        self._proc = self._conn = None
        self._ready = self.closed = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The measurement child's process id (None while there is none)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self) -> None:
        """Start the child ahead of the first request (it imports ONNX Runtime meanwhile); does not wait."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self.closed or (self._proc is not None and self._proc.is_alive()):
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(child, os.getpid()), name="presso-agent-measure", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False

    def _stop(self) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn, self._ready = None, None, False
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        conn.close()
        return proc.exitcode

    def run(self, job: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float, float]:
        """Run ``job`` in the child within ``timeout`` seconds: (its JSON, start time, end time) or AgentError."""
        with self._lock:
            self._start()
            if self.closed:
                raise AgentError(503, "The agent is shutting down.")
            conn = self._conn
            try:
                if not self._ready:  # the child's imports do not count toward the measurement's limit
                    if not conn.poll(WORKER_START_TIMEOUT):
                        self._stop()
                        raise AgentError(503, "The measurement process did not start in time: retry.")
                    self._ready = conn.recv() == "ready"
                started = time.time()
                conn.send(job)
                if not conn.poll(timeout):
                    self._stop()
                    self._start()  # the next request in line gets a child that is already importing
                    raise AgentError(
                        408,
                        f"The measurement did not finish within this agent's limit of {timeout:g} s "
                        "(session creation, warm-up and timed runs; presso agent serve --measure-timeout): stopped.",
                    )
                reply = conn.recv()
            except (EOFError, OSError):  # the child died: killed by close(), or crashed
                ready, code = self._ready, self._stop()
                how = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
                if self.closed:
                    raise AgentError(503, "The agent is shutting down: the measurement was stopped.") from None
                if not ready:
                    raise AgentError(500, f"The measurement process failed to start ({how}).") from None
                raise AgentError(422, f"The runtime crashed running this model ({how}; out of memory?).") from None
            finished = time.time()
        if reply[0] != "ok":
            raise AgentError(reply[1], reply[2])
        return reply[1], started, finished

    def close(self) -> None:
        """Stop for good and kill the child now; safe in a signal handler (no lock is waited for)."""
        self.closed = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
        if self._lock.acquire(blocking=False):  # idle: reap it here; otherwise run() sees the end and reaps it
            try:
                self._stop()
            finally:
                self._lock.release()


def create_app(
    token: str,
    *,
    name: str = "agent",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_seconds_cap: float = 120.0,
    measure_timeout: float = DEFAULT_MEASURE_TIMEOUT,
    max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS,
    auth_failures: int = AUTH_FAILURES,
    auth_window_s: float = AUTH_WINDOW_S,
):
    """The agent's ASGI app (FastAPI). ``token``: the bearer token clients must send; the rest: the limits above
    (``auth_failures`` <= 0: no rate limit). In-process: ``with TestClient(create_app(...))`` (``with`` runs the
    lifespan: the measurement child starts, and is killed at the end; ``app.state.worker``: ``.pid``, ``.close()``).
    A script serving it needs ``if __name__ == "__main__":``, as 'spawn' re-imports the main module in the child."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    if not token or len(token) < 16:
        raise ConfigError(
            "The agent's token must be at least 16 characters (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))' > token)."
        )
    if not (max_upload_mb > 0 and measure_timeout > 0 and max_input_elements >= 1):
        raise ConfigError("--max-upload-mb, --measure-timeout and --max-input-elements must be positive.")
    worker = _Worker()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            worker.close()

    app = FastAPI(title="presso agent", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, token=token.encode(), limiter=_AuthLimiter(auth_failures, auth_window_s))
    app.state.worker = worker
    limit = int(max_upload_mb * 2**20)
    queue = {"waiting": 0, "running": 0, "done": 0}
    line: dict[str, Any] = {"loop": None, "lock": None}  # measurements wait here; the worker's own lock backs it up

    def in_line() -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if line["loop"] is not loop:
            line["loop"], line["lock"] = loop, asyncio.Lock()
        return line["lock"]

    @app.exception_handler(AgentError)
    async def _agent_error(_request, exc: AgentError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail})

    @app.get("/info")
    def info() -> dict[str, Any]:
        import onnxruntime as ort

        from presso.bench.env import cpu_cores, environment

        return {
            "device": name,
            "environment": environment("onnxruntime", ort.__version__, cpu_cores()),
            "runtimes": _runtimes(),
            "max_upload_mb": max_upload_mb,
            "measure_timeout_s": measure_timeout,
            "max_input_elements": max_input_elements,
            "max_threads": os.cpu_count() or 1,
            "queue": dict(queue),
        }

    @app.post("/benchmark")
    async def benchmark(
        request: Request,
        runtime: str = "onnxruntime",
        threads: int = 0,
        warmup: int = 10,
        repeat: int = 50,
        max_seconds: float = 30.0,
        profile: bool = False,
        profile_top: int = 15,
        input_shape: str = "",
    ) -> dict[str, Any]:
        _check_params(runtime, threads, warmup, repeat, max_seconds, profile_top)
        shapes = _parse_shapes(input_shape, max_input_elements)
        too_big = f"Model larger than this agent's limit of {max_upload_mb:g} MiB (presso agent serve --max-upload-mb)."
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit():  # (uvicorn refuses a malformed one before this)
            raise HTTPException(400, "Bad Content-Length.")
        if int(declared) > limit:
            raise HTTPException(413, too_big)
        with tempfile.TemporaryDirectory(prefix="presso-agent-") as tmp:
            path = Path(tmp) / "model.onnx"
            size = 0
            try:
                with path.open("wb") as f:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:  # stop here: the rest is never read
                            raise HTTPException(413, too_big)
                        f.write(chunk)
            except ClientDisconnect:
                raise HTTPException(400, "The upload was interrupted.") from None
            if not size:
                raise HTTPException(400, "Empty upload: send the ONNX model as the request body.")
            run = dict(runtime=runtime, warmup=warmup, repeat=repeat, profile=profile, profile_top=profile_top)
            # the timed loop's budget leaves room for session creation and warm-up within the limit
            run["max_seconds"] = min(max_seconds, max_seconds_cap, measure_timeout / 2)
            job = {"path": str(path), "threads": threads, "shapes": shapes, "limit": max_input_elements, "run": run}
            queue["waiting"] += 1
            try:
                lock = in_line()
                await lock.acquire()
            finally:
                queue["waiting"] -= 1
            queue["running"] = 1
            try:
                result, started, finished = await run_in_threadpool(worker.run, job, measure_timeout)
            finally:
                queue["running"], queue["done"] = 0, queue["done"] + 1
                lock.release()
        return {**result, "device": name, "agent": {"started": started, "finished": finished}}

    return app


def _runtimes() -> list[str]:
    return ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def _check_params(runtime: str, threads: int, warmup: int, repeat: int, max_seconds: float, profile_top: int) -> None:
    if runtime not in _runtimes():
        raise AgentError(400, f"Runtime '{runtime[:40]}' is not available here: use {' or '.join(_runtimes())}.")
    cpus = os.cpu_count() or 1
    if not 0 <= threads <= cpus:
        raise AgentError(400, f"threads must be 0 (the runtime's default) to {cpus} (the CPUs here), not {threads}.")
    if not (0 <= warmup <= 10_000 and 1 <= repeat <= 100_000 and 0 <= profile_top <= 10_000):
        raise AgentError(400, "warmup (0..10000), repeat (1..100000) or profile_top (0..10000) out of range.")
    if not (math.isfinite(max_seconds) and max_seconds > 0):
        raise AgentError(400, f"max_seconds must be a positive number of seconds, not {max_seconds}.")


def _parse_shapes(text: str, max_elements: int) -> list[tuple[int, ...]] | None:
    if not text.strip():
        return None
    from presso.models.spec import InputSpec

    try:
        shapes = [t.shape for t in InputSpec.parse(text).tensors]
    except PressoError as e:
        raise AgentError(400, str(e)) from None
    _check_elements(shapes, max_elements)
    return shapes


def _check_elements(shapes: list[tuple[int, ...]], max_elements: int) -> None:
    total = sum(math.prod(s) for s in shapes)
    if total > max_elements:
        raise AgentError(
            422,
            f"The inputs would hold {total:,} elements, over this agent's limit of {max_elements:,} per request "
            "(presso agent serve --max-input-elements): give a smaller input_shape.",
        )


# ----------------------------------------------------------------------------- in the measurement child
def _child_main(conn, parent_pid: int) -> None:
    """The measurement child: import once, say ready, then answer jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the agent decides
    threading.Thread(target=_orphan_watch, args=(parent_pid,), daemon=True).start()
    for module in ("onnx", "onnxruntime", "presso.bench.runner"):  # ready means ready to measure
        importlib.import_module(module)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_measure(job))


def _orphan_watch(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:  # the agent died without stopping us: do not run a model for ever
            os._exit(1)


def _text(e: BaseException) -> str:
    return " ".join(str(e).split())[:MAX_DETAIL] or type(e).__name__


def _model_fault(e: BaseException) -> bool:
    """Errors the model (or the request's shapes) causes, as opposed to a fault of the agent itself."""
    top = (type(e).__module__ or "").split(".")[0]
    faults = (MemoryError, ValueError, RuntimeError, OverflowError, PressoError)
    return top in {"onnxruntime", "onnx", "google", "openvino"} or isinstance(e, faults)


def _measure(job: dict[str, Any]) -> tuple:
    try:
        return ("ok", _measure_job(job))
    except AgentError as e:
        return ("error", e.status, e.detail)
    except ConfigError as e:
        return ("error", 400, _text(e))
    except Exception as e:
        if _model_fault(e):
            return ("error", 422, f"The model failed ({type(e).__name__}): {_text(e)}")
        return ("error", 500, f"Agent fault while measuring: {type(e).__name__}: {_text(e)}")


def _measure_job(job: dict[str, Any]) -> dict[str, Any]:
    from presso.bench.runner import input_feed, measure_onnx, ort_session

    path = Path(job["path"])
    data = path.read_bytes()
    _check_onnx(data)
    try:
        session = ort_session(data, max(job["threads"], 1))  # from bytes: no server path in its messages
    except Exception as e:  # ONNX Runtime's own errors: unsupported op, bad types ...
        raise AgentError(422, f"ONNX Runtime cannot load the model: {_text(e)}") from None
    shapes = []
    for i, arg in enumerate(session.get_inputs()):
        given = job["shapes"][i] if job["shapes"] and i < len(job["shapes"]) else None
        if given is None and any(not isinstance(d, int) or d < 0 for d in arg.shape):
            raise AgentError(400, f"Input '{arg.name}' has a dynamic shape {arg.shape}: give input_shape.")
        shapes.append(tuple(given if given is not None else arg.shape))
    _check_elements(shapes, job["limit"])  # before input_feed allocates anything
    feed = input_feed(session, shapes)
    del session
    return measure_onnx(path, feed, threads=job["threads"] or None, **job["run"]).to_json()


def _check_onnx(data: bytes) -> None:
    """Parse and check the upload as ONNX without touching the filesystem beyond it (no external data)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise AgentError(422, f"The upload is not an ONNX model ({type(e).__name__}).") from None
    if not proto.graph.node:
        raise AgentError(422, "The upload parses as ONNX but has an empty graph: not a model.")
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise AgentError(422, "The model references external weight files: export it with weights embedded.")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise AgentError(422, f"The ONNX model fails the checker: {str(e).splitlines()[0][:300]}") from None


def serve(token: str, host: str = "127.0.0.1", port: int = 8765, **options) -> None:
    """Run the agent until SIGTERM or SIGINT, then return (one uvicorn worker: measurements must not share the
    device). ``options``: ``create_app``'s (name, max_upload_mb, measure_timeout, max_input_elements ...)."""
    import uvicorn

    app = create_app(token, **options)
    worker: _Worker = app.state.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # kill the running measurement now; uvicorn then answers the open requests and returns. A requested stop
            # is a clean exit (code 0): unlike uvicorn's own handler, the signal is not raised again afterwards.
            worker.close()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(
        app, host=host, port=port, workers=1, log_level="warning", timeout_graceful_shutdown=10, lifespan="on"
    )
    Server(config).run()
