# Type information for kvmemu's public API (hand-written; see docs/api.md).
from typing import Any, Callable, Final, Literal, final, overload

import numpy as np
import numpy.typing as npt

from .constants import (
    ZapReason as ZapReason,
    AccessFlags as AccessFlags,
    EPT_BAD_MEMTYPES as EPT_BAD_MEMTYPES,
    EPT_RSVD_1G as EPT_RSVD_1G,
    EPT_RSVD_2M as EPT_RSVD_2M,
    EPT_RSVD_NONLEAF as EPT_RSVD_NONLEAF,
    EPT_RSVD_ROOT as EPT_RSVD_ROOT,
    MAXPHYADDR_MAX as MAXPHYADDR_MAX,
    MAXPHYADDR_MIN as MAXPHYADDR_MIN,
    NPT_RSVD_1G as NPT_RSVD_1G,
    NPT_RSVD_2M as NPT_RSVD_2M,
    NPT_RSVD_ROOT as NPT_RSVD_ROOT,
    PT_BASE_HPA as PT_BASE_HPA,
    PT_ENTRIES as PT_ENTRIES,
    PT_LEVEL_BITS as PT_LEVEL_BITS,
    PT_ROOT_MAX_LEVEL as PT_ROOT_MAX_LEVEL,
    EPT_MEMTYPE_MASK as EPT_MEMTYPE_MASK,
    EPT_MEMTYPE_SHIFT as EPT_MEMTYPE_SHIFT,
    EPT_VIOLATION as EPT_VIOLATION,
    EPT_VIOLATION_PROT_MASK as EPT_VIOLATION_PROT_MASK,
    EPTE as EPTE,
    GMEM_FILE_PAGES as GMEM_FILE_PAGES,
    GMEM_PFN_BASE as GMEM_PFN_BASE,
    HOST_MAXPHYADDR as HOST_MAXPHYADDR,
    INVALID_GPA as INVALID_GPA,
    KVM_INTERNAL_MEMSLOT_FLAGS as KVM_INTERNAL_MEMSLOT_FLAGS,
    KVM_MEMSLOT_GMEM_ONLY as KVM_MEMSLOT_GMEM_ONLY,
    KVM_MEMSLOT_INVALID as KVM_MEMSLOT_INVALID,
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
    USER_PTR_MAX as USER_PTR_MAX,
    USER_PTR_MAX_LA57 as USER_PTR_MAX_LA57,
    SME_C_BIT as SME_C_BIT,
    SME_PHYS_BITS_REDUCTION as SME_PHYS_BITS_REDUCTION,
    ACC_TRACK_SAVED_BITS_MASK as ACC_TRACK_SAVED_BITS_MASK,
    ACC_TRACK_SAVED_BITS_SHIFT as ACC_TRACK_SAVED_BITS_SHIFT,
    SPTE_TDP_AD_MASK as SPTE_TDP_AD_MASK,
    ExitReason as ExitReason,
    GuestMemfdFlag as GuestMemfdFlag,
    MemAttr as MemAttr,
    Quirk as Quirk,
    KVM_X86_VALID_QUIRKS as KVM_X86_VALID_QUIRKS,
    DirtyLogManual as DirtyLogManual,
    SNP_PAGE_STATE_PRIVATE as SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_SHARED as SNP_PAGE_STATE_SHARED,
    GHCB_MSR_PSC_REQ as GHCB_MSR_PSC_REQ,
    GHCB_MSR_PSC_RESP as GHCB_MSR_PSC_RESP,
    GHCB_MSR_PSC_RESP_ERROR as GHCB_MSR_PSC_RESP_ERROR,
    VMGEXIT_PSC_MAX_COUNT as VMGEXIT_PSC_MAX_COUNT,
    VMGEXIT_PSC_ERROR_GENERIC as VMGEXIT_PSC_ERROR_GENERIC,
    VMGEXIT_PSC_ERROR_INVALID_HDR as VMGEXIT_PSC_ERROR_INVALID_HDR,
    VMGEXIT_PSC_ERROR_INVALID_ENTRY as VMGEXIT_PSC_ERROR_INVALID_ENTRY,
    TdvmcallStatus as TdvmcallStatus,
    TDX_MAP_GPA_MAX_LEN as TDX_MAP_GPA_MAX_LEN,
    TDX_EXT_EXIT_QUAL_TYPE_MASK as TDX_EXT_EXIT_QUAL_TYPE_MASK,
    TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION as TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION,
    TdxModuleStatus as TdxModuleStatus,
    PVALIDATE_SUCCESS as PVALIDATE_SUCCESS,
    PVALIDATE_FAIL_INPUT as PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_SIZEMISMATCH as PVALIDATE_FAIL_SIZEMISMATCH,
    PVALIDATE_FAIL_NOUPDATE as PVALIDATE_FAIL_NOUPDATE,
    X86_TRAP_VC as X86_TRAP_VC,
    SVM_EXIT_PAGE_NOT_VALIDATED as SVM_EXIT_PAGE_NOT_VALIDATED,
    SNP_GUEST_ASID as SNP_GUEST_ASID,
    KVM_SEV_SNP_PAGE_TYPE_NORMAL as KVM_SEV_SNP_PAGE_TYPE_NORMAL,
    KVM_SEV_SNP_PAGE_TYPE_ZERO as KVM_SEV_SNP_PAGE_TYPE_ZERO,
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED as KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
    KVM_SEV_SNP_PAGE_TYPE_SECRETS as KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    KVM_SEV_SNP_PAGE_TYPE_CPUID as KVM_SEV_SNP_PAGE_TYPE_CPUID,
    KVM_TDX_MEASURE_MEMORY_REGION as KVM_TDX_MEASURE_MEMORY_REGION,
    FrameState as FrameState,
    FRAME_GPA_MASK as FRAME_GPA_MASK,
    KVM_HC_VAPIC_POLL_IRQ as KVM_HC_VAPIC_POLL_IRQ,
    KVM_HC_KICK_CPU as KVM_HC_KICK_CPU,
    KVM_HC_CLOCK_PAIRING as KVM_HC_CLOCK_PAIRING,
    KVM_HC_SEND_IPI as KVM_HC_SEND_IPI,
    KVM_HC_SCHED_YIELD as KVM_HC_SCHED_YIELD,
    KVM_HC_MAP_GPA_RANGE as KVM_HC_MAP_GPA_RANGE,
    KVM_ENOSYS as KVM_ENOSYS,
    KVM_EOPNOTSUPP as KVM_EOPNOTSUPP,
    KVM_EXIT_HYPERCALL_VALID_MASK as KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_EXIT_HYPERCALL_LONG_MODE as KVM_EXIT_HYPERCALL_LONG_MODE,
    MapGpaFlag as MapGpaFlag,
    PML_LOG_NR_ENTRIES as PML_LOG_NR_ENTRIES,
    MemFlag as MemFlag,
    MemType as MemType,
    RetPF as RetPF,
    VmxExitReason as VmxExitReason,
    VMType as VMType,
    SPTE as SPTE,
    SHADOW_NONPRESENT_VALUE as SHADOW_NONPRESENT_VALUE,
    KVM_PFN_NOSLOT as KVM_PFN_NOSLOT,
    EPT_MISCONFIG_WX_VALUE as EPT_MISCONFIG_WX_VALUE,
    EPT_MMIO_MASK as EPT_MMIO_MASK,
    NPT_MMIO_VALUE as NPT_MMIO_VALUE,
    NPT_MMIO_ACCESS_MASK as NPT_MMIO_ACCESS_MASK,
    MMIO_SPTE_GEN_LOW_START as MMIO_SPTE_GEN_LOW_START,
    MMIO_SPTE_GEN_LOW_BITS as MMIO_SPTE_GEN_LOW_BITS,
    MMIO_SPTE_GEN_HIGH_START as MMIO_SPTE_GEN_HIGH_START,
    MMIO_SPTE_GEN_MASK as MMIO_SPTE_GEN_MASK,
    ACC_EXEC as ACC_EXEC,
    ACC_WRITE as ACC_WRITE,
    ACC_USER as ACC_USER,
    ACC_ALL as ACC_ALL,
    TDX_LOCAL_RETRY_LIMIT as TDX_LOCAL_RETRY_LIMIT,
    ACCESS_LOOP_LIMIT as ACCESS_LOOP_LIMIT,
)
from ._host import Host as Host
from ._hypercall import PscResult as PscResult, TdvmcallResult as TdvmcallResult
from ._vm import GuestMemfd as GuestMemfd, HostInvalidation as HostInvalidation, MemSlot as MemSlot
from .errors import KvmError as KvmError
from .results import (
    AccessBatch as AccessBatch,
    EptMisconfig as EptMisconfig,
    EptViolation as EptViolation,
    MemoryFaultExit as MemoryFaultExit,
    MmioExit as MmioExit,
    HypercallExit as HypercallExit,
    GuestException as GuestException,
    RmpEntry as RmpEntry,
    NestedPageFault as NestedPageFault,
    Translation as Translation,
)

