"""Readers for detection datasets on disk: COCO JSON, the Ultralytics YOLO layout and Pascal VOC.

Each reader returns ``(train, val_or_None, classes)`` of ``DetectionImages`` over the image files (decoded on access),
with boxes converted to ``xyxy`` pixels of the stored image and checked once, here: a box outside the image (beyond
1 px) or without area, a class the dataset does not name, an image the annotations point to that does not exist, a
malformed annotation file -- each is one ``DataError`` naming the file and the row. An image that exists but cannot
be decoded is skipped and counted (``skipped``), as classification's ``FileImages`` does.

Conventions:
- COCO ``bbox`` is ``[x, y, w, h]``; category ids (any ints) become 0..C-1 in sorted id order, named by
  ``categories``; ``iscrowd=1`` annotations are ignored.
- YOLO rows are ``class cx cy w h`` normalised to 0..1; the label of ``.../images/.../x.jpg`` is
  ``.../labels/.../x.txt``; a missing label file is an image without boxes (YOLO's background images).
- VOC ``xmin``/``ymin`` are 1-based pixel indices and ``xmax``/``ymax`` inclusive, so the box is
  ``(xmin - 1, ymin - 1, xmax, ymax)`` (Detectron2's reading). The class names are the sorted names found in all the
  XML files of both splits, so the ids do not depend on which split holds which class. ``difficult`` boxes are kept.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from presso.data.detection import DetectionImages
from presso.data.images import IMAGE_SUFFIXES, _probe, list_images
from presso.errors import DataError
from presso.safeio import read_bytes, read_json

Split = tuple[DetectionImages, DetectionImages | None, list[str]]

# COCO's own train2017 instances file is 448 MiB: the 16 MiB default of safeio (sized for model cards) would refuse
# the standard dataset, so annotation files get a bound that still stops a /dev/zero-sized file.
ANNOTATION_MAX_BYTES = 1 << 30
SMALL_FILE_MAX_BYTES = 16 << 20  # one YOLO label file, one VOC XML, a dataset YAML
LIST_MAX_BYTES = 256 << 20  # a YOLO .txt list of image paths or a VOC ImageSets list
TOLERANCE = 1.0  # px a box may reach beyond the image (rounding in exporters) before it is an error
_XML_DECLS = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


# --------------------------------------------------------------------------- shared: resolve, probe, check
class _Rows:
    """One image's boxes as read: xyxy pixels (or normalised cx cy w h, for YOLO), labels, and where each came
    from (for the message)."""

    def __init__(self, path: Path, normalised: bool = False):
        self.path, self.normalised = path, normalised
        self.boxes: list[list[float]] = []
        self.labels: list[int] = []
        self.refs: list[str] = []

    def add(self, box: list[float], label: int, ref: str) -> None:
        self.boxes.append(box)
        self.labels.append(label)
        self.refs.append(ref)


def _build(records: list[_Rows], classes: list[str], where: str) -> DetectionImages:
    """Probe every image (unreadable ones skipped and counted), convert and check the boxes against its size."""
    files, sizes, targets, modes, skipped = [], [], [], set(), []
    for rec in records:
        info = _probe(rec.path)
        if info is None:
            skipped.append(rec.path)
            continue
        (w, h), mode = info
        boxes = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
        if rec.normalised:  # cx cy w h in 0..1 -> xyxy pixels
            cx, cy, bw, bh = boxes[:, 0] * w, boxes[:, 1] * h, boxes[:, 2] * w, boxes[:, 3] * h
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        _check_boxes(boxes, rec, (w, h))
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        files.append(rec.path)
        sizes.append((h, w))
        modes.add(mode)
        targets.append({"boxes": boxes.astype(np.float32), "labels": np.asarray(rec.labels, dtype=np.int64)})
    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} unreadable image(s) in {where}, e.g. {skipped[0]}; remove or replace them.",
            stacklevel=4,
        )
    if not files:
        raise DataError(f"None of the images of {where} could be read ({len(skipped)} unreadable).")
    channels = 1 if modes <= {"L", "1", "I;16", "I", "F"} else 3
    return DetectionImages(
        targets, classes, files=files, image_sizes=sizes, channels=channels, skipped=len(skipped), where=where
    )


def _check_boxes(boxes: np.ndarray, rec: _Rows, wh: tuple[int, int]) -> None:
    w, h = wh
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if not (x2 > x1 and y2 > y1):
            raise DataError(f"{rec.refs[i]}: the box has zero or negative width or height; fix or remove it.")
        if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > w + TOLERANCE or y2 > h + TOLERANCE:
            raise DataError(
                f"{rec.refs[i]}: the box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
                f"{w}x{h} image '{rec.path.name}'; fix or remove it."
            )


def _numbers(values: Any, n: int) -> list[float] | None:
    """``values`` as n finite floats, else None."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return None
    try:
        out = [float(v) for v in values if not isinstance(v, bool)]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


