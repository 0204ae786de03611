"""Every constant of the model, once, with the kernel's value.

Values are those of Linux 6.18 (uapi and internal headers) and of the Intel
SDM / AMD APM where the hardware defines them.  Nothing else in the package
spells a bit number.  ``c_constants()`` names every integer here the way C
code does (``PFERR_WRITE``, ``EPTE_READ``, ``RET_PF_RETRY``,
``ACCESS_FLAGS_WRITE``): ``setup.py`` writes a C header and the Cython extern
declarations from it into the build directory, and the pure-Python twin
imports the same names from ``kvmemu._pure.cnames``, so both cores spell a
constant the same way and neither keeps a list of them.

The flag classes print readably: ``repr(PFERR(0x100000002))`` is
``PFERR.WRITE|GUEST_FINAL``; bits without a name print in hex.  Building a
flag from an arbitrary value does not grow a cache (the standard library's
IntFlag remembers every composite value it ever saw).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "PFERR", "PFERR_SYNTHETIC_MASK", "EPT_VIOLATION", "EPT_VIOLATION_PROT_MASK",
    "VMType", "RetPF", "ExitReason", "Quirk", "KVM_X86_VALID_QUIRKS", "DirtyLogManual",
    "PML_LOG_NR_ENTRIES", "KVM_HC_VAPIC_POLL_IRQ", "KVM_HC_KICK_CPU", "KVM_HC_CLOCK_PAIRING",
    "KVM_HC_SEND_IPI", "KVM_HC_SCHED_YIELD", "KVM_HC_MAP_GPA_RANGE", "KVM_ENOSYS",
    "KVM_EOPNOTSUPP", "KVM_EXIT_HYPERCALL_VALID_MASK", "KVM_EXIT_HYPERCALL_LONG_MODE",
    "MapGpaFlag", "TdvmcallStatus", "TDX_MAP_GPA_MAX_LEN", "SNP_PAGE_STATE_PRIVATE",
    "SNP_PAGE_STATE_SHARED", "TDX_EXT_EXIT_QUAL_TYPE_MASK",
    "TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION", "TdxModuleStatus", "PVALIDATE_SUCCESS",
    "PVALIDATE_FAIL_INPUT", "PVALIDATE_FAIL_SIZEMISMATCH", "PVALIDATE_FAIL_NOUPDATE",
    "X86_TRAP_VC", "SVM_EXIT_PAGE_NOT_VALIDATED", "SNP_GUEST_ASID", "ZapReason",
    "KVM_SEV_SNP_PAGE_TYPE_NORMAL", "KVM_SEV_SNP_PAGE_TYPE_ZERO",
    "KVM_SEV_SNP_PAGE_TYPE_UNMEASURED", "KVM_SEV_SNP_PAGE_TYPE_SECRETS",
    "KVM_SEV_SNP_PAGE_TYPE_CPUID", "KVM_TDX_MEASURE_MEMORY_REGION", "FrameState",
    "FRAME_GPA_MASK", "GHCB_MSR_PSC_REQ", "GHCB_MSR_PSC_RESP",
    "GHCB_MSR_PSC_RESP_ERROR", "VMGEXIT_PSC_MAX_COUNT", "VMGEXIT_PSC_ERROR_GENERIC",
    "VMGEXIT_PSC_ERROR_INVALID_HDR", "VMGEXIT_PSC_ERROR_INVALID_ENTRY", "MemAttr", "MemFlag", "GuestMemfdFlag",
    "MEMORY_EXIT_FLAG_PRIVATE", "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G",
    "PG_LEVEL_512G", "PG_LEVEL_256T", "KVM_MAX_HUGEPAGE_LEVEL", "PAGE_SHIFT",
    "PAGE_SIZE", "KVM_USER_MEM_SLOTS", "KVM_MEM_SLOTS_NUM", "KVM_MEM_MAX_NR_PAGES",
    "KVM_LPAGE_MIXED_FLAG", "VmxExitReason", "SVM_EXIT_NPF", "EPTE",
    "EPT_MEMTYPE_SHIFT", "EPT_MEMTYPE_MASK", "MemType", "PTE", "TDX_GPAW_SHARED_BIT",
    "KVM_INTERNAL_MEMSLOT_FLAGS", "KVM_MEMSLOT_INVALID", "KVM_MEMSLOT_GMEM_ONLY", "INVALID_GPA",
    "USER_PTR_MAX", "HOST_MAXPHYADDR", "GMEM_PFN_BASE", "GMEM_FILE_PAGES",
    "USER_PTR_MAX_LA57", "SME_C_BIT", "SME_PHYS_BITS_REDUCTION",
    "SPTE", "SHADOW_NONPRESENT_VALUE", "KVM_PFN_NOSLOT", "EPT_MISCONFIG_WX_VALUE", "EPT_MMIO_MASK",
    "NPT_MMIO_VALUE", "NPT_MMIO_ACCESS_MASK", "ACC_TRACK_SAVED_BITS_MASK",
    "ACC_TRACK_SAVED_BITS_SHIFT", "SPTE_TDP_AD_MASK", "MMIO_SPTE_GEN_LOW_START", "MMIO_SPTE_GEN_LOW_BITS",
    "MMIO_SPTE_GEN_HIGH_START", "MMIO_SPTE_GEN_MASK", "ACC_EXEC", "ACC_WRITE", "ACC_USER",
    "ACC_ALL", "TDX_LOCAL_RETRY_LIMIT", "ACCESS_LOOP_LIMIT",
    "AccessFlags", "PT_LEVEL_BITS", "PT_ENTRIES", "PT_BASE_HPA", "PT_ROOT_MAX_LEVEL",
    "MAXPHYADDR_MIN", "MAXPHYADDR_MAX", "EPT_RSVD_ROOT", "EPT_RSVD_NONLEAF", "EPT_RSVD_2M",
    "EPT_RSVD_1G", "EPT_BAD_MEMTYPES", "NPT_RSVD_ROOT", "NPT_RSVD_2M", "NPT_RSVD_1G",
]


class _Flag(IntFlag):
    """IntFlag with a self-explaining repr and no pseudo-member cache."""

    @classmethod
    def _missing_(cls, value: object) -> "_Flag":
        if not isinstance(value, int):
            raise ValueError(f"{value!r} is not a valid {cls.__name__}")
        if value < 0 or value >> 64:
            raise ValueError(f"{cls.__name__} value {value:#x} is not a u64")
        member = int.__new__(cls, value)
        member._name_ = None
        member._value_ = value
        return member

    def __invert__(self) -> "_Flag":
        """The complement within 64 bits (what ``~`` means for a register)."""
        return type(self)(~int(self) & 0xFFFF_FFFF_FFFF_FFFF)

    def __repr__(self) -> str:
        cls = type(self).__name__
        value = int(self)
        if value == 0:
            return f"{cls}(0)"
        names = []
        rest = value
        for name, member in type(self)._member_map_.items():
            bits = int(member.value)
            if bits and (value & bits) == bits and member._name_ == name:
                names.append(name)
                rest &= ~bits
        if rest:
            names.append(hex(rest))
        return f"{cls}." + "|".join(names)

    __str__ = __repr__


# --- 1. Page-fault error code (arch/x86/include/asm/kvm_host.h) -----------------------

class PFERR(_Flag):
    """Page-fault error code bits, ``PFERR_*_MASK`` in kvm_host.h.

    Bits 0-15 are the architectural #PF bits, 31-36 come from AMD #NPF
    EXITINFO1, 48 and 49 are synthesised by KVM and never come from hardware.
    """

    PRESENT = 1 << 0
    WRITE = 1 << 1
    USER = 1 << 2
    RSVD = 1 << 3
    FETCH = 1 << 4
    PK = 1 << 5
    SS = 1 << 6
    SGX = 1 << 15
    GUEST_RMP = 1 << 31
    GUEST_FINAL = 1 << 32
    GUEST_PAGE = 1 << 33
    GUEST_ENC = 1 << 34
    GUEST_SIZEM = 1 << 35
    GUEST_VMPL = 1 << 36
    IMPLICIT_ACCESS = 1 << 48
    PRIVATE_ACCESS = 1 << 49


#: PFERR_SYNTHETIC_MASK: the KVM-defined bits that hardware must never report.
PFERR_SYNTHETIC_MASK = PFERR.IMPLICIT_ACCESS.value | PFERR.PRIVATE_ACCESS.value


# --- 2. EPT violation exit qualification (arch/x86/include/asm/vmx.h; SDM) -------------

class EPT_VIOLATION(_Flag):
    """EPT-violation exit qualification bits (exit reason 48; Intel SDM vol. 3C, "Exit
    Qualification for EPT Violations").

    Bits 0-8 are Linux 6.18's (arch/x86/include/asm/vmx.h).  Bit 6 is named
    ``EPT_VIOLATION_EXEC_FOR_RING3_LIN`` in Linux 6.18 and is the AND of the XU bits
    with mode-based execute control; ``PROT_USER_EXEC`` is the name this package (and
    later kernels) use.  KVM reads none of the bits above 8 except 12 (as
    INTR_INFO_UNBLOCK_NMI); their names here are this package's, after the SDM and
    kvm-unit-tests: with "advanced VM-exit information for EPT violations", when bits
    7 and 8 are set, bit 9 says the linear address is user-mode, bit 10 that it is
    writable and bit 11 that it is execute-disable (kvm-unit-tests' EPT_VLT_GUEST_USER,
    _RW, _NX); bit 12 is NMI unblocking due to IRET; bit 13 a shadow-stack access; bit
    14 the leaf's supervisor-shadow-stack bit (Bochs); bit 15 an EPT violation of
    guest-paging verification and bit 16 an access asynchronous to instruction
    execution (Intel PT output, PEBS, user-interrupt delivery), as this package reads
    the current SDM table (neither kvm-unit-tests nor Bochs names them).
    """

    ACC_READ = 0x1
    ACC_WRITE = 0x2
    ACC_INSTR = 0x4
    PROT_READ = 0x8
    PROT_WRITE = 0x10
    PROT_EXEC = 0x20
    PROT_USER_EXEC = 0x40
    EXEC_FOR_RING3_LIN = 0x40
    GVA_IS_VALID = 0x80
    GVA_TRANSLATED = 0x100
    GUEST_USER = 0x200
    GUEST_RW = 0x400
    GUEST_NX = 0x800
    NMI_UNBLOCKING = 0x1000
    SHADOW_STACK = 0x2000
    SUPERVISOR_SHADOW_STACK = 0x4000
    PAGING_VERIFICATION = 0x8000
    ASYNC_TO_INSTRUCTION = 0x10000


#: EPT_VIOLATION_PROT_MASK = PROT_READ | PROT_WRITE | PROT_EXEC (bit 6 is not in it in 6.18).
EPT_VIOLATION_PROT_MASK = (EPT_VIOLATION.PROT_READ.value | EPT_VIOLATION.PROT_WRITE.value
                           | EPT_VIOLATION.PROT_EXEC.value)


class VmxExitReason(IntEnum):
    """VMX basic exit reasons for second-stage faults (SDM appendix C)."""

    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49


#: SVM_EXIT_NPF: the #VMEXIT code of a nested page fault (AMD APM).
SVM_EXIT_NPF = 0x400


# --- 4.4 RET_PF_* (arch/x86/kvm/mmu/mmu_internal.h, 6.12+ numbering) --------------------

class RetPF(IntEnum):
    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6


# --- 5.5 kvm_run exit reasons (include/uapi/linux/kvm.h) -------------------------------

class ExitReason(IntEnum):
    """``KVM_EXIT_*`` values that an x86 VM can see."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37
    MEMORY_FAULT = 39
    TDX = 40


#: KVM_MEMORY_EXIT_FLAG_PRIVATE, in ``run.memory_fault.flags``.
MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


# --- quirks (uapi asm/kvm.h; asm/kvm_host.h, 6.18) ------------------------------------------

class Quirk(_Flag):
    """KVM_X86_QUIRK_*: behaviours KVM keeps for old userspace unless a VMM disables them
    with KVM_CAP_DISABLE_QUIRKS2."""

    LINT0_REENABLED = 1 << 0
    CD_NW_CLEARED = 1 << 1
    LAPIC_MMIO_HOLE = 1 << 2
    OUT_7E_INC_RIP = 1 << 3
    MISC_ENABLE_NO_MWAIT = 1 << 4
    FIX_HYPERCALL_INSN = 1 << 5
    MWAIT_NEVER_UD_FAULTS = 1 << 6
    SLOT_ZAP_ALL = 1 << 7
    STUFF_FEATURE_MSRS = 1 << 8
    IGNORE_GUEST_PAT = 1 << 9
    VMCS12_ALLOW_FREEZE_IN_SMM = 1 << 10


#: KVM_X86_VALID_QUIRKS (asm/kvm_host.h, 6.18): every quirk above.
KVM_X86_VALID_QUIRKS = (1 << 11) - 1


class DirtyLogManual(_Flag):
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's argument (include/uapi/linux/kvm.h, 6.18)."""

    PROTECT_ENABLE = 1 << 0      # KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    INITIALLY_SET = 1 << 1       # KVM_DIRTY_LOG_INITIALLY_SET


#: KVM hypercall numbers (include/uapi/linux/kvm_para.h, 6.18) that x86 handles.
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12
#: The hypercall error codes a guest sees (kvm_para.h): -KVM_ENOSYS and friends.
KVM_ENOSYS = 1000
KVM_EOPNOTSUPP = 95
#: KVM_CAP_EXIT_HYPERCALL accepts only this (KVM_EXIT_HYPERCALL_VALID_MASK, x86.c).
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE
#: kvm_run.hypercall.flags: the guest was in long mode (KVM_EXIT_HYPERCALL_LONG_MODE).
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0


class TdvmcallStatus(IntEnum):
    """TDG.VP.VMCALL status codes in R10 (arch/x86/include/asm/shared/tdx.h, 6.18)."""

    SUCCESS = 0x0000000000000000
    RETRY = 0x0000000000000001
    INVALID_OPERAND = 0x8000000000000000
    ALIGN_ERROR = 0x8000000000000002
    SUBFUNC_UNSUPPORTED = 0x8000000000000003


#: SEV-SNP page state change (arch/x86/include/asm/sev-common.h, uapi/asm/svm.h, 6.18):
#: the operations, the MSR protocol's request and responses, the GHCB request's limits
#: and its SW_EXITINFO2 error codes.
SNP_PAGE_STATE_PRIVATE = 1
SNP_PAGE_STATE_SHARED = 2
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | GHCB_MSR_PSC_RESP
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2

#: The TDX extended exit qualification (RDX of a TD exit; arch/x86/kvm/vmx/tdx.h, 6.18):
#: its type field, and the type of an EPT violation on a private page the TD has not
#: accepted (a PENDING Secure-EPT entry; the TDX module reports it this way to the VMM).
TDX_EXT_EXIT_QUAL_TYPE_MASK = 0xF
TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION = 6


class TdxModuleStatus(IntEnum):
    """Completion status of TDG.MEM.PAGE.ACCEPT in RAX (Intel TDX Module ABI Reference,
    "TDG.MEM.PAGE.ACCEPT" completion status codes; no kernel header defines them)."""

    SUCCESS = 0x0000000000000000
    PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
    PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
    OPERAND_INVALID = 0xC000010000000000


#: PVALIDATE's return codes (AMD APM vol. 3, "PVALIDATE"): FAIL_INPUT 1 from the APM
#: (6.18 defines no name for it), FAIL_SIZEMISMATCH 6 and the software value
#: FAIL_NOUPDATE 255 that the kernel's pvalidate() returns when rFLAGS.CF says nothing
#: changed (arch/x86/include/asm/sev.h, 6.18).
PVALIDATE_SUCCESS = 0
PVALIDATE_FAIL_INPUT = 1
PVALIDATE_FAIL_SIZEMISMATCH = 6
PVALIDATE_FAIL_NOUPDATE = 255
#: #VC (vector 29) and its error code for an access to a page the guest has not
#: validated (AMD APM vol. 2, "RMP and VMPL Access Checks": PAGE_NOT_VALIDATED 0x404).
X86_TRAP_VC = 29
SVM_EXIT_PAGE_NOT_VALIDATED = 0x404
#: The ASID of the modelled SNP guest (sev_asid_new hands out the SNP range from 1).
SNP_GUEST_ASID = 1
#: KVM_SEV_SNP_LAUNCH_UPDATE page types (arch/x86/include/uapi/asm/kvm.h, 6.18).
KVM_SEV_SNP_PAGE_TYPE_NORMAL = 0x1
KVM_SEV_SNP_PAGE_TYPE_ZERO = 0x3
KVM_SEV_SNP_PAGE_TYPE_UNMEASURED = 0x4
KVM_SEV_SNP_PAGE_TYPE_SECRETS = 0x5
KVM_SEV_SNP_PAGE_TYPE_CPUID = 0x6
#: KVM_TDX_INIT_MEM_REGION's only flag (KVM_TDX_MEASURE_MEMORY_REGION, uapi asm/kvm.h).
KVM_TDX_MEASURE_MEMORY_REGION = 1 << 0


class FrameState(_Flag):
    """Not a KVM value: what the model keeps per guest_memfd frame, one uint64 each.

    PREPARED is the folio's uptodate flag (kvm_gmem_mark_prepared); the RMP_* bits and
    the GPA in bits 51:12 are the frame's SEV-SNP RMP entry (assigned, validated,
    immutable, 2M page size; the ASID is the VM's); TDX_PENDING is the TDX module's
    PENDING state of the Secure-EPT entry that maps the frame (after TDH.MEM.PAGE.AUG,
    until TDG.MEM.PAGE.ACCEPT)."""

    PREPARED = 1 << 0
    RMP_ASSIGNED = 1 << 1
    RMP_VALIDATED = 1 << 2
    RMP_IMMUTABLE = 1 << 3
    RMP_PAGESIZE_2M = 1 << 4
    TDX_PENDING = 1 << 5


#: FrameState's GPA field (bits 51:12).
FRAME_GPA_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)
#: Not a KVM value: the cores keep frame states in chunks of this many pages, made on
#: first write.
FRAME_CHUNK = 512