__version__: Final[str]
IMPLEMENTATION: Final[str]
# Generated from kvmemu.__all__ (tests/test_package.py checks it).
__all__ = [
    'PFERR',
    'PFERR_SYNTHETIC_MASK',
    'EPT_VIOLATION',
    'EPT_VIOLATION_PROT_MASK',
    'VMType',
    'RetPF',
    'ExitReason',
    'Quirk',
    'KVM_X86_VALID_QUIRKS',
    'DirtyLogManual',
    'PML_LOG_NR_ENTRIES',
    'KVM_HC_VAPIC_POLL_IRQ',
    'KVM_HC_KICK_CPU',
    'KVM_HC_CLOCK_PAIRING',
    'KVM_HC_SEND_IPI',
    'KVM_HC_SCHED_YIELD',
    'KVM_HC_MAP_GPA_RANGE',
    'KVM_ENOSYS',
    'KVM_EOPNOTSUPP',
    'KVM_EXIT_HYPERCALL_VALID_MASK',
    'KVM_EXIT_HYPERCALL_LONG_MODE',
    'MapGpaFlag',
    'TdvmcallStatus',
    'TDX_MAP_GPA_MAX_LEN',
    'SNP_PAGE_STATE_PRIVATE',
    'SNP_PAGE_STATE_SHARED',
    'TDX_EXT_EXIT_QUAL_TYPE_MASK',
    'TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION',
    'TdxModuleStatus',
    'PVALIDATE_SUCCESS',
    'PVALIDATE_FAIL_INPUT',
    'PVALIDATE_FAIL_SIZEMISMATCH',
    'PVALIDATE_FAIL_NOUPDATE',
    'X86_TRAP_VC',
    'SVM_EXIT_PAGE_NOT_VALIDATED',
    'SNP_GUEST_ASID',
    'ZapReason',
    'KVM_SEV_SNP_PAGE_TYPE_NORMAL',
    'KVM_SEV_SNP_PAGE_TYPE_ZERO',
    'KVM_SEV_SNP_PAGE_TYPE_UNMEASURED',
    'KVM_SEV_SNP_PAGE_TYPE_SECRETS',
    'KVM_SEV_SNP_PAGE_TYPE_CPUID',
    'KVM_TDX_MEASURE_MEMORY_REGION',
    'FrameState',
    'FRAME_GPA_MASK',
    'GHCB_MSR_PSC_REQ',
    'GHCB_MSR_PSC_RESP',
    'GHCB_MSR_PSC_RESP_ERROR',
    'VMGEXIT_PSC_MAX_COUNT',
    'VMGEXIT_PSC_ERROR_GENERIC',
    'VMGEXIT_PSC_ERROR_INVALID_HDR',
    'VMGEXIT_PSC_ERROR_INVALID_ENTRY',
    'MemAttr',
    'MemFlag',
    'GuestMemfdFlag',
    'MEMORY_EXIT_FLAG_PRIVATE',
    'PG_LEVEL_4K',
    'PG_LEVEL_2M',
    'PG_LEVEL_1G',
    'PG_LEVEL_512G',
    'PG_LEVEL_256T',
    'KVM_MAX_HUGEPAGE_LEVEL',
    'PAGE_SHIFT',
    'PAGE_SIZE',
    'KVM_USER_MEM_SLOTS',
    'KVM_MEM_SLOTS_NUM',
    'KVM_MEM_MAX_NR_PAGES',
    'KVM_LPAGE_MIXED_FLAG',
    'VmxExitReason',
    'SVM_EXIT_NPF',
    'EPTE',
    'EPT_MEMTYPE_SHIFT',
    'EPT_MEMTYPE_MASK',
    'MemType',
    'PTE',
    'TDX_GPAW_SHARED_BIT',
    'KVM_INTERNAL_MEMSLOT_FLAGS',
    'KVM_MEMSLOT_INVALID',
    'KVM_MEMSLOT_GMEM_ONLY',
    'INVALID_GPA',
    'USER_PTR_MAX',
    'HOST_MAXPHYADDR',
    'GMEM_PFN_BASE',
    'GMEM_FILE_PAGES',
    'USER_PTR_MAX_LA57',
    'SME_C_BIT',
    'SME_PHYS_BITS_REDUCTION',
    'SPTE',
    'SHADOW_NONPRESENT_VALUE',
    'KVM_PFN_NOSLOT',
    'EPT_MISCONFIG_WX_VALUE',
    'EPT_MMIO_MASK',
    'NPT_MMIO_VALUE',
    'NPT_MMIO_ACCESS_MASK',
    'ACC_TRACK_SAVED_BITS_MASK',
    'ACC_TRACK_SAVED_BITS_SHIFT',
    'SPTE_TDP_AD_MASK',
    'MMIO_SPTE_GEN_LOW_START',
    'MMIO_SPTE_GEN_LOW_BITS',
    'MMIO_SPTE_GEN_HIGH_START',
    'MMIO_SPTE_GEN_MASK',
    'ACC_EXEC',
    'ACC_WRITE',
    'ACC_USER',
    'ACC_ALL',
    'TDX_LOCAL_RETRY_LIMIT',
    'ACCESS_LOOP_LIMIT',
    'AccessFlags',
    'PT_LEVEL_BITS',
    'PT_ENTRIES',
    'PT_BASE_HPA',
    'PT_ROOT_MAX_LEVEL',
    'MAXPHYADDR_MIN',
    'MAXPHYADDR_MAX',
    'EPT_RSVD_ROOT',
    'EPT_RSVD_NONLEAF',
    'EPT_RSVD_2M',
    'EPT_RSVD_1G',
    'EPT_BAD_MEMTYPES',
    'NPT_RSVD_ROOT',
    'NPT_RSVD_2M',
    'NPT_RSVD_1G',
    'vmx_error_code',
    'svm_error_code',
    'tdx_shared_bit',
    'PageTables',
    'Translation',
    'EptViolation',
    'EptMisconfig',
    'NestedPageFault',
    'VM',
    'MemoryFaultExit',
    'MmioExit',
    'KvmError',
    'GuestMemfd',
    'MemSlot',
    'HostInvalidation',
    'Host',
    'HypercallExit',
    'TdvmcallResult',
    'PscResult',
    'GuestException',
    'RmpEntry',
    'VCPU',
    'KvmRun',
    'Snapshot',
    'AccessBatch',
    'TraceSink',
    'U64Array',
    'IMPLEMENTATION',
    '__version__',
]

