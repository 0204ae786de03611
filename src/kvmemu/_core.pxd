# C-level declarations of the compiled core.
#
# The constants come from _constants.h, which setup.py generates from
# kvmemu/constants.py: the values are written once, there.

from libc.stdint cimport uint32_t, uint64_t

cdef extern from "_constants.h":
    const uint64_t PFERR_PRESENT "KVMEMU_PFERR_PRESENT"
    const uint64_t PFERR_WRITE "KVMEMU_PFERR_WRITE"
    const uint64_t PFERR_USER "KVMEMU_PFERR_USER"
    const uint64_t PFERR_RSVD "KVMEMU_PFERR_RSVD"
    const uint64_t PFERR_FETCH "KVMEMU_PFERR_FETCH"
    const uint64_t PFERR_GUEST_FINAL "KVMEMU_PFERR_GUEST_FINAL"
    const uint64_t PFERR_GUEST_PAGE "KVMEMU_PFERR_GUEST_PAGE"
    const uint64_t PFERR_GUEST_ENC "KVMEMU_PFERR_GUEST_ENC"
    const uint64_t PFERR_PRIVATE_ACCESS "KVMEMU_PFERR_PRIVATE_ACCESS"
    const uint64_t PFERR_SYNTHETIC_MASK "KVMEMU_PFERR_SYNTHETIC_MASK"

    const uint64_t EPT_VIOLATION_ACC_READ "KVMEMU_EPT_VIOLATION_ACC_READ"
    const uint64_t EPT_VIOLATION_ACC_WRITE "KVMEMU_EPT_VIOLATION_ACC_WRITE"
    const uint64_t EPT_VIOLATION_ACC_INSTR "KVMEMU_EPT_VIOLATION_ACC_INSTR"
    const uint64_t EPT_VIOLATION_PROT_READ "KVMEMU_EPT_VIOLATION_PROT_READ"
    const uint64_t EPT_VIOLATION_PROT_WRITE "KVMEMU_EPT_VIOLATION_PROT_WRITE"
    const uint64_t EPT_VIOLATION_PROT_EXEC "KVMEMU_EPT_VIOLATION_PROT_EXEC"
    const uint64_t EPT_VIOLATION_GVA_IS_VALID "KVMEMU_EPT_VIOLATION_GVA_IS_VALID"
    const uint64_t EPT_VIOLATION_GVA_TRANSLATED "KVMEMU_EPT_VIOLATION_GVA_TRANSLATED"

    const uint64_t EPT_VIOLATION_PROT_USER_EXEC "KVMEMU_EPT_VIOLATION_PROT_USER_EXEC"

    const uint64_t EPTE_READ "KVMEMU_EPTE_READ"
    const uint64_t EPTE_WRITE "KVMEMU_EPTE_WRITE"
    const uint64_t EPTE_EXEC "KVMEMU_EPTE_EXEC"
    const uint64_t EPTE_LARGE "KVMEMU_EPTE_LARGE"
    const uint64_t EPTE_ACCESSED "KVMEMU_EPTE_ACCESSED"
    const uint64_t EPTE_DIRTY "KVMEMU_EPTE_DIRTY"
    const uint64_t EPTE_USER_EXEC "KVMEMU_EPTE_USER_EXEC"
    const uint64_t EPT_MEMTYPE_SHIFT "KVMEMU_EPT_MEMTYPE_SHIFT"
    const uint64_t EPT_MEMTYPE_MASK "KVMEMU_EPT_MEMTYPE_MASK"
    const uint64_t EPT_BAD_MEMTYPES "KVMEMU_EPT_BAD_MEMTYPES"
    const uint64_t EPT_RSVD_ROOT "KVMEMU_EPT_RSVD_ROOT"
    const uint64_t EPT_RSVD_NONLEAF "KVMEMU_EPT_RSVD_NONLEAF"
    const uint64_t EPT_RSVD_2M "KVMEMU_EPT_RSVD_2M"
    const uint64_t EPT_RSVD_1G "KVMEMU_EPT_RSVD_1G"

    const uint64_t PTE_PRESENT "KVMEMU_PTE_PRESENT"
    const uint64_t PTE_WRITABLE "KVMEMU_PTE_WRITABLE"
    const uint64_t PTE_USER "KVMEMU_PTE_USER"
    const uint64_t PTE_ACCESSED "KVMEMU_PTE_ACCESSED"
    const uint64_t PTE_DIRTY "KVMEMU_PTE_DIRTY"
    const uint64_t PTE_LARGE "KVMEMU_PTE_LARGE"
    const uint64_t PTE_NX "KVMEMU_PTE_NX"
    const uint64_t NPT_RSVD_ROOT "KVMEMU_NPT_RSVD_ROOT"
    const uint64_t NPT_RSVD_2M "KVMEMU_NPT_RSVD_2M"
    const uint64_t NPT_RSVD_1G "KVMEMU_NPT_RSVD_1G"

    const uint64_t PAGE_SHIFT "KVMEMU_PAGE_SHIFT"
    const uint64_t PAGE_SIZE "KVMEMU_PAGE_SIZE"
    const uint64_t PG_LEVEL_4K "KVMEMU_PG_LEVEL_4K"
    const uint64_t PG_LEVEL_2M "KVMEMU_PG_LEVEL_2M"
    const uint64_t PG_LEVEL_1G "KVMEMU_PG_LEVEL_1G"
    const uint64_t PT_LEVEL_BITS "KVMEMU_PT_LEVEL_BITS"
    const uint64_t PT_ENTRIES "KVMEMU_PT_ENTRIES"
    const uint64_t PT_BASE_HPA "KVMEMU_PT_BASE_HPA"
    const uint64_t PT_ROOT_MAX_LEVEL "KVMEMU_PT_ROOT_MAX_LEVEL"

    const uint64_t ACCESS_WRITE "KVMEMU_AccessFlags_WRITE"
    const uint64_t ACCESS_FETCH "KVMEMU_AccessFlags_FETCH"
    const uint64_t ACCESS_USER "KVMEMU_AccessFlags_USER"
    const uint64_t ACCESS_ENCRYPTED "KVMEMU_AccessFlags_ENCRYPTED"
    const uint64_t ACCESS_WALK "KVMEMU_AccessFlags_WALK"
    const uint64_t ACCESS_NOGVA "KVMEMU_AccessFlags_NOGVA"
    const uint64_t MEMATTR_PRIVATE "KVMEMU_MemAttr_PRIVATE"
    const uint64_t KVM_LPAGE_MIXED_FLAG "KVMEMU_KVM_LPAGE_MIXED_FLAG"
    const uint64_t INVALID_GPA "KVMEMU_INVALID_GPA"

    # The fault pipeline (_mmu.pxi, _vcpu.pxi).
    const uint64_t EPTE_IPAT "KVMEMU_EPTE_IPAT"
    const uint64_t EPTE_SUPPRESS_VE "KVMEMU_EPTE_SUPPRESS_VE"
    const uint64_t MEMTYPE_WB "KVMEMU_MemType_WB"
    const uint64_t SPTE_HOST_WRITABLE "KVMEMU_SPTE_HOST_WRITABLE"
    const uint64_t SPTE_MMU_WRITABLE "KVMEMU_SPTE_MMU_WRITABLE"
    const uint64_t SPTE_MMU_PRESENT "KVMEMU_SPTE_MMU_PRESENT"
    const uint64_t SPTE_EPT_HOST_WRITABLE "KVMEMU_SPTE_EPT_HOST_WRITABLE"
    const uint64_t SPTE_EPT_MMU_WRITABLE "KVMEMU_SPTE_EPT_MMU_WRITABLE"
    const uint64_t SHADOW_NONPRESENT_VALUE "KVMEMU_SHADOW_NONPRESENT_VALUE"
    const uint64_t KVM_PFN_NOSLOT "KVMEMU_KVM_PFN_NOSLOT"
    const uint64_t EPT_MISCONFIG_WX_VALUE "KVMEMU_EPT_MISCONFIG_WX_VALUE"
    const uint64_t EPT_MMIO_MASK "KVMEMU_EPT_MMIO_MASK"
    const uint64_t NPT_MMIO_VALUE "KVMEMU_NPT_MMIO_VALUE"
    const uint64_t NPT_MMIO_ACCESS_MASK "KVMEMU_NPT_MMIO_ACCESS_MASK"
    const uint64_t MMIO_SPTE_GEN_LOW_START "KVMEMU_MMIO_SPTE_GEN_LOW_START"
    const uint64_t MMIO_SPTE_GEN_LOW_BITS "KVMEMU_MMIO_SPTE_GEN_LOW_BITS"
    const uint64_t MMIO_SPTE_GEN_HIGH_START "KVMEMU_MMIO_SPTE_GEN_HIGH_START"
    const uint64_t MMIO_SPTE_GEN_MASK "KVMEMU_MMIO_SPTE_GEN_MASK"
    const uint64_t ACC_EXEC "KVMEMU_ACC_EXEC"
    const uint64_t ACC_WRITE "KVMEMU_ACC_WRITE"
    const uint64_t ACC_ALL "KVMEMU_ACC_ALL"
    const uint64_t KVM_MAX_HUGEPAGE_LEVEL "KVMEMU_KVM_MAX_HUGEPAGE_LEVEL"
    const uint64_t MEMFLAG_LOG_DIRTY_PAGES "KVMEMU_MemFlag_LOG_DIRTY_PAGES"
    const uint64_t MEMFLAG_READONLY "KVMEMU_MemFlag_READONLY"
    const uint64_t KVM_MEMSLOT_GMEM_ONLY "KVMEMU_KVM_MEMSLOT_GMEM_ONLY"
    const uint64_t HOST_MAXPHYADDR "KVMEMU_HOST_MAXPHYADDR"
    const uint64_t GMEM_PFN_BASE "KVMEMU_GMEM_PFN_BASE"
    const uint64_t GMEM_FILE_PAGES "KVMEMU_GMEM_FILE_PAGES"
    const uint64_t MEMORY_EXIT_FLAG_PRIVATE "KVMEMU_MEMORY_EXIT_FLAG_PRIVATE"
    const uint64_t TDX_LOCAL_RETRY_LIMIT "KVMEMU_TDX_LOCAL_RETRY_LIMIT"
    const uint64_t EXIT_REASON_UNKNOWN "KVMEMU_ExitReason_UNKNOWN"
    const uint64_t EXIT_REASON_MMIO "KVMEMU_ExitReason_MMIO"
    const uint64_t EXIT_REASON_MEMORY_FAULT "KVMEMU_ExitReason_MEMORY_FAULT"
    # RET_PF_* as C ints (handlers return them or a negative errno).
    const int RET_PF_CONTINUE "((int)KVMEMU_RetPF_CONTINUE)"
    const int RET_PF_RETRY "((int)KVMEMU_RetPF_RETRY)"
    const int RET_PF_EMULATE "((int)KVMEMU_RetPF_EMULATE)"
    const int RET_PF_INVALID "((int)KVMEMU_RetPF_INVALID)"
    const int RET_PF_FIXED "((int)KVMEMU_RetPF_FIXED)"
    const int RET_PF_SPURIOUS "((int)KVMEMU_RetPF_SPURIOUS)"


