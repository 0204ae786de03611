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
    cdef Py_ssize_t new_table(self) except -1
    cdef uint64_t entry(self, Py_ssize_t table, Py_ssize_t index)
    cdef tuple descend(self, uint64_t gpa, int level)

cdef void hw_walk(const PagingConfig* c, uint64_t[:, ::1] mem, Py_ssize_t ntables,
                  uint64_t gpa, WalkPath* path) noexcept nogil
cdef Outcome translate_one(const PagingConfig* c, uint64_t[:, ::1] mem, Py_ssize_t ntables,
                           uint64_t gpa, uint64_t flags) noexcept nogil
