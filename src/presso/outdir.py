"""The one output rule of every verb that writes (compress, train, convert, package, run).

- A verb writes into a hidden temporary sibling of its output, ``.NAME.presso-tmp-PID-XXXXXX``, and renames it into
  place when it is complete; an error or Ctrl-C removes it (``finally``).
- A non-empty output is refused (one line: the folder, what it holds, the two ways out) unless it is the verb's own
  resumable state (``presso run``'s stage folders) or ``overwrite`` is given. A finished earlier output is user data
  too: a trained model is never replaced silently.
- With ``overwrite``, the old output is renamed to ``.NAME.presso-old-PID-XXXXXX`` and deleted only once the new one
  is in place: a crash in between leaves one of them complete, and the next write of that output puts a stranded
  old copy back.
- The model a verb reads is never its output, even with ``overwrite``.
- Siblings left by a killed run (``kill -9``: no ``finally``) are removed by the next write of the same output, and
  only those named as above whose process is gone.
- A full, read-only or forbidden disk (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) is one ``OutputError`` line, and the old
  output is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from presso.errors import OutputError

TMP, OLD = "tmp", "old"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.presso-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{6}$")
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_HINTS = {
    errno.ENOSPC: "free some space or choose another output (-o)",
    errno.EDQUOT: "free some space or choose another output (-o)",
    errno.EROFS: "the disk is read-only: choose another output (-o)",
}
WAYS_OUT = "choose another output (-o), or pass --overwrite (overwrite=True) to replace it"


# ----------------------------------------------------------------------------- names
def _named(target: str | Path) -> Path:
    """`target` with a name of its own (``.`` and ``..`` become absolute paths)."""
    p = Path(target)
    return p if p.name not in ("", ".", "..") else Path(os.path.abspath(p))


def sibling(target: str | Path, kind: str) -> Path:
    """A new hidden sibling of `target` named as Presso's, with this process's id: ``.NAME.presso-KIND-PID-XXXXXX``."""
    target = _named(target)
    return target.with_name(f".{target.name}.presso-{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def is_presso_sibling(name: str) -> bool:
    return _SIBLING.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: not ours to judge
    return True


def clean_stale(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of `target` whose process is gone, and put back an old copy stranded by a crash
    between its two renames (`target` missing, its ``presso-old`` copy whole). Returns what was removed."""
    target = _named(target)
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in sorted(entries, key=lambda e: e.name):
        m = _SIBLING.match(p.name)
        if m is None or m["name"] != target.name or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if m["kind"] == OLD and not os.path.lexists(target):
                os.rename(p, target)  # the new copy never arrived: the old one is the output again
                continue
            _remove(p)
            removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the checks
def holds(path: str | Path, shown: int = 2) -> str:
    """What a folder holds, in a few words: ``holds notes.txt, images/ and 2 more``."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "is a broken link"
    if not path.is_dir():
        return "is a file"
    names = sorted(f"{e.name}/" if e.is_dir() else e.name for e in path.iterdir())
    if len(names) > shown:
        return f"holds {', '.join(names[:shown])} and {len(names) - shown} more"
    return "holds " + (f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else "".join(names))


def is_empty_dir(path: str | Path) -> bool:
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    with os.scandir(path) as it:
        return next(it, None) is None


def _resolved(p: str | Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def check_source(target: str | Path, sources: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, or contains, a model being read: replacing it would destroy the input."""
    out = _resolved(target)
    for src in sources:
        if not src:
            continue
        s = _resolved(src)
        if s == out or out in s.parents:
            raise OutputError(
                f"The output '{target}' would replace the model being read ('{src}'); Presso never replaces its "
                "input, even with --overwrite: choose another output (-o)."
            )


def cli_sources(source: str | None) -> list[Path]:
    """The files or folders a command-line model source names (``DIR``, ``file.pt2``, ``file.py:FACTORY``)."""
    if not source:
        return []
    out = [Path(source)] if os.path.lexists(source) else []
    prefix, sep, _ = str(source).rpartition(":")
    if sep and prefix.endswith(".py") and os.path.lexists(prefix):
        out.append(Path(prefix))
    return out


def holding_only(names: Iterable[str]) -> Callable[[Path], bool]:
    """A `resumable` test: the folder holds only these names (and Presso's temporary siblings)."""
    allowed = set(names)
    return lambda path: all(p.name in allowed or is_presso_sibling(p.name) for p in Path(path).iterdir())


