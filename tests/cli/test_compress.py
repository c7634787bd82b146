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


def _trained_at_12(tmp_path):
    """A model directory whose card says it was trained on 12x12 RGB images (no training needed to say so)."""
    from presso.data import Preprocess

    model = presso.load_model("presso:resnet8", num_classes=10, widths=[8, 8, 8])
    model.presso_card.preprocess = Preprocess(size=(12, 12), channels=3, mean=(0.3,) * 3, std=(0.3,) * 3).to_json()
    presso.save_model_dir(model, tmp_path / "m12", input_spec="1,3,12,12")
    return tmp_path / "m12"


def test_input_shape_must_match_the_preprocessing_in_the_card(tmp_path):
    src = _trained_at_12(tmp_path)
    for verb in ("compress", "convert"):
        res = runner.invoke(app, [verb, str(src), "-s", "1,3,64,64", "-o", str(tmp_path / verb)])
        assert res.exit_code == 2, res.output
        assert "trained on 12x12 images with 3 channels (input 1,3,12,12" in res.output
        assert "--image-size 64,64" in res.output and "Traceback" not in res.output and not (tmp_path / verb).exists()
    res = runner.invoke(app, ["compress", str(src), "-s", "1,1,12,12", "-o", str(tmp_path / "gray")])
    assert res.exit_code == 2 and "3 channels" in res.output
    ok = ["compress", str(src), "-s", "4,3,12,12", "-r", "0.25", "-o", str(tmp_path / "ok"), "--json"]
    data = ok_json(runner.invoke(app, ok))  # another batch size: the same images
    card = json.loads((tmp_path / "ok" / "presso.json").read_text())
    assert data["output_dir"] == str(tmp_path / "ok") and card["preprocess"]["size"] == [12, 12]


def test_torchvision_weights_default_come_from_the_local_cache_only(tmp_path):
    import torch

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    args = ["compress", "torchvision:resnet18", "--model-arg", "weights=DEFAULT", "-s", "1,3,32,32", "-r", "0.25"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "a")], env=env)
    assert res.exit_code == 2, res.output
    assert f"looked for {hub / 'resnet18-f37072fd.pth'}" in res.output.replace("\n", "") and "--weights" in res.output
    hub.mkdir(parents=True)
    torch.save(presso.load_model("torchvision:resnet18").state_dict(), hub / "resnet18-f37072fd.pth")
    data = ok_json(runner.invoke(app, [*args, "-o", str(tmp_path / "b"), "--json"], env=env))
    assert data["output_dir"] == str(tmp_path / "b")
    source = json.loads((tmp_path / "b" / "presso.json").read_text())["source"]
    assert source["weights"]["from"] == "torchvision cache (ResNet18_Weights.IMAGENET1K_V1)"
    assert source["kwargs"] == {} and len(source["weights"]["sha256"]) == 64
    res = runner.invoke(app, [*args, "--weights", str(hub / "resnet18-f37072fd.pth"), "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "Give the weights once" in res.output


def _latency_in_macs(monkeypatch):
    """Latency measured as MACs / 1e6 ms: a latency-target search, deterministic and quick on a shared machine."""
    from presso.compress import choose
    from presso.models.figures import model_figures

    monkeypatch.setattr(choose._Meter, "ms", lambda self, model: model_figures(model, self.inputs)["macs"] / 1e6)


def test_a_latency_target_prints_its_summary(tmp_path, monkeypatch):
    """The README's `--target-latency-ms 3 --device local` ended, after the search, in `KeyError: 'params'` in the
    summary printer: a latency target has no share. It prints what was measured, and the whole command's time."""
    _latency_in_macs(monkeypatch)  # the tiny model's "latency" is 3.13 ms: a budget of 2 ms is a real search
    args = ["compress", "presso:resnet8", "-s", "1,3,16,16", "--target-latency-ms", "2", "--device", "local",
            "--uniform"]  # fmt: skip
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "fast")])
    assert res.exit_code == 0, res.output
    assert "internal error" not in res.output
    assert "target: under 2 ms on local -> " in res.stdout and "(original 3.126 ms)" in res.stdout
    assert "saved to" in res.stdout and "(the whole command)" in res.stdout
    data = ok_json(runner.invoke(app, [*args, "-o", str(tmp_path / "json"), "--json"]))
    assert data["target"]["achieved_ms"] <= 2 * 1.03 and data["wall_seconds"] >= data["seconds"]


def test_a_ratio_given_with_a_target_is_said_to_be_searched(tmp_path):
    args = ["compress", "presso:resnet8", "-s", "1,3,16,16", "--target-macs", "0.5", "--prune-ratio", "0.3"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "m"), "--json"])
    data = ok_json(res)
    assert "--prune-ratio 0.3 only turns pruning on" in res.stderr.replace("\n", " ")
    assert data["target"]["search"][0]["best_knob"] != 0.3 and abs(data["macs_ratio"] - 0.5) <= 0.5 * 0.03
