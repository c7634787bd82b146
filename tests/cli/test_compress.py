"""`presso compress` from the command line: JSON keys, the table, per-layer files, decomposition ranks, targets."""

import json

import pytest

import presso
from presso.cli import app

from ._helpers import ok_json, runner


def test_compress_json_has_the_documented_keys(tmp_path):
    out = tmp_path / "r18"
    res = runner.invoke(
        app,
        [
            "compress",
            "torchvision:resnet18",
            "--input-shape",
            "1,3,32,32",
            "--prune-ratio",
            "0.5",
            "--criterion",
            "l2",
            "-o",
            str(out),
            "--json",
        ],
    )
    data = ok_json(res)
    for key in ("params_before", "params_after", "macs_before", "macs_after", "output_dir", "skipped_layers"):
        assert key in data
    assert data["macs_after"] < 0.3 * data["macs_before"]
    assert data["output_dir"] == str(out)
    assert {"name": "fc", "reason": "produces the model's output; pruning it would change the output shape"} in data[
        "skipped_layers"
    ]
    assert data["per_layer"]["layer1.0.conv1"] == {"before": 64, "after": 32, "ratio": 0.5}
    assert (out / "presso.json").is_file() and (out / "weights.safetensors").is_file()
    info = ok_json(runner.invoke(app, ["info", str(out), "--json"]))  # input shape comes from the card
    assert info["macs"] == data["macs_after"] and info["params"] == data["params_after"]


def test_compress_table_output(tmp_path):
    res = runner.invoke(app, ["compress", "timm:resnet10t", "-s", "1,3,32,32", "-r", "0.25", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "MACs" in res.stdout and "left unpruned" in res.stdout


def _compress_r18(out, *extra):
    return ok_json(runner.invoke(app, ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "-o", str(out), "--json",
                                     *extra]))  # fmt: skip


@pytest.mark.parametrize("mode,groups", [("groups", 5), ("width", 10)])
def test_grouped_option_chooses_how_grouped_convolutions_are_thinned(tmp_path, mode, groups):
    out = tmp_path / mode
    res = runner.invoke(app, ["compress", "torchvision:regnet_x_400mf", "-s", "1,3,32,32", "-r", "0.5", "--grouped",
                              mode, "-o", str(out), "--json"])  # fmt: skip
    ok_json(res)
    conv = presso.load_model(out).trunk_output.block3[1].f.b[0]  # 160 channels in 10 groups of 16
    assert (conv.groups, conv.out_channels // conv.groups) == (groups, 16 if mode == "groups" else 8)
    bad = runner.invoke(app, ["compress", "torchvision:regnet_x_400mf", "-s", "1,3,32,32", "--grouped", "rows", "-o",
                              str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code != 0 and "grouped mode" in bad.output


def test_per_layer_and_index_files(tmp_path):
    ratios = tmp_path / "r.yaml"
    ratios.write_text("layer1.0.conv1: 0.75\n")
    data = _compress_r18(tmp_path / "a", "--per-layer", str(ratios))
    assert data["per_layer"]["layer1.0.conv1"]["after"] == 16
    assert data["per_layer"]["layer2.0.conv1"]["after"] == 128
    idx = tmp_path / "i.json"
    idx.write_text(json.dumps({"layer1.0.conv1": [1, 2, 3]}))
    data = _compress_r18(tmp_path / "b", "--criterion", "index", "--indices", str(idx))
    assert data["per_layer"]["layer1.0.conv1"]["after"] == 61


def test_unknown_layer_in_per_layer_file(tmp_path):
    ratios = tmp_path / "r.json"
    ratios.write_text(json.dumps({"layer9.conv": 0.5}))
    res = runner.invoke(
        app,
        ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--per-layer", str(ratios), "-o", str(tmp_path / "o")],
    )
    assert res.exit_code == 2 and "'layer9.conv'" in res.stderr and "does not exist" in res.stderr


def test_cli_decompose_writes_ranks_that_feed_back(tmp_path):
    args = ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--decompose", "tucker", "--rank", "ratio"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["method"] == "decompose" and data["files"] == ["ranks.yaml"]
    ranks = {n: v["ranks"] for n, v in data["per_layer"].items() if "ranks" in v}
    assert ranks["layer1.0.conv1"] == [32, 32]
    res = runner.invoke(
        app, [*args, "--ranks", str(tmp_path / "a" / "ranks.yaml"), "-o", str(tmp_path / "b"), "--json"]
    )
    again = json.loads(res.stdout)
    assert {n: v["ranks"] for n, v in again["per_layer"].items() if "ranks" in v} == ranks


def test_cli_target_macs_reports_the_choice(tmp_path):
    res = runner.invoke(
        app, ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--target-macs", "0.5", "-o", str(tmp_path / "t"),
              "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["target"]["macs"] == 0.5 and abs(data["macs_ratio"] / 0.5 - 1) <= 0.03
    assert data["files"] == ["per_layer.yaml"] and (tmp_path / "t" / "per_layer.yaml").is_file()
    res = runner.invoke(app, ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--target-latency-ms",
                              "3", "--device", "phone", "-o", str(tmp_path / "u")])  # fmt: skip
    assert res.exit_code == 2 and "--device local" in res.output
