"""What is coupled: a model's prunable groups, found with torch-pruning's dependency graph.

A group is a set of channels that must be removed together (a conv's outputs, the BN after
it, the next layer's inputs, and everything tied to them through residual additions). Each
group has one *root* layer, named by its module path, which is how allocations address it.
Attention blocks are handled here too: their qkv projection is pruned by head dimension,
the same dims in every head of q, k and v, so that the block keeps its shape.

Some attention blocks compute with shapes read off their input width (torchvision's Swin derives
its head size from it, MaxViT reshapes its heads' output back to it), and torch-pruning's trace of
their reshapes, rolls and window partitions explodes in time and memory (swin_t: no group after
minutes, then out of memory). Such blocks are *opaque* (``_opaque_types``): the graph treats each
as one width-preserving layer and never prunes the width it sits on, while the layers around it
(MLPs, MaxViT's convolutions) are pruned.

Grouped convolutions (``groups > 1``, not depthwise: ResNeXt, RegNet) split their channels into
G conv groups of equal width, and torch-pruning slices their input weights by keeping the first
kept indices of conv group 0 (``ConvPruner.prune_in_channels``), which is only right when every
conv group loses the same in-group offsets. A group that touches such a conv therefore carries
``conv_groups`` G and a ``quantum`` (kept units are always a multiple of it): ``apply`` drops
the same offsets in each of the G conv groups, so ``groups`` stays valid and the slicing exact.
A GroupNorm is handled alike: its norm groups are G blocks of equal width (one with a single
channel per norm group, ``GroupNorm(C, C)``, shrinks its ``num_groups`` with its channels instead).

torch-pruning does not see everything a forward pass does with a width: a per-channel buffer, a
head count or width written as a constant in a hand-written attention. ``discover_groups``
therefore removes one unit of every group from a copy of the model and runs it, then half of
every group's units; a group whose removal breaks the forward pass (found by halving) is kept
whole, with the reason, and the others are pruned.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.pruner.function import BasePruningFunc

from metacompress.compress.attention import QkvAttention
from metacompress.compress.split_pieces import equal_pieces, order_pieces, split_producers
from metacompress.errors import UserError, first_line
from metacompress.meta.modules import eval_mode

KINDS = ("conv", "depthwise", "linear", "attention")
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # pruned by channel, whatever the spatial rank
PRUNABLE_LAYERS = (*CONV_LAYERS, nn.Linear)    # group roots: their output units are what a group keeps
# transposed convolutions are never roots, but a group prunes their input channels: they are
# members whose MACs and parameters shrink with it
CHANNEL_LAYERS = (*CONV_LAYERS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WIDTH_LAYERS = (*CHANNEL_LAYERS, nn.Linear)
# norms a group shrinks with its channels (BatchNorm and InstanceNorm are _NormBase)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


MISMAPPED = "torch-pruning maps its channels wrongly through a layer it does not follow (a channel padding, ...)"


def pruning_error(what: str, exc: Exception, why: str | None = None) -> UserError:
    """The one-line error for a failure inside torch-pruning: what failed, why if known, its own message."""
    return UserError(f"{what}: {f'{why}: ' if why else ''}{type(exc).__name__}: {exc}")


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, CONV_LAYERS)


def in_width(layer: nn.Module) -> int:
    """Input channels of a conv, input features of a linear layer."""
    return layer.in_channels if isinstance(layer, CHANNEL_LAYERS) else layer.in_features


def out_width(layer: nn.Module) -> int:
    """Output channels of a conv, output features of a linear layer."""
    return layer.out_channels if isinstance(layer, CHANNEL_LAYERS) else layer.out_features


def kernel_area(conv: nn.Module) -> int:
    """Taps of one output position per input channel (k for 1-D, k x k for 2-D, ...)."""
    return math.prod(conv.kernel_size)


def norm_width(norm: nn.Module) -> int:
    """Channels a norm layer normalises (its affine scale's length where it has one)."""
    if getattr(norm, "weight", None) is not None:
        return norm.weight.numel()
    return int(getattr(norm, "num_features", 0) or getattr(norm, "num_channels", 0))


def is_depthwise(m: nn.Module) -> bool:
    return is_conv(m) and m.groups > 1 and m.groups == m.in_channels


def out_channel_pruner(root: nn.Module):
    """torch-pruning's function that removes ``root``'s output units."""
    return tp.prune_conv_out_channels if is_conv(root) else tp.prune_linear_out_channels


def prune_group(group) -> None:
    """Prune a torch-pruning group, and with every conv or linear layer whose outputs it removes,
    that layer's own per-output tensors besides ``weight`` and ``bias`` (a subclass's gain or
    scale, as in weight-standardised convs), which torch-pruning leaves at the old width."""
    extras = [(dep.target.module, idxs) for dep, idxs in group
              if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels)]
    extras = [(layer, idxs, _per_output_tensors(layer)) for layer, idxs in extras]
    group.prune()
    for layer, idxs, names in extras:
        for name in names:
            old = getattr(layer, name)
            kept = torch.tensor(sorted(set(range(old.shape[0])) - set(idxs)), dtype=torch.long)
            new = old.detach().index_select(0, kept)
            if isinstance(old, nn.Parameter):
                setattr(layer, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                layer._buffers[name] = new


def _per_output_tensors(layer: nn.Module) -> list[str]:
    """Names of ``layer``'s own parameters and buffers, other than weight and bias, that hold one
    entry per output unit (first axis as long as the weight's output axis)."""
    if getattr(layer, "transposed", False):
        return []
    width = layer.weight.shape[0]
    own = [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]
    return [name for name, t in own if name not in ("weight", "bias") and t is not None and t.dim() >= 1
            and t.shape[0] == width]


@dataclass
class Group:
    """One prunable group: ``channels`` units that can be kept in multiples of ``step``."""

    name: str                 # module path of the root layer
    channels: int             # prunable units (channels, or per-head dims for attention)
    kind: str                 # one of KINDS
    out_layers: list[str]     # conv/linear layers whose outputs this group prunes
    in_layers: list[str]      # conv/linear layers whose inputs this group prunes
    norm_layers: list[str] = field(default_factory=list)  # BN / LayerNorm layers pruned with it
    step: int = 1             # rounding step in units
    heads: int = 1            # attention heads (units are per-head dims)
    kernel: int = 1           # kernel area of the root layer
    stride: int = 1
    residual: bool = False    # coupled through a residual addition (several producers)
    conv_groups: int = 1      # G: units form G equal conv groups, pruned at the same offsets in each
    quantum: int = 1          # kept units are always a multiple of this (even when rounding falls back)
    partial: dict[str, float] = field(default_factory=dict)  # "out:/in:/norm:" + layer -> share of its width
    unsafe: str = ""          # why removing its units cannot be trusted (kept whole; see ``discover_groups``)
    extra: dict = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        """Whether its units can only go all together: untrusted, or one unit of all its channels."""
        return bool(self.unsafe) or self.quantum >= self.channels


def find_classifier(model: nn.Module, num_classes: int) -> nn.Module | None:
    """The layer that produces the class scores: its outputs are never pruned."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            last = module
        elif is_conv(module) and module.out_channels == num_classes:
            last = module
    return last


def attention_blocks(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear, int]]:
    """(qkv, proj, num_heads) triples: those the model declares through ``pruning_hints()``, and
    its attention blocks converted by ``attention.split_self_attention``."""
    hints = model.pruning_hints() if hasattr(model, "pruning_hints") else {}
    declared = list(hints.get("attention", []))
    seen = {id(qkv) for qkv, _, _ in declared}
    converted = [(*m.projections(), m.num_heads) for m in model.modules()
                 if isinstance(m, QkvAttention) and id(m.projections()[0]) not in seen]
    return declared + converted


@functools.cache
def _opaque_types() -> dict[type, str]:
    """Opaque block types (module doc) and the linear layer whose input width is the block's width."""
    try:
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except ImportError:  # torchvision is optional; without it there are no such blocks to find
        return {}
    return {ShiftedWindowAttention: "qkv", ShiftedWindowAttentionV2: "qkv", RelativePositionalMultiHeadAttention: "to_qkv"}


def opaque_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's opaque blocks: kept whole, together with the width they read and write."""
    types = tuple(_opaque_types())
    return [m for m in model.modules() if types and isinstance(m, types)]


class _KeptWhole(BasePruningFunc):
    """torch-pruning's handler of an opaque block: a layer of constant width that is never pruned
    (its blocks are ignored layers, so no group that touches them is yielded)."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise RuntimeError(f"an opaque block ({type(layer).__name__}) was asked to prune channels: its groups "
                           "should have been ignored")

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, _opaque_types()[type(layer)]).in_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.get_out_channels(layer)


class _ChannelShuffles(TorchFunctionMode):
    """Records the autograd nodes of every channel shuffle in a forward pass with gradients: a
    view of (N, C, H, W) as (N, G, C/G, H, W) (``view``, ``reshape`` or ``unflatten``), a
    transpose or permute that swaps the two channel factors and the op back to 4-D (ShuffleNet),
    or a call of the shuffle itself (``nn.ChannelShuffle``, ``F.channel_shuffle``).

    torch-pruning maps a reshape's indices only as a flatten (and divides by zero on a shuffle's)
    and follows a transpose as if it kept channels in place, so the permutation is lost: pruning
    through it would give a wrong model (upstream: ShuffleNet is open as VainF/Torch-Pruning#14).
    The dependency graph built from the same pass leaves these nodes unmapped, and the groups
    whose channels pass through them are kept whole; layers between shuffles (a ShuffleNet
    branch's inner width) are still pruned."""

    VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten}
    SWAPS = {torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute}
    SHUFFLES = {"channel_shuffle", "native_channel_shuffle"}

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[object, tuple[object, bool]] = {}  # a split's 5-D node -> (node before the split, swapped yet)
        self.nodes: set[object] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)) or out.grad_fn is None:
            return out
        if getattr(func, "__name__", "") in self.SHUFFLES:
            self.nodes |= _nodes_between(out.grad_fn, x.grad_fn)
        elif x.grad_fn is not None and x.grad_fn in self.open:
            before, swapped = self.open[x.grad_fn]
            swapped = swapped or (func in self.SWAPS and _swaps_1_2(func, args, kwargs, x.dim()))
            if out.dim() == 5:
                self.open[out.grad_fn] = (before, swapped)
            elif swapped:
                self.nodes |= _nodes_between(out.grad_fn, before)
        elif func in self.VIEWS and _splits_channels(x, out):
            self.open[out.grad_fn] = (x.grad_fn, False)
        return out


