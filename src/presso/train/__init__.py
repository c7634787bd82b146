"""Trainer: supervised training and distillation that recovers any compressed model.

``presso.train(model, data, TrainConfig(...), teacher=original, output_dir=OUT)`` -- see ``trainer.py``.
``presso.train.evaluate(model, data, teacher=None)`` -- top-1 / loss, or agreement with a teacher.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from presso._verbs import callable_package
from presso.train.config import TrainConfig
from presso.train.trainer import TrainResult, evaluate_dataset, partial_dir, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "partial_dir", "train"]


def evaluate(
    model: nn.Module,
    data,
    *,
    teacher: nn.Module | None = None,
    image_size: tuple[int, int] | int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> dict[str, Any]:
    """Score ``model`` on the held-out split of ``data`` with the model's recorded preprocessing (or one derived
    from the data). Labeled data gives ``val_top1``/``val_loss``; a teacher adds ``agreement``/``match_loss``."""
    import torch

    from presso.data import DataBundle, load_data, preprocess_for
    from presso.errors import DataError
    from presso.train import distributed

    bundle = data if isinstance(data, DataBundle) else load_data(data, val_fraction=val_fraction, seed=seed)
    if not bundle.labeled and teacher is None:
        raise DataError(f"'{bundle.name}' has no labels: give a teacher to measure agreement with it (--teacher).")
    pp = preprocess_for(bundle, model, image_size=image_size)
    device = next(model.parameters()).device
    if teacher is not None:
        teacher.to(device)
    with torch.no_grad():
        row = evaluate_dataset(
            model,
            bundle.val.at(pp.size, pp.channels),
            pp,
            labeled=bundle.labeled,
            teacher=teacher,
            device=device,
            dist=distributed.setup(),
            batch_size=batch_size,
        )
    return {**row, "data": bundle.describe(), "preprocess": pp.to_json()}


callable_package(__name__, train)
