"""The ``presso`` command line: one thin command per verb over the Python API.

Figures are printed as a Rich table, or as exactly one JSON object on stdout with ``--json`` (progress and messages
go to stderr). Errors are one red line and a non-zero exit; ``presso --debug ...`` shows the traceback.
Nothing here imports torch at module level, so ``presso --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="presso",
    help="Make neural networks small and fast enough for edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
_state = {"debug": bool(os.environ.get("PRESSO_DEBUG"))}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    if debug:
        _state["debug"] = True


# --------------------------------------------------------------------------- helpers
def _model_kwargs(items: list[str] | None) -> dict[str, Any]:
    from presso.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg '{item}' must look like NAME=VALUE (e.g. num_classes=10).")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _input_spec(source: str, model, given: str | None):
    """The input spec: given, else recorded in the model card, else the model's own default (timm)."""
    from presso.models.spec import input_spec_for

    return input_spec_for(model, given, source)


def _load(source: str, trust: bool, model_arg: list[str] | None, teacher: str | None = None, show: bool = True):
    """The model named on the command line (builder kwargs from --model-arg), and its teacher if one is named."""
    import presso

    with err.status(f"Loading {source} ...") if show else contextlib.nullcontext():
        model = presso.load_model(source, trust=trust, **_model_kwargs(model_arg))
        original = presso.load_model(teacher, trust=trust) if teacher else None
    return model, original


