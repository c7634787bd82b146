"""The command line: JSON output, tables, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import presso
from presso.cli import app

runner = CliRunner()


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


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
    data = _json(res)
    for key in ("params_before", "params_after", "macs_before", "macs_after", "output_dir", "skipped_layers"):
        assert key in data
    assert data["macs_after"] < 0.3 * data["macs_before"]
    assert data["output_dir"] == str(out)
    assert {"name": "fc", "reason": "produces the model's output; pruning it would change the output shape"} in data[
        "skipped_layers"
    ]
    assert data["per_layer"]["layer1.0.conv1"] == {"before": 64, "after": 32, "ratio": 0.5}
    assert (out / "presso.json").is_file() and (out / "weights.safetensors").is_file()
    info = _json(runner.invoke(app, ["info", str(out), "--json"]))  # input shape comes from the card
    assert info["macs"] == data["macs_after"] and info["params"] == data["params_after"]


def test_compress_table_output(tmp_path):
    res = runner.invoke(app, ["compress", "timm:resnet10t", "-s", "1,3,32,32", "-r", "0.25", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "MACs" in res.stdout and "left unpruned" in res.stdout


def _compress_r18(out, *extra):
    return _json(runner.invoke(app, ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "-o", str(out), "--json",
                                     *extra]))  # fmt: skip


@pytest.mark.parametrize("mode,groups", [("groups", 5), ("width", 10)])
def test_grouped_option_chooses_how_grouped_convolutions_are_thinned(tmp_path, mode, groups):
    out = tmp_path / mode
    res = runner.invoke(app, ["compress", "torchvision:regnet_x_400mf", "-s", "1,3,32,32", "-r", "0.5", "--grouped",
                              mode, "-o", str(out), "--json"])  # fmt: skip
    _json(res)
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


@pytest.mark.parametrize(
    "args,message",
    [
        (["compress", "torchvision:resnet1", "-s", "1,3,32,32", "-o", "X"], "Did you mean"),
        (["compress", "torchvision:resnet18", "-s", "1,3,3a,32", "-o", "X"], "Malformed input shape"),
        (["compress", "torchvision:resnet18", "-s", "1,3,32,32", "-r", "1.5", "-o", "X"], "outside (0, 1)"),
        (["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--criterion", "taylor", "-o", "X"], "--calib"),
        (["compress", "torchvision:resnet18", "-s", "1,4,32,32", "-o", "X"], "Fix --input-shape"),
        (["info", "torchvision:resnet18"], "--input-shape"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    res = runner.invoke(app, [a.replace("X", str(tmp_path / "o")) for a in args])
    assert res.exit_code == 2
    assert message in res.stderr
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_layer_in_per_layer_file(tmp_path):
    ratios = tmp_path / "r.json"
    ratios.write_text(json.dumps({"layer9.conv": 0.5}))
    res = runner.invoke(
        app,
        ["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--per-layer", str(ratios), "-o", str(tmp_path / "o")],
    )
    assert res.exit_code == 2 and "'layer9.conv'" in res.stderr and "does not exist" in res.stderr


def test_pickle_without_trust_is_refused(tmp_path):
    import torch

    f = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)), f)
    res = runner.invoke(app, ["info", str(f), "-s", "1,3,16,16"])
    assert res.exit_code == 2 and "--trust" in res.stderr
    ok = runner.invoke(app, ["info", str(f), "-s", "1,3,16,16", "--trust", "--json"])
    assert _json(ok)["params"] == 8 * 3 * 9 + 8 + 4 * 8 * 9 + 4


def test_console_script_help_does_not_import_torch():
    code = (
        "import sys; from presso.cli import app; sys.argv = ['presso', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_import_presso_is_light():
    code = (
        "import sys, presso\n"
        "m = presso.load_model('torchvision:resnet18')\n"
        "print(any(k.startswith('onnxruntime') for k in sys.modules), __import__('torch').cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]
    out = subprocess.run(
        [sys.executable, "-c", "import sys, presso; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"


def test_cli_help_loads_no_heavy_backend():
    """Every registered verb module stays light: --help imports no runtime, database or search engine."""
    heavy = ("torch", "onnxruntime", "openvino", "optuna", "sqlalchemy", "fastapi", "uvicorn", "matplotlib")
    code = (
        "import sys; from presso.cli import app; sys.argv = ['presso', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
