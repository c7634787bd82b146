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
"""

from __future__ import annotations

import csv
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

from presso.errors import BudgetError, ConfigError, DataError
from presso.progress import ProgressCallback, ProgressEvent
from presso.results import Result
from presso.search.space import SearchSpace, arch_key, get_space

SEARCH_VERSION = 1


@dataclass
class SearchConfig:
    """latency_ms: the budget on ``device`` (ONNX Runtime, FP32, batch 1, ``threads``).

    trials: finished trials (trained + skipped) the study should hold; time_budget_min stops a worker earlier.
    proxy_epochs / proxy_fraction: proxy training per candidate (epochs, share of the training split);
        proxy_val: held-out images that score it. final_epochs: the winner's full training.
    measure_top: feasible candidates measured on the device at the end (best proxy top-1 first).
    """

    latency_ms: float
    device: str = "local"
    trials: int = 30
    time_budget_min: float | None = None
    space: str = "mobilenet"
    proxy_epochs: int = 2
    proxy_fraction: float = 0.25
    proxy_val: int = 2000
    final_epochs: int = 15
    measure_top: int = 3
    batch_size: int = 128
    threads: int | None = None
    seed: int = 0
    warm_start: bool = True
    final: bool = True
    heartbeat_s: int = 10  # a worker silent for 4 heartbeats is dead: its trial is failed and retried
    version: int = SEARCH_VERSION

    def __post_init__(self) -> None:
        if not self.latency_ms > 0:
            raise ConfigError(f"The latency budget must be positive, not {self.latency_ms} ms.")
        if self.trials < 1 or self.proxy_epochs < 1 or self.final_epochs < 1:
            raise ConfigError("trials, proxy_epochs and final_epochs must be at least 1.")
        if not 0 < self.proxy_fraction <= 1:
            raise ConfigError(f"proxy_fraction is a share in (0, 1], not {self.proxy_fraction}.")

    def study_settings(self) -> dict[str, Any]:
        """What makes two searches the same study (a worker with other settings must not join it)."""
        keys = ("latency_ms", "device", "space", "proxy_epochs", "proxy_fraction", "proxy_val", "batch_size", "seed")
        return {k: getattr(self, k) for k in keys}


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


# --------------------------------------------------------------------------- storage
def _storage_url(storage: str | None, output: Path) -> str:
    if not storage:
        return f"sqlite:///{(output / 'study.db').resolve()}"
    if storage.startswith("postgresql://") or storage.startswith("postgres://"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; Presso ships psycopg 3
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    if "://" not in storage:  # a path: an SQLite file
        return f"sqlite:///{Path(storage).resolve()}"
    return storage


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_study(url: str, name: str, cfg: SearchConfig):
    """The study ``name`` in ``url`` and whether this call created it."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats are marked experimental in Optuna; they are what makes killed workers' trials retryable
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Workers starting together race to create Optuna's tables in an empty database (PostgreSQL reports a duplicate
    # type or key to the loser); the tables exist once one has won, so the loser simply opens the storage again.
    for attempt in range(6):
        try:
            storage = RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat_s,
                grace_period=4 * cfg.heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            )
            break
        except Exception as e:
            if attempt == 5:
                message = str(e).splitlines()[0][:300]
                raise ConfigError(f"Cannot open the search storage {_safe(url)}: {message}") from None
            time.sleep(0.5 + attempt)
    # the latency budget is a constraint (trial.set_constraint): the sampler learns where infeasible designs lie
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, constant_liar=True, n_startup_trials=8)
    try:  # creating the study is atomic in the database: exactly one worker creates it and seeds it
        study = optuna.create_study(
            storage=storage, study_name=name, directions=["maximize", "minimize"], sampler=sampler
        )
        study.set_user_attr("settings", cfg.study_settings())
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        # a joining worker samples with its own seed: the same seed in two workers would propose the same designs
        joiner = optuna.samplers.TPESampler(seed=cfg.seed + 1 + os.getpid() % 100_000, multivariate=True,
                                            constant_liar=True, n_startup_trials=8)  # fmt: skip
        study = optuna.load_study(storage=storage, study_name=name, sampler=joiner)
        created = False
    settings = study.user_attrs.get("settings")
    if settings is not None and settings != cfg.study_settings():
        diff = {k: (settings.get(k), v) for k, v in cfg.study_settings().items() if settings.get(k) != v}
        raise ConfigError(
            f"Study '{name}' in {_safe(url)} was started with other settings ({diff}, as (study, yours)); use the "
            "same settings to join it, or another --study name."
        )
    return study, created


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


