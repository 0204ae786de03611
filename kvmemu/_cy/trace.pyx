# The model's decisions as the kernel's tracepoints: the compiled twin of
# kvmemu/_pure/trace.py, which tells the rules and the formats.
#
# An event costs the fault path one fixed-size record (its kind and up to six
# numbers, as the tracepoint's TP_STRUCT holds them), appended under the GIL;
# the text is made only at flush, in C, without a Python object per field.

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free

from kvmemu import _trace

cdef extern from "Python.h":
    object PyUnicode_FromStringAndSize(const char* s, Py_ssize_t size)

cdef tuple EVENT_NAMES = _trace.EVENT_NAMES
cdef const char* HEX = b"0123456789abcdef"

# A line being formatted; every event fits (the longest, kvm_rmp_fault, is under 140).
cdef struct Text:
    char buf[256]
    Py_ssize_t n


cdef inline void put(Text* t, const char* s) noexcept nogil:
    while s[0]:
        t.buf[t.n] = s[0]
        t.n += 1
        s += 1


cdef inline void put_hex(Text* t, uint64_t v, int width) noexcept nogil:
    """``v`` in lower-case hex, zero-padded to ``width`` digits (printf's %0*llx)."""
    cdef char digits[16]
    cdef int k = 0
    while True:
        digits[k] = HEX[v & 15]
        k += 1
        v >>= 4
        if not v:
            break
    while width > k:
        t.buf[t.n] = b'0'
        t.n += 1
        width -= 1
    while k:
        k -= 1
        t.buf[t.n] = digits[k]
        t.n += 1


cdef inline void put_dec(Text* t, int64_t v) noexcept nogil:
    """``v`` in decimal (printf's %lld)."""
    cdef char digits[20]
    cdef int k = 0
    cdef uint64_t u = <uint64_t>v
    if v < 0:
        t.buf[t.n] = b'-'
        t.n += 1
        u = <uint64_t>0 - u
    while True:
        digits[k] = <char>(48 + u % 10)
        k += 1
        u //= 10
        if not u:
            break
    while k:
        k -= 1
        t.buf[t.n] = digits[k]
        t.n += 1


