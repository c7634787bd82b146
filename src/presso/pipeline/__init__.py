"""``presso run``: from data (and an optional model) and a budget to a measured, packaged model, with a report.

Stages, each kept in ``OUT/<stage>/`` with a ``stage.json`` (its settings key, figures and time):

- ``original``: with ``--model``, the model as given (evaluated) -- or trained on the data when it is not trained
  for it; without, ``search`` designs one for the budget (``presso.search``).
- ``baseline``: the original converted (FP32 and the deployment precision: "baseline INT8" is the original merely
  quantized) and measured on the device. Quantization is the cheapest compression, so the latency budget is checked
  on the deployed precision first.
- ``compress``: to the budget -- a latency target on the device (the FP32 budget scaled by the measured INT8/FP32
  speed ratio) or a MACs target; skipped, and said so, when the model already fits.
- ``recover``: distillation from the original (labels used when the data has them).
- ``deploy``: the compressed model converted (FP32 and the deployment precision, calibrated on the data); then every
  candidate -- the original and the compressed model, each at both precisions -- measured side by side on the device
  in one interleaved run, and the best one delivered by the rule of ``presso.pipeline.candidates``: the fastest
  that keeps the accuracy within the bound and meets the budget (a MACs budget stands for speed: the original
  merely quantized is delivered when compression does not beat it); when none does both, the closest, and the run
  reports a miss. The delivered model is profiled and packaged into ``deploy/bundle.zip``, whose predictions are
  checked.

A rerun skips every stage whose settings and inputs are unchanged; a killed run resumes (training stages from their
checkpoints); a stage's output appears in one rename, so nothing finished is lost. ``OUT`` is this verb's resumable
state; a folder holding anything else is refused unless ``overwrite`` (then the run goes to a sibling, renamed into
place at the end: ``presso.outdir``). ``summary.json`` holds the figures (``presso.pipeline.summary``),
``report.html`` shows them.
"""

from presso.pipeline.config import PIPELINE_VERSION, STAGES, RunConfig, RunResult
from presso.pipeline.flow import run
from presso.pipeline.stages import Job as _Job  # noqa: F401  (tests stub its stages by this name)
from presso.pipeline.summary import write_summary

__all__ = ["PIPELINE_VERSION", "STAGES", "RunConfig", "RunResult", "run", "write_summary"]
