"""Detectors through the launcher: convert (FP32 verified against PyTorch, INT8 scored by COCO mAP), package, and
predict -- boxes decoded as PyTorch decodes them, mapped back to each image's own pixels, drawn with --save, and the
same from the bundle's own predict.py without PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import presso
from presso.cli import app
from presso.convert import ConvertConfig
from presso.errors import BundleError, ConfigError
from presso.testing.yolo import tiny_yolo_yaml

runner = CliRunner()
CLASSES = ["circle", "square", "triangle"]
# 25 epochs: at 15 the model had learned little, and by chance -- mAP50 0.364 on one CPU (AVX-512), 0.168 on another
# (AVX2: its float rounding took training elsewhere); at 25, 0.374 on the AVX2 CPU
EPOCHS, TRAINED_MAP50 = 25, 0.2
# What INT8 (per-channel weights, min-max activations, the head's decoding in FP32) may cost this detector in mAP50
# and mAP50-95 on the 40 held-out images; measured on the 15-epoch model (AVX-512 CPU): mAP50 0.364 -> 0.368,
# mAP50-95 0.208 -> 0.205 (one box more or less moves mAP50 by about 0.01 here)
INT8_MAP_DROP = 0.03
CONF = 0.1  # below the default 0.25: a briefly trained model's boxes are not all confident, and the test needs boxes


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """The tiny YOLO trained on shapes-det once, its directory and the model loaded back from it."""
    root = tmp_path_factory.mktemp("detector")
    # YOLOv8's layout at an eighth of the nano width (0.35 M parameters): it learns shapes-det in ~130 s on one core
    yaml = tiny_yolo_yaml(root, "tiny.yaml")
    torch.manual_seed(0)
    model = presso.load_model(f"ultralytics:{yaml}", num_classes=3)
    cfg = presso.TrainConfig(epochs=EPOCHS, batch_size=8, lr=5e-3, warmup=0.1, seed=0)
    presso.train(model, "shapes-det", cfg, output_dir=root / "model")
    model = presso.load_model(root / "model")
    card = model.presso_card
    assert card.task == "detect" and card.labels == CLASSES and card.figures["map50"] > TRAINED_MAP50, card.figures
    return root / "model", model


@pytest.fixture(scope="module")
def fp32(detector, tmp_path_factory):
    """The detector converted to FP32 ONNX with shapes-det as its labelled data, and packaged."""
    _, model = detector
    out = tmp_path_factory.mktemp("fp32")
    result = presso.convert(model, "1,3,64,64", ConvertConfig(), output_dir=out / "onnx", calib="shapes-det")
    bundle = presso.package(out / "onnx", out, name="det.zip").path
    return result, bundle


def _val_images(folder: Path, n: int, size: tuple[int, int]) -> tuple[list[Path], np.ndarray]:
    """``n`` held-out shapes-det images saved at ``size`` (W, H) -- not the model's 64 x 64 -- and the same images as
    the bundle decodes them for the model, uint8 [n, 3, 64, 64]."""
    from PIL import Image

    from presso.convert.predict import load_image

    folder.mkdir(exist_ok=True)
    val = presso.load_data("shapes-det").val
    paths = []
    for i in range(n):
        p = folder / f"val{i}.png"
        Image.fromarray(val.images[i]).resize(size, Image.BILINEAR).save(p)
        paths.append(p)
    return paths, np.stack([load_image(p, 3, (64, 64)) for p in paths])


# ----------------------------------------------------------------------------- convert
def test_fp32_onnx_matches_pytorch_and_scores_what_training_scored(detector, fp32, tmp_path):
    _, model = detector
    result, _ = fp32
    assert result.diff["max_rel_diff"] < 1e-4 and result.diff["verified_batches"] == 5  # the example + 4 image batches
    import onnxruntime as ort

    from presso.data import calibration_batches
    from presso.models.spec import InputSpec

    x = torch.cat(calibration_batches("shapes-det", InputSpec.parse("1,3,64,64"), batches=1, batch_size=8))
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1].numpy()})[0] for i in range(8)])
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert onnx_out.shape == torch_out.shape == (8, 4 + 3, 84)  # 8x8 + 4x4 + 2x2 anchors at 64 px
    assert np.abs(onnx_out - torch_out).max() / np.abs(torch_out).max() < 1e-4
    acc = result.accuracy
    assert acc["metric"] == "map50_95" and acc["n"] == 40 and acc["data"] == "shapes-det"
    # one file scored twice: no change; and ONNX Runtime scores the held-out split as training's PyTorch did
    assert acc["map50_95_change"] == 0.0 and acc["fp32_map50"] == acc["converted_map50"]
    assert acc["fp32_map50_95"] == pytest.approx(model.presso_card.figures["map50_95"], abs=0.005)
    assert acc["fp32_map50"] == pytest.approx(model.presso_card.figures["map50"], abs=0.005)
    # FP16 of the same graph (two Resize nodes share their scales: the converter's duplicate Cast is merged)
    from presso.convert.quantize import to_fp16

    half = ort.InferenceSession(str(to_fp16(result.path, tmp_path / "h.onnx")), providers=["CPUExecutionProvider"])
    half_out = half.run(None, {half.get_inputs()[0].name: x[:1].numpy()})[0]
    assert np.abs(half_out - torch_out[:1]).max() / np.abs(torch_out).max() < 3e-2


def test_int8_cli_reports_map_within_the_bound(detector, tmp_path):
    src, _ = detector
    args = ["convert", str(src), "-o", str(tmp_path / "q"), "-p", "int8", "--calib", "shapes-det", "--json"]
    r = runner.invoke(app, [*args, "--calib-samples", "64"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    acc = out["accuracy"]
    keys = {"metric", "fp32_map50_95", "converted_map50_95", "map50_95_change", "fp32_map50", "converted_map50", "n"}
    assert keys <= set(acc) and "fp32_top1" not in acc and acc["n"] == 40
    assert acc["fp32_map50"] > TRAINED_MAP50
    assert acc["converted_map50"] >= acc["fp32_map50"] - INT8_MAP_DROP, acc
    assert acc["converted_map50_95"] >= acc["fp32_map50_95"] - INT8_MAP_DROP, acc
    assert acc["map50_95_change"] == pytest.approx(acc["converted_map50_95"] - acc["fp32_map50_95"], abs=1e-5)
    assert out["size_bytes"] < 0.6 * out["size_bytes_fp32"], out.get("int8")
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "bad"), "-p", "int8", "--calib", "digits"])
    assert r.exit_code == 2 and "detect model but the labelled data 'digits' holds class labels" in r.output


def test_a_detector_without_recorded_preprocessing_is_fed_0_to_1_pixels(detector, tmp_path):
    """A detector whose card records no preprocessing (a trusted Ultralytics .pt) is calibrated, scored and packaged
    on 0..1 pixels, as detectors expect -- not normalised by the data's mean/std, which loses its boxes."""
    import copy
    import dataclasses

    _, trained = detector
    model = copy.deepcopy(trained)
    model.presso_card = dataclasses.replace(model.presso_card, preprocess=None)
    result = presso.convert(model, "1,3,64,64", ConvertConfig(), output_dir=tmp_path / "onnx", calib="shapes-det")
    card = json.loads((tmp_path / "onnx" / "presso.json").read_text())
    assert card["preprocess"]["mean"] == [0.0] * 3 and card["preprocess"]["std"] == [1.0] * 3
    assert card["preprocess"]["size"] == [64, 64]
    assert result.accuracy["fp32_map50"] == pytest.approx(trained.presso_card.figures["map50"], abs=0.02)


