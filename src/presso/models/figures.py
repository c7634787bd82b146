"""The figures every verb reports: parameters, MACs and on-disk size.

MACs are counted with PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (one counter for all verbs). It
counts at the ATen dispatch level, so it sees convolutions, linear layers *and* functional matmuls such as attention
(``bmm``, ``scaled_dot_product_attention``) in any model, which module-hook counters miss. MACs = FLOPs / 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def set_mode(model: nn.Module, training: bool = False) -> nn.Module:
    """model.train(training), tolerating torch.export modules, which have no train/eval switch (NotImplementedError);
    they are inference graphs already."""
    try:
        model.train(training)
    except NotImplementedError:
        pass
    return model


def run_model(model: nn.Module, inputs: tuple) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def count_macs(model: nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward pass on `inputs` (eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    set_mode(model, False)
    try:
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                run_model(model, inputs)
        except AssertionError:
            # FlopCounterMode's module tracker asserts on some models (timm PiT, CaiT) when autograd is off:
            # "Expected gradient function to be set". Counting with autograd on gives the same figure.
            with torch.enable_grad(), FlopCounterMode(display=False) as counter:
                run_model(model, inputs)
    finally:
        set_mode(model, was_training)
    return int(counter.get_total_flops()) // 2


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as safetensors would write them (unique tensors, plus a small header)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr() if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_figures(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """Params, MACs and size; a model that does not run on `inputs` is the user's input spec to fix."""
    from presso.errors import InputSpecError

    try:
        macs = count_macs(model, inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs) if isinstance(inputs, tuple) else str(inputs)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise InputSpecError(
            f"The model does not run on inputs of shape {shapes}: {type(e).__name__}: {msg}. Fix --input-shape."
        ) from None
    return {"params": count_params(model), "macs": macs, "size_bytes": size_bytes(model)}