from ._types import U64Array as U64Array
_Int = int | np.integer

@overload
def vmx_error_code(  # type: ignore[overload-overlap]
                   exit_qualification: _Int, gpa: _Int, shared_bit: _Int = 0, *,
                   out: None = None) -> int: ...
@overload
def vmx_error_code(exit_qualification: U64Array | _Int, gpa: U64Array | _Int,
                   shared_bit: U64Array | _Int = 0, *, out: U64Array | None = None) -> U64Array: ...
@overload
def svm_error_code(  # type: ignore[overload-overlap]
                   exit_info_1: _Int, snp: bool = False, *, out: None = None) -> int: ...
@overload
def svm_error_code(exit_info_1: U64Array | _Int, snp: bool = False, *,
                   out: U64Array | None = None) -> U64Array: ...
@overload
def tdx_shared_bit(gpaw: int) -> int: ...
@overload
def tdx_shared_bit(gpaw: U64Array) -> U64Array: ...

from ._types import TraceSink as TraceSink

class Snapshot:
    """An opaque copy of a VM's state (``VM.snapshot``); travels as bytes and by pickle."""
    def __init__(self, owner: object, creation: dict[str, Any], memory: Any,
                 vcpus: list[Any], gmem: list[GuestMemfd], bindings: dict[int, Any]) -> None:
        """Internal: made by ``VM.snapshot`` and ``Snapshot.from_bytes``."""
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes | bytearray | memoryview) -> Snapshot: ...