def _emit(payload: dict[str, Any], as_json: bool, render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        render(payload)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _run(fn):
    """Run a command body, turning Presso's errors into one red line and a non-zero exit."""
    from presso.errors import PressoError

    try:
        return fn()
    except typer.Exit:
        raise
    except PressoError as e:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
    except Exception as e:
        if _state["debug"]:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {e} -- rerun with 'presso --debug ...' and report it.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------- commands
SourceArg = Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, file.py:FACTORY, a model dir, or .pt2")]
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", "-s", help="Input shape(s), e.g. 1,3,224,224 (several: ';').")
]
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow unpickling a full-model .pt you trust.")]
ModelArgOpt = Annotated[
    list[str] | None, typer.Option("--model-arg", help="Builder keyword, NAME=VALUE (repeatable), e.g. num_classes=10.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


@app.command()
def compress(
    source: SourceArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    input_shape: ShapeOpt = None,
    prune_ratio: Annotated[
        float | None, typer.Option("--prune-ratio", "-r", help="Fraction of channels removed per group, in (0, 1).")
    ] = None,
    criterion: Annotated[str, typer.Option(help="l1 | l2 | gm | taylor | random | index.")] = "l2",
    per_layer: Annotated[
        Path | None, typer.Option("--per-layer", help="JSON/YAML: layer name -> pruning ratio.")
    ] = None,
    indices: Annotated[
        Path | None, typer.Option("--indices", help="JSON: layer name -> channel indices to remove (criterion index).")
    ] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer name or glob never pruned.")] = None,
    round_to: Annotated[int, typer.Option(help="Keep channel counts a multiple of this (0: off).")] = 8,
    attention: Annotated[
        str, typer.Option(help="head_dim: same dims from every head; heads: whole heads.")
    ] = "head_dim",
    grouped: Annotated[
        str,
        typer.Option(help="Grouped convolutions: groups: remove whole groups (faster); width: thin every group."),
    ] = "groups",
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            help="Calibration data (any --data spec, or 'random'; 128 images are used): "
            "taylor, and the choice of per-layer ratios under a target.",
        ),
    ] = None,
    recommend: Annotated[
        bool | None,
        typer.Option(
            "--recommend/--uniform",
            help="Per-layer ratios chosen by Presso (LAMP scores; with --calib under a target, the best of several "
            "allocations judged on that data; under --target-latency-ms, allocations weighted by measured time per "
            "MAC), or one uniform ratio. Default: recommended under a target with --calib or --device, else uniform.",
        ),
    ] = None,
    decompose: Annotated[str | None, typer.Option("--decompose", help="tucker | cp | svd.")] = None,
    rank: Annotated[str, typer.Option("--rank", help="Rank rule: vbmf | energy | ratio.")] = "vbmf",
    vbmf_offset: Annotated[float, typer.Option(help="VBMF calibration offset in [-1, 1] (+: more rank).")] = 0.0,
    energy: Annotated[float, typer.Option(help="Energy kept, for --rank energy.")] = 0.9,
    rank_ratio: Annotated[float, typer.Option(help="Share of full rank kept, for --rank ratio.")] = 0.5,
    ranks: Annotated[
        Path | None, typer.Option("--ranks", help="JSON/YAML: layer -> rank ([out, in] for tucker); 0 skips.")
    ] = None,
    target_macs: Annotated[float | None, typer.Option("--target-macs", help="Keep this share of MACs.")] = None,
    target_params: Annotated[float | None, typer.Option("--target-params", help="Keep this share of params.")] = None,
    target_latency_ms: Annotated[
        float | None, typer.Option("--target-latency-ms", help="Latency budget on --device (needs the benchmarker).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Device for --target-latency-ms; with --target-macs, 'local' picks, among allocations weighted by "
            "measured time per MAC, the one that runs fastest here.",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Intra-op threads latency is measured with (default: all cores).")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Relative tolerance of a target.")] = 0.03,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune and/or decompose a model (or meet a MACs/params target) and save it as a Presso model directory.

    With both --prune-ratio and --decompose, pruning runs first, then decomposition of what remains. The per-layer
    values used are written next to the model (per_layer.yaml, ranks.yaml) to edit and feed back.
    """

    def body():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        import presso
        from presso.compress import DecomposeConfig, PruneConfig, Target, load_layer_file
        from presso.errors import ConfigError

        per = load_layer_file(per_layer, "per-layer ratio") if per_layer else {}
        idx = load_layer_file(indices, "indices") if indices else {}
        rank_map = load_layer_file(ranks, "ranks") if ranks else {}
        wants_target = any(v is not None for v in (target_macs, target_params, target_latency_ms))
        target = None
        if wants_target:
            target = Target(macs=target_macs, params=target_params, latency_ms=target_latency_ms, device=device,
                            tolerance=tolerance, threads=threads)  # fmt: skip
        wants_prune = prune_ratio is not None or per or idx or recommend or not decompose
        configs: list = []
        if wants_prune:
            default_ratio = None if (per or idx) else 0.5
            ratio = prune_ratio if prune_ratio is not None else default_ratio
            configs.append(
                PruneConfig(
                    ratio=None if criterion == "index" and prune_ratio is None else ratio,
                    criterion=criterion,
                    per_layer=per,
                    indices=idx,
                    ignore=list(ignore or []),
                    round_to=round_to or None,
                    attention=attention,
                    grouped=grouped,
                )
            )
        if decompose:
            configs.append(
                DecomposeConfig(
                    method=decompose,
                    rank=rank,
                    vbmf_offset=vbmf_offset,
                    energy=energy,
                    rank_ratio=rank_ratio,
                    per_layer=rank_map,
                    ignore=list(ignore or []),
                )  # fmt: skip
            )
        elif rank_map:
            raise ConfigError("--ranks is for decomposition: add --decompose tucker|cp|svd.")
        model, _ = _load(source, trust, model_arg)
        spec = _input_spec(source, model, input_shape)
        data = None
        if criterion == "taylor" and not calib:
            raise ConfigError("criterion 'taylor' needs data: pass --calib DATA (or --calib random).")
        if calib:
            from presso.data import Preprocess, calibration_batches
            from presso.models import get_card

            recorded = getattr(get_card(model), "preprocess", None)
            pp = Preprocess.from_json(recorded) if recorded else None
            data = calibration_batches(calib, spec, batches=4, batch_size=32, preprocess=pp)
        label = "searching" if target else "compressing"
        with Progress(
            TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
        ) as bar:
            task = bar.add_task(label, total=None)
            result = presso.compress(
                model, spec, configs, data=data, target=target, recommend=recommend,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
        files = _per_layer_files(result)
        with err.status(f"Saving {output} ..."):
            presso.save_model_dir(result.model, output, input_spec=spec, extra_files=files)
        summary = result.summary(str(output))
        summary["files"] = sorted(files)
        _emit(summary, as_json, _render_compress)

    _run(body)


def _per_layer_files(result) -> dict[str, str]:
    """The per-layer values a run used, as YAML the user can edit and pass back (--per-layer, --ranks)."""
    import yaml

    files = {}
    ratios = {n: v["ratio"] for n, v in result.per_layer.items() if v.get("ratio")}
    if ratios:
        files["per_layer.yaml"] = "# pruning ratio per layer (feed back with --per-layer)\n" + yaml.safe_dump(ratios)
    ranks = {n: v["ranks"] if len(v["ranks"]) > 1 else v["ranks"][0] for n, v in result.per_layer.items()
             if "ranks" in v}  # fmt: skip
    if ranks:
        files["ranks.yaml"] = "# decomposition rank per layer (feed back with --ranks)\n" + yaml.safe_dump(ranks)
    return files


def _image_size(text: str | None):
    from presso.errors import ConfigError

    if not text:
        return None
    try:
        parts = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--image-size '{text}' must be H or H,W (e.g. 32 or 224,224).") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ConfigError(f"--image-size '{text}' must be H or H,W with positive sizes.")
    return (parts[0], parts[-1])


DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="digits | shapes[:n=,size=,classes=] | fashion-mnist[:DIR] | an image folder | unlabeled:DIR | a CSV.",
    ),
]
ImageSizeOpt = Annotated[str | None, typer.Option("--image-size", help="Resize images to H or H,W.")]


@app.command()
def train(
    source: SourceArg,
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Global batch size (split across torchrun processes).")] = 128,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-3 adamw, 0.1 sgd, per 128).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default: 0.05 adamw, 5e-4 sgd.")] = None,
    warmup: Annotated[float, typer.Option(help="Fraction of steps warming the learning rate up.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.1,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop (and flip).")] = True,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="Distil from this model (the original of a compressed one).")
    ] = None,
    kd_alpha: Annotated[float, typer.Option(help="Weight of distillation vs cross-entropy when labels exist.")] = 0.7,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 4.0,
    feature_match: Annotated[
        bool, typer.Option("--feature-match", help="Also match layers with the same name and shape.")
    ] = False,
    image_size: ImageSizeOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share when the data has no split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for split, order, augmentation and init.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto (bf16 on CUDA) | on | off.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Image decoding processes (folders).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run kept in OUTPUT.partial.")
    ] = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a dataset, or recover a compressed one by distilling from its original (--teacher).

    Runs data-parallel under torchrun: torchrun --nproc-per-node 2 -m presso train ...
    """

    def body():
        import torch

        import presso
        from presso.train import TrainConfig, partial_dir
        from presso.train.distributed import setup

        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            label_smoothing=label_smoothing,
            augment=augment,
            amp=amp,
            device=device,
            seed=seed,
            val_fraction=val_fraction,
            image_size=_image_size(image_size),
            workers=workers,
            kd_alpha=kd_alpha,
            temperature=temperature,
            feature_match=feature_match,
        )
        main = setup().is_main
        torch.manual_seed(seed)  # the same initial weights on every torchrun process
        model, original = _load(source, trust, model_arg, teacher, show=main)
        bar = _TrainBar(epochs) if main else None
        try:
            with bar or contextlib.nullcontext():
                result = presso.train(
                    model,
                    data,
                    cfg,
                    teacher=original,
                    output_dir=output,
                    resume=resume,
                    progress=bar.update if bar else None,
                )
        except KeyboardInterrupt:
            if main:
                err.print(
                    f"[yellow]interrupted[/yellow]: the run is kept in {partial_dir(output)}; continue it with the "
                    "same command and --resume."
                )
            raise typer.Exit(130) from None
        if main:
            _emit(result.summary(), as_json, _render_train)

    _run(body)


