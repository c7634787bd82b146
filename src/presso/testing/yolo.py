"""A tiny YOLO for tests: YOLOv8's own layout, read from the installed Ultralytics, at 1/8 of the nano width.

Presso ships no Ultralytics file (AGPL-3.0): the layout is read from the installed package when a test asks for it,
and written as a user's YAML (rows in flow style, each with its index as a comment, as Ultralytics writes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_SCALE = [0.33, 0.125, 256]  # depth, width, max channels: 8-32 channels, 348,865 parameters with 3 classes


def tiny_yolo_yaml(folder: str | Path, name: str = "yolov8-tiny.yaml", classes: int = 3) -> Path:
    """Write YOLOv8's layout at one small scale into ``folder/name`` and return the path; load it with
    ``presso.load_model(f"ultralytics:{path}")`` (a user's YAML made only of Ultralytics' building blocks: no
    ``--trust`` needed). Needs ``presso[yolo]``."""
    from presso.models.ultralytics import _find_shipped, read_yaml

    cfg = read_yaml(_find_shipped("yolov8.yaml"))
    lines = [f"nc: {classes}", "scales:", f"  t: {_flow(TINY_SCALE)}", ""]
    index = 0
    for part in ("backbone", "head"):
        lines.append(f"{part}:")
        for row in cfg[part]:
            lines.append(f"  - {_flow(row)} # {index}")
            index += 1
        lines.append("")
    path = Path(folder) / name
    path.write_text("\n".join(lines))
    return path


def _flow(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if value is None:
        return "None"  # as Ultralytics' YAMLs write it: parse_model reads the string "None" as None
    if isinstance(value, str) and value not in ("None",) and not value.replace(".", "").replace("_", "").isalnum():
        return f'"{value}"'
    return str(value)
