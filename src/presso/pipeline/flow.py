"""``run``: the stages in order, into ``OUT``, with the summary and the report at the end."""

from __future__ import annotations

import time
from pathlib import Path

import presso.outdir as outdir
from presso.errors import BudgetError
from presso.pipeline.config import STAGES, RunConfig, RunResult
from presso.pipeline.deploy import deploy
from presso.pipeline.stages import Job
from presso.pipeline.summary import write_summary
from presso.progress import ProgressCallback


def run(
    data,
    config: RunConfig | None = None,
    *,
    output_dir: str | Path,
    progress: ProgressCallback | None = None,
    trust: bool = False,
    overwrite: bool = False,
    **kwargs,
) -> RunResult:
    """The whole job into ``output_dir``; see ``presso.pipeline``. ``kwargs`` fill a ``RunConfig`` when ``config``
    is not given.

    ``data``: a data spec or a ``DataBundle`` (stages are keyed by its name). ``progress`` gets stage ``pipeline``
    events (done: stages finished before this one, of 5; info: its name and whether it was reused) and every nested
    verb's events (training, search, compression, conversion, measurement). ``trust``: allow running the code a
    model is built from (a ``file.py:factory`` model; docs/security.md).

    The result's ``ok`` says whether the delivered model meets the budget and the accuracy bound (or the miss was
    allowed); a miss is not an exception, so the figures and the delivered bundle are there to look at.
    """
    from presso.report import write_report

    cfg = config or RunConfig(**kwargs)
    out, t0 = Path(output_dir), time.perf_counter()
    own = outdir.holding_only({*STAGES, ".work", "summary.json", "report.html"})  # a run's folder: resumed as it is
    with outdir.writing(out, overwrite=overwrite, sources=outdir.cli_sources(cfg.model), resumable=own) as where:
        job = Job(data, cfg, where, progress, trust=trust)
        original = job.original()
        baseline = job.baseline(original)
        try:
            compressed = job.compress(baseline)
        except BudgetError as e:
            write_summary(job, cfg, where, t0, error=str(e))
            kept = f"kept in {out}" if where == out else "dropped (the old output is untouched)"
            raise BudgetError(
                f"{e} The finished stages are {kept} (original: {original.get(job.headline)} {job.headline}, "
                f"{baseline[cfg.precision]['latency_ms']:.3f} ms {cfg.precision.upper()})."
            ) from None
        recovered = job.recover(compressed)
        deploy(job, recovered)
        summary = write_summary(job, cfg, where, t0)
        write_report(where / "report.html", summary)
    job.stages.report(len(STAGES), len(STAGES))
    return RunResult(output_dir=out, figures=summary)
