"""Quantization-aware structure: fake quantization that is, op for op, the INT8 graph ONNX Runtime runs.

``prepare_qat`` changes a model (in place) into its QAT form, and returns the recipe step that rebuilds that form on
load (``@register_replay("qat")``):

* **BatchNorm folded** into the convolution before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``), the BatchNorm
  replaced by ``nn.Identity``: ONNX Runtime folds it the same way before it quantizes, so the weights fake-quantized
  here are the weights it quantizes (BatchNorm statistics are frozen for the fine-tune). A fold is kept only when
  the model's output is unchanged by it (a convolution whose output also feeds something besides its BatchNorm
  cannot be folded, by ONNX Runtime either);
* **weights** of every ``Conv1d/2d/3d`` and ``Linear``: per-output-channel symmetric int8 with ONNX Runtime's scale
  (``max|w| / 127``, zero point 0), through a ``torch.nn.utils.parametrize`` parametrization. On an x86 CPU without
  VNNI the weights take ONNX Runtime's reduced range instead (``max|w| / 64``, values in -64..64): its uint8 x int8
  kernels there add pairs of products in int16 (``vpmaddubsw``), which saturates with full-range weights -- a QAT
  ResNet on digits lost 6 points in ONNX Runtime that way. ``reduce_range`` chooses (default: from this CPU);
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

from presso.cpu import has_vnni
from presso.errors import ModelSourceError, UnsupportedLayerError
from presso.models.recipe import _op, register_replay, resolve

__all__ = ["ActivationFakeQuant", "WeightFakeQuant", "has_vnni", "is_qat", "prepare_qat", "weight_levels"]

QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AVERAGING = 0.01


WEIGHT_LEVELS = (127, 64)  # full int8 range; ONNX Runtime's reduce_range (-64..64) for CPUs without VNNI


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight, with ONNX Runtime's scale: ``max|w|/127``, or
    ``max|w|/64`` with ``levels=64`` (its reduce_range)."""

    def __init__(self, levels: int = 127) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().flatten(1).amax(1) / float(self.levels)).clamp(min=1e-12).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        # quant range -128..127 (what ONNX's int8 allows): |w| / scale <= levels, so values stay in -levels..levels
        # (-128 is never reached, as in ORT)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)


def weight_levels(model: nn.Module) -> int | None:
    """The weight range a QAT model was trained for (127, or 64 for reduce_range); None when not in QAT form."""
    return next((m.levels for m in model.modules() if isinstance(m, WeightFakeQuant)), None)


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization; the range follows a moving average of batch min/max in
    training (the first batch sets it) and is frozen in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        # exporting: the frozen range as it is (a data-dependent branch does not trace). ``observe=False``: a second
        # use of the same quantizer on the same values (a shared input), which must not count the batch twice
        if observe and not torch.compiler.is_exporting() and (self.training or not bool(self.seen)):
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


# Activations a layer may take inside, before its output quantizer: ONNX Runtime removes a Relu or Clip that feeds a
# QuantizeLinear whose range it cannot leave (a uint8 zero point of 0; a range within Clip's bounds), which runs the
# activation inside the integer kernel.
ACTIVATIONS = {"relu": lambda t: torch.relu(t), "relu6": lambda t: torch.clamp(t, 0.0, 6.0)}


def _activation_kind(module: nn.Module) -> str | None:
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) in (nn.ReLU6, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0):
        return "relu6"
    return None


def _quantize_input(module, args):
    shared = module.__dict__.get("_qat_input_shared")
    if shared is not None:  # the quantizer of the tensor's producer (or first consumer): already applied there
        return (shared(args[0], observe=False), *args[1:])
    return (module.qat_input(args[0]), *args[1:])


def _quantize_output(module, args, output):
    act = module.__dict__.get("_qat_activation")
    if act:  # the activation that alone reads the output, inside: quantized after it
        output = ACTIVATIONS[act](output)
    return module.qat_output(output)


