"""Quantization-aware training (presso.models.qat, ``presso train --qat``): the fine-tuned fake-quantized model
exports as the INT8 QDQ model ONNX Runtime runs, and scores the same there as in PyTorch."""

import collections
import copy
import json

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import presso
from presso.cli import app
from presso.convert import ConvertConfig
from presso.data import load_data
from presso.errors import ConfigError
from presso.models.qat import ActivationFakeQuant, is_qat, prepare_qat
from presso.train import TrainConfig

DIGITS = "digits:size=16"
FAST = dict(batch_size=64, workers=0)


@pytest.fixture(scope="module")
def digits():
    return load_data(DIGITS)


def _images_and_labels(bundle, preprocess):
    """Every image of the bundle (train and held-out), normalised as the model takes them, and the labels."""
    import numpy as np

    sets = [bundle.train.at((16, 16), 3), bundle.val.at((16, 16), 3)]
    x = torch.cat([torch.stack([s[i][0] for i in range(len(s))]) for s in sets])
    y = np.array([int(s[i][1]) for s in sets for i in range(len(s))])
    return preprocess.normalize(x), y


@pytest.fixture(scope="module")
def fp32(digits):
    torch.manual_seed(0)
    model = presso.load_model("presso:resnet8", num_classes=10)
    return presso.train(model, digits, TrainConfig(epochs=4, **FAST)).model


@pytest.fixture(scope="module")
def qat(fp32, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "r8-qat"
    result = presso.train(copy.deepcopy(fp32), digits, TrainConfig(epochs=2, qat=True, **FAST), output_dir=out)
    return result, out


def test_prepare_folds_batchnorm_and_keeps_the_function_within_quantization_noise(fp32):
    model = copy.deepcopy(fp32).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    step = prepare_qat(model, (x,))
    assert len(step["folds"]) == 9 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(step["layers"]) == 10  # 9 convolutions and the classifier
    # the weights are on ONNX Runtime's per-channel int8 grid: at most 255 distinct multiples of each row's scale
    conv = model.get_submodule(step["layers"][0])
    w = conv.weight.detach().flatten(1)
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() < 0.1 * before.abs().max()  # 8-bit noise, not a different function
    with pytest.raises(Exception, match="already in QAT form"):
        prepare_qat(model, (x,))


def test_a_conv_feeding_more_than_its_batchnorm_is_not_folded():
    class Both(nn.Module):  # the conv's output goes to the BatchNorm and, unnormalized, to the sum
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head((self.bn(y) + y).mean((2, 3)))

    model = Both().eval()
    model.bn.running_mean.fill_(0.5)
    step = prepare_qat(model, (torch.randn(2, 3, 8, 8),))
    assert step["folds"] == [] and isinstance(model.bn, nn.BatchNorm2d)


def test_qat_fine_tune_exports_int8_that_onnx_runtime_scores_as_pytorch_did(qat, digits, tmp_path):
    result, out = qat
    assert is_qat(result.model)
    card = json.loads((out / "presso.json").read_text())
    assert card["recipe"][-1]["type"] == "qat" and card["history"][-1]["config"]["qat"] is True
    reloaded = presso.load_model(out)  # the QAT form rebuilt from the recipe, ranges from the weights file
    x = torch.randn(4, 3, 16, 16)
    assert is_qat(reloaded) and torch.equal(reloaded(x), result.model.eval()(x))

    converted = presso.convert(reloaded, "1,3,16,16", ConvertConfig(precision="int8"), output_dir=tmp_path / "q",
                               calib=DIGITS)  # fmt: skip
    acc = converted.accuracy  # on the 180 held-out images: one image is 0.56 points
    assert abs(acc["converted_top1"] - acc["pytorch_qat_top1"]) <= 0.006 and acc["converted_top1"] > 0.8, acc

    # The done-criterion of the QAT issue, on all 1,797 digits (0.3 points = 5 images): ONNX Runtime's INT8 top-1
    # within 0.3 points of PyTorch's fake-quantized top-1. Measured: 95.55 vs 95.49, one image of 1,797 differs.
    import numpy as np

    from presso.models.onnx import run_onnx, session

    x, y = _images_and_labels(digits, result.preprocess)
    with torch.no_grad():
        torch_top = reloaded(x).argmax(1).numpy()
    sess = session(converted.path)
    ort_top = np.concatenate([run_onnx(sess, (x[i : i + 1],))[0] for i in range(len(x))]).argmax(1)
    torch_acc, ort_acc = (torch_top == y).mean(), (ort_top == y).mean()
    print(f"QAT top-1 on {len(x)} digits: PyTorch fake-quant {torch_acc:.4f}, ONNX Runtime INT8 {ort_acc:.4f}")
    assert abs(torch_acc - ort_acc) <= 0.003 and (torch_top == ort_top).mean() >= 0.995
    graph = onnx.load(str(converted.path))
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["QuantizeLinear"] >= 10 and ops["DequantizeLinear"] >= 10
    # ONNX Runtime runs it on integer kernels: every convolution and the classifier fused
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(converted.path), opts, providers=["CPUExecutionProvider"])
    fused = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["QLinearConv"] == 9 and fused["QGemm"] == 1 and fused["Conv"] == 0, fused


def test_a_qat_model_converts_only_to_its_int8_onnx(qat, tmp_path):
    result, _ = qat
    for cfg in (ConvertConfig(precision="fp32"), ConvertConfig(to="openvino", precision="int8")):
        with pytest.raises(ConfigError, match="trained with --qat"):
            presso.convert(result.model, "1,3,16,16", cfg, output_dir=tmp_path / "x")
    # no calibration data needed: the ranges were learned
    done = presso.convert(result.model, "1,3,16,16", ConvertConfig(precision="int8"), output_dir=tmp_path / "q")
    assert done.precision == "int8" and done.path.is_file()


def test_activation_ranges_follow_the_data_in_training_and_freeze_in_eval():
    fq = ActivationFakeQuant()
    fq.train()
    fq(torch.tensor([-1.0, 3.0]))
    assert (float(fq.low), float(fq.high)) == (-1.0, 3.0)
    fq(torch.tensor([0.0, 13.0]))  # moving average, constant 0.01
    assert float(fq.high) == pytest.approx(3.1) and float(fq.low) == pytest.approx(-0.99)
    fq.eval()
    y = fq(torch.tensor([100.0]))
    assert float(fq.high) == pytest.approx(3.1) and float(y) == pytest.approx(3.1, abs=0.02)  # clipped to the range


def test_cli_train_qat(fp32, tmp_path):
    src = tmp_path / "fp32"
    presso.save_model_dir(fp32, src, input_spec="1,3,16,16")
    r = CliRunner().invoke(app, ["train", str(src), "--data", DIGITS, "--qat", "--epochs", "1", "--batch-size",
                                 "64", "-o", str(tmp_path / "q"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    history = json.loads((tmp_path / "q" / "presso.json").read_text())["history"][-1]
    assert history["config"]["qat"] is True and history["teacher"] is not None  # distilled from the FP32 model
