"""The job a run does (``RunConfig``), what it returns (``RunResult``), its stages and their settings keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from presso.errors import ConfigError, check_fields
from presso.results import Result

PIPELINE_VERSION = 2  # 2: the deploy stage measures every candidate side by side and delivers the best one
STAGES = ("original", "baseline", "compress", "recover", "deploy")


@dataclass
class RunConfig:
    """The job: a budget (``latency_ms`` on ``device``, or ``target_macs``) and how hard to work for it.

    model_args: builder keywords for ``model`` (``--model-arg``). image_size: (H, W) the model is trained and
    deployed at (``--image-size``; default: the model card's, else the data's). calib: data for INT8 calibration and
    for judging compression (default: the run's data). max_accuracy_drop: the accuracy bound, as a share (0.02: 2
    points of the task's headline metric: top-1, or mAP50-95 for detection). task: ``classify``, ``detect`` or a
    user's ``file.py:Class`` (default: from the model and the data). allow_miss: a delivered model that misses the
    budget or the bound is accepted (the CLI exits 0). weights: a weights file for ``model`` (safetensors, or a
    state dict read weights-only: ``--weights``); new_head: a new classifier for the data's classes (``--new-head``).
    """

    device: str = "local"
    latency_ms: float | None = None
    target_macs: float | None = None
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    calib: str | None = None
    precision: str = "int8"
    train_epochs: int = 10
    recover_epochs: int = 5
    qat_epochs: int = 0  # > 0: also a QAT fine-tune of the recovered model, an INT8 candidate of its own
    search_trials: int = 16
    search_proxy_epochs: int = 2
    max_accuracy_drop: float = 0.02
    allow_miss: bool = False
    threads: int | None = None
    seed: int = 0
    db: str | None = None
    task: str | None = None
    weights: str | None = None
    new_head: bool = False
    version: int = PIPELINE_VERSION

    def __post_init__(self) -> None:
        if (self.latency_ms is None) == (self.target_macs is None):
            raise ConfigError("Give one budget: --latency-ms X (on --device) or --target-macs R.")
        if self.model is None and self.latency_ms is None:
            raise ConfigError("Without --model, Presso searches a model for a latency budget: give --latency-ms.")
        if self.model is None and (self.model_args or self.image_size or self.weights or self.new_head):
            raise ConfigError(
                "--model-arg, --weights, --new-head and --image-size apply to a given --model; without one, the "
                "search designs the model for the data at its own size (give the size in the data spec, e.g. "
                "shapes:size=64)."
            )
        if self.weights is not None and "weights" in (self.model_args or {}):
            raise ConfigError(
                "Give the weights once: --weights PATH, or --model-arg weights=NAME (torchvision's cache)."
            )
        self.weights = None if self.weights is None else str(self.weights)
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"Precision '{self.precision}': use fp32, fp16 or int8.")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ConfigError(f"--target-macs is a share in (0, 1], not {self.target_macs}.")
        if self.image_size is not None:
            size = self.image_size
            self.image_size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)  # type: ignore
            if len(self.image_size) != 2 or min(self.image_size) < 1:
                raise ConfigError(f"RunConfig: image_size must be (H, W) with positive sizes, not {size}.")
        self.model_args = dict(self.model_args or {})
        if self.qat_epochs and self.precision != "int8":
            raise ConfigError("--qat-epochs fine-tunes for INT8: it needs --precision int8.")
        check_fields(self, latency_ms=(0, None, "(]"), target_macs=(0, 1, "(]"), train_epochs=(1, None),
                     recover_epochs=(1, None), qat_epochs=(0, None), search_trials=(1, None),
                     search_proxy_epochs=(1, None), max_accuracy_drop=(0, 1), threads=(1, None),
                     seed=(0, 2**63 - 1))  # fmt: skip


@dataclass
class RunResult(Result):
    """``figures``: what ``OUT/summary.json`` holds -- the headline (``delivered``: which candidate and why,
    ``speedup_vs_original_fp32``, ``speedup_vs_baseline_int8``, ``size_ratio``, ``accuracy_drop_points``,
    ``budget_met``, ``accuracy_bound_met``), every candidate measured, every stage's record, the commands that
    reproduce it; ``output_dir``: ``OUT``. ``ok``: the delivered model meets the budget and the accuracy bound, or
    the miss was allowed (``allow_miss``)."""

    output_dir: Path
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        f = self.figures
        met = bool(f.get("budget_met")) and bool(f.get("accuracy_bound_met"))
        return not f.get("error") and (met or bool((f.get("config") or {}).get("allow_miss")))

    def summary(self) -> dict[str, Any]:
        return {**self.figures, "output_dir": str(self.output_dir)}


def key(*parts: Any) -> str:
    """A stage's settings key: a hash of everything its output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
