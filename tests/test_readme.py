"""Every command the README shows either runs here -- the same verb and flags on a smaller model, shape, dataset or
epoch count -- or is marked as a benchmark, with the reason and where it is tested. None may crash.

``EXAMPLES`` maps each ``presso ...`` line of the README's ```bash blocks (continuations joined, comments dropped,
``a && b`` split) to what runs here. A new README example fails ``test_every_readme_example_is_run_or_a_benchmark``
until it is added to the table; a variant may only change values, and add the few flags in ``SHRINKING_FLAGS``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DATA = "digits:size=16"  # Fashion-MNIST (a system package) is not assumed; the built-in digits, small, stand in
SHRINKING_FLAGS = {"-s", "--input-shape"}  # a variant may add an input shape to shrink a model's default one


def B(reason: str) -> tuple[str, str]:
    """A README example not run here: too long for the suite on 2 cores; ``reason`` says where it is tested."""
    return ("benchmark", reason)


# README command (as written, after `presso`) -> the variant run here, or a benchmark marker. In run order: an
# example that reads another's output comes after it.
EXAMPLES: dict[str, tuple[str, str]] = {
    "train presso:resnet8 --model-arg in_chans=1 --data fashion-mnist --epochs 20 -o out/fm":
        ("quick", f"train presso:resnet8 --model-arg in_chans=1 --data {DATA} --epochs 1 -o out/fm"),
    "compress torchvision:resnet18 --input-shape 1,3,224,224 --prune-ratio 0.5 --criterion l2 -o out/r18":
        ("quick", "compress torchvision:resnet18 --input-shape 1,3,32,32 --prune-ratio 0.5 --criterion l2 -o out/r18"),
    "info out/r18": ("quick", "info out/r18"),
    "compress timm:vit_tiny_patch16_224 -r 0.3 --attention heads -o out/vit --json":
        ("quick", "compress timm:test_vit -r 0.3 --attention heads -o out/vit --json"),
    "compress my_models.py:build --trust --model-arg num_classes=10 -s 1,3,64,64 --per-layer ratios.yaml "
    "--ignore stem.* -o out/mine":
        ("quick", "compress my_models.py:build --trust --model-arg num_classes=10 -s 1,3,16,16 --per-layer ratios.yaml "
                  "--ignore stem.* -o out/mine"),
    "compress timm:resnet18 -s 1,3,224,224 --criterion taylor --calib images/ -o out/taylor":
        ("quick", "compress timm:test_resnet -s 1,3,32,32 --criterion taylor --calib images/ -o out/taylor"),
    "env": ("quick", "env"),
    "compress torchvision:resnet18 -s 1,3,224,224 --decompose tucker --vbmf-offset 0.2 -o out/tucker":
        ("quick", "compress presso:resnet8 -s 1,3,16,16 --decompose tucker --vbmf-offset 0.2 -o out/tucker"),
    "compress timm:convnext_atto -s 1,3,224,224 --target-macs 0.5 -o out/half":
        ("slow", "compress timm:test_convnext -s 1,3,32,32 --target-macs 0.5 -o out/half"),
    "compress out/fm --target-macs 0.5 --calib fashion-mnist -o out/fm-half":
        ("slow", f"compress out/fm --target-macs 0.5 --calib {DATA} -o out/fm-half"),
    # latency here is MACs / 1e6 ms (``_fake_latency``): deterministic on a shared machine, and a 2 ms budget
    # that the tiny model (3.1 "ms") must be pruned for
    "compress torchvision:mobilenet_v2 -s 1,3,224,224 --target-latency-ms 3 --device local -o out/fast":
        ("slow", "compress presso:resnet8 -s 1,3,16,16 --target-latency-ms 2 --device local -o out/fast"),
    "compress out/fm --target-macs 0.25 --prune-ratio 0.3 --decompose tucker --calib fashion-mnist -o out/fm-quarter":
        ("slow", f"compress out/fm --target-macs 0.25 --prune-ratio 0.3 --decompose tucker --calib {DATA} "
                 "-o out/fm-quarter"),
    "compress out/fm --prune-ratio 0.3 -o out/fm-pruned":
        ("quick", "compress out/fm --prune-ratio 0.3 -o out/fm-pruned"),
    "train out/fm-pruned --teacher out/fm --data fashion-mnist --epochs 5 -o out/fm-kd":
        ("quick", f"train out/fm-pruned --teacher out/fm --data {DATA} --epochs 1 -o out/fm-kd"),
    "train out/fm-pruned --teacher out/fm --data unlabeled:photos/ --epochs 5 -o out/fm-free":
        ("quick", "train out/fm-pruned --teacher out/fm --data unlabeled:photos/ --epochs 1 -o out/fm-free"),
    "eval out/fm-kd --data fashion-mnist --teacher out/fm --json":
        ("quick", f"eval out/fm-kd --data {DATA} --teacher out/fm --json"),
    "train out/fm --sparsity 50 --sparsity-ratio 0.3 --data fashion-mnist --epochs 3 -o out/fm-sparse":
        ("quick", f"train out/fm --sparsity 50 --sparsity-ratio 0.3 --data {DATA} --epochs 1 -o out/fm-sparse"),
    "compress out/fm-sparse --prune-ratio 0.3 --criterion l2 -o out/fm-cut":
        ("quick", "compress out/fm-sparse --prune-ratio 0.3 --criterion l2 -o out/fm-cut"),
    "convert out/fm-kd -p int8 --calib fashion-mnist -o out/fm-int8":
        ("quick", f"convert out/fm-kd -p int8 --calib {DATA} -o out/fm-int8"),
    "package out/fm-int8 -o out/fm.zip": ("quick", "package out/fm-int8 -o out/fm.zip"),
    "predict out/fm.zip shirt.png --top-k 3": ("quick", "predict out/fm.zip shirt.png --top-k 3"),
    "train out/fm-kd --qat --data fashion-mnist --epochs 2 -o out/fm-qat":
        ("quick", f"train out/fm-kd --qat --data {DATA} --epochs 1 -o out/fm-qat"),
    "convert out/fm-qat -p int8 -o out/fm-qat-int8": ("quick", "convert out/fm-qat -p int8 -o out/fm-qat-int8"),
    "convert out/fm-kd --to litert -p int8 --calib fashion-mnist -o out/fm-tflite":
        ("quick", f"convert out/fm-kd --to litert -p int8 --calib {DATA} -o out/fm-tflite"),
    "benchmark out/fm-tflite --runtime litert": ("quick", "benchmark out/fm-tflite --runtime litert"),
    "search --data fashion-mnist --latency-ms 0.5 --trials 20 -o out/search": B(
        "20 trials of proxy training after profiling the device; small searches run in tests/search/test_search.py"
    ),
    "run --data fashion-mnist --model out/fm --latency-ms 0.2 -o out/run": B(
        "the whole pipeline (training, search, recovery, INT8, measurement); small runs in tests/test_pipeline.py"
    ),
    # detection: the same flows, on shapes-det and a tiny YOLO, in tests/tasks/test_detect.py (train, compress --calib
    # to half the MACs, KD, label-free, eval --json) and tests/convert/test_detect_bundle.py (convert, package, predict)
    "train ultralytics:yolov8n.yaml --model-arg ch=1 --data fashion-scenes --epochs 30 -o out/det": B(
        "30 epochs of YOLOv8n on fashion-scenes; tests/tasks/test_detect.py trains a tiny YOLO on shapes-det"),
    "compress out/det --target-macs 0.5 --calib fashion-scenes -o out/det-half": B(
        "reads out/det; tests/tasks/test_detect.py (test_the_task_distance_chooses_a_better_allocation_than_no_data)"),
    "train out/det-half --teacher out/det --data fashion-scenes --epochs 10 -o out/det-kd": B(
        "reads out/det; tests/tasks/test_detect.py (test_kd_recovers_the_pruned_yolo_within_bounds_of_the_original)"),
    "eval out/det-kd --data fashion-scenes --json": B(
        "reads out/det-kd; tests/tasks/test_detect.py (test_presso_eval_prints_map_keys_as_json)"),
    "convert out/det-kd -p int8 --calib fashion-scenes -o out/det-int8": B(
        "reads out/det-kd; tests/convert/test_detect_bundle.py (test_int8_cli_reports_map_within_the_bound)"),
    "package out/det-int8 -o out/det.zip": B(
        "reads out/det-int8; tests/convert/test_detect_bundle.py packages a converted detector"),
    "predict out/det.zip scene.png --save drawn/": B(
        "reads out/det.zip; tests/convert/test_detect_bundle.py (test_save_draws_the_boxes_and_never_overwrites...)"),
    "torchrun --standalone --nproc-per-node 2 -m presso train presso:resnet8 --data digits -o out/ddp": B(
        "two processes training together; tests/cli/test_train.py (test_torchrun_two_gloo_processes_train_like_one)"
    ),
}  # fmt: skip


def readme_examples(text: str) -> list[str]:
    """The commands of the README's ```bash blocks, as written after ``presso`` (``torchrun`` lines whole)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word != "&&":
                    command.append(word)
                    continue
                if command and Path(command[0]).name in ("presso", "torchrun"):
                    name = Path(command[0]).name
                    out.append(" ".join(command[1:] if name == "presso" else [name, *command[1:]]))
                command = []
    return out


