"""Scoring a model on held-out data, by its task: top-1 / mAP and loss against labels, agreement and matching loss
against a teacher (``presso.tasks``: the task computes the scores; this module feeds it prepared batches).

``evaluate`` is ``presso.train.evaluate`` (data and preprocessing resolved as the trainer resolves them);
``evaluate_dataset`` scores an already prepared split and is what the trainer runs after every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from presso.data import DataBundle, Preprocess, batches, load_data
from presso.errors import DataError
from presso.models.figures import set_mode
from presso.progress import ProgressCallback, reporter
from presso.results import Result
from presso.tasks import Task, get_task, infer_task
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
    task: str = "classify"
    extra: dict[str, Any] = field(default_factory=dict)  # the task's other scores (map50_95, map50, per_class, ...)
    data: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The scores that apply, by name."""
        return {**self.extra, **{k: getattr(self, k) for k in METRICS if getattr(self, k) is not None}}

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "val_n": self.val_n, **self.metrics, "data": self.data,
                "preprocess": self.preprocess,
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
    task: str | Task | None = None,
    trust: bool = False,
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Score ``model`` on the held-out split of ``data`` (a data spec or a ``DataBundle``) with the model's recorded
    preprocessing (or one derived from the data). The task (inferred, or ``task``) decides the scores: labeled
    classification data gives ``val_top1``/``val_loss``, detection data ``map50_95``/``map50`` and per-class AP; a
    teacher adds ``agreement``/``match_loss``. ``progress`` gets stage ``evaluate`` events, one per batch."""
    bundle = data if isinstance(data, DataBundle) else load_data(data, val_fraction=val_fraction, seed=seed)
    if not bundle.labeled and teacher is None:
        raise DataError(f"'{bundle.name}' has no labels: give a teacher to measure agreement with it (--teacher).")
    the_task = infer_task(model, bundle, task, trust=trust)
    pp = the_task.preprocess(bundle, model, image_size=image_size)
    device = next(model.parameters()).device
    if teacher is not None:
        teacher.to(device)
    row = evaluate_dataset(
        model,
        bundle.val.at(pp.size, pp.channels),
        pp,
        labeled=bundle.labeled,
        teacher=teacher,
        task=the_task,
        device=device,
        dist=distributed.setup(),
        batch_size=batch_size,
        progress=reporter(progress, "evaluate"),
    )
    known = {k: row.pop(k) for k in ("val_n", *METRICS) if k in row}
    return EvalResult(**known, task=the_task.name, extra=row, data=bundle.describe(), preprocess=pp.to_json())


def evaluate_dataset(
    model,
    dataset,
    pp: Preprocess,
    *,
    labeled: bool,
    teacher=None,
    task: Task | None = None,
    cfg: Any = None,
    device=None,
    dist=None,
    workers: int = 0,
    batch_size: int = 256,
    progress=None,
) -> dict[str, Any]:
    """The task's scores on a prepared split (``dataset`` at the model's size): the batches are normalised, moved to
    the model's device and handed to ``task.metric`` in eval mode under no_grad. Under torchrun each process scores
    its share and the task combines them. ``progress(done, total)``: batches scored."""
    dist = dist or distributed.setup()
    device = device or next(model.parameters()).device
    task = task or get_task("classify")
    order = np.arange(len(dataset))[dist.rank :: dist.world]
    set_mode(model, False)
    n_batches = -(-len(order) // batch_size)

    def prepared():
        for k, (x, y) in enumerate(batches(dataset, order, batch_size, workers=workers)):
            if progress is not None:
                progress(k, n_batches)
            if len(x) == 0:
                continue
            yield pp.normalize(x).to(device), (task.to_device(y, device) if labeled else None)
        if progress is not None:
            progress(n_batches, n_batches)

    with torch.no_grad():
        return task.metric(model, prepared(), teacher=teacher, cfg=cfg, dist=dist)
