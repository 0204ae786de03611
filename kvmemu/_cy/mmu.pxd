# Declarations of the MMU's fault path (mmu.pyx).

from libc.stdint cimport uint64_t

cdef class Root                 # tdp_mmu.pxd
cdef class VCPUState            # vcpu.pxd

# struct kvm_page_fault: the facts of one fault, derived once (mmu_internal.h).
# fault_without_gil: the exit goes to handle_exit (below every errno and RET_PF value).
cdef enum:
    FAULT_ELSEWHERE = -4096

cdef struct FaultRecord:
    uint64_t addr, error_code, gfn, mmu_seq, pfn
    bint exec_, write, present, rsvd, user, prefetch, is_private
    bint nx_huge_page_workaround_enabled, map_writable, huge_page_disallowed
    int max_level, req_level, goal_level
    bint has_slot
    bint aug                # a TD's private leaf goes in with TDH.MEM.PAGE.AUG (pending)
    uint64_t* frame         # the guest_memfd frame's state (Memslots.frame_state), or NULL
    SlotRecord slot         # a copy of the memslot record (refreshed after a stage hook)

cdef void init_fault(FaultRecord* f, uint64_t addr, uint64_t error_code, uint64_t gfn,
                     const SlotRecord* slot, bint nx, bint prefetch) noexcept nogil
cdef int page_fault(VCPUState vcpu, uint64_t gpa,
                    uint64_t error_code) except CORE_RETURN_PY_EXCEPTION
cdef uint64_t sw_protected_private(VCPUState vcpu, uint64_t gpa,
                                   uint64_t error_code) noexcept nogil
cdef int count_result(VCPUState vcpu, int r) noexcept nogil
cdef int fault_without_gil(VCPUState vcpu, SlotTable table, long seen, const Outcome* exit_,
                           uint64_t gpa,
                           const SlotRecord** last) except CORE_RETURN_PY_EXCEPTION nogil
cdef int handle_mmio_page_fault(VCPUState vcpu, uint64_t gpa) noexcept
cdef void vcpu_cache_mmio_info(VCPUState vcpu, uint64_t gfn) noexcept
cdef int do_page_fault(VCPUState vcpu, uint64_t gpa, uint64_t error_code, bint prefetch,
                       int* level) except CORE_RETURN_PY_EXCEPTION
cdef int pre_fault_memory(VCPUState vcpu, uint64_t gpa,
                          uint64_t size) except CORE_RETURN_PY_EXCEPTION
cdef int tdp_map_page(VCPUState vcpu, uint64_t gpa, uint64_t error_code,
                      int* level) except CORE_RETURN_PY_EXCEPTION
cdef int prepare_memory_fault_exit(VCPUState vcpu, const FaultRecord* f) noexcept nogil
cdef int tdp_mmu_page_fault(VCPUState vcpu, FaultRecord* f) except CORE_RETURN_PY_EXCEPTION
cdef int map_under_lock(VCPUState vcpu, FaultRecord* f,
                        Root root) except CORE_RETURN_PY_EXCEPTION nogil
cdef bint is_page_fault_stale(VCPUState vcpu, const FaultRecord* f) noexcept nogil
cdef int fast_page_fault(VCPUState vcpu, FaultRecord* f) noexcept
cdef bint can_be_fast(VCPUState vcpu, const FaultRecord* f) noexcept nogil
cdef bint fast_pf_fix_direct_spte(FaultRecord* f, Root root, Py_ssize_t table,
                                  Py_ssize_t index, uint64_t old, uint64_t new) noexcept
cdef int faultin_pfn(VCPUState vcpu, FaultRecord* f) except CORE_RETURN_PY_EXCEPTION
cdef int handle_noslot_fault(VCPUState vcpu, FaultRecord* f) noexcept
cdef int faultin_slot(VCPUState vcpu, FaultRecord* f) except CORE_RETURN_PY_EXCEPTION nogil
cdef int faultin_gmem(VCPUState vcpu, FaultRecord* f) except -1 nogil
cdef void faultin_host(Memslots memslots, FaultRecord* f) noexcept nogil
cdef void gmem_prepare(VCPUState vcpu, uint64_t* frame, uint64_t gfn) noexcept nogil
cdef int max_mapping_level(const SlotRecord* slot, uint64_t gfn, int max_level) noexcept nogil
cdef void hugepage_adjust(FaultRecord* f, bint nx_huge_pages) noexcept nogil
cdef void disallowed_hugepage_adjust(FaultRecord* f, Root root, uint64_t spte,
                                     int level) noexcept nogil
