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

    const uint64_t PAGE_SHIFT "KVMEMU_PAGE_SHIFT"
    const uint64_t PG_LEVEL_2M "KVMEMU_PG_LEVEL_2M"
    const uint64_t PG_LEVEL_1G "KVMEMU_PG_LEVEL_1G"
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