#: tdx_map_gpa's chunk (TDX_MAP_GPA_MAX_LEN, arch/x86/kvm/vmx/tdx.c): one exit per 2 MiB.
TDX_MAP_GPA_MAX_LEN = 2 << 20


class MapGpaFlag(_Flag):
    """KVM_HC_MAP_GPA_RANGE's attributes argument (asm/kvm_para.h, 6.18)."""

    PAGE_SZ_2M = 1 << 0          # KVM_MAP_GPA_RANGE_PAGE_SZ_2M (4K is 0)
    PAGE_SZ_1G = 1 << 1          # KVM_MAP_GPA_RANGE_PAGE_SZ_1G
    ENCRYPTED = 1 << 4           # KVM_MAP_GPA_RANGE_ENCRYPTED (decrypted is 0)


#: PML_LOG_NR_ENTRIES (arch/x86/kvm/vmx/vmx.h, 6.18): the entries of a vCPU's
#: page-modification log, and kvm->arch.cpu_dirty_log_size with PML.
PML_LOG_NR_ENTRIES = 512


# --- 6.1 memory attributes, memslot and guest_memfd flags (uapi kvm.h) -----------------

class MemAttr(_Flag):
    """KVM_MEMORY_ATTRIBUTE_*: the only one in mainline is PRIVATE."""

    PRIVATE = 1 << 3


