"""Quantization-aware structure: fake quantization that is, op for op, the INT8 graph ONNX Runtime runs.

``prepare_qat`` changes a model (in place) into its QAT form, and returns the recipe step that rebuilds that form on
load (``@register_replay("qat")``):

* **BatchNorm folded** into the convolution before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``), the BatchNorm
  replaced by ``nn.Identity``: ONNX Runtime folds it the same way before it quantizes, so the weights fake-quantized
  here are the weights it quantizes (BatchNorm statistics are frozen for the fine-tune). A fold is kept only when
  the model's output is unchanged by it (a convolution whose output also feeds something besides its BatchNorm
  cannot be folded, by ONNX Runtime either);
* **weights** of every ``Conv1d/2d/3d`` and ``Linear``: per-output-channel symmetric int8 with ONNX Runtime's scale
  (``max|w| / 127``, zero point 0), through a ``torch.nn.utils.parametrize`` parametrization;
* **activations** at the input and the output of each of those layers: per-tensor asymmetric uint8 (zero point in
  0..255, the range always holding 0), the range tracked as a moving average of batch min/max in training (PyTorch's
  ``MovingAverageMinMaxObserver`` rule, averaging constant 0.01) and frozen in eval mode.

Fake quantization is ``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``
(straight-through gradients), which ``torch.onnx`` exports as ``QuantizeLinear``/``DequantizeLinear`` pairs: the
exported model *is* a QDQ model, with every scale and zero point the fine-tune ended with, and ONNX Runtime fuses it
into ``QLinearConv``/``QGemm``/``QLinearAdd`` kernels (measured on ResNet-8: all 9 convolutions). So what PyTorch
measured is what ONNX Runtime runs; no recalibration, no second quantizer.

Why not ``torch.ao``'s or torchao's QAT: ``torch.ao.quantization``'s FX flow is deprecated and needs a traceable
model; torchao's PT2E ``X86InductorQuantizer`` (0.18) fails to annotate a torchvision ResNet-18 in QAT mode
("Input partition has more than one output node"), and its converted graphs target Inductor, not ONNX Runtime.
Both insert observers where *their* backend fuses, not where ONNX Runtime's QDQ kernels need them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from presso.errors import ModelSourceError, UnsupportedLayerError
from presso.models.recipe import _op, register_replay, resolve

__all__ = ["ActivationFakeQuant", "WeightFakeQuant", "is_qat", "prepare_qat"]

QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AVERAGING = 0.01


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight, with ONNX Runtime's scale (``max|w|/127``)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().flatten(1).amax(1) / 127.0).clamp(min=1e-12).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        # quant range -128..127 (what ONNX's int8 allows): |w| / scale <= 127, so -128 is never reached, as in ORT
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization; the range follows a moving average of batch min/max in
    training (the first batch sets it) and is frozen in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exporting: the frozen range as it is (a data-dependent branch does not trace)
        if not torch.compiler.is_exporting() and (self.training or not bool(self.seen)):
            low, high = x.detach().min().clamp(max=0).float(), x.detach().max().clamp(min=0).float()
            if bool(self.seen):
                self.low.lerp_(low, AVERAGING)
                self.high.lerp_(high, AVERAGING)
            else:
                self.low.copy_(low)
                self.high.copy_(high)
                self.seen.fill_(True)
        scale = ((self.high - self.low) / 255.0).clamp(min=1e-12)
        zero = torch.round(-self.low / scale).clamp(0, 255).to(torch.int32)
        if x.dtype != torch.float32:  # bf16 autocast on CUDA: the fake quantization kernels take float32
            return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def is_qat(model: nn.Module) -> bool:
    """Whether ``model`` is in QAT form (its ONNX export is an INT8 QDQ graph)."""
    return any(isinstance(m, ActivationFakeQuant) for m in model.modules())


def _quantize_input(module, args):
    return (module.qat_input(args[0]), *args[1:])


def _quantize_output(module, args, output):
    return module.qat_output(output)


def _wrap(layer: nn.Module) -> None:
    parametrize.register_parametrization(layer, "weight", WeightFakeQuant())
    layer.qat_input = ActivationFakeQuant()
    layer.qat_output = ActivationFakeQuant()
    layer.register_forward_pre_hook(_quantize_input)
    layer.register_forward_hook(_quantize_output)


def _fold_structure(model: nn.Module, conv_name: str, bn_name: str) -> tuple[nn.Module, nn.Module]:
    """Replace BatchNorm ``bn_name`` by Identity and give the conv a bias if it had none; (conv, bn) returned."""
    _, _, conv = resolve(model, conv_name)
    parent, attr, bn = resolve(model, bn_name)
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not isinstance(bn, _BATCHNORMS):
        raise ModelSourceError(f"The QAT recipe folds '{bn_name}' into '{conv_name}', which are not a conv and a BN.")
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
    setattr(parent, attr, nn.Identity())
    return conv, bn


def _pairs(model: nn.Module, inputs: tuple) -> list[tuple[str, str]]:
    """(conv, BatchNorm) name pairs where the BatchNorm's input is the conv's output tensor itself."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, nn.Module] = {}
    pairs: list[tuple[str, str]] = []

    def after_conv(module, args, output):
        produced[id(output)] = module

    def before_bn(module, args):
        conv = produced.get(id(args[0])) if args else None
        if conv is not None and names.get(conv) and names.get(module):
            pairs.append((names[conv], names[module]))

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, QUANTIZED[:3])]
    hooks += [m.register_forward_pre_hook(before_bn) for m in model.modules() if isinstance(m, _BATCHNORMS)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(pairs))


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