def _flags(command: str) -> list[str]:
    return sorted(w for w in shlex.split(command) if w.startswith("-"))


def test_every_readme_example_is_run_or_a_benchmark():
    examples = readme_examples(README.read_text())
    assert len(examples) >= 20  # the parser found the blocks
    missing = [e for e in examples if e not in EXAMPLES]
    assert not missing, f"README examples neither run in tests/test_readme.py nor marked as a benchmark: {missing}"
    stale = [e for e in EXAMPLES if e not in examples]
    assert not stale, f"tests/test_readme.py lists commands the README no longer shows: {stale}"
    for example, (kind, variant) in EXAMPLES.items():
        assert kind in ("quick", "slow", "benchmark"), example
        if kind == "benchmark":
            assert "test" in variant, f"say where '{example}' is tested instead"
            continue
        readme_words, words = shlex.split(example), shlex.split(variant)
        assert words[0] == readme_words[0], f"'{variant}' runs another verb than '{example}'"
        extra = set(_flags(variant)) - set(_flags(example))
        assert _flags(example) == sorted(f for f in _flags(variant) if f not in extra), example
        assert extra <= SHRINKING_FLAGS, f"'{variant}' adds flags {extra - SHRINKING_FLAGS} to the README's"


# ----------------------------------------------------------------------------- running the variants
MY_MODELS = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.body(self.stem(x))).mean((2, 3)))

