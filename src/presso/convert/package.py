"""``presso package``: one zip a device can run without PyTorch.

Members: ``model.onnx`` (what ``predict`` runs; ``model.tflite`` instead for a ``convert --to litert`` model, which
LiteRT runs), ``presso.json`` (the model card: input spec, preprocessing, labels, lineage -- source, recipe, history
-- and figures, plus the conversion report), ``predict.py`` (the self-contained predictor, ``python predict.py
bundle.zip IMAGE``), ``README.txt``, and the OpenVINO IR when the model was converted to it. The archive is written
to a temporary sibling and renamed (``presso.outdir``), so a failed or killed run never leaves half a bundle, and a
file at that path that is not a Presso bundle is replaced only with ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import presso.outdir as outdir
from presso.convert.predict import BUNDLE_FORMAT, CARD_MEMBER, MODEL_MEMBER, TFLITE_MEMBER
from presso.errors import BundleError
from presso.progress import ProgressCallback, reporter
from presso.results import Result

README = """Presso bundle: {name}

Run it on any machine with Python 3.10+ (no PyTorch needed):

    pip install {runtime} numpy pillow
    python -c "import zipfile; zipfile.ZipFile('{zip}').extract('predict.py')"
    python predict.py {zip} IMAGE [IMAGE ...] {options}

or, where Presso is installed:  presso predict {zip} IMAGE ...

Input: {spec}; images are resized to {size} ({channels} channel(s)) and normalised with the recorded mean/std.
Precision: {precision}. Classes: {classes}.{task}
"""
DETECT_README = """
Task: detect. Each image gives boxes (label, score, x1 y1 x2 y2 in the image's own pixels), the best first;
--conf is the lowest score kept (0.25), --iou the NMS threshold (0.7), --save DIR writes the images with boxes drawn."""


def is_bundle(path: str | Path) -> bool:
    """A zip holding a bundle's card and model: what ``package`` may replace without ``overwrite``."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return CARD_MEMBER in names and bool({MODEL_MEMBER, TFLITE_MEMBER} & names)


def is_converted_dir(path: str | Path) -> bool:
    p = Path(path)
    has_model = (p / MODEL_MEMBER).is_file() or (p / TFLITE_MEMBER).is_file()
    return has_model and (p / CARD_MEMBER).is_file() and (p / "convert.json").is_file()


@dataclass
class PackageResult(Result):
    """The bundle written: ``path`` (``output_dir/name``), its size and members, the labels and precision it
    carries, and the SHA-256 of its model."""

    path: Path
    output_dir: Path
    size_bytes: int
    members: list[str]
    labels: list[str] | None
    precision: str | None
    model_sha256: str

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "output_dir": str(self.output_dir),
            "size_bytes": self.size_bytes,
            "members": self.members,
            "labels": self.labels,
            "precision": self.precision,
            "model_sha256": self.model_sha256,
        }


def package(
    converted: str | Path,
    output_dir: str | Path,
    *,
    name: str = "bundle.zip",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> PackageResult:
    """Pack a directory written by ``presso.convert`` into the bundle ``output_dir/name`` (a .zip).

    ``output_dir`` is created if needed; a bundle of the same name there is replaced, in one rename; any other
    file of that name only with ``overwrite``.
    ``progress`` gets stage ``package`` events, one per member written.
    """
    from presso.convert import predict

    src = Path(converted)
    output_dir = Path(output_dir)
    if output_dir.suffix == ".zip":
        raise BundleError(
            f"'{output_dir}' names a file: give the directory as output_dir and the bundle's file name as name "
            f"(package(..., output_dir='{output_dir.parent}', name='{output_dir.name}'))."
        )
    if not is_converted_dir(src):
        raise BundleError(
            f"'{src}' is not a converted model directory (model.onnx or model.tflite, presso.json, convert.json)."
        )
    card = json.loads((src / CARD_MEMBER).read_text())
    if not card.get("preprocess"):
        raise BundleError(
            "The model records no preprocessing (image size, mean, std), so a bundle could not turn images into "
            "inputs; train or fine-tune it with 'presso train' first, which records it."
        )
    output = output_dir / name
    if output.suffix != ".zip" or Path(name).name != name:
        raise BundleError(f"Name the bundle with a file name ending in .zip, not '{name}'.")
    outdir.check(output, overwrite=overwrite or is_bundle(output), what="file")  # before reading the model
    member, runtime = (MODEL_MEMBER, "onnxruntime") if (src / MODEL_MEMBER).is_file() else (TFLITE_MEMBER, "litert")
    model_bytes = (src / member).read_bytes()
    card["bundle_format"] = BUNDLE_FORMAT
    card["bundle"] = {"model_sha256": hashlib.sha256(model_bytes).hexdigest(), "runtime": runtime}
    pp = card["preprocess"]
    labels = card.get("labels")
    detect = card.get("task") == "detect"
    readme = README.format(
        name=card.get("source", {}).get("source", "model"),
        zip=output.name,
        runtime="ai-edge-litert" if runtime == "litert" else "onnxruntime",
        spec=card.get("input_spec"),
        size="x".join(str(v) for v in pp["size"]),
        channels=pp["channels"],
        precision=card.get("conversion", {}).get("precision", "fp32"),
        classes=", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "") if labels else "not recorded",
        options="[--conf 0.25] [--iou 0.7] [--save DIR] [--json]" if detect else "[--top-k 3] [--json]",
        task=DETECT_README if detect else "",
    )
    members = {
        member: model_bytes,
        CARD_MEMBER: json.dumps(card, indent=2, default=str).encode(),
        "predict.py": Path(predict.__file__).read_bytes(),
        "README.txt": readme.encode(),
    }
    for extra in ("model.xml", "model.bin"):
        if (src / extra).is_file():
            members[extra] = (src / extra).read_bytes()
    report = reporter(progress, "package")
    with outdir.writing_file(output, overwrite=overwrite, replaceable=is_bundle) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for k, (member, data) in enumerate(members.items()):
                report(k, len(members))
                zf.writestr(member, data)
    report(len(members), len(members))
    return PackageResult(
        path=output,
        output_dir=output_dir,
        size_bytes=output.stat().st_size,
        members=sorted(members),
        labels=labels,
        precision=card.get("conversion", {}).get("precision"),
        model_sha256=card["bundle"]["model_sha256"],
    )
