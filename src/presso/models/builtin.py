"""Presso's own small architectures (``presso:NAME``), for training from a dataset when the user brings no model.

They are ordinary ``nn.Module`` code built from standard layers, so every verb treats them like any user model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al.), projected when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for small images: a 3x3 stem, stages of BasicBlocks (stride 2 between stages), global
    pooling, a linear classifier. ``widths=(16, 32, 64), blocks=(1, 1, 1)`` is ResNet-8."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(self.dropout(x))


def small_resnet(**kwargs) -> SmallResNet:
    return SmallResNet(**kwargs)


def resnet8(**kwargs) -> SmallResNet:
    return SmallResNet(**{"widths": (16, 32, 64), "blocks": (1, 1, 1), **kwargs})


def resnet14(**kwargs) -> SmallResNet:
    return SmallResNet(**{"widths": (32, 64, 128), "blocks": (2, 2, 2), **kwargs})


# --------------------------------------------------------------------------- the searcher's MobileNet-style networks
# They live here, not in search/, because a searched model is loaded (``presso:mbnet``) by every verb: loading a model
# must not import the searcher. The search space (search/mobilenet.py) only samples their ``arch`` dicts.
MBNET_STAGES = 4


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


class FusedInvertedResidual(nn.Module):
    """EfficientNet-V2's fused MBConv: one k x k convolution expands (or, at expansion 1, is the whole block) ->
    (SE) -> 1x1 project, with a residual add when the shape allows. At small resolutions and widths a dense k x k
    convolution runs faster on CPUs than the 1x1 + depthwise pair it replaces."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se: bool, act: str):
        super().__init__()
        hidden = cout if expand == 1 else make_divisible(cin * expand)
        self.fused = nn.Sequential(
            nn.Conv2d(cin, hidden, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(hidden), _act(act)
        )
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project: nn.Module = nn.Identity()
        if expand != 1:
            self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.fused(x)))
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
        for i in range(MBNET_STAGES):
            cout = make_divisible(base[i] * float(arch[f"s{i}_width"]))
            # architectures saved before fused blocks were in the space have no "fused" key: inverted residuals
            block = FusedInvertedResidual if bool(arch.get(f"s{i}_fused", False)) else InvertedResidual
            for j in range(int(arch[f"s{i}_depth"])):
                blocks.append(
                    block(
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


BUILDERS = {"small_resnet": small_resnet, "resnet8": resnet8, "resnet14": resnet14, "mbnet": mbnet}