class VM:
    """A KVM virtual machine (see kvmemu._vm.VM for the full contract)."""

    vm_type: VMType
    vendor: str
    gpaw: int
    nx_huge_pages: bool
    eager_page_split: bool
    pml: bool
    host: Host
    has_private_mem: bool
    has_protected_state: bool
    shared_bit: int
    nr_memslot_as_ids: int
    def __init__(self, vm_type: VMType | int = ..., *, vendor: str | None = None,
                 gpaw: int = 48, nx_huge_pages: bool = False,
                 eager_page_split: bool = True, host: Host | None = None) -> None: ...
    @property
    def supported_memory_attributes(self) -> int: ...
    def disable_quirks(self, mask: int) -> None: ...
    @property
    def disabled_quirks(self) -> Quirk: ...
    @property
    def readonly_mem(self) -> bool: ...
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd: ...
    def set_user_memory_region(self, *, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0,
                               guest_memfd: GuestMemfd | None = None,
                               guest_memfd_offset: int = 0, host_level: int = 1) -> None: ...
    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None: ...
    def get_memory_attributes(self, gfn: int) -> int: ...
    def enable_manual_dirty_log_protect(self, initially_set: bool = False) -> None: ...
    def invalidate_host_range(self, hva: int, size: int) -> HostInvalidation: ...
    def enable_exit_hypercall(self, mask: int) -> None: ...
    @property
    def hypercall_exit_enabled(self) -> int: ...
    @property
    def dead(self) -> bool: ...
    @property
    def launched(self) -> bool: ...
    @property
    def pre_fault_allowed(self) -> bool: ...
    def tdx_init_mem_region(self, gpa: int, size: int, *, measure: bool = False) -> int: ...
    def tdx_finalize_vm(self) -> None: ...
    def snp_launch_update(self, gpa: int, size: int, page_type: int = 1) -> int: ...
    def snp_launch_finish(self) -> None: ...
    def rmp_entry(self, pfn: int) -> RmpEntry: ...
    def set_host_level(self, slot: int, level: int) -> None: ...
    @property
    def manual_dirty_log_protect(self) -> DirtyLogManual: ...
    def get_dirty_log(self, slot: int) -> U64Array: ...
    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: U64Array) -> None: ...
    @property
    def memslots(self) -> list[MemSlot]: ...
    def find_memslot(self, gfn: int) -> int | None: ...
    def find_memslots(self, gfns: U64Array) -> npt.NDArray[np.int32]: ...
    def lpage_info(self, slot: int, level: int) -> list[int]: ...
    def memory_attribute_ranges(self) -> list[tuple[int, int, int]]: ...
    @property
    def mmu_invalidate_seq(self) -> int: ...
    @property
    def mmu_invalidate_in_progress(self) -> int: ...
    @property
    def mmu_invalidate_range(self) -> tuple[int, int]: ...
    def memslots_generation(self, as_id: int = 0) -> int: ...
    tdp_levels: int
    @property
    def page_tables(self) -> PageTables: ...
    @property
    def private_page_tables(self) -> PageTables | None: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def trace(self) -> TraceSink | None: ...
    @trace.setter
    def trace(self, sink: TraceSink | None) -> None: ...
    @property
    def on_zap(self) -> Callable[[int, int, int, str], object] | None: ...
    @on_zap.setter
    def on_zap(self, callback: Callable[[int, int, int, str], object] | None) -> None: ...
    def snapshot(self) -> Snapshot: ...
    def restore(self, snapshot: Snapshot) -> None: ...
    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> VM: ...
    def check_invariants(self) -> list[str]: ...
    def create_vcpu(self) -> VCPU: ...

