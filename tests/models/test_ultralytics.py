"""Ultralytics YOLO models as Presso sources (``ultralytics:NAME``): the source and its dense eval output, the
data-only YAML check, trusted checkpoints, and structural pruning that keeps C2f/C3k2 splits, concats and the Detect
head's fixed layers consistent -- pruned models run at two sizes, reload bit-identically and export to ONNX.

``python tests/models/test_ultralytics.py [NAME ...]`` runs the whole pipeline over every architecture of the survey
(or the names given) and prints the table of docs/ultralytics.md and the SUPPORTED/UNSUPPORTED dicts.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ultralytics")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import presso  # noqa: E402
from presso.compress import PruneConfig, Target  # noqa: E402
from presso.compress.prune.pruner import _signature  # noqa: E402
from presso.errors import ModelSourceError, PressoError, UntrustedFileError  # noqa: E402
from presso.models import ultralytics as uy  # noqa: E402
from presso.models.card import get_card  # noqa: E402
from presso.models.figures import count_macs, count_params  # noqa: E402
from presso.models.onnx import compare_outputs, export_onnx, run_onnx, session, torch_outputs  # noqa: E402
from presso.testing.yolo import tiny_yolo_yaml  # noqa: E402

# YOLOv8's layout at 1/8 of the nano width, written from the installed Ultralytics (presso.testing.yolo)
TINY = tiny_yolo_yaml(tempfile.mkdtemp(prefix="presso-tiny-yolo-"))
ONNX_RTOL = 1e-4  # largest ONNX Runtime vs PyTorch difference, relative to the largest output value
SIZE, SIZE2 = 64, 128  # traced size, and another one (both multiples of the P6 models' stride 64)
# The survey: the smallest variant of every detect/seg/pose/cls/obb YAML Ultralytics 8.4.190 ships for the families
# yolov3u/v5u/v6/v8/v9/v10/11/12/26 and RT-DETR (plus the depth and semantic YAMLs of YOLO26).
SURVEY = [
    "yolov3-tiny.yaml", "yolov5n.yaml", "yolov5n-p6.yaml", "yolov6n.yaml",
    "yolov8n.yaml", "yolov8n-p2.yaml", "yolov8n-p6.yaml", "yolov8n-ghost.yaml", "yolov8n-ghost-p2.yaml",
    "yolov8n-ghost-p6.yaml", "yolov8n-seg.yaml", "yolov8n-seg-p6.yaml", "yolov8n-pose.yaml", "yolov8n-pose-p6.yaml",
    "yolov8n-cls.yaml", "yolov8n-obb.yaml", "yolov8-cls-resnet50.yaml", "yolov8n-rtdetr.yaml", "yolov8n-world.yaml",
    "yolov8n-worldv2.yaml", "yoloe-v8n.yaml", "yoloe-v8n-seg.yaml",
    "yolov9t.yaml", "yolov9c-seg.yaml", "yolov10n.yaml",
    "yolo11n.yaml", "yolo11n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-cls.yaml", "yolo11n-obb.yaml",
    "yolo11-cls-resnet18.yaml", "yoloe-11n.yaml", "yoloe-11n-seg.yaml",
    "yolo12n.yaml", "yolo12n-seg.yaml", "yolo12n-pose.yaml", "yolo12n-cls.yaml", "yolo12n-obb.yaml",
    "yolo26n.yaml", "yolo26n-seg.yaml", "yolo26n-pose.yaml", "yolo26n-cls.yaml", "yolo26n-obb.yaml",
    "yolo26n-p2.yaml", "yolo26n-p6.yaml", "yolo26n-depth.yaml", "yolo26n-sem.yaml", "yoloe-26n.yaml",
    "yoloe-26n-seg.yaml", "rtdetr-l.yaml",
]  # fmt: skip


def _src(name: str) -> str:
    return f"ultralytics:{name}"


def _x(size: int = SIZE, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size + n))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _fixed_layers(model: nn.Module) -> dict[str, tuple]:
    """What pruning must leave alone in a YOLO head: the DFL's fixed bins, and the channels of the last layer of every
    output branch (box 4 x reg_max, classes, mask coefficients, keypoints, angles) and of the classifier."""
    head = model.model[-1]
    fixed = {}
    if isinstance(getattr(head, "dfl", None), nn.Module) and hasattr(head.dfl, "conv"):
        fixed["dfl"] = (tuple(head.dfl.conv.weight.shape), head.dfl.conv.weight.detach().flatten().tolist())
    for attr, branches in vars(head)["_modules"].items():
        for i, branch in enumerate(branches if isinstance(branches, nn.ModuleList) else []):
            last = branch[-1] if isinstance(branch, nn.Sequential) else branch
            if type(last) is nn.Conv2d:  # a bare convolution ends an output branch (Ultralytics' Conv blocks do not)
                fixed[f"{attr}.{i}"] = (last.out_channels,)
    if isinstance(getattr(head, "linear", None), nn.Linear):
        fixed["linear"] = (head.linear.out_features,)
    return fixed


def _onnx_outputs(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[list, list]:
    export_onnx(model, (x,), path)
    ref, got = torch_outputs(model, (x,)), run_onnx(session(path), (x,))
    if type(model.model[-1]).__name__ == "RTDETRDecoder":
        # RT-DETR outputs its top-scoring queries, in score order: queries with tied scores (random weights have
        # many) may come in another order from ONNX Runtime. Compared as sets of rows.
        ref, got = ([a[0][0][np.lexsort(np.round(a[0][0], 4).T[::-1])][None]] for a in (ref, got))
    return ref, got


def pipeline(name: str, tmp: Path) -> dict:
    """Load, prune 50% (l2), run at two sizes (and in train mode), save + reload bit-identical, ONNX matches; the
    figures measured."""
    t0 = time.perf_counter()
    model = presso.load_model(_src(name), num_classes=3)
    x, x2 = _x(), _x(SIZE2)
    with torch.no_grad():
        ref, ref2 = _signature(model(x)), _signature(model(x2))
    fixed = _fixed_layers(model)
    result = presso.compress(model, f"1,3,{SIZE},{SIZE}", PruneConfig(ratio=0.5))
    pruned = result.model
    macs = count_macs(model, (x,)), count_macs(pruned, (x,))
    assert macs[1] <= 0.6 * macs[0], (macs, result.skipped)
    assert _fixed_layers(pruned) == fixed
    with torch.no_grad():
        assert _signature(pruned(x)) == ref and _signature(pruned(x2)) == ref2
        copy.deepcopy(pruned).train()(_x(n=2))  # training-only layers were pruned alike: a training step can run
    presso.save_model_dir(pruned, tmp / "m")
    loaded = presso.load_model(str(tmp / "m"))
    with torch.no_grad():
        assert _same(pruned(x), loaded(x)) and _same(pruned(x2), loaded(x2))
    a, b = pruned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diff = compare_outputs(*map(lambda o: [o], _onnx_outputs(pruned, x, tmp / "m.onnx")))
    assert diff.max_rel_diff < ONNX_RTOL, diff
    return {"name": name, "params": count_params(model), "macs": macs[0], "macs_kept": round(macs[1] / macs[0], 3),
            "params_kept": round(count_params(pruned) / count_params(model), 3), "skipped": len(result.skipped),
            "onnx_rel_diff": diff.max_rel_diff, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


# --------------------------------------------------------------------------- the source
def test_source_maps_num_classes_and_gives_the_dense_eval_output():
    model = presso.load_model("ultralytics:yolov8n.yaml", num_classes=3)
    head = model.model[-1]
    assert type(model).__name__ == "DetectionModel" and head.nc == 3 and head.reg_max == 16
    assert get_card(model).source == {"source": "ultralytics:yolov8n.yaml", "kwargs": {"num_classes": 3},
                                      "weights": "random init"}  # fmt: skip
    with torch.no_grad():
        y = model(_x(n=2))
    anchors = 8 * 8 + 4 * 4 + 2 * 2  # strides 8, 16, 32 at 64 px
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4 + 3, anchors)
    assert (y[:, 2:4] > 0).all() and ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all()  # widths, heights; probabilities
    model.train()
    raw = model(_x(n=2))
    assert raw["boxes"].shape == (2, 4 * 16, anchors) and raw["scores"].shape == (2, 3, anchors)
    same = presso.load_model("ultralytics:yolov8n", nc=3, ch=1)  # Ultralytics' own word; no suffix; one channel
    assert same.model[-1].nc == 3 and same.model[0].conv.in_channels == 1
    assert same(torch.zeros(1, 1, 64, 64)).shape == (1, 7, anchors)


def test_scale_comes_from_the_name_and_bad_names_and_arguments_are_one_line():
    small = presso.load_model("ultralytics:yolov8s.yaml", num_classes=3)
    nano = presso.load_model("ultralytics:yolov8n.yaml", num_classes=3)
    assert count_params(small) > 3 * count_params(nano)
    with pytest.raises(ModelSourceError, match="no model YAML 'yolov8q.yaml'.*Did you mean"):
        presso.load_model("ultralytics:yolov8q.yaml")
    assert count_params(presso.load_model("ultralytics:yolov8n.yaml", num_classes=3, scale="s")) == count_params(
        small
    )  # a scale letter of the YAML
    tiny = presso.load_model("ultralytics:yolov8n.yaml", num_classes=3, scale=[0.33, 0.0625, 1024], reg_max=8)
    assert count_params(tiny) == 230_217 and tiny.model[-1].reg_max == 8  # or [depth, width, max_channels]
    with pytest.raises(ModelSourceError, match="takes the model arguments num_classes, nc, ch, scale, reg_max, not"):
        presso.load_model("ultralytics:yolov8n.yaml", width=0.5)
    with pytest.raises(ModelSourceError, match=r"scale must be a scale letter or \[depth, width, max_channels\]"):
        presso.load_model("ultralytics:yolov8n.yaml", scale=[0.33, 0.25])
    with pytest.raises(ModelSourceError, match="has no scale 'q'"):
        presso.load_model("ultralytics:yolov8n.yaml", scale="q")
    with pytest.raises(ModelSourceError, match="num_classes=3 and nc=4 disagree"):
        presso.load_model("ultralytics:yolov8n.yaml", num_classes=3, nc=4)
    with pytest.raises(ModelSourceError, match="ch must be an integer from 1 to 64"):
        presso.load_model("ultralytics:yolov8n.yaml", ch=0)


def test_without_the_package_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics.nn.tasks", None)  # what an import finds when it is not installed
    with pytest.raises(ModelSourceError) as e:
        presso.load_model("ultralytics:yolov8n.yaml")
    assert str(e.value) == 'ultralytics:yolov8n.yaml needs the optional extra: pip install "presso[yolo]"'


# --------------------------------------------------------------------------- the YAML is data only
def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


HOSTILE = TINY.read_text().replace("  - [-1, 1, SPPF, [1024, 5]] # 9", "  - [-1, 1, {name}, ['weights.pt']] # 9")


@pytest.mark.parametrize(
    "name", ["torch_safe_load", "load_checkpoint", "attempt_load_weights", "nn.functional", "torchvision.ops.nms"]
)
def test_a_row_naming_anything_but_a_building_block_needs_trust(tmp_path, monkeypatch, name):
    import ultralytics.nn.tasks as tasks

    calls = []  # Ultralytics' parse_model would call tasks.<name>(...): these unpickle the file they are given
    for fn in ("torch_safe_load", "load_checkpoint", "attempt_load_weights"):
        monkeypatch.setattr(tasks, fn, lambda *a, **k: calls.append(a), raising=False)
    path = _yaml(tmp_path, HOSTILE.format(name=name))
    with pytest.raises(UntrustedFileError) as e:
        presso.load_model(f"ultralytics:{path}")
    assert f"'{path}', backbone row 9 ([-1, 1, '{name}', ['weights.pt']])" in str(e.value)
    assert "not an Ultralytics building block" in str(e.value) and "--trust" in str(e.value)
    assert calls == []


def test_trust_hands_the_yaml_to_ultralytics_and_its_failure_is_one_line(tmp_path):
    path = _yaml(tmp_path, HOSTILE.format(name="nn.functional"))  # a torch module that is not a layer
    with pytest.raises(ModelSourceError, match=r"Ultralytics could not build .*TypeError: 'module' object"):
        presso.load_model(f"ultralytics:{path}", trust=True)


def test_an_activation_that_is_not_a_plain_layer_needs_trust(tmp_path):
    marker = tmp_path / "ran"
    path = _yaml(tmp_path, f"activation: __import__('pathlib').Path('{marker}').touch()\n" + TINY.read_text())
    with pytest.raises(UntrustedFileError, match="is not a plain nn.X\\(...\\) call, and Ultralytics runs it"):
        presso.load_model(f"ultralytics:{path}")
    assert not marker.exists()
    relu_yaml = _yaml(tmp_path, "activation: nn.ReLU()\n" + TINY.read_text())
    relu = presso.load_model(f"ultralytics:{relu_yaml}")
    assert isinstance(relu.model[0].act, nn.ReLU)


SPPF_ROW = "[-1, 1, SPPF, [1024, 5]]"


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("nc: 3", "nc: 3\nextra: 1", "unknown key 'extra'; an Ultralytics model YAML has"),
        ("nc: 3", "nc: three", "'nc' must be int"),
        (
            SPPF_ROW,
            "[-1, 1, SPPF]",
            r"backbone row 9 \(\[-1, 1, 'SPPF'\]\): a row must be \[from",
        ),
        (SPPF_ROW, "[-1, 1, SPPF, [{a: 1}]]", "backbone row 9 .*'args' must be a list of plain values"),
        (SPPF_ROW, "[-1, 1000, SPPF, [1024, 5]]", "backbone row 9 .*'repeats' must be an integer from 1 to 64"),
        (SPPF_ROW, "[x, 1, SPPF, [1024, 5]]", "backbone row 9 .*'from' must be a layer index"),
        (None, "\nhead: 7\n", "'head' must be a non-empty list"),
    ],
    ids=["unknown-key", "nc", "row-length", "args", "repeats", "from", "head"],
)
def test_malformed_yaml_is_a_model_source_error_naming_the_key_or_row(tmp_path, old, new, message):
    text = TINY.read_text()
    path = _yaml(tmp_path, text.replace(old, new) if old else text.split("\nhead:")[0] + new)
    with pytest.raises(ModelSourceError, match=message):
        presso.load_model(f"ultralytics:{path}")


def test_a_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path):
    with pytest.raises(ModelSourceError, match="is not valid YAML"):
        presso.load_model(f"ultralytics:{_yaml(tmp_path, 'a: [1, 2')}")
    with pytest.raises(ModelSourceError, match="must be a mapping with 'backbone' and 'head' rows"):
        presso.load_model(f"ultralytics:{_yaml(tmp_path, '- 1')}")
    with pytest.raises(ModelSourceError, match="does not exist"):
        presso.load_model(f"ultralytics:{tmp_path / 'missing.yaml'}")


# --------------------------------------------------------------------------- the tiny YOLO and model directories
def test_the_tiny_yolo_loads_without_trust_and_travels_in_its_card(tmp_path):
    own = tmp_path / "yolov8-tiny.yaml"
    own.write_text(TINY.read_text())
    model = presso.load_model(f"ultralytics:{own}", num_classes=3)
    x = _x()
    assert count_params(model) == 348_865 and count_macs(model, (x,)) == 10_030_208  # docs/ultralytics.md
    card = get_card(model).source
    assert card["yaml"]["scale"] == "t" and card["yaml"]["backbone"][0] == [-1, 1, "Conv", [64, 3, 2]]
    presso.save_model_dir(model, tmp_path / "m")
    own.unlink()  # the directory holds the architecture itself
    loaded = presso.load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # a card's YAML is checked like a file: a hostile row there is refused too
    saved = json.loads((tmp_path / "m" / "presso.json").read_text())
    saved["source"]["yaml"]["head"][0][2] = "attempt_load_weights"
    (tmp_path / "m" / "presso.json").write_text(json.dumps(saved))
    with pytest.raises(UntrustedFileError, match="recorded in the card .* head row 0"):
        presso.load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("ema", [True, False])
def test_a_trusted_ultralytics_checkpoint_gives_its_ema_in_float(tmp_path, ema):
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return presso.load_model(f"ultralytics:{TINY}", num_classes=3)

    model, average = build(1), build(2)
    ckpt = {"model": copy.deepcopy(model).half(), "ema": copy.deepcopy(average).half() if ema else None,
            "train_args": {"imgsz": 64}, "epoch": 3}  # fmt: skip
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises(UntrustedFileError, match="full pickle"):
        presso.load_model(tmp_path / "best.pt")
    loaded = presso.load_model(tmp_path / "best.pt", trust=True)
    assert next(loaded.parameters()).dtype == torch.float32
    expected = (average if ema else model).half().float()
    with torch.no_grad():
        y = loaded(_x())
        assert y.shape == (1, 7, 84) and torch.equal(y, expected(_x()))
    # its card names the checkpoint's own (checked) YAML: the model directory needs neither the pickle nor trust
    card = get_card(loaded).source
    assert card["source"] == "ultralytics:yolov8-tiny.yaml" and card["weights"]["sha256"] and "yaml" in card
    presso.save_model_dir(loaded, tmp_path / "m")
    (tmp_path / "best.pt").unlink()
    with torch.no_grad():
        assert torch.equal(presso.load_model(str(tmp_path / "m"))(_x()), y)


# --------------------------------------------------------------------------- pruning
def _zero_pruned_channels(model: nn.Module, ops: list[dict]) -> None:
    """Zero, in ``model``, the output channels a pruning removed: they then contribute nothing, so removing them
    must leave every output unchanged -- if, and only if, the pruning removed the same channels everywhere."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for op in ops:
            if op.get("op") != "prune" or op["fn"] != "prune_out_channels" or op["kind"] != "module":
                continue
            layer, idx = layers[op["target"]], torch.tensor(op["idxs"])
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight[idx], layer.bias[idx] = 0, 0
            elif isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
                layer.weight[(slice(None), idx) if isinstance(layer, nn.ConvTranspose2d) else idx] = 0
                if layer.bias is not None:
                    layer.bias[idx] = 0


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
    model.train(train)
    with torch.no_grad():
        out = model(x)

    def leaves(o):
        if isinstance(o, torch.Tensor):
            return [o]
        if isinstance(o, dict):  # 'feats' are the pruned inner features, not outputs
            return [t for k in sorted(o) if k != "feats" for t in leaves(o[k])]
        return [t for v in o for t in leaves(v)] if isinstance(o, (list, tuple)) else []

    return leaves(out)