# --- vendor intake (_intake.pxi) ------------------------------------------------------

cdef uint64_t vmx_ec(uint64_t exit_qualification, uint64_t gpa, uint64_t shared_bit) noexcept nogil
cdef uint64_t svm_ec(uint64_t exit_info_1, bint snp) noexcept nogil


# --- memory state (_memory.pxi) ---------------------------------------------------------

# A memslot of address space 0 as the fault path reads it (struct kvm_memory_slot);
# lpage_2m / lpage_1g point into the owning Slot's lpage_info arrays.
ctypedef struct slot_c:
    uint64_t base_gfn
    uint64_t npages
    uint64_t userspace_addr
    uint64_t gmem_pgoff
    uint32_t id
    uint32_t flags
    int gmem_id
    int host_level
    uint32_t* lpage_2m
    uint32_t* lpage_1g
    void* owner             # the Slot object (borrowed; the VM's slot tables own it)

# --- second-stage page tables and the hardware walk (_paging.pxi) ---------------------

cdef enum WalkStop:
    STOP_NOT_PRESENT = 0
    STOP_RESERVED = 1       # EPT misconfiguration / NPT reserved bit
    STOP_LEAF = 2

cdef enum OutcomeKind:
    OUT_TRANSLATED = 0
    OUT_EPT_VIOLATION = 1
    OUT_EPT_MISCONFIG = 2
    OUT_NPF = 3

