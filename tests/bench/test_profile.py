"""Device profiling resumes: every kernel model is stored as it is timed, and a rerun times only the missing ones."""

import json
from collections import Counter

import pytest

import presso
from presso.bench import calibration, networks, profile
from presso.bench.calibration import Spec
from presso.bench.latency_db import LatencyDB

SPECS = [
    Spec("chain", {"length": 2}),
    Spec("conv", dict(cin=8, cout=8, h=8, k=3, s=1, group=1, act="Relu", residual=False)),
    Spec("conv", dict(cin=8, cout=16, h=8, k=1, s=1, group=1, act="", residual=False)),
    Spec("gemm", dict(m=1, k=16, n=8, act="")),
    Spec("gap", dict(c=8, h=8)),
    Spec("eltwise", dict(op="Relu", c=8, h=8)),
]


@pytest.fixture
def timed(monkeypatch):
    """Counts every kernel model timed (by label); ``stop_after`` raises Ctrl-C once that many were timed."""
    state = {"count": Counter(), "stop_after": None}
    real = profile.time_spec

    def time_spec(measure, spec):
        if state["stop_after"] is not None and sum(state["count"].values()) >= state["stop_after"]:
            raise KeyboardInterrupt
        state["count"][spec.label()] += 1
        return real(measure, spec)

    monkeypatch.setattr(profile, "time_spec", time_spec)
    return state


def _labels(db: str) -> Counter:
    """Kernel models stored, counted once per kernel model (its rows share its label)."""
    rows = LatencyDB(db).rows()
    return Counter(r["model_name"] for r in rows if r["kind"] in ("kernel", "overhead"))


def test_an_interrupted_profile_resumes_without_timing_any_kernel_twice(home, tmp_path, timed):
    whole = str(tmp_path / "whole.db")
    reference = presso.profile_device(threads=1, runs=3, specs=SPECS, quiet=False, db=whole)
    timed["count"].clear()

    db = str(tmp_path / "resumed.db")
    timed["stop_after"] = 4
    with pytest.raises(KeyboardInterrupt):
        presso.profile_device(threads=1, runs=3, specs=SPECS, quiet=False, db=db)
    first = dict(timed["count"])
    assert sum(first.values()) == 4 and set(_labels(db)) == set(first)  # what was timed is stored, nothing else

    timed["stop_after"] = None
    events = []
    again = presso.profile_device(threads=1, runs=3, specs=SPECS, quiet=False, db=db, progress=events.append)
    assert max(timed["count"].values()) == 1  # no kernel model timed twice across the two runs
    assert sum(timed["count"].values()) == len(SPECS)
    assert again.resumed == 4 and events[0].done == 4 and events[-1].done == events[-1].total == len(SPECS)
    # the same rows as an uninterrupted run: every kernel model once, the same kernel count
    rows, ref_rows = LatencyDB(db).rows(), LatencyDB(whole).rows()

    def kinds(rs):
        return Counter((r["kind"], r["model_name"]) for r in rs)

    assert kinds(rows) == kinds(ref_rows)
    assert {r["device_fp"] for r in rows} == {reference.device_fp}

    # a third run times nothing; --again times everything and replaces the rows instead of adding to them
    timed["count"].clear()
    assert presso.profile_device(threads=1, runs=3, specs=SPECS, quiet=False, db=db).resumed == len(SPECS)
    assert not timed["count"]
    redone = presso.profile_device(threads=1, runs=3, specs=SPECS, quiet=False, db=db, again=True)
    assert sum(timed["count"].values()) == len(SPECS) and redone.resumed == 0
    assert len(LatencyDB(db).rows()) == len(rows)
    # other settings are another profile: not taken as done
    timed["count"].clear()
    assert presso.profile_device(threads=1, runs=4, specs=SPECS[:2], quiet=False, db=db).resumed == 0
    assert sum(timed["count"].values()) == 2


def test_the_cli_profile_resumes_and_says_so(home, tmp_path, timed, monkeypatch):
    from typer.testing import CliRunner

    from presso.cli import app

    monkeypatch.setattr(calibration, "kernel_set", lambda size="full", seed=0: SPECS)
    monkeypatch.setattr(networks, "network_set", lambda size="full", seed=0: [])
    monkeypatch.setattr(profile, "QUIET", float("inf"))  # every window taken as quiet: no pause, none timed again
    db = str(tmp_path / "cli.db")
    args = ["db", "profile", "--size", "quick", "--threads", "1", "--db", db]
    timed["stop_after"] = 3
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130 and "interrupted" in r.stderr
    timed["stop_after"] = None
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["resumed"] == 3 and max(timed["count"].values()) == 1 and len(timed["count"]) == len(SPECS)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and f"{len(SPECS)} kernel models were already stored" in r.stderr


