"""The latency database: every measurement, keyed by device fingerprint, model graph fingerprint and input shape.

SQLite by default (``$PRESSO_HOME/latency.db``, WAL journal, busy timeout, write transactions taken up front with
``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing); any SQLAlchemy URL (PostgreSQL) for a team.
Rows carry a random ``uid`` so an export imported twice adds nothing the second time.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError, SQLAlchemyError

from presso.bench.results import NOISY_PCT
from presso.errors import ConfigError, DeviceError

metadata = MetaData()
measurements = Table(
    "measurements",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("kind", String(16), nullable=False),  # "model" or "kernel"
    Column("device", String(128), nullable=False),
    Column("device_fp", String(32), nullable=False),
    Column("cpu", String(256)),
    Column("gpu", String(256)),
    Column("runtime", String(32), nullable=False),
    Column("runtime_version", String(32)),
    Column("threads", Integer),
    Column("precision", String(16)),
    Column("model_fp", String(64)),
    Column("model_name", String(512)),
    Column("input_shape", String(256)),
    Column("batch", Integer),
    Column("kernel_key", String(256)),
    Column("features", JSON),
    Column("median_ms", Float, nullable=False),
    Column("p90_ms", Float),
    Column("p99_ms", Float),
    Column("mean_ms", Float),
    Column("std_ms", Float),
    Column("min_ms", Float),
    Column("runs", Integer),
    Column("noise_pct", Float),
    Column("noisy", Boolean),  # noise_pct above NOISY_PCT: a measurement not to trust (added in 0.1: migrated)
    Column("throughput", Float),
    Column("peak_memory_mb", Float),
    Column("model_size_bytes", Integer),
    Column("extra", JSON),
    Index("ix_model_lookup", "device_fp", "model_fp", "input_shape"),
    Index("ix_kernel_lookup", "device_fp", "kind", "kernel_key"),
)
COLUMNS = [c.name for c in measurements.columns if c.name != "id"]
# columns added after the first release: an existing database gains them (ALTER TABLE) instead of being refused
ADDED_COLUMNS = {"noisy": "BOOLEAN"}
_NUMERIC = {c.name: c.type.python_type for c in measurements.columns if isinstance(c.type, (Integer, Float))}


def default_url() -> str:
    from presso.bench.env import presso_home

    return f"sqlite:///{presso_home() / 'latency.db'}"


def _normalize_url(url: str | None) -> str:
    if not url:
        return default_url()
    if "://" not in url:  # a plain path is an SQLite file
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def safe_url(url: str) -> str:
    """``url`` for showing: its password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class LatencyDB:
    """Measurements stored through SQLAlchemy; safe for several processes writing at once."""

    def __init__(self, url: str | None = None):
        self.url = _normalize_url(url)
        sqlite = self.url.startswith("sqlite")
        self.file: Path | None = None
        if sqlite and ":memory:" not in self.url and self.url != "sqlite://":
            self.file = Path(self.url.split(":///", 1)[1])
            _prepare_file(self.file, default=not url)
        try:
            self.engine = create_engine(self.url, connect_args={"timeout": 60} if sqlite else {})
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise ConfigError(
                f"Cannot open latency database '{url}': {e}. Give an SQLAlchemy URL or a file path."
            ) from None
        if sqlite:
            _sqlite_concurrency(self.engine)
        for attempt in range(5):  # two processes creating the schema at once: the loser retries
            try:
                metadata.create_all(self.engine)
                break
            except (OperationalError, ProgrammingError) as e:
                if attempt == 4:
                    raise DeviceError(f"Cannot create the latency database at '{self.url}': {e.orig}") from None
                time.sleep(0.2 * (attempt + 1))
            except DatabaseError as e:  # "file is not a database", "database disk image is malformed"
                raise self._foreign(e) from None
        with self._guard():
            found = {c["name"] for c in inspect(self.engine).get_columns("measurements")}
        if added := [c for c in ADDED_COLUMNS if c not in found and set(COLUMNS) - found <= set(ADDED_COLUMNS)]:
            found |= self._migrate(added)
        if missing := set(COLUMNS) - found:
            raise self._foreign(f"its 'measurements' table lacks {', '.join(sorted(missing)[:3])}")

    def _migrate(self, names: list[str]) -> set[str]:
        """Add the columns a database made by an earlier Presso lacks (another process may be adding them too)."""
        for name in names:
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE measurements ADD COLUMN {name} {ADDED_COLUMNS[name]}")
            except (OperationalError, ProgrammingError):  # "duplicate column": the other process was first
                pass
        with self._guard():
            return {c["name"] for c in inspect(self.engine).get_columns("measurements")}

    def _foreign(self, cause: object) -> DeviceError:
        """The one line for a database Presso cannot use: what it is, and how to start afresh."""
        cause = getattr(cause, "orig", None) or cause
        where = self.file or safe_url(self.url)
        fix = (
            f"move it away (mv '{where}' '{where}.bak') and Presso starts a new one, or give another --db"
            if self.file
            else "point --db at a Presso latency database"
        )
        return DeviceError(f"'{where}' is not a Presso latency database ({cause}); {fix}.")

    @contextlib.contextmanager
    def _guard(self):
        """SQLAlchemy's errors on a damaged or foreign database, as one ``DeviceError`` naming it."""
        try:
            yield
        except DatabaseError as e:
            raise self._foreign(e) from None

    def add(self, row: dict[str, Any]) -> str:
        return self.add_many([row])[0]

    def add_many(self, rows: Iterable[dict[str, Any]]) -> list[str]:
        clean = [_clean(r) for r in rows]
        if clean:
            with self._guard(), self.engine.begin() as conn:
                conn.execute(insert(measurements), clean)
        return [r["uid"] for r in clean]

    def replace_kernels(self, device_fp: str, labels: list[str], rows: list[dict[str, Any]]) -> list[str]:
        """Store the profiled ``rows`` of the kernel models ``labels`` for one device fingerprint, in place of any
        earlier ones (kernel, overhead and network rows), in one transaction: a kernel model is stored whole or not
        at all."""
        clean = [_clean(r) for r in rows]
        with self._guard(), self.engine.begin() as conn:
            if labels:
                conn.execute(
                    delete(measurements).where(
                        measurements.c.device_fp == device_fp,
                        measurements.c.kind.in_(("kernel", "overhead", "network")),
                        measurements.c.model_name.in_(labels),
                    )
                )
            if clean:
                conn.execute(insert(measurements), clean)
        return [r["uid"] for r in clean]

    def rows(
        self,
        *,
        device: str | None = None,
        device_fp: str | None = None,
        kind: str | None = None,
        model_fp: str | None = None,
        input_shape: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        q = select(measurements).order_by(measurements.c.id)
        for col, value in (
            ("device", device),
            ("device_fp", device_fp),
            ("kind", kind),
            ("model_fp", model_fp),
            ("input_shape", input_shape),
        ):
            if value is not None:
                q = q.where(measurements.c[col] == value)
        if limit:
            q = q.limit(limit)
        with self._guard(), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def count(self) -> int:
        from sqlalchemy import func

        with self._guard(), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(measurements)).scalar_one())

    def export(self, path: str | Path, fmt: str | None = None, *, overwrite: bool = False, **filters) -> int:
        """Write the rows (``filters``: as ``rows``) to ``path`` as JSON or CSV (``fmt``, else from the suffix) and
        return how many. An existing file is refused unless ``overwrite``; the file is written beside ``path`` and
        renamed over it when complete, so an interrupted export leaves the old file (or none), never half of one."""
        import presso.outdir as outdir
        from presso.errors import OutputError

        path = Path(path)
        fmt = (fmt or path.suffix.lstrip(".") or "json").lower()
        if fmt not in ("json", "csv"):
            raise ConfigError(f"Export format '{fmt}': use json or csv.")
        if path.is_dir():
            raise OutputError(f"The export '{path}' is a folder: name a file (.json or .csv).")
        if os.path.lexists(path) and not overwrite:
            raise OutputError(
                f"The file '{path}' already exists; pass --overwrite (overwrite=True) to replace it, or export to "
                "another file."
            )
        rows = [{k: r[k] for k in COLUMNS} for r in self.rows(**filters)]
        with outdir.writing_file(path, overwrite=True) as tmp:
            if fmt == "json":
                tmp.write_text(json.dumps({"presso_latency_db": 1, "rows": rows}, indent=1))
            else:
                with tmp.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=COLUMNS)
                    w.writeheader()
                    for r in rows:
                        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
        return len(rows)

    def import_(self, path: str | Path) -> tuple[int, int]:
        """Add the rows of an export (JSON or CSV); rows already present (same uid) are skipped. (added, skipped)"""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"No such file to import: {path}")
        try:
            if path.suffix.lower() == ".csv":
                with path.open(newline="") as f:
                    rows = [_from_csv(r) for r in csv.DictReader(f)]
            else:
                data = json.loads(path.read_text())
                rows = data["rows"] if isinstance(data, dict) else data
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"'{path}' is not a Presso latency export (JSON or CSV): {e}") from None
        with self._guard(), self.engine.connect() as conn:
            known = {u for (u,) in conn.execute(select(measurements.c.uid))}
        fresh = [r for r in rows if r.get("uid") not in known]
        self.add_many(fresh)
        return len(fresh), len(rows) - len(fresh)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ConfigError(f"Unknown latency-database fields: {', '.join(sorted(unknown))}.")
    missing = [k for k in ("kind", "device", "device_fp", "runtime", "median_ms") if row.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"A measurement row lacks {', '.join(missing)}.")
    out = {k: row.get(k) for k in COLUMNS}
    out["uid"] = out["uid"] or uuid.uuid4().hex
    out["created_at"] = out["created_at"] or time.time()
    return out