@pytest.mark.parametrize("name", [f"{TINY}", "yolo11n.yaml", "yolo26n-pose.yaml"], ids=["C2f", "C3k2+C2PSA", "yolo26"])
def test_pruning_removes_the_same_channels_everywhere(name):
    """C2f/C3k2 halves, their residual adds and concats, YOLO26's one-to-one head (which eval mode computes but does
    not output) and its training-only keypoint sigmas all lose the same channels: pruning channels zeroed beforehand
    changes no output, in eval or in train mode."""
    model = presso.load_model(_src(name), num_classes=3)
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # batch norms that are not identities
        bn.running_mean.uniform_(-0.5, 0.5, generator=gen), bn.running_var.uniform_(0.5, 2, generator=gen)
        bn.weight.data.uniform_(0.5, 1.5, generator=gen), bn.bias.data.uniform_(-0.5, 0.5, generator=gen)
    reference = copy.deepcopy(model)
    result = presso.compress(model, f"1,3,{SIZE},{SIZE}", PruneConfig(ratio=0.5))
    assert result.after["macs"] < 0.35 * result.before["macs"]
    _zero_pruned_channels(reference, get_card(result.model).recipe[-1]["ops"])
    x = _x(n=2)
    for train in (False, True):
        for a, b in zip(_outputs(reference, x, train), _outputs(result.model, x, train), strict=True):
            # train mode normalizes by batch statistics of 2 images: rounding differences grow (to ~5e-5)
            tolerance = 1e-3 if train else 1e-4
            assert a.shape == b.shape and (a - b).abs().max() <= tolerance * a.abs().max().clamp(min=1), train


