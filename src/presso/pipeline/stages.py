"""The stages of a run and the cache that skips the unchanged ones (the deploy stage: ``pipeline/deploy.py``)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import presso.outdir as outdir
from presso.errors import ConfigError
from presso.pipeline.config import STAGES, RunConfig, key
from presso.progress import ProgressCallback, reporter


class Stages:
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
        _remove_empty(self.out / ".work")
        record["cached"] = False
        self.records[name] = record
        return record


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only when no other stage's partial work is in it
    except OSError:
        pass


class Job:
    def __init__(self, data, cfg: RunConfig, out: Path, progress: ProgressCallback | None, trust: bool = False):
        from presso.data import DataBundle, load_data

        # a loaded DataBundle is used as it is and named (in stage keys and commands) by its name
        self.bundle = data if isinstance(data, DataBundle) else load_data(data, seed=cfg.seed)
        self.source = self.bundle if isinstance(data, DataBundle) else data  # what nested verbs read data from
        self.data = self.bundle.name if isinstance(data, DataBundle) else str(data)
        self.calib = cfg.calib or self.source  # INT8 calibration and the judging of compressions
        self.calib_name = cfg.calib or self.data
        self.cfg, self.out = cfg, out
        self.trust = trust  # the user's --trust (never from a file): needed to rebuild a model from Python code
        self.progress = progress  # every nested verb reports through it too: training, search, conversion, ...
        self.stages = Stages(out, progress)
        from presso.tasks import infer_task

        self.task = infer_task(None, self.bundle, cfg.task, trust=trust)
        self.headline = self.task.headline  # the accuracy the run bounds: top-1, mAP50-95, ...
        if cfg.model is None and self.task.name != "classify":
            raise ConfigError(
                f"Without --model, Presso searches a classifier; for the {self.task.name} task give the model to "
                "compress (e.g. --model ultralytics:yolov8n.yaml)."
            )

    # ------------------------------------------------------------------ helpers
    def load(self, model_dir: Path):
        from presso.models.sources import load_model

        return load_model(str(model_dir), trust=self.trust)

    def evaluate(self, model_dir: Path, teacher: Path | None = None) -> dict[str, Any]:
        from presso.train import evaluate

        t = self.load(teacher) if teacher is not None else None
        scores = evaluate(self.load(model_dir), self.bundle, teacher=t, seed=self.cfg.seed, task=self.task,
                          progress=self.progress).metrics  # fmt: skip
        keys = dict.fromkeys((self.headline, "map50", "val_top1", "val_loss", "agreement"))
        return {k: scores[k] for k in keys if k in scores}

    def figures(self, model_dir: Path) -> dict[str, Any]:
        from presso.models.figures import model_figures
        from presso.models.spec import InputSpec

        model = self.load(model_dir)
        spec = InputSpec.parse(model.presso_card.input_spec)
        return {**model_figures(model, spec.example_inputs()), "input_shape": str(spec)}

    def measure(self, onnx_path: Path, profile: bool = False) -> dict[str, Any]:
        from presso.bench.api import benchmark

        r = benchmark(str(onnx_path), self.cfg.device, threads=self.cfg.threads, repeat=100, max_seconds=15,
                      profile=profile, db=self.cfg.db, progress=self.progress)  # fmt: skip
        out = {"latency_ms": r.latency_ms["median"], "p90_ms": r.latency_ms["p90"], "noise_pct": r.noise_pct}
        if profile and r.profile:
            out["top_ops"] = top_ops(r.profile)
        return out

    def convert(self, model_dir: Path, dest: Path, precision: str, name: str) -> dict[str, Any]:
        """``model_dir`` converted into ``dest``, which the stage's output will hold as ``name`` (``OUT``-relative)."""
        from presso.convert import ConvertConfig, Int8Config, convert
        from presso.models.qat import is_qat

        model = self.load(model_dir)
        # with labels, INT8 keeps the run's accuracy bound on the task's metric (layers fall back until it holds);
        # without, the output SNR decides; a QAT model's export is its INT8 model (nothing to fall back)
        bound = self.cfg.max_accuracy_drop if self.bundle.labeled and not is_qat(model) else None
        cfg = ConvertConfig(precision=precision, eval_samples=1000, int8=Int8Config(max_accuracy_drop=bound))
        result = convert(model, model.presso_card.input_spec, cfg, output_dir=dest, overwrite=True,
                         calib=self.calib if precision == "int8" else None, eval_data=self.source,
                         progress=self.progress)  # fmt: skip
        s = result.summary()
        return {"dir": name, "path": f"{name}/{Path(s['path']).name}", "size_bytes": s["size_bytes"],
                "max_abs_diff": s["max_abs_diff"], "accuracy": s.get("accuracy"),
                "fallback_layers": s.get("fallback_layers"), "int8": s.get("int8")}  # fmt: skip

    def convert_command(self, src: str, precision: str, dest: str) -> str:
        calib = f" --calib {self.calib_name}" if precision == "int8" else ""
        if precision == "int8" and self.bundle.labeled:
            calib += f" --max-accuracy-drop {self.cfg.max_accuracy_drop:g}"
        return f"presso convert {src} -p {precision}{calib} --eval-data {self.data} -o {dest}"

    def precisions(self) -> tuple[str, ...]:
        return ("fp32",) if self.cfg.precision == "fp32" else ("fp32", self.cfg.precision)

    # ------------------------------------------------------------------ stages
    def original(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.model:
            weights = cfg.weights and _file_identity(cfg.weights)  # another file at the same path is another model
            k = key("original", self.data, cfg.model, cfg.model_args, cfg.image_size, cfg.train_epochs, cfg.seed,
                    self.task.key, self.task.train_defaults, weights, cfg.new_head)  # fmt: skip
            return self.stages.run("original", k, self._original_from_model)
        settings = (self.data, cfg.device, cfg.latency_ms, cfg.search_trials, cfg.search_proxy_epochs,
                    cfg.train_epochs, cfg.seed, cfg.threads)  # fmt: skip
        return self.stages.run("original", key("search", *settings), self._original_from_search)

    def _original_from_model(self, work: Path) -> dict[str, Any]:
        from presso.models.directory import save_model_dir
        from presso.models.sources import load_model
        from presso.models.spec import InputSpec
        from presso.train import TrainConfig, train

        cfg = self.cfg
        kwargs, built = dict(cfg.model_args), {}
        if cfg.weights is not None:
            kwargs["weights"] = cfg.weights  # load_model's weights=: a file, or torchvision's cached weights' name
        if self.bundle.labeled:  # a zoo model from random init is built for the data's classes and channels
            from presso.models.weights import fit_to_data

            channels = self.bundle.train.native()[1]
            kwargs, built = fit_to_data(
                cfg.model, kwargs, classes=self.bundle.num_classes, channels=channels, weights=kwargs.get("weights")
            )
        import torch

        torch.manual_seed(cfg.seed)  # a model built from random init starts from the same weights in every run
        model = load_model(cfg.model, trust=self.trust, new_head=cfg.new_head, **kwargs)
        card = model.presso_card
        size_ok = cfg.image_size is None or (
            bool(card.input_spec) and tuple(InputSpec.parse(card.input_spec).tensors[0].shape[-2:]) == cfg.image_size
        )
        trained_here = (bool(card.preprocess) and card.labels == self.bundle.classes and self.headline in card.figures
                        and size_ok)  # fmt: skip
        dest = work / "model"
        if trained_here:
            how = "given model, already trained on this data: evaluated as is"
            if not dest.exists():
                save_model_dir(model, dest)
        else:
            how = ("given model fine-tuned on the data (it was trained elsewhere)" if card.figures.get(self.headline)
                   else "given model trained on the data (it was not trained)")  # fmt: skip
            from presso.train.checkpoint import has_checkpoint

            if not dest.exists():
                tcfg = TrainConfig(epochs=cfg.train_epochs, seed=cfg.seed, image_size=cfg.image_size, task=cfg.task,
                                   new_head=cfg.new_head, **self.task.train_defaults)  # fmt: skip
                train(model, self.bundle, tcfg, output_dir=dest, resume=has_checkpoint(dest), task=self.task,
                      progress=self.progress)  # fmt: skip
        if built:
            how += (
                "; built for the data with "
                + ", ".join(f"{k}={v}" for k, v in built.items())
                + " (--model-arg to choose)"
            )
        args = "".join(f" --model-arg {k}={json.dumps(v)}" for k, v in cfg.model_args.items())
        args += (f" --weights {cfg.weights}" if cfg.weights else "") + (" --new-head" if cfg.new_head else "")
        size = f" --image-size {cfg.image_size[0]},{cfg.image_size[1]}" if cfg.image_size else ""
        commands = [] if trained_here else [
            f"presso train {cfg.model}{args} --data {self.data}{size} --epochs {cfg.train_epochs}"
            f"{_flags(self.task.train_defaults)} -o original/model"
        ]  # fmt: skip
        from presso.models.ultralytics_support import support_of

        return {"how": how, "model_dir": "original/model", "commands": commands, **self.figures(dest),
                **self.evaluate(dest), "architecture": support_of(card.source)}  # fmt: skip

    def _original_from_search(self, work: Path) -> dict[str, Any]:
        from presso.search import search
        from presso.search.nas import SearchConfig

        cfg = self.cfg
        scfg = SearchConfig(latency_ms=cfg.latency_ms, device=cfg.device, trials=cfg.search_trials,
                            proxy_epochs=cfg.search_proxy_epochs, final_epochs=cfg.train_epochs, threads=cfg.threads,
                            seed=cfg.seed)  # fmt: skip
        result = search(self.bundle, scfg, output_dir=work / "search", db=cfg.db, progress=self.progress)
        shutil.move(str(work / "search" / "model"), str(work / "model"))
        command = (f"presso search --data {self.data} --device {cfg.device} --latency-ms {cfg.latency_ms:g} "
                   f"--trials {cfg.search_trials} --final-epochs {cfg.train_epochs} -o original/search")  # fmt: skip
        return {
            "commands": [command],
            "how": f"searched: {result.counts['trained']} candidates trained, {result.counts['skipped_by_predictor']} "
            "skipped by the latency predictor",
            "model_dir": "original/model",
            "search": {
                "counts": result.counts,
                "pareto": result.pareto,
                "best": result.best,
                "seconds": result.seconds,
            },  # fmt: skip
            **self.figures(work / "model"),
            **self.evaluate(work / "model"),
        }

    def baseline(self, original: dict) -> dict[str, Any]:
        cfg = self.cfg
        k = key("baseline", self.stages.records["original"]["key"], cfg.precision, cfg.device, cfg.threads, cfg.calib,
                cfg.max_accuracy_drop)  # fmt: skip

        def fn(work: Path) -> dict[str, Any]:
            src = self.out / "original" / "model"
            out: dict[str, Any] = {"commands": []}
            for p in self.precisions():
                out[p] = self.convert(src, work / p, p, f"baseline/{p}")
                out[p].update(self.measure(work / p / "model.onnx", profile=p == "fp32"))
                out["commands"].append(self.convert_command("original/model", p, f"baseline/{p}"))
            return out

        return self.stages.run("baseline", k, fn)

    def compress(self, baseline: dict) -> dict[str, Any]:
        cfg = self.cfg
        deployed = baseline[cfg.precision]["latency_ms"]
        # a MACs target does not depend on the deployment precision; a latency budget does (it is scaled by it)
        upstream = self.stages.records["baseline" if cfg.latency_ms is not None else "original"]["key"]
        k = key("compress", upstream, cfg.latency_ms, cfg.target_macs, cfg.calib)

        def fn(work: Path) -> dict[str, Any]:
            from presso.compress import PruneConfig, Target, compress
            from presso.models.directory import save_model_dir

            if cfg.latency_ms is not None and deployed <= cfg.latency_ms:
                return {"skipped": f"the {cfg.precision.upper()} original already runs in {deployed:.3f} ms, within "
                                   f"the {cfg.latency_ms:g} ms budget"}  # fmt: skip
            if cfg.target_macs is not None and cfg.target_macs >= 1.0:
                return {"skipped": "a MACs target of 1.0 keeps the whole model"}
            model = self.load(self.out / "original" / "model")
            spec = model.presso_card.input_spec
            if cfg.latency_ms is not None:
                # the budget is for the deployed precision: scale it to FP32 by the measured speed ratio
                ratio = baseline["fp32"]["latency_ms"] / deployed
                floor = self._latency_floor(model, spec, work) / ratio
                if cfg.latency_ms < floor:  # no compression reaches it: deliver the closest of the original's files
                    return {"skipped": (
                        f"the smallest latency reachable by compressing this model is about {floor:.3f} ms "
                        f"({cfg.precision.upper()} on {cfg.device}, with 90% of its channels pruned); the budget "
                        f"{cfg.latency_ms:g} ms is below it: raise --latency-ms, or let Presso search a smaller "
                        "model (omit --model)"), "unreachable": True}  # fmt: skip
                target = Target(latency_ms=cfg.latency_ms * ratio * 0.95, device="local")
                why = (f"{cfg.precision.upper()} runs {ratio:.2f}x faster than FP32 here, so the FP32 target is "
                       f"{target.latency_ms:.3f} ms")  # fmt: skip
                flag = f"--target-latency-ms {target.latency_ms:.3f} --device local"
            else:
                target, why = Target(macs=cfg.target_macs), f"keep {cfg.target_macs:.0%} of MACs"
                flag = f"--target-macs {cfg.target_macs}"
            # the per-layer ratios are chosen by how each allocation's outputs hold up on the user's images
            result = compress(model, spec, PruneConfig(ratio=0.3), target=target, calib=self.calib,
                              progress=self.progress)  # fmt: skip
            save_model_dir(result.model, work / "model", overwrite=True)  # a killed attempt's copy
            s = result.summary()
            changed = {n: v for n, v in s["per_layer"].items() if v.get("before") != v.get("after") or "ranks" in v}
            command = f"presso compress original/model {flag} --calib {self.calib_name} -o compress/model"
            return {"model_dir": "compress/model", "why": why, "commands": [command], "method": s["method"],
                    "macs_ratio": s["macs_ratio"], "per_layer": changed, "target": s.get("target"),
                    **self.figures(work / "model"), **self.evaluate(work / "model")}  # fmt: skip

        return self.stages.run("compress", k, fn)

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
        k = key("recover", self.stages.records["compress"]["key"], self.cfg.recover_epochs, self.task.recover_defaults)

        def fn(work: Path) -> dict[str, Any]:
            from presso.train import TrainConfig, partial_dir, train

            if compressed.get("skipped"):
                return {"skipped": "nothing was compressed"}
            student = self.load(self.out / "compress" / "model")
            teacher = self.load(self.out / "original" / "model")
            dest = work / "model"
            if not dest.exists():
                recipe = {"epochs": self.cfg.recover_epochs, "seed": self.cfg.seed, **self.task.recover_defaults}
                tcfg = TrainConfig(**recipe)
                train(student, self.bundle, tcfg,
                      teacher=teacher, output_dir=dest, resume=(partial_dir(dest) / "last.pt").is_file(),
                      task=self.task, progress=self.progress)  # fmt: skip
            flags = _flags(self.task.recover_defaults)
            command = (f"presso train compress/model --teacher original/model --data {self.data} "
                       f"--epochs {self.cfg.recover_epochs}{flags} -o recover/model")  # fmt: skip
            # without labels, agreement with the original is what says how much the compression cost
            teacher_dir = None if self.bundle.labeled else self.out / "original" / "model"
            return {"model_dir": "recover/model", "commands": [command], **self.figures(dest),
                    **self.evaluate(dest, teacher_dir)}  # fmt: skip

        return self.stages.run("recover", k, fn)


def _flags(settings: dict[str, Any]) -> str:
    """TrainConfig settings as the CLI's flags (``batch_size`` -> `` --batch-size 16``)."""
    return "".join(f" --{k.replace('_', '-')} {v:g}" for k, v in settings.items())


def top_ops(profile: dict[str, Any], n: int = 8) -> dict[str, list[dict[str, Any]]]:
    """The operator types and the single nodes that take the most time (ONNX Runtime's profiler)."""
    return {
        "ops": [{k: r.get(k) for k in ("op", "ms", "nodes", "share")} for r in (profile.get("ops") or [])[:n]],
        "nodes": [{k: r.get(k) for k in ("node", "op", "ms", "share")} for r in (profile.get("nodes") or [])[:n]],
    }


def _file_identity(path: str) -> list[Any]:
    """What keys a stage on a weights file: its path, size and modification time (not its bytes: it may be large)."""
    try:
        st = Path(path).stat()
    except OSError:
        return [path]  # load_model names the missing file
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
