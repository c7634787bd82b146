"""Hardware-aware architecture search with Optuna: predicted latency first, training only for what can fit.

Each trial draws an architecture from the space and predicts its latency on the device from the latency database
(``presso.bench.predict_latency``, scaled by how far the predictor was off on the measured warm-start models). A
candidate over the budget is pruned before any training and counted; a feasible one gets a proxy training (a few
epochs on a share of the data) whose held-out top-1 ranks it. The study is multi-objective (top-1 up, latency down)
with the latency budget as a constraint. When the trials are done, the best feasible candidates are measured for
real on the device (every measurement lands in the latency database), the best one that meets the budget on its
measurement is trained fully, measured again, and saved with a report (Pareto table + plot).

The study lives in Optuna storage: SQLite in the output directory by default, or any SQLAlchemy URL (PostgreSQL)
shared by workers on many machines (``--storage URL --study NAME`` on each). Workers send heartbeats; a trial of a
killed worker is failed and retried with the same parameters by the next worker to start, and the trial count
counts finished trials only, so a killed search resumes where it stopped with nothing lost or run twice.

The output folder follows Presso's one output rule (``presso.outdir``): a folder holding only what a search writes
(``OWN``) is resumed in place; anything else is refused unless ``overwrite`` (then the search runs in a temporary
sibling renamed into place at the end). The winner in ``OUT/model`` is kept when a rerun picks the same candidate
trained the same way, and replaced by another winner only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import presso.outdir as outdir
from presso.bench.latency_db import safe_url
from presso.errors import BudgetError, ConfigError, DataError, OutputError
from presso.progress import ProgressCallback, ProgressEvent
from presso.results import Result
from presso.search.config import SearchConfig
from presso.search.space import SearchSpace, arch_key, get_space
from presso.search.study import counts, finished, open_study, pareto_rows, storage_url, write_report

# what a search writes into its output folder (SQLite's journal files with the study): a folder holding only these
# is a search's own state, resumed in place
OWN = frozenset({"study.db", "study.db-journal", "study.db-wal", "study.db-shm", "search.json", "trials.csv",
                 "pareto.png", "model", "model.partial"})  # fmt: skip


@dataclass
class SearchResult(Result):
    output_dir: Path
    study: str
    storage: str
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]]
    counts: dict[str, int]
    seconds: float
    config: SearchConfig
    warm_start: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "study": self.study,
            "storage": self.storage,
            "best": self.best,
            "pareto": self.pareto,
            "trials": self.counts,
            "warm_start": self.warm_start,
            "seconds": round(self.seconds, 1),
            "config": asdict(self.config),
        }


# --------------------------------------------------------------------------- the search
class _Search:
    def __init__(self, data, cfg: SearchConfig, output: Path, storage, study_name, db, progress, *,
                 shown: Path | None = None, overwrite: bool = False):  # fmt: skip
        from presso.data import DataBundle, load_data

        self.cfg, self.output, self.db = cfg, output, db
        self.shown = shown or output  # the output as the user named it (``output`` may be its temporary sibling)
        self.overwrite = overwrite
        self.report = progress or (lambda _stage, _info: None)
        self.progress: ProgressCallback | None = None  # the caller's callback, for the nested verbs' own stages
        self.bundle = data if isinstance(data, DataBundle) else load_data(data, seed=cfg.seed)
        if not self.bundle.labeled:
            raise DataError(f"'{self.bundle.name}' has no labels: the search ranks candidates by accuracy.")
        size, channels = self.bundle.train.native()
        if size is None:
            raise DataError(f"Images in '{self.bundle.name}' have different sizes; resize them to one size first.")
        self.space: SearchSpace = get_space(cfg.space, size, channels, self.bundle.num_classes)
        self.proxy = self._proxy_bundle()
        self.url = storage_url(storage, output)
        self.name = study_name or f"presso-{self.bundle.name.replace('/', '_')}-{cfg.device}-{cfg.latency_ms:g}ms"
        self.study, self.created = open_study(self.url, self.name, cfg)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _proxy_bundle(self):
        """The proxy's data, both halves drawn from the training split: ``proxy_val`` held-out images score the
        candidates, ``proxy_fraction`` of the rest trains them. The validation split is never seen by the search --
        it judges the winner only (for Fashion-MNIST it is the test set, which must not choose the architecture)."""
        from presso.data import DataBundle

        rng = np.random.default_rng(self.cfg.seed)
        order = rng.permutation(len(self.bundle.train))
        n_val = min(self.cfg.proxy_val, max(self.bundle.num_classes, len(order) // 5))
        pool = order[n_val:]
        n_train = min(len(pool), max(self.bundle.num_classes * 8, int(len(pool) * self.cfg.proxy_fraction)))
        return DataBundle(
            name=self.bundle.name,
            train=self.bundle.train.subset(np.sort(pool[:n_train])),
            val=self.bundle.train.subset(np.sort(order[:n_val])),
            classes=self.bundle.classes,
            flip=self.bundle.flip,
            val_from="split",
        )

    # ------------------------------------------------------------------ latency
    def predict_ms(self, arch: dict[str, Any]) -> float:
        from presso.bench import api as bench

        model = self.space.build(arch)
        pred = bench.predict_latency(
            model, self.cfg.device, input_shape=self.space.input_shape(arch), threads=self.cfg.threads, db=self.db
        )
        return float(pred.latency_ms) * self.correction

    def measure_ms(self, arch: dict[str, Any], model=None) -> float:
        from presso.bench import api as bench

        model = model if model is not None else self.space.build(arch)
        result = bench.benchmark(
            model,
            self.cfg.device,
            input_shape=self.space.input_shape(arch),
            threads=self.cfg.threads,
            repeat=50,
            max_seconds=10,
            db=self.db,
        )
        return float(result.latency_ms["median"])

    def ensure_profiled(self) -> None:
        import presso.bench as bench

        probe = self.space.zoo()["tiny"] if "tiny" in self.space.zoo() else next(iter(self.space.zoo().values()))
        try:
            bench.predict_latency(
                self.space.build(probe), self.cfg.device, input_shape=self.space.input_shape(probe),
                threads=self.cfg.threads, db=self.db,
            )  # fmt: skip
        except ConfigError as e:
            if "presso db profile" not in str(e):
                raise
            # the profile's own stage: kernel models done of the set, so the bar shows the time remaining
            bench.profile_device(self.cfg.device, threads=self.cfg.threads, db=self.db, progress=self.progress)

    def warm_start(self) -> list[dict[str, Any]]:
        """Measure the space's known-good architectures on the device: they set the predictor's correction (the
        median ratio measured / predicted) and seed the study. The first worker does it; the rest read it."""
        self.correction = 1.0
        if not self.created:  # the creating worker measures; wait for it (or measure here if it died meanwhile)
            deadline = time.time() + 600
            while "warm_start" not in self.study.user_attrs and time.time() < deadline:
                self.report("waiting for the worker that created the study", {})
                time.sleep(1.0)
        stored = self.study.user_attrs.get("warm_start")
        if stored is not None:
            self.correction = float(self.study.user_attrs.get("latency_correction", 1.0))
            return stored
        rows, ratios = [], []
        for name, arch in self.space.zoo().items():
            self.report("measuring warm-start architectures", {"name": name})
            predicted = self.predict_ms(arch)
            measured = self.measure_ms(arch)
            rows.append({"name": name, "arch_key": arch_key(arch), "predicted_ms": round(predicted, 4),
                         "measured_ms": round(measured, 4)})  # fmt: skip
            if predicted > 0:  # the unrounded values: a prediction of a few microseconds rounds to a coarse 4th decimal
                ratios.append(measured / predicted)
        self.correction = float(statistics.median(ratios)) if ratios else 1.0
        self.study.set_user_attr("latency_correction", self.correction)
        self.study.set_user_attr("warm_start", rows)
        if self.cfg.warm_start and self.created:
            for name, arch in self.space.zoo().items():
                self.study.enqueue_trial(arch, user_attrs={"zoo": name}, skip_if_exists=True)
        return rows

    def smallest_ms(self) -> float:
        """The lowest latency the space can reach here: its smallest member, predicted."""
        import optuna

        return self.predict_ms(self.space.sample(optuna.trial.FixedTrial(self.space.smallest())))

    def smallest_params(self) -> int:
        """The parameters of the space's smallest member."""
        import optuna

        model = self.space.build(self.space.sample(optuna.trial.FixedTrial(self.space.smallest())))
        return int(sum(p.numel() for p in model.parameters()))

    # ------------------------------------------------------------------ trials
    def objective(self, trial) -> tuple[float, float]:
        import optuna

        from presso.train import TrainConfig, train

        arch = self.space.sample(trial)
        key = arch_key(arch)
        trial.set_user_attr("arch_key", key)
        trial.set_user_attr("worker", self.worker)
        model = self.space.build(arch)
        params = int(sum(p.numel() for p in model.parameters()))
        trial.set_user_attr("params_count", params)
        predicted = self.predict_ms(arch)
        trial.set_user_attr("predicted_ms", round(predicted, 4))
        # each budget is a constraint (feasible at <= 0), so the sampler learns where infeasible designs lie
        over = [predicted - self.cfg.latency_ms]
        trial.set_constraint("latency", over[0])
        if self.cfg.max_params is not None:
            over.append((params - self.cfg.max_params) / self.cfg.max_params)
            trial.set_constraint("params", over[1])
        trial.set_user_attr("constraint", max(over))
        why = None
        if predicted > self.cfg.latency_ms:
            why = f"predicted {predicted:.3f} ms > budget {self.cfg.latency_ms} ms"
            trial.set_user_attr("skipped", "predicted over budget")
        elif self.cfg.max_params is not None and params > self.cfg.max_params:
            why = f"{params} parameters > budget {self.cfg.max_params}"
            trial.set_user_attr("skipped", "over the parameter budget")
        if why:
            self.report("trial", {"number": trial.number, "skipped": True, "predicted_ms": predicted, "why": why})
            raise optuna.TrialPruned(why)
        # the same architecture trained before (sampled again, or by another worker): reuse its score
        for other in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.user_attrs.get("arch_key") == key and other.values:
                trial.set_user_attr("duplicate_of", other.number)
                return other.values[0], predicted
        t0 = time.perf_counter()
        cfg = TrainConfig(
            epochs=self.cfg.proxy_epochs,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            image_size=self.space.resolution(arch),
            workers=0,
        )
        result = train(model, self.proxy, cfg)
        top1 = float(result.best.get("val_top1") or 0.0)
        trial.set_user_attr("trained", True)
        trial.set_user_attr("proxy_seconds", round(time.perf_counter() - t0, 1))
        self.report("trial", {"number": trial.number, "top1": top1, "predicted_ms": predicted})
        return top1, predicted

    def run(self) -> None:
        from optuna.storages import fail_stale_trials
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        fail_stale_trials(self.study)  # a killed worker's trial: failed, and queued again with the same parameters
        remaining = self.cfg.trials - len(finished(self.study))
        if remaining <= 0:
            return
        self.report("searching", {"done": len(finished(self.study)), "total": self.cfg.trials})
        stop = MaxTrialsCallback(self.cfg.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))

        def progress(study, trial):
            self.report("searching", {"done": len(finished(study)), "total": self.cfg.trials})

        # errors a candidate can raise on purpose (e.g. too small for the resolution) fail that trial only
        from presso.errors import PressoError

        self.study.optimize(
            self.objective,
            n_trials=None,
            timeout=self.cfg.time_budget_min * 60 if self.cfg.time_budget_min else None,
            callbacks=[stop, progress],
            catch=(PressoError,),
            gc_after_trial=True,
        )

    # ------------------------------------------------------------------ the winner
    def finalize(self) -> dict[str, Any] | None:
        from presso.models.sources import load_model
        from presso.train import TrainConfig, train

        done = [t for t in finished(self.study) if t.values and t.user_attrs.get("trained", False)]
        done += [t for t in finished(self.study) if t.values and "duplicate_of" in t.user_attrs]
        if not done:
            params = f" and {self.cfg.max_params} parameters" if self.cfg.max_params is not None else ""
            raise BudgetError(
                f"No candidate fits {self.cfg.latency_ms} ms on '{self.cfg.device}'{params} (all "
                f"{len(finished(self.study))} finished trials were over it); the smallest architecture of the space "
                f"predicts {self.smallest_ms():.3f} ms -- raise --latency-ms above that, or run more trials."
            )
        ranked = sorted({t.user_attrs["arch_key"]: t for t in done}.values(), key=lambda t: -t.values[0])
        measured = dict(self.study.user_attrs.get("measured_ms", {}))
        chosen = None
        for t in ranked[: max(self.cfg.measure_top, 1)]:
            key = t.user_attrs["arch_key"]
            if key not in measured:
                self.report("measuring the best candidates on the device", {"number": t.number})
                measured[key] = round(self.measure_ms(dict(t.params)), 4)
            if chosen is None and measured[key] <= self.cfg.latency_ms:
                chosen = t
        self.study.set_user_attr("measured_ms", measured)
        if chosen is None:
            fastest = min(measured.values())
            raise BudgetError(
                f"The best candidates measure over {self.cfg.latency_ms} ms on '{self.cfg.device}' (fastest "
                f"{fastest:.3f} ms) although predicted under it; raise --latency-ms, or run more trials."
            )
        arch = dict(chosen.params)
        model = self.space.build(arch)
        self.report("training the best candidate fully", {"number": chosen.number, "epochs": self.cfg.final_epochs})
        cfg = TrainConfig(
            epochs=self.cfg.final_epochs,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            image_size=self.space.resolution(arch),
        )
        final_dir = self.output / "model"
        kept = self._kept_winner(final_dir, model, cfg)
        if kept is not None:  # a rerun that picks the winner already trained here: kept, not trained again
            self.report("keeping the winner trained by an earlier run", {"number": chosen.number})
            val_top1 = kept
        else:
            if not self.overwrite and os.path.lexists(final_dir) and not outdir.is_empty_dir(final_dir):
                raise OutputError(
                    f"'{self.shown / 'model'}' holds a model that is not this search's winner now (trial "
                    f"{chosen.number}); {outdir.WAYS_OUT} (the study is kept: the rerun only trains the winner)."
                )
            from presso.train.checkpoint import has_checkpoint

            result = train(model, self.bundle, cfg, output_dir=final_dir, overwrite=self.overwrite,
                           resume=has_checkpoint(final_dir), progress=self.train_progress)  # fmt: skip
            val_top1 = result.best.get("val_top1")
        final_model = load_model(str(final_dir))
        latency = self.measure_ms(arch, final_model)
        return {
            "trial": chosen.number,
            "arch": arch,
            "arch_key": chosen.user_attrs["arch_key"],
            "input_shape": self.space.input_shape(arch),
            "params": chosen.user_attrs.get("params_count"),
            "proxy_top1": round(chosen.values[0], 4),
            "predicted_ms": chosen.user_attrs.get("predicted_ms"),
            "measured_ms": latency,
            "val_top1": val_top1,
            "epochs": self.cfg.final_epochs,
            "model_dir": str(self.shown / "model"),
            "zoo": chosen.user_attrs.get("zoo"),
        }

    @staticmethod
    def _kept_winner(final_dir: Path, model, cfg) -> float | None:
        """The held-out top-1 of the model in `final_dir` when it is `model`'s architecture trained as `cfg` says
        (by an earlier run of this search), else None."""
        try:
            card = json.loads((final_dir / "presso.json").read_text())
            if not (final_dir / "weights.safetensors").is_file():
                return None
            last = card["history"][-1]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

        def as_json(value):  # the card's JSON form (tuples are lists there)
            return json.loads(json.dumps(value, default=str))

        trained = last.get("config") or {}
        same = (card.get("recipe") == [] and card.get("source") == as_json(model.presso_card.source)
                and last.get("verb") == "train"
                and all(trained.get(k) == as_json(getattr(cfg, k)) for k in ("epochs", "batch_size", "seed",
                                                                               "image_size")))  # fmt: skip
        return (last.get("best") or {}).get("val_top1") if same else None

    train_progress: Callable | None = None


