"""The latency database: concurrent writers lose nothing; export/import round-trips and is idempotent."""

import json
import multiprocessing as mp

import pytest

from presso.bench.latency_db import LatencyDB
from presso.errors import ConfigError

ROWS_PER_WRITER = 150


def _row(i: int, writer: int) -> dict:
    return {
        "kind": "model",
        "device": f"dev-{writer}",
        "device_fp": f"fp{writer}",
        "runtime": "onnxruntime",
        "threads": 1,
        "precision": "fp32",
        "model_fp": f"m{i % 7}",
        "input_shape": "1,3,8,8",
        "median_ms": 1.0 + i / 1000,
        "p90_ms": 2.0,
        "features": {"i": i, "writer": writer},
    }


def _writer(url: str, writer: int, start, batch: int) -> None:
    db = LatencyDB(url)
    start.wait()  # both processes begin writing at the same moment
    rows = [_row(i, writer) for i in range(ROWS_PER_WRITER)]
    for k in range(0, len(rows), batch):  # many small transactions, interleaved with the other process
        db.add_many(rows[k : k + batch])


@pytest.mark.parametrize("batch", [1, 10])
def test_two_processes_writing_at_once_lose_nothing(tmp_path, batch):
    url = f"sqlite:///{tmp_path / 'lat.db'}"
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, w, start, batch)) for w in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    db = LatencyDB(url)
    rows = db.rows()
    assert len(rows) == 2 * ROWS_PER_WRITER
    assert len({r["uid"] for r in rows}) == len(rows)
    for w in (1, 2):
        mine = sorted(r["features"]["i"] for r in rows if r["device"] == f"dev-{w}")
        assert mine == list(range(ROWS_PER_WRITER))
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_import_round_trip(tmp_path, fmt):
    src = LatencyDB(str(tmp_path / "a.db"))  # a plain path is an SQLite file
    src.add_many([_row(i, 1) for i in range(5)] + [{**_row(9, 2), "kind": "kernel", "kernel_key": "nchwc.Conv/pw"}])
    out = tmp_path / f"farm.{fmt}"
    assert src.export(out) == 6
    dst = LatencyDB(f"sqlite:///{tmp_path / 'b.db'}")
    assert dst.import_(out) == (6, 0)
    assert dst.import_(out) == (0, 6)  # idempotent: rows are known by uid
    a = sorted(src.rows(), key=lambda r: r["uid"])
    b = sorted(dst.rows(), key=lambda r: r["uid"])
    for ra, rb in zip(a, b, strict=True):
        for k in ("uid", "kind", "device", "device_fp", "median_ms", "features", "threads", "kernel_key"):
            assert ra[k] == rb[k], k
    assert src.export(tmp_path / "only.json", device="dev-2") == 1
    assert len(json.loads((tmp_path / "only.json").read_text())["rows"]) == 1


def test_bad_rows_and_files_are_named(tmp_path):
    db = LatencyDB(str(tmp_path / "c.db"))
    with pytest.raises(ConfigError, match="lacks median_ms"):
        db.add({"kind": "model", "device": "d", "device_fp": "f", "runtime": "onnxruntime"})
    with pytest.raises(ConfigError, match="Unknown latency-database fields: colour"):
        db.add({**_row(0, 1), "colour": "red"})
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a Presso latency export"):
        db.import_(tmp_path / "junk.json")


def test_a_database_from_before_the_noisy_flag_is_migrated_in_place(tmp_path):
    """A database an earlier Presso made (no ``noisy`` column) keeps its rows and gains the column on opening."""
    import sqlalchemy as sa

    from presso.bench.latency_db import measurements

    path = tmp_path / "old.db"
    old = sa.MetaData()
    columns = [sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in measurements.columns]
    sa.Table("measurements", old, *[c for c in columns if c.name != "noisy"])
    engine = sa.create_engine(f"sqlite:///{path}")
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(old.tables["measurements"].insert(), [{**_row(0, 1), "uid": "old-row", "created_at": 1.0}])
    engine.dispose()

    db = LatencyDB(str(path))
    assert [(r["uid"], r["noisy"]) for r in db.rows()] == [("old-row", None)]
    db.add({**_row(1, 1), "noise_pct": 311.0, "noisy": True})
    again = LatencyDB(str(path))  # opening it a second time migrates nothing more
    assert sorted((r["uid"] == "old-row", r["noisy"]) for r in again.rows()) == [(False, True), (True, None)]
    out = tmp_path / "rows.csv"
    again.export(out)
    fresh = LatencyDB(str(tmp_path / "fresh.db"))
    fresh.import_(out)
    assert sorted(str(r["noisy"]) for r in fresh.rows()) == ["None", "True"]  # the flag survives CSV


def test_a_noisy_measurement_is_flagged_in_its_row():
    from presso.bench.latency_db import measurement_row
    from presso.bench.results import NOISY_PCT

    base = {"runtime": "onnxruntime", "median_ms": 1.0, "environment": {"cpu": "x", "threads": 1}}
    quiet = measurement_row({**base, "noise_pct": NOISY_PCT / 4}, device="local", precision="fp32", model_fp="m",
                            model_name="m", input_shape="1,3,8,8")  # fmt: skip
    noisy = measurement_row({**base, "noise_pct": 311.0}, device="local", precision="fp32", model_fp="m",
                            model_name="m", input_shape="1,3,8,8")  # fmt: skip
    assert quiet["noisy"] is False and noisy["noisy"] is True