class MemFlag(_Flag):
    """KVM_MEM_* memslot flags of KVM_SET_USER_MEMORY_REGION2."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2


class GuestMemfdFlag(_Flag):
    """GUEST_MEMFD_FLAG_* of KVM_CREATE_GUEST_MEMFD (Linux 6.18)."""

    MMAP = 1 << 0
    INIT_SHARED = 1 << 1


# --- 10. VM types (arch/x86/include/uapi/asm/kvm.h) ------------------------------------

class VMType(IntEnum):
    """KVM_X86_*_VM, the ``type`` argument of KVM_CREATE_VM."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4
    TDX = 5


# --- 0.3 / 7.1 page levels and sizes (pgtable_types.h, kvm_host.h) ---------------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
PG_LEVEL_512G = 4
PG_LEVEL_256T = 5
#: KVM_MAX_HUGEPAGE_LEVEL: huge leaves exist at 2M and 1G only; lpage_info exists for
#: the levels PG_LEVEL_2M .. KVM_MAX_HUGEPAGE_LEVEL.
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G

# --- memslot limits (include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h) --------

#: KVM_MEM_SLOTS_NUM = SHRT_MAX.
KVM_MEM_SLOTS_NUM = 32767
#: KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS (3) on x86.
KVM_USER_MEM_SLOTS = 32764
#: KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1 pages per user memslot.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
#: KVM_LPAGE_MIXED_FLAG: top bit of lpage_info.disallow_lpage (mixed attributes).
KVM_LPAGE_MIXED_FLAG = 1 << 31

