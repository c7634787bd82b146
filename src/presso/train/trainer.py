"""The training loop: supervised, distilled, or both; resumable; data-parallel under torchrun.

Nothing is lost: the run's state lives in ``OUT.partial/`` (``last.pt``: weights, optimizer, schedule, RNG states
and the position inside the epoch; ``best.safetensors``; ``metrics.csv``), written after every epoch and on Ctrl-C
(the interrupt is taken between steps, so the state is consistent). ``resume=True`` continues from it and ends with
the same weights an uninterrupted run would have. The model directory ``OUT`` appears only at the end, atomically.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from presso.data import DataBundle, Preprocess, augment, batches, epoch_order, load_data, preprocess_for
from presso.errors import ConfigError, DataError
from presso.models.card import ensure_card, get_card
from presso.models.figures import set_mode
from presso.train import distributed
from presso.train.config import TrainConfig
from presso.train.distill import FeatureTaps, is_class_scores, kd_loss, leaves, match_loss

CHECKPOINT_VERSION = 1
Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    best: dict[str, Any]
    preprocess: Preprocess
    seconds: float
    output_dir: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "val_top1": self.best.get("val_top1"),
            "val_loss": self.best.get("val_loss"),
            "best_epoch": self.best.get("epoch"),
            "epochs": last.get("epoch", 0),
            "seconds": round(self.seconds, 2),
            "output_dir": self.output_dir,
            "history": self.history,
            "data": self.data,
            "preprocess": self.preprocess.to_json(),
        }


def partial_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.with_name(out.name + ".partial")


def train(
    model: nn.Module,
    data: str | Path | DataBundle,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (supervised), or distil it from ``teacher`` (labels optional).

    Returns the best model (by validation top-1, or by validation loss for unlabeled data) and its history. With
    ``output_dir`` the run is checkpointed and the result saved there as a Presso model directory.
    """
    cfg = config or TrainConfig()
    return _Run(model, data, cfg, teacher, output_dir, resume, progress).execute()