def _wrap(layer: nn.Module, own_input: bool = True, activation: str | None = None, levels: int = 127) -> None:
    parametrize.register_parametrization(layer, "weight", WeightFakeQuant(levels))
    if own_input:
        layer.qat_input = ActivationFakeQuant()
    object.__setattr__(layer, "_qat_activation", activation)
    layer.qat_output = ActivationFakeQuant()
    layer.register_forward_pre_hook(_quantize_input)
    layer.register_forward_hook(_quantize_output)


def _wrap_all(
    model: nn.Module, layers: list[str], sources: dict[str, list[str]], acts: dict[str, str], levels: int = 127
) -> None:
    """Fake quantization on ``layers``; a layer in ``sources`` reads its input through the quantizer named there
    (``["out", producer]``: the producer's output quantizer; ``["in", first]``: the input quantizer ``first`` reads
    through, itself maybe shared); a layer in ``acts`` applies that activation before its output quantizer."""
    for name in layers:
        _wrap(model.get_submodule(name), own_input=name not in sources, activation=acts.get(name), levels=levels)

    def quantizer(kind: str, name: str, depth: int = 0) -> nn.Module:
        if depth > len(layers) or name not in layers or kind not in ("out", "in"):
            raise ModelSourceError(f"The QAT recipe shares a quantizer of '{name}', which it does not quantize.")
        if kind == "in" and name in sources:
            return quantizer(*sources[name], depth=depth + 1)
        return getattr(model.get_submodule(name), "qat_output" if kind == "out" else "qat_input")

    for name, (kind, other) in sources.items():
        # a plain attribute, not a submodule: one quantizer, saved once, under its owner's name
        object.__setattr__(model.get_submodule(name), "_qat_input_shared", quantizer(kind, other))


