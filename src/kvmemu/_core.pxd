# C-level declarations of the compiled core.
#
# The constants come from _constants.h, which setup.py generates from
# kvmemu/constants.py: the values are written once, there.

from libc.stdint cimport uint64_t

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


# --- vendor intake (_intake.pxi) ------------------------------------------------------

cdef uint64_t vmx_ec(uint64_t exit_qualification, uint64_t gpa, uint64_t shared_bit) noexcept nogil
cdef uint64_t svm_ec(uint64_t exit_info_1, bint snp) noexcept nogil
