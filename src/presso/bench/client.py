"""Client of a remote benchmark agent (``presso agent serve``): upload an ONNX model, get a measurement back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from presso.errors import DeviceError


class AgentClient:
    def __init__(self, url: str, token: str, *, name: str = "remote", timeout: float = 600.0):
        self.url, self.name = url.rstrip("/"), name
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout

    @classmethod
    def for_device(cls, name: str) -> AgentClient:
        from presso.bench.devices import get_device

        d = get_device(name)
        return cls(d.url, d.token(), name=name)

    def _request(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        import httpx

        try:
            r = httpx.request(method, self.url + path, headers=self._headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as e:
            raise DeviceError(
                f"Device '{self.name}' at {self.url} is unreachable: {e}. Is 'presso agent serve' running there?"
            ) from None
        if r.status_code == 401:
            raise DeviceError(f"Device '{self.name}' refused the token (401): check the device's --token-file.")
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise DeviceError(f"Device '{self.name}' answered {r.status_code}: {str(detail)[:500]}")
        return r.json()

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/info")

    def benchmark(
        self,
        model: str | Path | bytes,
        *,
        runtime: str = "onnxruntime",
        threads: int | None = None,
        warmup: int = 10,
        repeat: int = 50,
        max_seconds: float = 30.0,
        profile: bool = False,
        profile_top: int = 15,
        input_shape: str | None = None,
    ) -> dict[str, Any]:
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        form = {
            "runtime": runtime,
            "threads": str(threads or 0),
            "warmup": str(warmup),
            "repeat": str(repeat),
            "max_seconds": str(max_seconds),
            "profile": str(bool(profile)).lower(),
            "profile_top": str(profile_top),
            "input_shape": input_shape or "",
        }
        files = {"model": ("model.onnx", data, "application/octet-stream")}
        return self._request("POST", "/benchmark", data=form, files=files)
