# Declarations of the vendor intake and exit handlers (exits.pyx).

from libc.stdint cimport uint64_t

cdef uint64_t bit(uint64_t value, uint64_t mask) noexcept nogil
cdef uint64_t vmx_ec_access(uint64_t q) noexcept nogil
cdef uint64_t tdx_private_bit(uint64_t gpa, uint64_t shared_bit) noexcept nogil
cdef uint64_t vmx_ec(uint64_t q, uint64_t gpa, uint64_t shared_bit) noexcept nogil
cdef uint64_t svm_ec(uint64_t exit_info_1, bint snp) noexcept nogil
cdef void vmx_ec_loop(const uint64_t[::1] q, const uint64_t[::1] gpa,
                      const uint64_t[::1] shared_bit, uint64_t[::1] out, uint64_t q0,
                      uint64_t gpa0, uint64_t shared_bit0) noexcept nogil
cdef void svm_ec_loop(const uint64_t[::1] exit_info_1, bint snp, uint64_t[::1] out,
                      uint64_t exit_info_1_0) noexcept nogil
cdef int trace_kvm_page_fault(VCPUState vcpu, uint64_t gpa, uint64_t error_code) except -1
cdef int handle_ept_violation(VCPUState vcpu, uint64_t gpa,
                              uint64_t exit_qualification) except CORE_RETURN_PY_EXCEPTION
cdef int tdx_fault_qualification(VCPUState vcpu, uint64_t gpa, uint64_t ext_exit_qual,
                                 uint64_t* exit_qualification) noexcept nogil
cdef int tdx_handle_ept_violation(VCPUState vcpu, uint64_t gpa,
                                  uint64_t exit_qualification) except CORE_RETURN_PY_EXCEPTION
cdef void vmx_flush_pml_buffer(VCPUState vcpu) noexcept
cdef int handle_ept_misconfig(VCPUState vcpu, uint64_t gpa) except CORE_RETURN_PY_EXCEPTION
cdef int npf_interception(VCPUState vcpu, uint64_t gpa,
                          uint64_t exit_info_1) except CORE_RETURN_PY_EXCEPTION