@app.command(name="eval")
def evaluate(
    source: SourceArg,
    data: DataOpt,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Also measure agreement with this model.")] = None,
    image_size: ImageSizeOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share when the data has no split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 0,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1 and loss of a model on the held-out split of a dataset (and agreement with a teacher)."""

    def body():
        import presso

        model, original = _load(source, trust, model_arg, teacher)
        with err.status("Evaluating ..."):
            row = presso.train.evaluate(
                model, data, teacher=original, image_size=_image_size(image_size), seed=seed, val_fraction=val_fraction
            )
        _emit({"source": source, **row}, as_json, _render_eval)

    _run(body)


class _TrainBar:
    """A Rich progress bar per epoch on stderr, and one line of metrics when each epoch ends."""

    def __init__(self, epochs: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.epochs = epochs
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            console=err,
        )
        self.task = None
        self.epoch = 0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def update(self, event: dict) -> None:
        if event["phase"] == "train":
            if self.task is None or event["epoch"] != self.epoch:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.epoch = event["epoch"]
                self.task = self.progress.add_task(
                    "train", total=event["steps"], epoch=event["epoch"], epochs=self.epochs, loss=event["loss"]
                )
            self.progress.update(self.task, completed=event["step"], loss=event["loss"])
        elif event["phase"] == "epoch":
            parts = [f"epoch {event['epoch']}/{self.epochs}", f"train loss {event['train_loss']:.4f}"]
            for key in ("val_top1", "val_loss", "agreement"):
                if event.get(key) is not None:
                    parts.append(f"{key} {event[key]:.4f}")
            self.progress.console.print("  ".join(parts), highlight=False)


@app.command()
def info(
    source: SourceArg,
    input_shape: ShapeOpt = None,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Params, MACs, size and per-layer channels of a model."""

    def body():
        import presso

        model, _ = _load(source, trust, model_arg)
        spec = _input_spec(source, model, input_shape)
        figures = presso.info(model, spec)
        _emit({"source": source, **figures}, as_json, _render_info)

    _run(body)


@app.command()
def env(as_json: JsonOpt = False) -> None:
    """Versions and devices, for bug reports."""
    import importlib.metadata as md
    import platform

    import torch

    pkgs = {}
    for p in ("presso", "torch", "torchvision", "timm", "torch-pruning", "safetensors", "onnx", "onnxruntime"):
        try:
            pkgs[p] = md.version(p)
        except md.PackageNotFoundError:
            pkgs[p] = None
    payload = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "packages": pkgs,
        "presso_home": os.environ.get("PRESSO_HOME", str(Path.home() / ".presso")),
    }

    def render(p):
        t = Table(title="presso env")
        t.add_column("item")
        t.add_column("value")
        for k, v in p.items():
            if k != "packages":
                t.add_row(k, str(v))
        for k, v in p["packages"].items():
            t.add_row(k, str(v))
        Console().print(t)

    _emit(payload, as_json, render)