class KvmRun:
    def __init__(self, state: Any) -> None:
        """Internal: each VCPU has one (``VCPU.run``)."""
    @property
    def exit_reason(self) -> ExitReason: ...
    @property
    def memory_fault(self) -> tuple[int, int, int]: ...
    @property
    def mmio(self) -> tuple[int, bool]: ...
    @property
    def hypercall(self) -> tuple[int, tuple[int, ...], int, int]: ...

class VCPU:
    """A vCPU (see kvmemu._vm.VCPU for the full contract)."""

    def __init__(self, vm: VM, vcpu_id: int) -> None:
        """Internal: made by ``VM.create_vcpu``."""
    vm: VM
    vcpu_id: int
    run: KvmRun
    stage_hook: Callable[[str], object] | None
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def rip(self) -> int: ...
    @rip.setter
    def rip(self, value: _Int) -> None: ...
    def handle_ept_violation(self, gpa: _Int, exit_qualification: _Int,
                             ext_exit_qualification: _Int = 0) -> int: ...
    def handle_ept_misconfig(self, gpa: _Int) -> int: ...
    def handle_npf(self, gpa: _Int, exit_info_1: _Int) -> int: ...
    def access(self, gpa: _Int, *, write: bool = False, fetch: bool = False,
               user: bool = False, stage: str = "final",
               encrypted: bool = False, size: int | None = None,
               data: int | bytes | None = None
               ) -> Translation | MemoryFaultExit | MmioExit | GuestException: ...
    interrupt_pending: bool
    def pvalidate(self, gpa: int, page_size: int = 1, validate: bool = True
                  ) -> int | MemoryFaultExit | MmioExit | GuestException: ...
    def tdx_accept(self, gpa: int, level: int = 1
                   ) -> TdxModuleStatus | MemoryFaultExit | MmioExit: ...
    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0,
                  a3: int = 0) -> int | HypercallExit: ...
    def complete_hypercall(self, ret: int) -> int | HypercallExit | TdvmcallResult | PscResult: ...
    def tdvmcall_map_gpa(self, gpa: int, size: int) -> HypercallExit | TdvmcallResult: ...
    def snp_page_state_change(self, entries: list[tuple[int, int, bool]]
                              ) -> HypercallExit | PscResult: ...
    def snp_psc_msr(self, gfn: int, op: int) -> HypercallExit | int: ...
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int: ...
    def access_many(self, gpas: U64Array,
                    flags: int | npt.NDArray[np.uint8] = 0, *,
                    out: tuple[U64Array, npt.NDArray[np.uint8]] | None = None) -> AccessBatch: ...

