"""`presso benchmark`, `presso devices` and `presso db` from the command line."""

import json

from presso.cli import app

from ._helpers import runner


def test_cli_benchmark_json_devices_and_db(home, tiny_onnx, tmp_path, agent):
    path = tiny_onnx(tmp_path / "m.onnx")
    r = runner.invoke(app, ["benchmark", str(path), "--threads", "1", "--repeat", "10", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("latency_ms", "throughput", "peak_memory_mb", "device", "runtime", "noise_pct"):
        assert key in payload
    assert set(payload["latency_ms"]) >= {"median", "p90", "p99"} and payload["device"] == "local"

    r = runner.invoke(
        app, ["devices", "add", "farm-1", agent["url"], "--token-file", str(agent["token_file"]), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["info"]["device"] == "test-agent"
    r = runner.invoke(app, ["devices", "list", "--json"])
    assert [d["name"] for d in json.loads(r.stdout)["devices"]] == ["local", "farm-1"]
    r = runner.invoke(app, ["benchmark", str(path), "--device", "farm-1", "--repeat", "5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["device"] == "farm-1"

    r = runner.invoke(app, ["db", "list", "--json"])
    assert json.loads(r.stdout)["count"] == 2
    out = tmp_path / "farm.csv"
    assert runner.invoke(app, ["db", "export", str(out)]).exit_code == 0
    other = f"sqlite:///{tmp_path / 'other.db'}"
    r = runner.invoke(app, ["db", "import", str(out), "--db", other, "--json"])
    assert json.loads(r.stdout) == {"added": 2, "skipped": 0}

    r = runner.invoke(app, ["benchmark", str(path), "--device", "nowhere"])
    assert r.exit_code == 2 and "Unknown device 'nowhere'" in r.output