# --------------------------------------------------------------------------- COCO
def read_coco(path: Path) -> Split:
    """One COCO instances JSON (split by seed by the caller)."""
    images, (_, classes) = _coco(path)
    return images, None, classes


def read_coco_pair(train: Path, val: Path) -> Split:
    """A COCO train JSON and val JSON: same categories, images of each resolved beside its own file."""
    train_set, categories = _coco(train)
    val_set, _ = _coco(val, expect=(train, categories))
    return train_set, val_set, categories[1]


def coco_dir_files(root: Path) -> tuple[Path, Path] | None:
    """``root/annotations/instances_train*.json`` and ``instances_val*.json``, when both are there."""
    ann = root / "annotations"
    train = sorted(ann.glob("instances_train*.json")) if ann.is_dir() else []
    val = sorted(ann.glob("instances_val*.json")) if ann.is_dir() else []
    return (train[0], val[0]) if train and val else None


def _coco_categories(path: Path, data: dict) -> tuple[dict[int, int], list[str]]:
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"COCO '{path}' has no \"categories\" list; add one entry {{id, name}} per class.")
    by_id: dict[int, str] = {}
    for j, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f'COCO \'{path}\' categories[{j}] is not {{"id": int, "name": str}}: {str(c)[:80]}.')
        if c["id"] in by_id:
            raise DataError(f"COCO '{path}' categories[{j}]: category id {c['id']} appears twice.")
        by_id[c["id"]] = c["name"]
    ids = sorted(by_id)
    return {cid: k for k, cid in enumerate(ids)}, [by_id[cid] for cid in ids]


def _coco(path: Path, expect: tuple[Path, Any] | None = None) -> tuple[DetectionImages, Any]:
    """One COCO file's images and its categories (``{category id: class id}``, names); with ``expect`` (the train
    file and its categories), the categories must be the same."""
    data = read_json(path, "COCO annotation file", max_bytes=ANNOTATION_MAX_BYTES, error=DataError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"'{path}' is not a COCO instances file: it has no \"images\" list.")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"'{path}' is not a COCO instances file: it has no \"annotations\" list.")
    index, classes = _coco_categories(path, data)
    if expect is not None and expect[1] != (index, classes):
        raise DataError(f"COCO '{path}' has other categories than '{expect[0]}'; both splits need the same ones.")
    dirs = _coco_image_dirs(path)
    records: dict[int, _Rows] = {}
    for j, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise DataError(f'COCO \'{path}\' images[{j}] is not {{"id": int, "file_name": str, ...}}.')
        if im["id"] in records:
            raise DataError(f"COCO '{path}' images[{j}]: image id {im['id']} appears twice.")
        found = next((d / im["file_name"] for d in dirs if (d / im["file_name"]).is_file()), None)
        if found is None:
            looked = ", ".join(f"'{d}'" for d in dirs)
            raise DataError(f"COCO '{path}' image id {im['id']}: '{im['file_name']}' not found (looked in {looked}).")
        records[im["id"]] = _Rows(found)
    for j, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"COCO '{path}' annotations[{j}] is not an object.")
        ref = f"COCO '{path}' annotation id {ann.get('id', f'#{j}')}"
        if ann.get("iscrowd", 0) == 1:  # crowd regions are not boxes to detect (COCO's own evaluation ignores them)
            continue
        rec = records.get(ann.get("image_id"))  # type: ignore[arg-type]
        if rec is None:
            raise DataError(f'{ref}: image_id {ann.get("image_id")!r} is not in "images".')
        if ann.get("category_id") not in index:
            raise DataError(f'{ref}: category_id {ann.get("category_id")!r} is not in "categories" {sorted(index)}.')
        box = _numbers(ann.get("bbox"), 4)
        if box is None:
            raise DataError(f"{ref}: bbox must be 4 finite numbers [x, y, w, h], not {str(ann.get('bbox'))[:80]}.")
        x, y, w, h = box
        rec.add([x, y, x + w, y + h], index[ann["category_id"]], f"{ref} (image '{rec.path.name}')")
    return _build(list(records.values()), classes, f"'{path}'"), (index, classes)


