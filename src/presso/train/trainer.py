"""The training loop: supervised, distilled, or both; resumable; data-parallel under torchrun.

Nothing is lost: the run's state lives in ``OUT.partial/`` (``last.pt``: weights, optimizer, schedule, RNG states
and the position inside the epoch; ``best.safetensors``; ``metrics.csv``), written after every epoch and on Ctrl-C
(the interrupt is taken between steps, so the state is consistent). ``resume=True`` continues from it and ends with
the same weights an uninterrupted run would have. The model directory ``OUT`` appears only at the end, atomically.
Those files are ``checkpoint.py``'s; scoring on the held-out split is ``evaluation.py``'s.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from presso.data import DataBundle, Preprocess, batches, epoch_order, load_data
from presso.errors import ConfigError, DataError
from presso.models.card import ensure_card, get_card
from presso.models.figures import set_mode
from presso.progress import ProgressCallback, reporter
from presso.results import Result
from presso.tasks import Task, infer_task
from presso.train import distributed
from presso.train.checkpoint import Position, Resumable, RunFiles
from presso.train.config import TrainConfig
from presso.train.distill import FeatureTaps
from presso.train.evaluation import evaluate_dataset


@dataclass
class TrainResult(Result):
    """The best model of a run, its per-epoch history and best epoch; ``output_dir``: the model directory written."""

    model: nn.Module
    history: list[dict[str, Any]]
    best: dict[str, Any]
    preprocess: Preprocess
    seconds: float
    output_dir: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "task": self.best.get("task", "classify"),
            **{k: v for k, v in self.best.items() if k not in ("task", "epoch", "val_top1", "val_loss")},
            "val_top1": self.best.get("val_top1"),
            "val_loss": self.best.get("val_loss"),
            "best_epoch": self.best.get("epoch"),
            "epochs": last.get("epoch", 0),
            "seconds": round(self.seconds, 2),
            "output_dir": str(self.output_dir) if self.output_dir is not None else None,
            "history": self.history,
            "data": self.data,
            "preprocess": self.preprocess.to_json(),
        }


def train(
    model: nn.Module,
    data: str | Path | DataBundle,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    task: str | Task | None = None,
    trust: bool = False,
    regularizer: Any = None,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (a data spec or a ``DataBundle``; supervised), or distil it from ``teacher``
    (labels optional).

    ``task`` (``classify``, ``detect``, a ``presso.tasks.Task``, or a user's ``file.py:Class`` with ``trust``) is
    inferred from the model's card, the data and the model when not given (``presso.tasks.infer_task``).
    ``regularizer`` (sparsity training before a cut: ``presso.compress.prune.sparsity.GroupDecay``) has its
    ``after_step(lr)`` called after every optimizer step and its ``to_json()`` recorded on the card; a callable
    without ``after_step`` is a factory, called with the model and an example input batch (a tuple) once the model
    is ready to train.

    Returns the best model (by the task's headline metric -- validation top-1, mAP50-95 --, or by validation loss
    for unlabeled data) and its history. With
    ``output_dir`` the run is checkpointed and the result saved there as a Presso model directory (a non-empty one,
    a finished model too, is refused before training unless ``overwrite``; see ``presso.outdir``). ``progress``
    gets stage ``train`` events (done/total: steps of the whole run; info: epoch, epochs, step, steps, loss) and one
    ``epoch`` event per finished epoch (info: its metrics and the best epoch so far).
    """
    cfg = config or TrainConfig()
    run = _Run(model, data, cfg, teacher, output_dir, resume, progress, overwrite, task=task, trust=trust)
    run.regularizer = regularizer
    return run.execute()