def _dataflow(model: nn.Module, inputs: tuple, layers: list[str]):
    """Where each quantized layer's input comes from and which activation reads its output, from one traced forward.

    Returns ``(sources, act_next)``. ``sources[name]``: ``("out", producer, acts)`` when the layer's input is
    another layer's output passed only through modules that keep values on the producer's grid (Identity, MaxPool,
    Flatten) and the activations ``acts`` (which keep it there only once moved inside the producer); or ``("in",
    first, ())`` when another layer already reads the same tensor. Such a layer reuses that quantizer instead of
    quantizing the same values a second time. ``act_next[name]``: the activation module kind that reads the layer's
    output.
    """
    names = {m: n for n, m in model.named_modules()}
    wanted = set(layers)
    keep: list[torch.Tensor] = []  # every traced tensor alive until the end: ids are not reused meanwhile
    origin: dict[int, tuple[str, tuple[str, ...]]] = {}  # id(tensor) -> (producer layer, activations passed)
    read_by: dict[int, str] = {}  # id(tensor) -> the first layer that read it as input
    sources: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    act_next: dict[str, str] = {}
    passing = (nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten)
    seen_in: dict[nn.Module, tuple[str, tuple[str, ...]] | None] = {}

    def pre(module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            return
        keep.append(args[0])
        name, i = names.get(module), id(args[0])
        if name in wanted and name not in sources:
            if i in origin:
                sources[name] = ("out", *origin[i])
            elif i in read_by:
                sources[name] = ("in", read_by[i], ())
        if name in wanted:
            read_by.setdefault(i, name)
        kind = _activation_kind(module)
        if kind and i in origin and not origin[i][1]:
            act_next.setdefault(origin[i][0], kind)
        seen_in[module] = origin.get(i)

    def post(module, args, output):
        if not isinstance(output, torch.Tensor):
            return
        keep.append(output)
        came = seen_in.pop(module, None)
        kind = _activation_kind(module)
        if names.get(module) in wanted:
            origin[id(output)] = (names[module], ())
        elif came is not None and (isinstance(module, passing) or kind):
            origin[id(output)] = (came[0], came[1] + ((kind,) if kind else ()))

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return sources, act_next


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


def prepare_qat(model: nn.Module, inputs: tuple, reduce_range: bool | None = None) -> dict[str, Any]:
    """Put ``model`` (in eval mode afterwards) into QAT form in place; the recipe step that rebuilds it.

    ``reduce_range``: weights in ONNX Runtime's reduced range (-64..64), for x86 CPUs without VNNI (``None``: when
    this CPU has none, as ``presso convert --reduce-range auto`` decides)."""
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
        if _same(_outputs(model, inputs), reference):
            folded.append({"conv": conv_name, "bn": bn_name})
        else:  # the conv's output feeds more than its BatchNorm: left as it was
            conv.weight, conv.bias = state
            setattr(parent, attr, bn)
    # Quantize each tensor once, where ONNX Runtime's integer kernels want it: a conv's output after the activation
    # that alone reads it (ORT runs Conv+Relu/Clip as one integer kernel), and a layer's input through its producer's
    # quantizer. Two quantizers on one tensor leave a float activation and a requantization between two integer
    # kernels (the QAT Fashion-MNIST ResNet-8 ran 1.48x FP32 so, against 1.72x for post-training INT8).
    sources, act_next = _dataflow(model, inputs, layers)
    acts: dict[str, str] = {}
    for name, kind in sorted(act_next.items()):
        hook = model.get_submodule(name).register_forward_hook(lambda m, a, out, k=kind: ACTIVATIONS[k](out))
        try:
            now = _outputs(model, inputs)
        finally:
            hook.remove()
        if _same(now, reference):  # nothing but the activation reads the output (else it stays outside)
            acts[name] = kind
    # a share through activations holds only when the producer took exactly those inside (they are then no-ops)
    shared = {name: [kind, other] for name, (kind, other, passed) in sources.items()
              if all(a == acts.get(other) for a in passed)}  # fmt: skip
    reduced = reduce_range if reduce_range is not None else has_vnni() is False
    levels = WEIGHT_LEVELS[1] if reduced else WEIGHT_LEVELS[0]
    _wrap_all(model, layers, shared, acts, levels)
    model.eval()
    weights = "int8 per-channel symmetric" + (", reduced range -64..64 (x86 without VNNI)" if reduced else "")
    return {"type": "qat", "config": {"weights": weights, "activations": "uint8 per-tensor"}, "folds": folded,
            "layers": layers, "activation_inside": acts, "shared_inputs": shared, "weight_levels": levels}  # fmt: skip


def _same(now: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    return len(now) == len(reference) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(b.abs().max())))
        for a, b in zip(now, reference, strict=True)
    )


@register_replay("qat")
def replay_qat(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild the QAT form: the folds' structure and the fake-quantized layers (values come from the weights)."""
    for fold in _op(step, "folds", list):
        _fold_structure(model, _op(fold, "conv", str), _op(fold, "bn", str))
    layers = _op(step, "layers", list)
    for name in layers:
        if not isinstance(name, str):
            raise ModelSourceError(f"The QAT recipe names {name!r:.60}, not a layer name.")
        _, _, layer = resolve(model, name)
        if not isinstance(layer, QUANTIZED):
            raise ModelSourceError(f"The QAT recipe quantizes '{name}', a {type(layer).__name__}, not a conv/linear.")
    # recipes written before quantizers were shared have neither key: every layer quantizes its own input
    acts, shared = step.get("activation_inside", {}), step.get("shared_inputs", {})
    if not (isinstance(acts, dict) and all(v in ACTIVATIONS for v in acts.values()) and isinstance(shared, dict)
            and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                    for v in shared.values())):  # fmt: skip
        raise ModelSourceError("The QAT recipe's 'activation_inside' / 'shared_inputs' entries are malformed.")
    levels = step.get("weight_levels", WEIGHT_LEVELS[0])  # recipes written before reduce_range: full range
    if levels not in WEIGHT_LEVELS:
        raise ModelSourceError(f"The QAT recipe's weight_levels is {levels!r:.20}, not one of {WEIGHT_LEVELS}.")
    _wrap_all(model, layers, shared, acts, levels)