def test_c2f_halves_stay_equal_and_the_head_keeps_its_fixed_layers():
    model = presso.load_model(f"ultralytics:{TINY}", num_classes=3)
    dfl = model.model[-1].dfl.conv.weight.detach().clone()
    pruned = presso.compress(model, "1,3,64,64", PruneConfig(ratio=0.5)).model
    before = [m for m in model.modules() if type(m).__name__ == "C2f"]
    after = [m for m in pruned.modules() if type(m).__name__ == "C2f"]
    assert len(after) == 8
    for block in after:  # cv1's output is chunked into two equal halves; the second feeds the bottlenecks
        half = block.cv1.conv.out_channels // 2
        assert block.m[0].cv1.conv.in_channels == block.m[-1].cv2.conv.out_channels == half
        assert block.cv2.conv.in_channels == (2 + len(block.m)) * half
    assert sum(b.cv1.conv.out_channels for b in after) <= 0.55 * sum(b.cv1.conv.out_channels for b in before)
    head = pruned.model[-1]
    assert torch.equal(head.dfl.conv.weight, dfl) and dfl.flatten().tolist() == list(range(16))
    with torch.no_grad():  # traced at 64 px, runs at any multiple of the largest stride
        assert pruned(_x(160)).shape == model(_x(160)).shape == (1, 4 + 3, 20 * 20 + 10 * 10 + 5 * 5)
    assert [s[-1].out_channels for s in head.cv2] == [64] * 3 and [s[-1].out_channels for s in head.cv3] == [3] * 3


