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
