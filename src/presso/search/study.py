"""The search's Optuna study: where it is stored, how workers open and join it, and what its trials say
(the rows of ``trials.csv``, the Pareto front, the counts, the Pareto plot)."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

from presso.bench.latency_db import safe_url
from presso.errors import ConfigError
from presso.search.config import SearchConfig


# --------------------------------------------------------------------------- storage
def storage_url(storage: str | None, output: Path) -> str:
    if not storage:
        return f"sqlite:///{(output / 'study.db').resolve()}"
    if storage.startswith("postgresql://") or storage.startswith("postgres://"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; Presso ships psycopg 3
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    if "://" not in storage:  # a path: an SQLite file
        return f"sqlite:///{Path(storage).resolve()}"
    return storage


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
                raise ConfigError(f"Cannot open the search storage {safe_url(url)}: {message}") from None
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
            f"Study '{name}' in {safe_url(url)} was started with other settings ({diff}, as (study, yours)); use the "
            "same settings to join it, or another --study name."
        )
    return study, created


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


# --------------------------------------------------------------------------- what the trials say
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
        "skipped_by_predictor": sum(r["skipped"] == "predicted over budget" for r in rows),
        "skipped_over_params": sum(r["skipped"] == "over the parameter budget" for r in rows),
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
    skipped = [r for r in rows if r["skipped"] == "predicted over budget" and r["predicted_ms"]]
    ax.scatter([r["predicted_ms"] for r in trained], [r["proxy_top1"] for r in trained], c="#9aa5b1",
               label=f"trained by proxy ({len(trained)})")  # fmt: skip
    if skipped:  # never trained, so no accuracy: a strip along the bottom (x in ms, y in axes units)
        ax.scatter([r["predicted_ms"] for r in skipped], [0.03] * len(skipped), marker="|", s=120, c="#d9822b",
                   transform=ax.get_xaxis_transform(), clip_on=False,
                   label=f"skipped, not trained: predicted over budget ({len(skipped)})")  # fmt: skip
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
