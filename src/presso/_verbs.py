"""Let a verb's subpackage be called like the verb.

The architecture puts each verb in a folder of the same name (``presso/compress/`` holds ``compress``). Python sets
``presso.compress`` to the *subpackage* as soon as it is imported, which would shadow the function re-exported under
that name. Giving the subpackage a callable module class makes ``presso.compress(...)`` call the verb whatever the
import order, while ``presso.compress.PruneConfig`` still reaches the package's contents.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from collections.abc import Callable


def callable_package(module_name: str, fn: Callable, implementation: str | None = None) -> None:
    """Make ``module_name`` callable as ``fn``. ``implementation`` (``"module:function"``): the function a lazy
    ``fn(*args, **kwargs)`` forwards to; ``inspect.signature`` of the verb is its signature, imported only when asked
    for (so that ``presso.convert`` stays importable without PyTorch)."""
    module = sys.modules[module_name]

    def target() -> Callable:
        if implementation is None:
            return fn
        mod, _, name = implementation.partition(":")
        return getattr(importlib.import_module(mod), name)

    class _VerbPackage(types.ModuleType):
        @functools.wraps(fn)
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

        @property
        def __signature__(self) -> inspect.Signature:
            # the verb's own parameters (a bound __call__ would hide the first one, and a lazy fn shows *args)
            return inspect.signature(target())

    _VerbPackage.__doc__ = fn.__doc__
    module.__class__ = _VerbPackage
