"""Readers for the dataset formats users already have on disk.

Each reader returns ``(train, val_or_None, classes)``: image sets holding labels (or none, for unlabeled images).
IDX and CIFAR's binary format are parsed here directly -- a few lines of ``numpy.frombuffer`` -- instead of adding
torchvision's dataset classes, which want their own download layout and checksums.
"""

from __future__ import annotations

import csv
import gzip
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np

from presso.data.images import IMAGE_SUFFIXES, ArrayImages, FileImages, ImageSet, list_images, memory_limit
from presso.errors import DataError

Split = tuple[ImageSet, ImageSet | None, list[str] | None]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- folders and CSV
def read_folder(root: Path, *, unlabeled: bool = False) -> Split:
    """``root/train`` + ``root/val`` (or ``test``), an ImageFolder (a sub-folder per class), or loose images."""
    if not root.is_dir():
        raise DataError(f"Data folder '{root}' does not exist.")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = {p.name for p in subdirs}
    if not unlabeled and "train" in names and names & {"val", "test"}:
        val_dir = root / ("val" if "val" in names else "test")
        train, classes = _image_folder(root / "train")
        val, val_classes = _image_folder(val_dir, classes=classes)
        return train, val, classes
    loose = list_images(root, recursive=False)
    if unlabeled or loose or not subdirs:
        files = list_images(root, recursive=True)
        if not files:
            raise DataError(f"Data folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        return FileImages(files, None, where=f"'{root}'"), None, None
    train, classes = _image_folder(root)
    return train, None, classes


def _image_folder(root: Path, classes: list[str] | None = None) -> tuple[FileImages, list[str]]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = [c for c in found if list_images(root / c)]
        if not classes:
            raise DataError(f"ImageFolder '{root}' has no class sub-folder holding images.")
        if len(classes) == 1:
            raise DataError(
                f"ImageFolder '{root}' has one class only ('{classes[0]}'); a classifier needs at least two. "
                f"For unlabeled images (distillation, calibration) give unlabeled:{root}."
            )
    elif extra := sorted(set(found) - set(classes)):
        raise DataError(f"'{root}' has classes the training split lacks: {extra[:5]}; make the splits agree.")
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in list_images(root / c) if (root / c).is_dir() else []:
            files.append(f)
            labels.append(k)
    if not files:
        raise DataError(f"ImageFolder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return FileImages(files, np.asarray(labels), where=f"'{root}'"), classes


def read_csv(path: Path) -> Split:
    """Rows of ``path,label`` (a header row is optional); paths are relative to the CSV's folder."""
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"Cannot read CSV '{path}': {e}") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise DataError(f"CSV '{path}' has no rows; write one 'path,label' row per image.")
    bad = [i for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise DataError(f"CSV '{path}' row {bad[0] + 1} is not 'path,label': {rows[bad[0]]}.")
    names = [r[1].strip() for r in rows]
    classes = sorted(set(names), key=lambda s: (int(s) if s.lstrip("-").isdigit() else float("inf"), s))
    if len(classes) < 2:
        raise DataError(f"CSV '{path}' has one label only ('{classes[0]}'); a classifier needs at least two.")
    index = {c: k for k, c in enumerate(classes)}
    files = [(path.parent / r[0].strip()) for r in rows]
    return FileImages(files, np.asarray([index[n] for n in names]), where=f"'{path}'"), None, classes


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
def read_idx_dir(root: Path, classes: list[str] | None = None) -> Split:
    def find(stem: str) -> Path | None:
        for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx")):
            if (root / name).is_file():
                return root / name
        return None

    train_x, train_y = find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte")
    test_x, test_y = find("t10k-images-idx3-ubyte"), find("t10k-labels-idx1-ubyte")
    if not (train_x and train_y):
        raise DataError(
            f"'{root}' lacks train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] (MNIST-style IDX files)."
        )
    train = _idx_pair(train_x, train_y)
    val = _idx_pair(test_x, test_y) if test_x and test_y else None
    # without class names, the labels seen in both splits name them (load_data checks named classes against them)
    n_classes = max((int(s.labels.max()) for s in (train, val) if s is not None and len(s)), default=0) + 1  # type: ignore
    return train, val, classes or [str(k) for k in range(n_classes)]


def _idx_pair(images: Path, labels: Path) -> ArrayImages:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim not in (3, 4) or y.ndim != 1:
        raise DataError(
            f"'{images}' / '{labels}' hold arrays of {x.ndim} and {y.ndim} dimensions; IDX images are N x H x W "
            "and labels one number per image."
        )
    return ArrayImages(x, y)


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped): magic 0x00 0x00 TYPE NDIM, NDIM big-endian sizes, then the data."""
    limit = memory_limit()
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:  # bounded: a small .gz may expand to anything
                raw = f.read(limit + 1)
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"Cannot read IDX file '{path}': {e}") from None
    if len(raw) > limit:
        raise DataError(f"'{path}' expands to more than {limit / 2**30:.1f} GiB, more than this machine can hold.")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"'{path}' has a damaged IDX header ({ndim} dimensions).")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated: header says {tuple(dims)} but holds {body.size} bytes.")
    return body.reshape(tuple(dims)).copy()  # frombuffer is read-only; torch wants writable memory


def fashion_mnist_dir(given: str | None) -> Path:
    if given:
        root = Path(given)
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST folder '{root}' does not exist.")
        return root
    for root in (_dpkg_location(FASHION_MNIST_PACKAGE), FASHION_MNIST_DEFAULT):
        if root is not None and root.is_dir():
            return root
    raise DataError(
        f"Fashion-MNIST is not installed: run 'apt-get install {FASHION_MNIST_PACKAGE}' (Debian/Ubuntu), or give "
        "fashion-mnist:DIR holding the four IDX files from github.com/zalandoresearch/fashion-mnist."
    )


def _dpkg_location(package: str) -> Path | None:
    if shutil.which("dpkg") is None:
        return None
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz") or line.endswith("train-images-idx3-ubyte"):
            return Path(line).parent
    return None


# --------------------------------------------------------------------------- CIFAR batches
def is_cifar_dir(root: Path) -> bool:
    return any((root / n).is_file() for n in ("data_batch_1", "data_batch_1.bin", "train", "batches.meta"))


def read_cifar_dir(root: Path) -> Split:
    """CIFAR-10 (python or binary batches) or CIFAR-100 (python: ``train``/``test``)."""
    if (root / "data_batch_1.bin").is_file():
        train = _cifar_bin(
            [root / f"data_batch_{i}.bin" for i in range(1, 6) if (root / f"data_batch_{i}.bin").is_file()]
        )
        val = _cifar_bin([root / "test_batch.bin"]) if (root / "test_batch.bin").is_file() else None
        meta = root / "batches.meta.txt"
        classes = [c for c in meta.read_text().split() if c] if meta.is_file() else [str(k) for k in range(10)]
        return train, val, classes
    if (root / "data_batch_1").is_file():
        train_files = [root / f"data_batch_{i}" for i in range(1, 6) if (root / f"data_batch_{i}").is_file()]
        test_file, label_key, meta_file, names_key = root / "test_batch", "labels", "batches.meta", "label_names"
    elif (root / "train").is_file():
        train_files, test_file = [root / "train"], root / "test"
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    else:
        raise DataError(f"'{root}' is not a CIFAR batch folder (data_batch_1[.bin] ... or train/test).")
    parts = [_cifar_pickle(f, label_key) for f in train_files]
    train = ArrayImages(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    val = ArrayImages(*_cifar_pickle(test_file, label_key)) if test_file.is_file() else None
    classes = None
    if (root / meta_file).is_file():
        meta = _restricted_unpickle(root / meta_file)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])] or None
    return train, val, classes or [str(k) for k in range(int(train.labels.max()) + 1)]  # type: ignore[union-attr]


def _cifar_bin(files: list[Path]) -> ArrayImages:
    rec = 1 + 3072
    raws = []
    for f in files:
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        if raw.size % rec:
            raise DataError(f"'{f}' is not a CIFAR-10 binary batch (size {raw.size} is not a multiple of {rec}).")
        raws.append(raw.reshape(-1, rec))
    raw = np.concatenate(raws)
    return ArrayImages(raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), raw[:, 0].astype(np.int64))


def _cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _restricted_unpickle(path)
    data, labels = d.get("data", d.get(b"data")), d.get(label_key, d.get(label_key.encode()))
    if data is None or labels is None:
        raise DataError(f"'{path}' is not a CIFAR batch (no 'data'/'{label_key}').")
    data = np.asarray(data, dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), np.asarray(labels, dtype=np.int64)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles of dicts of numpy arrays. Unpickling normally runs whatever the file
    names, so this unpickler resolves only the numpy functions that rebuild an array; any other global is refused,
    which makes a hostile file fail instead of run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise DataError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")


def _restricted_unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            obj = _ArraysOnly(fh, encoding="latin1").load()
    except DataError as e:
        raise DataError(f"'{path}' is not a plain CIFAR batch ({e}).") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"Cannot read CIFAR batch '{path}': {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"'{path}' is not a CIFAR batch (not a dict).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
