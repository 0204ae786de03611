"""kvmemu: a bit-exact model of x86 second-stage page faults and the Linux 6.18
KVM TDP MMU fault path, for every x86 VM type (DEFAULT, SW_PROTECTED, SEV,
SEV_ES, SNP, TDX).

The public API is documented in the README and in docs/api.md;
``IMPLEMENTATION`` says which core backs it (``"cython"`` or ``"python"``).
"""

from __future__ import annotations

from . import _select
from ._version import __version__
from .constants import *  # noqa: F401,F403  (the constants are part of the API)
from .constants import __all__ as _constants_all
from ._host import Host
from ._types import TraceSink, U64Array
from ._vm import VCPU, GuestMemfd, HostInvalidation, KvmRun, MemSlot, Snapshot
from .errors import KvmError
from ._hypercall import PscResult, TdvmcallResult
from .results import AccessBatch, GuestException, HypercallExit, RmpEntry

IMPLEMENTATION: str = _select.default_implementation()

_implementation = _select.load(IMPLEMENTATION)
for _name in _select.CORE_NAMES:
    globals()[_name] = getattr(_implementation, _name)
del _name

__all__ = [*_constants_all, *_select.CORE_NAMES, "KvmError", "GuestMemfd", "MemSlot",
           "HostInvalidation", "Host", "HypercallExit",
           "TdvmcallResult", "PscResult", "GuestException", "RmpEntry", "VCPU", "KvmRun",
           "Snapshot", "AccessBatch", "TraceSink", "U64Array",
           "IMPLEMENTATION", "__version__"]