def _from_csv(r: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in r.items():
        if v == "" or v is None:
            out[k] = None
        elif k in ("features", "extra"):
            out[k] = json.loads(v)
        elif k == "noisy":
            out[k] = v.strip().lower() in ("true", "1")
        elif k in _NUMERIC:
            out[k] = _NUMERIC[k](float(v)) if _NUMERIC[k] is int else float(v)
        else:
            out[k] = v
    return out


def _prepare_file(path: Path, *, default: bool) -> None:
    """The SQLite file's folder exists (PRESSO_HOME checked when it is the default), and the file, if there, is a
    regular file: a folder or a FIFO there gives one clear line instead of SQLite's "unable to open"."""
    if default:
        from presso.bench.env import ensure_home

        ensure_home()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create the folder of the latency database '{path}': {e.strerror or e}.") from None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"Cannot read the latency database '{path}': {e.strerror or e}.") from None
    if not stat.S_ISREG(mode):
        raise DeviceError(
            f"'{path}' is not a Presso latency database (not a regular file); move it away (mv '{path}' "
            f"'{path}.bak') and Presso starts a new one, or give another --db."
        )


def _sqlite_concurrency(engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def measurement_row(
    m,
    *,
    device: str,
    precision: str,
    model_fp: str | None,
    model_name: str | None,
    input_shape: str | None,
    kind: str = "model",
    kernel_key: str | None = None,
    features: dict | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """A database row from a ``Measurement`` (or its JSON)."""
    from presso.bench.env import device_fingerprint

    d = m if isinstance(m, dict) else m.to_json()
    env = d.get("environment") or {}
    return {
        "kind": kind,
        "device": device,
        "device_fp": device_fingerprint(device, env, precision),
        "cpu": env.get("cpu"),
        "gpu": env.get("gpu"),
        "runtime": d["runtime"],
        "runtime_version": d.get("runtime_version"),
        "threads": d.get("threads"),
        "precision": precision,
        "model_fp": model_fp,
        "model_name": model_name,
        "input_shape": input_shape,
        "batch": d.get("batch"),
        "kernel_key": kernel_key,
        "features": features,
        **{
            k: d.get(k)
            for k in (
                "median_ms",
                "p90_ms",
                "p99_ms",
                "mean_ms",
                "std_ms",
                "min_ms",
                "runs",
                "noise_pct",
                "throughput",
                "peak_memory_mb",
                "model_size_bytes",
            )
        },
        "noisy": d.get("noise_pct") is not None and d["noise_pct"] > NOISY_PCT,
        "extra": extra,
    }
