"""Compressor: structured pruning and low-rank decomposition of any PyTorch model.

``compress(model, example_inputs, config)`` looks the implementation up by the config's type, runs it on a copy of
the model, and returns the smaller model with its figures and the recipe step that reproduces it. A list of configs
runs in the order given, one recipe step each; ``[PruneConfig(...), DecomposeConfig(...)]`` (prune, then decompose
what remains) is the order the CLI uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from presso.compress.decompose import DecomposeConfig
from presso.compress.engine import CompressResult, apply, as_inputs, layer_channels, register_method
from presso.compress.prune import PruneConfig, load_layer_file
from presso.compress.target import Target
from presso.models.spec import InputSpec
from presso.progress import ProgressCallback, reporter

if TYPE_CHECKING:
    from presso.data import DataBundle

__all__ = [
    "CompressResult",
    "DecomposeConfig",
    "PruneConfig",
    "Target",
    "compress",
    "layer_channels",
    "load_layer_file",
    "register_method",
]

Config = PruneConfig | DecomposeConfig


def compress(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple | InputSpec | str,
    config: Config | list[Config],
    *,
    calib: str | Path | DataBundle | Iterable[torch.Tensor] | None = None,
    inplace: bool = False,
    target: Target | None = None,
    recommend: bool | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> CompressResult:
    """Compress `model` as `config` says.

    example_inputs: a tensor, a tuple of tensors, or an input spec such as ``"1,3,224,224"``.
    config: a PruneConfig, a DecomposeConfig, or a list of them (applied in order).
    calib: calibration data, for ``taylor`` and for choosing per-layer ratios under a target: a data spec
        (``"digits"``, a folder, ``"random"``; see ``presso.load_data``) or a ``DataBundle`` -- 128 images,
        normalised by the model's recorded preprocessing, as ``presso convert --calib`` reads them
        (``presso.data.model_calibration_batches``) -- or an iterable of ready input batches.
    target: keep this share of MACs or parameters (or a latency); the methods in `config` are searched for it (the
        given ratio or ranks are then starting points, per-layer values set by the user are kept).
    recommend: under a target, choose the pruning ratio of each layer: with ``calib``, the best of several
        allocations judged by their output after BatchNorm re-estimation on that data (EagleEye); under a latency
        target or ``Target(device=...)``, the best of allocations weighted by measured time per MAC; otherwise by
        LAMP scores. Default: on given ``calib`` or a device, else off (one uniform ratio: LAMP alone lost to it,
        docs/benchmarks.md). Without a target, ``recommend=True`` spreads each PruneConfig's ratio (as the share
        of all channels) over the layers by LAMP scores (weighted by measured sensitivity when ``calib`` is given).
    inplace: modify `model` itself instead of a copy.
    output_dir: save the compressed model there as a Presso model directory, with the per-layer values it used
        (``per_layer.yaml``, ``ranks.yaml``) beside it to edit and feed back; a non-empty folder is refused
        unless ``overwrite`` (``presso.outdir``), and the folder the model was loaded from always is.
    progress: called with a ``ProgressEvent`` per step (stage ``compress``, or ``search`` under a target; ``save``).
    """
    if output_dir is not None:  # refused before the work, not after it
        _check_output(model, Path(output_dir), overwrite)
    inputs = as_inputs(example_inputs)
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    data = _calibration(model, inputs, calib, reporter(progress, "calibration data"))
    if target is not None:
        from presso.compress.budget import compress_to_target

        prune = next((c for c in configs if isinstance(c, PruneConfig)), None)
        decomp = next((c for c in configs if isinstance(c, DecomposeConfig)), None)
        result = compress_to_target(model, inputs, target, prune=prune, decompose=decomp, recommend=recommend,
                                    data=data, progress=reporter(progress, "search"))  # fmt: skip
    else:
        if recommend:
            configs = [_recommended(model, inputs, c, data) for c in configs]
        result = apply(model, inputs, configs, data=data, progress=reporter(progress, "compress"), inplace=inplace)
    if output_dir is not None:
        result = _save(result, inputs, example_inputs, Path(output_dir), overwrite, reporter(progress, "save"))
    return result


def _calibration(model: nn.Module, inputs: tuple, calib, report) -> list[torch.Tensor] | None:
    """Calibration batches from whatever ``calib`` is: data is named the same way in every verb."""
    if calib is None:
        return None
    from presso.data import DataBundle, model_calibration_batches  # lazily: compressing without data reads none

    if not isinstance(calib, (str, Path, DataBundle)):
        return list(calib)
    report(0, 1)
    batches = model_calibration_batches(model, calib, InputSpec.from_tensors(inputs), batches=4, batch_size=32)
    report(1, 1)
    return batches


def _check_output(model: nn.Module, output_dir: Path, overwrite: bool) -> None:
    import presso.outdir as outdir
    from presso.models.card import get_card

    card = get_card(model)
    outdir.check(output_dir, overwrite=overwrite, sources=[card.source.get("code_from") if card else None])


def _save(result: CompressResult, inputs, example_inputs, output_dir: Path, overwrite: bool, report) -> CompressResult:
    """Save the compressed model and its per-layer files as one model directory (written atomically)."""
    from presso.compress.layer_files import per_layer_files
    from presso.models.directory import save_model_dir

    spec = example_inputs if isinstance(example_inputs, (str, InputSpec)) else InputSpec.from_tensors(inputs)
    files = per_layer_files(result)
    report(0, 1)
    save_model_dir(result.model, output_dir, input_spec=spec, extra_files=files, overwrite=overwrite)
    report(1, 1)
    return dataclasses.replace(result, output_dir=output_dir, files=sorted(files))


def _recommended(model, inputs, config, data):
    """A PruneConfig whose global ratio is spread over layers by LAMP scores (the user's per-layer values win)."""
    if not isinstance(config, PruneConfig) or config.ratio is None or config.criterion == "index":
        return config
    from presso.compress.recommend import lamp_scores

    ratios = lamp_scores(model, inputs, data=data).ratios(config.ratio)
    return dataclasses.replace(config, ratio=None, per_layer={**ratios, **config.per_layer})


from presso._verbs import callable_package  # noqa: E402

callable_package(__name__, compress)
