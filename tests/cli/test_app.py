"""What every command shares (presso.cli.app): one-line errors with exit code 2, and a --help that stays light."""

import subprocess
import sys

import pytest

from presso.cli import app

from ._helpers import runner


@pytest.mark.parametrize(
    "args,message",
    [
        (["compress", "torchvision:resnet1", "-s", "1,3,32,32", "-o", "X"], "Did you mean"),
        (["compress", "torchvision:resnet18", "-s", "1,3,3a,32", "-o", "X"], "Malformed input shape"),
        (["compress", "torchvision:resnet18", "-s", "1,3,32,32", "-r", "1.5", "-o", "X"], "--prune-ratio"),
        (["compress", "torchvision:resnet18", "-s", "1,3,32,32", "--criterion", "taylor", "-o", "X"], "--calib"),
        (["compress", "torchvision:resnet18", "-s", "1,4,32,32", "-o", "X"], "Fix --input-shape"),
        (["info", "torchvision:resnet18"], "--input-shape"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    res = runner.invoke(app, [a.replace("X", str(tmp_path / "o")) for a in args])
    assert res.exit_code == 2
    assert message in res.stderr
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_console_script_help_does_not_import_torch():
    code = (
        "import sys; from presso.cli import app; sys.argv = ['presso', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_cli_help_loads_no_heavy_backend():
    """Every registered verb module stays light: --help imports no runtime, database or search engine."""
    heavy = ("torch", "onnxruntime", "openvino", "optuna", "sqlalchemy", "fastapi", "uvicorn", "matplotlib")
    code = (
        "import sys; from presso.cli import app; sys.argv = ['presso', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_version():
    import presso

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"presso {presso.__version__}"


def test_help_groups_options_in_panels_with_readable_metavars():
    import re

    r = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0
    panels = re.findall(r"╭─ (\w+) ─", r.stdout)
    assert panels == ["Arguments", "Options", "Model", "Data", "Prune", "Decompose", "Target", "Measure", "Output"]
    assert not re.search(r"<(str|int|float|bool|path|list\[str\])>", r.stdout)  # no Python types as placeholders
    for metavar in ("SHAPE", "DIR", "RATIO", "NAME=VALUE", "GLOB", "SHARE"):
        assert metavar in r.stdout
    assert "[out, in]" in r.stdout  # brackets in help texts are text, not Rich markup


def test_device_is_the_benchmark_target_everywhere_and_torch_device_is_torchs():
    """One meaning per flag name: --device names where a model is measured; training's PyTorch device is
    --torch-device."""
    from typer.main import get_command

    def options(cmd, path=()):
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from options(sub, (*path, name))
        for p in getattr(cmd, "params", []):
            yield " ".join(path), p

    found = {(where, p.name): p for where, p in options(get_command(app)) if "--device" in p.opts}
    assert found, "no --device option at all"
    for (where, _name), p in found.items():
        assert "cuda" not in (p.help or "").lower(), where
    train = {o for _, p in options(get_command(app)) if _ == "train" for o in p.opts}
    assert "--torch-device" in train and "--device" not in train


def test_progress_bars_show_time_remaining_and_the_tries_of_a_search():
    import io

    from rich.console import Console

    from presso.cli.app import ProgressBars
    from presso.progress import ProgressEvent

    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False)
    bars = ProgressBars(console=console)
    columns = [type(c).__name__ for c in bars.progress.columns]
    assert "TimeElapsedColumn" in columns and "TimeRemainingColumn" in columns
    with bars:
        bars(ProgressEvent("search", 0, None, {"phase": "measuring the original's latency"}))
        bars(ProgressEvent("search", 7, 16, {"attempt": 7, "tries": 16, "kept": 0.5213, "of": "MACs"}))
        task = bars.progress.tasks[0]
        assert task.description.endswith("try 7/16 — 0.521 of MACs") and task.total == 16
        bars(ProgressEvent("search", 3, 8, {"allocation": "uniform", "candidate": 4, "attempt": 2, "tries": 16,
                                            "kept": 0.49, "of": "MACs", "score": 0.0123}))  # fmt: skip
        assert "allocation 4/8 uniform — try 2/16 — 0.49 of MACs — score 0.0123" in bars.progress.tasks[0].description
        # a stage that starts part-way (a resumed profile) starts its bar there: no jump for the rate to average
        bars(ProgressEvent("profile", 40, 100, {}))
        assert bars.progress.tasks[1].completed == 40 and not bars.progress.tasks[1]._progress