def _splits_channels(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``out`` is (N, C, H, W) ``x`` viewed as (N, G, C/G, H, W), G > 1."""
    return x.dim() == 4 and out.dim() == 5 and out.shape[0] == x.shape[0] and out.shape[3:] == x.shape[2:] \
        and out.shape[1] > 1 and out.shape[1] * out.shape[2] == x.shape[1]


def _swaps_1_2(func, args, kwargs, ndim: int) -> bool:
    """Whether a transpose/permute call exchanges dims 1 and 2 (the group and per-group axes)."""
    rest = list(args[1:]) + list((kwargs or {}).values())
    if func in (torch.Tensor.permute, torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = [d % ndim for d in dims]
        return len(dims) == ndim and dims[1] == 2 and dims[2] == 1
    return len(rest) >= 2 and {rest[0] % ndim, rest[1] % ndim} == {1, 2}


def _nodes_between(end: object, start: object, most: int = 64) -> set[object]:
    """The autograd nodes from ``end`` back to (not including) ``start``: the ops of one shuffle."""
    seen: set[object] = set()
    todo = [end]
    while todo and len(seen) < most:
        fn = todo.pop()
        if fn is None or fn is start or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return seen


_tp_reshape_mapping = tp_index_mapping.update_reshape_index_mapping


def _reshape_mapping(graph: tp.DependencyGraph, node) -> None:
    """torch-pruning's reshape index mapping, except for the reshapes of a channel shuffle, which
    it cannot express (it divides by zero on them): they are left unmapped and their groups kept
    whole. torch-pruning calls it by its module's name on every group it builds, so it is
    replaced there once, for graphs ``_trace`` builds (the others have no shuffle nodes)."""
    if node.grad_fn not in getattr(graph, "channel_shuffle_nodes", ()):
        _tp_reshape_mapping(graph, node)


tp_index_mapping.update_reshape_index_mapping = _reshape_mapping


class _ConcatSizes(TorchFunctionMode):
    """Records the channel sizes of every concatenation along dim 1 in a forward pass with
    gradients, keyed by the output's autograd node. torch-pruning infers them by walking the graph
    and gives up past a recursion depth (DPN's chains of dense-path concatenations); then it adds
    None to an int (upstream: ``update_concat_index_mapping`` sums before it checks for None)."""

    CATS = {torch.cat, torch.concat, torch.concatenate}

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[object, list[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.CATS and isinstance(out, torch.Tensor) and out.grad_fn is not None and out.dim() > 1:
            tensors = args[0] if args else (kwargs or {}).get("tensors", ())
            dim = (list(args[1:2]) or [(kwargs or {}).get("dim", (kwargs or {}).get("axis", 0))])[0]
            if dim % out.dim() == 1:
                self.sizes[out.grad_fn] = [t.shape[1] for t in tensors if t.grad_fn is not None or t.requires_grad]
        return out


_tp_concat_mapping = tp_index_mapping.update_concat_index_mapping


def _concat_mapping(graph: tp.DependencyGraph, node) -> None:
    """torch-pruning's concatenation index mapping, with the sizes the traced pass recorded
    (``_ConcatSizes``) where they match the node's inputs, so that no size is left to inference."""
    sizes = getattr(graph, "concat_sizes", {}).get(node.grad_fn)
    if node.type == tp.ops.OPTYPE.CONCAT and sizes is not None and len(sizes) == len(node.inputs):
        node.module.concat_sizes = sizes
    _tp_concat_mapping(graph, node)


tp_index_mapping.update_concat_index_mapping = _concat_mapping


def through_shuffle(group, dg: tp.DependencyGraph) -> bool:
    """Whether a torch-pruning group's channels pass through a channel shuffle of ``dg``'s model."""
    nodes = getattr(dg, "channel_shuffle_nodes", set())
    return bool(nodes) and any(dep.source.grad_fn in nodes or dep.target.grad_fn in nodes for dep, _ in group)


def refuse_unsupported(model: nn.Module, example: torch.Tensor) -> None:
    """Refuse, before any pruning work, constructs whose channels cannot be pruned correctly.

    Recurrent layers (RNN, LSTM, GRU): torch-pruning 1.6 traces a GRU into an index error and an
    RNN into its raw parameters, and the flop counter gives an LSTM no MACs.
    """
    recurrent = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if recurrent:
        name, kind = recurrent[0]
        raise UserError(f"cannot prune a model with recurrent layers ({kind} '{name}'): their gates tie input and "
                        "hidden widths that the dependency graph and the MACs count do not model")


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    model.eval()
    refuse_unsupported(model, example)
    try:
        return _trace(model, example)
    except Exception as exc:
        raise pruning_error("cannot trace the model for pruning", exc) from None


def _trace(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` (in eval mode), with our handlers of opaque
    blocks and per-channel GroupNorms, and channel splits linked piece by piece (``split_pieces``)."""
    hints = model.pruning_hints() if hasattr(model, "pruning_hints") else {}
    with warnings.catch_warnings():
        # plain parameters (class tokens, layer scales) follow their last non-singleton axis,
        # which is the channel axis in the models it occurs in; the warning would only alarm
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        shuffles, cats, dg = _ChannelShuffles(), _ConcatSizes(), tp.DependencyGraph()
        dg.channel_shuffle_nodes = shuffles.nodes  # filled by the traced pass, before indices are mapped
        dg.concat_sizes = cats.sizes
        trace = dg._trace

        def traced(*args: Any, **kwargs: Any) -> dict:
            module2node = trace(*args, **kwargs)
            order_pieces(dg, module2node)  # before torch-pruning maps indices through the splits
            return module2node

        dg._trace = traced
        with shuffles, cats:
            dg.build_dependency(
                model, example_inputs=example[:1], unwrapped_parameters=hints.get("unwrapped_parameters"),
                customized_pruners={**{t: _GroupNormPruner() for t in _group_norm_types(model)},
                                    **{t: _KeptWhole() for t in _opaque_types()}},
            )
    gates = _channels_as_length(dg)
    for node in dg.module2node.values():
        if node.grad_fn in shuffles.nodes:  # a group stops at a shuffle (and is kept whole, ``through_shuffle``)
            node.dependencies = []
        elif node in gates:  # an ECA gate: the channels it reads are not coupled to each other
            node.dependencies = []
    return dg


def _channels_as_length(dg: tp.DependencyGraph, most_steps: int = 4) -> set:
    """The reshapes that lay the channels out along the length of a one-channel ``Conv1d`` and back:
    ECA's gate, which convolves across neighbouring channels and reads any number of them.
    torch-pruning maps those reshapes as flattens of stride C, which couples every channel to every
    other (the convs that feed a gate were kept whole) and makes C indices of each one."""
    found = set()
    for conv in dg.module2node.values():
        if not (isinstance(conv.module, nn.Conv1d) and conv.module.in_channels == 1 == conv.module.out_channels):
            continue
        for side in ("inputs", "outputs"):
            node = conv
            for _ in range(most_steps):  # through the activations between the conv and its reshape
                nxt = getattr(node, side)
                if len(nxt) != 1:
                    break
                node = nxt[0]
                if node.type == tp.ops.OPTYPE.RESHAPE:
                    found.add(node)
                    break
    return found


def _group_norm_types(model: nn.Module) -> set[type]:
    """nn.GroupNorm and the subclasses of it in ``model`` (torch-pruning looks a customized
    pruner up by exact type)."""
    return {nn.GroupNorm} | {type(m) for m in model.modules() if isinstance(m, nn.GroupNorm)}


class _GroupNormPruner(tp.pruner.function.GroupNormPruner):
    """torch-pruning's GroupNorm handler keeps ``num_groups``; a GroupNorm with one channel per
    norm group (``GroupNorm(C, C)``, an affine instance norm) keeps one group per channel instead,
    so any channel can go and the remaining ones are normalised exactly as before. An affine norm
    without a bias (timm's ``GroupNorm1NoBias``) keeps none (torch-pruning prunes the missing bias)."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs) -> nn.Module:
        per_channel = layer.num_groups == layer.num_channels
        keep = sorted(set(range(layer.num_channels)) - set(idxs))
        layer.num_channels = len(keep)
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
        if per_channel:
            layer.num_groups = layer.num_channels
        return layer

    prune_in_channels = prune_out_channels


def fixed_width_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output width the model's own code reads as a constant, so they must keep it.

    torchvision's VisionTransformer reshapes ``conv_proj``'s output with ``self.hidden_dim`` and
    adds a class token and a position embedding of that width (plain parameters the dependency
    graph does not see): its residual stream keeps its width, while the MLPs and attention heads
    are still pruned.
    """
    return [m.conv_proj for m in model.modules()
            if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(getattr(m, "conv_proj", None), nn.Conv2d)
            and isinstance(getattr(m, "class_token", None), nn.Parameter)]


RUNAWAY_PER_NODE = 20  # dependencies per graph node past which a group's search cycles (torchvision's peak: 2.9)


class _Runaway(Exception):
    """torch-pruning's search for a group's coupled layers did not converge (``_bounded_search``)."""


@contextlib.contextmanager
def _bounded_search(limit: int, longest: int) -> Iterator[None]:
    """torch-pruning's group search, stopped with ``_Runaway`` once a group holds ``limit``
    dependencies or maps its units to more channels than ``longest``, the widest tensor
    dimension of the model. On a slice of a conv's output added back and concatenated (ReXNet's
    partial residual) its index mappings shift the indices on every turn of a cycle, and the
    search never ends; through reshapes around a cycle (timm's EfficientViT) a flatten mapping
    multiplies the list's length on every turn (torch-pruning 1.6). A list that indexes a
    channel dimension names no more channels than some layer's width: in every torchvision
    classifier the most is exactly the widest layer.

    The search asks, before each dependency it adds, whether the group already holds the same
    operation; torch-pruning answers by scanning the whole group, so a group of n dependencies
    costs n squared comparisons, minutes at the bound. Here each group keeps its operations in
    a set as they are added, and the question is a lookup. A group only grows by ``add_dep``
    during the search, so the set stays exact."""
    group_type = tp.dependency.group.Group
    original_add, original_has = group_type.add_dep, group_type.has_pruning_op

    def add_dep(group, dep, idxs) -> None:
        if len(group._group) >= limit or (len(idxs) > longest and _distinct(idxs) > longest):
            raise _Runaway
        original_add(group, dep, idxs)
        group.__dict__.setdefault("_mc_ops", set()).add(_operation(dep, idxs))

    def has_pruning_op(group, dep, idxs) -> bool:
        return _operation(dep, idxs) in group.__dict__.get("_mc_ops", ())

    group_type.add_dep, group_type.has_pruning_op = add_dep, has_pruning_op
    try:
        yield
    finally:
        group_type.add_dep, group_type.has_pruning_op = original_add, original_has


def _widest(model: nn.Module) -> int:
    """The longest dimension of any parameter or buffer of ``model``, or a convolution's input width."""
    dims = [max(t.shape, default=1) for t in [*model.parameters(), *model.buffers()]]
    dims += [m.in_channels for m in model.modules() if is_conv(m)]
    return max(dims, default=1)


def _distinct(idxs: Any) -> int:
    """How many channels an index list names: torch-pruning pairs each with the root unit it
    comes from, and one channel fed by several root units appears once per unit (ResNeSt's
    split attention)."""
    return len({getattr(i, "idx", i) for i in idxs})


def _operation(dep: Any, idxs: Any) -> tuple:
    """What torch-pruning's ``Group.has_pruning_op`` compares: target node, handler, indices."""
    return dep.target, dep.handler, tuple(idxs)


def _all_groups(dg: tp.DependencyGraph, ignored: list[nn.Module]) -> Iterator[tuple[nn.Module, Any]]:
    """torch-pruning's ``get_all_groups`` (root layers of PRUNABLE_LAYERS, their output channels),
    each search bounded: (root, group), or (root, None) where the search did not end."""
    ignored_ids = {id(i) for i in [*ignored, *dg.IGNORED_LAYERS_IN_TRACING]}
    limit, longest, visited = RUNAWAY_PER_NODE * len(dg.module2node), _widest(dg.model), set()
    for m in split_producers(dg, PRUNABLE_LAYERS) + list(dg.module2node):
        pruner = dg.get_pruner_of_module(m) if isinstance(m, PRUNABLE_LAYERS) and id(m) not in ignored_ids else None
        if pruner is None or pruner.get_out_channels(m) is None or m in visited:
            continue
        try:
            with _bounded_search(limit, longest):
                group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except _Runaway:
            visited.add(m)
            yield m, None
            continue
        outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
        visited.update(outs)
        if not any(id(o) in ignored_ids for o in outs):
            yield m, group


def _unconverged(root: nn.Module, name: str) -> Group:
    """A group kept whole because torch-pruning could not find its coupled layers (``_bounded_search``)."""
    conv = is_conv(root)
    channels = root.out_channels if conv else root.out_features
    return Group(name, channels, "conv" if conv else "linear", [name], [], step=channels, quantum=channels,
                 kernel=kernel_area(root) if conv else 1, stride=root.stride[0] if conv else 1,
                 unsafe="torch-pruning's search for the layers coupled to it does not converge (its index mappings "
                        "grow on every turn of a cycle, as through ReXNet's partial residual or EfficientViT's reshapes)")


def discover_groups(model: nn.Module, example: torch.Tensor, num_classes: int, round_to: int = 8,
                    dg: tp.DependencyGraph | None = None) -> list[Group]:
    """All prunable groups of ``model``, in the order the dependency graph gives them."""
    dg = dg or build_graph(model, example)
    names = dg._module2name
    classifier = find_classifier(model, num_classes)
    attn = {qkv: (proj, heads) for qkv, proj, heads in attention_blocks(model)}
    hints = model.pruning_hints() if hasattr(model, "pruning_hints") else {}
    ignored = ([classifier] if classifier is not None else []) + list(hints.get("frozen", [])) + fixed_width_layers(model)
    ignored += opaque_blocks(model)
    groups: list[Group] = []
    try:
        found = list(_all_groups(dg, ignored))
    except Exception as exc:  # torch-pruning's index mapping of a construct it does not know
        raise pruning_error("cannot trace the model for pruning", exc) from None
    for root, g in found:
        if g is None:
            groups.append(_unconverged(root, names[root]))
            continue
        outs, ins, norms, partial = [], [], [], {}
        for dep, idxs in g:
            mod = dep.target.module
            if isinstance(mod, WIDTH_LAYERS) and mod in names:
                out = dg.is_out_channel_pruning_fn(dep.handler)
                (outs if out else ins).append(names[mod])
                _note_partial(partial, f"{'out' if out else 'in'}:{names[mod]}", idxs, _width(mod, out))
            elif isinstance(mod, NORM_LAYERS) and mod in names:
                norms.append(names[mod])
                _note_partial(partial, f"norm:{names[mod]}", idxs, norm_width(mod))
        conv_groups, quantum = _conv_grouping(g, root, dg)
        mismapped = "" if root in attn else _mismapped(g, dg, names)
        unsafe = f"torch-pruning maps its units past the width of '{mismapped}'" if mismapped else ""
        if through_shuffle(g, dg):
            unsafe = "its channels pass through a channel shuffle, whose permutation torch-pruning cannot map"
        if root not in attn:
            conv_groups, quantum = _with_coupled_blocks(dg, root, conv_groups, quantum, bool(unsafe))
        if root in attn:
            proj, heads = attn[root]
            head_dim = root.out_features // 3 // heads
            step = max(1, round_to // _gcd(round_to, heads))
            groups.append(Group(names[root], head_dim, "attention", [names[root]], [names[proj]],
                                step=_step(head_dim, step), heads=heads))
            continue
        if is_conv(root):
            kind = "depthwise" if is_depthwise(root) else "conv"
            kernel = kernel_area(root)
            stride = root.stride[0]
            channels = root.out_channels
        else:
            kind, kernel, stride, channels = "linear", 1, 1, root.out_features
        groups.append(Group(names[root], channels, kind, outs, ins, norms, step=_step(channels, round_to, quantum),
                            kernel=kernel, stride=stride, residual=len(outs) > 1, conv_groups=conv_groups,
                            quantum=quantum, partial=partial, unsafe=unsafe))
    if not groups:
        raise UserError("the model has no prunable groups (no conv or linear layer besides the classifier)")
    for g, why in _breaking(model, example, [g for g in groups if g.kind != "attention" and not g.whole]):
        g.unsafe, g.quantum, g.step = why, g.channels, g.channels
    return groups


def _breaking(model: nn.Module, example: torch.Tensor, groups: list[Group]) -> list[tuple[Group, str]]:
    """The groups whose removal of one unit (one per conv group), or of half their units, from a
    copy of ``model`` makes the copy fail, or change its output's shape, and why. One trial when all pass; otherwise halving
    finds the culprits, and a group that fails only together with others is found one by one."""
    if not groups:
        return []
    expected = _shapes(run_one(model, example))
    cache: dict[tuple[str, ...], str] = {}

    def trial(subset: list[Group]) -> str:
        key = tuple(g.name for g in subset)
        if key not in cache:
            cache[key] = _trial(model, example, subset, expected)
        return cache[key]

    if not trial(groups):
        return []
    found = _halve(trial, groups)
    bad = {g.name for g, _ in found}
    kept = [g for g in groups if g.name not in bad]
    if kept and trial(kept):
        accepted: list[Group] = []
        for g in kept:
            why = trial(accepted + [g])
            if why:
                found.append((g, why))
            else:
                accepted.append(g)
    return found


def _halve(trial, groups: list[Group]) -> list[tuple[Group, str]]:
    why = trial(groups)
    if not why:
        return []
    if len(groups) == 1:
        return [(groups[0], why)]
    mid = len(groups) // 2
    return _halve(trial, groups[:mid]) + _halve(trial, groups[mid:])


TRIAL_SHARES = (0.0, 0.5)  # units removed per conv group in a trial: one, then half (code that breaks only at some widths)


def _trial(model: nn.Module, example: torch.Tensor, groups: list[Group], expected) -> str:
    """Why a copy of ``model`` with one unit of each of ``groups`` removed, or half of their units,
    fails to run as before ("" if both run)."""
    for share in TRIAL_SHARES:
        why = _trial_at(model, example, groups, expected, share)
        if why:
            return why
    return ""


def _trial_at(model: nn.Module, example: torch.Tensor, groups: list[Group], expected, share: float) -> str:
    copied = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's and the model's own warnings on a throwaway copy
        try:
            dg = _trace(copied, example)
            modules = dict(copied.named_modules())
            for g in groups:
                root, width = modules[g.name], g.channels // g.conv_groups
                removed = max(1, int(width * share))
                idxs = [b * width + o for b in range(g.conv_groups) for o in range(removed)]
                prune_group(dg.get_pruning_group(root, out_channel_pruner(root), idxs=idxs))
        except Exception as exc:  # a layer torch-pruning cannot resize (a parametrized weight, ...)
            return f"torch-pruning cannot remove its units: {first_line(exc)}"
        try:
            shapes = _shapes(run_one(copied, example))
        except Exception as exc:  # whatever the pruned copy raises is the reason
            return f"removing its units breaks the forward pass: {first_line(exc)}"
    return "" if shapes == expected else f"removing its units changes the output's shape to {shapes}"


@torch.no_grad()
def run_one(model: nn.Module, example: torch.Tensor):
    """One sample of ``example`` through ``model`` in eval mode, without gradients; its train/eval mode is restored."""
    with eval_mode(model):
        return model(example[:1])


def _shapes(out) -> object:
    """The shapes of a forward pass's tensors (outputs may be tuples, lists or dicts)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_shapes(v) for v in out]
    return None


def _step(channels: int, round_to: int, quantum: int = 1) -> int:
    """Rounding step: a multiple of both ``round_to`` and ``quantum``, except for groups too narrow
    to keep two steps of it, which step by ``quantum`` alone (the finest size that stays valid)."""
    step = round_to * quantum // _gcd(round_to, quantum)
    return step if channels >= 2 * step else quantum


def _width(layer: nn.Module, out: bool) -> int:
    return out_width(layer) if out else in_width(layer)


def _note_partial(partial: dict[str, float], key: str, idxs, width: int) -> None:
    """Record the share of a member layer's width that the group's units reach, where it is not
    all of it: a concatenation's part, or a residual sum with a zero-padded shortcut (CIFAR
    ResNets' option A), whose padded channels no group prunes. A flatten reaches all of a linear
    layer's inputs (each unit repeated spatially), and the whole is the default."""
    reached = len(set(idxs))
    if 0 < reached < width:
        partial[key] = reached / width


def _mismapped(group, dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> str:
    """The first member layer that torch-pruning maps the group's units to indices past its
    width, or "". Its index mapping does not follow every construct (a head split by reshape in
    a hand-written attention, a pixel shuffle, a split whose parts are concatenated in another
    order, a transposed weight reused by ``F.linear``); such a group used to fail while ranked
    or pruned. It is kept whole instead, and the rest of the model is still pruned."""
    for dep, idxs in group:
        mod = dep.target.module
        if isinstance(mod, WIDTH_LAYERS):
            width = _width(mod, dg.is_out_channel_pruning_fn(dep.handler))
        elif isinstance(mod, NORM_LAYERS):
            width = norm_width(mod)
        else:
            continue
        if len(idxs) and max(idxs) >= width:
            return names.get(mod, type(mod).__name__)
    return ""


def _coupled_blocks(dg: tp.DependencyGraph, root: nn.Module) -> int:
    """How removing one of ``root``'s output units removes others of its own, where its output is
    split and the parts meet again unit by unit (a GLU's ``a * sigmoid(b)`` over two halves,
    GhostNet's concatenation of a conv and a depthwise conv of it): 1 when it removes only
    itself; G when it removes the same offset in each of G equal blocks, which pruning at the same
    offsets in every block respects; 0 in any other pattern."""
    def coupled(unit: int) -> list[int]:
        return sorted(set(dg.get_pruning_group(root, out_channel_pruner(root), idxs=[unit])[0].idxs))

    channels, first = _width(root, out=True), coupled(0)
    blocks = len(first)
    if blocks == 1:
        return 1
    if channels % blocks:
        return 0
    width = channels // blocks
    pattern = all(found == [unit + b * width for b in range(blocks)]
                  for unit, found in ((0, first), (width - 1, coupled(width - 1))))
    return blocks if pattern else 0


def _with_coupled_blocks(dg: tp.DependencyGraph, root: nn.Module, conv_groups: int, quantum: int,
                         unsafe: bool) -> tuple[int, int]:
    """(G, quantum) of a group once its units coupled to each other are counted (``_coupled_blocks``):
    blocks of coupled units prune like conv groups, at the same offsets in each; units coupled in
    another pattern, or a group kept whole already, keep all their channels (counted per channel,
    an allocation would remove more than it asked for)."""
    width = _width(root, out=True)
    if unsafe or quantum >= width:
        return conv_groups, width
    blocks = _coupled_blocks(dg, root)
    joint = conv_groups * blocks // _gcd(conv_groups, blocks) if blocks else 0
    if not joint or width % joint or joint >= width:
        return conv_groups, width
    return joint, joint


def _channel_blocks(mod: nn.Module, out: bool) -> tuple[int, int]:
    """(G, width) of a layer whose channels form G equal blocks that pruning must keep equal: a
    grouped, non-depthwise conv, or a GroupNorm of several channels per norm group (its
    ``num_groups`` is kept, so its width must stay a multiple of it, and each norm group should
    lose alike); else (1, width).
    Depthwise convs (groups == out_channels) are coupled input-to-output by torch-pruning and
    shrink ``groups`` with their channels instead."""
    if is_conv(mod) and mod.groups > 1 and mod.groups != mod.out_channels:
        return mod.groups, mod.out_channels if out else mod.in_channels
    if isinstance(mod, nn.GroupNorm) and 1 < mod.num_groups < mod.num_channels:
        return mod.num_groups, mod.num_channels
    return 1, 0


def _conv_grouping(group, root: nn.Module, dg: tp.DependencyGraph) -> tuple[int, int]:
    """(G, quantum) for a torch-pruning group: G is the lcm of the channel blocks of the grouped
    convs and GroupNorms it touches (``_channel_blocks``) and of the equal pieces of a channel split
    it passes through (``split_pieces.equal_pieces``: each piece then keeps the same share).

    Same offsets in each of lcm(G1, G2) blocks are also the same offsets in each of G1 and G2
    blocks, so one pattern serves every grouped conv of the group. When a grouped conv sees the
    group's channels through an index mapping (a concatenation, a slice), the per-block pattern
    would not line up with its conv groups: the group is then frozen (quantum = all channels).
    """
    channels = _width(root, out=True)
    conv_groups = 1
    for dep, idxs in group:
        g, dim = _channel_blocks(dep.target.module, dg.is_out_channel_pruning_fn(dep.handler))
        if g == 1:
            continue
        if dim != channels or list(idxs) != list(range(channels)):
            return 1, channels
        conv_groups = conv_groups * g // _gcd(conv_groups, g)
    pieces = equal_pieces(group, channels)
    if pieces == 0:
        return 1, channels
    conv_groups = math.lcm(conv_groups, pieces)
    if channels % conv_groups:
        return 1, channels
    return conv_groups, conv_groups


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
