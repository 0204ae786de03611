"""Which implementation of the core backs the public API.

``KVMEMU_PURE_PYTHON=1`` (any value but empty or ``0``) before ``import
kvmemu`` selects the pure-Python twin; otherwise the compiled core is used,
and a missing build is an ImportError rather than a silent 50x slowdown.
``load(name)`` gives the public names of one implementation (the API layer's
classes bound to that core), so a test can use both in one process.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from . import _vm

#: The names each implementation provides; kvmemu re-exports them from the chosen one.
CORE_NAMES = _vm.IMPLEMENTATION_NAMES

_MODULES = {"cython": "kvmemu._core", "python": "kvmemu._pure"}
_BOUND: dict[str, ModuleType] = {}


def default_implementation() -> str:
    return "python" if os.environ.get("KVMEMU_PURE_PYTHON", "") not in ("", "0") else "cython"


def load(name: str) -> ModuleType:
    """The public names of the ``"cython"`` or ``"python"`` implementation."""
    try:
        module_name = _MODULES[name]
    except KeyError:
        raise ValueError(f"implementation must be 'cython' or 'python', not {name!r}") from None
    if name not in _BOUND:
        try:
            core = importlib.import_module(module_name)
        except ImportError as exc:
            if name != "cython":
                raise
            raise ImportError(
                "kvmemu's compiled core is not built (install the package with pip, or run "
                "'python setup.py build_ext --inplace'); set KVMEMU_PURE_PYTHON=1 to use the "
                f"pure-Python twin instead ({exc})") from exc
        _BOUND[name] = _vm.bind(core, name)
    return _BOUND[name]