#: Kernel-internal memslot flags (include/linux/kvm_host.h).
KVM_MEMSLOT_INVALID = 1 << 16
KVM_MEMSLOT_GMEM_ONLY = 1 << 17
KVM_INTERNAL_MEMSLOT_FLAGS = KVM_MEMSLOT_INVALID | KVM_MEMSLOT_GMEM_ONLY
#: INVALID_GPA (~0): mmu_invalidate_range_start/end before any range is added.
INVALID_GPA = (1 << 64) - 1

# --- the modelled host -----------------------------------------------------------------

#: USER_PTR_MAX of an x86-64 host with 4-level paging (TASK_SIZE_MAX = 2**47 - 4096):
#: access_ok() in KVM_SET_USER_MEMORY_REGION2 accepts userspace_addr + size up to it.
USER_PTR_MAX = (1 << 47) - PAGE_SIZE
#: The host's MAXPHYADDR (a 48-bit part such as AMD EPYC Milan): kvm_mmu_max_gfn() is
#: 2**(HOST_MAXPHYADDR - 12) - 1, host frames are below 2**48, and because it is below 52
#: NPT MMIO SPTEs can use reserved bit 51 (kvm_mmu_reset_all_pte_masks).
HOST_MAXPHYADDR = 48
#: guest_memfd pages live in their own host frames: file number k (creation order in its
#: VM) maps page index i to pfn GMEM_PFN_BASE + ((k * GMEM_FILE_PAGES + i) mod GMEM_PFN_BASE),
#: i.e. the upper half of the 48-bit host physical space (user memory is below 2**47), a
#: 1 TiB window per file.
GMEM_PFN_BASE = 1 << (HOST_MAXPHYADDR - 1 - PAGE_SHIFT)
GMEM_FILE_PAGES = 1 << 28
#: kvm_mmu_max_gfn() with TDP: the last gfn the host's MAXPHYADDR can address.  A memslot
#: may not end above it, and a fault beyond it cannot get an MMIO SPTE.
KVM_MMU_MAX_GFN = (1 << (HOST_MAXPHYADDR - PAGE_SHIFT)) - 1
#: USER_PTR_MAX of a host with 5-level paging (TASK_SIZE_MAX = 2**56 - 4096).
USER_PTR_MAX_LA57 = (1 << 56) - PAGE_SIZE
#: The modelled AMD part with memory encryption (CPUID 0x8000001F EBX = 0x4173, an
#: SNP-capable EPYC): the C-bit is bit 51, and SYSCFG MemEncryptionModEn reduces the
#: physical address width by 5 bits (early_detect_mem_encrypt, arch/x86/kernel/cpu/amd.c).
SME_C_BIT = 51
SME_PHYS_BITS_REDUCTION = 5

