"""Cross-layer equalization and bias correction before INT8 (issue 16): the FP32 function kept, INT8 error reduced,
and both tried automatically before any layer falls back to FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from presso.convert.equalize import bias_corrections, equalize, find_pairs
from presso.convert.quantize import Int8Config, quantize_int8
from presso.models.onnx import export_onnx, optimize_onnx, session
from presso.models.qat import has_vnni

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Separable(nn.Module):
    """Depthwise-separable blocks (1x1 -> ReLU -> depthwise 3x3 -> ReLU -> 1x1), a global pool and a linear head.

    ``imbalance``: after initialisation, output channels 0-3 of the first depthwise layer are scaled up by
    ``imbalance`` (weights and bias) and the next 1x1's matching inputs down by as much -- the same FP32 function,
    but one per-tensor uint8 range over that activation then rounds the other channels away."""

    def __init__(self, imbalance: float = 1.0, width: int = 16, size: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, width, 3, padding=1)

        def block():
            return nn.Sequential(
                nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width), nn.ReLU(),
                nn.Conv2d(2 * width, width, 1),
            )  # fmt: skip

        self.b1, self.b2 = block(), block()
        self.fc = nn.Linear(width * size * size, 10)
        with torch.no_grad():
            scale = torch.ones(2 * width)
            scale[:4] = torch.tensor([imbalance, imbalance / 3, imbalance / 10, imbalance / 30]).clamp(min=1)
            dw, project = self.b1[2], self.b1[4]
            dw.weight.mul_(scale.view(-1, 1, 1, 1))
            dw.bias.mul_(scale)
            project.weight.div_(scale.view(1, -1, 1, 1))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.b2(torch.relu(self.b1(x)))
        return self.fc(x.flatten(1))


def _onnx(model: nn.Module, path: Path, size: int) -> Path:
    model.eval()
    export_onnx(model, (torch.randn(1, 3, size, size),), path.with_suffix(".raw.onnx"), dynamic_batch=True)
    return optimize_onnx(path.with_suffix(".raw.onnx"), path)


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Folded BatchNorms with real statistics, so the folded convolutions have uneven channels and biases."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.2 + 3 * torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _nets():
    import torchvision

    return {
        # ReLU blocks with depthwise convolutions (and squeeze-excitation, hard-swish and ReLU6-free)
        "mobilenet_v3_small": lambda: (_randomise_batchnorm(torchvision.models.mobilenet_v3_small(num_classes=10)), 32),
        # ReLU6 everywhere: CLE must leave the Clip pairs alone and still equalize the pairs with no activation
        "mobilenet_v2": lambda: (_randomise_batchnorm(torchvision.models.mobilenet_v2(num_classes=10)), 32),
        "separable": lambda: (Separable(imbalance=1e4), 8),
        "plain_cnn": lambda: (_randomise_batchnorm(_plain_cnn()), 16),
    }


def _plain_cnn() -> nn.Module:
    layers, c = [], 3
    for out in (16, 32, 32):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "separable", "plain_cnn"])
def test_equalization_keeps_the_fp32_function(name, tmp_path):
    import onnx

    model, size = _nets()[name]()
    src = _onnx(model, tmp_path / "fp32.onnx", size)
    graph = onnx.load(str(src)).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)  # folded by the export, as CLE assumes
    report = equalize(src, tmp_path / "cle.onnx")
    assert report.pairs and report.largest_scale > 1.05, report.to_json()  # something was really rescaled
    pairs, clips = find_pairs(graph)
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node}
    if name == "mobilenet_v2":
        assert clips >= 30  # every ReLU6 between two convolutions is skipped
    if name in ("mobilenet_v3_small", "separable"):
        assert any(groups[a.name] > 1 or groups[b.name] > 1 for a, b in pairs)  # depthwise pairs equalized
    x = _images(8, size, 1)
    feed = {graph.input[0].name: x}
    ref = session(src).run(None, feed)[0]
    got = session(tmp_path / "cle.onnx").run(None, feed)[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # and the weights really changed
    before = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "cle.onnx")).graph.initializer}
    a, b = pairs[0]
    assert not np.allclose(before[a.input[1]], after[a.input[1]])


# ----------------------------------------------------------------------------- INT8
@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """The depthwise net with channels 1e4 apart (FP32 ONNX), its calibration and held-out images."""
    path = _onnx(Separable(imbalance=1e4), tmp_path_factory.mktemp("sep") / "fp32.onnx", 8)
    return path, [_images(64, 8, 2)], [_images(32, 8, 3)]


def _int8(separable, tmp_path, name, **kw):
    src, calib, check = separable
    result = quantize_int8(src, tmp_path / f"{name}.onnx", calib, check, Int8Config(**kw))
    x = check[0]
    ref = session(src).run(None, {"x": x})[0]
    got = session(result.path).run(None, {"x": x})[0]
    return result, float(np.abs((got - ref).mean(axis=0)).mean())  # the mean error per logit, over the images


# ONNX Runtime's reduce_range (7-bit weights) where the CPU lacks VNNI, as Int8Config's default decides: the SNRs
# differ between the two (full-range weights saturate int16 sums on such CPUs: -5.9 dB on this net there)
REDUCED = has_vnni() is False


def test_equalization_raises_int8_snr_on_a_badly_balanced_depthwise_net(separable, tmp_path):
    plain, _ = _int8(separable, tmp_path, "plain", snr_db=None, equalize="off", bias_correction="off")
    cle, _ = _int8(separable, tmp_path, "cle", snr_db=None, equalize="on", bias_correction="off")
    # measured (per-channel weights, per-tensor uint8 activations): 6.3 dB -> 16.0 dB with full-range weights on a
    # VNNI CPU; 9.2 dB -> 12.0 dB with 7-bit weights on an AVX2 CPU (20.6 dB once biases are corrected, below)
    assert plain.output_snr_db < 10.0 and cle.settings["reduce_range"] is REDUCED
    assert cle.output_snr_db > plain.output_snr_db + (2.0 if REDUCED else 6.0)
    assert cle.settings["equalize"] and cle.settings["equalization"]["pairs"] == 6  # stem -> b1 -> b2, all through ReLU
    assert cle.settings["equalization"]["largest_scale"] > 100  # the 1e4 channels were brought in line
    assert [s["method"] for s in cle.steps] == ["cle"] and plain.steps[0]["method"] == "ptq"
    # the equalized file's layers are the same nodes, named after the same PyTorch modules
    assert [r.layer for r in cle.layers] == [r.layer for r in plain.layers]


def test_bias_correction_reduces_the_mean_output_error(separable, tmp_path):
    cle, err_cle = _int8(separable, tmp_path, "cle", snr_db=None, equalize="on", bias_correction="off")
    both, err_both = _int8(separable, tmp_path, "both", snr_db=None, equalize="on", bias_correction="on")
    # measured: mean error per logit 2.9e-4 -> 5.2e-5, SNR 16.0 -> 20.7 dB
    assert err_both < 0.5 * err_cle
    assert both.output_snr_db > cle.output_snr_db + 2.0
    assert both.settings["bias_correction"] and [s["method"] for s in both.steps] == ["cle+bc"]


def test_bias_corrections_are_minus_the_mean_output_shift_of_the_int8_weights(separable, tmp_path):
    """The correction of every layer equals what running it with its INT8 weights (read back from the QDQ file) in
    FP32 shifts its mean output by -- zero padding included -- over the calibration images."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from presso.convert.equalize import _qdq_weights

    src, calib, _ = separable
    q = quantize_int8(src, tmp_path / "q.onnx", calib, calib, Int8Config(snr_db=None, equalize="off",
                                                                          bias_correction="off"))  # fmt: skip
    feed = {"x": calib[0]}
    deltas = bias_corrections(src, q.path, [feed])
    model = onnx.load(str(src))
    graph = model.graph
    compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert set(deltas) == {n.name for n in compute} and len(compute) == 8
    # each layer twice, once with W and once with W_q, on the same FP32 input
    w_q = _qdq_weights(onnx.load(str(q.path)).graph)
    for n in compute:
        graph.initializer.append(numpy_helper.from_array(w_q[n.name].astype(np.float32), f"{n.name}.w_q"))
        twin = helper.make_node(n.op_type, [n.input[0], f"{n.name}.w_q", *n.input[2:]], [f"{n.name}.twin"])
        twin.attribute.extend(n.attribute)
        graph.node.append(twin)
        for t in (n.output[0], f"{n.name}.twin"):
            graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in graph.output], sess.run(None, feed), strict=True))
    for n in compute:
        shift = got[f"{n.name}.twin"].astype(np.float64) - got[n.output[0]]
        shift = shift.mean(axis=tuple(i for i in range(shift.ndim) if i != 1))
        assert np.abs(shift).max() > 0
        np.testing.assert_allclose(deltas[n.name], -shift, rtol=1e-3, atol=1e-3 * np.abs(shift).max())