def prepare_qat(model: nn.Module, inputs: tuple) -> dict[str, Any]:
    """Put ``model`` (in eval mode afterwards) into QAT form in place; the recipe step that rebuilds it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if is_qat(model):
        raise UnsupportedLayerError("The model is already in QAT form (fake quantization in place).")
    model.eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED) and n]
    if not layers:
        raise UnsupportedLayerError("QAT: the model has no Conv or Linear layer to quantize.")
    folded: list[dict[str, str]] = []
    reference = _outputs(model, inputs)
    for conv_name, bn_name in _pairs(model, inputs):
        _, _, conv = resolve(model, conv_name)
        parent, attr, bn = resolve(model, bn_name)
        state = (conv.weight, conv.bias)
        fused = fuse_conv_bn_eval(conv, bn)
        conv.weight, conv.bias = fused.weight, fused.bias
        setattr(parent, attr, nn.Identity())
        now = _outputs(model, inputs)
        same = len(now) == len(reference) and all(
            a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(b.abs().max())))
            for a, b in zip(now, reference, strict=True)
        )
        if same:
            folded.append({"conv": conv_name, "bn": bn_name})
        else:  # the conv's output feeds more than its BatchNorm: left as it was
            conv.weight, conv.bias = state
            setattr(parent, attr, bn)
    for name in layers:
        _wrap(model.get_submodule(name))
    model.eval()
    return {"type": "qat", "config": {"weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor"},
            "folds": folded, "layers": layers}  # fmt: skip


@register_replay("qat")
def replay_qat(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild the QAT form: the folds' structure and the fake-quantized layers (values come from the weights)."""
    for fold in _op(step, "folds", list):
        _fold_structure(model, _op(fold, "conv", str), _op(fold, "bn", str))
    for name in _op(step, "layers", list):
        if not isinstance(name, str):
            raise ModelSourceError(f"The QAT recipe names {name!r:.60}, not a layer name.")
        _, _, layer = resolve(model, name)
        if not isinstance(layer, QUANTIZED):
            raise ModelSourceError(f"The QAT recipe quantizes '{name}', a {type(layer).__name__}, not a conv/linear.")
        _wrap(layer)
