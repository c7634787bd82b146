import secrets
import socket
import threading
import time

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private PRESSO_HOME: device registry and latency database live here."""
    path = tmp_path / "presso-home"
    monkeypatch.setenv("PRESSO_HOME", str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent(tmp_path):
    """A real agent (uvicorn + FastAPI) on 127.0.0.1, in a thread of the test process."""
    import uvicorn

    from presso.bench.agent import create_app

    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "agent.token"
    token_file.write_text(token + "\n")
    port = _free_port()
    config = uvicorn.Config(
        create_app(token, name="test-agent", max_upload_mb=2), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the agent did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "token": token, "token_file": token_file}
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def tiny_onnx():
    """Builds a small real model exported through the project's ONNX path; returns the file."""
    return _tiny_onnx


def _tiny_onnx(path, width: int = 8, size: int = 16):
    import torch
    from torch import nn

    from presso.models.onnx import export_onnx

    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )
    return export_onnx(model.eval(), (torch.randn(1, 3, size, size),), path)
