"""bench/env.py: where user state lives and what a bug report says."""

from __future__ import annotations

import json

from typer.testing import CliRunner


def test_bug_report_names_the_versions_and_presso_home(monkeypatch, tmp_path):
    from presso.bench.env import REPORTED_PACKAGES, bug_report
    from presso.cli import app

    monkeypatch.setenv("PRESSO_HOME", str(tmp_path / "home"))
    report = bug_report()
    assert report["presso_home"] == str(tmp_path / "home")
    assert set(report["packages"]) == set(REPORTED_PACKAGES) and report["packages"]["torch"].startswith("2.")
    assert report["cpu_count"] >= 1 and isinstance(report["cuda"], bool)
    out = CliRunner().invoke(app, ["env", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["packages"] == report["packages"]
