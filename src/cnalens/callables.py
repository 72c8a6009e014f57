"""Modules that are also functions: ``cnalens.cna`` and ``cnalens.evaluate`` name both a
module and the function a notebook calls, so calling the module calls the function."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def make_callable(module_name: str, fn: Callable) -> None:
    """Calling the module ``module_name`` calls ``fn`` (its attributes stay the module's)."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    CallableModule.__call__.__doc__ = fn.__doc__
    sys.modules[module_name].__class__ = CallableModule
