"""`presso convert` from the command line: the data meets the model (calibration and scoring at its input size)."""

import json

import pytest

from presso.cli import app

from ._helpers import ok_json, runner


@pytest.mark.slow
def test_int8_calibrates_small_data_at_the_models_input_size(tmp_path):
    out = tmp_path / "c"  # digits are 32x32; the model takes 48x48: calibration and scoring resize them to it
    res = runner.invoke(app, ["convert", "torchvision:resnet18", "--model-arg", "num_classes=10", "-s", "1,3,48,48",
                              "-p", "int8", "--calib", "digits", "--eval-samples", "64", "-o", str(out),
                              "--json"])  # fmt: skip
    data = ok_json(res)
    assert data["precision"] == "int8" and data["accuracy"]["samples"] == 64
    card = json.loads((out / "presso.json").read_text())
    assert card["preprocess"]["size"] == [48, 48] and card["input_spec"] == "1,3,48,48"


def test_max_accuracy_drop_reports_every_file_tried_and_needs_labels(tmp_path):
    """``--max-accuracy-drop``: INT8 is judged by top-1 on the labelled held-out images (each file tried is listed);
    unlabelled calibration data alone is one line naming --eval-data, before any work."""
    from PIL import Image

    out = tmp_path / "q"
    args = ["convert", "presso:resnet8", "--model-arg", "num_classes=10", "-s", "1,3,16,16", "-p", "int8",
            "--calib", "digits:size=16", "--max-accuracy-drop", "0.02", "--eval-samples", "64", "-o", str(out),
            "--json"]  # fmt: skip
    q = ok_json(runner.invoke(app, args))["int8"]
    assert q["criterion"] == "top1" and q["max_accuracy_drop"] == 0.02 and q["threshold_met"]
    assert q["steps"][0]["fallback"] == 0 and q["accuracy_fp32"] - q["accuracy_int8"] <= 0.02
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(photos / f"{i}.png")
    bad = [*args[:9], f"unlabeled:{photos}", *args[10:]]
    bad[bad.index("-o") + 1] = str(tmp_path / "bad")
    r = runner.invoke(app, bad)
    assert r.exit_code == 2 and "--eval-data" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad").exists()
