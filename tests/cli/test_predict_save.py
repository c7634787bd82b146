"""`presso predict --save DIR` never replaces a file already in DIR silently (issue 19 item 2): an earlier run's
drawing or the user's own file of the same name is refused, in one line naming it, unless --overwrite."""

import subprocess
import sys
import zipfile

import numpy as np
import pytest

import presso
from presso.cli import app

from ._helpers import ok_json, runner


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from presso.data import Preprocess

    out = tmp_path_factory.mktemp("bundle")
    model = presso.load_model("presso:resnet8", num_classes=3)
    model.presso_card.preprocess = Preprocess(size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3).to_json()
    presso.convert(model, "1,3,16,16", presso.ConvertConfig(eval_samples=0), output_dir=out / "cv")
    return presso.package(out / "cv", out, name="m.zip").path


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = [tmp_path / "in" / name for name in ("a.png", "b.jpg")]
    paths[0].parent.mkdir()
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
    return paths


def test_save_refuses_files_already_there_unless_overwrite(bundle, images, tmp_path):
    drawn = tmp_path / "drawn"
    args = ["predict", str(bundle), *map(str, images), "--save", str(drawn), "--json"]
    first = ok_json(runner.invoke(app, args))["predictions"]
    assert [p["saved"] for p in first] == [str(drawn / "a.png"), str(drawn / "b.png")]
    earlier = (drawn / "a.png").read_bytes()
    (drawn / "b.png").write_bytes(b"the user's own b.png")

    r = runner.invoke(app, args)  # the same run again: an earlier run's a.png and the user's b.png are both kept
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(drawn / "a.png") in lines[0] and "--overwrite" in lines[0], r.output
    assert (drawn / "a.png").read_bytes() == earlier and (drawn / "b.png").read_bytes() == b"the user's own b.png"

    again = ok_json(runner.invoke(app, [*args, "--overwrite"]))["predictions"]
    assert [p["saved"] for p in again] == [p["saved"] for p in first]
    assert (drawn / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # replaced by a drawing, as asked
    assert sorted(p.name for p in drawn.iterdir()) == ["a.png", "b.png"]  # no temporary file left beside them
    # an input image stays untouchable, with --overwrite too
    r = runner.invoke(app, ["predict", str(bundle), str(images[0]), "--save", str(images[0].parent), "--overwrite"])
    assert r.exit_code == 2 and "would overwrite the input image" in r.output


def test_a_failed_write_leaves_no_half_image(bundle, images, tmp_path, monkeypatch):
    from PIL import Image

    from presso.convert.predict import Predictor, save_drawn

    drawn = tmp_path / "drawn"
    drawn.mkdir()
    (drawn / "a.png").write_bytes(b"kept")
    results = Predictor(bundle).predict([str(p) for p in images])
    real = Image.Image.save

    def full(self, fp, *a, **k):  # the disk fills half-way through the first image
        real(self, fp, *a, **k)
        with open(fp, "r+b") as f:
            f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError, match="No space"):
        save_drawn(results, drawn, overwrite=True)
    assert (drawn / "a.png").read_bytes() == b"kept" and sorted(p.name for p in drawn.iterdir()) == ["a.png"]


def test_the_bundles_own_predict_py_refuses_too(bundle, images, tmp_path):
    with zipfile.ZipFile(bundle) as zf:
        zf.extract("predict.py", tmp_path / "device")
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    (drawn / "a.png").write_bytes(b"mine")
    cmd = [sys.executable, str(tmp_path / "device" / "predict.py"), str(bundle), *map(str, images), "--save",
           str(drawn)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "a.png" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (drawn / "a.png").read_bytes() == b"mine" and not (drawn / "b.png").exists()
    r = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in drawn.iterdir()) == ["a.png", "b.png"]
    assert (drawn / "a.png").read_bytes()[:4] == b"\x89PNG"
