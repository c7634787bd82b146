"""`presso db export FILE` never replaces a file silently, and never leaves half of one (issue 19 item 2)."""

import errno
import json
from pathlib import Path

import pytest

from presso.bench.latency_db import LatencyDB
from presso.cli import app
from presso.errors import OutputError
from presso.outdir import is_presso_sibling

from ._helpers import ok_json, runner


def _db(tmp_path) -> str:
    url = str(tmp_path / "lat.db")
    LatencyDB(url).add_many(
        [
            {"kind": "model", "device": "dev", "device_fp": "fp", "runtime": "onnxruntime", "median_ms": 1.0 + i}
            for i in range(3)
        ]  # fmt: skip
    )
    return url


def _siblings(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if is_presso_sibling(p.name)]


@pytest.mark.parametrize("name", ["farm.json", "farm.csv"])
def test_an_existing_file_is_refused_unless_overwrite(tmp_path, name):
    db = _db(tmp_path)
    out = tmp_path / name
    out.write_text("the user's own file\n")
    r = runner.invoke(app, ["db", "export", str(out), "--db", db])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0], r.output
    assert out.read_text() == "the user's own file\n"

    assert ok_json(runner.invoke(app, ["db", "export", str(out), "--db", db, "--overwrite", "--json"]))["exported"] == 3
    assert LatencyDB(str(tmp_path / "again.db")).import_(out) == (3, 0)  # a whole export replaced it
    assert _siblings(tmp_path) == []


def test_the_library_refuses_too_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    store = LatencyDB(_db(tmp_path))
    out = tmp_path / "farm.json"
    assert store.export(out) == 3
    before = out.read_bytes()
    with pytest.raises(OutputError, match=r"'.*farm.json' already exists; pass --overwrite \(overwrite=True\)"):
        store.export(out)
    with pytest.raises(OutputError, match="is a folder"):
        store.export(tmp_path)

    real = Path.write_text

    def full(self, text, *args, **kwargs):  # the disk fills half-way through the new export
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match="No space left on device.*Nothing was replaced"):
        store.export(out, overwrite=True)
    assert out.read_bytes() == before and _siblings(tmp_path) == []
    monkeypatch.undo()
    assert store.export(out, device="nobody", overwrite=True) == 0  # replaced, as asked
    assert json.loads(out.read_text())["rows"] == [] and _siblings(tmp_path) == []
