"""LiteRT (TFLite) export: FP32/FP16/full-integer INT8 parity with PyTorch, through ``to_litert`` and ``presso.convert
--to litert``; the failing op named; the missing extra named. Skipped without ``presso[litert]``."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import presso
from presso.convert import ConvertConfig, Int8Config
from presso.errors import ConfigError, ConversionError
from presso.testing.models import TinyCNN

needs_litert = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("litert_torch", "ai_edge_quantizer", "ai_edge_litert")),
    reason='needs the optional extra: pip install "presso[litert]"',
)


def _snr_db(reference: np.ndarray, output: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / ((reference - output) ** 2).sum()))


def _rel(reference: np.ndarray, output: np.ndarray) -> float:
    return float(np.abs(reference - output).max() / np.abs(reference).max())


# ----------------------------------------------------------------------------- to_litert on a small CNN
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    calibration = [torch.randn(64, 3, 32, 32).numpy()]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x).numpy(), calibration


@needs_litert
def test_fp32_and_fp16_match_pytorch(tiny, tmp_path):
    from presso.convert.litert import LiteRTRunner, float_ops, to_litert

    model, x, reference, _ = tiny
    fp32 = to_litert(model, (x,), tmp_path / "model.tflite")
    out = LiteRTRunner(fp32).run((x,))[0]
    assert _rel(reference, out) < 1e-4  # measured ~4e-7
    fp16 = to_litert(model, (x,), tmp_path / "fp16" / "model.tflite", precision="fp16")
    assert _rel(reference, LiteRTRunner(fp16).run((x,))[0]) < 1e-3  # measured ~1.2e-4 (FP16 weights)
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    assert "CONV_2D" in float_ops(fp32)  # FP32 computes in float, of course


@needs_litert
def test_int8_is_full_integer_and_close_to_pytorch(tiny, tmp_path):
    from presso.convert.litert import LiteRTRunner, float_ops, op_counts, to_litert

    model, x, reference, calibration = tiny
    path = to_litert(model, (x,), tmp_path / "model.tflite", precision="int8", calibration=calibration)
    runner = LiteRTRunner(path)
    assert runner.input_details[runner.input_names[0]]["dtype"] == np.float32  # float edges by default
    assert float_ops(path) == []  # every conv, add, concat and mean runs in int8
    ops = op_counts(path)
    assert ops["QUANTIZE"] == 1 and ops["DEQUANTIZE"] == 1 and ops["DEPTHWISE_CONV_2D"] == 1
    assert _snr_db(reference, runner.run((x,))[0]) > 30  # measured ~44 dB

    # int8 inputs and outputs for MCU/NPU targets: the same arithmetic, no QUANTIZE/DEQUANTIZE at the edges
    int8_io = to_litert(model, (x,), tmp_path / "io" / "model.tflite", precision="int8", calibration=calibration,
                        int8_io=True)  # fmt: skip
    runner_io = LiteRTRunner(int8_io)
    assert runner_io.input_details[runner_io.input_names[0]]["dtype"] == np.int8
    assert runner_io.output_details[runner_io.output_names[0]]["dtype"] == np.int8
    assert "QUANTIZE" not in op_counts(int8_io) and float_ops(int8_io) == []
    assert _snr_db(reference, runner_io.run((x,))[0]) > 30
    # batches of another size than the file's run in its own batches
    odd = torch.cat([x, x[:3]])
    assert np.allclose(runner.run((odd,))[0][4:], runner.run((x,))[0][:3])


@needs_litert
def test_unsupported_op_is_named_in_one_line(tmp_path):
    class AdaptiveMax(torch.nn.Module):  # ONNX exports it; litert-torch 0.10 has no lowering for it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.nn.functional.adaptive_max_pool2d(self.conv(x), 2).flatten(1)

    with pytest.raises(ConversionError) as info:
        presso.convert(AdaptiveMax(), "1,3,16,16", ConvertConfig(to="litert"), output_dir=tmp_path / "out")
    message = str(info.value)
    assert "aten.adaptive_max_pool2d" in message and "test_litert.py" in message and "--to onnx" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    from presso.convert.litert import to_litert

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import fails as if not installed
    hint = r'^LiteRT export needs the optional extra: pip install "presso\[litert\]"$'
    with pytest.raises(ConversionError, match=hint):
        to_litert(TinyCNN(), (torch.randn(1, 3, 8, 8),), tmp_path / "model.tflite")


def test_config_refuses_what_litert_cannot_do():
    with pytest.raises(ConfigError, match="fixed batch size"):
        ConvertConfig(to="litert", dynamic_batch=True)
    with pytest.raises(ConfigError, match="full-integer"):
        ConvertConfig(to="litert", precision="int8", int8=Int8Config(max_accuracy_drop=0.01))
    for to, precision in (("onnx", "int8"), ("litert", "fp32")):
        with pytest.raises(ConfigError, match="--int8-io is for full-integer LiteRT"):
            ConvertConfig(to=to, precision=precision, int8_io=True)


# ----------------------------------------------------------------------------- presso.convert on a pruned ResNet-8
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """ResNet-8 trained on the built-in digits, pruned by 40 % and fine-tuned (~20 s on one thread; top-1 0.75-0.9)."""
    from presso.compress import PruneConfig
    from presso.train import TrainConfig

    model = presso.load_model("presso:resnet8", num_classes=10)
    presso.train(model, "digits", TrainConfig(epochs=5, batch_size=64, seed=0))
    model = presso.compress(model, "1,3,32,32", PruneConfig(ratio=0.4)).model
    presso.train(model, "digits", TrainConfig(epochs=3, batch_size=64, seed=0))
    return model.eval()


@needs_litert
@pytest.mark.slow
def test_convert_to_litert_pruned_resnet8(pruned, tmp_path):
    shape = "1,3,32,32"
    fp32 = presso.convert(pruned, shape, ConvertConfig(to="litert"), output_dir=tmp_path / "fp32", calib="digits")
    assert fp32.path.name == "model.tflite" and fp32.files == ["model.tflite", "presso.json", "convert.json"]
    assert fp32.diff["max_rel_diff"] < 1e-4  # measured ~1.5e-7
    assert fp32.accuracy["fp32_top1"] > 0.6 and fp32.accuracy["converted_top1"] == fp32.accuracy["fp32_top1"]

    config = ConvertConfig(to="litert", precision="int8")
    int8 = presso.convert(pruned, shape, config, output_dir=tmp_path / "int8", calib="digits")
    acc = int8.accuracy
    print(f"pruned ResNet-8 LiteRT: FP32 {fp32.diff} {fp32.accuracy}; INT8 {int8.diff} {acc}")
    assert acc["samples"] == 180 and acc["converted_top1"] >= acc["fp32_top1"] - 0.02  # digits held-out split
    assert int8.size_bytes < 0.45 * fp32.size_bytes  # int8 weights

    # the output SNR against PyTorch on 64 digits images, normalised as the card says (INT8's usual criterion)
    from presso.convert.litert import LiteRTRunner, float_ops
    from presso.data import calibration_batches
    from presso.data.images import Preprocess
    from presso.models.spec import InputSpec

    pp = Preprocess.from_json(json.loads((int8.output_dir / "presso.json").read_text())["preprocess"])
    x = calibration_batches("digits", InputSpec.parse(shape), batches=1, batch_size=64, preprocess=pp)[0]
    with torch.no_grad():
        reference = pruned(x).numpy()
    snr = _snr_db(reference, LiteRTRunner(int8.path).run((x,))[0])
    print(f"INT8 output SNR {snr:.1f} dB")
    assert snr > 20
    assert float_ops(int8.path) == []
    # --int8-io: int8 tensors at the file's edges too (microcontrollers, NPUs), scored like the float-io file
    io = presso.convert(pruned, shape, ConvertConfig(to="litert", precision="int8", int8_io=True),
                        output_dir=tmp_path / "io", calib="digits")  # fmt: skip
    from presso.convert.litert import op_counts

    assert "QUANTIZE" not in op_counts(io.path) and float_ops(io.path) == []
    assert io.accuracy["converted_top1"] >= io.accuracy["fp32_top1"] - 0.02


# ----------------------------------------------------------------------------- presso benchmark --runtime litert
@needs_litert
def test_benchmark_runtime_litert_times_the_files_as_they_are(tiny, tmp_path):
    from typer.testing import CliRunner

    from presso.bench.api import benchmark
    from presso.cli import app
    from presso.convert.litert import to_litert

    model, x, _, calibration = tiny
    fp32 = to_litert(model, (x[:1],), tmp_path / "fp32" / "model.tflite")
    int8 = to_litert(model, (x[:1],), tmp_path / "int8" / "model.tflite", precision="int8", calibration=calibration)
    db = tmp_path / "latency.db"
    a = benchmark(str(fp32), runtime="litert", threads=1, warmup=2, repeat=5, db=str(db))
    b = benchmark(str(int8), runtime="litert", threads=1, warmup=2, repeat=5, db=str(db))
    assert (a.runtime, a.precision, b.precision) == ("litert", "fp32", "int8")
    assert a.input_shape == "1,3,32,32" and a.runs == 5 and a.latency_ms["median"] > 0
    assert a.model_size_bytes == fp32.stat().st_size and b.model_size_bytes == int8.stat().st_size
    assert a.model_fp != b.model_fp and a.db["uid"] != b.db["uid"]  # both stored, as different models

    from presso.bench.latency_db import LatencyDB

    rows = LatencyDB(str(db)).rows()
    assert {r["precision"] for r in rows} == {"fp32", "int8"}

    runner = CliRunner()
    wrong = runner.invoke(app, ["benchmark", str(fp32), "--no-db"])  # the default runtime is onnxruntime
    assert wrong.exit_code == 2 and "is a LiteRT file: measure it with --runtime litert" in wrong.output
    shape = runner.invoke(app, ["benchmark", str(fp32), "--runtime", "litert", "--batch", "4", "--no-db"])
    assert shape.exit_code == 2 and "fixed input shape 1,3,32,32" in shape.output
    torch_model = runner.invoke(app, ["benchmark", "presso:resnet8", "-s", "1,3,32,32", "--runtime", "litert"])
    assert torch_model.exit_code == 2 and "presso convert MODEL --to litert" in torch_model.output
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer" * 10)
    bad = runner.invoke(app, ["benchmark", str(broken), "--runtime", "litert", "--no-db"])
    assert bad.exit_code == 2 and "is not a readable LiteRT model" in bad.output
    ok = runner.invoke(app, ["benchmark", str(int8.parent / "model.tflite"), "--runtime", "litert", "--threads", "1",
                             "--repeat", "3", "--warmup", "1", "--no-db", "--json"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["precision"] == "int8"


@needs_litert
def test_info_reads_a_litert_file(tiny, tmp_path):
    from typer.testing import CliRunner

    from presso.cli import app
    from presso.convert.litert import to_litert

    model, x, _, calibration = tiny
    fp32 = to_litert(model, (x[:1],), tmp_path / "fp32" / "model.tflite")
    int8 = to_litert(model, (x[:1],), tmp_path / "int8" / "model.tflite", precision="int8", calibration=calibration)
    params = sum(p.numel() for p in model.parameters())
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        out = CliRunner().invoke(app, ["info", str(path), "--json"])
        assert out.exit_code == 0, out.output
        info = json.loads(out.stdout)
        assert info["format"] == "litert" and info["precision"] == precision
        assert info["inputs"][0]["shape"] == [1, 3, 32, 32] and info["outputs"][0]["shape"] == [1, 10]
        # BatchNorm is folded into the convolutions (its scales and shifts become conv biases); in INT8 the
        # int32 biases are not weights: measured 31,690 (fp32) and 31,488 (int8) of PyTorch's 31,850
        assert params - 400 <= info["params"] <= params, (info["params"], params)


@needs_litert
@pytest.mark.slow
def test_litert_bundle_predicts_as_the_file_does_without_torch(pruned, tmp_path):
    import subprocess
    import zipfile

    from PIL import Image

    from presso.convert.litert import LiteRTRunner
    from presso.convert.package import package
    from presso.convert.predict import Predictor, load_image, normalize
    from presso.data import load_data

    config = ConvertConfig(to="litert", precision="int8", int8_io=True)  # int8 edges: the bundle quantizes them
    conv = presso.convert(pruned, "1,3,32,32", config, output_dir=tmp_path / "int8", calib="digits")
    result = package(conv.output_dir, tmp_path, name="b.zip")
    assert result.members == ["README.txt", "model.tflite", "predict.py", "presso.json"]
    with zipfile.ZipFile(result.path) as zf:
        card = json.loads(zf.read("presso.json"))
        assert "pip install ai-edge-litert numpy pillow" in zf.read("README.txt").decode()
    assert card["bundle"]["runtime"] == "litert"

    val = load_data("digits").val.at((32, 32), 3)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(val[i][0].numpy().transpose(1, 2, 0)).save(paths[-1])
    x = normalize(np.stack([load_image(p, 3, (32, 32)) for p in paths]), card["preprocess"])
    expected = LiteRTRunner(conv.path).run((x,))[0].argmax(1).tolist()
    predictor = Predictor(result.path)
    assert predictor.batch == 1 and predictor.num_classes == 10
    assert [p["class"] for p in predictor.predict(paths)] == expected
    labels = [int(val[i][1]) for i in range(8)]
    assert sum(a == b for a, b in zip(expected, labels, strict=True)) >= 5  # the file classifies digits

    # the bundle's own predict.py, with neither torch nor presso importable
    with zipfile.ZipFile(result.path) as zf:
        zf.extract("predict.py", tmp_path / "device")
    blocker = (
        "import sys, runpy; sys.modules['torch'] = None; sys.modules['presso'] = None; "
        f"sys.argv = ['predict.py', {str(result.path)!r}, *{[str(p) for p in paths]!r}, '--json']; "
        f"runpy.run_path({str(tmp_path / 'device' / 'predict.py')!r}, run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p["class"] for p in json.loads(r.stdout)["predictions"]] == expected

    # a card that names LiteRT without the file, and a damaged flatbuffer: one line each
    from presso.errors import BundleError

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("presso.json", json.dumps(card))
        zf.writestr("model.tflite", b"\0" * 64)
    with pytest.raises(BundleError, match="LiteRT cannot load model.tflite"):
        Predictor(bad)
    with zipfile.ZipFile(tmp_path / "none.zip", "w") as zf:
        zf.writestr("presso.json", json.dumps(card))
        zf.writestr("model.onnx", b"")
    with pytest.raises(BundleError, match="runs on litert, but the bundle has no model.tflite"):
        Predictor(tmp_path / "none.zip")