# --- TDX shared bit (arch/x86/kvm/vmx/tdx.c: TDX_SHARED_BIT_PWL_4 / _PWL_5) -------------

#: Guest physical-address width → the GPA bit that marks a shared access.
TDX_GPAW_SHARED_BIT = {48: 1 << 47, 52: 1 << 51}


# --- Hardware second-stage entry formats (SDM 29.3 / APM 15.25) -------------------------

class EPTE(_Flag):
    """EPT paging-structure entry bits (VMX_EPT_* in vmx.h; SDM tables 29-1..29-6)."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC = 1 << 2  #: XS, supervisor execute, when MBEC is on
    IPAT = 1 << 6
    LARGE = 1 << 7
    ACCESSED = 1 << 8
    DIRTY = 1 << 9
    USER_EXEC = 1 << 10  #: XU, with mode-based execute control
    SUPPRESS_VE = 1 << 63


#: EPT memory type field, bits 5:3 of a leaf entry.
EPT_MEMTYPE_SHIFT = 3
EPT_MEMTYPE_MASK = 0x7 << EPT_MEMTYPE_SHIFT


class MemType(IntEnum):
    """Memory types (uapi asm/mtrr.h); 2, 3 and 7 are reserved in an EPT leaf."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


class PTE(_Flag):
    """x86-64 long-mode paging entry bits, the NPT format (PT_*_MASK in mmu.h)."""

    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    LARGE = 1 << 7
    GLOBAL = 1 << 8
    NX = 1 << 63


