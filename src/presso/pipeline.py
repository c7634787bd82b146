"""``presso run``: from data (and an optional model) and a budget to a measured, packaged model, with a report.

Stages, each kept in ``OUT/<stage>/`` with a ``stage.json`` (its settings key, figures and time):

- ``original``: with ``--model``, the model as given (evaluated) -- or trained on the data when it is not trained
  for it; without, ``search`` designs one for the budget (``presso.search``).
- ``baseline``: the original exported (FP32 and the deployment precision) and measured on the device. Quantization is
  the cheapest compression, so the latency budget is checked on the deployed precision first.
- ``compress``: to the budget -- a latency target on the device (the FP32 budget scaled by the measured INT8/FP32
  speed ratio) or a MACs target; skipped, and said so, when the model already fits.
- ``recover``: distillation from the original (labels used when the data has them).
- ``deploy``: the final model converted (FP32 and the deployment precision, calibrated on the data), measured on the
  device with the slowest operators, and packaged into ``bundle.zip``; the bundle's predictions are checked.

A rerun skips every stage whose settings and inputs are unchanged; a killed run resumes (training stages from their
checkpoints); a stage's output appears in one rename, so nothing finished is lost. ``OUT`` is this verb's resumable
state; a folder holding anything else is refused unless ``overwrite`` (then the run goes to a sibling, renamed into
place at the end: ``presso.outdir``). ``summary.json`` holds the figures, ``report.html`` shows them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import presso.outdir as outdir
from presso.errors import BudgetError, ConfigError, check_fields
from presso.progress import ProgressCallback, reporter
from presso.results import Result

PIPELINE_VERSION = 1
STAGES = ("original", "baseline", "compress", "recover", "deploy")


@dataclass
class RunConfig:
    """The job: a budget (``latency_ms`` on ``device``, or ``target_macs``) and how hard to work for it."""

    device: str = "local"
    latency_ms: float | None = None
    target_macs: float | None = None
    model: str | None = None
    precision: str = "int8"
    train_epochs: int = 10
    recover_epochs: int = 5
    search_trials: int = 16
    search_proxy_epochs: int = 2
    max_accuracy_drop: float = 0.02
    threads: int | None = None
    seed: int = 0
    db: str | None = None
    version: int = PIPELINE_VERSION

    def __post_init__(self) -> None:
        if (self.latency_ms is None) == (self.target_macs is None):
            raise ConfigError("Give one budget: --latency-ms X (on --device) or --target-macs R.")
        if self.model is None and self.latency_ms is None:
            raise ConfigError("Without --model, Presso searches a model for a latency budget: give --latency-ms.")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"Precision '{self.precision}': use fp32, fp16 or int8.")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ConfigError(f"--target-macs is a share in (0, 1], not {self.target_macs}.")
        check_fields(self, latency_ms=(0, None, "(]"), target_macs=(0, 1, "(]"), train_epochs=(1, None),
                     recover_epochs=(1, None), search_trials=(1, None), search_proxy_epochs=(1, None),
                     max_accuracy_drop=(0, 1), threads=(1, None), seed=(0, 2**63 - 1))  # fmt: skip


@dataclass
class RunResult(Result):
    """``figures``: what ``OUT/summary.json`` holds (every stage's record, the budget and whether it was met, the
    accuracy before and after, the bundle, the commands to reproduce it); ``output_dir``: ``OUT``."""

    output_dir: Path
    figures: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {**self.figures, "output_dir": str(self.output_dir)}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Runs stages into ``OUT/<name>``, skipping those whose key is unchanged; keeps work of killed runs."""

    def __init__(self, out: Path, progress: ProgressCallback | None):
        self.out = out
        self.report = reporter(progress, "pipeline")  # done: stages finished (or reused) before this one
        self.records: dict[str, dict[str, Any]] = {}

    def run(self, name: str, key: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        final = self.out / name
        outdir.clean_stale(final)  # a stage killed between its two renames gets its previous output back
        manifest = final / "stage.json"
        if manifest.is_file():
            record = json.loads(manifest.read_text())
            if record.get("key") == key:
                record["cached"] = True
                self.report(len(self.records), len(STAGES), name=name, cached=True)
                self.records[name] = record
                return record
        work = self.out / ".work" / name
        if work.exists() and (work / ".key").is_file() and (work / ".key").read_text() != key:
            shutil.rmtree(work)  # settings changed since the killed run: its partial work does not apply
        work.mkdir(parents=True, exist_ok=True)
        (work / ".key").write_text(key)
        self.report(len(self.records), len(STAGES), name=name, cached=False)
        t0 = time.perf_counter()
        figures = fn(work)
        record = {"stage": name, "key": key, "seconds": round(time.perf_counter() - t0, 1), **figures}
        (work / "stage.json").write_text(json.dumps(record, indent=2, default=str))
        (work / ".key").unlink()
        outdir.put_in_place(work, final)  # the previous output goes only once this one is in place
        record["cached"] = False
        self.records[name] = record
        return record


class _Job:
    def __init__(self, data, cfg: RunConfig, out: Path, progress: ProgressCallback | None, trust: bool = False):
        from presso.data import DataBundle, load_data

        # a loaded DataBundle is used as it is and named (in stage keys and commands) by its name
        self.bundle = data if isinstance(data, DataBundle) else load_data(data, seed=cfg.seed)
        self.source = self.bundle if isinstance(data, DataBundle) else data  # what nested verbs read data from
        self.data = self.bundle.name if isinstance(data, DataBundle) else str(data)
        self.cfg, self.out = cfg, out
        self.trust = trust  # the user's --trust (never from a file): needed to rebuild a model from Python code
        self.progress = progress  # every nested verb reports through it too: training, search, conversion, ...
        self.stages = _Stages(out, progress)

    # ------------------------------------------------------------------ helpers
    def evaluate(self, model_dir: Path, teacher: Path | None = None) -> dict[str, Any]:
        from presso.models.sources import load_model
        from presso.train import evaluate

        model = load_model(str(model_dir), trust=self.trust)
        t = load_model(str(teacher), trust=self.trust) if teacher is not None else None
        scores = evaluate(model, self.bundle, teacher=t, seed=self.cfg.seed, progress=self.progress).metrics
        return {k: scores[k] for k in ("val_top1", "val_loss", "agreement") if k in scores}

    def figures(self, model_dir: Path) -> dict[str, Any]:
        from presso.models.figures import model_figures
        from presso.models.sources import load_model
        from presso.models.spec import InputSpec

        model = load_model(str(model_dir), trust=self.trust)
        spec = InputSpec.parse(model.presso_card.input_spec)
        return {**model_figures(model, spec.example_inputs()), "input_shape": str(spec)}

    def measure(self, onnx_path: Path, profile: bool = False) -> dict[str, Any]:
        from presso.bench.api import benchmark

        r = benchmark(str(onnx_path), self.cfg.device, threads=self.cfg.threads, repeat=100, max_seconds=15,
                      profile=profile, db=self.cfg.db, progress=self.progress)  # fmt: skip
        out = {"latency_ms": r.latency_ms["median"], "p90_ms": r.latency_ms["p90"], "noise_pct": r.noise_pct}
        if profile and r.profile:
            out["top_ops"] = _top_ops(r.profile)
        return out

    def convert(self, model_dir: Path, dest: Path, precision: str) -> dict[str, Any]:
        from presso.convert import ConvertConfig, convert
        from presso.models.sources import load_model

        model = load_model(str(model_dir), trust=self.trust)
        cfg = ConvertConfig(precision=precision, eval_samples=1000)
        result = convert(model, model.presso_card.input_spec, cfg, output_dir=dest, overwrite=True,
                         calib=self.source if precision == "int8" else None, eval_data=self.source,
                         progress=self.progress)  # fmt: skip
        s = result.summary()
        return {
            "path": str(
                Path(s["path"]).relative_to(self.out) if Path(s["path"]).is_relative_to(self.out) else s["path"]
            ),
            "size_bytes": s["size_bytes"],
            "max_abs_diff": s["max_abs_diff"],
            "accuracy": s.get("accuracy"),
            "fallback_layers": s.get("fallback_layers"),
            "int8": s.get("int8"),
        }

    # ------------------------------------------------------------------ stages
    def original(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.model:
            return self.stages.run("original", _key("original", self.data, cfg.model, cfg.train_epochs, cfg.seed),
                                   self._original_from_model)  # fmt: skip
        settings = (self.data, cfg.device, cfg.latency_ms, cfg.search_trials, cfg.search_proxy_epochs,
                    cfg.train_epochs, cfg.seed, cfg.threads)  # fmt: skip
        return self.stages.run("original", _key("search", *settings), self._original_from_search)

    def _original_from_model(self, work: Path) -> dict[str, Any]:
        from presso.models.directory import save_model_dir
        from presso.models.sources import load_model
        from presso.train import TrainConfig, train

        model = load_model(self.cfg.model, trust=self.trust)
        card = model.presso_card
        trained_here = bool(card.preprocess) and card.labels == self.bundle.classes and "val_top1" in card.figures
        dest = work / "model"
        if trained_here:
            how = "given model, already trained on this data: evaluated as is"
            if not dest.exists():
                save_model_dir(model, dest)
        else:
            how = ("given model fine-tuned on the data (it was trained elsewhere)" if card.figures.get("val_top1")
                   else "given model trained on the data (it was not trained)")  # fmt: skip
            from presso.train.checkpoint import has_checkpoint

            if not dest.exists():
                train(model, self.bundle, TrainConfig(epochs=self.cfg.train_epochs, seed=self.cfg.seed),
                      output_dir=dest, resume=has_checkpoint(dest), progress=self.progress)  # fmt: skip
        commands = [] if trained_here else [
            f"presso train {self.cfg.model} --data {self.data} --epochs {self.cfg.train_epochs} -o original/model"
        ]  # fmt: skip
        return {"how": how, "model_dir": "original/model", "commands": commands, **self.figures(dest),
                **self.evaluate(dest)}  # fmt: skip

    def _original_from_search(self, work: Path) -> dict[str, Any]:
        from presso.search import search
        from presso.search.nas import SearchConfig

        cfg = self.cfg
        scfg = SearchConfig(latency_ms=cfg.latency_ms, device=cfg.device, trials=cfg.search_trials,
                            proxy_epochs=cfg.search_proxy_epochs, final_epochs=cfg.train_epochs, threads=cfg.threads,
                            seed=cfg.seed)  # fmt: skip
        result = search(self.bundle, scfg, output_dir=work / "search", db=cfg.db, progress=self.progress)
        shutil.move(str(work / "search" / "model"), str(work / "model"))
        best = result.best
        command = (f"presso search --data {self.data} --device {cfg.device} --latency-ms {cfg.latency_ms:g} "
                   f"--trials {cfg.search_trials} --final-epochs {cfg.train_epochs} -o search")  # fmt: skip
        return {
            "commands": [command],
            "how": f"searched: {result.counts['trained']} candidates trained, {result.counts['skipped_by_predictor']} "
            "skipped by the latency predictor",
            "model_dir": "original/model",
            "search": {"counts": result.counts, "pareto": result.pareto, "best": best, "seconds": result.seconds},
            **self.figures(work / "model"),
            **self.evaluate(work / "model"),
        }

    def baseline(self, original: dict) -> dict[str, Any]:
        key = _key("baseline", self.stages.records["original"]["key"], self.cfg.precision, self.cfg.device,
                   self.cfg.threads)  # fmt: skip

        def fn(work: Path) -> dict[str, Any]:
            src = self.out / "original" / "model"
            fp32 = self.convert(src, work / "fp32", "fp32")
            fp32.update(self.measure(work / "fp32" / "model.onnx", profile=True))
            out = {"fp32": fp32}
            if self.cfg.precision != "fp32":
                dep = self.convert(src, work / self.cfg.precision, self.cfg.precision)
                dep.update(self.measure(work / self.cfg.precision / "model.onnx"))
                out[self.cfg.precision] = dep
            return out

        return self.stages.run("baseline", key, fn)

    def compress(self, baseline: dict) -> dict[str, Any]:
        cfg = self.cfg
        deployed = baseline[cfg.precision]["latency_ms"]
        # a MACs target does not depend on the deployment precision; a latency budget does (it is scaled by it)
        upstream = self.stages.records["baseline" if cfg.latency_ms is not None else "original"]["key"]
        key = _key("compress", upstream, cfg.latency_ms, cfg.target_macs)

        def fn(work: Path) -> dict[str, Any]:
            from presso.compress import PruneConfig, Target, compress
            from presso.models.directory import save_model_dir
            from presso.models.sources import load_model

            if cfg.latency_ms is not None and deployed <= cfg.latency_ms:
                return {"skipped": f"the {cfg.precision.upper()} original already runs in {deployed:.3f} ms, within "
                                   f"the {cfg.latency_ms:g} ms budget"}  # fmt: skip
            if cfg.target_macs is not None and cfg.target_macs >= 1.0:
                return {"skipped": "a MACs target of 1.0 keeps the whole model"}
            model = load_model(str(self.out / "original" / "model"), trust=self.trust)
            spec = model.presso_card.input_spec
            if cfg.latency_ms is not None:
                # the budget is for the deployed precision: scale it to FP32 by the measured speed ratio
                ratio = baseline["fp32"]["latency_ms"] / deployed
                floor = self._latency_floor(model, spec, work) / ratio
                if cfg.latency_ms < floor:
                    raise BudgetError(
                        f"The smallest latency reachable by compressing this model is about {floor:.3f} ms "
                        f"({cfg.precision.upper()} on {cfg.device}, with 90% of its channels pruned); the budget "
                        f"{cfg.latency_ms:g} ms is below it. Raise --latency-ms, or let Presso search a smaller model "
                        "(omit --model)."
                    )
                target = Target(latency_ms=cfg.latency_ms * ratio * 0.95, device="local")
                why = (f"{cfg.precision.upper()} runs {ratio:.2f}x faster than FP32 here, so the FP32 target is "
                       f"{target.latency_ms:.3f} ms")  # fmt: skip
                command = (f"presso compress original/model --target-latency-ms {target.latency_ms:.3f} --device local "
                           f"--calib {self.data} -o compress/model")  # fmt: skip
            else:
                target, why = Target(macs=cfg.target_macs), f"keep {cfg.target_macs:.0%} of MACs"
                command = (f"presso compress original/model --target-macs {cfg.target_macs} --calib {self.data} "
                           "-o compress/model")  # fmt: skip
            # the per-layer ratios are chosen by how each allocation's outputs hold up on the user's images
            result = compress(model, spec, PruneConfig(ratio=0.3), target=target, calib=self.source,
                              progress=self.progress)  # fmt: skip
            save_model_dir(result.model, work / "model", overwrite=True)  # a killed attempt's copy
            s = result.summary()
            changed = {n: v for n, v in s["per_layer"].items() if v.get("before") != v.get("after") or "ranks" in v}
            return {"model_dir": "compress/model", "why": why, "commands": [command], "method": s["method"],
                    "macs_ratio": s["macs_ratio"], "per_layer": changed, "target": s.get("target"),
                    **self.figures(work / "model"), **self.evaluate(work / "model")}  # fmt: skip

        return self.stages.run("compress", key, fn)

    def _latency_floor(self, model, spec: str, work: Path) -> float:
        """FP32 latency of the model with 90% of its channels pruned: about as fast as compressing it can make it."""
        from presso.compress import PruneConfig, compress
        from presso.models.onnx import export_onnx
        from presso.models.spec import InputSpec

        small = compress(model, spec, PruneConfig(ratio=0.9, round_to=1)).model
        path = export_onnx(small, InputSpec.parse(spec).example_inputs(), work / "floor.onnx")
        try:
            return float(self.measure(path)["latency_ms"])
        finally:
            path.unlink(missing_ok=True)

    def recover(self, compressed: dict) -> dict[str, Any]:
        key = _key("recover", self.stages.records["compress"]["key"], self.cfg.recover_epochs)

        def fn(work: Path) -> dict[str, Any]:
            from presso.models.sources import load_model
            from presso.train import TrainConfig, partial_dir, train

            if compressed.get("skipped"):
                return {"skipped": "nothing was compressed"}
            student = load_model(str(self.out / "compress" / "model"), trust=self.trust)
            teacher = load_model(str(self.out / "original" / "model"), trust=self.trust)
            dest = work / "model"
            if not dest.exists():
                train(student, self.bundle, TrainConfig(epochs=self.cfg.recover_epochs, seed=self.cfg.seed, lr=1e-3),
                      teacher=teacher, output_dir=dest, resume=(partial_dir(dest) / "last.pt").is_file(),
                      progress=self.progress)  # fmt: skip
            command = (f"presso train compress/model --teacher original/model --data {self.data} "
                       f"--epochs {self.cfg.recover_epochs} --lr 1e-3 -o recover/model")  # fmt: skip
            return {"model_dir": "recover/model", "commands": [command], **self.figures(dest), **self.evaluate(dest)}

        return self.stages.run("recover", key, fn)

    def deploy(self, recovered: dict) -> dict[str, Any]:
        cfg = self.cfg
        key = _key("deploy", self.stages.records["recover"]["key"], cfg.precision, cfg.device, cfg.threads)

        def fn(work: Path) -> dict[str, Any]:
            from presso.convert.package import package

            src = self.out / ("recover" if not recovered.get("skipped") else "original") / "model"
            fp32 = self.convert(src, work / "fp32", "fp32")
            fp32.update(self.measure(work / "fp32" / "model.onnx", profile=True))
            out: dict[str, Any] = {"fp32": fp32, "source": str(src.relative_to(self.out))}
            final_dir = work / "fp32"
            if cfg.precision != "fp32":
                dep = self.convert(src, work / cfg.precision, cfg.precision)
                dep.update(self.measure(work / cfg.precision / "model.onnx", profile=True))
                out[cfg.precision] = dep
                final_dir = work / cfg.precision
            bundle = package(final_dir, work, name="bundle.zip", progress=self.progress)
            predicts = self._bundle_predicts(bundle.path, final_dir / "model.onnx")
            out["bundle"] = {"path": "deploy/bundle.zip", "size_bytes": bundle.size_bytes, "predicts": predicts}
            out["commands"] = [
                f"presso convert {out['source']} -p {cfg.precision} --calib {self.data} -o deploy/m",
                "presso package deploy/m -o deploy/bundle.zip",
                f"presso benchmark deploy/m/model.onnx --device {cfg.device} --profile",
            ]
            return out

        return self.stages.run("deploy", key, fn)

    def _bundle_predicts(self, bundle: Path, onnx_path: Path) -> bool:
        """The bundle's predictor gives the classes ONNX Runtime gives on held-out images."""
        import numpy as np

        from presso.convert.predict import Predictor, normalize
        from presso.models.onnx import session

        pred = Predictor(bundle)
        size = tuple(int(v) for v in pred.pp["size"])
        images = self.bundle.val.sample(16, int(pred.pp["channels"]), size).numpy()
        sess = session(onnx_path)
        name = sess.get_inputs()[0].name
        x = normalize(images, pred.pp)
        direct = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
        return bool((pred.scores(images).argmax(1) == direct).all())


def _top_ops(profile: dict[str, Any], n: int = 8) -> dict[str, list[dict[str, Any]]]:
    """The operator types and the single nodes that take the most time (ONNX Runtime's profiler)."""
    return {
        "ops": [{k: r.get(k) for k in ("op", "ms", "nodes", "share")} for r in (profile.get("ops") or [])[:n]],
        "nodes": [{k: r.get(k) for k in ("node", "op", "ms", "share")} for r in (profile.get("nodes") or [])[:n]],
    }


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
    """The whole job into ``output_dir``; see the module docstring. ``kwargs`` fill a ``RunConfig`` when ``config``
    is not given.

    ``data``: a data spec or a ``DataBundle`` (stages are keyed by its name). ``progress`` gets stage ``pipeline``
    events (done: stages finished before this one, of 5; info: its name and whether it was reused) and every nested
    verb's events (training, search, compression, conversion, measurement). ``trust``: allow running the code a
    model is built from (a ``file.py:factory`` model; docs/security.md).
    """
    from presso.report import write_report

    cfg = config or RunConfig(**kwargs)
    out, t0 = Path(output_dir), time.perf_counter()
    own = outdir.holding_only({*STAGES, ".work", "summary.json", "report.html"})  # a run's folder: resumed as it is
    with outdir.writing(out, overwrite=overwrite, sources=outdir.cli_sources(cfg.model), resumable=own) as where:
        job = _Job(data, cfg, where, progress, trust=trust)
        original = job.original()
        baseline = job.baseline(original)
        try:
            compressed = job.compress(baseline)
        except BudgetError as e:
            write_summary(job, cfg, where, t0, error=str(e))
            kept = f"kept in {out}" if where == out else "dropped (the old output is untouched)"
            raise BudgetError(
                f"{e} The finished stages are {kept} (original: {original.get('val_top1')} top-1, "
                f"{baseline[cfg.precision]['latency_ms']:.3f} ms {cfg.precision.upper()})."
            ) from None
        recovered = job.recover(compressed)
        job.deploy(recovered)
        summary = write_summary(job, cfg, where, t0)
        write_report(where / "report.html", summary)
    job.stages.report(len(STAGES), len(STAGES))
    return RunResult(output_dir=out, figures=summary)


def write_summary(job: _Job, cfg: RunConfig, out: Path, t0: float, error: str | None = None) -> dict[str, Any]:
    recs = job.stages.records
    original = recs.get("original", {})
    final_model = recs.get("recover", {}) if not recs.get("recover", {}).get("skipped") else original
    deploy = recs.get("deploy", {})
    deployed = deploy.get(cfg.precision) or deploy.get("fp32") or {}
    metric = "val_top1" if original.get("val_top1") is not None else "agreement"
    acc_orig = original.get(metric)
    acc_final = (deployed.get("accuracy") or {}).get("converted_top1", final_model.get(metric))
    budget: dict[str, Any] = {"latency_ms": cfg.latency_ms, "target_macs": cfg.target_macs, "device": cfg.device}
    if deployed:
        if cfg.latency_ms is not None:
            budget["measured_ms"] = deployed.get("latency_ms")
            budget["met"] = deployed.get("latency_ms") is not None and deployed["latency_ms"] <= cfg.latency_ms
        else:
            ratio = final_model.get("macs", 0) / max(original.get("macs", 1), 1)
            budget["macs_ratio"] = round(ratio, 4)
            budget["met"] = ratio <= cfg.target_macs * 1.03
    notes = []
    fp32_ms = (deploy.get("fp32") or {}).get("latency_ms")
    if cfg.precision != "fp32" and deployed.get("latency_ms") and fp32_ms and deployed["latency_ms"] > 1.1 * fp32_ms:
        notes.append(
            f"{cfg.precision.upper()} measures slower than FP32 on {cfg.device} ({deployed['latency_ms']:.3f} vs "
            f"{fp32_ms:.3f} ms): for a model this small, quantize/dequantize and layout changes cost more than the "
            "int8 arithmetic saves. Consider --precision fp32 (the FP32 file is in deploy/fp32)."
        )
    summary = {
        "notes": notes,
        "data": job.data,
        "config": asdict(cfg),
        "stages": recs,
        "budget": budget,
        "accuracy": {
            "metric": metric,
            "original": acc_orig,
            "final": acc_final,
            "drop": round(acc_orig - acc_final, 4) if acc_orig is not None and acc_final is not None else None,
            "max_drop": cfg.max_accuracy_drop,
            "within_bound": acc_orig is not None
            and acc_final is not None
            and acc_orig - acc_final <= cfg.max_accuracy_drop,
        },
        "bundle": deploy.get("bundle"),
        "commands": [c for r in recs.values() for c in r.get("commands", [])],
        "seconds": round(time.perf_counter() - t0, 1),
        "error": error,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
