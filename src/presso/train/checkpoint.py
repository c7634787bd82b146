"""A training run's files: its state directory while it lasts, the model directory at its end.

``OUT.partial/`` holds ``last.pt`` (weights, optimizer, schedule, RNG states, the position inside the epoch, the
history, the settings and preprocessing the run used), ``best.safetensors`` (the best epoch's weights) and
``metrics.csv``; every file is written to a temporary name and renamed, so a crash leaves the previous copy whole.
``finish`` writes the model directory ``OUT`` in one atomic step and only then removes ``OUT.partial/``. ``OUT``
follows ``presso.outdir``: a non-empty ``OUT`` (a finished model too) is refused before training starts unless
``overwrite``; ``OUT.partial/`` is this verb's resumable state and needs no ``overwrite``.

Checkpoints are safe to load: weights come back through safetensors, and ``last.pt`` through
``torch.load(..., weights_only=True)``, which rebuilds tensors and plain containers and never unpickles code.
Only the main process writes; under torchrun the others wait for it at a barrier.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from presso.data import Preprocess
from presso.errors import ConfigError
from presso.train.config import TrainConfig
from presso.train.distributed import Dist

CHECKPOINT_VERSION = 1


def partial_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.with_name(out.name + ".partial")


def has_checkpoint(output_dir: str | Path) -> bool:
    """Whether an interrupted run into `output_dir` left a checkpoint to resume (``OUT.partial/last.pt``)."""
    return (partial_dir(output_dir) / "last.pt").is_file()


@dataclass
class Resumable:
    """What a checkpoint records: the settings and preprocessing a resumption must match, and the live objects whose
    state it saves and puts back in place."""

    cfg: TrainConfig
    pp: Preprocess
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # augmentation's random draws


@dataclass
class Position:
    """Where a run stands: the epoch and the step inside it to continue from, the history and best scores so far,
    and the epoch's running (loss x samples, samples)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf})
    sums: list[float] = field(default_factory=lambda: [0.0, 0])


class RunFiles:
    """The state directory ``OUT.partial/`` and the output ``OUT`` of one run; with no output directory, nothing is
    written (and there is nothing to resume)."""

    def __init__(self, output_dir: str | Path | None, *, resume: bool, dist: Dist, overwrite: bool = False, sources=()):
        self.out = Path(output_dir) if output_dir is not None else None
        self.state_dir = partial_dir(self.out) if self.out is not None else None
        self.dist = dist
        self.overwrite = overwrite
        self.sources = [s for s in sources if s]  # the folders the model (and teacher) were loaded from
        self._check(resume)

    def _check(self, resume: bool) -> None:
        if self.state_dir is None:
            if resume:
                raise ConfigError("resume needs the output directory of the interrupted run.")
            return
        import presso.outdir as outdir

        if self.dist.is_main and self._leftover():
            shutil.rmtree(self.state_dir, ignore_errors=True)  # a finished run, killed before it removed its state
        outdir.check(self.out, overwrite=self.overwrite, sources=self.sources)  # before training, not after
        exists = (self.state_dir / "last.pt").is_file()
        if resume and not exists:
            raise ConfigError(f"Nothing to resume: '{self.state_dir}' holds no checkpoint (last.pt).")
        if not resume and exists:
            raise ConfigError(
                f"An interrupted run is kept in '{self.state_dir}': pass --resume to continue it, or delete that "
                "folder to start over."
            )

    def _leftover(self) -> bool:
        """The state directory of the run that wrote ``OUT`` (same metrics, byte for byte): nothing left to resume."""
        done, state = self.out / "metrics.csv", self.state_dir / "metrics.csv"
        try:
            return done.is_file() and state.is_file() and done.read_bytes() == state.read_bytes()
        except OSError:
            return False

    def make_state_dir(self) -> None:
        if self.state_dir is not None and self.dist.is_main:
            self.state_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ last.pt
    def save_checkpoint(self, live: Resumable, at: Position) -> None:
        if self.state_dir is None or not self.dist.is_main:
            self.dist.barrier()
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "config": live.cfg.to_json(),
            "epoch": at.epoch,
            "step": at.step,
            "model": live.model.state_dict(),
            "optimizer": live.optimizer.state_dict(),
            "scheduler": live.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "aug_rng": live.generator.get_state(),
            "epoch_sums": list(at.sums),
            "history": at.history,
            "best": at.best,
            "preprocess": live.pp.to_json(),
        }
        tmp = self.state_dir / "last.pt.tmp"
        with _disk(self.state_dir, tmp):
            self.state_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            os.replace(tmp, self.state_dir / "last.pt")
            _write_metrics(self.state_dir / "metrics.csv", at.history)
        self.dist.barrier()

    def load_checkpoint(self, live: Resumable) -> Position:
        """Check that ``last.pt`` belongs to this run, put its state back into ``live``, and say where it stopped."""
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
        if diff := saved.differences(live.cfg):
            shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(diff.items())[:4])
            raise ConfigError(
                f"The interrupted run used other settings ({shown}); resume with the same settings, or delete "
                f"'{self.state_dir}' to start over."
            )
        if Preprocess.from_json(state["preprocess"]) != live.pp:
            raise ConfigError("The data's preprocessing differs from the interrupted run's; resume on the same data.")
        try:
            live.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ConfigError(
                f"The checkpoint does not fit this model ({str(e)[:200]}); resume the same model."
            ) from None
        live.optimizer.load_state_dict(state["optimizer"])
        live.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        live.generator.set_state(state["aug_rng"])
        return Position(
            epoch=int(state["epoch"]),
            step=int(state["step"]),
            history=list(state["history"]),
            best=dict(state["best"]),
            sums=[float(state["epoch_sums"][0]), int(state["epoch_sums"][1])],
        )

    # ------------------------------------------------------------------ best.safetensors
    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        if self.state_dir is None or not self.dist.is_main:
            return
        from safetensors.torch import save_file

        tmp = self.state_dir / "best.safetensors.tmp"
        with _disk(self.state_dir, tmp):
            self.state_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(tmp))
            os.replace(tmp, self.state_dir / "best.safetensors")

    def load_best(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """The saved best weights on ``device``, or ``model``'s own when none were saved."""
        from safetensors.torch import load_file

        path = self.state_dir / "best.safetensors" if self.state_dir is not None else None
        if path is None or not path.is_file():
            return model.state_dict()
        return {k: v.to(device) for k, v in load_file(str(path)).items()}

    # ------------------------------------------------------------------ the end
    def finish(self, model: nn.Module, history: list[dict[str, Any]]) -> str | None:
        """Write ``model`` (its card already updated) and the metrics as the model directory ``OUT``, then drop the
        state directory. Returns ``OUT``, or None when the run has no output directory."""
        if self.out is None:
            return None
        if self.dist.is_main:
            from presso.models.directory import save_model_dir

            save_model_dir(
                model.cpu(), self.out, extra_files={"metrics.csv": _metrics_text(history)}, overwrite=self.overwrite
            )
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self.dist.barrier()
        return str(self.out)


@contextlib.contextmanager
def _disk(where: Path, tmp: Path):
    """A checkpoint write the disk refuses (full, read-only) is one line; the previous checkpoint stays whole."""
    import presso.outdir as outdir

    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if e.errno in outdir.DISK_ERRORS:
            raise outdir.disk_error(e, where) from None
        raise


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
