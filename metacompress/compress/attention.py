"""Self-attention that can lose head dimensions: ``nn.MultiheadAttention`` rewritten for pruning.

``nn.MultiheadAttention`` ties its query/key/value width to its embedding width and its head
size to ``embed_dim // num_heads``, and in inference PyTorch runs it (and
``nn.TransformerEncoderLayer``) as one fused op. So the dependency graph can only prune it
together with the residual stream, removing q/k/v rows at the residual's indices, which moves
rows from one head to another. ``split_self_attention`` replaces every instance that the model
calls as self-attention (query, key and value the same tensor) by ``SelfAttention``: the same
weights in one ``qkv`` projection and an output ``proj``, head size read from the layer sizes at
run time, so the attention group prunes each head's dims at the same offsets (``groups``,
``prune._prune_head_dims``), as for the zoo's own attention. It computes what the original
computes (``tests/compress/test_attention.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacompress.compress.measure import composed_attention


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward for self-attention, from a fused ``qkv`` projection.

    Accepts the same arguments (masks, ``need_weights``, ``batch_first`` layout, unbatched
    input) and returns ``(output, weights or None)``. Key and value must be the query itself.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.scale = (embed_dim // num_heads) ** -0.5  # fixed: pruning head dims keeps the temperature
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # PyTorch's encoder layers read these to choose their fused path: this block never takes it
        self._qkv_same_embed_dim = False
        self.in_proj_bias = None

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, bias, mha.dropout, mha.batch_first)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // 3 // self.num_heads

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("this attention block was converted for pruning as self-attention: "
                             "key and value must be the query tensor")
        unbatched = query.dim() == 2
        x = query.unsqueeze(0 if self.batch_first else 1) if unbatched else query
        x = x if self.batch_first else x.transpose(0, 1)
        b, n, _ = x.shape
        heads, dim = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, b, heads, n, scores.dtype)
        weights = (scores if mask is None else scores + mask).softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = self.proj((weights @ v).transpose(1, 2).reshape(b, n, heads * dim))
        out = out if self.batch_first else out.transpose(0, 1)
        out = out.squeeze(0 if self.batch_first else 1) if unbatched else out
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights[0] if unbatched else weights)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: may not attend) as -inf / 0; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
                   batch: int, heads: int, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks summed into one additive (batch, heads, n, n) term."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    total = None
    if attn_mask is not None:
        total = _additive(attn_mask, dtype)
        if total.dim() == 3:  # (batch * heads, n, n)
            total = total.reshape(batch, heads, tokens, tokens)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, tokens)
        total = padding if total is None else total + padding
    return total


def _self_attention_calls(model: nn.Module, example: torch.Tensor) -> dict[nn.MultiheadAttention, bool]:
    """Each ``nn.MultiheadAttention`` the forward pass calls: whether every call was self-attention."""
    calls: dict[nn.MultiheadAttention, bool] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        named = [args[i] if len(args) > i else kwargs.get(k) for i, k in enumerate(("query", "key", "value"))]
        calls[module] = calls.get(module, True) and named[1] is named[0] and named[2] is named[0]

    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in mhas]
    try:
        with torch.no_grad(), composed_attention():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return calls


def _convertible(mha: nn.MultiheadAttention) -> bool:
    """Same width for query, key and value, no learned extra key/value, no zero-attention column."""
    return mha._qkv_same_embed_dim and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn


def split_self_attention(model: nn.Module, example: torch.Tensor) -> int:
    """Replace, in place, each ``nn.MultiheadAttention`` that ``model`` calls as self-attention by
    an equivalent ``SelfAttention``; returns how many were replaced. Cross-attention and other
    variants stay as they are (their width is then pruned with the residual stream, or kept)."""
    calls = _self_attention_calls(model, example)
    chosen = {m for m, self_only in calls.items() if self_only and _convertible(m)}
    if not chosen:
        return 0
    made: dict[nn.MultiheadAttention, SelfAttention] = {}  # a block used in two places stays shared
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in chosen:
                if child not in made:
                    made[child] = SelfAttention.from_multihead(child)
                setattr(parent, name, made[child])
        if isinstance(parent, nn.TransformerEncoder):  # its nested-tensor path reads the fused weights
            parent.use_nested_tensor = False
    return len(chosen)


def match_saved_attention(model: nn.Module, state_dict: dict, example: torch.Tensor) -> None:
    """Convert ``model``'s attention blocks as they were converted when ``state_dict`` was saved (a
    compressed or robustified model holds ``SelfAttention`` weights where a freshly built one
    has an ``nn.MultiheadAttention``), so that the state loads."""
    modules = dict(model.named_modules())
    suffix = ".qkv.weight"
    if any(isinstance(modules.get(key[:-len(suffix)]), nn.MultiheadAttention)
           for key in state_dict if key.endswith(suffix)):
        split_self_attention(model, example)
