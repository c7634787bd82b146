"""``presso compress``: prune and/or decompose a model, or meet a MACs/params/latency target."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from presso.cli.app import (
    JsonOpt,
    ModelArgOpt,
    OutputDirOpt,
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
    app,
    err,
)
from presso.cli.panels import DATA, DECOMPOSE, MEASURE, PRUNE, TARGET


@app.command()
def compress(
    source: SourceArg,
    output: OutputDirOpt,
    input_shape: ShapeOpt = None,
    prune_ratio: Annotated[
        float | None,
        typer.Option(
            "--prune-ratio",
            "-r",
            metavar="RATIO",
            rich_help_panel=PRUNE,
            help="Fraction of channels removed per group, in (0, 1). Under a target the ratio is searched: this "
            "only turns pruning on.",
        ),
    ] = None,
    criterion: Annotated[
        str,
        typer.Option(
            metavar="NAME", rich_help_panel=PRUNE, help="l1 | l2 | gm | taylor | random | index, or a registered one."
        ),
    ] = "l2",
    per_layer: Annotated[
        Path | None,
        typer.Option(
            "--per-layer", metavar="FILE", rich_help_panel=PRUNE, help="JSON/YAML: layer name -> pruning ratio."
        ),
    ] = None,
    indices: Annotated[
        Path | None,
        typer.Option(
            "--indices",
            metavar="FILE",
            rich_help_panel=PRUNE,
            help="JSON: layer name -> channel indices to remove (criterion index).",
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore", metavar="GLOB", rich_help_panel=PRUNE, help="Layer name or glob never pruned (repeatable)."
        ),
    ] = None,
    round_to: Annotated[
        int, typer.Option(rich_help_panel=PRUNE, help="Keep channel counts a multiple of this (0: off).")
    ] = 8,
    attention: Annotated[
        str,
        typer.Option(
            metavar="MODE", rich_help_panel=PRUNE, help="head_dim: same dims from every head; heads: whole heads."
        ),
    ] = "head_dim",
    grouped: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            rich_help_panel=PRUNE,
            help="Grouped convolutions: groups: remove whole groups (faster); width: thin every group.",
        ),
    ] = "groups",
    recommend: Annotated[
        bool | None,
        typer.Option(
            "--recommend/--uniform",
            rich_help_panel=PRUNE,
            help="Per-layer ratios chosen by Presso (LAMP scores; with --calib under a target, the best of several "
            "allocations judged on that data; under --target-latency-ms, allocations weighted by measured time per "
            "MAC), or one uniform ratio. Default: recommended under a target with --calib or --device, else uniform.",
        ),
    ] = None,
    decompose: Annotated[
        str | None,
        typer.Option("--decompose", metavar="METHOD", rich_help_panel=DECOMPOSE, help="tucker | cp | svd."),
    ] = None,
    rank: Annotated[
        str, typer.Option("--rank", metavar="RULE", rich_help_panel=DECOMPOSE, help="Rank rule: vbmf | energy | ratio.")
    ] = "vbmf",
    vbmf_offset: Annotated[
        float, typer.Option(rich_help_panel=DECOMPOSE, help="VBMF calibration offset in \\[-1, 1] (+: more rank).")
    ] = 0.0,
    energy: Annotated[float, typer.Option(rich_help_panel=DECOMPOSE, help="Energy kept, for --rank energy.")] = 0.9,
    rank_ratio: Annotated[
        float, typer.Option(rich_help_panel=DECOMPOSE, help="Share of full rank kept, for --rank ratio.")
    ] = 0.5,
    ranks: Annotated[
        Path | None,
        typer.Option(
            "--ranks",
            metavar="FILE",
            rich_help_panel=DECOMPOSE,
            help="JSON/YAML: layer -> rank (\\[out, in] for tucker); 0 skips.",
        ),
    ] = None,
    target_macs: Annotated[
        float | None,
        typer.Option("--target-macs", metavar="SHARE", rich_help_panel=TARGET, help="Keep this share of MACs."),
    ] = None,
    target_params: Annotated[
        float | None,
        typer.Option("--target-params", metavar="SHARE", rich_help_panel=TARGET, help="Keep this share of params."),
    ] = None,
    target_latency_ms: Annotated[
        float | None,
        typer.Option(
            "--target-latency-ms",
            metavar="MS",
            rich_help_panel=TARGET,
            help="Latency budget on --device (needs the benchmarker).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            metavar="DEVICE",
            rich_help_panel=MEASURE,
            help="Device for --target-latency-ms; with --target-macs, 'local' picks, among allocations weighted by "
            "measured time per MAC, the one that runs fastest here.",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", rich_help_panel=MEASURE, help="Intra-op threads latency is measured with (default: all cores)."
        ),
    ] = None,
    tolerance: Annotated[float, typer.Option(rich_help_panel=TARGET, help="Relative tolerance of a target.")] = 0.03,
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            metavar="DATA",
            rich_help_panel=DATA,
            help="Calibration data (any --data spec, or 'random'; 128 images are used): "
            "taylor, and the choice of per-layer ratios under a target.",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    trust: TrustOpt = False,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune and/or decompose a model (or meet a MACs/params target) and save it as a Presso model directory.

    With both --prune-ratio and --decompose, pruning runs first, then decomposition of what remains. The per-layer
    values used are written next to the model (per_layer.yaml, ranks.yaml) to edit and feed back.
    """

    def body():
        import presso
        from presso.compress import DecomposeConfig, PruneConfig, Target, load_layer_file
        from presso.errors import ConfigError

        _check_output(output, overwrite, source)
        per = load_layer_file(per_layer, "per-layer ratio") if per_layer else {}
        idx = load_layer_file(indices, "indices") if indices else {}
        rank_map = load_layer_file(ranks, "ranks") if ranks else {}
        wants_target = any(v is not None for v in (target_macs, target_params, target_latency_ms))
        target = None
        if wants_target:
            target = Target(macs=target_macs, params=target_params, latency_ms=target_latency_ms, device=device,
                            tolerance=tolerance, threads=threads)  # fmt: skip
        # pruning is the default method: it runs unless only --decompose was asked for
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
        if target is not None and prune_ratio is not None:  # the search sets the ratio: never silently
            err.print(
                f"[yellow]note:[/yellow] under --target-{target.key.replace('_', '-')} the pruning ratio is searched; "
                f"--prune-ratio {prune_ratio:g} only turns pruning on (drop the target to prune by exactly that).",
                highlight=False,
                soft_wrap=True,
            )
        model, _ = _load(source, trust, model_arg, weights=weights)
        spec = _checked_spec(source, model, input_shape)  # a shape the card's preprocessing contradicts is refused
        if criterion == "taylor" and not calib:
            raise ConfigError("criterion 'taylor' needs data: pass --calib DATA (or --calib random).")
        with ProgressBars() as bars:
            result = presso.compress(
                model, spec, configs, calib=calib, target=target, recommend=recommend, output_dir=output,
                overwrite=overwrite, progress=bars,
            )  # fmt: skip
        # "seconds" is the final compression's own time; the command's wall time includes loading and any search
        _emit({**result.summary(), "wall_seconds": round(_elapsed(), 1)}, as_json, _render_compress)

    _run(body)


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
        if "latency_ms" in tg:  # a latency budget: what was measured, not a share
            out.print(
                f"target: under {tg['latency_ms']:g} ms on {tg['device']} -> {tg['achieved_ms']:g} ms measured "
                f"(original {tg['original_ms']:g} ms)",
                highlight=False,
            )
        else:
            key = "macs" if "macs" in tg else "params"
            out.print(f"target: keep {tg[key]:.1%} of {key} -> kept {tg['achieved']:.1%}", highlight=False)
        for search in tg["search"]:
            out.print(f"  {search['method']}: {search['knob']} = {search['best_knob']} ({search['why']})")
    took = _duration(s.get("wall_seconds", s["seconds"]))
    out.print(f"saved to [bold]{s['output_dir']}[/bold] in {took} (the whole command)")