cdef struct PagingConfig:
    bint ept
    int levels
    bint ad_bits, exec_only, mbec, huge_1g, host_nx, host_smep
    uint64_t addr_mask      # entry bits maxphyaddr-1:12
    uint64_t rsvd_high      # entry bits 51:maxphyaddr
    uint64_t present_mask   # EPT: R|W|X (|XU with MBEC); NPT: P
    uint64_t large_bit      # bit 7 of a PDPTE / PDE

cdef struct WalkPath:
    int n                   # entries read, root first
    WalkStop stop
    int level[5]
    uint64_t entry[5]
    Py_ssize_t slot[5]      # table * 512 + index; -1 where the address held no table

cdef struct Outcome:
    OutcomeKind kind
    int level               # the leaf's level for OUT_TRANSLATED
    uint64_t value          # hpa, exit qualification or EXITINFO1

cdef class PageTables:
    cdef PagingConfig cfg
    cdef object storage                 # numpy uint64 (capacity, 512)
    cdef uint64_t[:, ::1] mem           # storage, as the walk reads it
    cdef Py_ssize_t ntables
    cdef Py_ssize_t max_tables
    cdef uint64_t nonleaf               # what set_entry links new tables with
    cdef readonly str kind
    cdef readonly int levels, maxphyaddr
    cdef readonly bint ad_bits, exec_only, mbec, huge_1g, host_nx, host_smep
    cdef Py_ssize_t* free_list          # KVM's freed tables, a LIFO stack
    cdef Py_ssize_t nfree, free_cap
    cdef Py_ssize_t new_table(self) except -1
    cdef uint64_t entry(self, Py_ssize_t table, Py_ssize_t index)
    cdef tuple descend(self, uint64_t gpa, int level)
    # KVM's use of the storage (the TDP MMU): unchecked, for the fault pipeline.
    cdef Py_ssize_t c_alloc(self, uint64_t fill) except -1
    cdef int c_free(self, Py_ssize_t table) except -1
    cdef void c_fill(self, Py_ssize_t table, uint64_t value) noexcept
    cdef PageTables clone(self)

