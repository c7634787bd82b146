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


def test_vnni_is_read_from_the_cpu_flags_and_recorded_with_measurements(monkeypatch, tmp_path):
    """INT8 is built for the CPU's dot-product kernels (full-range weights need VNNI): the answer comes from the
    flags line, never from a model name containing the letters, and every measurement and bug report records it."""
    import platform

    from presso import cpu
    from presso.bench.env import bug_report, environment

    real = cpu.has_vnni()
    assert environment("onnxruntime", "1", 1)["vnni"] == real and bug_report()["vnni"] == real
    info = tmp_path / "cpuinfo"
    real_path = cpu.Path

    def fake(text):
        info.write_text(text)
        cpu.has_vnni.cache_clear()
        monkeypatch.setattr(cpu, "Path", lambda p: real_path(info) if p == "/proc/cpuinfo" else real_path(p))
        return cpu.has_vnni()

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    try:
        assert fake("model name\t: AMD EPYC avx512_vnni edition\nflags\t\t: fpu sse avx2\n") is False
        assert fake("model name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni\n") is True
        assert fake("flags\t\t: fpu avx2 avx_vnni\n") is True
        assert fake("processor\t: 0\n") is None  # no flags line: unknown, not "no"
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
        assert fake("flags\t\t: avx512_vnni\n") is None  # not x86: the question does not apply
    finally:
        cpu.has_vnni.cache_clear()
