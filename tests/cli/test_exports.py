"""Exports read back: `info` and `benchmark` on an .onnx file, an OpenVINO .xml and a `presso convert` folder (never
loaded as PyTorch models), and `predict` on a folder of images."""

import json

import numpy as np
import pytest

import presso
from presso.cli import app

from ._helpers import ok_json, runner


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny model converted to OpenVINO: the folder holds model.xml/.bin and model.onnx, and its bundle."""
    from presso.data import Preprocess

    out = tmp_path_factory.mktemp("exports")
    model = presso.load_model("presso:resnet8", num_classes=3)
    # the preprocessing a bundle needs, recorded as training would (no training needed to say so)
    model.presso_card.preprocess = Preprocess(size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3).to_json()
    params = sum(p.numel() for p in model.parameters())
    presso.convert(model, "1,3,16,16", presso.ConvertConfig(to="openvino", eval_samples=0), output_dir=out / "cv")
    bundle = presso.package(out / "cv", out, name="m.zip").path
    return {"dir": out / "cv", "bundle": bundle, "torch_params": params}


@pytest.mark.parametrize("form", ["onnx", "xml", "folder"])
def test_info_reads_an_export_from_its_graph(converted, form):
    path = {"onnx": converted["dir"] / "model.onnx", "xml": converted["dir"] / "model.xml", "folder": converted["dir"]}
    s = ok_json(runner.invoke(app, ["info", str(path[form]), "--json"]))
    assert s["format"] == ("openvino" if form == "xml" else "onnx")
    assert [(t["name"], t["shape"]) for t in s["inputs"]] == [("x", [1, 3, 16, 16])]
    assert [t["shape"] for t in s["outputs"]] == [[1, 3]]
    assert s["precision"] == "fp32" and s["size_bytes"] > 4 * s["params"] * 0.9
    # BatchNorm is folded into the convolutions on export: the graph holds a little less than the PyTorch model
    assert 0.95 * converted["torch_params"] < s["params"] <= converted["torch_params"]
    assert (s["opset"] == 18) == (form != "xml")
    table = runner.invoke(app, ["info", str(path[form])])
    assert table.exit_code == 0 and "params" in table.stdout and "x float" in table.stdout.replace("f32", "float")


@pytest.mark.parametrize(
    "form,runtime",
    [("onnx", "onnxruntime"), ("xml", "openvino"), ("folder", "onnxruntime"), ("folder", "openvino")],
)
def test_benchmark_measures_an_export_as_it_is(converted, home, form, runtime):
    path = {"onnx": converted["dir"] / "model.onnx", "xml": converted["dir"] / "model.xml", "folder": converted["dir"]}
    args = ["benchmark", str(path[form]), "--runtime", runtime, "--threads", "1", "--repeat", "5", "--warmup", "1"]
    s = ok_json(runner.invoke(app, [*args, "--json"]))
    assert s["runtime"] == runtime and s["input_shape"] == "1,3,16,16" and s["precision"] == "fp32"
    assert s["latency_ms"]["median"] > 0 and s["db"]["uid"]
    size = (converted["dir"] / "model.onnx").stat().st_size
    if runtime == "openvino":  # the folder's IR is measured with OpenVINO, not its ONNX file
        size = sum((converted["dir"] / f).stat().st_size for f in ("model.xml", "model.bin"))
    assert s["model_size_bytes"] == size


def test_an_ir_needs_the_openvino_runtime(converted, home):
    r = runner.invoke(app, ["benchmark", str(converted["dir"] / "model.xml")])
    assert r.exit_code == 2 and "--runtime openvino" in r.stderr and "Traceback" not in r.output


def test_predict_takes_folders_of_images(converted, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    rng = np.random.default_rng(0)
    names = ["b.png", "a.jpg", "more/c.png", ".hidden/d.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    single = tmp_path / "e.png"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(single)

    r = runner.invoke(app, ["predict", str(converted["bundle"]), str(photos), str(single), "--top-k", "2", "--json"])
    preds = ok_json(r)["predictions"]
    assert [p["image"] for p in preds] == [str(photos / "a.jpg"), str(photos / "b.png"), str(photos / "more/c.png"),
                                           str(single)]  # fmt: skip
    for p in preds:
        assert len(p["top"]) == 2 and p["top"][0]["score"] >= p["top"][1]["score"] > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["predict", str(converted["bundle"]), str(empty)])
    assert r.exit_code == 2 and "No images in" in r.stderr
    table = runner.invoke(app, ["predict", str(converted["bundle"]), str(photos), "--top-k", "3"])
    assert table.exit_code == 0 and table.stdout.count(" | ") >= 2 * 3  # three labels and three scores per image


def test_a_noisy_benchmark_warns_and_is_flagged_in_the_database(converted, home, monkeypatch):
    from presso.bench import runner as bench_runner

    real = bench_runner.summarize
    monkeypatch.setattr(bench_runner, "summarize", lambda samples: {**real(samples), "noise_pct": 311.0})
    onnx = str(converted["dir"] / "model.onnx")
    r = runner.invoke(app, ["benchmark", onnx, "--threads", "1", "--repeat", "5", "--warmup", "1", "--json"])
    s = json.loads(r.stdout)
    assert r.exit_code == 0 and s["noisy"] is True
    assert "warning:" in r.stderr and "311%" in r.stderr and "flagged noisy" in r.stderr
    rows = ok_json(runner.invoke(app, ["db", "list", "--json"]))["rows"]
    assert [row["noisy"] for row in rows if row["noise_pct"] == 311.0] == [True]
    monkeypatch.setattr(bench_runner, "summarize", real)
    r = runner.invoke(app, ["benchmark", onnx, "--threads", "1", "--repeat", "5", "--warmup", "1", "--json"])
    assert ("warning:" in r.stderr) == json.loads(r.stdout)["noisy"]  # only a noisy run warns