def test_predicting_from_an_interrupted_profile_says_to_finish_it(home, tmp_path, timed):
    """A killed profile leaves part of the kernel set: the predictor refuses it with the command that finishes it
    (and `presso search`, which profiles on that error, then resumes it)."""
    from presso.bench.calibration import build
    from presso.errors import ConfigError

    db = str(tmp_path / "p.db")
    timed["stop_after"] = 10
    with pytest.raises(KeyboardInterrupt):
        presso.profile_device(threads=1, size="quick", runs=3, quiet=False, db=db)
    model = build(SPECS[1])
    with pytest.raises(ConfigError, match=r"unfinished \(\d+ of 29 kernel models.*presso db profile --device local"):
        presso.predict_latency(model, threads=1, db=db)
    timed["stop_after"] = None
    assert presso.profile_device(threads=1, size="quick", runs=3, quiet=False, db=db).resumed == 10
    assert presso.predict_latency(model, threads=1, db=db).latency_ms > 0


# `presso db profile` in a process of its own, each kernel model it times logged (after timing, before storing) to
# LOG; SLOW pauses after each one so the kill lands mid-set whatever the machine's speed. Every window is taken as
# quiet (QUIET = inf): the windows a busy machine would measure again are another feature, and their pauses would
# make the run's length a matter of load.
_PROFILER = """
import os, sys, time
import presso.bench.profile as p
p.QUIET = float("inf")
real = p.time_spec
def time_spec(measure, spec):
    timing = real(measure, spec)
    with open(os.environ["LOG"], "a") as f:
        f.write(spec.label() + "\\n")
    time.sleep(float(os.environ.get("SLOW", "0")))
    return timing
p.time_spec = time_spec
from presso.cli import main
sys.argv = ["presso", *sys.argv[1:]]
main()
"""


def _stored(db: str) -> dict[str, set[str]]:
    """Kernel model -> the uids of its rows, read with the standard library while the profiler writes (WAL)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT model_name, uid FROM measurements WHERE kind IN ('kernel', 'overhead')").fetchall()
    finally:
        con.close()
    out: dict[str, set[str]] = {}
    for name, uid in rows:
        out.setdefault(name, set()).add(uid)
    return out


def test_a_killed_profile_process_resumes_without_timing_any_kernel_twice(home, tmp_path):
    """kill -9 mid-profile (no `finally`, no Ctrl-C handler), rerun: the kernel models stored before the kill are
    not timed again, every other one is timed once, and the set is the same as an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    reference = str(tmp_path / "whole.db")
    presso.profile_device(threads=1, size="quick", runs=12, quiet=False, db=reference)
    script = tmp_path / "profiler.py"
    script.write_text(_PROFILER)
    db, logs = str(tmp_path / "killed.db"), [tmp_path / "first.log", tmp_path / "second.log"]
    cmd = [sys.executable, str(script), "db", "profile", "--size", "quick", "--threads", "1", "--db", db]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, env={**env, "LOG": str(logs[0]), "SLOW": "0.15"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline, before = time.time() + 60, {}
    while time.time() < deadline and proc.poll() is None:
        try:
            before = _stored(db)
        except Exception:  # noqa: BLE001 -- the database is being created
            before = {}
        if len(before) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the profile ended before the kill: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = _stored(db)  # what the kill left (a kernel model may have been stored since the last look)
    total = len(calibration.kernel_set("quick"))
    assert proc.returncode == -signal.SIGKILL and 6 <= len(before) < total

    r = subprocess.run([*cmd, "--json"], env={**env, "LOG": str(logs[1])}, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert set(before) <= set(logs[0].read_text().split())
    timed_again = logs[1].read_text().split()
    assert not set(timed_again) & set(before)  # nothing stored before the kill was timed again ...
    assert len(timed_again) == len(set(timed_again))  # ... and nothing twice in the rerun
    assert json.loads(r.stdout)["resumed"] == len(before)
    after = _stored(db)
    assert all(after[name] == uids for name, uids in before.items())  # the rows stored before the kill, untouched
    assert set(after) == set(_stored(reference))  # the whole set, as an uninterrupted run stores it
    assert presso.predict_latency(calibration.build(SPECS[1]), threads=1, db=db).latency_ms > 0
