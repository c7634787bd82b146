"""Client of a remote benchmark agent (``presso agent serve``): upload an ONNX model, get a measurement back.

The wire protocol (``presso.bench.agent``): ``POST /benchmark`` with the parameters in the query string and the model
as the raw body (application/octet-stream); ``GET /info``. Each refusal becomes one DeviceError line saying why.
"""

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

        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            r = httpx.request(method, self.url + path, headers=headers, timeout=self.timeout, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise DeviceError(
                f"Device '{self.name}' at {self.url} is unreachable: {e}. Is 'presso agent serve' running there?"
            ) from None
        except httpx.TimeoutException:
            raise DeviceError(f"Device '{self.name}' did not answer within {self.timeout:g} s.") from None
        except httpx.HTTPError as e:
            raise _Dropped(str(e) or type(e).__name__) from None
        if r.status_code >= 400:
            raise DeviceError(self._refusal(r))
        return r.json()

    def _refusal(self, r) -> str:
        """One line for an error answer of the agent."""
        try:
            detail = r.json().get("detail", r.text)
        except (ValueError, AttributeError):
            detail = r.text
        detail, who, code = str(detail)[:500], f"Device '{self.name}'", r.status_code
        if code == 401:
            return f"{who} refused the token (401): check the device's --token-file."
        if code == 408:
            return f"{who} stopped the measurement at its time limit (408): {detail}"
        if code == 413:
            return f"{who} refused the model as too large (413): {detail}"
        if code == 422:
            return f"{who} cannot run this model (422): {detail}"
        if code == 429:
            wait = r.headers.get("retry-after", "a while")
            return (
                f"{who} refuses this address after repeated wrong tokens (429): retry in {wait} s, with the token of "
                "the device's --token-file."
            )
        return f"{who} answered {code}: {detail}"

    def info(self) -> dict[str, Any]:
        try:
            return self._request("GET", "/info")
        except _Dropped as e:
            raise DeviceError(f"Device '{self.name}' at {self.url} dropped the connection: {e}") from None

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
        params = {
            "runtime": runtime,
            "threads": str(threads or 0),
            "warmup": str(warmup),
            "repeat": str(repeat),
            "max_seconds": str(max_seconds),
            "profile": str(bool(profile)).lower(),
            "profile_top": str(profile_top),
            "input_shape": input_shape or "",
        }
        headers = {"Content-Type": "application/octet-stream"}
        try:
            return self._request("POST", "/benchmark", params=params, content=data, headers=headers)
        except _Dropped as e:
            # the agent may answer (401, 413, 429) and close before the upload ends; the answer can then be lost
            # with the connection, so ask /info what it would have said
            info = self.info()
            limit = info.get("max_upload_mb")
            if limit and len(data) > limit * 2**20:
                raise DeviceError(
                    f"Device '{self.name}' refused the model as too large (413): {len(data) / 2**20:.1f} MiB, over "
                    f"its limit of {limit:g} MiB (presso agent serve --max-upload-mb)."
                ) from None
            raise DeviceError(
                f"Device '{self.name}' at {self.url} dropped the connection during the upload: {e}"
            ) from None


class _Dropped(Exception):
    """The connection broke after it was made (not an answer)."""