def test_a_macs_target_of_half_lands_within_3_percent():
    model = presso.load_model(f"ultralytics:{TINY}", num_classes=3)
    result = presso.compress(model, "1,3,64,64", PruneConfig(), target=Target(macs=0.5))
    x = _x()
    assert abs(count_macs(result.model, (x,)) / count_macs(model, (x,)) / 0.5 - 1) <= 0.03


def test_cli_compress_writes_a_model_directory_that_reloads(tmp_path):
    from typer.testing import CliRunner

    from presso.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compress", f"ultralytics:{TINY}", "-s", "1,3,64,64", "-r", "0.5", "-o", str(out),
                                   "--model-arg", "num_classes=3", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["macs_after"] < 0.35 * data["macs_before"]
    loaded = presso.load_model(str(out))
    assert loaded(_x()).shape == (1, 7, 84)


# --------------------------------------------------------------------------- the list
@pytest.mark.parametrize(
    "name", [str(TINY), *(pytest.param(n, marks=pytest.mark.slow) for n in uy.SUPPORTED)], ids=lambda n: Path(n).name
)
def test_supported_architecture_prunes_reloads_and_exports(name, tmp_path):
    figures = pipeline(name, tmp_path)
    assert figures["macs_kept"] <= 0.6 and figures["onnx_rel_diff"] < ONNX_RTOL


