"""The launcher's verbs: ``convert``, ``package`` and ``predict``.

``predict`` never imports PyTorch: it runs ``presso.convert.predict``, the same file every bundle carries. Keep every
heavy import inside the command bodies.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import (
    JsonOpt,
    ModelArgOpt,
    OverwriteOpt,
    ProgressBars,
    ShapeOpt,
    SourceArg,
    TrustOpt,
    WeightsOpt,
    _check_output,
    _checked_spec,
    _duration,
    _elapsed,
    _emit,
    _human,
    _load,
    _run,
    _tristate,
    app,
    err,
)
from presso.cli.panels import DATA, EXPORT, INT8, OUTPUT

FormatOpt = Annotated[
    str, typer.Option("--to", metavar="FORMAT", rich_help_panel=EXPORT, help="onnx | openvino | litert.")
]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", "-p", metavar="PRECISION", rich_help_panel=EXPORT, help="fp32 | fp16 | int8.")
]


def _convert_options(
    to: str,
    precision: str,
    calib_method: str,
    calib_samples: int,
    snr_db: float,
    max_fallback: float,
    reduce_range: str,
    dynamic_batch: bool,
    tolerance: float | None,
    opset: int,
    eval_samples: int,
    max_accuracy_drop: float | None = None,
    equalize: str = "auto",
    bias_correction: str = "auto",
    int8_io: bool = False,
):
    from presso.convert import ConvertConfig, Int8Config

    rr = _tristate("--reduce-range", reduce_range)
    for flag, mode in (("--equalize", equalize), ("--bias-correction", bias_correction)):
        _tristate(flag, mode)
    return ConvertConfig(
        to=to,
        precision=precision,
        opset=opset,
        dynamic_batch=dynamic_batch,
        tolerance=tolerance,
        eval_samples=eval_samples,
        int8_io=int8_io,
        int8=Int8Config(
            method=calib_method,
            samples=calib_samples,
            snr_db=None if snr_db <= 0 else snr_db,
            max_accuracy_drop=max_accuracy_drop,
            max_fallback=max_fallback,
            reduce_range=rr,
            equalize=equalize,
            bias_correction=bias_correction,
        ),
    )


@app.command()
def convert(
    source: SourceArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="DIR",
            rich_help_panel=OUTPUT,
            help="Output directory (new or empty; see --overwrite).",
        ),
    ],
    to: FormatOpt = "onnx",
    precision: PrecisionOpt = "fp32",
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            metavar="DATA",
            rich_help_panel=DATA,
            help="Calibration data for INT8 (any --data spec); labelled: also accuracy.",
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data", metavar="DATA", rich_help_panel=DATA, help="Labelled data for FP32 vs converted accuracy."
        ),
    ] = None,
    eval_samples: Annotated[int, typer.Option(rich_help_panel=DATA, help="Held-out images scored (0: skip).")] = 1000,
    calib_method: Annotated[
        str, typer.Option(metavar="METHOD", rich_help_panel=INT8, help="minmax | entropy | percentile.")
    ] = "minmax",
    calib_samples: Annotated[int, typer.Option(rich_help_panel=INT8, help="Calibration images.")] = 128,
    snr_db: Annotated[
        float,
        typer.Option(
            rich_help_panel=INT8, help="Output SNR vs FP32 that INT8 must keep; sensitive layers fall back (0: off)."
        ),
    ] = 20.0,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            metavar="SHARE",
            rich_help_panel=INT8,
            help="Instead of the SNR: the task's metric (top-1, mAP50-95) on labelled held-out images may drop at "
            "most this share (0.005: half a point); sensitive layers fall back until it holds. Needs labels.",
        ),
    ] = None,
    max_fallback: Annotated[
        float, typer.Option(rich_help_panel=INT8, help="Largest share of layers allowed to fall back.")
    ] = 0.5,
    reduce_range: Annotated[
        str,
        typer.Option(
            metavar="MODE", rich_help_panel=INT8, help="7-bit weights: auto (on for x86 without VNNI) | on | off."
        ),
    ] = "auto",
    equalize: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            rich_help_panel=INT8,
            help="Cross-layer equalization of Conv pairs: auto (tried when INT8 misses the bound, before any "
            "fallback) | on | off.",
        ),
    ] = "auto",
    bias_correction: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            rich_help_panel=INT8,
            help="Bias correction of INT8 weight error: auto (tried after equalization) | on | off.",
        ),
    ] = "auto",
    int8_io: Annotated[
        bool,
        typer.Option(
            "--int8-io", rich_help_panel=INT8, help="LiteRT INT8: int8 inputs and outputs (microcontrollers, NPUs)."
        ),
    ] = False,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch", rich_help_panel=EXPORT, help="Symbolic batch dimension.")
    ] = False,
    tolerance: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=EXPORT, help="Largest output difference vs PyTorch, relative (fp32 1e-3, fp16 3e-2)."
        ),
    ] = None,
    opset: Annotated[int, typer.Option(rich_help_panel=EXPORT, help="ONNX opset (>= 17).")] = 18,
    input_shape: ShapeOpt = None,
    overwrite: OverwriteOpt = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a model to ONNX or OpenVINO IR in FP32, FP16 or INT8, verified against PyTorch.

    INT8 calibrates on --calib, checks the output SNR on held-out images, and falls back the most sensitive
    layers to FP32 until --snr-db is met; the report lists every layer's SNR and what fell back.
    """

    def body():
        import presso

        cfg = _convert_options(
            to, precision, calib_method, calib_samples, snr_db, max_fallback, reduce_range, dynamic_batch,
            tolerance, opset, eval_samples, max_accuracy_drop, equalize, bias_correction, int8_io,
        )  # fmt: skip
        _check_output(output, overwrite, source)
        model, _ = _load(source, trust, model_arg, weights=weights)
        spec = _checked_spec(source, model, input_shape)
        with ProgressBars() as bars:
            result = presso.convert(
                model,
                spec,
                cfg,
                output_dir=output,
                calib=calib,
                eval_data=eval_data,
                overwrite=overwrite,
                progress=bars,
            )
        summary = {"source": source, **result.summary(), "wall_seconds": round(_elapsed(), 1)}
        if result.int8 is not None and not result.int8.met:
            err.print(
                f"[yellow]warning:[/yellow] INT8 output SNR {result.int8.output_snr_db:.1f} dB stays below "
                f"{snr_db:g} dB with {len(result.int8.fallback_layers)} layers in FP32 (the --max-fallback "
                "limit); check the accuracy, or use --precision fp16.",
                highlight=False,
            )
        _emit(summary, as_json, _render_convert)

    _run(body)


