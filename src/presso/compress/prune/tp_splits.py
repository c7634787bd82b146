"""Torch-Pruning's channel splits (``torch.chunk``, ``torch.split``), made exact: part of :mod:`tp_patches`.

Installed only by :func:`presso.compress.prune.tp_patches.patched`, which checks the Torch-Pruning version these were
written against (kept in a module of their own for its length). What Torch-Pruning 1.6.1 gets wrong, and YOLO's
C2f/C3k2 blocks (``y = cv1(x).chunk(2, 1)``, the second half feeding a bottleneck, its residual add and the concat
that also reads the first half) hit every time:

* the chunk sizes of ``torch.chunk`` on current PyTorch (it reads an autograd field that was renamed);
* which chunk a consumer reads: it takes the i-th *consumer* of a split to read the i-th chunk, wrong as soon as a
  chunk feeds several layers or a layer reads several chunks; the chunk an edge carries is its autograd
  ``output_nr``;
* that a chunked layer must lose the same channels in every chunk (:func:`split_chunks`, used by the planner).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch_pruning as tp

__all__ = ["SPLIT_FIXED", "SPLIT_PARTIAL", "split_aware_shapes", "split_chunks", "update_split_index_mapping"]


@contextlib.contextmanager
def split_aware_shapes():
    """Channel counts through a channel split read from autograd, chunk by chunk.

    Written by hand because Torch-Pruning 1.6.1 reads ``torch.chunk``'s sizes only on PyTorch versions whose
    ``SplitBackward0`` saves ``_saved_self_sizes`` (renamed ``_saved_self_sym_sizes`` since), and elsewhere takes the
    i-th *consumer* of a split to read its i-th chunk. Both are wrong as soon as a chunk feeds several layers or a
    layer reads several chunks -- YOLO's C2f/C3k2: ``cv1(x).chunk(2, 1)``, the second half feeding a bottleneck, its
    residual add and the concat that also reads the first half. The chunk an edge carries is its autograd
    ``output_nr``; the sizes set at build time are the ones Torch-Pruning's split and concat pruners then keep up to
    date."""
    from torch_pruning.dependency import shape_infer

    originals = (shape_infer.init_shape_information, shape_infer.infer_out_channels_recursively,
                 shape_infer.infer_in_channels_recursively, shape_infer.infer_channels_between)  # fmt: skip
    init0, out0, in0, between0 = originals
    split = tp.ops.OPTYPE.SPLIT

    def sized(node) -> list[int] | None:
        return node.module.split_sizes if node.type == split and _chunk_sizes(node.grad_fn) is not None else None

    def init(graph):
        init0(graph)
        for node in graph.module2node.values():
            sizes = _chunk_sizes(node.grad_fn) if node.type == split else None
            if sizes is not None:
                node.module.split_sizes = sizes
                node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT and any(sized(n) for n in node.inputs):
                node.module.concat_sizes = _concat_sizes(graph, node, sized)

    def infer_out(graph, node, recursive_depth):
        if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is not None:
            return sum(node.module.concat_sizes)
        if node.type != tp.ops.OPTYPE.CONCAT and graph.get_out_channels(node) is None:
            for n in node.inputs:  # an element-wise op on a chunk has the chunk's channels
                if (sizes := sized(n)) is not None and (nrs := _edge_chunks(n, node)):
                    return sizes[nrs[0]]
        return out0(graph, node, recursive_depth)

    def infer_in(graph, node, recursive_depth):
        sizes = sized(node)
        return sum(sizes) if sizes is not None else in0(graph, node, recursive_depth)

    def between(graph, node_1, node_2):
        sizes = sized(node_1)
        nrs = _edge_chunks(node_1, node_2) if sizes is not None else []
        return sizes[nrs[0]] if nrs else between0(graph, node_1, node_2)

    names = ("init_shape_information", "infer_out_channels_recursively", "infer_in_channels_recursively",
             "infer_channels_between")  # fmt: skip
    for name, fn in zip(names, (init, infer_out, infer_in, between), strict=True):
        setattr(shape_infer, name, fn)
    try:
        yield
    finally:
        for name, fn in zip(names, originals, strict=True):
            setattr(shape_infer, name, fn)


def _chunk_sizes(grad_fn) -> list[int] | None:
    """The sizes of a split along the channel dimension (dim 1) from its autograd node, or None."""
    full, dim = getattr(grad_fn, "_saved_self_sym_sizes", None), getattr(grad_fn, "_saved_dim", None)
    if full is None or not isinstance(dim, int) or (dim if dim >= 0 else dim + len(full)) != 1:
        return None
    sizes = getattr(grad_fn, "_saved_split_sizes", None)
    if sizes is not None:
        return [int(s) for s in sizes]
    step, total = getattr(grad_fn, "_saved_split_size", None), int(full[1])
    if not isinstance(step, int) or step < 1:
        return None
    return [min(step, total - start) for start in range(0, total, step)]


def _edge_chunks(split_node, consumer) -> list[int]:
    """The chunks of ``split_node`` that ``consumer`` reads, one per autograd edge, in argument order."""
    edges = getattr(consumer.grad_fn, "next_functions", ()) or ()
    return [nr for fn, nr in edges if fn is split_node.grad_fn]


def _concat_sizes(graph, node, sized) -> list[int] | None:
    """The channels each input brings to a concat that reads chunks of a split."""
    from torch_pruning.dependency import shape_infer

    edges = [(fn, nr) for fn, nr in getattr(node.grad_fn, "next_functions", ()) if fn is not None]
    if len(edges) != len(node.inputs) or any(
        n.grad_fn is not fn for n, (fn, _) in zip(node.inputs, edges, strict=True)
    ):
        return None  # inputs Torch-Pruning does not see (constants): leave the sizes to its own inference
    sizes = []
    for n, (_, nr) in zip(node.inputs, edges, strict=True):
        chunks = sized(n)
        sizes.append(chunks[nr] if chunks is not None else shape_infer.infer_channels_between(graph, n, node))
    return None if None in sizes else sizes


SPLIT_PARTIAL = "reads only some chunks of a channel split (torch.chunk); pruned only with the layer producing it"
SPLIT_FIXED = "passes through a channel split with sizes fixed in the model's code (x.split((c, c)), e.g. C2PSA)"


def split_chunks(group) -> int | str:
    """How many equal chunks a group's root channels are split into along the way (1: no channel split), or why the
    group cannot be pruned on its own (:data:`SPLIT_PARTIAL`, :data:`SPLIT_FIXED`).

    A ``torch.chunk`` cuts the channels it is given into equal parts at run time, and the layers after it were
    built for those parts: pruning must remove the same channels from every chunk -- which is possible only from
    the layer producing all of them, whose channel ``j`` is the split's channel ``j``. A group reaching just one
    chunk (a bottleneck adding to the second half of a C2f split) would make the chunks unequal. A split by a list
    of sizes (``SplitWithSizesBackward0``) takes sizes written in the model's code, which pruning cannot update."""
    chunks = 1
    partial = False
    for item in group:
        node = item.dep.target
        if node.type != tp.ops.OPTYPE.SPLIT or _chunk_sizes(node.grad_fn) is None or node.module.split_sizes is None:
            continue
        if hasattr(node.grad_fn, "_saved_split_sizes"):
            return SPLIT_FIXED
        sizes = node.module.split_sizes
        if list(item.idxs) != list(range(sum(sizes))) or list(item.root_idxs) != list(item.idxs):
            partial = True
        elif len(set(sizes)) != 1:
            return SPLIT_FIXED  # a last chunk smaller than the others: its size comes from the code too
        chunks = math.lcm(chunks, len(sizes))
    return SPLIT_PARTIAL if partial else chunks


