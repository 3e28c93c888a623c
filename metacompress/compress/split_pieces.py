"""torch-pruning's channel splits, each piece linked to the layers that read that piece.

torch-pruning links a split (``torch.split`` or ``chunk`` along channels) to its consumers in
the order its backward walk meets them, and maps the i-th consumer to the i-th piece. A CSP
block (``xs, xb = x.split(c, 1)``; ``xb`` through residual blocks; ``cat([xs, f(xb)])``) is met
in the other order, and a piece read twice (by a residual block's first conv and by its
addition) shifts every later piece; the layers coupled through the split then get wrong indices
(upstream: Torch-Pruning #147 and #415, where users rewrite YOLOv8's C2f without the split).
``order_pieces`` gives a split one pass-through node per piece, in piece order, each linked to
the consumers that autograd says read it (``next_functions`` carries the piece's number).

A group whose units pass through a split into equal pieces keeps the same offsets in every piece
(``equal_pieces``, the mechanism of grouped convolutions): each piece then keeps the same share
of its width, which is what the analytic cost model prices.
"""

from __future__ import annotations

import math
from typing import Any

import torch_pruning as tp
from torch_pruning.dependency import shape_infer as tp_shape_infer
from torch_pruning.dependency.node import Node

_SIGN = 1 << 63  # autograd stores a negative dim as an unsigned 64-bit integer
_MOST_STEPS_BACK = 8  # norms, activations and the like between a split and the layer it cuts


def channel_pieces(grad_fn: Any) -> list[int] | None:
    """The channel widths of the pieces of a split along dim 1 of a 4-D or 5-D feature map; None
    for any other split (tokens, attention heads, spatial axes), which is left as it is."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dim = getattr(grad_fn, "_saved_dim", None)
    if sizes is None or dim is None or len(sizes) not in (4, 5):
        return None
    dim = dim - (1 << 64) if dim >= _SIGN else dim
    if dim % len(sizes) != 1:
        return None
    if hasattr(grad_fn, "_saved_split_sizes"):
        return [int(s) for s in grad_fn._saved_split_sizes]
    size, width = int(getattr(grad_fn, "_saved_split_size", 0) or 0), int(sizes[1])
    return [min(size, width - start) for start in range(0, width, size)] if size > 0 else None


def order_pieces(graph: tp.DependencyGraph, module2node: dict) -> None:
    """Give every channel split of a traced graph one pass-through node per piece, in piece order,
    before torch-pruning infers sizes and index mappings from the split's outputs."""
    for split in list(module2node.values()):
        if split.type != tp.ops.OPTYPE.SPLIT:
            continue
        pieces = channel_pieces(split.grad_fn)
        reads = _reads(split) if pieces else None
        if not reads or max(k for _, _, k in reads) >= len(pieces):
            continue
        nodes = []
        for _ in pieces:
            op = tp.ops._ElementWiseOp(graph._op_id, "SplitPiece")
            graph._op_id += 1
            piece = Node(op, None)
            piece.add_input(split)
            module2node[op] = piece
            nodes.append(piece)
        split.outputs = nodes
        split.module.channel_pieces = pieces  # its sizes, set again after torch-pruning's inference
        for consumer, position, k in reads:
            consumer.inputs[position] = nodes[k]
            if consumer not in nodes[k].outputs:
                nodes[k].add_output(consumer)


def _reads(split: Node) -> list[tuple[Node, int, int]] | None:
    """(consumer, its input position, piece) for every read of a piece of ``split``; None where a
    consumer's autograd node does not show which pieces it reads."""
    reads: list[tuple[Node, int, int]] = []
    for consumer in dict.fromkeys(split.outputs):
        numbers = [k for fn, k in getattr(consumer.grad_fn, "next_functions", ()) if fn is split.grad_fn]
        positions = [i for i, node in enumerate(consumer.inputs) if node is split]
        if not numbers or len(numbers) != len(positions):
            return None
        reads += [(consumer, p, k) for p, k in zip(positions, numbers)]
    return reads


def split_producers(graph: tp.DependencyGraph, prunable: tuple[type, ...]) -> list[Any]:
    """The layers whose output is cut by a channel split (through norms and activations), so that
    group discovery can start from them: a group rooted there reaches every piece and keeps the
    same offsets in each, whereas a group rooted at a layer that reads one piece (a residual
    block's last conv) would narrow that piece alone, which a ``chunk`` then cuts unevenly."""
    found = []
    for split in graph.module2node.values():
        if split.type != tp.ops.OPTYPE.SPLIT or channel_pieces(split.grad_fn) is None:
            continue
        node = split.inputs[0] if len(split.inputs) == 1 else None
        for _ in range(_MOST_STEPS_BACK):
            if node is None or isinstance(node.module, prunable):
                break
            node = node.inputs[0] if len(node.inputs) == 1 and len(node.outputs) == 1 else None
        if node is not None and isinstance(node.module, prunable) and node.module not in found:
            found.append(node.module)
    return found


def equal_pieces(group: Any, channels: int) -> int:
    """The number of equal pieces that a torch-pruning group's units are split into, in order
    (unit j in piece j // width), where they reach a channel split: 1 where they reach no split or
    one piece of it; 0 where they span pieces otherwise (unequal pieces, or units that reach the
    split through a reordering), whose shares the cost model cannot price: the group is kept whole."""
    count = 1
    for dep, idxs in group:
        pieces = channel_pieces(dep.target.grad_fn) if dep.target.type == tp.ops.OPTYPE.SPLIT else None
        if not pieces or len(pieces) == 1:
            continue
        units = [int(getattr(i, "idx", i)) for i in idxs]
        bounds = [sum(pieces[:k]) for k in range(len(pieces) + 1)]
        if sum(1 for lo, hi in zip(bounds, bounds[1:]) if any(lo <= u < hi for u in units)) == 1:
            continue
        if len(set(pieces)) > 1 or units != list(range(channels)):
            return 0
        count = math.lcm(count, len(pieces))
    return count


_tp_init_shapes = tp_shape_infer.init_shape_information


def _init_shapes(graph: tp.DependencyGraph) -> None:
    """torch-pruning's size inference, then each split given the piece sizes autograd recorded:
    torch-pruning reads them from an attribute that current PyTorch no longer has and falls back
    to inferring them from the readers, which fails where a piece is read only by a concatenation
    (YOLOv8's C2f) and gives empty pieces."""
    _tp_init_shapes(graph)
    for node in graph.module2node.values():
        pieces = getattr(node.module, "channel_pieces", None) if node.type == tp.ops.OPTYPE.SPLIT else None
        if pieces:
            node.module.split_sizes = list(pieces)
            node.module.offsets = [sum(pieces[:k]) for k in range(len(pieces) + 1)]


tp_shape_infer.init_shape_information = _init_shapes
