"""Scoring a model on held-out data: top-1 and loss against labels, agreement and matching loss against a teacher.

``evaluate`` is ``presso.train.evaluate`` (data and preprocessing resolved as the trainer resolves them);
``evaluate_dataset`` scores an already prepared split and is what the trainer runs after every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from presso.data import DataBundle, Preprocess, batches, load_data, preprocess_for
from presso.errors import DataError
from presso.models.figures import set_mode
from presso.models.outputs import is_class_scores, leaves, match_loss
from presso.progress import ProgressCallback, reporter
from presso.results import Result
from presso.train import distributed

METRICS = ("val_top1", "val_loss", "agreement", "match_loss")


@dataclass
class EvalResult(Result):
    """Scores on the held-out split: ``val_top1``/``val_loss`` against labels, ``agreement``/``match_loss`` against
    a teacher (None where they do not apply), on ``val_n`` images; ``data`` describes the data, ``preprocess`` how
    images became inputs. Nothing is written: ``output_dir`` is None."""

    val_n: int
    val_top1: float | None = None
    val_loss: float | None = None
    agreement: float | None = None
    match_loss: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The scores that apply, by name."""
        return {k: getattr(self, k) for k in METRICS if getattr(self, k) is not None}

    def summary(self) -> dict[str, Any]:
        return {"val_n": self.val_n, **self.metrics, "data": self.data, "preprocess": self.preprocess,
                "output_dir": None if self.output_dir is None else str(self.output_dir)}  # fmt: skip


def evaluate(
    model: nn.Module,
    data,
    *,
    teacher: nn.Module | None = None,
    image_size: tuple[int, int] | int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.1,
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Score ``model`` on the held-out split of ``data`` (a data spec or a ``DataBundle``) with the model's recorded
    preprocessing (or one derived from the data). Labeled data gives ``val_top1``/``val_loss``; a teacher adds
    ``agreement``/``match_loss``. ``progress`` gets stage ``evaluate`` events, one per batch."""
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
            progress=reporter(progress, "evaluate"),
        )
    return EvalResult(**row, data=bundle.describe(), preprocess=pp.to_json())


def evaluate_dataset(
    model,
    dataset,
    pp: Preprocess,
    *,
    labeled: bool,
    teacher=None,
    temperature: float = 4.0,
    device=None,
    dist=None,
    workers: int = 0,
    batch_size: int = 256,
    progress=None,
) -> dict[str, Any]:
    """Top-1 and cross-entropy on labeled data; with a teacher, also agreement (same top-1 class) and the
    label-free matching loss. Under torchrun each process scores its share and the sums are reduced.
    ``progress(done, total)``: batches scored."""
    dist = dist or distributed.setup()
    device = device or next(model.parameters()).device
    order = np.arange(len(dataset))[dist.rank :: dist.world]
    sums = torch.zeros(5, dtype=torch.float64)  # n, correct, ce, agree, match
    set_mode(model, False)
    n_batches = -(-len(order) // batch_size)
    with torch.no_grad():
        for k, (x, y) in enumerate(batches(dataset, order, batch_size, workers=workers)):
            if progress is not None:
                progress(k, n_batches)
            if len(x) == 0:
                continue
            x = pp.normalize(x).to(device)
            out = model(x)
            scores = leaves(out)
            n = len(x)
            sums[0] += n
            if labeled and scores and is_class_scores(scores[0]):
                y = y.to(device)
                sums[1] += float((scores[0].argmax(1) == y).sum())
                sums[2] += float(F.cross_entropy(scores[0].float(), y, reduction="sum"))
            if teacher is not None:
                t_out = teacher(x)
                t_scores = leaves(t_out)
                if same_class_scores(scores, t_scores):
                    sums[3] += float((scores[0].argmax(1) == t_scores[0].argmax(1)).sum())
                sums[4] += float(match_loss(out, t_out, temperature)) * n
    if progress is not None:
        progress(n_batches, n_batches)
    sums = dist.sum(sums)
    n = max(float(sums[0]), 1.0)
    row: dict[str, Any] = {"val_n": int(sums[0])}
    if labeled:
        row["val_top1"] = round(float(sums[1]) / n, 5)
        row["val_loss"] = round(float(sums[2]) / n, 5)
    if teacher is not None:
        row["agreement"] = round(float(sums[3]) / n, 5)
        row["match_loss"] = round(float(sums[4]) / n, 5)
        if not labeled:
            row["val_loss"] = row["match_loss"]
    return row


def same_class_scores(scores: list[torch.Tensor], t_scores: list[torch.Tensor]) -> bool:
    """Whether the student's first output and the teacher's are class scores over the same classes: then they are
    compared class by class (soft targets when training, top-1 agreement when scoring)."""
    return bool(scores and t_scores and is_class_scores(scores[0]) and scores[0].shape == t_scores[0].shape)