@pytest.mark.parametrize("name", list(uy.UNSUPPORTED))
def test_unsupported_architecture_is_one_clear_error(name):
    with pytest.raises(PressoError) as e:
        presso.load_model(_src(name), num_classes=3)
    assert uy.UNSUPPORTED[name] in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the survey (docs/ultralytics.md)
def _survey(names: list[str]) -> list[dict]:
    import tempfile

    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rows.append({**pipeline(name, Path(tmp)), "ok": True})
            except Exception as e:  # noqa: BLE001 - each failure is a row of the table
                rows.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    for row in _survey(sys.argv[1:] or SURVEY):
        if row["ok"]:
            print(
                f"| {row['name']} | {row['params'] / 1e6:.2f} M | {row['macs'] / 1e6:.1f} M | {row['macs_kept']:.2f} "
                f"| {row['params_kept']:.2f} | {row['skipped']} | {row['onnx_rel_diff']:.0e} | {row['seconds']} |"
            )
        else:
            print(f"| {row['name']} | {row['error']} |")


@pytest.mark.parametrize(
    ("name", "status", "row"),
    [
        ("yolov8n.yaml", "tested", "yolov8n.yaml"),
        ("yolov8s.yaml", "tested", "yolov8n.yaml"),  # another scale of the same YAML
        ("yolo11x-seg.yaml", "tested", "yolo11n-seg.yaml"),
        ("yolov8s-worldv2.yaml", "refused", "yolov8n-worldv2.yaml"),
        ("rtdetr-x.yaml", "untested", None),  # its own YAML, not rtdetr-l's
        ("path/to/custom.yaml", "untested", None),
    ],
)
def test_support_of_names_the_row_of_the_tested_list(name, status, row):
    from presso.models.ultralytics_support import support_of

    s = support_of({"source": f"ultralytics:{name}", "kwargs": {}})
    assert (s["status"], s["row"]) == (status, row)
    assert s["supported"] == uy.SUPPORTED and s["unsupported"] == uy.UNSUPPORTED
    if status == "refused":
        assert s["note"] == uy.UNSUPPORTED[row]
    assert support_of({"source": "torchvision:resnet18"}) is None