# --------------------------------------------------------------------------- the search
class _Search:
    def __init__(self, data, cfg: SearchConfig, output: Path, storage, study_name, db, progress):
        from presso.data import DataBundle, load_data

        self.cfg, self.output, self.db = cfg, output, db
        self.report = progress or (lambda _stage, _info: None)
        self.bundle = data if isinstance(data, DataBundle) else load_data(data, seed=cfg.seed)
        if not self.bundle.labeled:
            raise DataError(f"'{self.bundle.name}' has no labels: the search ranks candidates by accuracy.")
        size, channels = self.bundle.train.native()
        if size is None:
            raise DataError(f"Images in '{self.bundle.name}' have different sizes; resize them to one size first.")
        self.space: SearchSpace = get_space(cfg.space, size, channels, self.bundle.num_classes)
        self.proxy = self._proxy_bundle()
        self.url = _storage_url(storage, output)
        self.name = study_name or f"presso-{self.bundle.name.replace('/', '_')}-{cfg.device}-{cfg.latency_ms:g}ms"
        output.mkdir(parents=True, exist_ok=True)
        self.study, self.created = open_study(self.url, self.name, cfg)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _proxy_bundle(self):
        from presso.data import DataBundle

        rng = np.random.default_rng(self.cfg.seed)
        n_train = max(self.bundle.num_classes * 8, int(len(self.bundle.train) * self.cfg.proxy_fraction))
        train_idx = np.sort(rng.permutation(len(self.bundle.train))[: min(n_train, len(self.bundle.train))])
        val_idx = np.sort(rng.permutation(len(self.bundle.val))[: min(self.cfg.proxy_val, len(self.bundle.val))])
        return DataBundle(
            name=self.bundle.name,
            train=self.bundle.train.subset(train_idx),
            val=self.bundle.val.subset(val_idx),
            classes=self.bundle.classes,
            flip=self.bundle.flip,
            val_from=self.bundle.val_from,
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
            self.report("profiling the device's kernels (once per device; a few minutes)", {})
            bench.profile_device(self.cfg.device, threads=self.cfg.threads, db=self.db)

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

    # ------------------------------------------------------------------ trials
    def objective(self, trial) -> tuple[float, float]:
        import optuna

        from presso.train import TrainConfig, train

        arch = self.space.sample(trial)
        key = arch_key(arch)
        trial.set_user_attr("arch_key", key)
        trial.set_user_attr("worker", self.worker)
        model = self.space.build(arch)
        trial.set_user_attr("params_count", int(sum(p.numel() for p in model.parameters())))
        predicted = self.predict_ms(arch)
        trial.set_user_attr("predicted_ms", round(predicted, 4))
        trial.set_user_attr("constraint", predicted - self.cfg.latency_ms)
        trial.set_constraint("latency", predicted - self.cfg.latency_ms)
        if predicted > self.cfg.latency_ms:
            trial.set_user_attr("skipped", "predicted over budget")
            self.report("trial", {"number": trial.number, "skipped": True, "predicted_ms": predicted})
            raise optuna.TrialPruned(f"predicted {predicted:.3f} ms > budget {self.cfg.latency_ms} ms")
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
            raise BudgetError(
                f"No candidate fits {self.cfg.latency_ms} ms on '{self.cfg.device}' (all {len(finished(self.study))} "
                f"finished trials were predicted over it); the smallest architecture of the space predicts "
                f"{self.smallest_ms():.3f} ms -- raise --latency-ms above that."
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
        result = train(model, self.bundle, cfg, output_dir=final_dir, progress=self.train_progress)
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
            "val_top1": result.best.get("val_top1"),
            "epochs": self.cfg.final_epochs,
            "model_dir": str(final_dir),
            "zoo": chosen.user_attrs.get("zoo"),
        }

    train_progress: Callable | None = None


def trial_rows(study) -> list[dict[str, Any]]:
    measured = study.user_attrs.get("measured_ms", {})
    rows = []
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("arch_key")
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "arch_key": key,
                "zoo": t.user_attrs.get("zoo"),
                "params": t.user_attrs.get("params_count"),
                "predicted_ms": t.user_attrs.get("predicted_ms"),
                "measured_ms": measured.get(key),
                "proxy_top1": round(t.values[0], 4) if t.values else None,
                "trained": bool(t.user_attrs.get("trained")),
                "duplicate_of": t.user_attrs.get("duplicate_of"),
                "skipped": t.user_attrs.get("skipped"),
                "worker": t.user_attrs.get("worker"),
                "seconds": t.user_attrs.get("proxy_seconds"),
            }
        )
    return rows