def _as_events(progress: ProgressCallback | None) -> Callable[[str, dict], None] | None:
    """The search's own ``(stage, info)`` reports as ``ProgressEvent``s: finished trials as stage ``trials``, each
    candidate's outcome as stage ``trial``, and every other step as a stage of its own (done: how often it ran)."""
    if progress is None:
        return None
    runs: dict[str, int] = {}

    def report(stage: str, info: dict) -> None:
        if stage == "searching":
            progress(ProgressEvent("trials", info["done"], info["total"]))
        elif stage == "trial":
            progress(ProgressEvent("trial", 1, 1, info))
        else:
            runs[stage] = runs.get(stage, 0) + 1
            progress(ProgressEvent(stage, runs[stage] - 1, None, info))

    return report


def search(
    data,
    config: SearchConfig | None = None,
    *,
    output_dir: str | Path,
    storage: str | None = None,
    study: str | None = None,
    db: str | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    **kwargs,
) -> SearchResult:
    """Search ``config.space`` for the most accurate model on ``data`` within ``config.latency_ms`` on the device.

    ``output_dir``: the study (SQLite), ``search.json``, ``trials.csv``, ``pareto.png`` and the winner, ``model/``.
    ``storage``: an SQLAlchemy URL (``postgresql://user@host/db``) shared by workers, or an SQLite path; default
    ``OUTPUT_DIR/study.db``. ``study``: the study's name (default from data, device and budget). ``db``: the latency
    database. ``progress`` gets stage ``trials`` events (finished trials of the total), one ``trial`` event per
    candidate (info: its number, proxy top-1 or that it was skipped, predicted latency), the winner's training
    (``train``, ``epoch``), the device's kernel profile when the latency database has none (``profile``: kernel
    models done of the set) and a stage per other step. ``overwrite``: write into a folder that holds other files
    (the search then runs in a temporary sibling, renamed into place at the end), and replace a winner in
    ``OUTPUT_DIR/model`` that is not this search's winner; without it, both are refused (``OutputError``). A folder
    holding only a search's own files is resumed. Keyword arguments fill a ``SearchConfig`` when ``config`` is not
    given.
    """
    cfg = config or SearchConfig(**kwargs)
    t0 = time.perf_counter()
    output = Path(output_dir)
    own = set(OWN)
    inside = _storage_inside(storage, output)
    if inside:  # the study kept in the output folder under a name of the user's
        own |= {inside, f"{inside}-journal", f"{inside}-wal", f"{inside}-shm"}
    with outdir.writing(output, overwrite=overwrite, resumable=outdir.holding_only(own)) as where:
        return _search_into(where, output, data, cfg, storage, study, db, progress, overwrite, t0)