@cython.final
cdef class Tracer:
    """Records and emits the TDP fault path's trace events for one VM (the twin tells
    the rules; ``ept`` picks the SPTE masks kvm_mmu_set_spte prints)."""

    def __init__(self, sink, bint ept):
        self.sink = sink
        self.write = _trace.sink_writer(sink)
        if ept:
            self.x, self.nx, self.user = EPTE_EXEC, 0, EPTE_READ
        else:
            self.x, self.nx, self.user = 0, PTE_NX, PTE_USER

    def __dealloc__(self):
        free(self.records)

    @property
    def pending(self):
        """How many events are kept for the next flush."""
        return self.count

    cdef int emit(self, int kind, uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e,
                  uint64_t f) except -1:
        """Keep an event, as its kind and fields, for the next flush."""
        if not with_room(<void**>&self.records, &self.cap, self.count + 1, sizeof(TraceRecord),
                         64):
            raise MemoryError("no memory for trace events")
        cdef TraceRecord* r = &self.records[self.count]
        r.kind = kind
        r.f[0], r.f[1], r.f[2], r.f[3], r.f[4], r.f[5] = a, b, c, d, e, f
        self.count += 1
        return 0

    cdef str line(self, const TraceRecord* r):
        """The text of a kept record: its tracepoint's TP_printk."""
        cdef Text t
        cdef const uint64_t* f = r.f
        t.n = 0
        if r.kind == TRACE_PAGE_FAULT:
            put(&t, "vcpu "); put_dec(&t, <int64_t>f[0])
            put(&t, " rip 0x"); put_hex(&t, f[1], 1)
            put(&t, " address 0x"); put_hex(&t, f[2], 16)
            put(&t, " error_code 0x"); put_hex(&t, f[3], 1)
        elif r.kind == TRACE_RMP_FAULT:
            put(&t, "vcpu "); put_dec(&t, <int64_t>f[0])
            put(&t, " gpa "); put_hex(&t, f[1], 16)
            put(&t, " pfn 0x"); put_hex(&t, f[2], 1)
            put(&t, " error_code 0x"); put_hex(&t, f[3], 1)
            put(&t, " rmp_level "); put_dec(&t, <int64_t>f[4])
            put(&t, " psmash_ret "); put_dec(&t, <int64_t>f[5])
        elif r.kind == TRACE_SPTE_REQUESTED:
            put(&t, "gfn "); put_hex(&t, f[0], 1)
            put(&t, " pfn "); put_hex(&t, f[1], 1)
            put(&t, " level "); put_dec(&t, <int64_t>f[2])
        elif r.kind == TRACE_SPTE_CHANGED:
            put(&t, "as id "); put_dec(&t, <int64_t>f[0])
            put(&t, " gfn "); put_hex(&t, f[1], 1)
            put(&t, " level "); put_dec(&t, <int64_t>f[2])
            put(&t, " old_spte "); put_hex(&t, f[3], 1)
            put(&t, " new_spte "); put_hex(&t, f[4], 1)
        else:
            put(&t, "gfn "); put_hex(&t, f[1], 1)
            put(&t, " spte "); put_hex(&t, f[2], 1)
            put(&t, " (r")
            put(&t, "w" if f[2] & PTE_WRITABLE else "-")
            put(&t, "x" if (f[2] & (self.x | self.nx)) == self.x else "-")
            put(&t, "u" if f[2] & self.user else "-")
            put(&t, ") level "); put_dec(&t, <int64_t>f[0])
            put(&t, " at "); put_hex(&t, f[3], 1)
        return PyUnicode_FromStringAndSize(t.buf, t.n)

    def flush(self, bint raise_errors=True):
        """Format the kept events and hand them to the sink, in order (see the twin)."""
        cdef TraceRecord* batch
        cdef Py_ssize_t n, i
        error = None
        write = self.write
        while self.count:
            batch, n = self.records, self.count
            self.records, self.count, self.cap = NULL, 0, 0
            try:
                for i in range(n):
                    try:
                        write(EVENT_NAMES[batch[i].kind], self.line(&batch[i]))
                    except Exception as exc:
                        error = error or exc
            finally:
                free(batch)
        if error is not None and raise_errors:
            raise error

    cdef int page_fault(self, uint64_t vcpu_id, uint64_t rip, uint64_t address,
                        uint64_t error_code) except -1:
        """kvm:kvm_page_fault (trace.h)."""
        return self.emit(TRACE_PAGE_FAULT, vcpu_id, rip, address, error_code, 0, 0)

    cdef int rmp_fault(self, uint64_t vcpu_id, uint64_t gpa, uint64_t pfn, uint64_t error_code,
                       int rmp_level, int psmash_ret) except -1:
        """kvm:kvm_rmp_fault (trace.h): sev_handle_rmp_fault's verdict."""
        return self.emit(TRACE_RMP_FAULT, vcpu_id, gpa, pfn, error_code, <uint64_t>rmp_level,
                         <uint64_t><int64_t>psmash_ret)

    cdef int spte_requested(self, uint64_t gfn, uint64_t pfn, int level) except -1:
        """kvmmmu:kvm_mmu_spte_requested (pfn with the gfn's offset in the huge page)."""
        return self.emit(TRACE_SPTE_REQUESTED, gfn, pfn, <uint64_t>level, 0, 0, 0)

    cdef int spte_changed(self, int as_id, uint64_t gfn, int level, uint64_t old,
                          uint64_t new) except -1:
        """kvmmmu:kvm_tdp_mmu_spte_changed (handle_changed_spte)."""
        return self.emit(TRACE_SPTE_CHANGED, <uint64_t>as_id, gfn, <uint64_t>level, old, new, 0)

    cdef int set_spte(self, int level, uint64_t gfn, uint64_t spte, uint64_t sptep) except -1:
        """kvmmmu:kvm_mmu_set_spte: ``sptep`` is the SPTE's host-physical address."""
        return self.emit(TRACE_SET_SPTE, <uint64_t>level, gfn, spte, sptep, 0, 0)
