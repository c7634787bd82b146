"""Input specs: the shapes and dtypes of a model's example inputs.

A spec string lists inputs separated by ``;``; each is a comma (or ``x``) separated shape, optionally followed by
``:dtype``. Examples: ``1,3,224,224``  ``1x3x32x32``  ``1,3,224,224;1,16:int64``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from presso.errors import InputSpecError

if TYPE_CHECKING:
    import torch

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
_DIM = re.compile(r"^[1-9][0-9]{0,8}$")
MAX_ELEMENTS = 2**28  # per input: 1 GiB of float32; larger example tensors only exhaust memory
MAX_INPUTS, MAX_DIMS = 16, 8


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __str__(self) -> str:
        s = ",".join(str(d) for d in self.shape)
        return s if self.dtype == "float32" else f"{s}:{self.dtype}"


@dataclass(frozen=True)
class InputSpec:
    """The example inputs of a model, as shapes and dtypes."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def parse(cls, text: str | InputSpec | tuple | list) -> InputSpec:
        """Parse ``"1,3,224,224;1,16:int64"`` (or a shape tuple / list of shapes) into an InputSpec."""
        if isinstance(text, InputSpec):
            return text
        if isinstance(text, (tuple, list)):
            if text and all(isinstance(d, int) for d in text):
                text = ",".join(str(d) for d in text)
            else:
                text = ";".join(",".join(str(d) for d in s) for s in text)
        if not isinstance(text, str) or not text.strip():
            raise InputSpecError("Empty input shape: give one like --input-shape 1,3,224,224 (several inputs: ';').")
        tensors = []
        for part in text.split(";"):
            part = part.strip()
            dtype = "float32"
            if ":" in part:
                part, dtype = (p.strip() for p in part.rsplit(":", 1))
                if dtype not in _DTYPES:
                    raise InputSpecError(
                        f"Unknown dtype '{dtype}' in input shape '{text}': use one of {', '.join(_DTYPES)}."
                    )
            dims = [d.strip() for d in re.split(r"[,x]", part)]
            if not dims or not all(_DIM.match(d) for d in dims):
                raise InputSpecError(
                    f"Malformed input shape '{text}': expected positive integers separated by commas, "
                    "e.g. 1,3,224,224 (several inputs separated by ';', dtype as ':int64')."
                )
            shape = tuple(int(d) for d in dims)
            if len(shape) > MAX_DIMS or math.prod(shape) > MAX_ELEMENTS:
                raise InputSpecError(
                    f"Input shape {part!r} has {math.prod(shape):,} elements in {len(shape)} dimensions, over the "
                    f"limit of {MAX_ELEMENTS:,} elements and {MAX_DIMS} dimensions per input; check --input-shape."
                )
            tensors.append(TensorSpec(shape, dtype))
        if len(tensors) > MAX_INPUTS:
            raise InputSpecError(f"{len(tensors)} inputs in '{text[:80]}': at most {MAX_INPUTS} are supported.")
        return cls(tuple(tensors))

    def __str__(self) -> str:
        return ";".join(str(t) for t in self.tensors)

    def example_inputs(self, seed: int = 0, batch: int | None = None) -> tuple[torch.Tensor, ...]:
        """Deterministic example tensors of this spec (normal for floats, small non-negative ints otherwise)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        out = []
        for t in self.tensors:
            shape = (batch, *t.shape[1:]) if batch is not None else t.shape
            dtype = getattr(torch, t.dtype)
            if dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(dtype))
            elif dtype == torch.bool:
                out.append(torch.ones(shape, dtype=torch.bool))
            else:
                out.append(torch.randint(0, 2, shape, generator=gen, dtype=dtype))
        return tuple(out)

    @classmethod
    def from_tensors(cls, inputs) -> InputSpec:
        import torch

        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        return cls(tuple(TensorSpec(tuple(x.shape), str(x.dtype).replace("torch.", "")) for x in inputs))


def input_spec_for(model, given: str | InputSpec | None = None, name: str | None = None) -> InputSpec:
    """A model's input spec: ``given``, else the one in its model card, else its own default (timm's
    ``pretrained_cfg``); otherwise an error asking for it."""
    if given:
        return InputSpec.parse(given)
    card = getattr(model, "presso_card", None)
    if card is not None and card.input_spec:
        return InputSpec.parse(card.input_spec)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return InputSpec.parse((1, *cfg["input_size"]))
    raise InputSpecError(
        f"Give the input shape of '{name or type(model).__name__}', e.g. --input-shape 1,3,224,224 "
        "(input_shape='1,3,224,224' in Python)."
    )
