"""Let a verb's subpackage be called like the verb.

The architecture puts each verb in a folder of the same name (``presso/compress/`` holds ``compress``). Python sets
``presso.compress`` to the *subpackage* as soon as it is imported, which would shadow the function re-exported under
that name. Giving the subpackage a callable module class makes ``presso.compress(...)`` call the verb whatever the
import order, while ``presso.compress.PruneConfig`` still reaches the package's contents.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable


def callable_package(module_name: str, fn: Callable) -> None:
    module = sys.modules[module_name]

    class _VerbPackage(types.ModuleType):
        @functools.wraps(fn)
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    _VerbPackage.__doc__ = fn.__doc__
    module.__class__ = _VerbPackage
