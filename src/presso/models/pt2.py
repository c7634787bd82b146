"""Opening a ``torch.export`` archive (``.pt2``) without running code from it.

``torch.export.load`` unpickles in several places: tensors saved with ``use_pickle``, custom and opaque constants,
and the sample inputs, where a failed weights-only load is retried with ``weights_only=False`` (torch 2.14,
``torch._export.serde.serialize.deserialize_torch_artifact``); an archive it cannot read as the current format is
retried as the legacy format, whose parts are unpickled too. No flag turns this off, so before handing an untrusted
file to torch we read the archive ourselves -- as a zip, reading only names, JSON configs and the sample inputs --
and refuse it whenever torch would reach one of those paths:

- every member must belong to the current pt2 layout (no legacy ``serialized_*`` members, no AOTInductor or
  ExecuTorch payloads, which are native code);
- every weight and constant config entry must be raw bytes (``use_pickle: false``), and no constant may be a custom
  or opaque object;
- the sample inputs must load with ``torch.load(weights_only=True)``, so the fallback never runs.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from presso.errors import ModelSourceError, UntrustedFileError
from presso.safeio import MAX_JSON_BYTES, loads_json

# Members of a current-format archive, below its root folder (torch.export.pt2_archive.constants).
_ALLOWED_PREFIXES = ("data/weights/", "data/constants/", "data/sample_inputs/", "models/", "extra/", ".data/")
_ALLOWED_FILES = {"archive_format", "archive_version", "byteorder", "version"}
_MAX_SAMPLE_INPUTS = 256 * 2**20


def check_pt2(path: str | Path) -> None:
    """Raise UntrustedFileError if loading `path` with ``torch.export.load`` could unpickle; ModelSourceError if it
    is not a pt2 archive at all."""
    path = Path(path)
    why = _unsafe_part(path)
    if why:
        raise UntrustedFileError(
            f"'{path}' holds {why}: torch.export.load would unpickle it, which runs code from the file. Pass --trust "
            "(trust=True in Python) only if you trust where it came from; otherwise re-export it with "
            "torch.export.save from plain tensors."
        )


def _unsafe_part(path: Path) -> str | None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelSourceError(f"'{path}' is not a torch.export (.pt2) archive ({type(e).__name__}).") from None
    with zf:
        names = zf.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            return "members outside one archive folder (not the current pt2 layout)"
        root = roots.pop() + "/"
        if root + "archive_format" not in names:
            return "a legacy-format program (its parts are pickles)"
        for name in names:
            rel = name[len(root) :]
            if rel in _ALLOWED_FILES or rel.endswith("/"):
                continue
            if not rel.startswith(_ALLOWED_PREFIXES) or ".." in rel.split("/"):
                return f"the member '{rel}', which is not part of a plain exported program"
        for name in names:
            rel = name[len(root) :]
            if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith("_config.json"):
                why = _pickled_payloads(zf, name, rel)
                if why:
                    return why
        for name in names:
            if name[len(root) :].startswith("data/sample_inputs/"):
                if not _weights_only_loads(zf, name):
                    return f"sample inputs ('{name[len(root) :]}') that are not plain tensors"
    return None


def _pickled_payloads(zf: zipfile.ZipFile, name: str, rel: str) -> str | None:
    info = zf.getinfo(name)
    if info.file_size > MAX_JSON_BYTES:
        return f"an oversized config '{rel}'"
    config = loads_json(zf.read(name), f"'{rel}'", error=ModelSourceError)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return f"a config '{rel}' that is not the pt2 layout"
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            return f"a pickled tensor or object ('{fqn}')"
        path_name = str(meta.get("path_name", ""))
        if path_name.startswith(("custom_obj_", "opaque_obj_")):
            return f"a pickled constant object ('{fqn}')"
    return None


def _weights_only_loads(zf: zipfile.ZipFile, name: str) -> bool:
    import torch

    if zf.getinfo(name).file_size > _MAX_SAMPLE_INPUTS:
        return False
    try:
        torch.load(io.BytesIO(zf.read(name)), weights_only=True)
    except Exception:  # the safe loader refused it: torch itself would now retry with a full unpickle
        return False
    return True


__all__ = ["check_pt2"]