def _coco_image_dirs(path: Path) -> list[Path]:
    """Where ``file_name`` may be relative to: beside the JSON, ``images/`` beside it, and for the standard layout
    (``annotations/instances_train2017.json``) the folder above with ``train2017/`` or ``images/train2017/``."""
    here, split = path.parent, path.stem.removeprefix("instances_")
    dirs = [here, here / "images"]
    if here.name == "annotations":
        up = here.parent
        dirs += [up / split, up / "images" / split, up / "images", up]
    return dirs


# --------------------------------------------------------------------------- YOLO (Ultralytics layout)
def read_yolo(yaml_path: Path) -> Split:
    """An Ultralytics dataset YAML: ``path`` (default: the YAML's folder), ``train``, ``val`` (folders of images or
    .txt lists of image paths, relative to ``path``), ``names`` (a list or ``{id: name}``)."""
    import yaml

    raw = read_bytes(yaml_path, "dataset YAML", max_bytes=SMALL_FILE_MAX_BYTES, error=DataError)
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DataError(
            f"Dataset YAML '{yaml_path}' is not valid YAML{at}: {getattr(e, 'problem', None) or e}."
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"Dataset YAML '{yaml_path}' is empty or not a mapping; give path, train, val and names.")
    classes = _yolo_names(yaml_path, data)
    root = Path(str(data["path"])).expanduser() if data.get("path") else yaml_path.parent
    if not root.is_absolute():
        root = yaml_path.parent / root
    if not root.is_dir():
        raise DataError(f"Dataset YAML '{yaml_path}' path: '{root}' does not exist.")
    if not data.get("train"):
        raise DataError(f"Dataset YAML '{yaml_path}' has no train: give the folder (or .txt list) of training images.")
    train = _yolo_split(yaml_path, root, "train", data["train"], classes)
    val = _yolo_split(yaml_path, root, "val", data["val"], classes) if data.get("val") else None
    return train, val, classes


def _yolo_names(yaml_path: Path, data: dict) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(
                f"Dataset YAML '{yaml_path}' names: the ids must be 0..{len(names) - 1}, not {sorted(names)}."
            )
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"Dataset YAML '{yaml_path}' has no names: list the class names (a list or {{id: name}}).")
    if data.get("nc") is not None and data["nc"] != len(names):
        raise DataError(f"Dataset YAML '{yaml_path}' says nc: {data['nc']} but names {len(names)} classes.")
    return [str(n) for n in names]