# --- Second-stage paging-structure geometry (spte.h, mmu.h; SDM 29.3.2) -----------------

#: SPTE_LEVEL_BITS: each level indexes 9 GPA bits (level L: bits 12+9(L-1) .. 20+9(L-1)).
PT_LEVEL_BITS = 9
#: SPTE_ENT_PER_PAGE: 512 eight-byte entries per 4 KiB table.
PT_ENTRIES = 1 << PT_LEVEL_BITS
#: PT64_ROOT_MAX_LEVEL: the deepest walk is 5-level (PML5).
PT_ROOT_MAX_LEVEL = 5
#: Bytes per paging-structure entry (an SPTE's host-physical address is its table's plus
#: 8 * index).
PT_ENTRY_BYTES = 8
#: Where the model keeps its paging structures: table k of a PageTables lives at
#: host-physical address PT_BASE_HPA + k * PAGE_SIZE, the root is table 0.  32 GiB
#: lies below every real MAXPHYADDR (36 and up), so a table address is never
#: reserved; frames below it are free for the leaves' data pages.
PT_BASE_HPA = 1 << 35
#: The MAXPHYADDR range a PageTables accepts (CPUID 0x80000008 EAX[7:0] on real parts).
MAXPHYADDR_MIN = 36
MAXPHYADDR_MAX = 52

# Reserved bits by level other than 51:MAXPHYADDR (SDM 29.3.3.1; APM 5.3.x and KVM's
# __reset_rsvds_bits_mask / __reset_rsvds_bits_mask_ept, mmu.c).
#: EPT PML4E / PML5E: bits 7:3 (memory type, IPAT, page size) are reserved.
EPT_RSVD_ROOT = 0x1F << 3
#: EPT non-leaf PDPTE / PDE: bits 6:3 are reserved.
EPT_RSVD_NONLEAF = 0xF << 3
#: EPT 2 MiB leaf: bits 20:12 are reserved (the page is 2 MiB aligned).
EPT_RSVD_2M = 0x1FF << 12
#: EPT 1 GiB leaf: bits 29:12 are reserved.
EPT_RSVD_1G = 0x3FFFF << 12
#: Bitmap of the EPT leaf memory types that misconfigure: 2, 3 and 7 (bad_mt_xwr, mmu.c).
EPT_BAD_MEMTYPES = (1 << 2) | (1 << 3) | (1 << 7)
#: NPT (long mode, AMD) PML4E / PML5E: PS (bit 7) and bit 8 are reserved.
NPT_RSVD_ROOT = (1 << 7) | (1 << 8)
#: NPT 2 MiB leaf: bits 20:13 are reserved (bit 12 is PAT).
NPT_RSVD_2M = 0xFF << 13
#: NPT 1 GiB leaf: bits 29:13 are reserved (bit 12 is PAT).
NPT_RSVD_1G = 0x1FFFF << 13


class AccessFlags(_Flag):
    """What a guest access is, for ``PageTables.translate_many`` and ``VCPU.access_many``.

    No flag is a final-stage data read.  WALK is an access to a guest
    paging-structure entry, NOGVA an access without a guest-linear address (a
    PAE PDPTE load); ENCRYPTED is the guest's effective C-bit (NPT only).
    """

    WRITE = 1 << 0
    FETCH = 1 << 1
    USER = 1 << 2
    ENCRYPTED = 1 << 3
    WALK = 1 << 4
    NOGVA = 1 << 5


#: Not an AccessFlags member (callers cannot pass it): the access of a PVALIDATE or
#: TDG.MEM.PAGE.ACCEPT, which the RMP's Validated check and the TDX PENDING check do not
#: stop (those instructions exist to change exactly that state).
ACCESS_PROBE = 1 << 7


