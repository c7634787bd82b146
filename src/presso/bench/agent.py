"""The benchmark agent: a small authenticated HTTP server (FastAPI + uvicorn) that runs on a device.

It accepts an uploaded ONNX model, checks it (size limit, parses as ONNX, passes the checker, weights embedded,
an ONNX Runtime session can be built), benchmarks it with the device's own runtimes and returns the same JSON as a
local ``presso benchmark``. Every request needs ``Authorization: Bearer TOKEN`` (compared in constant time).
Measurements never overlap: one lock serializes them, the others wait in line. A bad upload is answered with a 4xx
and a message; the server keeps serving.
"""

from __future__ import annotations

import hmac
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from presso.errors import ConfigError, PressoError

DEFAULT_MAX_UPLOAD_MB = 512
CHUNK = 1 << 20


class _Queue:
    """Serializes measurements; counts who is waiting (reported by /info)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = 0
        self.done = 0
        self._count = threading.Lock()

    def __enter__(self):
        with self._count:
            self.waiting += 1
        self.lock.acquire()
        with self._count:
            self.waiting -= 1
        return self

    def __exit__(self, *exc):
        self.done += 1
        self.lock.release()


def create_app(
    token: str, *, name: str = "agent", max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_seconds_cap: float = 120.0
) -> FastAPI:
    """The agent's ASGI app. ``token``: the bearer token clients must send."""
    if not token or len(token) < 16:
        raise ConfigError(
            "The agent's token must be at least 16 characters (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))' > token)."
        )
    app = FastAPI(title="presso agent", docs_url=None, redoc_url=None, openapi_url=None)
    queue = _Queue()
    limit = int(max_upload_mb * 2**20)
    expected = token.encode()

    def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "Missing or wrong bearer token.", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(PressoError)
    async def _presso_error(_request, exc: PressoError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.get("/info", dependencies=[Depends(auth)])
    def info() -> dict[str, Any]:
        import onnxruntime as ort

        from presso.bench.env import cpu_cores, environment

        return {
            "device": name,
            "environment": environment("onnxruntime", ort.__version__, cpu_cores()),
            "runtimes": _runtimes(),
            "max_upload_mb": max_upload_mb,
            "queue": {"waiting": queue.waiting, "done": queue.done},
        }

    @app.post("/benchmark", dependencies=[Depends(auth)])
    def benchmark(
        model: Annotated[UploadFile, File(description="an ONNX model, weights embedded")],
        runtime: Annotated[str, Form()] = "onnxruntime",
        threads: Annotated[int, Form()] = 0,
        warmup: Annotated[int, Form()] = 10,
        repeat: Annotated[int, Form()] = 50,
        max_seconds: Annotated[float, Form()] = 30.0,
        profile: Annotated[bool, Form()] = False,
        profile_top: Annotated[int, Form()] = 15,
        input_shape: Annotated[str, Form()] = "",
    ) -> dict[str, Any]:
        from presso.bench.runner import RUNTIMES, measure_onnx

        if runtime not in RUNTIMES or runtime == "torch":
            raise HTTPException(
                400, f"Runtime '{runtime}' cannot run an uploaded ONNX file: use onnxruntime or openvino."
            )
        if not (0 <= threads <= 1024 and 0 <= warmup <= 10_000 and 1 <= repeat <= 100_000):
            raise HTTPException(400, "threads, warmup or repeat out of range.")
        data = _read_limited(model, limit)
        _check_onnx(data)
        shapes = _parse_shapes(input_shape)
        with tempfile.TemporaryDirectory(prefix="presso-agent-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(data)
            feed = _feed(path, shapes, threads)
            with queue:
                started = time.time()
                m = measure_onnx(
                    path,
                    feed,
                    threads=threads or None,
                    warmup=warmup,
                    repeat=repeat,
                    max_seconds=min(max_seconds, max_seconds_cap),
                    runtime=runtime,
                    profile=profile,
                    profile_top=profile_top,
                )
                finished = time.time()
        return {**m.to_json(), "device": name, "agent": {"started": started, "finished": finished}}

    return app


def _runtimes() -> list[str]:
    import importlib.util

    return ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        chunk = upload.file.read(CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"Model larger than this agent's limit of {limit / 2**20:.0f} MiB.")
        chunks.append(chunk)
    if not size:
        raise HTTPException(400, "Empty upload: send the ONNX model as the 'model' file field.")
    return b"".join(chunks)


def _check_onnx(data: bytes) -> None:
    """Parse and check the upload as ONNX without touching the filesystem beyond it (no external data)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise HTTPException(422, f"The upload is not an ONNX model ({type(e).__name__}).") from None
    if not proto.graph.node:
        raise HTTPException(422, "The upload parses as ONNX but has an empty graph: not a model.")
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise HTTPException(422, "The model references external weight files: export it with weights embedded.")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise HTTPException(422, f"The ONNX model fails the checker: {str(e).splitlines()[0][:300]}") from None


def _parse_shapes(text: str) -> list[tuple[int, ...]] | None:
    if not text.strip():
        return None
    from presso.models.spec import InputSpec

    try:
        return [t.shape for t in InputSpec.parse(text).tensors]
    except PressoError as e:
        raise HTTPException(400, str(e)) from None


def _feed(path: Path, shapes, threads: int):
    from presso.bench.runner import input_feed, ort_session

    try:
        session = ort_session(path, max(threads, 1))
    except Exception as e:  # ONNX Runtime's own errors: unsupported op, bad types ...
        raise HTTPException(422, f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from None
    try:
        return input_feed(session, shapes)
    except ConfigError as e:
        raise HTTPException(400, str(e)) from None


def serve(
    token: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    name: str = "agent",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
) -> None:
    """Run the agent until interrupted (one uvicorn worker: measurements must not share the device)."""
    import uvicorn

    uvicorn.run(
        create_app(token, name=name, max_upload_mb=max_upload_mb), host=host, port=port, workers=1, log_level="warning"
    )
