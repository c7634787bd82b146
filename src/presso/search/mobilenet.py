"""The MobileNetV2/V3-style search space: inverted-residual stages with a searched depth, width multiplier, kernel
size, expansion ratio, squeeze-excitation and activation per stage, a searched stem and head width, and the input
resolution. Candidates are plain ``nn.Module``s of standard layers, buildable as ``presso:mbnet`` with the
architecture as keyword argument, so a searched model saves, reloads, prunes, trains and exports like any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from presso.search.space import SearchSpace, register_space

STAGES = 4
DEPTHS = ((1, 2), (1, 2, 3), (1, 2, 3), (1, 2, 3))
WIDTHS = (0.5, 0.75, 1.0, 1.5)
KERNELS = (3, 5, 7)
EXPANDS = (2, 3, 4, 6)
STEMS = (8, 16, 24)
HEADS = (128, 256, 512)
ACTS = ("relu", "hswish")
RESOLUTION_SCALES = (0.75, 0.875, 1.0, 1.25)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10% (MobileNet's rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _act(name: str) -> nn.Module:
    return nn.Hardswish() if name == "hswish" else nn.ReLU()


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels / 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand -> k x k depthwise -> (SE) -> 1x1 project, with a residual add when the shape allows."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se: bool, act: str):
        super().__init__()
        hidden = make_divisible(cin * expand)
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), _act(act))
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            _act(act),
        )
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MBNet(nn.Module):
    """A network of the space, from its architecture dict (the search's parameters)."""

    def __init__(self, arch: dict[str, Any], num_classes: int = 10, in_chans: int = 3, small_input: bool = True):
        super().__init__()
        base = (16, 24, 48, 96) if small_input else (16, 24, 40, 80)
        strides = (1, 2, 2, 2) if small_input else (2, 2, 2, 2)
        stem = int(arch["stem"])
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, 1 if small_input else 2, 1, bias=False),
            nn.BatchNorm2d(stem),
            _act(arch["s0_act"]),
        )
        blocks, cin = [], stem
        for i in range(STAGES):
            cout = make_divisible(base[i] * float(arch[f"s{i}_width"]))
            for j in range(int(arch[f"s{i}_depth"])):
                blocks.append(
                    InvertedResidual(
                        cin,
                        cout,
                        int(arch[f"s{i}_kernel"]),
                        strides[i] if j == 0 else 1,
                        int(arch[f"s{i}_expand"]),
                        bool(arch[f"s{i}_se"]),
                        arch[f"s{i}_act"],
                    )
                )
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        head = int(arch["head"])
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), _act(arch["s3_act"]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x)))).flatten(1)
        return self.classifier(self.dropout(x))


def mbnet(arch: dict[str, Any], num_classes: int = 10, in_chans: int = 3, small_input: bool = True) -> MBNet:
    return MBNet(arch, num_classes=num_classes, in_chans=in_chans, small_input=small_input)


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
            arch[f"s{i}_act"] = trial.suggest_categorical(f"s{i}_act", list(ACTS))
        arch["head"] = trial.suggest_categorical("head", list(HEADS))
        return arch

    def build(self, arch: dict[str, Any]) -> nn.Module:
        import presso

        kwargs = {"arch": dict(arch), "num_classes": self.num_classes, "in_chans": self.in_chans,
                  "small_input": self.small_input}  # fmt: skip
        return presso.load_model("presso:mbnet", **kwargs)

    def smallest(self) -> dict[str, Any]:
        arch: dict[str, Any] = {"resolution": self.resolutions()[0], "stem": STEMS[0], "head": HEADS[0]}
        for i in range(STAGES):
            arch.update({f"s{i}_depth": DEPTHS[i][0], f"s{i}_width": WIDTHS[0], f"s{i}_kernel": KERNELS[0],
                         f"s{i}_expand": EXPANDS[0], f"s{i}_se": False, f"s{i}_act": "relu"})  # fmt: skip
        return arch

    def zoo(self) -> dict[str, dict[str, Any]]:
        native = max(self.image_size)
        res = min(self.resolutions(), key=lambda r: abs(r - native))

        def uniform(depths, width, kernel, expand, se, act, stem, head, resolution=res):
            arch: dict[str, Any] = {"resolution": resolution, "stem": stem}
            for i in range(STAGES):
                late = i >= 2  # SE and hard-swish in the late stages only, as MobileNetV3 places them
                arch.update({f"s{i}_depth": depths[i], f"s{i}_width": width, f"s{i}_kernel": kernel})
                arch.update({f"s{i}_expand": expand, f"s{i}_se": se and late, f"s{i}_act": act if late else "relu"})
            arch["head"] = head
            return arch

        return {
            # MobileNetV3-Small's recipe (SE and hard-swish late, small head) at half width
            "mnv3-small-0.5": uniform((1, 2, 2, 2), 0.5, 3, 4, True, "hswish", 8, 256),
            # MobileNetV2's recipe (expansion 6, ReLU, no SE) at 0.75 width
            "mnv2-0.75": uniform((1, 2, 3, 2), 0.75, 3, 6, False, "relu", 16, 256),
            # the smallest sensible member: one block per stage, narrow, at a lower resolution
            "tiny": uniform((1, 1, 1, 1), 0.5, 3, 2, False, "relu", 8, 128, resolution=self.resolutions()[0]),
        }
