"""Which implementation of the core backs the public API.

``KVMEMU_PURE_PYTHON=1`` (any value but empty or ``0``) before ``import
kvmemu`` selects the pure-Python twin; otherwise the compiled core is used,
and a missing build is an ImportError rather than a silent 50x slowdown.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: The names each core provides; kvmemu re-exports them from the chosen one.
CORE_NAMES = ("vmx_error_code", "svm_error_code", "tdx_shared_bit", "PageTables", "Translation",
              "EptViolation", "EptMisconfig", "NestedPageFault", "VM", "MemoryFaultExit",
              "MmioExit")

_MODULES = {"cython": "kvmemu._core", "python": "kvmemu._pure"}


def default_implementation() -> str:
    return "python" if os.environ.get("KVMEMU_PURE_PYTHON", "") not in ("", "0") else "cython"


def load(name: str) -> ModuleType:
    """The core module for ``"cython"`` or ``"python"``."""
    try:
        module_name = _MODULES[name]
    except KeyError:
        raise ValueError(f"implementation must be 'cython' or 'python', not {name!r}") from None
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if name != "cython":
            raise
        raise ImportError(
            "kvmemu's compiled core is not built (install the package with pip, or run "
            "'python setup.py build_ext --inplace'); set KVMEMU_PURE_PYTHON=1 to use the "
            f"pure-Python twin instead ({exc})") from exc