# --- KVM's SPTE format (arch/x86/kvm/mmu/spte.h, spte.c; Linux 6.18) --------------------

class SPTE(_Flag):
    """Software bits KVM keeps in its second-stage entries (spte.h).

    MMU_PRESENT marks an SPTE KVM considers present whatever the hardware bits say;
    the HOST/MMU_WRITABLE pair sits in ignored bits: 57/58 for EPT, 9/10 for NPT.
    """

    HOST_WRITABLE = 1 << 9          # DEFAULT_SPTE_HOST_WRITABLE (NPT)
    MMU_WRITABLE = 1 << 10          # DEFAULT_SPTE_MMU_WRITABLE (NPT)
    MMU_PRESENT = 1 << 11           # SPTE_MMU_PRESENT_MASK
    AD_DISABLED = 1 << 52           # SPTE_TDP_AD_DISABLED
    AD_WRPROT_ONLY = 1 << 53        # SPTE_TDP_AD_WRPROT_ONLY
    EPT_HOST_WRITABLE = 1 << 57     # EPT_SPTE_HOST_WRITABLE
    EPT_MMU_WRITABLE = 1 << 58      # EPT_SPTE_MMU_WRITABLE


#: SPTE_BASE_ADDR_MASK: the frame bits 51:12 of an SPTE (spte.h, a 52-bit physical space).
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)
#: SHADOW_NONPRESENT_VALUE: what an empty or zapped TDP MMU entry holds on x86-64
#: (EPT's suppress-#VE bit; for NPT bit 63 is NX, harmless in a not-present entry).
SHADOW_NONPRESENT_VALUE = 1 << 63
#: FROZEN_SPTE (spte.h, 6.18): a not-present value that locks out other writers of an
#: SPTE while a multi-part change is made (for a mirror SPTE: the external S-EPT update).
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0
#: EPT MMIO SPTEs: value W|X (a misconfiguration), matched under mask RWX|SVE.
EPT_MISCONFIG_WX_VALUE = EPTE.WRITE.value | EPTE.EXEC.value
EPT_MMIO_MASK = EPTE.READ.value | EPTE.WRITE.value | EPTE.EXEC.value | EPTE.SUPPRESS_VE.value
#: Access tracking without A/D bits (spte.h): mark_spte_for_access_track keeps the R and X
#: bits (SHADOW_ACC_TRACK_SAVED_BITS_MASK) at bits 54 and 56 and clears RWX
#: (shadow_acc_track_mask) and the accessed bit; SPTE_TDP_AD_MASK holds the A/D type.
ACC_TRACK_SAVED_BITS_MASK = EPTE.READ.value | EPTE.EXEC.value
ACC_TRACK_SAVED_BITS_SHIFT = 54
SPTE_TDP_AD_MASK = 3 << 52
#: NPT MMIO SPTEs on a host with MAXPHYADDR < 52: value = mask = BIT(51) | P, with the
#: access bits W|U kept (kvm_mmu_reset_all_pte_masks).
NPT_MMIO_VALUE = (1 << 51) | PTE.PRESENT.value
NPT_MMIO_ACCESS_MASK = PTE.WRITABLE.value | PTE.USER.value
#: The memslot generation in MMIO SPTEs: 19 bits, the low 8 in SPTE bits 10:3 and the
#: high 11 in bits 62:52.
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_BITS = 8
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_MASK = (1 << 19) - 1
#: KVM_PFN_NOSLOT (include/linux/kvm_host.h): the pfn of a fault with no memslot, as
#: kvm_handle_noslot_fault sets it; it shows in the kvm_mmu_spte_requested trace event.
KVM_PFN_NOSLOT = 1 << 63
#: ACC_*_MASK, the access KVM grants an SPTE (ACC_ALL for every TDP fault).
ACC_EXEC = 1
ACC_WRITE = 2
ACC_USER = 4
ACC_ALL = ACC_EXEC | ACC_WRITE | ACC_USER

#: How often a TDX private fault retries inside KVM before the handler gives RETRY back
#: (tdx_handle_ept_violation loops while RETRY, until an event or signal is pending).
TDX_LOCAL_RETRY_LIMIT = 16
#: How many exits ``VCPU.access`` takes before it declares the loop unsettled.
ACCESS_LOOP_LIMIT = 16
#: How many RET_PF_RETRY exits a vCPU without a stage hook takes before they count
#: towards ACCESS_LOOP_LIMIT: such retries come from other threads' invalidations
#: (KVM's vCPU simply faults again), and the vCPU yields to those threads meanwhile.
ACCESS_RETRY_LIMIT = 1 << 16


class PfStat(IntEnum):
    """The per-vCPU page-fault statistics (struct kvm_vcpu_stat, arch/x86/include/asm/
    kvm_host.h) that the model keeps, as indices into each vCPU's counters."""

    PF_TAKEN = 0
    PF_FIXED = 1
    PF_EMULATE = 2
    PF_SPURIOUS = 3
    PF_MMIO_SPTE_CREATED = 4
    PF_FAST = 5