cdef void hw_walk(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                  uint64_t gpa, WalkPath* path) noexcept nogil
cdef Outcome translate_one(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                           uint64_t gpa, uint64_t flags) noexcept nogil


# --- the TDP MMU (_mmu.pxi) -------------------------------------------------------------

# The per-vendor SPTE masks (kvm_mmu_set_ept_masks / kvm_mmu_reset_all_pte_masks).
cdef struct SpteFmt:
    bint ept
    uint64_t present, user, x, nx, accessed, dirty
    uint64_t host_writable, mmu_writable, memtype
    uint64_t mmio_value, mmio_mask, mmio_access_mask

# struct kvm_page_fault: the facts of one fault, derived once (mmu_internal.h).
cdef struct FaultRec:
    uint64_t addr, error_code, gfn, mmu_seq, pfn
    bint exec_, write, present, rsvd, user, prefetch, is_private
    bint nx_huge_page_workaround_enabled, map_writable, huge_page_disallowed
    int max_level, req_level, goal_level
    bint has_slot
    slot_c slot             # a copy of the memslot record (refreshed after a stage hook)

# The deepest SPTE on a gfn's path (kvm_tdp_mmu_get_walk).
cdef struct LastSpte:
    Py_ssize_t table, index
    int level
    uint64_t spte
