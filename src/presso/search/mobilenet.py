"""The MobileNetV2/V3-style search space: inverted-residual stages (or EfficientNet-V2's fused ones) with a searched
depth, width multiplier, kernel size, expansion ratio, squeeze-excitation and activation per stage, a searched stem
and head width, and the input resolution. Candidates are plain ``nn.Module``s of standard layers, buildable as
``presso:mbnet`` with the architecture as keyword argument, so a searched model saves, reloads, prunes, trains and
exports like any other.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from presso.models.builtin import MBNET_STAGES as STAGES
from presso.models.builtin import MBNet, mbnet  # noqa: F401  (re-exported: the space's networks)
from presso.models.sources import load_model
from presso.search.space import SearchSpace, register_space

DEPTHS = ((1, 2), (1, 2, 3), (1, 2, 3), (1, 2, 3))
WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.5)  # 0.25: 8 channels in the first stages (make_divisible)
KERNELS = (3, 5, 7)
EXPANDS = (1, 2, 3, 4, 6)
STEMS = (8, 16, 24)
HEADS = (128, 256, 512)
ACTS = ("relu", "hswish")
RESOLUTION_SCALES = (0.75, 0.875, 1.0, 1.25)


@register_space
class MobileNetSpace(SearchSpace):
    name = "mobilenet"

    @property
    def small_input(self) -> bool:
        return max(self.image_size) <= 64

    def resolutions(self) -> list[int]:
        native = max(self.image_size)
        return sorted({max(8, round(native * s / 4) * 4) for s in RESOLUTION_SCALES})

    def sample(self, trial) -> dict[str, Any]:
        arch: dict[str, Any] = {
            "resolution": trial.suggest_categorical("resolution", self.resolutions()),
            "stem": trial.suggest_categorical("stem", list(STEMS)),
        }
        for i in range(STAGES):
            arch[f"s{i}_depth"] = trial.suggest_categorical(f"s{i}_depth", list(DEPTHS[i]))
            arch[f"s{i}_width"] = trial.suggest_categorical(f"s{i}_width", list(WIDTHS))
            arch[f"s{i}_kernel"] = trial.suggest_categorical(f"s{i}_kernel", list(KERNELS))
            arch[f"s{i}_expand"] = trial.suggest_categorical(f"s{i}_expand", list(EXPANDS))
            arch[f"s{i}_se"] = trial.suggest_categorical(f"s{i}_se", [False, True])
            arch[f"s{i}_fused"] = trial.suggest_categorical(f"s{i}_fused", [False, True])
            arch[f"s{i}_act"] = trial.suggest_categorical(f"s{i}_act", list(ACTS))
        arch["head"] = trial.suggest_categorical("head", list(HEADS))
        return arch

    def build(self, arch: dict[str, Any]) -> nn.Module:
        kwargs = {"arch": dict(arch), "num_classes": self.num_classes, "in_chans": self.in_chans,
                  "small_input": self.small_input}  # fmt: skip
        return load_model("presso:mbnet", **kwargs)

    def smallest(self) -> dict[str, Any]:
        arch: dict[str, Any] = {"resolution": self.resolutions()[0], "stem": STEMS[0], "head": HEADS[0]}
        for i in range(STAGES):
            arch.update({f"s{i}_depth": DEPTHS[i][0], f"s{i}_width": WIDTHS[0], f"s{i}_kernel": KERNELS[0],
                         f"s{i}_expand": EXPANDS[0], f"s{i}_se": False, f"s{i}_act": "relu",
                         f"s{i}_fused": False})  # fmt: skip
        return arch

    def zoo(self) -> dict[str, dict[str, Any]]:
        native = max(self.image_size)
        res = min(self.resolutions(), key=lambda r: abs(r - native))

        def uniform(depths, width, kernel, expand, se, act, stem, head, resolution=res, fused=0):
            arch: dict[str, Any] = {"resolution": resolution, "stem": stem}
            for i in range(STAGES):
                late = i >= 2  # SE and hard-swish in the late stages only, as MobileNetV3 places them
                arch.update({f"s{i}_depth": depths[i], f"s{i}_width": width, f"s{i}_kernel": kernel})
                arch.update({f"s{i}_expand": expand, f"s{i}_se": se and late, f"s{i}_act": act if late else "relu"})
                arch[f"s{i}_fused"] = i < fused  # the first `fused` stages fused, as EfficientNet-V2 places them
            arch["head"] = head
            return arch

        return {
            # MobileNetV3-Small's recipe (SE and hard-swish late, small head) at half width
            "mnv3-small-0.5": uniform((1, 2, 2, 2), 0.5, 3, 4, True, "hswish", 8, 256),
            # MobileNetV2's recipe (expansion 6, ReLU, no SE) at 0.75 width
            "mnv2-0.75": uniform((1, 2, 3, 2), 0.75, 3, 6, False, "relu", 16, 256),
            # the smallest sensible member: one block per stage, narrow, at a lower resolution
            "tiny": uniform((1, 1, 1, 1), 0.5, 3, 2, False, "relu", 8, 128, resolution=self.resolutions()[0]),
            # EfficientNet-V2's recipe, small: fused blocks in the first two stages, expansion 4 after
            "fused-0.75": {
                **uniform((1, 1, 2, 1), 0.75, 3, 4, False, "relu", 16, 128, fused=2),
                "s0_expand": 1,
                "s1_expand": 2,
            },
        }