#: The statistics' names as ``VCPU.stats`` and ``VM.stats`` report them.
PF_STAT_NAMES = tuple(stat.name.lower() for stat in PfStat)


class VmCounter(IntEnum):
    """Not a KVM value: where the fields of struct kvm that the fault path reads sit in
    the one ``numpy.uint64`` array that ``kvmemu._memory`` writes and both cores read
    (mmu_invalidate_seq, mmu_invalidate_in_progress, the invalidated gfn range, and
    the memslot generation of address spaces 0 and 1)."""

    MMU_INVALIDATE_SEQ = 0
    MMU_INVALIDATE_IN_PROGRESS = 1
    MMU_INVALIDATE_RANGE_START = 2
    MMU_INVALIDATE_RANGE_END = 3
    GENERATION_0 = 4
    GENERATION_1 = 5
    NR_MEMSLOTS_DIRTY_LOGGING = 6      # kvm->nr_memslots_dirty_logging
    PRE_FAULT_ALLOWED = 7              # kvm->arch.pre_fault_allowed
    LAUNCHED = 8                       # TD_STATE_RUNNABLE / SNP launch finished
    VM_DEAD = 9                        # kvm->vm_dead (kvm_vm_dead)
    GUEST_ACCEPTS = 10                 # the modelled guest accepts / validates on first touch
    COUNT = 11


class ZapReason(IntEnum):
    """Not a KVM value: why KVM removed or reduced a mapping, as ``VM.on_zap`` reports it
    (the callback gets the lower-case name: ``ZapReason(r).name.lower()``).

    ATTRIBUTES: KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_set_mem_attributes); MEMSLOT: a memslot
    deleted, moved or its guest_memfd gone (kvm_arch_flush_shadow_memslot); HOST: a host
    invalidation (the MMU notifier); GMEM: a guest_memfd punch-hole or close
    (kvm_gmem_invalidate_begin); DIRTY_LOG: write-protection or dirty-bit clearing for
    dirty logging, and huge pages recovered when it stops; ZAP_ALL: kvm_mmu_zap_all_fast
    (the MMIO generation wrapped, or the zap-all memslot quirk), and a restored snapshot."""

    ATTRIBUTES = 1
    MEMSLOT = 2
    HOST = 3
    GMEM = 4
    DIRTY_LOG = 5
    ZAP_ALL = 6


class CoreReturn(IntEnum):
    """Not a KVM value: how the compiled core's int-returning functions signal a Python
    exception.  Those functions return a RetPF (0..6) or a negative errno, so the signal
    is a value that is neither (their Cython ``except`` value)."""

    PY_EXCEPTION = 0x7FFF_FFFF


# EnumType gives every Flag class Flag's own operators unless the class body defines
# them, so _Flag's complement is installed on each flag class here.
for _cls in _Flag.__subclasses__():
    _cls.__invert__ = _Flag.__invert__  # type: ignore[method-assign]


def _c_prefix(class_name: str) -> str:
    """``AccessFlags`` -> ``ACCESS_FLAGS``, ``RetPF`` -> ``RET_PF``; all-caps names stay."""
    if class_name.isupper():
        return class_name
    words, word = [], ""
    for i, ch in enumerate(class_name):
        if ch.isupper() and word and not (word[-1].isupper()
                                          and (i + 1 == len(class_name)
                                               or class_name[i + 1].isupper())):
            words.append(word)
            word = ""
        word += ch
    return "_".join(words + [word]).upper()


def c_constants() -> dict[str, tuple[str, int]]:
    """Every integer constant of this module under its C name, with its C type.

    A flag class's members are ``<PREFIX>_<MEMBER>`` (uint64_t), an enum's members the
    same as ``int`` (uint64_t when a value does not fit), and module-level integers keep their name (uint64_t); ``<PREFIX>`` is
    the class name in upper snake case (``MemAttr`` -> ``MEM_ATTR``).
    """
    names: dict[str, tuple[str, int]] = {}
    for name, value in globals().items():
        if name.startswith("_"):
            continue
        if (isinstance(value, type) and issubclass(value, (IntEnum, IntFlag))
                and value.__module__ == __name__):
            ctype = ("uint64_t" if issubclass(value, IntFlag)
                     or any(int(m) >> 31 for m in value.__members__.values()) else "int")
            for member_name, member in value.__members__.items():
                entries = [(f"{_c_prefix(name)}_{member_name}", (ctype, int(member)))]
                names.update(_unique(names, entries))
        elif type(value) is int:
            names.update(_unique(names, [(name, ("uint64_t", value))]))
    return names


def _unique(names: dict[str, tuple[str, int]],
            entries: list[tuple[str, tuple[str, int]]]) -> list[tuple[str, tuple[str, int]]]:
    for key, _ in entries:
        if key in names:
            raise ValueError(f"two constants are both called {key} in C")
    return entries