def test_auto_tries_equalization_and_bias_correction_before_any_fallback(separable, tmp_path):
    auto, _ = _int8(separable, tmp_path, "auto", snr_db=18.0)
    off, _ = _int8(separable, tmp_path, "off", snr_db=18.0, equalize="off", bias_correction="off")
    # measured: ptq 6.3 dB, cle 16.0 dB, cle+bc 20.7 dB -> met with every layer in INT8; without them, 2 layers in FP32
    # (clipped ranges, the cheapest fix, are tried first: no help on this net, whose trouble is weight balance)
    tried = [("ptq", 0), ("clip", 0), ("cle", 0), ("cle+bc", 0)]
    assert [(s["method"], s["fallback"]) for s in auto.steps] == tried
    assert auto.met and auto.fallback_layers == [] and auto.output_snr_db >= 18.0
    assert auto.settings["methods_tried"] == [m for m, _ in tried] and auto.output_snr_db_all_int8 < 10.0
    assert off.met and len(off.fallback_layers) >= 2 and len(auto.fallback_layers) < len(off.fallback_layers)
    assert {s["method"] for s in off.steps} == {"ptq"} and not off.settings["equalize"]
    # a bound none of them meets: the fallback goes on from the best of them (cle+bc), with fewer layers than without
    hard, _ = _int8(separable, tmp_path, "hard", snr_db=30.0)
    hard_off, _ = _int8(separable, tmp_path, "hard_off", snr_db=30.0, equalize="off", bias_correction="off")
    assert {s["method"] for s in hard.steps[4:]} == {"cle+bc"} and hard.steps[4]["fallback"] > 0
    assert hard.met and len(hard.fallback_layers) < len(hard_off.fallback_layers)