def _yolo_split(yaml_path: Path, root: Path, key: str, entry: Any, classes: list[str]) -> DetectionImages:
    files: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            files += list_images(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            files += _image_list(p, root)
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            raise DataError(
                f"Dataset YAML '{yaml_path}' {key}: '{p}' does not exist (a folder or .txt list of images)."
            )
    if not files:
        raise DataError(f"Dataset YAML '{yaml_path}' {key}: '{entry}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    records = [_yolo_labels(f, yaml_path, len(classes)) for f in files]
    return _build(records, classes, f"'{yaml_path}' {key}")


def _image_list(txt: Path, root: Path) -> list[Path]:
    """A .txt of image paths: ``./x`` relative to the list's folder (as Ultralytics reads it), other relative paths
    to the dataset root, then to the list's folder."""
    text = read_bytes(txt, "image list", max_bytes=LIST_MAX_BYTES, error=DataError).decode("utf-8", "replace")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        p = Path(name).expanduser()
        options = (
            [p] if p.is_absolute() else ([txt.parent / p] if name.startswith("./") else [root / p, txt.parent / p])
        )
        found = next((o for o in options if o.is_file()), None)
        if found is None:
            raise DataError(f"Image list '{txt}' line {n}: image '{name}' not found (looked for '{options[0]}').")
        out.append(found)
    return out


def yolo_label_path(image: Path) -> Path:
    """``.../images/.../x.jpg`` -> ``.../labels/.../x.txt`` (the last ``images`` folder of the path), as Ultralytics."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _yolo_labels(image: Path, yaml_path: Path, n_classes: int) -> _Rows:
    rec = _Rows(image, normalised=True)
    label = yolo_label_path(image)
    if not label.is_file():  # YOLO's convention: an image without a label file has no objects
        return rec
    text = read_bytes(label, "YOLO label file", max_bytes=SMALL_FILE_MAX_BYTES, error=DataError)
    for n, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"YOLO label '{label}' line {n}"
        values = _numbers(fields, 5) if len(fields) == 5 else None
        if values is None:
            raise DataError(f"{where}: expected 5 finite numbers 'class cx cy w h', found '{line.strip()[:80]}'.")
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < n_classes:
            raise DataError(
                f"{where}: class {fields[0]} but '{yaml_path.name}' names {n_classes} classes (0..{n_classes - 1})."
            )
        rec.add(values[1:], int(cls), where)
    return rec


# --------------------------------------------------------------------------- Pascal VOC
def read_voc(root: Path) -> Split:
    """``root/Annotations/*.xml`` + ``root/JPEGImages``; ``ImageSets/Main/train.txt`` and ``val.txt`` when present
    give the splits (else the caller splits by seed)."""
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    for d in (ann_dir, img_dir):
        if not d.is_dir():
            raise DataError(f"VOC folder '{root}' has no {d.name}/; a VOC dataset holds Annotations/ and JPEGImages/.")
    lists = [root / "ImageSets" / "Main" / f"{s}.txt" for s in ("train", "val")]
    if all(p.is_file() for p in lists):
        splits = [_voc_ids(p, ann_dir) for p in lists]
    else:
        splits = [sorted(ann_dir.glob("*.xml")), []]
        if not splits[0]:
            raise DataError(f"VOC folder '{ann_dir}' holds no .xml annotations.")
    parsed = [[_voc_xml(x, img_dir) for x in split] for split in splits]
    classes = sorted({name for split in parsed for _, objects in split for name, _, _ in objects})
    if not classes:
        raise DataError(f"VOC folder '{root}' has no <object> in any annotation; a detector needs boxes.")
    index = {c: k for k, c in enumerate(classes)}
    sets = []
    for split, name in zip(parsed, ("train", "val"), strict=True):
        records = []
        for image, objects in split:
            rec = _Rows(image)
            for cls, box, ref in objects:
                rec.add(box, index[cls], ref)
            records.append(rec)
        sets.append(_build(records, classes, f"VOC '{root}' {name}") if records else None)
    return sets[0], sets[1], classes


def _voc_ids(listing: Path, ann_dir: Path) -> list[Path]:
    text = read_bytes(listing, "VOC image set", max_bytes=LIST_MAX_BYTES, error=DataError).decode("utf-8", "replace")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.split():
            continue
        xml = ann_dir / f"{line.split()[0]}.xml"
        if not xml.is_file():
            raise DataError(f"VOC image set '{listing}' line {n}: '{xml}' not found.")
        out.append(xml)
    if not out:
        raise DataError(f"VOC image set '{listing}' lists no images.")
    return out


def parse_xml(path: Path):
    """The root element of an XML file, refusing DOCTYPE/ENTITY declarations (entity expansion can turn a few bytes
    into gigabytes; defusedxml is not a dependency, so the declarations are refused before the parser sees them)."""
    import xml.etree.ElementTree as ET

    raw = read_bytes(path, "XML annotation", max_bytes=SMALL_FILE_MAX_BYTES, error=DataError)
    if b"\x00" in raw:  # UTF-16/32: the byte check below could not see a declaration
        raise DataError(f"XML annotation '{path}' is not UTF-8 (or ASCII) text; save it as UTF-8.")
    if _XML_DECLS.search(raw):
        raise DataError(
            f"XML annotation '{path}' declares a DOCTYPE or ENTITY; Presso refuses XML entities (they can expand "
            "without bound). Remove the declaration."
        )
    try:
        return ET.fromstring(raw)
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else "?"
        raise DataError(f"XML annotation '{path}' is not valid XML (line {line}): {e}.") from None


def _voc_xml(xml: Path, img_dir: Path) -> tuple[Path, list[tuple[str, list[float], str]]]:
    root = parse_xml(xml)
    if root.tag != "annotation":
        raise DataError(f"VOC annotation '{xml}' has root <{root.tag}>, not <annotation>.")
    filename = (root.findtext("filename") or "").strip()
    candidates = ([img_dir / filename] if filename else []) + [img_dir / f"{xml.stem}{s}" for s in (".jpg", ".png")]
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
        raise DataError(f"VOC annotation '{xml}': image '{candidates[0]}' not found.")
    objects = []
    for j, obj in enumerate(root.findall("object"), 1):
        ref = f"VOC annotation '{xml}' object {j}"
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise DataError(f"{ref}: needs <name> and <bndbox>.")
        values = _numbers([(bb.findtext(k) or "").strip() for k in ("xmin", "ymin", "xmax", "ymax")], 4)
        if values is None:
            raise DataError(f"{ref} ('{name}'): <bndbox> needs 4 finite numbers xmin, ymin, xmax, ymax.")
        x1, y1, x2, y2 = values
        objects.append((name, [x1 - 1, y1 - 1, x2, y2], f"{ref} ('{name}')"))
    return image, objects


# --------------------------------------------------------------------------- which --data strings are detection
DETECTION_BUILTIN = ("shapes-det", "fashion-scenes")


def load_detection(text: str, *, seed: int = 0) -> Split | None:
    """``(train, val_or_None, classes)`` when ``text`` names a detection dataset, else None (not detection):
    ``shapes-det[:...]``, ``fashion-scenes[:...]``, ``coco:FILE.json`` / ``coco:TRAIN.json,VAL.json`` / ``coco:DIR``,
    ``yolo:DATA.yaml`` / ``yolo:DIR``, ``voc:DIR``; and, recognised by their layout: a ``.json`` file (COCO), a
    ``.yaml`` file (YOLO), a folder with ``Annotations/`` + ``JPEGImages/`` (VOC), with
    ``annotations/instances_train*.json`` + ``instances_val*.json`` (COCO), or with ``data.yaml`` (YOLO)."""
    name, sep, arg = text.partition(":")
    path = Path(text)
    if name in DETECTION_BUILTIN and not path.exists():
        from presso.data import scenes

        return scenes.load(name, arg, seed)
    if sep and name in ("coco", "yolo", "voc") and not path.exists():
        return _forced(name, arg)
    if path.is_file() and path.suffix.lower() == ".json":
        return read_coco(path)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return read_yolo(path)
    if path.is_dir():
        if (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir():
            return read_voc(path)
        if pair := coco_dir_files(path):
            return read_coco_pair(*pair)
        if (path / "data.yaml").is_file():
            return read_yolo(path / "data.yaml")
    return None


def _forced(kind: str, arg: str) -> Split:
    parts = [Path(p.strip()) for p in arg.split(",") if p.strip()]
    if not parts:
        raise DataError(f"'{kind}:' needs a path, e.g. {kind}:{'DIR' if kind == 'voc' else 'FILE'}.")
    if missing := [p for p in parts if not p.exists()]:
        raise DataError(f"{kind.upper()} data '{missing[0]}' does not exist.")
    if kind == "coco":
        if len(parts) == 2:
            return read_coco_pair(parts[0], parts[1])
        if parts[0].is_dir():
            if pair := coco_dir_files(parts[0]):
                return read_coco_pair(*pair)
            raise DataError(
                f"COCO folder '{parts[0]}' lacks annotations/instances_train*.json and instances_val*.json."
            )
        return read_coco(parts[0])
    if kind == "yolo":
        if parts[0].is_dir():
            yamls = sorted(parts[0].glob("*.yaml")) + sorted(parts[0].glob("*.yml"))
            if (parts[0] / "data.yaml").is_file():
                yamls = [parts[0] / "data.yaml"]
            if len(yamls) != 1:
                raise DataError(f"YOLO folder '{parts[0]}' holds {len(yamls)} YAML files; give yolo:PATH/TO/data.yaml.")
            return read_yolo(yamls[0])
        return read_yolo(parts[0])
    return read_voc(parts[0])
