"""Reading files that may come from someone else: regular files only, bounded sizes, bounded JSON nesting.

Every loader of a user-supplied file (model cards, recipes, bundles, dataset annotations) goes through these, so a
card pointing at ``/dev/zero``, a FIFO that never answers, a multi-gigabyte "JSON" or an array nested 100,000 deep
gets one clear line instead of a hang, a memory blow-up or a ``RecursionError`` from deep inside the parser.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from presso.errors import PressoError

MAX_JSON_BYTES = 16 * 2**20  # a card with a long recipe of index lists stays far below this
MAX_JSON_DEPTH = 64  # cards and recipes nest at most ~6 deep


def regular_file(path: str | Path, what: str = "file", *, error: type[PressoError] = PressoError) -> Path:
    """`path` if it is an existing regular file (symlinks followed); else `error` naming it.

    Devices (``/dev/zero``), FIFOs and sockets are refused: reading them never ends or never answers.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"The {what} '{p}' does not exist.") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise error(f"Cannot read the {what} '{p}': {getattr(e, 'strerror', None) or e}.") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket, not a regular file"
        raise error(f"The {what} '{p}' is {kind}; point it at a regular file.")
    return p


def read_bytes(
    path: str | Path, what: str = "file", *, max_bytes: int, error: type[PressoError] = PressoError
) -> bytes:
    """The bytes of a regular file no larger than `max_bytes` (checked before reading, and while reading)."""
    p = regular_file(path, what, error=error)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(
                    f"The {what} '{p}' is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB."
                )
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"Cannot read the {what} '{p}': {e.strerror or e}.") from None
    if len(data) > max_bytes:  # the file grew while being read
        raise error(f"The {what} '{p}' is over the limit of {max_bytes / 2**20:.0f} MiB.")
    return data


def loads_json(
    text: str | bytes,
    what: str = "JSON",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[PressoError] = PressoError,
) -> Any:
    """Parse JSON with a size limit and a nesting limit, both checked before the parser recurses."""
    if len(text) > max_bytes:
        raise error(f"{what} is {len(text) / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB.")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{what} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    depth = _nesting(text)
    if depth > max_depth:
        raise error(f"{what} nests {depth} levels deep (limit {max_depth}); it is not a file Presso wrote.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    except (RecursionError, ValueError) as e:  # ValueError: e.g. integers over Python's digit limit
        raise error(f"{what} cannot be parsed: {str(e)[:200]}.") from None


def read_json(
    path: str | Path,
    what: str = "JSON file",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[PressoError] = PressoError,
) -> Any:
    """`loads_json` of a regular file, named in every message."""
    data = read_bytes(path, what, max_bytes=max_bytes, error=error)
    return loads_json(data, f"The {what} '{path}'", max_bytes=max_bytes, max_depth=max_depth, error=error)


def _nesting(text: str) -> int:
    """Deepest bracket nesting outside strings: a linear scan, so hostile depth never reaches the recursive parser."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


__all__ = ["regular_file", "read_bytes", "loads_json", "read_json", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]
