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

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metacompress.compress.measure import composed_attention
from metacompress.meta.modules import eval_mode


class QkvAttention(nn.Module):
    """Multi-head self-attention over one ``qkv`` projection (q, k, v stacked, heads contiguous in
    each) and an output projection. The head size is read from the ``qkv`` layer at run time and
    the softmax temperature fixed at construction, so the attention group may drop the same dims
    from every head; ``groups.attention_blocks`` finds every subclass by ``projections()``."""

    num_heads: int
    scale: float

    def projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The (qkv, output projection) linear layers."""
        return self.qkv, self.proj

    @property
    def head_dim(self) -> int:
        return self.projections()[0].out_features // 3 // self.num_heads

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Heads' outputs side by side (batch, tokens, heads * head size), before the output
        projection, and the attention weights (batch, heads, tokens, tokens) if asked for, of
        tokens ``x`` (batch, tokens, width); ``mask``: an additive term broadcast over the scores.
        Without weights, PyTorch's fused kernel computes it without holding the score matrix."""
        b, n, _ = x.shape
        heads, dim = self.num_heads, self.head_dim
        q, k, v = self.projections()[0](x).reshape(b, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
        p = dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            out = (F.dropout(weights, p) if p > 0 else weights) @ v
        else:
            weights, out = None, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, heads * dim), weights


class SelfAttention(QkvAttention):
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
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, b, self.num_heads, n, x.dtype)
        heads_out, weights = self._attend(x, mask, self.dropout, need_weights)
        out = self.proj(heads_out)
        out = out if self.batch_first else out.transpose(0, 1)
        out = out.squeeze(0 if self.batch_first else 1) if unbatched else out
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights[0] if unbatched else weights)


class TokenAttention(QkvAttention):
    """A model's own self-attention block, ``forward(x)`` on (batch, tokens, width) tokens or on a
    (batch, channels, height, width) map whose pixels are the tokens (timm's ``Attention`` and
    the blocks written like it), rebuilt on its own layers: the ``qkv`` linear layer and the
    output projection (a linear layer, or a ``Sequential`` that starts with one followed by
    parameter-free layers) stay the same modules under the same names, so the state dict is
    unchanged. Separate q, k and v layers are fused into one ``qkv`` layer (a state dict with the
    separate weights still loads: they are fused on loading). Such blocks read their head size as
    a constant; this one reads it from the ``qkv`` layer, so heads can lose dims.
    ``convert_token_attention`` only installs it where it computes what the block computed."""

    def __init__(self, children: dict[str, nn.Module], qkv_name: str, proj_name: str, num_heads: int,
                 scale: float, fused_from: tuple[str, ...] = (), norm_name: str | None = None):
        super().__init__()
        for name, child in children.items():  # same names: the state dict and dropout layers carry over
            self.add_module(name, child)
        self.qkv_name, self.proj_name, self.num_heads, self.scale = qkv_name, proj_name, num_heads, scale
        self.fused_from, self.norm_name = fused_from, norm_name  # norm_name: a LayerNorm applied to the input first
        if fused_from:
            self.register_load_state_dict_pre_hook(_fuse_saved_projections)


    def projections(self) -> tuple[nn.Linear, nn.Linear]:
        proj = self._modules[self.proj_name]
        return self._modules[self.qkv_name], (proj[0] if isinstance(proj, nn.Sequential) else proj)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("this attention block was converted for pruning from calls without a mask: "
                             "it does not take attn_mask or is_causal")
        image = x.dim() == 4  # (batch, channels, height, width): its pixels are the tokens
        tokens = x.flatten(2).transpose(1, 2) if image else x
        tokens = self._modules[self.norm_name](tokens) if self.norm_name else tokens
        drop = self._modules.get("attn_drop")
        heads_out, _ = self._attend(tokens, None, drop.p if isinstance(drop, nn.Dropout) else 0.0)
        out = self._modules[self.proj_name](heads_out)
        after = self._modules.get("proj_drop")
        out = after(out) if isinstance(after, nn.Dropout) else out
        return out.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:]) if image else out


