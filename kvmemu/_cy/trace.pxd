# Declarations of the trace part (trace.pyx).

from libc.stdint cimport uint64_t

# The kinds of record, indexes into kvmemu._trace.EVENT_NAMES.
cdef enum TraceKind:
    TRACE_PAGE_FAULT, TRACE_RMP_FAULT, TRACE_SPTE_REQUESTED, TRACE_SPTE_CHANGED, TRACE_SET_SPTE

# One kept event: its kind and its fields, as the tracepoint's TP_STRUCT holds them.
cdef struct TraceRecord:
    int kind
    uint64_t f[6]

cdef class Tracer:
    cdef readonly object sink
    cdef object write                       # kvmemu._trace.sink_writer(sink)
    cdef uint64_t x, nx, user               # the SPTE masks kvm_mmu_set_spte prints
    cdef TraceRecord* records
    cdef Py_ssize_t count, cap
    cdef int emit(self, int kind, uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e,
                  uint64_t f) except -1
    cdef str line(self, const TraceRecord* r)
    cdef int page_fault(self, uint64_t vcpu_id, uint64_t rip, uint64_t address,
                        uint64_t error_code) except -1
    cdef int rmp_fault(self, uint64_t vcpu_id, uint64_t gpa, uint64_t pfn, uint64_t error_code,
                       int rmp_level, int psmash_ret) except -1
    cdef int spte_requested(self, uint64_t gfn, uint64_t pfn, int level) except -1
    cdef int spte_changed(self, int as_id, uint64_t gfn, int level, uint64_t old,
                          uint64_t new) except -1
    cdef int set_spte(self, int level, uint64_t gfn, uint64_t spte, uint64_t sptep) except -1
