"""`import presso` stays light: no torch, runtime, server or database until a verb needs it."""

import subprocess
import sys


def _run(code: str) -> str:
    """What a fresh interpreter prints after running `code` (a clean sys.modules, unlike this test process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_presso_is_light():
    out = _run(
        "import sys, presso\n"
        "m = presso.load_model('torchvision:resnet18')\n"
        "print(any(k.startswith('onnxruntime') for k in sys.modules), __import__('torch').cuda.is_initialized())"
    )
    assert out.split()[-2:] == ["False", "False"]
    assert _run("import sys, presso; print('torch' in sys.modules)").strip() == "False"


def test_import_presso_stays_light():
    out = _run(
        "import sys, presso; presso.benchmark; presso.predict_latency; presso.profile_device; "
        "heavy = [m for m in ('onnxruntime', 'fastapi', 'sqlalchemy', 'torch', 'uvicorn') if m in sys.modules]; "
        "print(heavy)"
    )
    assert out.strip() == "[]"