def _storage_inside(storage: str | None, output: Path) -> str | None:
    """The name of an SQLite study file given as a path inside the output folder, else None."""
    if storage and "://" not in storage and Path(storage).resolve().parent == output.resolve():
        return Path(storage).name
    return None


def _search_into(where: Path, output: Path, data, cfg: SearchConfig, storage, study, db, progress, overwrite: bool,
                 t0: float) -> SearchResult:  # fmt: skip
    """The search, written into `where`: the output folder, or its temporary sibling (``overwrite``)."""
    shown_storage = storage
    inside = _storage_inside(storage, output)
    if inside:
        storage = str(where / inside)  # moves with the folder
    run = _Search(data, cfg, where, storage, study, db, _as_events(progress), shown=output, overwrite=overwrite)
    run.train_progress = progress
    run.progress = progress
    run.ensure_profiled()
    warm = run.warm_start()
    smallest = run.smallest_ms()
    if smallest > cfg.latency_ms:
        raise BudgetError(
            f"No architecture of the '{cfg.space}' space can meet {cfg.latency_ms} ms on '{cfg.device}': the smallest "
            f"one predicts {smallest:.3f} ms. Raise --latency-ms above that (or use a faster device)."
        )
    if cfg.max_params is not None:
        fewest = run.smallest_params()
        if fewest > cfg.max_params:
            raise BudgetError(
                f"No architecture of the '{cfg.space}' space fits {cfg.max_params} parameters: the smallest one has "
                f"{fewest}. Raise --max-params above that."
            )
    run.run()
    best = run.finalize() if cfg.final else None
    result = SearchResult(
        output_dir=output,
        study=run.name,
        storage=safe_url(storage_url(shown_storage, output)),  # where the study is once the output is in place
        best=best,
        pareto=pareto_rows(run.study),
        counts=counts(run.study),
        seconds=time.perf_counter() - t0,
        config=cfg,
        warm_start=warm,
    )
    write_report(where, run.study, best, cfg.latency_ms)
    (where / "search.json").write_text(json.dumps(result.summary(), indent=2, default=str))
    return result