@app.command()
def package(
    source: Annotated[str, typer.Argument(help="A directory from 'presso convert', or any model to convert.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle to write (.zip).")],
    precision: PrecisionOpt = "fp32",
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration data when converting to INT8.")] = None,
    input_shape: ShapeOpt = None,
    overwrite: OverwriteOpt = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pack a converted model (converting it first if needed) with its card and a torch-free predictor."""

    def body():
        import presso
        import presso.outdir as outdir
        from presso.convert.package import is_bundle, is_converted_dir

        _check_output(output, overwrite or is_bundle(output), source, what="file")
        with contextlib.ExitStack() as stack:
            converted, model = Path(source), None
            if not is_converted_dir(converted):
                model, _ = _load(source, trust, model_arg, weights=weights)  # its status line ends before the bars
                spec = _checked_spec(source, model, input_shape)
                # converted beside the bundle, in a folder named as Presso's: a killed run's is cleaned by the next
                converted = stack.enter_context(outdir.scratch(output)) / "m"
            bars = stack.enter_context(ProgressBars())
            if model is not None:
                cfg = _convert_options("onnx", precision, "minmax", 128, 20.0, 0.5, "auto", False, None, 18, 0)
                presso.convert(model, spec, cfg, output_dir=converted, calib=calib, progress=bars)
            # the bundle's path is given on the command line; the library takes its directory and file name
            result = presso.package(converted, output.parent, name=output.name, overwrite=overwrite, progress=bars)
        _emit(result.summary(), as_json, _render_package)

    _run(body)


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="A bundle from 'presso package'.")],
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGE|DIR...", help="Image files, or folders of them (read recursively).")
    ],
    top_k: Annotated[int, typer.Option(help="Classes shown per image.")] = 1,
    conf: Annotated[float, typer.Option(help="Detectors: the lowest box score kept.")] = 0.25,
    iou: Annotated[float, typer.Option(help="Detectors: NMS IoU threshold (a box goes above it).")] = 0.7,
    save: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Write each image with its boxes, labels and scores drawn (a classifier's: its label) as DIR/NAME.png "
            "(DIR created; a file already there is kept unless --overwrite; an input image is never overwritten).",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace files of the same names in the --save folder.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Classify images, or detect objects in them, with a bundle, on ONNX Runtime only (no PyTorch).

    A detector's boxes are in each image's own pixels (x1, y1, x2, y2).
    """

    def body():
        from presso.convert.predict import Predictor, save_drawn

        results = Predictor(bundle, threads=threads).predict(_image_files(images), top_k=top_k, conf=conf, iou=iou)
        summary: dict[str, Any] = {"bundle": str(bundle), "predictions": results}
        if save is not None:
            save_drawn(results, save, overwrite=overwrite)  # each result names its file ("saved")
            summary["saved_to"] = str(save)
        _emit(summary, as_json, _render_predict)

    _run(body)


# the image files a folder given to predict contributes (presso.data.images reads the same; not imported: torch)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_files(paths: list[Path]) -> list[Path]:
    """The images named: files as given, folders as the image files under them (sorted, hidden ones left out)."""
    from presso.errors import ConfigError

    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        found = sorted(
            f
            for f in path.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES
            and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not found:
            raise ConfigError(f"No images in '{path}' (looked for {', '.join(IMAGE_SUFFIXES)}).")
        out.extend(found)
    return out


def _render_convert(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso convert: {s['source']} -> {s['format']} {s['precision']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("file", s["path"])
    t.add_row("size (bytes)", f"{_human(s['size_bytes'])} (FP32 {_human(s['size_bytes_fp32'])})")
    t.add_row("max abs diff vs PyTorch", f"{s['max_abs_diff']:.3g}")
    t.add_row("max rel diff vs PyTorch", f"{s['max_rel_diff']:.3g}")
    if s.get("int8"):
        q = s["int8"]
        t.add_row("output SNR (dB)", f"{q['output_snr_db']} (all INT8: {q['output_snr_db_all_int8']})")
        t.add_row("fell back to FP32", ", ".join(s["fallback_layers"]) or "none")
        if q.get("max_accuracy_drop") is not None:
            tried = ", ".join(f"{st['fallback']} in FP32: {st['value']}" for st in q["steps"])
            t.add_row(f"{q['criterion']}, files tried", tried)
    a = s.get("accuracy")
    if a and a.get("metric") == "map50_95":
        t.add_row(f"mAP50-95 on {a['n']} images", f"FP32 {a['fp32_map50_95']:.4f} -> {a['converted_map50_95']:.4f}")
        t.add_row(f"mAP50 on {a['n']} images", f"FP32 {a['fp32_map50']:.4f} -> {a['converted_map50']:.4f}")
    elif a:
        t.add_row(f"top-1 on {a['samples']} images", f"FP32 {a['fp32_top1']:.4f} -> {a['converted_top1']:.4f}")
    out.print(t)
    if s.get("int8"):
        lt = Table(title="INT8 layers (SNR in dB against FP32)")
        for col in ("layer", "op", "output SNR", "sensitivity", "fallback"):
            lt.add_column(col)
        for r in s["int8"]["layers"]:
            lt.add_row(
                r["layer"] or r["node"], r["op"], str(r["activation_snr_db"] or "-"), str(r["snr_db"] or "-"),
                "FP32" if r["fallback"] else "",
            )  # fmt: skip
        out.print(lt)
    out.print(f"saved to [bold]{s['output_dir']}[/bold] in {_duration(s.get('wall_seconds', s['seconds']))}")


def _render_package(s: dict[str, Any]) -> None:
    Console().print(
        f"bundle [bold]{s['path']}[/bold] ({s['size_bytes']} bytes): {', '.join(s['members'])}", highlight=False
    )


def _render_predict(s: dict[str, Any]) -> None:
    t = Table(title=f"presso predict: {s['bundle']}")
    detect = any("detections" in r for r in s["predictions"])
    for col in ("image", "class", "score", *(["box (x1, y1, x2, y2)"] if detect else [])):
        t.add_column(col)
    for r in s["predictions"]:
        if detect:  # one row per box, an image without any one row of its own
            for d in r["detections"] or [{"label": "(none)", "score": None, "box": None}]:
                score = "" if d["score"] is None else f"{d['score']:.4f}"
                t.add_row(r["image"], d["label"], score, ", ".join(f"{v:g}" for v in d["box"] or []))
            continue
        # the k best classes and, in the same order, each one's score
        labels, scores = " | ".join(x["label"] for x in r["top"]), " | ".join(f"{x['score']:.4f}" for x in r["top"])
        t.add_row(r["image"], labels, scores)
    Console().print(t)
    if s.get("saved_to"):
        Console().print(f"drawn images saved to [bold]{s['saved_to']}[/bold]", highlight=False)