def update_split_index_mapping(graph, node) -> None:
    """Torch-Pruning's split index mapping, with each consumer matched to the chunk it actually reads.

    Torch-Pruning 1.6.1 gives the i-th *consumer* of a split the i-th chunk's offsets; a chunk read by several
    layers, or a layer reading several chunks (a concat of both halves), then gets another chunk's channels. The
    chunk a consumer reads is the ``output_nr`` of its autograd edge to the split, in argument order -- the order
    in which Torch-Pruning records both the consumer's inputs and its dependencies."""
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping

    sizes = node.module.split_sizes
    if sizes is None or _chunk_sizes(node.grad_fn) is None:
        return  # not a channel split: Torch-Pruning maps it as an identity, as it always has
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    node.module.offsets = offsets
    chunks: dict[Any, list[int]] = {}  # consumer node -> the chunk of each of its edges from this split, in order
    for consumer in node.outputs:
        if consumer not in chunks:
            chunks[consumer] = _edge_chunks(node, consumer)
            if len(chunks[consumer]) != node.outputs.count(consumer) or max(chunks[consumer]) >= len(sizes):
                raise ValueError(f"cannot tell which chunk {consumer.name} reads")
    if not node.enable_index_mapping:
        return
    seen: dict[Any, int] = {}
    for dep in node.dependencies:
        if dep.target in chunks:
            nr = chunks[dep.target][seen.setdefault(dep.target, 0)]
            seen[dep.target] += 1
            dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr : nr + 2], reverse=False)
    for consumer, nrs in chunks.items():
        back = [dep for dep in consumer.dependencies if dep.target is node]
        for dep, nr in zip(back, nrs, strict=True):
            dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr : nr + 2], reverse=True)
