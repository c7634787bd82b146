"""Tiny models and zoos for Presso's tests -- and for users' own tests of models they compress."""

from presso.testing.models import HardCodedWidth, TinyAttentionNet, TinyCNN, tiny_cnn

__all__ = ["HardCodedWidth", "TinyAttentionNet", "TinyCNN", "tiny_cnn"]
