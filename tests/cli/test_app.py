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