# ----------------------------------------------------------------------------- package and predict
def test_bundle_boxes_are_ort_and_pytorch_boxes_in_the_image_pixels(detector, fp32, tmp_path):
    from presso.convert.predict import Predictor, decode_dense_numpy
    from presso.tasks.boxes import decode_dense

    _, model = detector
    _, bundle = fp32
    paths, x = _val_images(tmp_path / "imgs", 6, (128, 96))  # W0 = 2 W, H0 = 1.5 H
    pred = Predictor(bundle)
    assert pred.task == "detect" and pred.num_classes == 3
    found = pred.boxes(x, conf=CONF)
    # the same file run directly and decoded here
    import onnxruntime as ort

    with zipfile.ZipFile(bundle) as zf:
        sess = ort.InferenceSession(zf.read("model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    y = np.concatenate([sess.run(None, {name: x[i : i + 1] / np.float32(255)})[0] for i in range(len(x))])
    direct = decode_dense_numpy(y, conf=CONF)
    with torch.no_grad():
        reference = decode_dense(model(torch.from_numpy(x).float() / 255), conf=CONF)
    assert sum(len(f["boxes"]) for f in found) >= 6  # it detects something in these images
    for f, d, t in zip(found, direct, reference, strict=True):
        assert np.array_equal(f["boxes"], d["boxes"]) and np.array_equal(f["labels"], d["labels"])
        assert np.array_equal(f["labels"], t["labels"].numpy())
        np.testing.assert_allclose(f["boxes"], t["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(f["scores"], t["scores"].numpy(), atol=1e-4)

    r = runner.invoke(app, ["predict", str(bundle), *map(str, paths), "--conf", str(CONF), "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["predictions"]
    assert [p["image"] for p in results] == [str(p) for p in paths]
    for res, f in zip(results, found, strict=True):
        dets = res["detections"]
        assert set(res) == {"image", "detections"} and len(dets) == len(f["boxes"])
        assert all(set(d) == {"label", "class", "score", "box"} for d in dets)
        assert [d["label"] for d in dets] == [CLASSES[c] for c in f["labels"]]
        expect = (f["boxes"] * [2.0, 1.5, 2.0, 1.5]).clip(0, [128, 96, 128, 96])
        np.testing.assert_allclose([d["box"] for d in dets], expect.reshape(-1, 4), atol=0.006)
        np.testing.assert_allclose([d["score"] for d in dets], f["scores"], atol=5e-5)
    r = runner.invoke(app, ["predict", str(bundle), str(paths[0]), "--conf", "1.5"])
    assert r.exit_code == 2 and "--conf" in r.output and "[0, 1)" in r.output and "Traceback" not in r.output
    with pytest.raises(ConfigError, match=r"conf \(the lowest box score kept\) must be in \[0, 1\), not 1.5"):
        Predictor(bundle).boxes(x, conf=1.5)  # the library (and predict.py on a device) checks it too


def test_save_draws_the_boxes_and_never_overwrites_an_input(fp32, tmp_path):
    from PIL import Image

    _, bundle = fp32
    paths, _ = _val_images(tmp_path / "imgs", 3, (128, 96))
    saved = tmp_path / "d"
    args = ["predict", str(bundle), *map(str, paths), "--conf", str(CONF), "--json"]
    r = runner.invoke(app, [*args, "--save", str(saved)])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["predictions"]
    boxes = 0
    for path, res in zip(paths, results, strict=True):
        assert res["saved"] == str(saved / f"{path.stem}.png")
        before, after = np.asarray(Image.open(path).convert("RGB")), np.asarray(Image.open(res["saved"]))
        assert after.shape == before.shape
        changed = (before != after).any(axis=2)
        for d in res["detections"]:  # the top-left corner of every box is drawn over
            x1, y1 = (int(v) for v in d["box"][:2])
            assert changed[max(y1 - 1, 0) : y1 + 2, max(x1 - 1, 0) : x1 + 2].any(), d
            boxes += 1
        assert changed.mean() < 0.5  # outlines and labels, not the whole image
    assert boxes >= 3
    original = paths[0].read_bytes()
    r = runner.invoke(app, ["predict", str(bundle), str(paths[0]), "--save", str(paths[0].parent)])
    assert r.exit_code == 2 and "would overwrite the input image" in r.output and "Traceback" not in r.output
    assert paths[0].read_bytes() == original
    assert "--save" in runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output


def test_a_detect_card_on_a_classifier_is_refused(fp32, tmp_path):
    """The card says detect, the model outputs [N, classes] (or rows for other labels): one clear line."""
    from presso.convert.predict import Predictor

    _, bundle = fp32
    with zipfile.ZipFile(bundle) as zf:
        card = json.loads(zf.read("presso.json"))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3))  # fmt: skip
    presso.convert(net, "1,3,64,64", ConvertConfig(), output_dir=tmp_path / "cls")
    classifier = (tmp_path / "cls" / "model.onnx").read_bytes()
    with zipfile.ZipFile(bundle) as zf:
        detector = zf.read("model.onnx")
    for model, labels, message in [
        (classifier, CLASSES, r"outputs shape \[1, 3\], not the dense detections \[batch, 4 \+ 3 labels, anchors\]"),
        (detector, CLASSES[:2], r"outputs shape \[1, 7, 84\], not the dense detections \[batch, 4 \+ 2 labels"),
    ]:
        path = tmp_path / "lying.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model.onnx", model)
            zf.writestr("presso.json", json.dumps({**card, "labels": labels}))
        with pytest.raises(BundleError, match=message):
            Predictor(path)
        r = runner.invoke(app, ["predict", str(path), str(tmp_path / "x.png")])
        assert r.exit_code == 2 and "card says it detects" in r.output and "Traceback" not in r.output


def test_the_bundles_predict_py_detects_without_torch(fp32, tmp_path):
    _, bundle = fp32
    paths, _ = _val_images(tmp_path / "imgs", 3, (96, 80))
    r = runner.invoke(app, ["predict", str(bundle), *map(str, paths), "--json", "--conf", str(CONF)])
    expected = json.loads(r.stdout)["predictions"]
    with zipfile.ZipFile(bundle) as zf:
        zf.extract("predict.py", tmp_path / "device")
        assert "--conf 0.25" in zf.read("README.txt").decode()
    blocker = (
        "import sys, runpy; sys.modules['torch'] = None; sys.modules['presso'] = None; "
        f"sys.argv = ['predict.py', {str(bundle)!r}, *{[str(p) for p in paths]!r}, '--json', '--conf', '{CONF}', "
        f"'--save', {str(tmp_path / 'drawn')!r}]; "
        f"runpy.run_path({str(tmp_path / 'device' / 'predict.py')!r}, run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["predictions"]
    assert [g["detections"] for g in got] == [e["detections"] for e in expected]
    assert sum(len(e["detections"]) for e in expected) >= 3
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [p.with_suffix(".png").name for p in paths]
