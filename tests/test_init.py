"""`import presso` stays light: no torch, runtime, server or database until a verb needs it."""

import subprocess
import sys


def test_import_presso_is_light():
    code = (
        "import sys, presso\n"
        "m = presso.load_model('torchvision:resnet18')\n"
        "print(any(k.startswith('onnxruntime') for k in sys.modules), __import__('torch').cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]
    out = subprocess.run(
        [sys.executable, "-c", "import sys, presso; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"


def test_import_presso_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, presso; presso.benchmark; presso.predict_latency; presso.profile_device; "
        "heavy = [m for m in ('onnxruntime', 'fastapi', 'sqlalchemy', 'torch', 'uvicorn') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