def test_modes_are_checked():
    from presso.errors import ConfigError

    with pytest.raises(ConfigError, match="equalize is auto, on or off"):
        Int8Config(equalize="yes")
    with pytest.raises(ConfigError, match="bias_correction is auto, on or off"):
        Int8Config(bias_correction=True)


def test_cli_flags_reach_the_config():
    from presso.cli.convert import _convert_options
    from presso.errors import ConfigError

    args = ("onnx", "int8", "minmax", 128, 20.0, 0.5, "auto", False, None, 18, 0, None)
    cfg = _convert_options(*args, "off", "on")
    assert (cfg.int8.equalize, cfg.int8.bias_correction) == ("off", "on")
    assert (_convert_options(*args).int8.equalize, _convert_options(*args).int8.bias_correction) == ("auto", "auto")
    with pytest.raises(ConfigError, match="--bias-correction is auto, on or off"):
        _convert_options(*args, "auto", "always")


def test_auto_equalization_fixes_the_fragile_net_without_fallback(tmp_path):
    """``FragileQuant`` (one conv1 channel 1e4 times the others, scaled back by conv2) needs conv1 and conv2 in FP32
    without CLE (tests/convert/test_convert.py); CLE brings the channel in line, so every layer stays INT8."""
    from presso.testing.models import FragileQuant

    src = _onnx(FragileQuant(), tmp_path / "fragile.onnx", 16)
    calib, check = [_images(32, 16, 0)], [_images(16, 16, 1)]
    r = quantize_int8(src, tmp_path / "q.onnx", calib, check, Int8Config(snr_db=25.0))
    # measured: all INT8 0.1 dB, clipped ranges no help (the outlier channel is a whole channel), with CLE 29.6 dB
    assert [(s["method"], s["met"]) for s in r.steps] == [("ptq", False), ("clip", False), ("cle", True)]
    assert r.met and r.fallback_layers == [] and r.output_snr_db >= 25.0 and r.output_snr_db_all_int8 < 5.0
    assert r.settings["equalization"]["largest_scale"] > 1e3