def build(num_classes=10):
    return Net(num_classes)
"""


def _images(folder: Path, n: int, classes: tuple[str, ...] = ()) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        where = folder / classes[i % len(classes)] if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(where / f"{i}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The files the README's examples name (my_models.py, ratios.yaml, images/, photos/, shirt.png), and out/fm
    trained by the README's first training command (variant), which later examples read."""
    from PIL import Image

    root = tmp_path_factory.mktemp("readme")
    (root / "my_models.py").write_text(MY_MODELS)
    (root / "ratios.yaml").write_text("body.0: 0.5\n")
    _images(root / "images", 16, classes=("a", "b"))
    _images(root / "photos", 16)
    Image.fromarray(np.full((28, 28, 3), 128, dtype=np.uint8)).save(root / "shirt.png")
    first = next(e for e, (kind, _) in EXAMPLES.items() if e.startswith("train presso:resnet8"))
    _run(root, EXAMPLES[first][1])
    return root


def _fake_latency(monkeypatch) -> None:
    from presso.compress import choose
    from presso.models.figures import model_figures

    monkeypatch.setattr(choose._Meter, "ms", lambda self, model: model_figures(model, self.inputs)["macs"] / 1e6)


def _run(root: Path, variant: str):
    import os

    from typer.testing import CliRunner

    from presso.cli import app

    old = os.getcwd()
    os.chdir(root)  # the README's relative paths (out/..., images/, shirt.png) are relative to where it runs
    try:
        res = CliRunner().invoke(app, shlex.split(variant))
    finally:
        os.chdir(old)
    assert res.exit_code == 0 and "internal error" not in res.output, f"presso {variant}\n{res.output}"
    return res


def _run_all(kind: str, workdir: Path, monkeypatch) -> list[str]:
    _fake_latency(monkeypatch)
    ran = []
    for example, (k, variant) in EXAMPLES.items():
        if k == kind and not (kind == "quick" and example.startswith("train presso:resnet8")):  # the fixture ran it
            _run(workdir, variant)
            ran.append(variant)
    return ran


def test_readme_quick_examples_run(workdir, monkeypatch, home):
    ran = _run_all("quick", workdir, monkeypatch)
    assert len(ran) >= 14
    for out in ("r18", "vit", "mine", "taylor", "tucker", "fm-pruned", "fm-kd", "fm-free", "fm-int8"):
        assert (workdir / "out" / out).is_dir(), out
    assert (workdir / "out" / "fm.zip").is_file()


def test_readme_search_examples_run(workdir, monkeypatch, home):
    """The examples that search a budget: minutes at the README's sizes, tens of seconds here (a slow test)."""
    ran = _run_all("slow", workdir, monkeypatch)
    assert len(ran) == 4
    for out in ("half", "fm-half", "fast", "fm-quarter"):
        assert (workdir / "out" / out / "presso.json").is_file(), out
