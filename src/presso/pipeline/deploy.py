"""The deploy stage: the compressed model converted, every candidate measured side by side on the device, the best
one delivered (``pipeline/candidates.py``), profiled and packaged into ``OUT/deploy/bundle.zip``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from presso.pipeline.candidates import label, measure_interleaved, select
from presso.pipeline.config import PIPELINE_VERSION, key
from presso.pipeline.stages import Job, _flags
from presso.progress import reporter


def deploy(job: Job, recovered: dict) -> dict[str, Any]:
    cfg, recs = job.cfg, job.stages.records
    settings = (
        cfg.precision,
        cfg.device,
        cfg.threads,
        cfg.calib,
        cfg.max_accuracy_drop,
        cfg.latency_ms,
        cfg.target_macs,
        cfg.qat_epochs,
    )
    k = key("deploy", PIPELINE_VERSION, recs["recover"]["key"], recs["baseline"]["key"], *settings)

    def fn(work: Path) -> dict[str, Any]:
        from presso.convert.package import package

        out: dict[str, Any] = {"commands": []}
        where: dict[str, Path] = {}  # candidate -> its converted folder now (the baseline's, or this stage's work)
        cands = []
        original, base = recs["original"], recs["baseline"]
        for p in job.precisions():
            cands.append(_candidate("original", p, base[p], original, job.headline))
            where[f"original-{p}"] = job.out / "baseline" / p
        if not recovered.get("skipped"):
            out["source"] = "recover/model"
            for p in job.precisions():
                out[p] = job.convert(job.out / "recover" / "model", work / p, p, f"deploy/{p}")
                out["commands"].append(job.convert_command("recover/model", p, f"deploy/{p}"))
                cands.append(_candidate("compressed", p, out[p], recovered, job.headline))
                where[f"compressed-{p}"] = work / p
            if cfg.qat_epochs and cfg.precision == "int8":  # INT8 learned, not only calibrated: a candidate too
                out["qat"] = _qat(job, work)
                out["commands"] += out["qat"].pop("commands")
                cands.append(_candidate("compressed-qat", "int8", out["qat"], recovered, job.headline))
                where["compressed-qat-int8"] = work / "qat"
        times = measure_interleaved({c["id"]: where[c["id"]] / "model.onnx" for c in cands}, cfg.device,
                                    cfg.threads, progress=reporter(job.progress, "measuring candidates"))  # fmt: skip
        for c in cands:
            c.update(times[c["id"]])
        chosen, why = select(cands, max_drop=cfg.max_accuracy_drop, latency_ms=cfg.latency_ms,
                             target_macs=cfg.target_macs)  # fmt: skip
        folder = where[chosen["id"]]
        out["candidates"] = cands
        out["delivered"] = {"candidate": chosen["id"], "label": chosen["label"], "dir": chosen["dir"],
                            "path": chosen["path"], "why": why}  # fmt: skip
        prof = job.measure(folder / "model.onnx", profile=True)  # its slowest operators (and a row in the DB)
        out["delivered"]["top_ops"] = prof.get("top_ops")
        bundle = package(folder, work, name="bundle.zip", progress=job.progress)
        predicts = _bundle_predicts(job, bundle.path, folder / "model.onnx")
        out["bundle"] = {"path": "deploy/bundle.zip", "size_bytes": bundle.size_bytes, "predicts": predicts,
                         "from": chosen["dir"]}  # fmt: skip
        if job.task.data_kind == "detect" and job.bundle.labeled and not recovered.get("skipped"):
            out["examples"] = _detection_examples(job, work / "examples")
        out["commands"] += [
            f"presso package {chosen['dir']} -o deploy/bundle.zip",
            f"presso benchmark {chosen['path']} --device {cfg.device}"
            + (f" --threads {cfg.threads}" if cfg.threads else "") + " --profile",
        ]  # fmt: skip
        return out

    return job.stages.run("deploy", k, fn)


def _qat(job: Job, work: Path) -> dict[str, Any]:
    """The recovered model fine-tuned with QAT (distilled from itself) for ``qat_epochs``, and its INT8 file."""
    from presso.train import TrainConfig, partial_dir, train

    src, dest = job.out / "recover" / "model", work / "qat-model"
    recipe = dict(job.task.recover_defaults)
    if "lr" in recipe:  # a fine-tune of a fine-tune: a tenth of the recovery's learning rate
        recipe["lr"] = recipe["lr"] / 10
    if not dest.exists():
        cfg = TrainConfig(epochs=job.cfg.qat_epochs, seed=job.cfg.seed, qat=True, **recipe)
        train(job.load(src), job.bundle, cfg, output_dir=dest, resume=(partial_dir(dest) / "last.pt").is_file(),
              task=job.task, progress=job.progress)  # fmt: skip
    conv = job.convert(dest, work / "qat", "int8", "deploy/qat")
    flags = _flags(recipe)
    conv["commands"] = [
        f"presso train recover/model --qat --data {job.data} --epochs {job.cfg.qat_epochs}{flags} -o deploy/qat-model",
        f"presso convert deploy/qat-model -p int8 --eval-data {job.data} -o deploy/qat",
    ]
    return conv


def _candidate(
    model: str, precision: str, conv: dict[str, Any], stage: dict[str, Any], headline: str = "val_top1"
) -> dict[str, Any]:
    """A candidate's figures before timing: its file, size, accuracy (the task's headline metric -- top-1,
    mAP50-95 -- scored after conversion when the data has labels; else the PyTorch model's agreement with the
    original), MACs and parameters."""
    scored = conv.get("accuracy") or {}
    acc = scored.get(f"converted_{headline.removeprefix('val_')}")
    source = "converted, held-out images"
    if acc is None:
        acc = stage.get(headline, stage.get("agreement", 1.0 if model == "original" else None))
        source = "PyTorch model (the conversion was not scored: the data has no labels)"
    return {"id": f"{model}-{precision}", "label": label(model, precision), "model": model, "precision": precision,
            "dir": conv["dir"], "path": conv["path"], "size_bytes": conv["size_bytes"], "accuracy": acc,
            "accuracy_source": source, "macs": stage.get("macs"), "params": stage.get("params"),
            "fallback_layers": conv.get("fallback_layers")}  # fmt: skip


def _detection_examples(job: Job, folder: Path, n: int = 4) -> list[dict[str, str]]:
    """A few held-out images with the boxes of the original and of the compressed model (PyTorch, score >= 0.25)
    and the true boxes, drawn side by side for the report: ``deploy/examples/<i>.png``."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from presso.data import batches
    from presso.tasks.detectors import detector_for

    models = {name: job.load(job.out / name / "model") for name in ("original", "recover")}
    pp = job.task.preprocess(job.bundle, models["original"])
    val = job.bundle.val.at(pp.size, pp.channels)
    x, targets = next(batches(val, np.arange(min(n, len(val))), n))
    panels: dict[str, list[dict[str, Any]]] = {"truth": [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]}
    with torch.no_grad():
        for name, model in models.items():
            preds = detector_for(model).predict(model.eval(), pp.normalize(x), conf=0.25, iou=0.7)
            panels[name] = preds
    folder.mkdir(parents=True, exist_ok=True)
    classes, scale, rows = job.bundle.classes or [], max(1, 192 // max(pp.size)), []
    for i in range(len(x)):
        tiles = []
        for name in ("truth", "original", "recover"):
            im = Image.fromarray(x[i].permute(1, 2, 0).numpy().squeeze()).convert("RGB")
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            draw = ImageDraw.Draw(im)
            p = panels[name][i]
            for box, cls in zip(p["boxes"].tolist(), p["labels"].tolist(), strict=True):
                draw.rectangle([v * scale for v in box], outline=(255, 64, 64) if name != "truth" else (64, 255, 64))
                draw.text((box[0] * scale + 2, box[1] * scale + 1), classes[cls] if cls < len(classes) else str(cls))
            tiles.append(im)
        sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * 2, tiles[0].height), (255, 255, 255))
        for k, tile in enumerate(tiles):
            sheet.paste(tile, (k * (tile.width + 8), 0))
        sheet.save(folder / f"{i}.png")
        rows.append({"image": f"deploy/examples/{i}.png", "boxes": {k: len(v[i]["boxes"]) for k, v in panels.items()}})
    return rows


def _bundle_predicts(job: Job, bundle: Path, onnx_path: Path) -> bool:
    """The bundle's predictor gives what ONNX Runtime gives on held-out images: the classes, or the boxes."""
    import numpy as np

    from presso.convert.predict import Predictor, normalize
    from presso.models.onnx import session

    pred = Predictor(bundle)
    size = tuple(int(v) for v in pred.pp["size"])
    images = job.bundle.val.sample(16, int(pred.pp["channels"]), size).numpy()
    sess = session(onnx_path)
    name = sess.get_inputs()[0].name
    x = normalize(images, pred.pp)
    direct = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    if pred.task == "detect":  # the same boxes, classes and scores as ONNX Runtime's output decoded here
        from presso.convert.predict import decode_dense_numpy

        ours, theirs = pred.boxes(images), decode_dense_numpy(direct)
        return all(
            a["boxes"].shape == b["boxes"].shape and np.allclose(a["boxes"], b["boxes"], atol=1e-3)
            and (a["labels"] == b["labels"]).all() for a, b in zip(ours, theirs, strict=True)
        )  # fmt: skip
    return bool((pred.scores(images).argmax(1) == direct.argmax(1)).all())
