"""OpenVINO IR (``model.xml`` + ``model.bin``) from the project's ONNX file, with the ``openvino`` package.

FP32 and FP16 convert the FP32 ONNX model (FP16 compresses the weights, as OpenVINO's own tools do). INT8 converts
the QDQ ONNX model that automatic precision produced: OpenVINO reads QuantizeLinear/DequantizeLinear pairs as
FakeQuantize and runs those layers in int8, so both runtimes get the same quantization, fallbacks included, from one
calibration -- which is why NNCF is not a dependency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from presso.errors import ConversionError


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ConversionError("OpenVINO export needs the openvino package: pip install openvino") from None
    return ov


def to_openvino(onnx_path: str | Path, out_dir: str | Path, *, fp16_weights: bool = False) -> Path:
    ov = _openvino()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:
        raise ConversionError(f"OpenVINO could not read {onnx_path}: {str(e).splitlines()[0][:300]}") from None
    xml = out_dir / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=fp16_weights)
    return xml


class OpenVINORunner:
    """Run an IR on OpenVINO's CPU plugin, in FP32 arithmetic unless asked otherwise (some CPUs default to bf16)."""

    def __init__(self, xml: str | Path, *, exact: bool = True, threads: int | None = None):
        ov = _openvino()
        config = {"INFERENCE_PRECISION_HINT": "f32"} if exact else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, inputs: tuple) -> list[np.ndarray]:
        feed = [t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t) for t in inputs]
        result = self.request.infer(feed)
        return [np.asarray(result[o]) for o in self.compiled.outputs]
