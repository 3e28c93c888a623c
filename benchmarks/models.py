"""Model factories the benchmarks use through the ``file.py:factory`` spec (as a user would)."""

from __future__ import annotations

import torch
from torch import nn

from metacompress.zoo import build_model


def vit_ti16(input_shape, num_classes) -> nn.Module:
    """ViT-Ti/16: the zoo's vit-tiny at ViT-Tiny's size (dim 192, 12 blocks, 3 heads, MLP 4x, 16x16
    patches: a 14x14 token grid at 224x224)."""
    return build_model("vit-tiny", input_shape, num_classes, dim=192, depth=12, num_heads=3, mlp_ratio=4.0, grid=14)


TEXT_VOCAB = 2000  # token ids of benchmarks/text_tokens.py's data are below this


class TextTransformer(nn.Module):
    """A text classifier over token ids: embedding + learned positions, PyTorch encoder layers
    (pre-norm, padding masked), mean over the tokens that are not padding (id 0)."""

    def __init__(self, length: int, num_classes: int, dim: int = 256, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(TEXT_VOCAB, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def text_transformer(input_shape, num_classes) -> nn.Module:
    """``TextTransformer`` for token sequences of ``input_shape`` = (length,)."""
    return TextTransformer(int(input_shape[0]), num_classes)
