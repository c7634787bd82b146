"""Structured pruning of any PyTorch model, from its graph.

Coupled layers are found by Torch-Pruning's dependency graph (DepGraph). On top of it Presso adds what a plain
DepGraph recipe lacks for models it has never seen:

* **group-by-group pruning with a forward check and rollback** -- groups are applied in chunks; when the model no
  longer runs (or its output shapes change) the chunk is rolled back and retried group by group, and a group that
  breaks the model is left unpruned and reported with the reason. Rollback restores the touched modules' attribute
  dictionaries, so it costs no tensor copies;
* **errors contained per group** -- an index error in one concat/split/reshape mapping skips that group only;
* **grouped convolutions thinned by whole groups** -- a grouped convolution (ResNeXt, RegNet) loses whole groups
  (its ``groups`` falls, each group keeps its width) together with the matching input channels, instead of the same
  channels of every group: narrower groups cut MACs but barely time, since a grouped convolution's speed is set by
  its group width (``grouped="width"`` keeps the old way);
* **attention heads kept consistent** -- groups inside a module with ``num_heads`` are re-rooted on the attention's
  output projection and pruned per head (same head-dims in every head, or whole heads), and the module's
  ``head_dim``/``attn_dim``/``num_heads``/``scale`` are updated;
* **a replayable record** -- every pruning call is recorded (layer, function, indices), so loading a model directory
  replays it without a graph build.

The package, by concept:

* :mod:`~presso.compress.prune.config` -- :class:`PruneConfig` (what to prune) and the per-layer files;
* :mod:`~presso.compress.prune.importance` -- the criteria registry (:func:`register_importance`), the built-in
  criteria and the gradients a criterion may need;
* :mod:`~presso.compress.prune.plan` -- which coupled groups, which channel indices;
* :mod:`~presso.compress.prune.pruner` -- applying the plans with forward checks, rollback and the record;
* :mod:`~presso.compress.prune.tp_patches` -- every patch of Torch-Pruning and access to its internals.
"""

# first: it imports Torch-Pruning the way a Ctrl-C survives (see there)
from presso.compress.prune import tp_patches  # noqa: F401  # isort: skip
from presso.compress.prune.config import ATTENTION_MODES, GROUPED_MODES, PruneConfig, load_layer_file
from presso.compress.prune.importance import criteria, needs_gradients, register_importance
from presso.compress.prune.pruner import GraphPruner, PruneOutcome, prune_model

__all__ = [
    "ATTENTION_MODES",
    "GROUPED_MODES",
    "GraphPruner",
    "PruneConfig",
    "PruneOutcome",
    "criteria",
    "load_layer_file",
    "needs_gradients",
    "prune_model",
    "register_importance",
]