def test_the_plan_goes_in_order_of_cost():
    from presso.convert.equalize import plan

    assert plan("auto", "auto") == [(False, False), (True, False), (True, True)]
    assert plan("off", "auto") == [(False, False), (False, True)]
    assert plan("on", "auto") == [(True, False), (True, True)]
    assert plan("auto", "on") == [(False, True), (True, True)]
    assert plan("on", "off") == [(True, False)] and plan("off", "off") == [(False, False)]


def test_auto_corrects_the_biases_of_the_better_graph(tmp_path):
    """Bias correction goes on whichever graph quantized better, plain or equalized, and the best file is delivered.
    On this plain CNN (channels already balanced) that depends on the weights' range: with full-range weights CLE
    loses SNR (per-channel weights need no balancing), with 7-bit ones (CPUs without VNNI) it gains."""
    torch.manual_seed(0)
    src = _onnx(_randomise_batchnorm(_plain_cnn()), tmp_path / "plain.onnx", 16)
    cfg = Int8Config(snr_db=60.0, max_fallback=0.0)  # out of reach, and no fallback: every fix is tried
    r = quantize_int8(src, tmp_path / "q.onnx", [_images(64, 16, 2)], [_images(32, 16, 3)], cfg)
    # measured: full range (VNNI) ptq 38.4 dB, cle 35.0 dB, bc on the plain graph 39.6 dB; 7-bit weights (AVX2)
    # ptq 29.9 dB, clip 29.1 dB, cle 34.5 dB, cle+bc 39.0 dB
    snr = {s["method"]: s["value"] for s in r.steps}
    cle_better = snr["cle"] > max(snr["ptq"], snr["clip"])
    assert cle_better is REDUCED  # as measured on each kind of CPU
    bc = "cle+bc" if cle_better else "bc"
    assert list(snr) == ["ptq", "clip", "cle", bc] and max(snr["ptq"], snr["clip"], snr["cle"]) < snr[bc]
    assert r.settings["equalize"] is cle_better and r.settings["bias_correction"] and not r.met
    assert r.output_snr_db == pytest.approx(snr[bc], abs=0.01) and r.fallback_layers == []


def test_clipped_ranges_come_first_when_one_outlier_stretches_min_max(tmp_path):
    """One calibration value 100 times the rest stretches the min-max range of the input (and what follows): every
    normal image is then quantized coarsely. The 99.99th-percentile ranges, tried before CLE, fix it."""
    torch.manual_seed(0)
    src = _onnx(_randomise_batchnorm(_plain_cnn()), tmp_path / "plain.onnx", 16)
    calib = _images(64, 16, 4)
    calib[0, 0, 0, 0] = 400.0  # a hot pixel in one calibration image
    r = quantize_int8(src, tmp_path / "q.onnx", [calib], [_images(32, 16, 5)], Int8Config(snr_db=25.0))
    snr = {s["method"]: s["value"] for s in r.steps}
    assert list(snr) == ["ptq", "clip"] and snr["ptq"] < 20.0 <= 25.0 <= snr["clip"], snr
    assert r.met and r.fallback_layers == [] and r.settings["method"] == "percentile"
    plain = quantize_int8(src, tmp_path / "p.onnx", [calib], [_images(32, 16, 5)],
                          Int8Config(snr_db=25.0, equalize="off", bias_correction="off"))  # fmt: skip
    assert [s["method"] for s in plain.steps][:1] == ["ptq"] and "clip" not in {s["method"] for s in plain.steps}
