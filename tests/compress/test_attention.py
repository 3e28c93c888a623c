"""PyTorch's own attention blocks: counted, converted to prunable self-attention, pruned by head dims."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metacompress as mc
from metacompress.compress.attention import SelfAttention, TokenAttention, split_self_attention
from metacompress.compress.groups import discover_groups
from metacompress.compress.measure import composed_attention, count_macs


class EncoderNet(nn.Module):
    """A user's transformer over feature sequences, built from ``nn.TransformerEncoderLayer``."""

    def __init__(self, dim: int = 64, heads: int = 4, batch_first: bool = True, nested: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(dim, 5)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding)
        return self.head(h.mean(1 if self.batch_first else 0))


class CrossNet(nn.Module):
    """One self-attention and one cross-attention (keys from a learned memory)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.self_attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.memory = nn.Parameter(torch.randn(1, 3, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.self_attn(h, h, h, need_weights=False)[0]
        mem = self.memory.expand(h.shape[0], -1, -1)
        return self.head((h + self.cross(h, mem, mem)[0]).mean(1))


def _attention_macs(tokens: int, dim: int) -> int:
    """q/k/v and output projections, then scores and their weighted sum."""
    return 4 * tokens * dim * dim + 2 * tokens * tokens * dim


def test_macs_count_attention_in_inference_and_the_fast_path_setting_comes_back():
    """In eval mode PyTorch runs an encoder layer as one fused op: counted as such, its MACs were zero."""
    torch.manual_seed(0)
    model = EncoderNet().eval()
    x = torch.randn(1, 10, 12)
    ffn = 2 * 10 * 64 * 128
    expected = 10 * 12 * 64 + 2 * (_attention_macs(10, 64) + ffn) + 64 * 5
    assert torch.backends.mha.get_fastpath_enabled()
    assert count_macs(model, x) == expected
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "bool-attn", "float-attn", "causal", "per-head"])
def test_self_attention_computes_what_multihead_attention_computes(batch_first, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = SelfAttention.from_multihead(mha).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    kwargs: dict = {}
    if masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    elif masks == "bool-attn":
        kwargs["attn_mask"] = torch.rand(5, 5) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    elif masks == "float-attn":
        kwargs["attn_mask"] = torch.randn(5, 5)
    elif masks == "causal":
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=True)
    elif masks == "per-head":
        kwargs["attn_mask"] = torch.randn(3 * 4, 5, 5)
    for need, average in [(True, True), (True, False), (False, True)]:
        ref_out, ref_w = mha(x, x, x, need_weights=need, average_attn_weights=average, **kwargs)
        out, w = ours(x, x, x, need_weights=need, average_attn_weights=average, **kwargs)
        assert torch.allclose(out, ref_out, atol=1e-5)
        assert (w is None) == (ref_w is None) and (w is None or torch.allclose(w, ref_w, atol=1e-6))
    unbatched = x[0] if batch_first else x[:, 0]
    assert torch.allclose(ours(unbatched, unbatched, unbatched)[0], mha(unbatched, unbatched, unbatched)[0], atol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        ours(x, x.clone(), x)


def test_split_converts_self_attention_only_and_keeps_the_function():
    torch.manual_seed(0)
    model = CrossNet().eval()
    x = torch.randn(4, 7, 6)
    with torch.no_grad():
        before = model(x)
    assert split_self_attention(model, x[:1]) == 1
    assert isinstance(model.self_attn, SelfAttention) and isinstance(model.cross, nn.MultiheadAttention)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)


def test_converted_encoder_runs_its_padded_inference_path():
    """With a padding mask in eval mode the encoder would take PyTorch's nested-tensor path, which
    reads the fused weights the converted block no longer has: converting turns that path off, and
    the model computes what PyTorch's composed path computes (the nested one zeroes padded tokens)."""
    torch.manual_seed(0)
    model = EncoderNet(nested=True).eval()
    x = torch.randn(2, 6, 12)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.no_grad():
        with composed_attention():
            before = model(x, padding)
        assert split_self_attention(model, x[:1]) == 2
        assert torch.allclose(model(x, padding), before, atol=1e-5)


