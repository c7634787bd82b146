"""Where measurements come from: ``PRESSO_HOME``, this machine's CPU, and the fingerprint of a device setup.

The CPU model is read from ``/proc/cpuinfo`` (Linux) or ``platform``: no dependency and no subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from presso.cpu import has_vnni


def presso_home() -> Path:
    """User state (device registry, latency database) lives here: ``$PRESSO_HOME``, default ``~/.presso``."""
    return Path(os.environ.get("PRESSO_HOME") or Path.home() / ".presso").expanduser()


def ensure_home() -> Path:
    """``presso_home()``, created if needed; one ``ConfigError`` saying what to do when it is a file, or cannot be
    created or written (rather than a raw ``FileExistsError`` from whatever first writes there)."""
    from presso.errors import ConfigError

    home = presso_home()
    name = f"PRESSO_HOME '{home}'" if os.environ.get("PRESSO_HOME") else f"Presso's home folder '{home}'"
    fix = "set PRESSO_HOME to a folder you can write (or unset it to use ~/.presso)"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{name} is a file, not a folder (or lies under one); {fix}.") from None
    except OSError as e:
        raise ConfigError(f"{name} cannot be created: {e.strerror or e}; {fix}.") from None
    if not home.is_dir():
        raise ConfigError(f"{name} is not a folder; {fix}.")
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} is not writable; {fix}.")
    return home


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_model() -> str | None:
    """The GPU ONNX Runtime could use, from the NVIDIA driver's proc file; None on CPU-only machines."""
    root = Path("/proc/driver/nvidia/gpus")
    try:
        for info in sorted(root.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(runtime: str, runtime_version: str, threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "gpu": gpu_model(),
        "vnni": has_vnni(),  # INT8 figures depend on it (ONNX Runtime's kernels differ); not part of the fingerprint
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "runtime": runtime,
        "runtime_version": runtime_version,
        "threads": threads,
    }


def device_fingerprint(name: str, env: dict[str, Any], precision: str) -> str:
    """What makes two measurements comparable: device name, CPU/GPU model, runtime and version, threads, precision."""
    key = {
        "name": name,
        "cpu": env.get("cpu"),
        "gpu": env.get("gpu"),
        "runtime": env.get("runtime"),
        "runtime_version": env.get("runtime_version"),
        "threads": env.get("threads"),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


REPORTED_PACKAGES = ("presso", "torch", "torchvision", "timm", "torch-pruning", "safetensors", "onnx", "onnxruntime")


def bug_report() -> dict[str, Any]:
    """Versions and devices of this installation, for bug reports (``presso env``)."""
    import importlib.metadata as md
    import platform

    import torch

    packages = {}
    for name in REPORTED_PACKAGES:
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "vnni": has_vnni(),
        "cuda": torch.cuda.is_available(),
        "packages": packages,
        "presso_home": str(presso_home()),
    }
