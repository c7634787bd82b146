"""What this CPU can do that changes how INT8 must be built: no dependency, no subprocess, no torch.

On the ground floor because the quantizer (``convert``), QAT (``models.qat``) and the measurement records
(``bench.env``) all ask it, and the predictor bundle's side of the project must stay importable without torch.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# x86 flags for 8-bit dot products that accumulate in int32 (no int16 intermediate to saturate)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI 8-bit dot products; None off x86 or when unknown.

    Without them ONNX Runtime's uint8 x int8 kernels (vpmaddubsw) sum pairs in int16 and saturate on full-range
    weights, which is why INT8 weights are kept to -64..64 there (``reduce_range``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(f in value.split() for f in VNNI_FLAGS)
    return None