def test_encoder_heads_and_residual_width_are_pruned_and_export_matches(tmp_path):
    """Before conversion a ``nn.TransformerEncoderLayer`` net kept its attention and residual
    stream whole (``embed_dim`` must divide by the head count), so 0.5 of its MACs was out of
    reach; now heads lose dims at equal offsets and the residual stream shrinks too."""
    torch.manual_seed(0)
    model = EncoderNet(batch_first=False).eval()
    x, y = torch.randn(96, 10, 12), torch.randint(0, 5, (96,))
    converted = EncoderNet(batch_first=False).eval()
    split_self_attention(converted, x[:1])
    kinds = {g.kind for g in discover_groups(converted, x[:1], 5)}
    assert kinds == {"linear", "attention"}
    small, report = mc.compress(model, x[:1], target=mc.MACs(0.5), train=(x, y), allocation="uniform",
                                repair=mc.RepairConfig(steps=0), guard=False)
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)  # the caller's model is untouched
    ratio = count_macs(small, x[:1]) / count_macs(model, x[:1])
    assert abs(ratio - 0.5) <= 0.02 * 0.5 and report.achieved_macs_ratio == pytest.approx(ratio)
    attn = small.encoder.layers[0].self_attn
    assert attn.qkv.out_features < 3 * 64 and attn.qkv.in_features < 64  # head dims and residual width
    mc.export_onnx(small, x[:1], tmp_path / "enc.onnx")
    check = mc.verify(tmp_path / "enc.onnx", small, (x[:32], y[:32]))
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    mc.save(small, tmp_path / "enc.pt", x[:1])
    back, _ = mc.load_compressed(tmp_path / "enc.pt", EncoderNet(batch_first=False))
    assert torch.equal(back(x[:8]), small(x[:8]))


class ConstantHeadAttention(nn.Module):
    """Attention as timm and most tutorials write it: the head size is fixed when the block is
    built, and q, k and v are laid out (3, heads, head size) in one ``qkv`` output."""

    def __init__(self, dim: int, heads: int, layout: str = "3hd") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.layout = heads, dim // heads, layout
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        if self.layout == "3hd":
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:  # heads outermost: another layout of the same layer, which the conversion must not take
            q, k, v = self.qkv(x).reshape(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        out = self.attn_drop(scores.softmax(-1)) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class NormedAttention(ConstantHeadAttention):
    """The same with a LayerNorm over its output: a computation the conversion does not reproduce."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(super().forward(x, attn_mask))


class PreNormChunkAttention(nn.Module):
    """As vit-pytorch writes it: a LayerNorm inside, q, k and v from ``chunk``, the head count
    fixed, an output layer followed by dropout in a ``Sequential``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend, self.dropout = nn.Softmax(dim=-1), nn.Dropout(0.1)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        out = self.dropout(self.attend((q @ k.transpose(-2, -1)) * self.scale)) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class SeparateQKVAttention(nn.Module):
    """q, k and v from three linear layers, then an output layer, head size fixed at build time."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_size = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, self.head_size).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_size))


class TinyViT(nn.Module):
    """Patch embedding, pre-norm blocks of ``attention`` and an MLP, mean-pooled head."""

    def __init__(self, attention=ConstantHeadAttention, dim: int = 48, heads: int = 4, depth: int = 2,
                 masked: bool = False, **kw) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.attns = nn.ModuleList(attention(dim, heads, **kw) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(depth))
        self.head = nn.Linear(dim, 6)
        self.masked = masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        mask = torch.zeros(h.shape[1], h.shape[1], dtype=torch.bool) if self.masked else None
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            h = h + (attn(self.norms[2 * i](h), mask) if self.masked else attn(self.norms[2 * i](h)))
            h = h + mlp(self.norms[2 * i + 1](h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("attention", [ConstantHeadAttention, SeparateQKVAttention, PreNormChunkAttention])
def test_constant_head_size_attention_is_converted_and_computes_the_same(attention):
    torch.manual_seed(0)
    model = TinyViT(attention).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        assert split_self_attention(model, x[:1]) == 2
        assert all(isinstance(a, TokenAttention) for a in model.attns)
        assert torch.allclose(model(x), before, atol=1e-5)
        other = TinyViT(attention).eval()  # a dense file saved before the conversion still loads
        model.load_state_dict(other.state_dict())
        assert torch.allclose(model(x), other(x), atol=1e-5)
    assert {g.kind for g in discover_groups(model, x[:1], 6)} >= {"attention"}


@pytest.mark.parametrize("variant", ["heads outermost", "norm on the output", "called with a mask"])
def test_attention_the_conversion_does_not_reproduce_stays(variant):
    torch.manual_seed(0)
    model = {"heads outermost": lambda: TinyViT(layout="hd3"), "norm on the output": lambda: TinyViT(NormedAttention),
             "called with a mask": lambda: TinyViT(masked=True)}[variant]().eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        assert split_self_attention(model, x[:1]) == 0
        assert not any(isinstance(m, TokenAttention) for m in model.modules())
        assert torch.equal(model(x), before)


def test_a_block_also_used_through_another_method_is_put_back():
    """The conversion replaces ``forward`` only: a model that also calls another method of the
    block would break, so the whole model's output is checked and the blocks are restored."""

    class WithMethod(ConstantHeadAttention):
        def token_norms(self, x: torch.Tensor) -> torch.Tensor:
            return self.qkv(x).norm(dim=-1, keepdim=True)

    class Probed(TinyViT):
        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2)
            return super().forward(x) + self.attns[0].token_norms(h).mean()

    torch.manual_seed(0)
    model = Probed(WithMethod).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        assert split_self_attention(model, x[:1]) == 0
        assert all(type(a) is WithMethod for a in model.attns)
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("attention", [ConstantHeadAttention, SeparateQKVAttention, PreNormChunkAttention])
def test_constant_head_size_vit_compresses_to_half_the_macs_and_loads_back(tmp_path, attention):
    """Before the conversion such a block's qkv and the residual stream were kept whole: 0.5 of
    the MACs was out of reach. Now its heads lose dims at equal offsets."""
    torch.manual_seed(0)
    model = TinyViT(attention, depth=3).eval()
    x, y = torch.randn(96, 1, 16, 16), torch.randint(0, 6, (96,))
    small, report = mc.compress(model, x[:1], target=mc.MACs(0.5), train=(x, y), allocation="uniform",
                                repair=mc.RepairConfig(steps=0), guard=False, round_to=8)
    assert type(model.attns[0]) is attention  # the caller's model is untouched
    ratio = count_macs(small, x[:1]) / count_macs(model, x[:1])
    assert abs(ratio - 0.5) <= 0.02 * 0.5
    assert small.attns[0].projections()[0].out_features < 3 * 48
    small.train()
    assert small(x[:4]).shape == (4, 6)  # dropout of the attention weights in training mode
    mc.export_onnx(small, x[:1], tmp_path / "vit.onnx")
    check = mc.verify(tmp_path / "vit.onnx", small, (x[:32], y[:32]))
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    mc.save(small, tmp_path / "vit.pt", x[:1])
    assert small.training and small.attns[0].training  # export, verify and save leave the caller's mode
    small.eval()
    back, _ = mc.load_compressed(tmp_path / "vit.pt", TinyViT(attention, depth=3))
    assert torch.equal(back(x[:8]), small(x[:8]))


