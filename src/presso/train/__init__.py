"""Trainer: supervised training and distillation that recovers any compressed model.

``presso.train(model, data, TrainConfig(...), teacher=original, output_dir=OUT)`` -- the loop is ``trainer.py``,
its checkpoints and output directory ``checkpoint.py``.
``presso.train.evaluate(model, data, teacher=None)`` -- an ``EvalResult``: top-1 / loss, or agreement with a teacher
(``evaluation.py``).
"""

from __future__ import annotations

from presso._verbs import callable_package
from presso.train.checkpoint import partial_dir
from presso.train.config import TrainConfig
from presso.train.evaluation import EvalResult, evaluate, evaluate_dataset  # noqa: F401 (importable from here)
from presso.train.trainer import TrainResult, train

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "evaluate", "partial_dir", "train"]

callable_package(__name__, train)