_Exit = EptViolation | EptMisconfig | NestedPageFault

@final
class PageTables:
    def __init__(self, kind: Literal["ept", "npt"], levels: Literal[4, 5] = 4, *,
                 ad_bits: bool = True, exec_only: bool = True, mbec: bool = False,
                 maxphyaddr: int = 52, huge_1g: bool = True, host_nx: bool = True,
                 host_smep: bool = False) -> None: ...
    @property
    def kind(self) -> str: ...
    @property
    def levels(self) -> int: ...
    @property
    def maxphyaddr(self) -> int: ...
    @property
    def ad_bits(self) -> bool: ...
    @property
    def exec_only(self) -> bool: ...
    @property
    def mbec(self) -> bool: ...
    @property
    def huge_1g(self) -> bool: ...
    @property
    def host_nx(self) -> bool: ...
    @property
    def host_smep(self) -> bool: ...
    @property
    def root_hpa(self) -> int: ...
    @property
    def tables(self) -> U64Array: ...
    def set_entry(self, gpa: _Int, level: int, value: _Int) -> None: ...
    def get_entry(self, gpa: _Int, level: int) -> int: ...
    def walk(self, gpa: _Int) -> list[tuple[int, int]]: ...
    def translate(self, gpa: _Int, *, write: bool = False, fetch: bool = False,
                  user: bool = False, stage: Literal["final", "walk", "nogva"] = "final",
                  encrypted: bool = False) -> Translation | _Exit: ...
    def translate_many(self, gpas: U64Array, flags: int | npt.NDArray[np.uint8] = 0
                       ) -> tuple[U64Array, npt.NDArray[np.uint8]]: ...
    # The storage as both cores' TDP MMU and kvmemu._tables use it (not for callers).
    @property
    def ntables(self) -> int: ...
    @property
    def max_tables(self) -> int: ...
    @property
    def kvm_owned(self) -> bool: ...
    @property
    def ept(self) -> bool: ...
    @property
    def nonleaf(self) -> int: ...
    @property
    def present_mask(self) -> int: ...
    @property
    def addr_mask(self) -> int: ...
    @property
    def large_bit(self) -> int: ...
    @property
    def rsvd_high(self) -> int: ...
    lock: Any
    def entry(self, table: int, index: int) -> int: ...
    def store(self, table: int, index: int, value: int) -> None: ...
    def hpa(self, table: int) -> int: ...
    def table_at(self, hpa: int) -> int: ...
    def is_large(self, level: int, e: int) -> bool: ...
    def new_table(self) -> int: ...
    def export_tables(self) -> tuple[U64Array, npt.NDArray[np.int64]]: ...
    def load_tables(self, tables: U64Array, free: npt.NDArray[np.int64]) -> None: ...