class MapAttention(ConstantHeadAttention):
    """Attention over a (batch, channels, height, width) map, its pixels the tokens (timm's FastViT)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        return super().forward(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class ConvAttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.attn = MapAttention(32, 4)
        self.conv = nn.Sequential(nn.Conv2d(32, 48, 3, 2, 1), nn.BatchNorm2d(48), nn.ReLU())
        self.head = nn.Linear(48, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.conv(h + self.attn(h)).mean((2, 3)))


def test_attention_over_a_feature_map_is_converted_and_pruned(tmp_path):
    torch.manual_seed(0)
    model = ConvAttentionNet().eval()
    x, y = torch.randn(96, 1, 16, 16), torch.randint(0, 6, (96,))
    converted = ConvAttentionNet().eval()
    with torch.no_grad():
        before = converted(x[:4])
        assert split_self_attention(converted, x[:1]) == 1 and isinstance(converted.attn, TokenAttention)
        assert torch.allclose(converted(x[:4]), before, atol=1e-5)
    small, _ = mc.compress(model, x[:1], target=mc.MACs(0.5), train=(x, y), allocation="uniform",
                           repair=mc.RepairConfig(steps=0), guard=False, round_to=8)
    assert abs(count_macs(small, x[:1]) / count_macs(model, x[:1]) - 0.5) <= 0.02 * 0.5
    assert small.attn.projections()[0].out_features < 3 * 32
    mc.export_onnx(small, x[:1], tmp_path / "conv.onnx")
    check = mc.verify(tmp_path / "conv.onnx", small, (x[:32], y[:32]))
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0


def test_the_policy_allocates_the_attention_groups_compress_prunes():
    """``Policy.allocate`` names the groups ``compress`` prunes (its report's ``kept``), heads
    included, and leaves the caller's model as it was (class and training mode)."""
    torch.manual_seed(0)
    model = TinyViT().train()
    x, y = torch.randn(128, 1, 16, 16), torch.randint(0, 6, (128,))
    kept = mc.load_policy().allocate(model, (x, y), 0.5)
    assert {"attns.0.qkv", "attns.1.qkv"} <= set(kept) and kept["attns.0.qkv"] <= 12
    assert isinstance(model.attns[0], ConstantHeadAttention) and model.training


class SplitSelfAttention(nn.Module):
    """Hugging Face's self-attention layout (BERT, ViT and their likes): query, key and value
    layers, the head size read as a constant, an additive mask, (context, weights) returned; the
    output projection lives in the sibling ``SelfOutput``."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.all_head_size = heads, width // heads, width
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        b, n, _ = hidden_states.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        scores = q @ k.transpose(-1, -2) / self.attention_head_size ** 0.5
        probs = self.dropout((scores if attention_mask is None else scores + attention_mask).softmax(-1))
        if head_mask is not None:
            probs = probs * head_mask
        context = (probs @ v).transpose(1, 2).reshape(b, n, self.all_head_size)
        return context, (probs if output_attentions else None)


class SelfOutput(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(context) + x)


class SplitLayer(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.attention, self.output = SplitSelfAttention(width), SelfOutput(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.output(self.attention(x, mask)[0], x)
        return h + self.ffn(h)


class KeepMaskAttention(nn.Module):
    """DistilBERT's layout: q, k, v and the output projection in the block, called with query, key
    and value and a (batch, tokens) mask that is 1 where a token may be attended to."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.n_heads, self.dim, self.dropout = heads, width, nn.Dropout(0.1)
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(width, width) for _ in range(4))

    def forward(self, query, key, value, mask, head_mask=None, output_attentions=False):
        b, size = query.shape[0], self.dim // self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.n_heads, size).transpose(1, 2)

        q, k, v = heads(self.q_lin(query)) / size ** 0.5, heads(self.k_lin(key)), heads(self.v_lin(value))
        scores = (q @ k.transpose(-1, -2)).masked_fill((mask == 0).view(b, 1, 1, -1), torch.finfo(q.dtype).min)
        context = (self.dropout(scores.softmax(-1)) @ v).transpose(1, 2).reshape(b, -1, self.dim)
        return (self.out_lin(context),)


