"""Which Ultralytics architectures Presso prunes, reloads and exports, and which it refuses and why: the tables of
docs/ultralytics.md as data (the pipeline's report shows them, with the row of the user's model).

Kept apart from ``models/ultralytics.py`` (the source itself), which refuses the open-vocabulary heads with
:data:`OPEN_VOCABULARY`'s reasons. Plain data: importing this never imports Ultralytics.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_WORLD = (
    "YOLO-World is open-vocabulary: its class embeddings come from a CLIP text model (downloaded weights) and live "
    "outside the state dict (txt_feats, random at every build), so no model directory can restore them"
)
_YOLOE = (
    "YOLOE is open-vocabulary: its classes are text or visual prompt embeddings from a MobileCLIP model (downloaded "
    "weights); built from its YAML it predicts 80 placeholder classes whatever num_classes says"
)
OPEN_VOCABULARY = {"WorldDetect": _WORLD, "YOLOEDetect": _YOLOE, "YOLOESegment": _YOLOE, "YOLOESegment26": _YOLOE}

# Measured with Ultralytics 8.4.190 by `python tests/models/test_ultralytics.py` (64 px, 3 classes: load, prune 50% of
# channels by l2, run at 64 and 128 px, save and reload bit-identical, ONNX within 1e-4); MACs kept at 64 px. The
# smallest variant of each YAML Ultralytics ships; docs/ultralytics.md has the full table.
SUPPORTED: dict[str, str] = {
    "yolov3-tiny.yaml": "detect: keeps 0.26 of MACs",
    "yolov5n.yaml": "detect: keeps 0.27 of MACs",
    "yolov5n-p6.yaml": "detect: keeps 0.27 of MACs",
    "yolov6n.yaml": "detect: keeps 0.25 of MACs",
    "yolov8n.yaml": "detect: keeps 0.26 of MACs",
    "yolov8n-p2.yaml": "detect: keeps 0.26 of MACs",
    "yolov8n-p6.yaml": "detect: keeps 0.28 of MACs",
    "yolov8n-ghost.yaml": "detect: keeps 0.29 of MACs",
    "yolov8n-ghost-p2.yaml": "detect: keeps 0.29 of MACs",
    "yolov8n-ghost-p6.yaml": "detect: keeps 0.30 of MACs",
    "yolov8n-seg.yaml": "segment: keeps 0.26 of MACs",
    "yolov8n-seg-p6.yaml": "segment: keeps 0.27 of MACs",
    "yolov8n-pose.yaml": "pose: keeps 0.25 of MACs",
    "yolov8n-pose-p6.yaml": "pose: keeps 0.27 of MACs",
    "yolov8n-cls.yaml": "classify: keeps 0.26 of MACs",
    "yolov8n-obb.yaml": "obb: keeps 0.26 of MACs",
    "yolov8-cls-resnet50.yaml": "classify: keeps 0.26 of MACs",
    "yolov8n-rtdetr.yaml": "detect (RT-DETR): keeps 0.29 of MACs; top-300 queries out",
    "yolov9t.yaml": "detect: keeps 0.27 of MACs",
    "yolov9c-seg.yaml": "segment: keeps 0.25 of MACs",
    "yolov10n.yaml": "detect: keeps 0.27 of MACs; the one-to-one head is pruned alike",
    "yolo11n.yaml": "detect: keeps 0.27 of MACs",
    "yolo11n-seg.yaml": "segment: keeps 0.27 of MACs",
    "yolo11n-pose.yaml": "pose: keeps 0.26 of MACs",
    "yolo11n-cls.yaml": "classify: keeps 0.28 of MACs",
    "yolo11n-obb.yaml": "obb: keeps 0.27 of MACs",
    "yolo11-cls-resnet18.yaml": "classify: keeps 0.27 of MACs",
    "yolo12n.yaml": "detect: keeps 0.28 of MACs",
    "yolo12n-seg.yaml": "segment: keeps 0.27 of MACs",
    "yolo12n-pose.yaml": "pose: keeps 0.28 of MACs",
    "yolo12n-cls.yaml": "classify: keeps 0.30 of MACs",
    "yolo12n-obb.yaml": "obb: keeps 0.28 of MACs",
    "yolo26n.yaml": "detect: keeps 0.29 of MACs; the one-to-one head is pruned alike",
    "yolo26n-seg.yaml": "segment: keeps 0.28 of MACs; the one-to-one head is pruned alike",
    "yolo26n-pose.yaml": "pose: keeps 0.27 of MACs; the one-to-one head is pruned alike",
    "yolo26n-cls.yaml": "classify: keeps 0.28 of MACs",
    "yolo26n-obb.yaml": "obb: keeps 0.29 of MACs; the one-to-one head is pruned alike",
    "yolo26n-p2.yaml": "detect: keeps 0.28 of MACs; the one-to-one head is pruned alike",
    "yolo26n-p6.yaml": "detect: keeps 0.27 of MACs; the one-to-one head is pruned alike",
    "yolo26n-depth.yaml": "depth: keeps 0.26 of MACs",
    "yolo26n-sem.yaml": "semantic: keeps 0.27 of MACs",
    "rtdetr-l.yaml": "detect (RT-DETR): keeps 0.28 of MACs; top-300 queries out",
}
UNSUPPORTED: dict[str, str] = {
    "yolov8n-world.yaml": _WORLD,
    "yolov8n-worldv2.yaml": _WORLD,
    "yoloe-v8n.yaml": _YOLOE,
    "yoloe-v8n-seg.yaml": _YOLOE,
    "yoloe-11n.yaml": _YOLOE,
    "yoloe-11n-seg.yaml": _YOLOE,
    "yoloe-26n.yaml": _YOLOE,
    "yoloe-26n-seg.yaml": _YOLOE,
}


def _family(name: str) -> str:
    """A YAML's name without its scale letter, as Ultralytics unifies them (``yolov8s-seg.yaml`` ->
    ``yolov8-seg.yaml``, ``yolo11x.yaml`` -> ``yolo11.yaml``); other names unchanged."""
    stem = Path(name).name
    stem = stem if stem.endswith((".yaml", ".yml")) else stem + ".yaml"
    return re.sub(r"(\d+)([nslmxtceb])(-|\.)", r"\1\3", stem, count=1)


def support_of(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """For a model card's ``source`` naming an Ultralytics model: its row of the tables (``status``: ``tested`` --
    a listed architecture, any scale --, ``refused``, or ``untested`` -- a user's own YAML, checked row by row but
    not in the tested list) and both whole tables; None for any other source."""
    text = str((source or {}).get("source") or "")
    if not text.startswith("ultralytics:"):
        return None
    name = Path(text.partition(":")[2]).name
    family = _family(name)
    tested = {_family(k): (k, v) for k, v in SUPPORTED.items()}
    refused = {_family(k): (k, v) for k, v in UNSUPPORTED.items()}
    if family in tested:
        status, (row, note) = "tested", tested[family]
        note = note if row == name else f"{note} (tested as {row}: the same layers at another scale)"
    elif family in refused:
        status, (row, note) = "refused", refused[family]
    else:
        status, row, note = (
            "untested",
            None,
            "not in the tested list: its rows passed Presso's check of building blocks",
        )
    return {"model": name, "status": status, "row": row, "note": note, "supported": dict(SUPPORTED),
            "unsupported": dict(UNSUPPORTED)}  # fmt: skip
