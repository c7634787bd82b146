"""Every patch of Torch-Pruning, and every access to its private internals, in one place (with
:mod:`~presso.compress.prune.tp_splits`, the channel-split patches, which :func:`patched` installs too).

Presso uses DepGraph's public API (``build_dependency``, ``get_pruning_group``, ``Group.prune``, the importance
classes and pruning functions). What that API cannot do is done here, behind one context manager::

    with tp_patches.patched(max_indices=...) as state:
        DG = tp.DependencyGraph().build_dependency(...)   # both patches go in before the graph is built
        ...                                               # state.blocked, state.mapping_dirty, state.max_items

and by :func:`param_name`, :func:`snapshot_graph` and :func:`restore_graph`, which read and write DepGraph's private
parameter/node maps for the pruner's rollback. All of it was written against the Torch-Pruning version pinned in
pyproject.toml (:data:`REQUIRED_VERSION`); :func:`patched` refuses any other version, since the private functions
it replaces may have changed shape or meaning.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Torch-Pruning's op counter does ``try: import timm`` with a bare ``except:``, which swallows a Ctrl-C pressed during
# that import (1-2 s of torchvision, dynamo and sympy) and carries on. Imported first, here, timm is in sys.modules
# when Torch-Pruning asks for it, and a Ctrl-C during this import stops the command as it should. (This module is
# the first of presso.compress.prune to be imported; presso.cli does the same for any other first import.)
with contextlib.suppress(ImportError):
    import timm  # noqa: F401
import torch_pruning as tp
from torch import nn

from presso.compress.prune.tp_splits import (
    SPLIT_FIXED,
    SPLIT_PARTIAL,
    split_aware_shapes,
    split_chunks,
    update_split_index_mapping,
)
from presso.errors import ConfigError

__all__ = [
    "REQUIRED_VERSION",
    "build_graph",
    "interrupts_deferred",
    "PatchState",
    "check_version",
    "installed_version",
    "param_name",
    "patched",
    "restore_graph",
    "snapshot_graph",
    "split_chunks",
    "SPLIT_PARTIAL",
    "SPLIT_FIXED",
]


REQUIRED_VERSION = "1.6.1"  # the pin in pyproject.toml (tests/compress/test_tp_patches.py keeps the two equal)
_GROUP_SECONDS = 2.0  # a dependency walk longer than this is cycling, not working (the largest real ones take <0.5 s)


class _IndexExplosion(RuntimeError):
    """A dependency walk exceeded its bounds; the group being built is abandoned and reported (under this class name,
    which appears in the reasons reported for skipped layers)."""


@dataclass
class PatchState:
    """What the installed patches share with the pruner."""

    # placeholder node -> why its index mapping failed; every group whose channels pass through it is left unpruned
    blocked: dict[Any, str] = field(default_factory=dict)
    # whether index mappings must be recomputed before the next walk: set when a group through a placeholder node
    # (concat, split, reshape, ...) is pruned or rolled back
    mapping_dirty: bool = True
    # most items a group may hold before its walk counts as not converging (set once the graph is built)
    max_items: int = 1 << 62


# --------------------------------------------------------------------------- Ctrl-C and Torch-Pruning's bare excepts
@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it: for Torch-Pruning code with a bare ``except:``.

    ``build_dependency`` runs the model inside ``try: model(*inputs) / except: model(inputs)``: a Ctrl-C during
    that forward would be swallowed and turn into a misleading tracing error. Only the main thread with Python's
    default handler is changed (a training loop's own handler, or a thread, is left alone).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def build_graph(model: nn.Module, inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced on ``inputs``, with Ctrl-C held while it traces.

    Layers that run but whose results never reach the outputs are traced too (:func:`_forward_with_dead_ends`)."""
    with interrupts_deferred():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=inputs, forward_fn=_forward_with_dead_ends, verbose=False
        )