def _fuse_saved_projections(module: TokenAttention, state_dict: dict, prefix: str, *_) -> None:
    """A state dict saved before the conversion holds separate q, k and v weights: fused on load."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in module.fused_from]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{module.qkv_name}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])


MASK_NAMES = ("attention_mask", "mask", "attn_mask")  # where a Hugging Face style block takes its mask


@dataclass(frozen=True)
class BlockCall:
    """How a Hugging Face style attention block is called and what it returns."""

    arg_names: tuple[str, ...]  # its positional parameters in order; the first takes the hidden states
    outputs: int                # the length of the tuple it returns; 0 for a tensor
    keep_mask: bool = False     # its mask is (batch, tokens), nonzero where a token may be attended to


class HeadAttention(QkvAttention):
    """Self-attention laid out as in Hugging Face models: query, key and value projections in the
    block (fused here into one ``qkv`` layer; a state dict with the separate weights still loads)
    and the output projection either in the block (DistilBERT) or in a sibling module that reads
    the block's output (``BertSelfOutput`` and its likes; held by reference, not as a child, so
    the state dict does not list it twice). Called as the block was (``BlockCall``): the hidden
    states (also passed as ``key`` and ``value``, if the block takes them) and an optional mask
    (added to the scores, a boolean mask as ``scaled_dot_product_attention`` takes it, or a
    (batch, tokens) keep mask); every other argument must be unset. Returns what the block
    returned: alone or first in a tuple of that length (attention weights are not computed: None)."""

    def __init__(self, children: dict[str, nn.Module], proj: nn.Linear | str, num_heads: int, scale: float,
                 dropout: float, call: BlockCall, fused_from: tuple[str, ...]):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.proj_name = proj if isinstance(proj, str) else None  # the projection's name when it is a child
        object.__setattr__(self, "_proj", None if isinstance(proj, str) else proj)
        self.num_heads, self.scale, self.dropout_p, self.call = num_heads, scale, dropout, call
        self.qkv_name, self.fused_from = "qkv", fused_from
        self.register_load_state_dict_pre_hook(_fuse_saved_projections)

    def projections(self) -> tuple[nn.Linear, nn.Linear]:
        return self.qkv, (self._modules[self.proj_name] if self.proj_name else self._proj)

    def forward(self, *args, **kwargs):
        named = dict(zip(self.call.arg_names, args)) | kwargs
        x = named.pop(self.call.arg_names[0])
        for name in ("key", "value"):
            if named.get(name) is x:
                named.pop(name)
        mask = next((named.pop(n) for n in MASK_NAMES if n in named), None)
        given = sorted(k for k, v in named.items() if v is not None and v is not False)
        if given:
            raise ValueError(f"this attention block was converted for pruning from calls with hidden states and "
                             f"a mask only; it was given {', '.join(given)}")
        if mask is not None and self.call.keep_mask:
            mask = mask.reshape(mask.shape[0], 1, 1, -1) != 0
        out, _ = self._attend(x, mask, self.dropout_p)
        out = self._modules[self.proj_name](out) if self.proj_name else out
        return (out, *[None] * (self.call.outputs - 1)) if self.call.outputs else out


_HEAD_COUNT_NAMES = ("num_heads", "heads", "n_heads", "n_head", "nhead")


def _token_attention_for(block: nn.Module) -> list[TokenAttention]:
    """``TokenAttention`` candidates that may replace ``block``, one per plausible softmax scale
    (the block's ``scale`` attribute, and one over the square root of the head size); none where
    its layers are not a qkv projection (or q, k and v projections) and an output projection,
    besides at most one LayerNorm (taken as the input's norm), or it owns other parameters."""
    if isinstance(block, QkvAttention) or any(True for _ in block.parameters(recurse=False)):
        return []
    children = dict(block.named_children())
    norms = [n for n, c in children.items() if isinstance(c, nn.LayerNorm)]
    norm_name = norms[0] if len(norms) == 1 else None  # one norm inside: tried as applied to the input first
    roles = _projection_roles({n: c for n, c in children.items() if n != norm_name})
    if roles is None:
        return []
    children, qkv_name, proj_name, fused_from = roles
    children = {norm_name: block.get_submodule(norm_name), **children} if norm_name else children
    width = children[qkv_name].out_features // 3
    heads = [v for n in _HEAD_COUNT_NAMES if isinstance(v := getattr(block, n, None), int) and v > 0 and width % v == 0]
    if not heads:
        return []
    scales = [getattr(block, "scale", None), (width // heads[0]) ** -0.5]
    scales = list(dict.fromkeys(float(v) for v in scales if isinstance(v, (int, float)) and v > 0))
    return [TokenAttention(children, qkv_name, proj_name, heads[0], scale, fused_from, norm_name).train(block.training)
            for scale in scales]


def _projection_roles(children: dict[str, nn.Module]) -> tuple[dict[str, nn.Module], str, str, tuple[str, ...]] | None:
    """(children of the rebuilt block, qkv name, output projection name, names of the q, k and v
    layers fused into ``qkv``) for a block whose weighted children are a qkv and an output
    projection, or q, k and v projections (in that order) and an output projection."""
    weighted = [n for n, c in children.items() if any(True for _ in c.parameters())]
    first = {n: (children[n][0] if isinstance(children[n], nn.Sequential) and len(children[n]) else children[n])
             for n in weighted}
    if not all(isinstance(c, nn.Linear) for c in first.values()) or any(
            True for n in weighted if isinstance(children[n], nn.Sequential) for m in list(children[n])[1:]
            for _ in m.parameters()):
        return None
    if len(weighted) == 2:
        a, b = weighted
        qkv_name, proj_name = (a, b) if first[a].out_features == 3 * first[b].in_features else (b, a)
        if children[qkv_name] is not first[qkv_name] or first[qkv_name].out_features != 3 * first[proj_name].in_features:
            return None
        return children, qkv_name, proj_name, ()
    if len(weighted) != 4 or "qkv" in children:
        return None
    *qkv, proj_name = weighted
    layers = [children[n] for n in qkv]
    if any(children[n] is not first[n] for n in qkv) or first[proj_name].in_features != layers[0].out_features or \
            len({(m.in_features, m.out_features, m.bias is not None) for m in layers}) != 1:
        return None
    rest = {n: c for n, c in children.items() if n not in qkv}
    return {"qkv": _fused_linear(layers), **rest}, "qkv", proj_name, tuple(qkv)


def _fused_linear(layers: list[nn.Linear]) -> nn.Linear:
    """One linear layer computing ``layers``' outputs side by side."""
    ref = layers[0].weight
    fused = nn.Linear(layers[0].in_features, sum(m.out_features for m in layers), bias=layers[0].bias is not None,
                      device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in layers]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in layers]))
    return fused


def _head_layout(block: nn.Module) -> tuple[list[str], int, list[float], float] | None:
    """(q, k and v layer names, and the output projection's if the block holds it; heads;
    plausible softmax scales; attention dropout) of a block laid out as Hugging Face's
    self-attention: three linear layers of one shape (then, optionally, the output projection),
    dropout, a head count; None for anything else (other weighted layers or parameters: relative
    position terms, norms)."""
    if isinstance(block, QkvAttention) or any(True for _ in block.parameters(recurse=False)):
        return None
    children = dict(block.named_children())
    linears = [n for n, c in children.items() if isinstance(c, nn.Linear)]
    if len(linears) not in (3, 4) or any(any(True for _ in c.parameters()) for n, c in children.items()
                                         if n not in linears):
        return None
    layers = [children[n] for n in linears]
    if len({(m.in_features, m.out_features, m.bias is not None) for m in layers[:3]}) != 1 or \
            (len(layers) == 4 and layers[3].in_features != layers[0].out_features):
        return None
    width = layers[0].out_features
    names = ("num_attention_heads", *_HEAD_COUNT_NAMES)
    heads = [v for n in names if isinstance(v := getattr(block, n, None), int) and v > 0 and width % v == 0]
    if not heads:
        return None
    scales = [getattr(block, "scaling", None), (width // heads[0]) ** -0.5]
    scales = list(dict.fromkeys(float(v) for v in scales if isinstance(v, (int, float)) and v > 0))
    drops = [c.p for c in children.values() if isinstance(c, nn.Dropout)]
    return linears, heads[0], scales, float(drops[0] if drops else getattr(block, "dropout_prob", 0.0))


def _head_calls(model: nn.Module, example: torch.Tensor, blocks: list[nn.Module]) -> dict[nn.Module, tuple[list, nn.Linear]]:
    """Each block's calls (args, kwargs, output) in one pass, and the one linear layer that reads
    its output (an output projection outside the block; None where no single one does)."""
    calls: dict[nn.Module, list] = {}
    readers: dict[int, set[nn.Linear]] = {}  # by id of a recorded output (kept alive in ``calls``)
    if not blocks:
        return {}

    def record(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        calls.setdefault(module, []).append((args, kwargs, output))
        first = output[0] if isinstance(output, tuple) and output else output
        if isinstance(first, torch.Tensor):
            readers.setdefault(id(first), set())

    def read(module: nn.Module, args: tuple) -> None:
        if args and id(args[0]) in readers:
            readers[id(args[0])].add(module)

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in blocks]
    hooks += [m.register_forward_pre_hook(read) for m in model.modules() if isinstance(m, nn.Linear)]
    _pass_with_hooks(model, example, hooks)
    found = {}
    for block, recorded in calls.items():
        outs = [out[0] if isinstance(out, tuple) and out else out for _, _, out in recorded]
        projs = {p for o in outs for p in readers.get(id(o), ())}
        single = len(projs) == 1 and all(isinstance(o, torch.Tensor) and readers.get(id(o)) for o in outs)
        found[block] = (recorded, projs.pop() if single else None)
    return found


def _head_replacements(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, HeadAttention]:
    """Each Hugging Face style self-attention block's ``HeadAttention``, where it gives the
    block's recorded outputs from its recorded inputs."""
    layouts = {m: lay for m in model.modules() if m is not model and (lay := _head_layout(m)) is not None}
    made = {}
    with torch.no_grad(), composed_attention():
        for block, (recorded, reader) in _head_calls(model, example, list(layouts)).items():
            linears, heads, scales, dropout = layouts[block]
            qkv, inner = linears[:3], linears[3] if len(linears) == 4 else None
            proj = inner or reader
            if proj is None or (not inner and reader.in_features != block.get_submodule(qkv[0]).out_features):
                continue
            params = tuple(p.name for p in inspect.signature(block.forward).parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
            out = recorded[0][2]
            children = {"qkv": _fused_linear([block.get_submodule(n) for n in qkv]),
                        **{n: c for n, c in block.named_children() if n not in qkv}}
            calls = [BlockCall(params, len(out) if isinstance(out, tuple) else 0, keep) for keep in (False, True)]
            for scale, call in ((scale, call) for scale in scales for call in calls):
                candidate = HeadAttention(children, proj, heads, scale, dropout, call, tuple(qkv)).train(block.training)
                if all(_same_call(candidate, args, kwargs, ref) for args, kwargs, ref in recorded):
                    made[block] = candidate
                    break
    return made


def _same_call(candidate: nn.Module, args: tuple, kwargs: dict, ref) -> bool:
    """Whether ``candidate(*args, **kwargs)`` gives ``ref`` (a tensor, or a tuple led by one)."""
    try:
        out = candidate(*args, **kwargs)
    except (ValueError, RuntimeError, TypeError):  # an argument it does not take, or another layout
        return False
    if isinstance(ref, tuple):
        return isinstance(out, tuple) and len(out) == len(ref) and _same(out[0], ref[0])
    return isinstance(out, torch.Tensor) and _same(out, ref)


def _candidates(model: nn.Module) -> dict[nn.Module, list[TokenAttention]]:
    """Each module of ``model`` that might be token attention, with its possible replacements."""
    hints = model.pruning_hints() if hasattr(model, "pruning_hints") else {}
    declared = {id(qkv) for qkv, _, _ in hints.get("attention", [])}  # already prunable by head dims
    found = {m: _token_attention_for(m) for m in model.modules()
             if m is not model and not any(id(c) in declared for c in m.children())}  # the root has no slot
    return {m: made for m, made in found.items() if made}


def _token_calls(model: nn.Module, example: torch.Tensor,
                 candidates: list[nn.Module]) -> dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(input, output) of each call of each of ``candidates``, in one pass; a module also called
    otherwise than as ``block(x)`` on tokens or a feature map is left out."""
    calls: dict[nn.Module, list] = {}
    if not candidates:
        return calls
    refused: set[nn.Module] = set()

    def record(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        plain = len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() in (3, 4) and \
            all(v is None or v is False for v in kwargs.values()) and isinstance(output, torch.Tensor)
        if plain:
            calls.setdefault(module, []).append((args[0], output))
        else:
            refused.add(module)

    _pass_with_hooks(model, example, [m.register_forward_hook(record, with_kwargs=True) for m in candidates])
    return {m: c for m, c in calls.items() if m not in refused}


def _pass_with_hooks(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One batch-1 inference pass of ``example`` through ``model`` for its hooks, removed after."""
    try:
        with torch.no_grad(), composed_attention():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return out.shape == ref.shape and bool((out - ref).abs().max() <= 1e-5 * (1 + ref.abs().max()))


def convert_token_attention(model: nn.Module, example: torch.Tensor) -> int:
    """Replace, in place, each self-attention block that ``model`` calls as ``block(x)`` on tokens
    (or a feature map) and that ``TokenAttention`` reproduces, and each block in Hugging Face's
    layout that ``HeadAttention`` reproduces (each checked on its inputs in one forward pass of
    ``example``, then all on the whole model's output); returns how many were replaced. A block
    that computes anything else (another layout of q, k and v, a norm inside, relative position
    terms, cross-attention) stays as it is."""
    with eval_mode(model):
        made = _head_replacements(model, example) | _equivalent_replacements(model, example)  # TokenAttention first
        if made and not _swap_if_unchanged(model, made, example):
            made = {}
    for old, new in made.items():  # the replaced block's flag was restored; its replacement takes it
        new.train(old.training)
    return len(made)


def _equivalent_replacements(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, TokenAttention]:
    """Each recorded block's replacement that gives its recorded outputs from its recorded inputs."""
    candidates, made = _candidates(model), {}
    with torch.no_grad(), composed_attention():
        for block, calls in _token_calls(model, example, list(candidates)).items():
            for candidate in candidates[block]:
                if all(_same(candidate(x), y) for x, y in calls):
                    made[block] = candidate
                    break
    return made


def _swap_if_unchanged(model: nn.Module, made: dict[nn.Module, nn.Module], example: torch.Tensor) -> bool:
    """Install ``made`` and keep it if the model's outputs on ``example`` do not change (a block
    used through another method than ``forward`` would break); otherwise put the blocks back."""
    from torch.utils._pytree import tree_leaves

    with torch.no_grad(), composed_attention():
        before = [t for t in tree_leaves(model(example[:1])) if isinstance(t, torch.Tensor)]
        _replace_children(model, made)
        try:
            after = [t for t in tree_leaves(model(example[:1])) if isinstance(t, torch.Tensor)]
            kept = len(after) == len(before) and all(_same(a, b) for a, b in zip(after, before))
        except Exception:  # noqa: BLE001 - the model's own code failed on the replacement: keep the original
            kept = False
    if not kept:
        _replace_children(model, {new: old for old, new in made.items()})
    return kept


def _replace_children(model: nn.Module, made: dict[nn.Module, nn.Module]) -> None:
    """Every child slot holding a key of ``made`` holds its value afterwards (shared blocks stay shared)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in made:
                setattr(parent, name, made[child])


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
    if not mhas:
        return calls
    _pass_with_hooks(model, example, [m.register_forward_pre_hook(record, with_kwargs=True) for m in mhas])
    return calls


def _convertible(mha: nn.MultiheadAttention) -> bool:
    """Same width for query, key and value, no learned extra key/value, no zero-attention column."""
    return mha._qkv_same_embed_dim and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn


def split_self_attention(model: nn.Module, example: torch.Tensor) -> int:
    """Make, in place, the self-attention blocks of ``model`` prunable by head dims: each
    ``nn.MultiheadAttention`` it calls as self-attention becomes an equivalent ``SelfAttention``,
    and each block of its own that ``TokenAttention`` or ``HeadAttention`` reproduces becomes one
    (``convert_token_attention``). Returns how many were replaced. Cross-attention and other
    variants stay as they are (their width is then pruned with the residual stream, or kept)."""
    return _split_multihead(model, example) + convert_token_attention(model, example)


def _split_multihead(model: nn.Module, example: torch.Tensor) -> int:
    calls = _self_attention_calls(model, example)
    chosen = {m for m, self_only in calls.items() if self_only and _convertible(m)}
    made: dict[nn.MultiheadAttention, SelfAttention] = {}  # a block used in two places stays shared
    for parent in list(model.modules()) if chosen else []:
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
    has an ``nn.MultiheadAttention``, and ``TokenAttention`` blocks, with unchanged weight names,
    whose head size may have shrunk), so that the state loads and runs."""
    modules = dict(model.named_modules())
    suffix = ".qkv.weight"
    if any(isinstance(modules.get(key[:-len(suffix)]), nn.MultiheadAttention)
           for key in state_dict if key.endswith(suffix)):
        _split_multihead(model, example)
    convert_token_attention(model, example)