def pareto_rows(study) -> list[dict[str, Any]]:
    keys = {t.number for t in study.best_trials if t.user_attrs.get("constraint", 0.0) <= 0}
    return sorted((r for r in trial_rows(study) if r["number"] in keys), key=lambda r: r["predicted_ms"] or 0.0)


def counts(study) -> dict[str, int]:
    rows = trial_rows(study)
    return {
        "finished": sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows),
        "trained": sum(r["trained"] for r in rows),
        "skipped_by_predictor": sum(r["state"] == "PRUNED" for r in rows),
        "duplicates": sum(r["duplicate_of"] is not None for r in rows),
        "failed": sum(r["state"] == "FAIL" for r in rows),
    }


def write_report(output: Path, study, best: dict | None, budget: float) -> None:
    rows = trial_rows(study)
    with (output / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)
    plot_pareto(output / "pareto.png", rows, pareto_rows(study), best, budget)


def plot_pareto(path: Path, rows, pareto, best, budget: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    trained = [r for r in rows if r["proxy_top1"] is not None]
    skipped = [r for r in rows if r["state"] == "PRUNED" and r["predicted_ms"]]
    ax.scatter([r["predicted_ms"] for r in trained], [r["proxy_top1"] for r in trained], c="#9aa5b1",
               label=f"trained by proxy ({len(trained)})")  # fmt: skip
    if skipped:
        low = min([r["proxy_top1"] for r in trained] or [0.0])
        ax.scatter([r["predicted_ms"] for r in skipped], [low] * len(skipped), marker="x", c="#d9822b",
                   label=f"skipped: predicted over budget ({len(skipped)})")  # fmt: skip
    if pareto:
        pts = sorted((r["predicted_ms"], r["proxy_top1"]) for r in pareto)
        ax.plot(*zip(*pts, strict=True), "-o", c="#c23030", label="Pareto front")
    if best:
        ax.scatter([best["measured_ms"]], [best["val_top1"]], marker="*", s=220, c="#0f9960", zorder=5,
                   label="chosen, fully trained (measured)")  # fmt: skip
    ax.axvline(budget, ls="--", c="k", lw=1, label=f"budget {budget:g} ms")
    ax.set_xlabel("latency (ms): predicted, or measured for the chosen model")
    ax.set_ylabel("held-out top-1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
    **kwargs,
) -> SearchResult:
    """Search ``config.space`` for the most accurate model on ``data`` within ``config.latency_ms`` on the device.

    ``output_dir``: the study (SQLite), ``search.json``, ``trials.csv``, ``pareto.png`` and the winner, ``model/``.
    ``storage``: an SQLAlchemy URL (``postgresql://user@host/db``) shared by workers, or an SQLite path; default
    ``OUTPUT_DIR/study.db``. ``study``: the study's name (default from data, device and budget). ``db``: the latency
    database. ``progress`` gets stage ``trials`` events (finished trials of the total), one ``trial`` event per
    candidate (info: its number, proxy top-1 or that it was skipped, predicted latency), the winner's training
    (``train``, ``epoch``) and a stage per other step. Keyword arguments fill a ``SearchConfig`` when ``config`` is
    not given.
    """
    cfg = config or SearchConfig(**kwargs)
    t0 = time.perf_counter()
    output = Path(output_dir)
    run = _Search(data, cfg, output, storage, study, db, _as_events(progress))
    run.train_progress = progress
    run.ensure_profiled()
    warm = run.warm_start()
    smallest = run.smallest_ms()
    if smallest > cfg.latency_ms:
        raise BudgetError(
            f"No architecture of the '{cfg.space}' space can meet {cfg.latency_ms} ms on '{cfg.device}': the smallest "
            f"one predicts {smallest:.3f} ms. Raise --latency-ms above that (or use a faster device)."
        )
    run.run()
    best = run.finalize() if cfg.final else None
    result = SearchResult(
        output_dir=output,
        study=run.name,
        storage=_safe(run.url),
        best=best,
        pareto=pareto_rows(run.study),
        counts=counts(run.study),
        seconds=time.perf_counter() - t0,
        config=cfg,
        warm_start=warm,
    )
    write_report(output, run.study, best, cfg.latency_ms)
    (output / "search.json").write_text(json.dumps(result.summary(), indent=2, default=str))
    return result