class KeepMaskLayer(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.attention, self.norm = KeepMaskAttention(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.attention(x, x, x, keep)[0])
        return h + self.ffn(h)


class SplitTextNet(nn.Module):
    """A BERT-like (or DistilBERT-like) text classifier: token ids, padding (id 0) masked."""

    def __init__(self, layer: type = SplitLayer, vocab: int = 30, length: int = 10, width: int = 32) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(1, length, width))
        self.layers = nn.ModuleList(layer(width) for _ in range(2))
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = isinstance(self.layers[0], KeepMaskLayer)
        mask = (ids != 0).long() if keep else (ids == 0).float()[:, None, None, :] * -1e4
        h = self.embed(ids) + self.position
        for layer in self.layers:
            h = layer(h, mask)
        return self.head(h[:, 0])


@pytest.mark.parametrize("layer", [SplitLayer, KeepMaskLayer])
def test_hugging_face_attention_layouts_are_converted_and_pruned_by_head_dims(tmp_path, layer):
    """Hugging Face's layouts (the output projection in a sibling module, an additive mask; or in
    the block, called with query, key and value and a keep mask): the block is rebuilt where it
    computes the same, its heads lose dims at equal offsets together with the output projection,
    and the compressed model exports and loads back; an argument the conversion did not see is
    refused."""
    from metacompress.compress.attention import HeadAttention

    torch.manual_seed(0)
    model = SplitTextNet(layer).eval()
    ids, y = torch.randint(1, 30, (96, 10)), torch.randint(0, 3, (96,))
    ids[:, 7:] = 0
    converted = copy.deepcopy(model)
    assert split_self_attention(converted, ids[:1]) == 2
    assert all(type(layer.attention) is HeadAttention for layer in converted.layers)
    first = converted.layers[0]
    proj = first.output.dense if layer is SplitLayer else first.attention.out_lin
    assert first.attention.projections()[1] is proj
    assert sum(p is proj.weight for p in converted.parameters()) == 1  # the sibling's layer is listed once
    with torch.no_grad():
        assert (converted(ids) - model(ids)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="given output_attentions"):
        x = torch.randn(2, 10, 32)
        first.attention(x, None, None, True) if layer is SplitLayer else first.attention(x, x, x, None, None, True)
    small, _ = mc.compress(model, ids[:1], target=mc.MACs(0.5), train=(ids, y), allocation="uniform",
                           repair=mc.RepairConfig(steps=0), guard=False, round_to=2)
    assert abs(count_macs(small, ids[:1]) / count_macs(model, ids[:1]) - 0.5) <= 0.02 * 0.5
    attention = small.layers[0].attention
    assert attention.head_dim < 8 and attention.projections()[1].in_features == 4 * attention.head_dim
    mc.export_onnx(small, ids[:1], tmp_path / "split.onnx")
    check = mc.verify(tmp_path / "split.onnx", small, (ids[:32], y[:32]))
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    mc.save(small, tmp_path / "split.pt", ids[:1])
    back, _ = mc.load_compressed(tmp_path / "split.pt", SplitTextNet(layer))
    assert torch.equal(back(ids[:8]), small(ids[:8]))
