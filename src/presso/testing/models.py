"""Tiny models with the structures that make pruning hard: residual adds, concatenations, depthwise and grouped
convolutions, attention with heads, and a forward pass that hard-codes a width."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Residual add, a concat of two branches, a depthwise and a grouped conv, then a classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.branch_a = nn.Conv2d(width, width, 1)
        self.branch_b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, width, 1))
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.relu(self.grouped(x))
        return self.head(self.pool(x).flatten(1))


def tiny_cnn(num_classes: int = 10, width: int = 32) -> TinyCNN:
    """A factory, as users write them for ``file.py:factory`` sources."""
    return TinyCNN(num_classes=num_classes, width=width)


class Attention(nn.Module):
    """Multi-head self-attention written the way most code bases do (fused qkv, reshape by heads, projection)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(x)


class TinyAttentionNet(nn.Module):
    """Patch embedding, one pre-norm transformer block (attention + MLP), mean pooling, classifier."""

    def __init__(self, num_classes: int = 10, dim: int = 64, num_heads: int = 4, patch: int = 4, in_chans: int = 3):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class HardCodedWidth(nn.Module):
    """A model whose forward hard-codes a width (``view(-1, 16, ...)``): pruning ``a`` breaks it, so Presso must
    roll that group back and report it, while still pruning ``b``/``c``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = x.view(x.shape[0], 16, -1).view(x.shape[0], 16, x.shape[2], x.shape[3])
        x = torch.relu(self.c(torch.relu(self.b(x))))
        return self.head(x.mean((2, 3)))


class FragileQuant(nn.Module):
    """A network that INT8 with per-tensor activation ranges breaks on purpose: ``conv1`` puts one output channel
    at ~1e4 while the others stay ~1, and ``conv2`` scales that channel back. One uint8 range over conv1's output then
    rounds the small channels to zero, so conv1 and conv2 must stay in floating point; conv3 and fc quantize well."""

    def __init__(self, size: int = 16, num_classes: int = 4):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * size * size, num_classes, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(p[0].numel(), 1)) ** 0.5)
            self.conv1.weight[0] *= 1e4
            self.conv1.bias[0] *= 1e4
            self.conv2.weight[:, 0] *= 1e-4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(x)).flatten(1))
