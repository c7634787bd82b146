"""Datasets: built-in sets, on-disk formats, deterministic splits, preprocessing, and a clear error per bad case."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from presso.data import Preprocess, calibration_batches, formats, load_data, preprocess_for
from presso.errors import ConfigError, DataError
from presso.models import InputSpec


def _save(path, size=(12, 12), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _image_folder(root, classes=("cat", "dog"), per_class=5, size=(12, 12)):
    for k, c in enumerate(classes):
        for i in range(per_class):
            _save(root / c / f"{i}.png", size, (40 * k, 10 * i, 100))
    return root


# --------------------------------------------------------------------------- built-in
def test_digits_are_rgb_at_the_requested_size_with_a_seeded_split():
    b = load_data("digits:size=16")
    assert b.classes == [str(k) for k in range(10)] and b.labeled and not b.flip
    assert len(b.train) + len(b.val) == 1797 and len(b.val) == 180
    x, y = b.train.at((16, 16), 3)[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and 0 <= int(y) < 10
    again, other = load_data("digits:size=16"), load_data("digits:size=16", seed=1)
    assert np.array_equal(again.val.labels, b.val.labels) and np.array_equal(again.val.images, b.val.images)
    assert not np.array_equal(other.val.images, b.val.images)


def test_shapes_are_seeded_balanced_and_sized():
    a = load_data("shapes:n=60,size=20,classes=4,seed=3")
    b = load_data("shapes:n=60,size=20,classes=4,seed=3")
    c = load_data("shapes:n=60,size=20,classes=4,seed=4")
    assert a.classes == ["circle", "square", "triangle", "cross"]
    assert np.array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.train.images, c.train.images)
    labels = np.concatenate([a.train.labels, a.val.labels])
    assert np.bincount(labels).tolist() == [15, 15, 15, 15]
    assert a.train.native() == ((20, 20), 3)


@pytest.mark.parametrize("spec", ["shapes:classes=1", "shapes:size=4", "shapes:colour=2", "digits:size=x"])
def test_bad_builtin_options_name_the_option(spec):
    with pytest.raises((ConfigError, DataError)):
        load_data(spec)


def test_unknown_data_name_suggests_the_closest():
    with pytest.raises(DataError, match="digits"):
        load_data("digit")


# --------------------------------------------------------------------------- folders and CSV
def test_image_folder_with_train_and_val(tmp_path):
    _image_folder(tmp_path / "train")
    _image_folder(tmp_path / "val", per_class=2)
    b = load_data(tmp_path)
    assert b.classes == ["cat", "dog"] and b.val_from == "given"
    assert (len(b.train), len(b.val)) == (10, 4)
    assert b.train.labels.tolist() == [0] * 5 + [1] * 5


def test_single_image_folder_is_split_by_seed(tmp_path):
    _image_folder(tmp_path, per_class=10)
    b = load_data(tmp_path, val_fraction=0.2)
    assert (len(b.train), len(b.val), b.val_from) == (16, 4, "split")


def test_loose_images_are_unlabeled(tmp_path):
    for i in range(4):
        _save(tmp_path / f"{i}.jpg")
    b = load_data(tmp_path)
    assert b.classes is None and not b.labeled
    b2 = load_data(f"unlabeled:{tmp_path}")
    assert not b2.labeled


def test_csv_of_path_and_label(tmp_path):
    for i in range(6):
        _save(tmp_path / "img" / f"{i}.png")
    rows = ["path,label"] + [f"img/{i}.png,{'a' if i % 2 else 'b'}" for i in range(6)]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    b = load_data(tmp_path / "labels.csv")
    assert b.classes == ["a", "b"]
    assert len(b.train) + len(b.val) == 6


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_data(tmp_path)


def test_one_class_only_is_a_clear_error(tmp_path):
    _image_folder(tmp_path, classes=("cat",))
    with pytest.raises(DataError, match="one class only.*unlabeled:"):
        load_data(tmp_path)


def test_unreadable_images_are_skipped_with_a_count(tmp_path):
    _image_folder(tmp_path, per_class=4)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        b = load_data(tmp_path)
    assert len(b.train) + len(b.val) == 8


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be read"):
        load_data(tmp_path)


def test_mismatched_image_sizes_ask_for_an_image_size(tmp_path):
    _image_folder(tmp_path, per_class=3, size=(12, 12))
    _save(tmp_path / "cat" / "big.png", (20, 16))
    b = load_data(tmp_path)
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        preprocess_for(b)
    pp = preprocess_for(b, image_size=10)
    assert pp.size == (10, 10)
    x, _ = b.train.at(pp.size, pp.channels)[0]
    assert x.shape == (3, 10, 10)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nope")


# --------------------------------------------------------------------------- IDX and CIFAR
def _idx(path, array, gz=True):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    _idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (5, 28, 28)), gz=False)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5) % 10, gz=False)
    b = load_data(tmp_path)
    assert (len(b.train), len(b.val), b.val_from) == (20, 5, "given")
    assert b.train.native() == ((28, 28), 1)
    fm = load_data(f"fashion-mnist:{tmp_path}")
    assert fm.classes[0] == "T-shirt/top"


def test_truncated_idx_is_an_error(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 8, 8)), gz=False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    _idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4), gz=False)
    with pytest.raises(DataError, match="truncated"):
        load_data(tmp_path)


def test_idx_labels_that_do_not_match_images(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 8, 8)), gz=False)
    _idx(tmp_path / "train-labels-idx1-ubyte", np.arange(3), gz=False)
    with pytest.raises(DataError, match="4 images but 3 labels"):
        load_data(tmp_path)


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(formats, "_dpkg_location", lambda package: None)
    monkeypatch.setattr(formats, "FASHION_MNIST_DEFAULT", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")


def test_cifar_binary_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1.bin", 6), ("test_batch.bin", 3)):
        rec = np.concatenate([(np.arange(n) % 10)[:, None], rng.integers(0, 255, (n, 3072))], 1)
        (tmp_path / name).write_bytes(rec.astype(np.uint8).tobytes())
    b = load_data(tmp_path)
    assert (len(b.train), len(b.val)) == (6, 3) and b.train.native() == ((32, 32), 3)
    assert b.train.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar_python_batches_load_arrays_only(tmp_path):
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 255, (4, 3072)).astype(np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c", b"d"]}))
    b = load_data(tmp_path)
    assert b.classes == ["a", "b", "c", "d"] and len(b.train) == 4


class _Hostile:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_hostile_cifar_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": _Hostile(), "labels": [0]}))
    with pytest.raises(DataError, match="refusing to load"):
        load_data(tmp_path)
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- preprocessing
def test_preprocess_round_trips_and_normalises():
    pp = Preprocess(size=(8, 8), channels=1, mean=(0.5,), std=(0.25,))
    assert Preprocess.from_json(pp.to_json()) == pp
    x = pp.normalize(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_preprocess_measures_statistics_and_follows_the_model_channels():
    from presso.models.builtin import resnet8

    b = load_data("digits:size=12")
    pp = preprocess_for(b, resnet8(in_chans=1))
    assert pp.channels == 1 and pp.size == (12, 12)
    assert 0.0 < pp.mean[0] < 0.6 and 0.1 < pp.std[0] < 0.6


def test_calibration_batches_from_any_data_spec():
    batches = calibration_batches("shapes:n=40,size=16", InputSpec.parse("1,1,24,24"), batches=2, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 1, 24, 24)] * 2
    assert abs(float(torch.cat(batches).mean())) < 1.0


def test_an_image_that_fails_to_decode_later_is_dropped_from_its_batch_by_name(tmp_path):
    from presso.data.images import collate

    _image_folder(tmp_path, per_class=3, size=(16, 16))
    victim = tmp_path / "cat" / "0.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(victim)
    victim.write_bytes(victim.read_bytes()[:200])  # the header still reads; the pixels do not
    b = load_data(tmp_path, val_fraction=0.5)
    files = b.train.files + b.val.files
    assert victim in files  # it passed the scan
    ds = (b.train if victim in b.train.files else b.val).at((16, 16), 3)
    with pytest.warns(UserWarning, match="0.png"):
        items = [ds[i] for i in range(len(ds))]
    x, y = collate(items)
    assert len(x) == len(items) - 1 == len(y)


def test_calibration_meets_the_model_and_warns_when_its_labels_differ():
    from presso.data import model_calibration_batches, warn_if_labels_differ
    from presso.models import load_model

    model = load_model("presso:resnet8", num_classes=6, in_chans=1)
    model.presso_card.labels = [f"shape{i}" for i in range(6)]
    digits = load_data("digits:size=8")  # 8x8 RGB digits for a 1-channel 20x20 model: resized and made gray
    with pytest.warns(UserWarning, match=r"trained on 6 classes \(shape0, shape1, shape2, ...\) but the calibration"):
        batches = model_calibration_batches(model, digits, "1,1,20,20", batches=2, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 1, 20, 20)] * 2
    model.presso_card.labels = list(digits.classes)
    assert warn_if_labels_differ(model, digits) is None