class _Run:
    def __init__(
        self, model, data, cfg: TrainConfig, teacher, output_dir, resume: bool, progress, overwrite=False, *,
        task=None, trust=False,
    ):  # fmt: skip
        self.cfg = cfg
        self.dist = distributed.setup()
        self.device = _device(cfg.device, self.dist.local_rank)
        self.bundle = (
            data if isinstance(data, DataBundle) else load_data(data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        )
        self.model = model
        if cfg.qat and teacher is None:  # QAT learns from the FP32 model it starts from
            import copy

            from presso.models.qat import is_qat

            if not is_qat(model):
                teacher = copy.deepcopy(model)
        self.teacher = teacher
        self.task = infer_task(model, self.bundle, task or cfg.task, trust=trust)
        self.resume = resume
        # only the main process reports under torchrun; without a callback no step reads its loss back (a sync)
        self.reports = progress is not None and self.dist.is_main
        self.report_step = reporter(progress if self.reports else None, "train")
        self.report_epoch = reporter(progress if self.reports else None, "epoch")
        self.ctrl_c = _CtrlC()
        self.regularizer = None
        if self.teacher is None and not self.bundle.labeled:
            raise DataError(
                f"'{self.bundle.name}' has no labels: supervised training needs labels; to train on unlabeled "
                "images give a teacher (presso train STUDENT --teacher ORIGINAL --data ...)."
            )
        loaded_from = [c.source.get("code_from") for c in map(get_card, (model, teacher)) if c is not None]
        self.files = RunFiles(output_dir, resume=resume, dist=self.dist, overwrite=overwrite, sources=loaded_from)

    # ------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        cfg = self.cfg
        card = get_card(self.model)
        if card is not None and card.input_spec and ";" in card.input_spec:
            raise DataError(f"The model takes several inputs ({card.input_spec}); image data feeds one.")
        self.pp = self.task.preprocess(self.bundle, self.model, image_size=cfg.image_size)
        self.train_set = self.bundle.train.at(self.pp.size, self.pp.channels)
        self.val_set = self.bundle.val.at(self.pp.size, self.pp.channels)
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
            set_mode(self.teacher, False)  # its forward runs under no_grad; its parameters are left as they are
        example = self.pp.normalize(next(batches(self.val_set, np.arange(min(2, len(self.val_set))), 2))[0])
        example = example.to(self.device)
        self.task.prepare(self.model, self.bundle, example, cfg)
        if cfg.qat:
            from presso.models.qat import is_qat, prepare_qat

            if not is_qat(self.model):  # a QAT model given again continues its fine-tune
                ensure_card(self.model).recipe.append(prepare_qat(self.model, (example,), cfg.qat_reduce_range))
        self.task.check(self.model, example, self.bundle, self.teacher)
        if self.regularizer is not None and not hasattr(self.regularizer, "after_step"):
            self.regularizer = self.regularizer(self.model, (example,))
        self.taps = None
        if self.teacher is not None and cfg.feature_match:
            self.taps = FeatureTaps(self.model, self.teacher, example)
            if not self.taps.names:
                raise ConfigError("--feature-match: no layer has the same name and output shape in both models.")
        # NHWC ("channels_last"): whole CPU training epochs ran 1.2-1.85x faster than in NCHW (ResNet-8,
        # MobileNetV3-Small, two search-space members; benchmarks/train_speed.py, docs/benchmarks.md), and cuDNN's
        # tensor-core kernels want it too. Only where the task allows it and one forward shows the model takes it (a
        # model that .view()s a conv's output fails on NHWC strides, and keeps NCHW). Given back in NCHW.
        self.nhwc = [m for m in (self.model, self.teacher) if m is not None and self.task.channels_last
                     and takes_channels_last(m, example)]  # fmt: skip
        for m in self.nhwc:
            m.to(memory_format=torch.channels_last)
        self.channels_last = any(m is self.model for m in self.nhwc)
        self.net = self.dist.wrap(self.model, self.device)
        per_rank = math.ceil(cfg.batch_size / self.dist.world)
        self.per_rank = per_rank
        n_local = len(
            epoch_order(len(self.train_set), seed=0, epoch=0, shuffle=False, rank=self.dist.rank, world=self.dist.world)
        )
        self.steps_per_epoch = math.ceil(n_local / per_rank)
        total = self.steps_per_epoch * cfg.epochs
        self.opt = _optimizer(self.model, cfg)
        warm = int(cfg.warmup * total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _warmup_cosine(warm, total))
        self.gen = torch.Generator()
        self.amp = self.device.type == "cuda" and cfg.amp != "off"
        self.workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
        self.live = Resumable(cfg, self.pp, self.model, self.opt, self.sched, self.gen)

    # ------------------------------------------------------------------ the loop
    def execute(self) -> TrainResult:
        t0 = time.perf_counter()
        self._prepare()
        with self._nchw_after():  # the loop in NHWC where the model takes it; NCHW again for saving
            history, best = self._loop(t0)
        if self.best_state is None:
            self.best_state = self.files.load_best(self.model, self.device)
        self.model.load_state_dict(self.best_state)
        set_mode(self.model, False)
        if self.taps is not None:
            self.taps.remove()
        result = TrainResult(
            self.model,
            history,
            {k: v for k, v in best.items() if k != "score"},
            self.pp,
            time.perf_counter() - t0,
            data=self.bundle.describe(),
        )
        self._record_on_card(result)
        written = self.files.finish(self.model, result.history)
        result.output_dir = Path(written) if written is not None else None
        self.dist.close()
        return result

    def _loop(self, t0: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The epochs (from the checkpoint when resuming): the history and the best epoch."""
        start = self.files.load_checkpoint(self.live) if self.resume else Position()
        start_epoch, start_step, history, best = start.epoch, start.step, start.history, start.best
        self._sums = start.sums
        self.files.make_state_dir()
        self.best_state = None
        with self.ctrl_c.caught():
            for epoch in range(start_epoch, self.cfg.epochs):
                step = start_step if epoch == start_epoch else 0
                if step == 0:  # each epoch starts from seeds of its own, so a resumed run draws what it would have
                    torch.manual_seed(self.cfg.seed * 100_003 + epoch)
                    self.gen.manual_seed(self.cfg.seed * 100_003 + epoch + 1)
                    self._sums = [0.0, 0]  # this epoch's (loss x samples, samples)
                try:
                    train_loss = self._train_epoch(epoch, step)
                except KeyboardInterrupt:
                    self._save_checkpoint(epoch, self._step, history, best)
                    raise
                scores = self.evaluate_val()
                per_class = scores.pop("per_class", None)  # kept with the best epoch, not in every history row
                row = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "lr": self.opt.param_groups[0]["lr"],
                    **scores,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                history = [h for h in history if h["epoch"] != epoch + 1] + [row]
                headline = self.task.headline
                score = row[headline] if row.get(headline) is not None else -row["val_loss"]
                if score > best["score"]:
                    best = {
                        "score": score,
                        "epoch": epoch + 1,
                        "task": self.task.name,
                        **({headline: row[headline]} if row.get(headline) is not None else {}),
                        "val_top1": row.get("val_top1"),
                        "val_loss": row.get("val_loss"),
                        **({"map50": row["map50"], "per_class": per_class} if "map50" in row else {}),
                    }
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    self.files.save_best(self.best_state)
                self.report_epoch(epoch + 1, self.cfg.epochs, **row, best_epoch=best["epoch"])
                self._save_checkpoint(epoch + 1, 0, history, best)
        return history, best

    @contextlib.contextmanager
    def _nchw_after(self):
        """The models trained in NHWC go back to NCHW however the loop ends (saved, exported and pruned as given)."""
        try:
            yield
        finally:
            for m in self.nhwc:
                m.to(memory_format=torch.contiguous_format)

    def _train_epoch(self, epoch: int, skip: int) -> float:
        cfg = self.cfg
        set_mode(self.model, True)
        order = epoch_order(
            len(self.train_set), seed=cfg.seed, epoch=epoch, shuffle=True, rank=self.dist.rank, world=self.dist.world
        )
        order = order[skip * self.per_rank :]
        self._step = skip
        for x, y in batches(self.train_set, order, self.per_rank, workers=self._workers_for(self.train_set)):
            if len(x) == 0:
                self._step += 1
                continue
            y = y if self.bundle.labeled else None
            if cfg.augment:
                x, y = self.task.augment(x, y, self.gen, flip=self.bundle.flip)
            x = self.pp.normalize(x).to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.task.to_device(y, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self._loss(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            if self.regularizer is not None:
                self.regularizer.after_step(self.opt.param_groups[0]["lr"])
            self.sched.step()
            self._step += 1
            self._sums[0] += float(loss.detach()) * len(x)
            self._sums[1] += len(x)
            if self.reports:
                self.report_step(
                    epoch * self.steps_per_epoch + self._step,
                    cfg.epochs * self.steps_per_epoch,
                    epoch=epoch + 1,
                    epochs=cfg.epochs,
                    step=self._step,
                    steps=self.steps_per_epoch,
                    loss=float(loss.detach()),
                )
            if self.dist.any(self.ctrl_c.pressed):
                raise KeyboardInterrupt
        loss_sum = self.dist.sum(torch.tensor(self._sums, dtype=torch.float64))
        return round(float(loss_sum[0] / loss_sum[1]), 5) if loss_sum[1] else float("nan")

    def _loss(self, x: torch.Tensor, y: Any) -> torch.Tensor:
        cfg = self.cfg
        loss = self.task.loss(self.net, x, y, teacher=self.teacher, cfg=cfg)
        if self.taps is not None:
            feat = self.taps.loss()
            if feat is not None:
                loss = loss + cfg.feature_weight * feat
        return loss

    def evaluate_val(self) -> dict[str, Any]:
        if self.taps is not None:
            self.taps.active = False
        try:
            return evaluate_dataset(
                self.model,
                self.val_set,
                self.pp,
                labeled=self.bundle.labeled,
                teacher=self.teacher,
                task=self.task,
                cfg=self.cfg,
                device=self.device,
                dist=self.dist,
                workers=self._workers_for(self.val_set),
            )
        finally:
            if self.taps is not None:
                self.taps.active = True

    def _workers_for(self, dataset) -> int:
        from presso.data.images import _TensorImages

        return 0 if isinstance(dataset, _TensorImages) else self.workers

    # ------------------------------------------------------------------ checkpoints and the card
    def _save_checkpoint(self, epoch: int, step: int, history, best) -> None:
        self.files.save_checkpoint(self.live, Position(epoch, step, history, best, list(self._sums)))

    def _record_on_card(self, result: TrainResult) -> None:
        card = ensure_card(self.model)
        card.task = self.task.key
        card.preprocess = self.pp.to_json()
        if self.bundle.labeled:  # the data's classes name the outputs (a label-free run keeps the original's)
            card.labels = list(self.bundle.classes)
        card.input_spec = ",".join(str(v) for v in self.pp.input_shape)
        card.figures.update(
            {k: v for k, v in result.best.items() if k not in ("task", "epoch") and isinstance(v, (int, float))}
        )
        card.history.append(
            {
                "verb": "train",
                "config": self.cfg.to_json(),
                "data": self.bundle.name,
                "teacher": (
                    get_card(self.teacher).source.get("source")
                    if self.teacher is not None and get_card(self.teacher)
                    else (type(self.teacher).__name__ if self.teacher is not None else None)
                ),
                "best": result.best,
                **({"regularizer": self.regularizer.to_json()} if self.regularizer is not None else {}),
                "epochs": len(result.history),
                "seconds": round(result.seconds, 2),
            }
        )


class _CtrlC:
    """First Ctrl-C: finish the current step, checkpoint, stop. A second one stops at once."""

    def __init__(self) -> None:
        self.pressed = False

    @contextlib.contextmanager
    def caught(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.pressed:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.pressed = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- helpers
def takes_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``model`` (with 2-D convolutions, on 4-D images) gives the same outputs in NHWC as in NCHW: one
    no-grad forward each, in eval mode. A RuntimeError (a .view() of NHWC strides) or different outputs: no. The model
    is left in NCHW and in the mode it was in."""
    if example.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    was_training = model.training
    set_mode(model, False)
    try:
        with torch.no_grad():
            ref = torch.utils._pytree.tree_leaves(model(example))
            model.to(memory_format=torch.channels_last)
            out = torch.utils._pytree.tree_leaves(model(example.contiguous(memory_format=torch.channels_last)))
    except RuntimeError:
        return False
    finally:
        model.to(memory_format=torch.contiguous_format)
        set_mode(model, was_training)
    if len(ref) != len(out) or not any(isinstance(a, torch.Tensor) for a in ref):
        return False
    for a, b in zip(ref, out, strict=True):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or not a.is_floating_point():
            return False
        scale = float(a.abs().max()) if a.numel() else 0.0
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
            return False
    return True


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("Every parameter of the model is frozen (requires_grad=False): nothing to train.")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate)
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{name}': use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but this machine has no usable GPU; use --torch-device cpu.")
    return dev


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
