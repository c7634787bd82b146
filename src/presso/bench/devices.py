"""Named benchmark devices: ``local`` (this machine) and remote agents, kept in ``$PRESSO_HOME/devices.json``.

The registry stores each device's URL and the *path* of its token file, never the token itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from presso.errors import ConfigError, DeviceError, closest

LOCAL = "local"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Device:
    name: str
    url: str
    token_file: str

    def token(self) -> str:
        return read_token(Path(self.token_file))


def registry_path() -> Path:
    from presso.bench.env import presso_home

    return presso_home() / "devices.json"


def read_token(path: Path) -> str:
    try:
        token = path.expanduser().read_text().strip()
    except OSError as e:
        raise DeviceError(
            f"Cannot read token file '{path}': {e.strerror}. Point --token-file at the agent's token."
        ) from None
    if not token:
        raise DeviceError(f"Token file '{path}' is empty.")
    return token


def list_devices() -> list[Device]:
    from presso.safeio import read_json

    path = registry_path()
    if not path.exists():
        return []
    data = read_json(path, "device registry", max_bytes=1 << 20, error=ConfigError)
    try:
        return [Device(**{k: str(v) for k, v in d.items()}) for d in data.get("devices", [])]
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"The device registry '{path}' is damaged ({type(e).__name__}); fix or delete it.") from None


def get_device(name: str) -> Device:
    if name == LOCAL:
        raise ConfigError("'local' is this machine, not a registered device.")
    devices = {d.name: d for d in list_devices()}
    if name not in devices:
        hint = closest(name, [LOCAL, *devices]) or " Add it with: presso devices add NAME URL --token-file FILE."
        raise DeviceError(f"Unknown device '{name}'.{hint}")
    return devices[name]


def add_device(name: str, url: str, token_file: str | Path) -> Device:
    if not _NAME.match(name) or name == LOCAL:
        raise ConfigError(f"Device name '{name}': use letters, digits, '.', '_' or '-' (not 'local').")
    if not re.match(r"^https?://[^\s/]+", url):
        raise ConfigError(f"Device URL '{url}' must look like http://HOST:PORT or https://HOST.")
    token_path = Path(token_file).expanduser().resolve()
    read_token(token_path)  # fail now rather than at the first benchmark
    devices = [d for d in list_devices() if d.name != name]
    device = Device(name, url.rstrip("/"), str(token_path))
    devices.append(device)
    _write({"devices": [asdict(d) for d in sorted(devices, key=lambda d: d.name)]})
    return device


def remove_device(name: str) -> None:
    get_device(name)
    _write({"devices": [asdict(d) for d in list_devices() if d.name != name]})


def _write(data: dict) -> None:
    from presso.bench.env import ensure_home

    ensure_home()  # one clear line when PRESSO_HOME is a file or read-only
    path = registry_path()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".devices-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)  # atomic: a reader never sees half a registry
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
