"""The task protocol: everything a verb needs that depends on what the model does.

The trainer, the evaluator and the compressor's calibration never branch on the task: they ask the task object.
A task is a small class; Presso's own are registered (``classify``, ``detect``) and a user's own is a
``file.py:Class`` subclassing :class:`Task` (loaded only with ``--trust``: it is code). The smallest user task
implements ``loss`` and ``metric``; the rest has working defaults.

Batches reach a task as ``(x, targets)``: ``x`` the float inputs already normalised by the model's ``Preprocess``
and on the model's device; ``targets`` what the data's collate gives (class indices ``[B]`` for classification, one
``{"boxes", "labels"}`` dict per image for detection).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from presso.models.outputs import match_loss


class Task(abc.ABC):
    """What depends on the task. Subclass it, set ``name`` and ``headline``, implement ``loss`` and ``metric``."""

    name: ClassVar[str] = ""
    # the metric a run keeps its best epoch by, and the pipeline bounds its accuracy drop in (higher is better)
    headline: ClassVar[str] = ""
    # which --data readers give this task's targets: "classify" (class indices) or "detect" (boxes)
    data_kind: ClassVar[str] = "classify"
    classes: list[str] | None = None  # the data's class names, set when the task is resolved for a dataset
    # training settings that suit the task better than TrainConfig's defaults, used by the pipeline (and shown in the
    # commands it writes): a recipe for training from scratch, and one for recovering a compressed model
    train_defaults: ClassVar[dict[str, Any]] = {}
    recover_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3}
    spec: str = ""  # how to find this task again ("detect", "path/to/file.py:Class"); set by get_task
    # whether training may hold the model in NHWC (channels_last) when one forward shows it takes it: off unless the
    # task's loss and metric are known to read outputs without .view() on their strides (Ultralytics' loss does not)
    channels_last: ClassVar[bool] = False

    @property
    def key(self) -> str:
        """What a model card records (``--task`` accepts it back)."""
        return self.spec or self.name

    # ------------------------------------------------------------------ set-up
    def preprocess(
        self, bundle: Any, model: nn.Module | None, image_size: Any = None, *, channels: int | None = None,
        stats_sample: int = 2000,
    ) -> Any:  # fmt: skip
        """How the data's images become the model's inputs (``presso.data.Preprocess``): by default the model's
        recorded preprocessing, else the data's size (or ``image_size``), ``channels`` (else the model's) and the
        mean/std of ``stats_sample`` training images."""
        from presso.data import preprocess_for

        return preprocess_for(bundle, model, image_size=image_size, channels=channels, stats_sample=stats_sample)

    def prepare(self, model: nn.Module, bundle: Any, example: torch.Tensor, cfg: Any) -> None:  # noqa: B027
        """Once before training: adapt the model to the data (a new head, the data's image size)."""

    def check(self, model: nn.Module, example: torch.Tensor, bundle: Any, teacher: nn.Module | None) -> None:  # noqa: B027
        """Fail early, in the user's words, when ``model`` cannot be trained on ``bundle`` (default: no check)."""

    # ------------------------------------------------------------------ training
    def to_device(self, targets: Any, device: torch.device) -> Any:
        """Move a batch's targets to ``device`` (default: a tensor, or None when the batch is unlabeled)."""
        return None if targets is None else targets.to(device, non_blocking=True)

    def augment(self, x: torch.Tensor, targets: Any, gen: torch.Generator, *, flip: bool) -> tuple[torch.Tensor, Any]:
        """Seeded augmentation of a uint8 batch that keeps the targets right (default: none)."""
        return x, targets

    @abc.abstractmethod
    def loss(
        self, model: nn.Module, x: torch.Tensor, targets: Any, *, teacher: nn.Module | None, cfg: Any
    ) -> torch.Tensor:
        """The training loss of one batch: supervised with ``targets``, distilled from ``teacher`` when given
        (``targets`` may then be None: label-free). ``model`` may be wrapped in DistributedDataParallel."""

    # ------------------------------------------------------------------ scoring
    @abc.abstractmethod
    def metric(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, Any]],
        *,
        teacher: nn.Module | None,
        cfg: Any,
        dist: Any,
    ) -> dict[str, Any]:
        """Scores over held-out batches (``model`` in eval mode, under no_grad): a dict holding ``headline`` (and
        ``val_loss`` where it applies) when the batches have targets, and the distance to ``teacher`` (``match_loss``)
        when one is given. Under torchrun each process sees its share; combine with ``dist.sum`` (a tensor) or
        ``dist.gather`` (any picklable list)."""

    def postprocess(self, outputs: Any) -> Any:
        """The model's raw outputs -> predictions a person reads (default: as they are)."""
        return outputs

    # ------------------------------------------------------------------ compression
    def distance(self, student_out: Any, teacher_out: Any) -> torch.Tensor:
        """How far a compressed model's outputs are from the original's, on calibration inputs (lower is closer):
        the compressor chooses allocations by it."""
        return match_loss(student_out, teacher_out, 1.0)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "headline": self.headline}