class _Run:
    def __init__(self, model, data, cfg: TrainConfig, teacher, output_dir, resume: bool, progress):
        self.cfg = cfg
        self.dist = distributed.setup()
        self.device = _device(cfg.device, self.dist.local_rank)
        self.bundle = (
            data if isinstance(data, DataBundle) else load_data(data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        )
        self.model = model
        self.teacher = teacher
        self.out = Path(output_dir) if output_dir is not None else None
        self.state_dir = partial_dir(self.out) if self.out is not None else None
        self.resume = resume
        self.progress = progress if self.dist.is_main else None
        self._stop = False
        if self.teacher is None and not self.bundle.labeled:
            raise DataError(
                f"'{self.bundle.name}' has no labels: supervised training needs labels; to train on unlabeled "
                "images give a teacher (presso train STUDENT --teacher ORIGINAL --data ...)."
            )
        self._check_state_dir()

    # ------------------------------------------------------------------ setup
    def _check_state_dir(self) -> None:
        if self.state_dir is None:
            if self.resume:
                raise ConfigError("resume needs the output directory of the interrupted run.")
            return
        exists = (self.state_dir / "last.pt").is_file()
        if self.resume and not exists:
            raise ConfigError(f"Nothing to resume: '{self.state_dir}' holds no checkpoint (last.pt).")
        if not self.resume and exists:
            raise ConfigError(
                f"An interrupted run is kept in '{self.state_dir}': pass --resume to continue it, or delete that "
                "folder to start over."
            )

    def _prepare(self) -> None:
        cfg = self.cfg
        card = get_card(self.model)
        if card is not None and card.input_spec and ";" in card.input_spec:
            raise DataError(f"The model takes several inputs ({card.input_spec}); image data feeds one.")
        self.pp = preprocess_for(self.bundle, self.model, image_size=cfg.image_size)
        self.train_set = self.bundle.train.at(self.pp.size, self.pp.channels)
        self.val_set = self.bundle.val.at(self.pp.size, self.pp.channels)
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
            set_mode(self.teacher, False)  # its forward runs under no_grad; its parameters are left as they are
        example = self.pp.normalize(next(batches(self.val_set, np.arange(min(2, len(self.val_set))), 2))[0])
        example = example.to(self.device)
        self._check_model(example)
        self.taps = None
        if self.teacher is not None and cfg.feature_match:
            self.taps = FeatureTaps(self.model, self.teacher, example)
            if not self.taps.names:
                raise ConfigError("--feature-match: no layer has the same name and output shape in both models.")
        self.net = self.dist.wrap(self.model, self.device)
        per_rank = math.ceil(cfg.batch_size / self.dist.world)
        self.per_rank = per_rank
        n_local = len(
            epoch_order(len(self.train_set), seed=0, epoch=0, shuffle=False, rank=self.dist.rank, world=self.dist.world)
        )
        self.steps_per_epoch = math.ceil(n_local / per_rank)
        total = self.steps_per_epoch * cfg.epochs
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("Every parameter of the model is frozen (requires_grad=False): nothing to train.")
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # biases and norms: no weight decay
        groups = [{"params": decay, "weight_decay": cfg.decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(groups, lr=cfg.learning_rate)
        else:
            self.opt = torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True)
        warm = int(cfg.warmup * total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _warmup_cosine(warm, total))
        self.gen = torch.Generator()
        self.amp = self.device.type == "cuda" and cfg.amp != "off"
        self.workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)

    def _check_model(self, example: torch.Tensor) -> None:
        set_mode(self.model, True)
        try:
            with torch.no_grad():
                out = self.model(example)
        except Exception as e:
            raise DataError(
                f"The model does not accept the data's images ({tuple(example.shape)}): {type(e).__name__}: "
                f"{str(e)[:200]}. Check --image-size and that the model's input channels match."
            ) from None
        first = leaves(out)
        if self.bundle.labeled and self.teacher is None:
            if not first or not is_class_scores(first[0]):
                raise ConfigError(
                    "Supervised training needs a classifier (output [N, classes]); this model outputs "
                    f"{[tuple(t.shape) for t in first][:3]}. Distil it from its original instead (--teacher)."
                )
        if self.bundle.labeled and first and is_class_scores(first[0]):
            n_out, n_cls = first[0].shape[1], self.bundle.num_classes or 0
            if n_out < n_cls:
                raise DataError(
                    f"The model outputs {n_out} classes but the data has {n_cls}; build it with "
                    f"--model-arg num_classes={n_cls}."
                )
            if n_out != n_cls and self.teacher is None:
                raise DataError(
                    f"The model outputs {n_out} classes but '{self.bundle.name}' has {n_cls}; build it with "
                    f"--model-arg num_classes={n_cls}."
                )

    # ------------------------------------------------------------------ the loop
    def execute(self) -> TrainResult:
        t0 = time.perf_counter()
        self._prepare()
        start_epoch, start_step, history, best = 0, 0, [], {"score": -math.inf}
        if self.resume:
            start_epoch, start_step, history, best = self._load_checkpoint()
        if self.state_dir is not None and self.dist.is_main:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.best_state = None
        with self._interrupts():
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
                row = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "lr": self.opt.param_groups[0]["lr"],
                    **self.evaluate_val(),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                history = [h for h in history if h["epoch"] != epoch + 1] + [row]
                score = row["val_top1"] if row.get("val_top1") is not None else -row["val_loss"]
                if score > best["score"]:
                    best = {
                        "score": score,
                        "epoch": epoch + 1,
                        "val_top1": row.get("val_top1"),
                        "val_loss": row["val_loss"],
                    }
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    self._save_best()
                if self.progress:
                    self.progress({"phase": "epoch", **row, "best_epoch": best["epoch"]})
                self._save_checkpoint(epoch + 1, 0, history, best)
        if self.best_state is None:
            self.best_state = self._load_best()
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
        self._finish(result)
        self.dist.close()
        return result

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
            if cfg.augment:
                x = augment(x, self.gen, flip=self.bundle.flip)
            x = self.pp.normalize(x).to(self.device, non_blocking=True)
            y = y.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self._loss(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self._step += 1
            self._sums[0] += float(loss.detach()) * len(x)
            self._sums[1] += len(x)
            if self.progress:
                self.progress(
                    {
                        "phase": "train",
                        "epoch": epoch + 1,
                        "epochs": cfg.epochs,
                        "step": self._step,
                        "steps": self.steps_per_epoch,
                        "loss": float(loss.detach()),
                    }
                )
            if self.dist.any(self._stop):
                raise KeyboardInterrupt
        loss_sum = self.dist.sum(torch.tensor(self._sums, dtype=torch.float64))
        return round(float(loss_sum[0] / loss_sum[1]), 5) if loss_sum[1] else float("nan")

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        out = self.net(x)
        scores = leaves(out)
        labeled = bool((y >= 0).all()) and self.bundle.labeled
        if self.teacher is None:
            return F.cross_entropy(scores[0].float(), y, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            t_out = self.teacher(x)
        t_scores = leaves(t_out)
        if labeled and scores and is_class_scores(scores[0]) and t_scores and scores[0].shape == t_scores[0].shape:
            ce = F.cross_entropy(scores[0].float(), y, label_smoothing=cfg.label_smoothing)
            loss = (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kd_loss(scores[0], t_scores[0], cfg.temperature)
        else:
            loss = match_loss(out, t_out, cfg.temperature)
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
                temperature=self.cfg.temperature,
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

    # ------------------------------------------------------------------ interrupts and checkpoints
    @contextlib.contextmanager
    def _interrupts(self):
        """First Ctrl-C: finish the current step, checkpoint, stop. A second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._stop = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _save_checkpoint(self, epoch: int, step: int, history, best) -> None:
        if self.state_dir is None or not self.dist.is_main:
            self.dist.barrier()
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_json(),
            "epoch": epoch,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "aug_rng": self.gen.get_state(),
            "epoch_sums": list(self._sums),
            "history": history,
            "best": best,
            "preprocess": self.pp.to_json(),
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "last.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_dir / "last.pt")
        _write_metrics(self.state_dir / "metrics.csv", history)
        self.dist.barrier()

    def _save_best(self) -> None:
        if self.state_dir is None or not self.dist.is_main:
            return
        from safetensors.torch import save_file

        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "best.safetensors.tmp"
        save_file({k: v.contiguous().cpu() for k, v in self.best_state.items()}, str(tmp))
        os.replace(tmp, self.state_dir / "best.safetensors")

    def _load_best(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.state_dir / "best.safetensors" if self.state_dir is not None else None
        if path is None or not path.is_file():
            return self.model.state_dict()
        return {k: v.to(self.device) for k, v in load_file(str(path)).items()}

    def _load_checkpoint(self):
        path = self.state_dir / "last.pt"
        try:
            # weights_only: tensors, numbers, strings, lists and dicts only -- nothing executes while loading
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(
                f"Cannot read checkpoint '{path}' ({type(e).__name__}); delete the folder to start over."
            ) from None
        if state.get("version", 0) > CHECKPOINT_VERSION:
            raise ConfigError(f"'{path}' was written by a newer Presso; upgrade presso to resume it.")
        saved = TrainConfig.from_json(state["config"])
        if diff := saved.differences(self.cfg):
            shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(diff.items())[:4])
            raise ConfigError(
                f"The interrupted run used other settings ({shown}); resume with the same settings, or delete "
                f"'{self.state_dir}' to start over."
            )
        if Preprocess.from_json(state["preprocess"]) != self.pp:
            raise ConfigError("The data's preprocessing differs from the interrupted run's; resume on the same data.")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ConfigError(
                f"The checkpoint does not fit this model ({str(e)[:200]}); resume the same model."
            ) from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.gen.set_state(state["aug_rng"])
        self._sums = [float(state["epoch_sums"][0]), int(state["epoch_sums"][1])]
        return int(state["epoch"]), int(state["step"]), list(state["history"]), dict(state["best"])

    def _finish(self, result: TrainResult) -> None:
        card = ensure_card(self.model)
        card.preprocess = self.pp.to_json()
        if self.bundle.labeled:  # the data's classes name the outputs (a label-free run keeps the original's)
            card.labels = list(self.bundle.classes)
        card.input_spec = ",".join(str(v) for v in self.pp.input_shape)
        card.figures.update(
            {
                k: v
                for k, v in (("val_top1", result.best.get("val_top1")), ("val_loss", result.best.get("val_loss")))
                if v is not None
            }
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
                "epochs": len(result.history),
                "seconds": round(result.seconds, 2),
            }
        )
        if self.out is None:
            return
        result.output_dir = str(self.out)
        if self.dist.is_main:
            from presso.models.directory import save_model_dir

            save_model_dir(self.model.cpu(), self.out, extra_files={"metrics.csv": _metrics_text(result.history)})
            import shutil

            shutil.rmtree(self.state_dir, ignore_errors=True)
        self.dist.barrier()


# --------------------------------------------------------------------------- evaluation
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
) -> dict[str, Any]:
    """Top-1 and cross-entropy on labeled data; with a teacher, also agreement (same top-1 class) and the
    label-free matching loss. Under torchrun each process scores its share and the sums are reduced."""
    dist = dist or distributed.setup()
    device = device or next(model.parameters()).device
    order = np.arange(len(dataset))[dist.rank :: dist.world]
    sums = torch.zeros(5, dtype=torch.float64)  # n, correct, ce, agree, match
    set_mode(model, False)
    with torch.no_grad():
        for x, y in batches(dataset, order, batch_size, workers=workers):
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
                if scores and t_scores and is_class_scores(scores[0]) and scores[0].shape == t_scores[0].shape:
                    sums[3] += float((scores[0].argmax(1) == t_scores[0].argmax(1)).sum())
                sums[4] += float(match_loss(out, t_out, temperature)) * n
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


# --------------------------------------------------------------------------- helpers
def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{name}': use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but this machine has no usable GPU; use --device cpu.")
    return dev


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _metrics_text(history: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(_metrics_text(history))
    os.replace(tmp, path)