# --------------------------------------------------------------------------- rendering
def _render_compress(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso compress ({s['method']})")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right")
    for key, label in (("params", "params"), ("macs", "MACs"), ("size_bytes", "size (bytes)")):
        b, a = s[f"{key}_before"], s[f"{key}_after"]
        t.add_row(label, _human(b), _human(a), f"{a / max(b, 1):.3f}")
    out.print(t)
    changed = {n: v for n, v in s["per_layer"].items() if v["before"] != v["after"]}
    if changed:
        lt = Table(title=f"channels per layer ({len(changed)} of {len(s['per_layer'])} layers changed)")
        lt.add_column("layer")
        lt.add_column("before", justify="right")
        lt.add_column("after", justify="right")
        for n, v in list(changed.items())[:40]:
            lt.add_row(n, str(v["before"]), str(v["after"]))
        if len(changed) > 40:
            lt.add_row(f"... {len(changed) - 40} more (see --json)", "", "")
        out.print(lt)
    if s["skipped_layers"]:
        st = Table(title="left unpruned")
        st.add_column("layer")
        st.add_column("reason")
        for item in s["skipped_layers"]:
            st.add_row(item["name"], item["reason"])
        out.print(st)
    if s.get("target"):
        tg = s["target"]
        key = "macs" if "macs" in tg else "params"
        out.print(f"target: keep {tg[key]:.1%} of {key} -> kept {tg['achieved']:.1%}")
        for search in tg["search"]:
            out.print(f"  {search['method']}: {search['knob']} = {search['best_knob']} ({search['why']})")
    out.print(f"saved to [bold]{s['output_dir']}[/bold] in {s['seconds']:.1f}s")


def _render_info(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso info: {s['source']} @ {s['input_shape']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("params", f"{_human(s['params'])} ({s['params']})")
    t.add_row("MACs", f"{_human(s['macs'])} ({s['macs']})")
    t.add_row("size (bytes)", f"{_human(s['size_bytes'])} ({s['size_bytes']})")
    t.add_row("conv/linear layers", str(len(s["per_layer"])))
    out.print(t)


def _render_train(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso train: {s['data'].get('data')}")
    cols = [
        k
        for k in ("epoch", "train_loss", "val_top1", "val_loss", "agreement", "seconds")
        if s["history"] and k in s["history"][0]
    ]
    for c in cols:
        t.add_column(c, justify="right")
    for row in s["history"]:
        t.add_row(*[f"{row[c]:.4f}" if isinstance(row[c], float) and c != "seconds" else str(row[c]) for c in cols])
    out.print(t)
    best = f"top-1 {s['val_top1']:.4f}" if s.get("val_top1") is not None else f"loss {s['val_loss']:.4f}"
    out.print(f"best epoch {s['best_epoch']} ({best}); saved to [bold]{s['output_dir']}[/bold] in {s['seconds']:.1f}s")


def _render_eval(s: dict[str, Any]) -> None:
    out = Console()
    t = Table(title=f"presso eval: {s['source']} on {s['data']['data']} ({s['val_n']} images)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key in ("val_top1", "val_loss", "agreement", "match_loss"):
        if s.get(key) is not None:
            t.add_row(key, f"{s[key]:.4f}")
    out.print(t)


# Verbs kept in their own modules register their commands on ``app`` (each a thin layer over its package's API).
from presso import cli_bench, cli_convert, cli_run, cli_search  # noqa: E402

for _module in (cli_convert, cli_bench, cli_search, cli_run):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
