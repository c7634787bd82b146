"""Searcher: hardware-aware architecture search from a dataset (Optuna), cheap because latency is predicted first.

``presso.search(data, device="local", latency_ms=2.0, trials=30, output_dir="OUT")`` -- see ``nas.py``.
"""

from __future__ import annotations

from presso._verbs import callable_package
from presso.search import mobilenet  # noqa: F401  (registers the built-in space: every module of the package sees it)
from presso.search.space import SPACES, SearchSpace, arch_key, get_space, register_space


def search(*args, **kwargs):
    """Search an architecture for a dataset and a latency budget; see ``presso.search.nas.search``."""
    from presso.search.nas import search as run

    return run(*args, **kwargs)


__all__ = ["SPACES", "SearchSpace", "arch_key", "get_space", "register_space", "search"]

callable_package(__name__, search, "presso.search.nas:search")
