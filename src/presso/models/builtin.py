"""Presso's own small architectures (``presso:NAME``), for training from a dataset when the user brings no model.

They are ordinary ``nn.Module`` code built from standard layers, so every verb treats them like any user model.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def mbnet(**kwargs) -> nn.Module:
    """A member of the searcher's MobileNet-style space (``arch``: the search's parameters)."""
    from presso.search.mobilenet import mbnet as build

    return build(**kwargs)


BUILDERS = {"small_resnet": small_resnet, "resnet8": resnet8, "resnet14": resnet14, "mbnet": mbnet}
