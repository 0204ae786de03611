# Type information for kvmemu's public API (hand-written; see API.md).
from typing import Final, overload

import numpy as np
import numpy.typing as npt

from .constants import (
    EPT_MEMTYPE_MASK as EPT_MEMTYPE_MASK,
    EPT_MEMTYPE_SHIFT as EPT_MEMTYPE_SHIFT,
    EPT_VIOLATION as EPT_VIOLATION,
    EPT_VIOLATION_PROT_MASK as EPT_VIOLATION_PROT_MASK,
    EPTE as EPTE,
    KVM_LPAGE_MIXED_FLAG as KVM_LPAGE_MIXED_FLAG,
    KVM_MAX_HUGEPAGE_LEVEL as KVM_MAX_HUGEPAGE_LEVEL,
    KVM_MEM_MAX_NR_PAGES as KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_SLOTS_NUM as KVM_MEM_SLOTS_NUM,
    KVM_USER_MEM_SLOTS as KVM_USER_MEM_SLOTS,
    MEMORY_EXIT_FLAG_PRIVATE as MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT as PAGE_SHIFT,
    PAGE_SIZE as PAGE_SIZE,
    PFERR as PFERR,
    PFERR_SYNTHETIC_MASK as PFERR_SYNTHETIC_MASK,
    PG_LEVEL_1G as PG_LEVEL_1G,
    PG_LEVEL_2M as PG_LEVEL_2M,
    PG_LEVEL_4K as PG_LEVEL_4K,
    PG_LEVEL_256T as PG_LEVEL_256T,
    PG_LEVEL_512G as PG_LEVEL_512G,
    PTE as PTE,
    SVM_EXIT_NPF as SVM_EXIT_NPF,
    TDX_GPAW_SHARED_BIT as TDX_GPAW_SHARED_BIT,
    ExitReason as ExitReason,
    GuestMemfdFlag as GuestMemfdFlag,
    MemAttr as MemAttr,
    MemFlag as MemFlag,
    MemType as MemType,
    RetPF as RetPF,
    VmxExitReason as VmxExitReason,
    VMType as VMType,
)
from .errors import KvmError as KvmError

__version__: Final[str]
IMPLEMENTATION: Final[str]
__all__: list[str]

U64Array = npt.NDArray[np.uint64]
_Int = int | np.integer

@overload
def vmx_error_code(exit_qualification: _Int, gpa: _Int, shared_bit: _Int = 0, *,
                   out: None = None) -> int: ...
@overload
def vmx_error_code(exit_qualification: U64Array | _Int, gpa: U64Array | _Int,
                   shared_bit: U64Array | _Int = 0, *, out: U64Array | None = None) -> U64Array: ...
@overload
def svm_error_code(exit_info_1: _Int, snp: bool = False, *, out: None = None) -> int: ...
@overload
def svm_error_code(exit_info_1: U64Array | _Int, snp: bool = False, *,
                   out: U64Array | None = None) -> U64Array: ...
@overload
def tdx_shared_bit(gpaw: int) -> int: ...
@overload
def tdx_shared_bit(gpaw: U64Array) -> U64Array: ...
