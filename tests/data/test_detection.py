"""Detection data: the built-in scenes, COCO / YOLO / VOC read identically, boxes follow resizing and augmentation,
batches, and one clear error naming the file and row for each kind of bad annotation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from presso.data import batches, formats, load_data, preprocess_for
from presso.data.detection import DetectionImages, augment_detection, box_stats
from presso.errors import ConfigError, DataError

CLASSES = ["circle", "square"]
# (width, height) and boxes (label, x1, y1, x2, y2) in pixels; images 0-3 train, 4-5 val; image 5 has no box
SIZES = [(48, 40), (48, 40), (40, 48), (48, 40), (40, 48), (48, 40)]
BOXES = [
    [(0, 2, 3, 20, 15), (1, 25, 10, 47, 39)],
    [(1, 0, 0, 48, 40)],
    [(0, 5, 5, 12, 30), (0, 20, 30, 38, 46), (1, 1, 40, 9, 47)],
    [(1, 10, 10, 30, 20)],
    [(0, 3, 4, 33, 44)],
    [],
]
TRAIN, VAL = [0, 1, 2, 3], [4, 5]


def _draw(path, i):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", SIZES[i], (20, 20, 20))
    d = ImageDraw.Draw(im)
    for label, x1, y1, x2, y2 in BOXES[i]:
        d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=(230, 40 + 150 * label, 60))
    im.save(path)


def _coco_file(path, ids, image_prefix=""):
    images = [{"id": 100 + i, "file_name": f"{image_prefix}img{i}.png", "width": SIZES[i][0], "height": SIZES[i][1]}
              for i in ids]  # fmt: skip
    anns = [
        {"id": 1000 + 10 * i + j, "image_id": 100 + i, "category_id": 7 + 5 * lab, "bbox": [x1, y1, x2 - x1, y2 - y1],
         "iscrowd": 0, "area": (x2 - x1) * (y2 - y1)}
        for i in ids for j, (lab, x1, y1, x2, y2) in enumerate(BOXES[i])
    ]  # fmt: skip
    anns.append({"id": 999, "image_id": 100 + ids[0], "category_id": 7, "bbox": [0, 0, 500, 500], "iscrowd": 1})
    cats = [{"id": 12, "name": "square"}, {"id": 7, "name": "circle"}]  # out of order: sorted by id -> circle, square
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def write_coco(root):
    for i in range(6):
        _draw(root / "images" / f"img{i}.png", i)
    _coco_file(root / "annotations" / "instances_train.json", TRAIN)
    _coco_file(root / "annotations" / "instances_val.json", VAL)
    return root


def write_yolo(root):
    for part, ids in (("train", TRAIN), ("val", VAL)):
        for i in ids:
            _draw(root / "images" / part / f"img{i}.png", i)
            w, h = SIZES[i]
            rows = [f"{lab} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}"
                    for lab, x1, y1, x2, y2 in BOXES[i]]  # fmt: skip
            if rows:  # image 5: no label file at all (YOLO's background image)
                (root / "labels" / part).mkdir(parents=True, exist_ok=True)
                (root / "labels" / part / f"img{i}.txt").write_text("\n".join(rows) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: circle\n  1: square\n")
    return root


def _voc_xml(i, filename=None):
    objects = "".join(
        f"<object><name>{CLASSES[lab]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for lab, x1, y1, x2, y2 in BOXES[i]
    )
    w, h = SIZES[i]
    return (f"<annotation><filename>{filename or f'img{i}.png'}</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")  # fmt: skip


def write_voc(root):
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for i in range(6):
        _draw(root / "JPEGImages" / f"img{i}.png", i)
        (root / "Annotations" / f"img{i}.xml").write_text(_voc_xml(i))
    for part, ids in (("train", TRAIN), ("val", VAL)):
        (root / "ImageSets" / "Main" / f"{part}.txt").write_text("".join(f"img{i}\n" for i in ids))
    return root


def _by_name(images: DetectionImages) -> dict:
    return {f.stem: t for f, t in zip(images.files, images.targets, strict=True)}


def _expected(i):
    boxes = np.array([b[1:] for b in BOXES[i]], dtype=np.float32).reshape(-1, 4)
    return boxes, np.array([b[0] for b in BOXES[i]], dtype=np.int64)


# --------------------------------------------------------------------------- shapes-det
def test_shapes_det_sizes_counts_classes_and_determinism():
    a = load_data("shapes-det:n=50,size=48,classes=4,seed=3,max_objects=3")
    again = load_data("shapes-det:n=50,size=48,classes=4,seed=3,max_objects=3")
    other = load_data("shapes-det:n=50,size=48,classes=4,seed=4,max_objects=3")
    assert a.task == "detect" and a.labeled and a.flip and a.classes == ["circle", "square", "triangle", "cross"]
    assert (len(a.train), len(a.val), a.val_from) == (45, 5, "split")
    assert a.train.native() == ((48, 48), 3) and a.train.images.shape == (45, 48, 48, 3)
    counts = [len(t["labels"]) for t in a.train.targets]
    assert min(counts) >= 1 and max(counts) <= 3
    assert set(np.concatenate([t["labels"] for t in a.train.targets]).tolist()) == {0, 1, 2, 3}
    assert np.array_equal(a.train.images, again.train.images)
    pairs = zip(a.train.targets, again.train.targets, strict=True)
    assert all(np.array_equal(x["boxes"], y["boxes"]) for x, y in pairs)
    assert not np.array_equal(a.train.images, other.train.images)
    d = a.describe()
    assert (
        d["task"] == "detect"
        and d["boxes"]["boxes"] == sum(counts)
        and sum(d["boxes"]["per_class"].values()) == sum(counts)
    )


def test_shapes_det_boxes_are_inside_the_image_tight_and_sized():
    b = load_data("shapes-det:n=60,size=64,noise=0,seed=1")
    for img, t in zip(b.train.images, b.train.targets, strict=True):
        colours, freq = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        bg = colours[freq.argmax()]
        shape_px = np.any(img != bg, axis=2)  # no noise: everything not background is a shape
        for x1, y1, x2, y2 in t["boxes"].astype(int):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert 0.15 * 64 - 2 <= max(x2 - x1, y2 - y1) <= 0.45 * 64 + 2  # the side of a shape is 15-45% of the image
            box = shape_px[y1:y2, x1:x2]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()  # tight on all 4 sides
        if len(t["boxes"]) == 1:  # one shape: nothing of it lies outside its box
            x1, y1, x2, y2 = t["boxes"][0].astype(int)
            assert shape_px.sum() == shape_px[y1:y2, x1:x2].sum()


def test_shapes_det_generates_fast():
    import time

    start = time.perf_counter()
    load_data("shapes-det:n=400,size=64")
    assert time.perf_counter() - start < 2.0  # ~0.1 s on one core; bound generous for a loaded machine


@pytest.mark.parametrize("spec", ["shapes-det:colour=2", "shapes-det:classes=9", "shapes-det:size=8", "shapes-det:n"])
def test_bad_shapes_det_options_are_named(spec):
    with pytest.raises((ConfigError, DataError), match="shapes-det"):
        load_data(spec)


# --------------------------------------------------------------------------- the three formats agree
def test_coco_yolo_and_voc_read_the_same_boxes(tmp_path):
    coco = load_data(write_coco(tmp_path / "coco"))
    yolo = load_data(write_yolo(tmp_path / "yolo") / "data.yaml")
    voc = load_data(write_voc(tmp_path / "voc"))
    for b in (coco, yolo, voc):
        assert b.task == "detect" and b.classes == CLASSES and b.val_from == "given" and b.labeled
        assert (len(b.train), len(b.val)) == (4, 2) and b.train.native() == (None, 3)
        assert b.train.sizes() == {(48, 40), (40, 48)}
        for part, ids in ((b.train, TRAIN), (b.val, VAL)):
            got = _by_name(part)
            assert sorted(got) == sorted(f"img{i}" for i in ids)
            for i in ids:
                boxes, labels = _expected(i)
                assert np.allclose(got[f"img{i}"]["boxes"], boxes, atol=1e-3), (b.name, i)
                assert (
                    got[f"img{i}"]["labels"].tolist() == labels.tolist() and got[f"img{i}"]["boxes"].dtype == np.float32
                )
    assert coco.describe()["boxes"] == voc.describe()["boxes"] == {
        "boxes": 7, "images_without_boxes": 0, "max_per_image": 3, "per_class": {"circle": 3, "square": 4}
    }  # fmt: skip


def test_other_spellings_of_the_formats(tmp_path):
    root = write_coco(tmp_path / "coco")
    single = _coco_file(root / "all.json", list(range(6)), image_prefix="images/")
    b = load_data(single, val_fraction=0.34, seed=0)
    assert (len(b.train), len(b.val), b.val_from) == (4, 2, "split")
    assert load_data(f"coco:{single}").classes == CLASSES
    pair = load_data(f"coco:{root}/annotations/instances_train.json,{root}/annotations/instances_val.json")
    assert (len(pair.train), len(pair.val)) == (4, 2)
    assert len(load_data(f"coco:{root}").train) == 4
    yolo = write_yolo(tmp_path / "yolo")
    assert len(load_data(f"yolo:{yolo}").train) == 4 and len(load_data(yolo).val) == 2
    voc = write_voc(tmp_path / "voc")
    assert len(load_data(f"voc:{voc}").train) == 4


def test_yolo_image_lists_and_a_split_by_seed(tmp_path):
    root = write_yolo(tmp_path)
    (root / "train.txt").write_text("".join(f"./images/train/img{i}.png\n" for i in TRAIN))
    (root / "data.yaml").write_text("train: train.txt\nnames: [circle, square]\nnc: 2\n")
    b = load_data(root / "data.yaml", val_fraction=0.25)
    assert (len(b.train), len(b.val), b.val_from) == (3, 1, "split")
    got = {**_by_name(b.train), **_by_name(b.val)}
    assert np.allclose(got["img2"]["boxes"], _expected(2)[0], atol=1e-3)


def test_voc_without_image_sets_is_split_by_seed(tmp_path):
    root = write_voc(tmp_path)
    for p in (root / "ImageSets" / "Main").iterdir():
        p.unlink()
    b = load_data(root, val_fraction=0.5)
    assert (len(b.train), len(b.val), b.val_from) == (3, 3, "split")


# --------------------------------------------------------------------------- views, batches, augmentation
def test_at_scales_boxes_with_the_image_and_batches_yield_target_lists(tmp_path):
    b = load_data("shapes-det:n=20,size=64")
    view = b.train.at((32, 48), 1)
    x, t = view[3]
    assert x.shape == (1, 32, 48) and x.dtype == torch.uint8
    expect = b.train.targets[3]["boxes"] * np.array([48 / 64, 32 / 64, 48 / 64, 32 / 64], dtype=np.float32)
    assert torch.allclose(t["boxes"], torch.from_numpy(expect)) and t["labels"].dtype == torch.int64
    assert t["image_id"] == 3 and t["orig_size"] == (64, 64)
    got = list(batches(view, np.arange(10), 4))
    assert [len(tg) for _, tg in got] == [4, 4, 2]
    assert got[0][0].shape == (4, 1, 32, 48) and got[0][0].dtype == torch.uint8
    assert torch.equal(got[1][0][0], view[4][0]) and torch.equal(got[1][1][0]["boxes"], view[4][1]["boxes"])
    files = load_data(write_yolo(tmp_path) / "data.yaml")  # file-backed: the DataLoader with the detection collate
    fview = files.train.at((20, 24), 3)
    x, targets = next(iter(batches(fview, np.arange(4), 4)))
    assert x.shape == (4, 3, 20, 24) and x.dtype == torch.uint8 and isinstance(targets, list)
    name_of = {i: f.stem for i, f in enumerate(files.train.files)}
    i2 = [k for k, v in name_of.items() if v == "img2"][0]  # 40x48 (W x H) -> 24x20
    assert torch.allclose(
        targets[i2]["boxes"], torch.from_numpy(_expected(2)[0] * np.array([24 / 40, 20 / 48] * 2)).float()
    )
    pp = preprocess_for(files, image_size=(20, 24))  # statistics come from DetectionImages.sample
    assert pp.size == (20, 24) and pp.channels == 3 and 0 < pp.mean[0] < 1
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        preprocess_for(files)


def _boxes_image(n=12, seed=0, h=40, w=56):
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    targets = []
    for i in range(n):
        x1, y1 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 14))
        x2, y2 = x1 + int(rng.integers(6, 16)), y1 + int(rng.integers(6, 14))
        x[i, :, y1:y2, x1:x2] = 255
        targets.append(
            {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), "labels": torch.tensor([i % 3])}
        )
    return x, targets


def test_flip_mirrors_boxes_exactly():
    x, t = _boxes_image(n=8)
    out, moved = augment_detection(x, t, torch.Generator().manual_seed(0), flip=True, scale=(1, 1), shift=0)
    flipped = 0
    for i in range(8):
        x1, y1, x2, y2 = t[i]["boxes"][0].tolist()
        if torch.equal(out[i], x[i]):
            assert moved[i]["boxes"].tolist() == [[x1, y1, x2, y2]]
        else:
            flipped += 1
            assert torch.equal(out[i], x[i].flip(-1))
            assert moved[i]["boxes"].tolist() == [[56 - x2, y1, 56 - x1, y2]]
    assert 0 < flipped < 8
    same, _ = augment_detection(x, t, torch.Generator().manual_seed(0), flip=False, scale=(1, 1), shift=0)
    assert torch.equal(same, x)


def test_augmentation_keeps_boxes_on_the_objects_and_repeats_by_seed():
    x, t = _boxes_image(n=32)
    out, moved = augment_detection(x, t, torch.Generator().manual_seed(5), flip=True)
    again, moved2 = augment_detection(x, t, torch.Generator().manual_seed(5), flip=True)
    other, _ = augment_detection(x, t, torch.Generator().manual_seed(6), flip=True)
    assert out.dtype == torch.uint8 and torch.equal(out, again) and not torch.equal(out, other)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(moved, moved2, strict=True))
    kept = 0
    for img, tg in zip(out, moved, strict=True):
        bright = (img[0] > 127).nonzero()
        if len(tg["boxes"]) == 0:  # dropped: what is left of the object is small or gone
            assert len(bright) < 0.2 * 16 * 14 + 8
            continue
        kept += 1
        x1, y1, x2, y2 = tg["boxes"][0].tolist()
        assert 0 <= x1 < x2 <= 56 and 0 <= y1 < y2 <= 40 and len(tg["labels"]) == 1
        ys, xs = bright[:, 0].float(), bright[:, 1].float()
        assert abs(xs.min() - x1) <= 1.0 and abs(xs.max() + 1 - x2) <= 1.0  # the box stays on the pixels (1 px:
        assert abs(ys.min() - y1) <= 1.0 and abs(ys.max() + 1 - y2) <= 1.0  # bilinear edges at a zoom)
    assert kept >= 24
    fx, _ = augment_detection(x.float() / 255, t, torch.Generator().manual_seed(5), flip=True)
    assert fx.dtype == torch.float32 and torch.allclose(fx * 255, out.float(), atol=1.0)


def test_box_stats():
    t = [{"boxes": np.zeros((2, 4)), "labels": np.array([0, 2])}, {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}]
    assert box_stats(t, ["a", "b", "c"]) == {
        "boxes": 2, "images_without_boxes": 1, "max_per_image": 2, "per_class": {"a": 1, "b": 0, "c": 1}
    }  # fmt: skip


# --------------------------------------------------------------------------- bad data: one line naming file and row
def _coco_with(tmp_path, mutate):
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d["annotations"][0].update(bbox=[40, 0, 20, 10]), ["instances_train.json", "annotation id 1000",
                                                                        "outside the 48x40 image 'img0.png'"]),
        (lambda d: d["annotations"][1].update(bbox=[3, 3, 0, 10]), ["annotation id 1001", "zero or negative"]),
        (lambda d: d["annotations"][0].update(bbox=[3, "NaN", 4, 4]), ["annotation id 1000", "4 finite numbers"]),
        (lambda d: d["annotations"][2].update(category_id=9), ["annotation id 1010", "category_id 9"]),
        (lambda d: d["images"][1].update(file_name="nothere.png"), ["image id 101", "'nothere.png' not found"]),
        (lambda d: d.pop("annotations"), ["instances_train.json", 'no "annotations"']),
    ],
)  # fmt: skip
def test_bad_coco_names_the_file_and_the_annotation(tmp_path, mutate, expect):
    root = _coco_with(tmp_path, mutate)
    with pytest.raises(DataError) as e:
        load_data(root)
    for part in expect:
        assert part in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_or_empty_coco_json(tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"ann.json.*not valid JSON"):
        load_data(bad)
    bad.write_text("")
    with pytest.raises(DataError, match="ann.json"):
        load_data(bad)


@pytest.mark.parametrize(
    "rows, expect",
    [
        ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n", ["img0.txt' line 3: class 7", "names 2 classes"]),
        ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n", ["img0.txt' line 2: expected 5"]),
        ("0 0.5 nan 0.2 0.2\n", ["img0.txt' line 1: expected 5 finite numbers"]),
        ("0 0.5 0.5 0.2 0.2\n1 0.99 0.5 0.5 0.2\n", ["img0.txt' line 2", "outside the 48x40 image 'img0.png'"]),
        ("0 0.5 0.5 0.0 0.2\n", ["img0.txt' line 1", "zero or negative"]),
        ("1.5 0.5 0.5 0.2 0.2\n", ["img0.txt' line 1: class 1.5"]),
    ],
)
def test_bad_yolo_labels_name_the_file_and_line(tmp_path, rows, expect):
    root = write_yolo(tmp_path)
    (root / "labels" / "train" / "img0.txt").write_text(rows)
    with pytest.raises(DataError) as e:
        load_data(root / "data.yaml")
    for part in expect:
        assert part in str(e.value)


def test_bad_yolo_yaml_names_the_key_and_path(tmp_path):
    root = write_yolo(tmp_path)
    (root / "data.yaml").write_text("train: images/nowhere\nval: images/val\nnames: [circle, square]\n")
    with pytest.raises(DataError, match=r"data.yaml' train: '.*images/nowhere' does not exist"):
        load_data(root / "data.yaml")
    (root / "data.yaml").write_text("path: ../elsewhere\ntrain: images/train\nnames: [circle, square]\n")
    with pytest.raises(DataError, match=r"data.yaml' path: '.*elsewhere' does not exist"):
        load_data(root / "data.yaml")
    (root / "data.yaml").write_text("train: images/train\nnames: [a\n")
    with pytest.raises(DataError, match="data.yaml' is not valid YAML at line"):
        load_data(root / "data.yaml")
    (root / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DataError, match="has no names"):
        load_data(root / "data.yaml")
    (root / "list.txt").write_text("images/train/img0.png\nimages/train/gone.png\n")
    (root / "data.yaml").write_text("train: list.txt\nnames: [circle, square]\n")
    with pytest.raises(DataError, match=r"list.txt' line 2: image 'images/train/gone.png' not found"):
        load_data(root / "data.yaml")


@pytest.mark.parametrize(
    "xml, expect",
    [
        ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]><annotation>&x;</annotation>', "DOCTYPE or ENTITY"),
        ("<annotation><filename>img0.png</filename><object>", "img0.xml' is not valid XML (line 1)"),
        ("", "img0.xml' is not valid XML"),
        (_voc_xml(0).replace("<xmax>47</xmax>", "<xmax>60</xmax>"), "img0.xml' object 2 ('square')"),
        (_voc_xml(0).replace("<xmin>3</xmin>", "<xmin>x</xmin>"), "img0.xml' object 1 ('circle'): <bndbox> needs 4"),
    ],
)
def test_bad_voc_names_the_file_and_object(tmp_path, xml, expect):
    root = write_voc(tmp_path)
    (root / "Annotations" / "img0.xml").write_text(xml)
    with pytest.raises(DataError) as e:
        load_data(root)
    assert expect in str(e.value) and "img0.xml" in str(e.value)


def test_voc_filename_pointing_nowhere(tmp_path):
    root = write_voc(tmp_path)
    (root / "Annotations" / "img0.xml").write_text(_voc_xml(0, filename="missing.png"))
    assert len(load_data(root).train) == 4  # a wrong <filename>: the image named like the XML file is used
    (root / "JPEGImages" / "img0.png").unlink()
    with pytest.raises(DataError, match=r"img0.xml': image '.*JPEGImages/missing.png' not found"):
        load_data(root)


def test_voc_image_set_pointing_nowhere(tmp_path):
    root = write_voc(tmp_path)
    (root / "ImageSets" / "Main" / "val.txt").write_text("img4\nimg9\n")
    with pytest.raises(DataError, match=r"val.txt' line 2: '.*img9.xml' not found"):
        load_data(root)


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    root = write_yolo(tmp_path)
    (root / "images" / "train" / "img1.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="Skipped 1 unreadable image.*img1.png"):
        b = load_data(root / "data.yaml")
    assert b.train.skipped == 1 and len(b.train) == 3 and "img1" not in _by_name(b.train)
    assert b.val.skipped == 0 and len(b.val) == 2


def test_an_image_that_fails_to_decode_later_is_dropped_from_its_batch_by_name(tmp_path):
    b = load_data(write_yolo(tmp_path) / "data.yaml")
    victim = b.train.files[1]
    victim.write_bytes(b"gone")  # after the scan: decoding fails when the batch is read
    view = b.train.at((16, 16), 3)
    with pytest.warns(UserWarning, match=victim.name):
        x, targets = next(iter(batches(view, np.arange(4), 4)))
    assert x.shape == (3, 3, 16, 16) and [t["image_id"] for t in targets] == [0, 2, 3]


# --------------------------------------------------------------------------- fashion-scenes
def _fashion_installed() -> bool:
    try:
        formats.fashion_mnist_dir(None)
        return True
    except DataError:
        return False


@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST IDX files not installed (dataset-fashion-mnist)")
def test_fashion_scenes_tight_boxes_and_the_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PRESSO_HOME", str(tmp_path))
    b = load_data("fashion-scenes:n=20,val=6,seed=1")
    assert b.classes == formats.FASHION_MNIST_CLASSES and b.val_from == "given" and b.task == "detect"
    assert (len(b.train), len(b.val)) == (20, 6) and b.train.native() == ((144, 144), 1)
    for img, t in zip(b.train.images[..., 0], b.train.targets, strict=True):
        assert 1 <= len(t["boxes"]) <= 6 and t["labels"].max() < 10
        for x1, y1, x2, y2 in t["boxes"].astype(int):
            assert 0 <= x1 < x2 <= 144 and 0 <= y1 < y2 <= 144
            box = img[y1:y2, x1:x2] > 0
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            assert 0.8 * 28 * 0.2 <= max(x2 - x1, y2 - y1) <= 2 * 28 + 1
    cached = list((tmp_path / "cache").glob("fashion-scenes-*.npz"))
    assert len(cached) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(formats, "read_idx_dir", no_reading)
    again = load_data("fashion-scenes:n=20,val=6,seed=1")
    assert np.array_equal(again.train.images, b.train.images) and np.array_equal(again.val.images, b.val.images)
    assert all(np.array_equal(x["boxes"], y["boxes"]) for x, y in zip(again.val.targets, b.val.targets, strict=True))
    with pytest.raises(AssertionError, match="cache was not used"):  # other options: another cache entry
        load_data("fashion-scenes:n=20,val=6,seed=2")
    multi = list((tmp_path / "cache").glob("*.npz"))
    assert len(multi) == 1


@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST IDX files not installed (dataset-fashion-mnist)")
def test_fashion_scenes_with_a_size_range_is_multi_size(tmp_path, monkeypatch):
    monkeypatch.setenv("PRESSO_HOME", str(tmp_path))
    b = load_data("fashion-scenes:n=12,val=2,min_size=128,max_size=160")
    assert b.train.native() == (None, 1) and len(b.train.sizes()) > 1
    assert all(128 <= w == h <= 160 for w, h in b.train.sizes())
    assert b.train.at((64, 64), 3)[0][0].shape == (3, 64, 64)


def test_missing_fashion_mnist_names_the_package_and_the_folder_option(monkeypatch, tmp_path):
    monkeypatch.setattr(formats, "_dpkg_location", lambda package: None)
    monkeypatch.setattr(formats, "FASHION_MNIST_DEFAULT", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*fashion-scenes:DIR"):
        load_data("fashion-scenes:n=4")
