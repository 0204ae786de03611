"""The pure-Python twin of the compiled core.

The readable, executable specification of the per-access rules: the same parts
(``paging``, ``exits``, ``spte``, ``tdp_mmu``, ``mmu``, ``memslots``, ``vcpu``,
``levels``, ``locking``, ``trace``) with the same function names as ``kvmemu/_cy/``, and the same results
bit for bit.  Selected by ``KVMEMU_PURE_PYTHON=1`` before ``import kvmemu``; the
test suite runs every test against both.
"""

from .exits import svm_error_code, vmx_error_code
from .locking import Mutex, RwLock, fetch_andnot_words, xchg_words
from .memslots import Memslots, gmem_frame
from .paging import PageTables
from .tdp_mmu import TdpMmu
from .trace import Tracer
from .vcpu import VCPUState

__all__ = ["vmx_error_code", "svm_error_code", "PageTables", "Memslots", "Mutex", "RwLock",
           "TdpMmu", "Tracer", "VCPUState", "gmem_frame", "fetch_andnot_words", "xchg_words"]