def _forward_with_dead_ends(model: nn.Module, inputs: Any) -> Any:
    """The model's output, plus the outputs of the layers that ran without reaching it, for Torch-Pruning to trace.

    Torch-Pruning traces back from the outputs only, so a branch that runs in eval mode but whose result is thrown
    away -- YOLOv10/YOLO26's one-to-one head when the one-to-many head gives the predictions -- is missing from the
    graph, and so is a branch that runs only in training (YOLO26-pose's keypoint sigmas, YOLO26-seg's semantic
    head, GoogLeNet's auxiliary classifiers): pruning the layers feeding them left their input channels as they
    were, and the next forward (or the first training step) failed. Here a training-only layer is run once more on
    the tensor it reads in training, as the eval forward computes it (:func:`_training_only_layers`), and every
    such dead end is traced from its own output: those layers follow the pruning, and the last layer of a dead end,
    whose output nothing reads, counts as producing an output and keeps its channels. A model without such layers
    gets its output unchanged (and the graph Torch-Pruning always built)."""
    import torch

    links = _training_only_layers(model, inputs)
    ran: list[torch.Tensor] = []
    seen: dict[nn.Module, tuple] = {}  # module -> (its first input, its output) in this eval forward
    wanted = {q for _, q, _ in links}

    def keep(module, args, out):
        if module in wanted:
            seen[module] = (args[0] if args else None, out)
        if isinstance(module, _LAYERS) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            ran.append(out)

    hooks = [m.register_forward_hook(keep) for m in model.modules()]
    try:
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        for layer, q, kind in links:  # a training-only layer on what it reads in training
            if q in seen and isinstance(x := seen[q][0 if kind == "in" else 1], torch.Tensor):
                with contextlib.suppress(Exception):
                    layer(x)
    finally:
        for h in hooks:
            h.remove()
    reached: set[Any] = set()
    stack = [t.grad_fn for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in reached:
            continue
        reached.add(fn)
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
    dead = [t for t in ran if t.grad_fn not in reached]
    return (out, *dead) if dead else out


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _training_only_layers(model: nn.Module, inputs: Any) -> list[tuple[nn.Module, nn.Module, str]]:
    """The outermost modules with weights that run only in training, each with a module that runs in eval mode too
    and reads (``"in"``) or produces (``"out"``) the tensor it reads: ``(layer, that module, "in" | "out")``.

    Found by one training-mode forward without gradients, on the inputs repeated to a batch of two (batch norm
    needs more than one value per channel); every buffer (batch-norm statistics) is put back afterwards, and the
    model is left in eval mode. A model whose training forward fails, or needs more than its inputs, gets none."""
    import torch

    if not isinstance(inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in inputs):
        return []
    train_io: dict[nn.Module, tuple] = {}
    eval_ran: set[nn.Module] = set()

    def in_train(module, args, out):
        train_io[module] = (args[0] if args and isinstance(args[0], torch.Tensor) else None, out)

    buffers = [(b, b.clone()) for b in model.buffers()]
    pairs = tuple(t.repeat(2, *([1] * (t.dim() - 1))) if t.dim() and t.shape[0] == 1 else t for t in inputs)
    try:
        with torch.no_grad():
            hooks = [m.register_forward_hook(lambda m, a, o: eval_ran.add(m)) for m in model.modules()]
            try:
                model.eval()
                model(*pairs)
            finally:
                for h in hooks:
                    h.remove()
            hooks = [m.register_forward_hook(in_train) for m in model.modules()]
            try:
                model.train()
                model(*pairs)
            finally:
                for h in hooks:
                    h.remove()
    except Exception:  # a model that trains only from a batch dict, or with targets: nothing to add
        return []
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        model.eval()
    only = [m for m in model.modules() if m in train_io and m not in eval_ran]
    weighted = {m for m in only if any(isinstance(x, _LAYERS) for x in m.modules())}
    inner = {x for m in weighted for x in m.modules() if x is not m}
    links = []
    for layer in (m for m in only if m in weighted and m not in inner):
        x = train_io[layer][0]
        if x is None:
            continue
        for q, (q_in, q_out) in train_io.items():
            if q in eval_ran and (q_in is x or q_out is x):
                links.append((layer, q, "in" if q_in is x else "out"))
                break
    return links


# --------------------------------------------------------------------------- version
@functools.cache
def installed_version() -> str:
    """The installed Torch-Pruning's version, from its distribution metadata: the release that pip installed.

    Not ``torch_pruning.__version__``: the 1.6.1 release still says "1.6.0" there."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:  # imported from a source tree, not installed
        return str(getattr(tp, "__version__", "unknown"))


def check_version() -> None:
    """Refuse a Torch-Pruning other than the one the patches below were written for."""
    found = installed_version()
    if found != REQUIRED_VERSION:
        raise ConfigError(
            f"Torch-Pruning {found} is installed, but Presso's pruning is written against Torch-Pruning "
            f"{REQUIRED_VERSION} (it patches internals that change between releases). "
            f"Install that version: pip install torch-pruning=={REQUIRED_VERSION}"
        )


# --------------------------------------------------------------------------- the patches
@contextlib.contextmanager
def patched(max_indices: int) -> Iterator[PatchState]:
    """Install both patches (checking the Torch-Pruning version first) for the duration of the block.

    ``max_indices`` bounds the indices one reshape may produce (a few times the widest layer); ``state.max_items``
    bounds the items of one group once the graph's size is known. Installed only while Presso prunes."""
    check_version()
    state = PatchState()
    with (
        split_aware_shapes(),
        _sizes_copied_before_pruning(),
        _robust_index_mapping(state),
        _bounded_traversal(max_indices, state),
    ):
        yield state


@contextlib.contextmanager
def _sizes_copied_before_pruning():
    """Torch-Pruning's concat and split pruners decrement the size list of the placeholder node *in place* before
    replacing it. The pruner's rollback restores a node's attributes from a shallow copy, so a rolled-back group left
    the decremented list behind and every later group through that concat or split was mapped to the wrong
    channels. Copying the list first keeps the snapshot intact."""
    # one function under both names, as Torch-Pruning has it: it tells in- from out-channel pruning by identity
    targets = [(cls, cls.__dict__["prune_out_channels"]) for cls in (tp.ops.ConcatPruner, tp.ops.SplitPruner)]

    def copying(fn):
        @functools.wraps(fn)
        def prune(self, layer, idxs):
            for attr in ("concat_sizes", "split_sizes"):
                if isinstance(getattr(layer, attr, None), list):
                    setattr(layer, attr, list(getattr(layer, attr)))
            return fn(self, layer, idxs)

        return prune

    for cls, fn in targets:
        cls.prune_out_channels = cls.prune_in_channels = copying(fn)
    try:
        yield
    finally:
        for cls, fn in targets:
            cls.prune_out_channels = cls.prune_in_channels = fn


@contextlib.contextmanager
def _robust_index_mapping(state: PatchState):
    """DepGraph's index-mapping update, made robust and incremental.

    Written by hand (a 10-line dispatch loop replacing Torch-Pruning's ``update_index_mapping``) because:

    * one unmappable node aborts Torch-Pruning's whole graph build -- a channel shuffle's ``view`` divides by
      zero (ShuffleNet). Here the node is recorded in ``state.blocked`` with the reason, and every group whose
      channels pass through it is left unpruned and reported: guessing a mapping could silently permute channels;
    * Torch-Pruning recomputes every mapping of the graph on each ``get_pruning_group`` call, which makes planning
      O(groups x nodes) (70% of the time on DenseNet). Mappings derive from sizes held by placeholder nodes
      (concat, split, reshape, ...), which change only when a group through such a node is pruned or rolled
      back; ``state.mapping_dirty`` tracks exactly that.
    """
    from torch_pruning.dependency import index_mapping as im

    original = im.update_index_mapping
    kinds = tp.ops.OPTYPE
    updaters = {
        kinds.CONCAT: im.update_concat_index_mapping,
        kinds.SPLIT: update_split_index_mapping,
        kinds.RESHAPE: im.update_reshape_index_mapping,
        kinds.UNBIND: im.update_unbind_index_mapping,
        kinds.EXPAND: im.update_expand_index_mapping,
        kinds.SLICE: im.update_slice_index_mapping,
    }
    state.mapping_dirty = True

    def update(graph):
        if not state.mapping_dirty:
            return
        for node in list(graph.module2node.values()):
            fn = updaters.get(node.type)
            if fn is None:
                continue
            try:
                fn(graph, node)
            except Exception as e:
                state.blocked[node] = f"{node.type.name.lower()} node: {type(e).__name__}: {e}"[:160]
        state.mapping_dirty = False

    im.update_index_mapping = update
    try:
        yield
    finally:
        im.update_index_mapping = original


@contextlib.contextmanager
def _bounded_traversal(max_indices: int, state: PatchState):
    """Bound the dependency walks Torch-Pruning makes to build a group.

    Written by hand because no library option exists. DepGraph guesses reshape semantics from inferred channel
    counts; on channels-last window reshapes (Swin, MaxViT) it guesses a flatten on one side of a residual loop only,
    and indices are multiplied by the stride on every trip around the loop until memory runs out; on detection heads
    shared across feature levels the walk revisits the same layers with ever new index sets and never ends. A real
    walk cannot yield more indices than the widest layer has channels, nor more items than the graph has
    dependencies, nor take minutes: past those bounds the group is abandoned and reported, instead of exhausting
    memory or time. Installed only while Presso prunes.
    """
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.group import Group

    original_flatten = index_mapping._FlattenIndexMapping
    original_add = Group.add_dep

    walk = {"t0": time.perf_counter()}  # start of the current walk: get_pruning_group adds its root first

    def check_time():
        if time.perf_counter() - walk["t0"] > _GROUP_SECONDS:
            raise _IndexExplosion("the dependency walk does not converge (layers revisited with ever new indices)")

    class Bounded(original_flatten):
        def __call__(self, idxs):
            if not self.reverse and len(idxs) * self._stride > max_indices:  # refuse before building the list
                raise _IndexExplosion(
                    "channel indices explode through a reshape (Torch-Pruning cannot map channels through it)"
                )
            check_time()
            return super().__call__(idxs)

    def add_dep(self, dep, idxs):
        if not self._group:
            walk["t0"] = time.perf_counter()
        elif len(self._group) > state.max_items:
            raise _IndexExplosion("the dependency walk does not converge (layers revisited with ever new indices)")
        else:
            check_time()
        original_add(self, dep, idxs)

    index_mapping._FlattenIndexMapping = Bounded
    Group.add_dep = add_dep
    try:
        yield
    finally:
        index_mapping._FlattenIndexMapping = original_flatten
        Group.add_dep = original_add


# --------------------------------------------------------------------------- DepGraph's private maps (rollback)
def param_name(DG: tp.DependencyGraph, param: nn.Parameter) -> str | None:
    """The qualified name DepGraph knows a bare parameter by (a class token, a layer-scale gamma), or None."""
    return DG._param_to_name.get(param)


def snapshot_graph(DG: tp.DependencyGraph, group) -> tuple:
    """DepGraph's own state that pruning ``group`` changes, for :func:`restore_graph`.

    Pruning a bare parameter replaces it with a new ``nn.Parameter``, and ``Group.prune`` re-points the parameter's
    node and DepGraph's private parameter -> name and module -> node maps at the new object; rolling back must
    point them at the old one again."""
    nodes = [(d.target, d.target.module) for d, _ in group if isinstance(d.target.module, nn.Parameter)]
    return nodes, dict(DG._param_to_name), dict(DG.module2node)


def restore_graph(DG: tp.DependencyGraph, snap: tuple) -> None:
    """Put back what :func:`snapshot_graph` saved."""
    nodes, p2n, m2n = snap
    for node, module in nodes:
        node.module = module
    DG._param_to_name.clear()
    DG._param_to_name.update(p2n)
    DG.module2node.clear()
    DG.module2node.update(m2n)
