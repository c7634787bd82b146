"""A real agent on 127.0.0.1: benchmarks over HTTP, refuses wrong tokens and bad uploads, keeps serving, and never
runs two measurements at once."""

import threading

import httpx
import pytest

import presso
from presso.bench.client import AgentClient
from presso.bench.devices import add_device, list_devices
from presso.errors import DeviceError


def _register(agent, name="farm-1"):
    return add_device(name, agent["url"], agent["token_file"])


def test_remote_benchmark_over_http(home, agent, tiny_onnx, tmp_path):
    _register(agent)
    assert [d.name for d in list_devices()] == ["farm-1"]
    path = tiny_onnx(tmp_path / "tiny.onnx")
    result = presso.benchmark(path, "farm-1", threads=1, warmup=2, repeat=15, max_seconds=5)
    assert result.device == "farm-1" and result.runtime == "onnxruntime"
    lat = result.latency_ms
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"]
    assert result.runs == 15 and result.threads == 1
    assert result.throughput == pytest.approx(1000 / lat["median"], rel=1e-3)
    assert result.environment["cpu"] and result.model_size_bytes == path.stat().st_size
    # stored under the remote device's name, with its fingerprint
    from presso.bench.latency_db import LatencyDB

    rows = LatencyDB().rows(device="farm-1")
    assert len(rows) == 1 and rows[0]["median_ms"] == lat["median"] and rows[0]["model_fp"] == result.model_fp


def test_wrong_token_is_401(home, agent, tiny_onnx, tmp_path):
    path = tiny_onnx(tmp_path / "tiny.onnx")
    for headers in ({"Authorization": "Bearer " + agent["token"][:-1] + "x"}, {}, {"Authorization": agent["token"]}):
        r = httpx.post(agent["url"] + "/benchmark", headers=headers, content=path.read_bytes(), timeout=30)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(agent["url"] + "/info", timeout=10).status_code == 401
    with pytest.raises(DeviceError, match="refused the token"):
        AgentClient(agent["url"], "not-the-token-at-all").info()


def test_bad_uploads_get_4xx_and_the_agent_keeps_serving(home, agent, tiny_onnx, tmp_path):
    client = AgentClient(agent["url"], agent["token"])
    headers = {"Authorization": f"Bearer {agent['token']}"}
    good = tiny_onnx(tmp_path / "tiny.onnx").read_bytes()
    cases = {
        b"\x00garbage\xff" * 100: (422, "not an ONNX model"),
        good[: len(good) // 2]: (422, "ONNX"),  # truncated protobuf
        b"": (400, "Empty upload"),
        b"\x01" * (3 * 2**20): (413, "limit"),  # over the 2 MiB limit the test agent was started with
    }
    for data, (status, words) in cases.items():
        r = httpx.post(agent["url"] + "/benchmark", headers=headers, content=data, timeout=30)
        assert r.status_code == status, (r.status_code, r.text)
        assert words in r.json()["detail"]
    # a valid ONNX file the checker refuses: a node reading a tensor nothing produces
    import onnx
    from onnx import TensorProto, helper

    bad = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["nowhere"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    with pytest.raises(DeviceError, match="422"):
        client.benchmark(bad.SerializeToString(), repeat=3)
    assert isinstance(onnx.load_model_from_string(good), onnx.ModelProto)
    # and the next good request succeeds
    ok = client.benchmark(good, threads=1, warmup=1, repeat=5)
    assert ok["runs"] == 5 and ok["median_ms"] > 0


def test_measurements_never_overlap(home, agent, tiny_onnx, tmp_path):
    client = AgentClient(agent["url"], agent["token"])
    data = tiny_onnx(tmp_path / "tiny.onnx", width=32, size=64).read_bytes()
    results = []

    def one():
        results.append(client.benchmark(data, threads=1, warmup=2, repeat=40, max_seconds=10))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted((r["agent"]["started"], r["agent"]["finished"]) for r in results)
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end  # one measurement at a time


def test_unknown_device_and_bad_registration(home, agent, tmp_path):
    from presso.errors import ConfigError

    with pytest.raises(DeviceError, match="Unknown device 'farm-9'"):
        presso.benchmark(tmp_path / "x.onnx", "farm-9")
    with pytest.raises(ConfigError):
        add_device("local", agent["url"], agent["token_file"])
    with pytest.raises(ConfigError, match="URL"):
        add_device("farm-2", "ftp://x", agent["token_file"])
    with pytest.raises(DeviceError, match="Cannot read token file"):
        add_device("farm-2", agent["url"], tmp_path / "missing.token")
