"""Model factories the benchmarks use through the ``file.py:factory`` spec (as a user would)."""

from __future__ import annotations

from torch import nn

from metacompress.zoo import build_model


def vit_ti16(input_shape, num_classes) -> nn.Module:
    """ViT-Ti/16: the zoo's vit-tiny at ViT-Tiny's size (dim 192, 12 blocks, 3 heads, MLP 4x, 16x16
    patches: a 14x14 token grid at 224x224)."""
    return build_model("vit-tiny", input_shape, num_classes, dim=192, depth=12, num_heads=3, mlp_ratio=4.0, grid=14)