def check(
    target: str | Path,
    *,
    overwrite: bool = False,
    sources: Iterable[str | Path | None] = (),
    resumable: Callable[[Path], bool] | None = None,
    what: str = "folder",
) -> None:
    """Raise ``OutputError`` unless `target` may be written: absent, an empty folder, the verb's own resumable state
    (`resumable` says so), or anything else with `overwrite` -- never a model being read (`sources`). Cleans the
    stale temporary siblings of `target` first."""
    target = _named(target)
    check_source(target, sources)
    clean_stale(target)
    if not os.path.lexists(target) or is_empty_dir(target):
        return
    if what == "folder" and target.is_dir() and resumable is not None and resumable(target):
        return
    if what == "file" and target.is_dir() and not target.is_symlink():
        raise OutputError(f"The output '{target}' is a folder, not a file: {WAYS_OUT.split(',')[0]}.")
    if not overwrite:
        if what == "file":
            raise OutputError(f"The file '{target}' already exists and is not this command's output; {WAYS_OUT}.")
        noun = "output folder" if target.is_dir() else "output"
        raise OutputError(f"The {noun} '{target}' already exists and {holds(target)}; {WAYS_OUT}.")


def disk_error(e: OSError, target: str | Path) -> OutputError:
    """One line for a write the disk refused; the old output is untouched."""
    hint = _HINTS.get(e.errno or 0, "no permission: choose another output (-o)")
    where = f" ({e.filename})" if e.filename else ""
    return OutputError(f"Cannot write the output '{target}': {e.strerror or e}{where}; {hint}. Nothing was replaced.")


# ----------------------------------------------------------------------------- the writes
def put_in_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`; an existing `target` goes to a ``presso-old`` sibling first, deleted
    only once `tmp` is in place (if the second rename fails, the old one is put back)."""
    if not os.path.lexists(target) or is_empty_dir(target):
        os.replace(tmp, target)  # replaces an empty folder (or nothing) in one step
        return
    if tmp.is_file() and not target.is_dir():
        os.replace(tmp, target)  # a file replaces a file atomically: old or new, never neither
        return
    old = sibling(target, OLD)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


@contextlib.contextmanager
def writing(
    target: str | Path,
    *,
    overwrite: bool = False,
    sources: Iterable[str | Path | None] = (),
    resumable: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """The folder to write the output `target` into: a fresh temporary sibling, renamed into place when the block ends
    without error, and removed whatever happens.

    resumable: for a verb whose output folder is its own resumable state (``presso run``): when `target` is absent,
        empty or such state, `target` itself is yielded (created) and written in place; the verb keeps each of its
        own steps atomic.
    """
    target = _named(target)
    sources = list(sources)
    check(target, overwrite=overwrite, sources=sources, resumable=resumable)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        own = target.is_dir() and resumable is not None and resumable(target)
        if resumable is not None and (not os.path.lexists(target) or is_empty_dir(target) or own):
            target.mkdir(exist_ok=True)
            yield target
            return
        tmp = sibling(target, TMP)
        tmp.mkdir()
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise disk_error(e, target) from None
        raise
    try:
        yield tmp
        check(target, overwrite=overwrite, sources=sources)  # something may have appeared there meanwhile
        put_in_place(tmp, target)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise disk_error(e, target) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            _remove(tmp)


@contextlib.contextmanager
def writing_file(
    target: str | Path, *, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """The path to write the file `target` to: a temporary sibling in the same folder, renamed over `target` (one
    atomic step) when the block ends without error, and removed whatever happens. An existing `target` is replaced
    only if `replaceable` says it is this verb's own kind of file, or with `overwrite`."""
    target = _named(target)
    check(target, overwrite=overwrite or (replaceable is not None and _replaceable(replaceable, target)), what="file")
    tmp = sibling(target, TMP)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise disk_error(e, target) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _replaceable(replaceable: Callable[[Path], bool], target: Path) -> bool:
    try:
        return target.is_file() and bool(replaceable(target))
    except Exception:
        return False


@contextlib.contextmanager
def scratch(target: str | Path) -> Iterator[Path]:
    """A temporary working folder beside `target`, named as Presso's (so a killed run's copy is cleaned by the next
    write of `target`), removed when the block ends."""
    tmp = sibling(target, TMP)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise (disk_error(e, target) if e.errno in DISK_ERRORS else e) from None
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            _remove(tmp)


__all__ = [
    "check",
    "check_source",
    "clean_stale",
    "cli_sources",
    "disk_error",
    "holding_only",
    "holds",
    "is_presso_sibling",
    "put_in_place",
    "scratch",
    "sibling",
    "writing",
    "writing_file",
]
