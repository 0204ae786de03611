# Second-stage page tables and the hardware walk (EPT on Intel, NPT on AMD).
#
# What the CPU does when a guest-physical access goes through the second
# stage: which entries it reads, where it stops, and whether the result is a
# translation, an EPT violation, an EPT misconfiguration or a nested page
# fault, with every bit of the exit and the A/D bits set on success (Intel SDM
# vol. 3C 29.3 and 28.2.1, AMD APM vol. 2 15.25; docs/reference.md).  The twin,
# kvmemu/_pure/paging.py, is the readable specification, function for function;
# this is the same rule set over raw table memory, without the GIL, so that
# batch loops can run it per element.
#
# Storage: 512-entry tables in one anonymous mapping reserved when the PageTables
# is made (RESERVED_TABLES tables of address space, then a flag byte per table,
# committed by the kernel page by page as they are used) and unmapped only when it
# is freed: table memory never moves, so a loop that reads it without the GIL
# never reads freed memory.
# Table k lives at host-physical address PT_BASE_HPA + k * PAGE_SIZE; table 0 is
# the root.  Invariant: the walk follows an entry's address only through
# table_at(), which maps an address that holds no table to -1 (and -1 reads as a
# zero entry), or after has_table() allowed it -- so a walk never reads outside
# tables 0 .. ntables-1 whatever the entries say.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM

cdef extern from "Python.h":
    # The tp_alloc of every class defined in Python (the result types are).
    PyObject* PyType_GenericAlloc(PyTypeObject* cls, Py_ssize_t nitems)
    void PyObject_GC_UnTrack(void* op)
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap

cdef extern from "sys/mman.h":
    int MAP_NORESERVE

import numpy as np

from kvmemu import _args, _tables
from kvmemu.results import EptMisconfig, EptViolation, NestedPageFault, Translation

cdef extern from *:
    """
    /* A result object's deallocator: what CPython's generic one for classes defined in
     * Python (subtype_dealloc) does for a tuple subclass with __slots__ = () and no
     * finalizer -- the tuple's own deallocator, then the reference the instance held to
     * its class -- without its search for what such a class cannot have.  Subclasses
     * keep the generic deallocator, which calls this one as their base's (and then
     * does not drop the class reference itself: the base class is a heap type).  The
     * trashcan bounds the C stack when results nest.
     *
     * Pairs of the class given to kvmemu_use_result_dealloc (Translation: one per
     * access) go to a free list instead, as tuple's own free lists keep tuples: off
     * the GC's list, their fields dropped, the class reference kept; result2 takes
     * them back.  Both run with the GIL held, which guards the list (a build without
     * the GIL keeps none). */
    #ifdef Py_GIL_DISABLED
    #define KVMEMU_RESULT_FREE_MAX 0
    #else
    #define KVMEMU_RESULT_FREE_MAX 64
    #endif
    static PyObject *kvmemu_result_free[KVMEMU_RESULT_FREE_MAX + 1];
    static int kvmemu_result_nfree = 0;
    static PyTypeObject *kvmemu_result_pair_type = NULL;

    static void kvmemu_result_dealloc(PyObject *self) {
        PyTypeObject *type = Py_TYPE(self);
        int kept = 0;
        PyObject_GC_UnTrack(self);          /* before the trashcan, which may defer it */
        Py_TRASHCAN_BEGIN(self, kvmemu_result_dealloc)
        if (type == kvmemu_result_pair_type && Py_SIZE(self) == 2
                && kvmemu_result_nfree < KVMEMU_RESULT_FREE_MAX) {
            /* The fields first: dropping them may free other results (and fill the
             * list). */
            Py_CLEAR(((PyTupleObject *)self)->ob_item[0]);
            Py_CLEAR(((PyTupleObject *)self)->ob_item[1]);
            if (kvmemu_result_nfree < KVMEMU_RESULT_FREE_MAX) {
                kvmemu_result_free[kvmemu_result_nfree++] = self;
                kept = 1;
            }
        }
        if (!kept) {
            PyTuple_Type.tp_dealloc(self);
            Py_DECREF(type);
        }
        Py_TRASHCAN_END
    }
    /* Installs it on ``cls`` if ``cls`` is such a class; returns 1 if it did.  The
     * first class it is installed on has its pairs kept on the free list. */
    static int kvmemu_use_result_dealloc(PyObject *cls) {
        PyTypeObject *t = (PyTypeObject *)cls;
        if (!PyType_Check(cls) || !(t->tp_flags & Py_TPFLAGS_HEAPTYPE)
                || !(t->tp_flags & Py_TPFLAGS_TUPLE_SUBCLASS) || t->tp_del != NULL
                || t->tp_finalize != NULL || t->tp_dictoffset != 0 || t->tp_weaklistoffset != 0
                || t->tp_basicsize != PyTuple_Type.tp_basicsize
                || t->tp_itemsize != PyTuple_Type.tp_itemsize)
            return 0;
        t->tp_dealloc = kvmemu_result_dealloc;
        if (kvmemu_result_pair_type == NULL) {
            Py_INCREF(cls);
            kvmemu_result_pair_type = t;
        }
        return 1;
    }
    /* A pair of ``cls`` from the free list, as a new reference with empty fields and
     * off the GC's list; NULL if the list is empty or keeps another class. */
    static PyObject *kvmemu_result_pair_reused(PyTypeObject *cls) {
        PyObject *obj;
        if (cls != kvmemu_result_pair_type || kvmemu_result_nfree == 0)
            return NULL;
        obj = kvmemu_result_free[--kvmemu_result_nfree];
        PyObject_Init(obj, cls);            /* a new reference (and one to the class, */
        Py_DECREF(cls);                     /* which the list kept) */
        return obj;
    }
    """
    int use_result_dealloc "kvmemu_use_result_dealloc" (object cls)
    PyObject* result_pair_reused "kvmemu_result_pair_reused" (PyTypeObject* cls)

# A Translation per access: its deallocation is a tenth of VCPU.access's time otherwise.
use_result_dealloc(Translation)

#: Tables of address space each PageTables reserves (16 GiB; memory is committed only
#: as tables are used).  MAXPHYADDR may allow more: new_table raises MemoryError here.
cdef Py_ssize_t RESERVED_TABLES = 1 << 22
#: A reservation's bytes: the tables, then a byte per table for its owner's flags
#: (PageTables.flags).
cdef size_t RESERVATION_BYTES = <size_t>RESERVED_TABLES * (PAGE_SIZE + 1)
#: Reservations of freed PageTables kept for the next ones (a snapshot's copy then
#: writes into memory the kernel has already mapped, instead of faulting it in page
#: by page); their tables are zeroed again as they are handed out, their flags when
#: they are given back.
DEF POOL_SIZE = 16
cdef void* reservation_pool[POOL_SIZE]
cdef int pooled = 0
cdef pthread_mutex_t pool_lock
pthread_mutex_init(&pool_lock, NULL)


cdef void* take_reservation() noexcept nogil:
    """A pooled reservation, or a new mapping (MAP_FAILED if none can be made)."""
    global pooled
    cdef void* mem = NULL
    pthread_mutex_lock(&pool_lock)
    if pooled:
        pooled -= 1
        mem = reservation_pool[pooled]
    pthread_mutex_unlock(&pool_lock)
    if mem != NULL:
        return mem
    return mmap(NULL, RESERVATION_BYTES, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)


cdef void give_back_reservation(void* mem) noexcept nogil:
    global pooled
    pthread_mutex_lock(&pool_lock)
    if pooled < POOL_SIZE:
        reservation_pool[pooled] = mem
        pooled += 1
        mem = NULL
    pthread_mutex_unlock(&pool_lock)
    if mem != NULL:
        munmap(mem, RESERVATION_BYTES)


cdef inline uint64_t bits_from(unsigned int lo, unsigned int hi) noexcept nogil:
    """Mask of bits hi:lo (hi < 63)."""
    return ((<uint64_t>1 << (hi + 1)) - 1) & ~((<uint64_t>1 << lo) - 1)


cdef inline uint64_t table_hpa(Py_ssize_t table) noexcept nogil:
    """The host-physical address of table ``table``."""
    return PT_BASE_HPA + (<uint64_t>table << PAGE_SHIFT)


cdef inline Py_ssize_t gpa_index(uint64_t gpa, int level) noexcept nogil:
    """SPTE_INDEX: the 9 GPA bits that index the level-``level`` table."""
    return (gpa >> (PAGE_SHIFT + PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)


cdef inline uint64_t level_page_mask(int level) noexcept nogil:
    """The GPA bits a level-``level`` leaf passes through (4K: 11:0, 2M: 20:0, 1G: 29:0)."""
    return (<uint64_t>1 << (PAGE_SHIFT + PT_LEVEL_BITS * (level - 1))) - 1


cdef inline Py_ssize_t table_at(uint64_t hpa, Py_ssize_t ntables) noexcept nogil:
    """Index of the table at page-aligned ``hpa``, or -1 if none is there."""
    if hpa < PT_BASE_HPA:
        return -1
    cdef uint64_t k = (hpa - PT_BASE_HPA) >> PAGE_SHIFT
    return <Py_ssize_t>k if k < <uint64_t>ntables else -1


cdef inline uintptr_t table_bias(const uint64_t* mem) noexcept nogil:
    """What an entry's address bits add to, to point into ``mem``: the table at
    page-aligned HPA ``h`` starts at byte ``table_bias(mem) + h`` (for the ``h`` that
    has_table allows).  A walk that steps down this way waits on one AND and one add
    per level after the entry's load, where table_at's index waits on four more."""
    return <uintptr_t>mem - <uintptr_t>PT_BASE_HPA


cdef inline bint has_table(uint64_t hpa, Py_ssize_t ntables) noexcept nogil:
    """table_at(hpa, ntables) >= 0 in one compare (below PT_BASE_HPA wraps above)."""
    return hpa - PT_BASE_HPA < (<uint64_t>ntables << PAGE_SHIFT)


cdef inline bint is_large(const PagingConfig* c, int level, uint64_t e) noexcept nogil:
    """Bit 7 at the PDPTE or PDE: the entry maps a page instead of a table."""
    return (level == PG_LEVEL_2M or level == PG_LEVEL_1G) and (e & c.large_bit) != 0


cdef inline bint ept_misconfigured(const PagingConfig* c, int level, uint64_t e) noexcept nogil:
    """A present EPT entry that causes an EPT misconfiguration (SDM 29.3.3.1)."""
    cdef uint64_t x_any = EPTE_EXEC | (EPTE_USER_EXEC if c.mbec else 0)
    if (e & EPTE_WRITE) and not (e & EPTE_READ):            # write-only, write+execute
        return True
    if not (e & (EPTE_READ | EPTE_WRITE)) and (e & x_any) and not c.exec_only:
        return True
    if e & c.rsvd_high:
        return True
    if level > <int>PG_LEVEL_1G:
        return (e & EPT_RSVD_ROOT) != 0
    if level == PG_LEVEL_1G and (e & EPTE_LARGE) and not c.huge_1g:
        return True
    if not (level == PG_LEVEL_4K or is_large(c, level, e)):
        return (e & EPT_RSVD_NONLEAF) != 0
    if (level == PG_LEVEL_1G and (e & EPT_RSVD_1G)) or (level == PG_LEVEL_2M and (e & EPT_RSVD_2M)):
        return True
    return (EPT_BAD_MEMTYPES >> ((e & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT)) & 1


cdef inline bint npt_reserved(const PagingConfig* c, int level, uint64_t e) noexcept nogil:
    """A present NPT entry with a reserved bit set (RSVD #NPF)."""
    if (e & c.rsvd_high) or (not c.host_nx and (e & PTE_NX)):
        return True
    if level > <int>PG_LEVEL_1G:
        return (e & NPT_RSVD_ROOT) != 0
    if level == PG_LEVEL_1G and (e & PTE_LARGE):
        return not c.huge_1g or (e & NPT_RSVD_1G) != 0
    return level == PG_LEVEL_2M and (e & PTE_LARGE) != 0 and (e & NPT_RSVD_2M) != 0


cdef void hw_walk(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                  uint64_t gpa, WalkPath* path) noexcept nogil:
    """The entries the CPU reads for ``gpa``, root first, and why it stopped."""
    cdef Py_ssize_t table = 0, index
    cdef int level
    cdef uint64_t e
    path.n = 0
    for level in range(c.levels, 0, -1):
        index = gpa_index(gpa, level)
        e = load_entry(&mem[table * PT_ENTRIES + index]) if table >= 0 else 0
        path.level[path.n] = level
        path.entry[path.n] = e
        path.slot[path.n] = table * PT_ENTRIES + index if table >= 0 else -1
        path.n += 1
        if not (e & c.present_mask):
            path.stop = STOP_NOT_PRESENT
            return
        if ept_misconfigured(c, level, e) if c.ept else npt_reserved(c, level, e):
            path.stop = STOP_RESERVED
            return
        if level == PG_LEVEL_4K or is_large(c, level, e):
            path.stop = STOP_LEAF
            return
        table = table_at(e & c.addr_mask, ntables)


cdef bint pml_log(PmlLog* pml, uint64_t gpa) noexcept nogil:
    """The CPU about to set an EPT dirty flag with PML on (Intel SDM vol. 3C,
    "Page-Modification Logging"): with the index in 0..511, log the GPA (bits 11:0
    cleared) and decrement the index; False when the log is full (a page-modification
    log-full VM exit instead of the access)."""
    if pml.index >= <int>PML_LOG_NR_ENTRIES:
        return False
    pml.gpa[pml.index] = gpa & ~(<uint64_t>PAGE_SIZE - 1)
    pml.index = (pml.index - 1) & 0xFFFF
    return True


cdef inline Outcome translated(const WalkPath* path, const PagingConfig* c, uint64_t gpa,
                               uint64_t* mem, uint64_t accessed, uint64_t dirty,
                               bint write, PmlLog* pml) noexcept nogil:
    """The leaf's address, after setting accessed in every entry used and dirty in the
    leaf for a write, with a locked OR as the CPU does (a fault may be changing the same
    entry); with a PML log, setting a dirty flag logs the GPA first (or exits when the
    log is full).  Every slot is >= 0: the walk reached a present leaf."""
    cdef int i, last = path.n - 1
    cdef int level = path.level[last]
    cdef uint64_t mask = level_page_mask(level)
    cdef Outcome out
    if write and pml != NULL and not (path.entry[last] & dirty) and not pml_log(pml, gpa):
        out.kind = OUT_PML_FULL
        out.level = 0
        out.value = 0
        return out
    for i in range(path.n):          # a store only where the bit is not yet set
        if not (path.entry[i] & accessed):
            atomic_or64(&mem[path.slot[i]], accessed)
    if write and not (path.entry[last] & dirty):
        atomic_or64(&mem[path.slot[last]], dirty)
    out.kind = OUT_TRANSLATED
    out.level = level
    out.value = (path.entry[last] & c.addr_mask & ~mask) | (gpa & mask)
    return out


cdef uint64_t ept_access_bits(const PagingConfig* c, uint64_t flags) noexcept nogil:
    """The access bits (2:0) of an EPT-violation exit qualification (Intel SDM vol. 3C,
    Table 29-7): a guest paging-structure access is a read, and a write too when EPT A/D
    bits are on (the CPU sets the entry's A/D bits)."""
    if flags & ACCESS_FLAGS_WALK:
        return EPT_VIOLATION_ACC_READ | (
            EPT_VIOLATION_ACC_WRITE if c.ad_bits or (flags & ACCESS_FLAGS_WRITE) else 0)
    if flags & ACCESS_FLAGS_FETCH:
        return EPT_VIOLATION_ACC_INSTR
    if flags & ACCESS_FLAGS_WRITE:
        return EPT_VIOLATION_ACC_WRITE
    return EPT_VIOLATION_ACC_READ


cdef uint64_t ept_gva_bits(uint64_t q, uint64_t flags) noexcept nogil:
    """``q`` with bits 7 and 8 of an EPT-violation exit qualification (SDM Table 29-7):
    a guest-linear address is valid unless NOGVA, and it was translated unless the access
    was to a guest paging-structure entry."""
    if not (flags & ACCESS_FLAGS_NOGVA):
        q |= EPT_VIOLATION_GVA_IS_VALID
        if not (flags & ACCESS_FLAGS_WALK):
            q |= EPT_VIOLATION_GVA_TRANSLATED
    return q


cdef uint64_t npf_error_bits(const PagingConfig* c, uint64_t flags) noexcept nogil:
    """The bits of a #NPF EXITINFO1 that come from the access, not from the entries (AMD
    APM vol. 2, "Nested versus Guest Page Faults"): USER (the nested walk is a user
    access), WRITE (guest page-table accesses count as writes), FETCH (with NX or SMEP on),
    GUEST_PAGE or GUEST_FINAL (unless no guest address), and GUEST_ENC for the C-bit."""
    cdef uint64_t code = PFERR_USER
    if flags & (ACCESS_FLAGS_WRITE | ACCESS_FLAGS_WALK):
        code |= PFERR_WRITE
    if flags & ACCESS_FLAGS_FETCH and (c.host_nx or c.host_smep):
        code |= PFERR_FETCH
    if flags & ACCESS_FLAGS_WALK:
        code |= PFERR_GUEST_PAGE
    elif not (flags & ACCESS_FLAGS_NOGVA):
        code |= PFERR_GUEST_FINAL
    if flags & ACCESS_FLAGS_ENCRYPTED:
        code |= PFERR_GUEST_ENC
    return code


cdef inline Outcome ept_translate(const PagingConfig* c, uint64_t* mem, uint64_t gpa,
                                  uint64_t flags, const WalkPath* path,
                                  PmlLog* pml) noexcept nogil:
    """EPT: misconfiguration first, then violation, then the translation."""
    cdef Outcome out
    cdef uint64_t acc, q
    cdef uint64_t rwx = EPTE_READ | EPTE_WRITE | EPTE_EXEC, xu = EPTE_USER_EXEC
    cdef bint allowed
    cdef int i
    out.level = 0
    if path.stop == STOP_RESERVED:
        out.kind = OUT_EPT_MISCONFIG
        out.value = 0
        return out
    acc = ept_access_bits(c, flags)
    for i in range(path.n):          # AND over every entry used, the last one included
        rwx &= path.entry[i]
        xu &= path.entry[i]
    allowed = ((not (acc & EPT_VIOLATION_ACC_READ) or (rwx & EPTE_READ))
               and (not (acc & EPT_VIOLATION_ACC_WRITE) or (rwx & EPTE_WRITE))
               and (not (acc & EPT_VIOLATION_ACC_INSTR)
                    or ((xu if c.mbec and (flags & ACCESS_FLAGS_USER) else rwx & EPTE_EXEC) != 0)))
    if path.stop == STOP_LEAF and allowed:
        if c.ad_bits:
            return translated(path, c, gpa, mem, EPTE_ACCESSED, EPTE_DIRTY,
                              (acc & EPT_VIOLATION_ACC_WRITE) != 0, pml)
        return translated(path, c, gpa, mem, 0, 0, False, NULL)
    q = ept_gva_bits(acc, flags) | rwx * (EPT_VIOLATION_PROT_READ // EPTE_READ)
    if c.mbec and xu:
        q |= EPT_VIOLATION_PROT_USER_EXEC
    out.kind = OUT_EPT_VIOLATION
    out.value = q
    return out


cdef inline Outcome npt_translate(const PagingConfig* c, uint64_t* mem, uint64_t gpa,
                           uint64_t flags, const WalkPath* path) noexcept nogil:
    """NPT: a not-present or reserved entry, or a permission fault."""
    cdef Outcome out
    cdef bint write = (flags & (ACCESS_FLAGS_WRITE | ACCESS_FLAGS_WALK)) != 0   # walks count as writes
    cdef bint fetch = (flags & ACCESS_FLAGS_FETCH) != 0
    cdef uint64_t code = npf_error_bits(c, flags)
    cdef uint64_t us = PTE_USER | PTE_WRITABLE, nx = 0
    cdef int i
    if path.stop == STOP_RESERVED:
        code |= PFERR_PRESENT | PFERR_RSVD
    elif path.stop == STOP_LEAF:
        for i in range(path.n):
            us &= path.entry[i]
            nx |= path.entry[i] & PTE_NX
        if ((us & PTE_USER) and (not write or (us & PTE_WRITABLE))
                and not (fetch and c.host_nx and nx)):
            return translated(path, c, gpa, mem, PTE_ACCESSED, PTE_DIRTY, write, NULL)
        code |= PFERR_PRESENT
    out.kind = OUT_NPF
    out.level = 0
    out.value = code
    return out


cdef inline bint ept_fast_translate(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                                   uint64_t gpa, uint64_t flags, Outcome* out,
                                   const int levels, PmlLog* pml) noexcept nogil:
    """The common EPT case in one pass (the twin tells the rules): a final-stage read or
    write whose every entry is readable (and writable for a write), well-formed and
    present, or that meets a not-present entry on the way (an EPT violation with only
    the access and linear-address bits).  Anything else returns False and goes through
    the general walk."""
    cdef uint64_t* used[5]
    cdef uint64_t e, need = EPTE_READ | (EPTE_WRITE if flags & ACCESS_FLAGS_WRITE else 0)
    cdef uint64_t page_mask, every = ~(<uint64_t>0)     # the bits set in every entry used
    cdef uint64_t* table = mem
    cdef uintptr_t bias = table_bias(mem)
    cdef int level = levels, n = 0, i
    if flags & ~(ACCESS_FLAGS_WRITE | ACCESS_FLAGS_USER | ACCESS_FLAGS_ENCRYPTED):
        return False
    while True:
        used[n] = &table[gpa_index(gpa, level)]
        e = load_entry(used[n])
        every &= e
        n += 1
        if (e & need) != need or (e & c.rsvd_high):
            if not (e & c.present_mask):     # off the translated path: no cost there
                out.kind = OUT_EPT_VIOLATION
                out.level = 0
                out.value = ept_gva_bits(ept_access_bits(c, flags), flags)
                return True
            return False
        if level > <int>PG_LEVEL_1G:
            if e & EPT_RSVD_ROOT:
                return False
        elif level == PG_LEVEL_4K or (e & EPTE_LARGE):
            break
        elif e & EPT_RSVD_NONLEAF:
            return False
        if not has_table(e & c.addr_mask, ntables):
            return False
        table = <uint64_t*>(bias + (e & c.addr_mask))
        level -= 1
    if level == PG_LEVEL_1G and (not c.huge_1g or (e & EPT_RSVD_1G)):
        return False
    if level == PG_LEVEL_2M and (e & EPT_RSVD_2M):
        return False
    if (EPT_BAD_MEMTYPES >> ((e & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT)) & 1:
        return False
    if c.ad_bits and (not (every & EPTE_ACCESSED)          # else the walk stores nothing
                      or ((flags & ACCESS_FLAGS_WRITE) and not (e & EPTE_DIRTY))):
        if pml != NULL and (flags & ACCESS_FLAGS_WRITE) and not (e & EPTE_DIRTY):
            return False                     # the general walk logs it
        for i in range(n):
            if not (load_entry(used[i]) & EPTE_ACCESSED):
                atomic_or64(used[i], EPTE_ACCESSED)
        if (flags & ACCESS_FLAGS_WRITE) and not (e & EPTE_DIRTY):
            atomic_or64(used[n - 1], EPTE_DIRTY)
    page_mask = level_page_mask(level)
    out.kind = OUT_TRANSLATED
    out.level = level
    out.value = (e & c.addr_mask & ~page_mask) | (gpa & page_mask)
    return True


cdef inline bint ept4_step(const uint64_t* mem, Py_ssize_t ntables, uint64_t mask, uint64_t gpa,
                           int level, uint64_t need, uint64_t bad, uint64_t* e) noexcept nogil:
    """ept4_leaf's step down: ``e`` becomes the level-``level`` entry of the table
    it points to; False if there is no such table, or the entry lacks a bit of ``need``
    or has one of ``bad``."""
    cdef uint64_t hpa = e[0] & mask
    if not has_table(hpa, ntables):
        return False
    e[0] = load_entry(<const uint64_t*>(table_bias(mem) + hpa) + gpa_index(gpa, level))
    return (e[0] & need) == need and not (e[0] & bad)


cdef inline bint ept4_walk_init(Ept4Walk* w, const PagingConfig* c, const uint64_t* mem,
                                uint64_t flags) noexcept nogil:
    """Set up ept4_walk for accesses of ``flags`` on 4-level EPT ``mem``; False if such an
    access is not one it takes (a fetch, a walk access: ept_fast_translate's and the
    general walk's)."""
    if not c.ept or c.levels != 4 or flags & ~(ACCESS_FLAGS_WRITE | ACCESS_FLAGS_USER
                                                | ACCESS_FLAGS_ENCRYPTED):
        return False
    w.mem, w.mask, w.present = mem, c.addr_mask, c.present_mask
    w.need = (EPTE_READ | (EPTE_WRITE if flags & ACCESS_FLAGS_WRITE else 0)
              | (EPTE_ACCESSED if c.ad_bits else 0))
    w.leaf_need = w.need | (EPTE_DIRTY if c.ad_bits and flags & ACCESS_FLAGS_WRITE else 0)
    w.top_bad = c.rsvd_high | EPT_RSVD_ROOT
    w.mid_bad = c.rsvd_high | EPT_RSVD_NONLEAF | EPTE_LARGE      # a huge leaf: elsewhere
    w.leaf_bad = c.rsvd_high
    w.violation = ept_gva_bits(ept_access_bits(c, flags), flags)
    return True


cdef inline bint ept4_leaf(const Ept4Walk* w, Py_ssize_t ntables, uint64_t gpa,
                           uint64_t* e) noexcept nogil:
    """The walk of ept4_walk and ept4_mapped_run: True if ``gpa`` goes through four
    present, well-formed entries to a 4K leaf of a valid memory type, every entry with
    its accessed flag and, for a write, the leaf with its dirty flag (SDM 29.3.5: the
    walk then stores nothing, and PML logs nothing), ``e`` the leaf; else False, ``e``
    the entry that failed, or the present one whose address holds no table."""
    e[0] = load_entry(&w.mem[gpa_index(gpa, 4)])
    return ((e[0] & w.need) == w.need and not (e[0] & w.top_bad)
            and ept4_step(w.mem, ntables, w.mask, gpa, 3, w.need, w.mid_bad, e)
            and ept4_step(w.mem, ntables, w.mask, gpa, 2, w.need, w.mid_bad, e)
            and ept4_step(w.mem, ntables, w.mask, gpa, 1, w.leaf_need, w.leaf_bad, e)
            and not (EPT_BAD_MEMTYPES >> ((e[0] & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT)) & 1)


cdef inline bint ept4_walk(const Ept4Walk* w, Py_ssize_t ntables, uint64_t gpa,
                           Outcome* out) noexcept nogil:
    """One access of access_many's GIL-free loop by ept4_leaf's rules, with what
    ept_fast_translate reports when entries that pass them lead to a not-present one:
    the EPT violation whose qualification holds only the access and linear-address
    bits.  Anything else returns False, for ept_fast_translate.  The walks of a first
    touch (the one that faults, the one after the fault) take this, with the masks
    ept4_walk_init set once for the batch."""
    cdef uint64_t e
    if not ept4_leaf(w, ntables, gpa, &e):
        if e & w.present:
            return False
        out.kind = OUT_EPT_VIOLATION
        out.level = 0
        out.value = w.violation
        return True
    out.kind = OUT_TRANSLATED
    out.level = PG_LEVEL_4K
    out.value = (e & w.mask & ~(<uint64_t>PAGE_SIZE - 1)) | (gpa & (PAGE_SIZE - 1))
    return True


cdef Py_ssize_t ept4_mapped_run(const Ept4Walk* w, Py_ssize_t ntables, const uint64_t* gpas,
                                Py_ssize_t i, Py_ssize_t stop, uint64_t* hpa,
                                uint8_t* level) noexcept nogil:
    """access_many's inner loop on 4-level EPT, for the accesses that change nothing
    (ept4_leaf's): translates gpas[i:stop] into hpa/level up to the first access that is
    not such a one and returns its index (``stop`` if none); ept4_walk,
    ept_fast_translate or translate_one takes that one, by the same rules.  No pointers
    kept, no stores but the results: short enough per element for the CPU to overlap
    the cache misses of successive walks."""
    cdef Ept4Walk lw = w[0]         # a local copy: the stores to hpa cannot change it
    cdef uint64_t g, e
    while i < stop:
        g = gpas[i]
        if not ept4_leaf(&lw, ntables, g, &e):
            break
        hpa[i] = (e & lw.mask & ~(<uint64_t>PAGE_SIZE - 1)) | (g & (PAGE_SIZE - 1))
        level[i] = PG_LEVEL_4K
        i += 1
    return i


cdef Outcome translate_one(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                           uint64_t gpa, uint64_t flags, PmlLog* pml) noexcept nogil:
    """One guest-physical access: walk, then the vendor's verdict (and A/D on success).
    ``pml``: the vCPU's log while PML is enabled in its VMCS (EPT only), else NULL."""
    cdef Outcome out
    # A constant level count lets the compiler unroll the fast walk.
    if c.ept and (ept_fast_translate(c, mem, ntables, gpa, flags, &out, 4, pml)
                  if c.levels == 4
                  else ept_fast_translate(c, mem, ntables, gpa, flags, &out, 5, pml)):
        return out
    return translate_walked(c, mem, ntables, gpa, flags, pml)


cdef Outcome translate_walked(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                              uint64_t gpa, uint64_t flags, PmlLog* pml) noexcept nogil:
    """translate_one after its one-pass EPT walk declined the access: the general walk
    and the vendor's verdict."""
    cdef WalkPath path
    hw_walk(c, mem, ntables, gpa, &path)
    if c.ept:
        return ept_translate(c, mem, gpa, flags, &path, pml)
    return npt_translate(c, mem, gpa, flags, &path)


cdef bint plain_access(object gpa, object write, object fetch, object user, object stage,
                       object encrypted, int levels, uint64_t* g, uint64_t* flags):
    """The keyword arguments of an access when they are plain (an int GPA within a
    ``levels``-level walk's reach, bools, stage "final"): the GPA and AccessFlags in
    ``g`` and ``flags``, True.  False for anything else, which kvmemu._args checks
    (and explains)."""
    if not (type(gpa) is int and type(write) is bool and type(fetch) is bool
            and type(user) is bool and type(encrypted) is bool and type(stage) is str
            and stage == "final"):
        return False
    try:
        g[0] = gpa
    except OverflowError:
        return False
    if g[0] >> (PAGE_SHIFT + PT_LEVEL_BITS * levels):
        return False
    flags[0] = ((ACCESS_FLAGS_WRITE if write is True else 0)
                | (ACCESS_FLAGS_FETCH if fetch is True else 0)
                | (ACCESS_FLAGS_USER if user is True else 0)
                | (ACCESS_FLAGS_ENCRYPTED if encrypted is True else 0))
    return True


cdef object result(type cls, tuple fields):
    """An instance of the result type ``cls`` (a tuple subclass of kvmemu.results,
    without instance dict) holding ``fields``: allocated by the type and filled here, as
    tuple's constructor does for a subclass, without the checks of ``cls.__new__`` or a
    method lookup by name."""
    cdef Py_ssize_t i, n = len(fields)
    cdef PyObject* made = PyType_GenericAlloc(<PyTypeObject*>cls, n)
    if made == NULL:
        raise MemoryError()
    cdef object obj = <object>made         # a second reference: drop the allocation's
    Py_DECREF(obj)
    for i in range(n):
        item = fields[i]
        Py_INCREF(item)                    # PyTuple_SET_ITEM steals it
        PyTuple_SET_ITEM(obj, i, item)
    return obj


cdef object result2(type cls, object a, object b):
    """``result(cls, (a, b))`` without the tuple of fields (a Translation per access),
    for ints only: it is taken off the cyclic GC's list at once, as the GC would take
    off a tuple of ints at its next pass (a tuple holding no container is in no cycle).
    A Translation comes from the free list when one is there (kvmemu_result_dealloc)."""
    cdef PyObject* made = result_pair_reused(<PyTypeObject*>cls)    # already untracked
    if made == NULL:
        made = PyType_GenericAlloc(<PyTypeObject*>cls, 2)
        if made == NULL:
            raise MemoryError()
        PyObject_GC_UnTrack(made)
    cdef object obj = <object>made
    Py_DECREF(obj)
    Py_INCREF(a)
    PyTuple_SET_ITEM(obj, 0, a)
    Py_INCREF(b)
    PyTuple_SET_ITEM(obj, 1, b)
    return obj


cdef object outcome_object(const Outcome* out, uint64_t gpa):
    """The result object of an outcome: Translation or the exit (built directly, without
    the result classes' checking __new__)."""
    if out.kind == OUT_TRANSLATED:
        return result2(Translation, out.value, out.level)
    if out.kind == OUT_EPT_VIOLATION:
        return result(EptViolation, (gpa, out.value))
    if out.kind == OUT_EPT_MISCONFIG:
        return result(EptMisconfig, (gpa,))
    return result(NestedPageFault, (gpa, out.value))




@cython.final
cdef class PageTables:
    """PageTables(kind, levels=4, *, ad_bits=True, exec_only=True, mbec=False, maxphyaddr=52, huge_1g=True, host_nx=True, host_smep=False)

    Second-stage paging structures and the CPU's walk of them; the compiled
    twin of kvmemu._pure.paging.PageTables, whose docstring states the rules
    and the decisions where the hardware documentation is silent.
    """

    def __cinit__(self):
        self.free_list = NULL
        self.nfree = self.free_cap = 0
        self.mem = NULL
        self.reserved = 0
        if pthread_mutex_init(&self.alloc_lock, NULL) != 0:
            raise MemoryError("cannot initialise a mutex")

    def __dealloc__(self):
        pthread_mutex_destroy(&self.alloc_lock)
        free(self.free_list)
        if self.mem != NULL:
            memset(self.flags, 0, <size_t>self.ntables)    # none are set past ntables
            give_back_reservation(self.mem)

    def __init__(self, kind, levels=4, *, ad_bits=True, exec_only=True, mbec=False,
                 maxphyaddr=52, huge_1g=True, host_nx=True, host_smep=False):
        (self.kind, self.levels, self.ad_bits, self.exec_only, self.mbec, self.maxphyaddr,
         self.huge_1g, self.host_nx, self.host_smep) = _args.paging_config(
            kind, levels, ad_bits, exec_only, mbec, maxphyaddr, huge_1g, host_nx, host_smep)
        self.ept = self.kind == "ept"
        self.addr_mask = bits_from(PAGE_SHIFT, self.maxphyaddr - 1)
        self.rsvd_high = bits_from(self.maxphyaddr, 51) if self.maxphyaddr < 52 else 0
        self.max_tables = ((<uint64_t>1 << self.maxphyaddr) - PT_BASE_HPA) // PAGE_SIZE
        if self.ept:
            self.present_mask = (EPTE_READ | EPTE_WRITE | EPTE_EXEC
                                 | (EPTE_USER_EXEC if self.mbec else 0))
            self.large_bit = EPTE_LARGE
            self.nonleaf = self.present_mask | (EPTE_ACCESSED if self.ad_bits else 0)
        else:
            self.present_mask = PTE_PRESENT
            self.large_bit = PTE_LARGE
            self.nonleaf = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED
        self.cfg.ept, self.cfg.levels, self.cfg.ad_bits = self.ept, self.levels, self.ad_bits
        self.cfg.exec_only, self.cfg.mbec, self.cfg.huge_1g = (self.exec_only, self.mbec,
                                                               self.huge_1g)
        self.cfg.host_nx, self.cfg.host_smep = self.host_nx, self.host_smep
        self.cfg.addr_mask, self.cfg.rsvd_high = self.addr_mask, self.rsvd_high
        self.cfg.present_mask, self.cfg.large_bit = self.present_mask, self.large_bit
        self.init_storage()
        self.ntables = 1
        self.lock = RwLock()

    cdef int init_storage(self) except -1:
        """Reserve the table memory (never moved; given back with the object), the root
        table zeroed."""
        cdef void* mem = take_reservation()
        if mem == MAP_FAILED:
            raise MemoryError(f"cannot reserve {(RESERVED_TABLES * PAGE_SIZE) >> 30} GiB of "
                              "address space for tables")
        self.mem, self.reserved = <uint64_t*>mem, RESERVED_TABLES
        self.flags = <uint8_t*>mem + <size_t>RESERVED_TABLES * PAGE_SIZE
        memset(self.mem, 0, PAGE_SIZE)
        return 0

    def __reduce__(self):
        raise TypeError("PageTables cannot be copied or pickled")

    def __repr__(self):
        return f"PageTables({self.kind!r}, levels={self.levels}, tables={self.ntables})"

    # --- storage ----------------------------------------------------------------------

    @property
    def root_hpa(self):
        """Host-physical address of the root table (the EPTP / nCR3 address)."""
        return PT_BASE_HPA

    @property
    def tables(self):
        """A read-only copy of the tables, (ntables, 512) uint64; row k is at
        root_hpa + k * 4096."""
        cdef uint64_t[:, ::1] view = <uint64_t[:self.ntables, :PT_ENTRIES]> self.mem
        copy = np.array(view, dtype=np.uint64)
        copy.flags.writeable = False
        return copy

    cpdef Py_ssize_t new_table(self) except -1:
        """One more table at the end of the storage (zeroed)."""
        cdef Py_ssize_t table = self.grow()
        memset(self.mem + table * PT_ENTRIES, 0, PAGE_SIZE)
        return table

    cdef Py_ssize_t grow(self) except -1 nogil:
        """One more table at the end of the storage, its memory as it was: new_table
        zeroes it, alloc fills it (once: KVM's page cache hands out tables already
        filled with the non-present value).  The caller holds alloc_lock or is the
        only thread that may allocate (new_table: the tables are not KVM's)."""
        if self.ntables == self.max_tables or self.ntables == self.reserved:
            with gil:
                if self.ntables == self.max_tables:
                    raise MemoryError(f"no host-physical room below MAXPHYADDR "
                                      f"{self.maxphyaddr} for another table")
                raise MemoryError(f"all {self.reserved} tables of the reservation are in use")
        store_count(&self.ntables, self.ntables + 1)   # walks read it without the lock
        return self.ntables - 1

    def export_tables(self):
        """A copy of the tables, (ntables, 512) uint64, and of the free list (int64, in
        stack order): what a snapshot's bytes hold of them."""
        free = np.empty(self.nfree, dtype=np.int64)
        cdef int64_t[::1] f = free
        cdef Py_ssize_t i
        for i in range(self.nfree):
            f[i] = self.free_list[i]
        return np.array(self.tables), free

    def load_tables(self, tables, free):
        """Make the tables ``tables`` with free list ``free`` (from export_tables; checked
        as the twin checks them).  The caller holds every vCPU and mmu_lock for write."""
        cdef Py_ssize_t n = _tables.check_table_export(
            tables, free, min(self.max_tables, self.reserved))
        cdef const uint64_t[:, ::1] src = np.ascontiguousarray(tables)
        cdef const int64_t[::1] fl = free
        cdef Py_ssize_t i
        if not with_room(<void**>&self.free_list, &self.free_cap, fl.shape[0],
                         sizeof(Py_ssize_t), 16):
            raise MemoryError()
        memcpy(self.mem, &src[0, 0], <size_t>n * PAGE_SIZE)
        if self.ntables > n:
            memset(self.mem + n * PT_ENTRIES, 0, <size_t>(self.ntables - n) * PAGE_SIZE)
            memset(self.flags + n, 0, <size_t>(self.ntables - n))
        self.ntables = n
        for i in range(fl.shape[0]):
            self.free_list[i] = fl[i]
        self.nfree = fl.shape[0]

    cdef PageTables clone(self):
        """A copy of the tables and their configuration (for VM snapshots): the storage
        is copied as one numpy array, the free list as one block."""
        cdef PageTables c = PageTables.__new__(PageTables)
        c.cfg = self.cfg
        c.init_storage()
        c.lock = RwLock()
        memcpy(c.mem, self.mem, <size_t>self.ntables * PAGE_SIZE)
        memcpy(c.flags, self.flags, <size_t>self.ntables)
        c.kvm_owned = self.kvm_owned
        c.ntables, c.max_tables, c.nonleaf = self.ntables, self.max_tables, self.nonleaf
        c.present_mask, c.addr_mask = self.present_mask, self.addr_mask
        c.large_bit, c.rsvd_high = self.large_bit, self.rsvd_high
        c.kind, c.levels, c.maxphyaddr, c.ept = self.kind, self.levels, self.maxphyaddr, self.ept
        c.ad_bits, c.exec_only, c.mbec = self.ad_bits, self.exec_only, self.mbec
        c.huge_1g, c.host_nx, c.host_smep = self.huge_1g, self.host_nx, self.host_smep
        if self.nfree:
            c.free_list = <Py_ssize_t*>malloc(self.free_cap * sizeof(Py_ssize_t))
            if c.free_list == NULL:
                raise MemoryError()
            memcpy(c.free_list, self.free_list, self.nfree * sizeof(Py_ssize_t))
            c.nfree, c.free_cap = self.nfree, self.free_cap
        return c

    # --- KVM's use of the storage: the TDP MMU allocates, links and frees tables -------
    # Unchecked: the MMU passes only tables it allocated.  entry() and store() are the
    # checked access that set_entry / get_entry use.

    cdef Py_ssize_t alloc(self, uint64_t fill) except -1 nogil:
        """A table for the TDP MMU, every entry ``fill``; freed tables are reused last
        freed first, so table addresses are a pure function of the call sequence (of
        one thread's calls: faults of several vCPUs allocate under mmu_lock for read,
        so the free list and the table count change under alloc_lock)."""
        cdef Py_ssize_t table = -1
        pthread_mutex_lock(&self.alloc_lock)
        try:
            if self.nfree:
                self.nfree -= 1
                table = self.free_list[self.nfree]
            else:
                table = self.grow()
        finally:
            pthread_mutex_unlock(&self.alloc_lock)
        self.fill(table, fill)
        return table

    cdef int free(self, Py_ssize_t table) except -1 nogil:
        cdef bint room
        pthread_mutex_lock(&self.alloc_lock)
        room = with_room(<void**>&self.free_list, &self.free_cap, self.nfree + 1,
                         sizeof(Py_ssize_t), 16)
        if room:
            self.free_list[self.nfree] = table
            self.nfree += 1
        pthread_mutex_unlock(&self.alloc_lock)
        if not room:
            with gil:
                raise MemoryError()
        return 0

    cdef void fill(self, Py_ssize_t table, uint64_t value) noexcept nogil:
        cdef Py_ssize_t i
        cdef uint64_t* row = self.mem + table * PT_ENTRIES
        debug_assert(0 <= table < self.ntables)
        for i in range(<Py_ssize_t>PT_ENTRIES):
            store_entry(&row[i], value)     # a walk on a stale link may read a reused table

    cdef uint64_t read(self, Py_ssize_t table, Py_ssize_t index) noexcept nogil:
        debug_assert(0 <= table < self.ntables and 0 <= index < <Py_ssize_t>PT_ENTRIES)
        return load_entry(&self.mem[table * PT_ENTRIES + index])

    cdef void write(self, Py_ssize_t table, Py_ssize_t index, uint64_t value) noexcept nogil:
        debug_assert(0 <= table < self.ntables and 0 <= index < <Py_ssize_t>PT_ENTRIES)
        store_entry(&self.mem[table * PT_ENTRIES + index], value)

    cpdef uint64_t entry(self, Py_ssize_t table, Py_ssize_t index) except? 0:
        """An entry, or 0 for table -1 (an address that holds no table); IndexError for
        a table or index that does not exist."""
        if table == -1:
            return 0
        if not (0 <= table < self.ntables and 0 <= index < <Py_ssize_t>PT_ENTRIES):
            raise IndexError(f"no entry {index} of table {table}")
        return self.read(table, index)

    cpdef int store(self, Py_ssize_t table, Py_ssize_t index, uint64_t value) except -1:
        """Write an entry; IndexError for a table or index that does not exist,
        ValueError for a VM's tables (only KVM writes them)."""
        if self.kvm_owned:
            raise ValueError("these are the tables of a VM's TDP MMU: only KVM writes them")
        if not (0 <= table < self.ntables and 0 <= index < <Py_ssize_t>PT_ENTRIES):
            raise IndexError(f"no entry {index} of table {table}")
        self.write(table, index, value)
        return 0

    cpdef uint64_t hpa(self, Py_ssize_t table) noexcept:
        return table_hpa(table)

    cpdef Py_ssize_t table_at(self, uint64_t hpa) noexcept:
        return table_at(hpa, self.ntables)

    cpdef bint is_large(self, int level, uint64_t e) noexcept:
        return is_large(&self.cfg, level, e)

    def _set_kvm_owned(self, bint owned):
        """For kvmemu.testing.writable only: tests of check_invariants write what KVM
        never would."""
        self.kvm_owned = owned

    # --- the public interface -----------------------------------------------------------

    def set_entry(self, gpa, level, value):
        """set_entry(gpa, level, value)

        Store ``value`` in the level-``level`` entry on the walk path of ``gpa``,
        creating and linking missing tables above it with non-leaf entries that
        grant everything.  ValueError, changing nothing, if a present entry above
        ``level`` is a leaf or points at an address that holds no table.
        """
        _tables.set_entry(self, gpa, level, value)

    def get_entry(self, gpa, level):
        """get_entry(gpa, level) -> int

        The level-``level`` entry on the walk path of ``gpa``; 0 where that table
        does not exist.
        """
        return _tables.get_entry(self, gpa, level)

    def walk(self, gpa):
        """walk(gpa) -> list[tuple[int, int]]

        (level, entry) from the root down to the entry at which the hardware walk
        stops: not present, a leaf, or reserved / misconfigured.
        """
        cdef WalkPath path
        cdef uint64_t g = _args.gpa(gpa, self.levels)
        self.lock.acquire_read()
        hw_walk(&self.cfg, self.mem, load_count(&self.ntables), g, &path)
        self.lock.release_read()
        return [(path.level[i], path.entry[i]) for i in range(path.n)]

    def translate(self, gpa, *, write=False, fetch=False, user=False, stage="final",
                  encrypted=False):
        """translate(gpa, *, write=False, fetch=False, user=False, stage="final", encrypted=False)

        What the CPU does for one guest-physical access: Translation(hpa, level),
        or EptViolation / EptMisconfig (EPT) / NestedPageFault (NPT).  A
        translation sets accessed bits in every entry used and dirty in the leaf
        for a write (EPT only with ad_bits); an exit changes nothing.
        """
        cdef uint64_t g = 0, flags = 0
        cdef Outcome out
        if not plain_access(gpa, write, fetch, user, stage, encrypted, self.levels, &g,
                            &flags):
            g = _args.gpa(gpa, self.levels)
            flags = _args.access(write, fetch, user, stage, encrypted)
        self.lock.acquire_read()
        out = translate_one(&self.cfg, self.mem, load_count(&self.ntables), g, flags, NULL)
        self.lock.release_read()
        return outcome_object(&out, g)

    def translate_many(self, gpas, flags=0):
        """translate_many(gpas, flags=0) -> (hpa, level)

        Translate each element of ``gpas`` (1-D uint64) in order, with ``flags`` an
        AccessFlags int or a 1-D uint8 array of them, without Python work per
        element.  Returns uint64 and uint8 arrays; an element whose access exits
        gives hpa 0 and level 0 (and changes nothing); translate() on it gives
        the exit.
        """
        g_arr = _args.gpa_array(gpas, self.levels)
        f = _args.access_flags_array(flags, len(g_arr))
        hpa_arr = np.zeros(len(g_arr), dtype=np.uint64)
        level_arr = np.zeros(len(g_arr), dtype=np.uint8)
        cdef const uint64_t[::1] g = g_arr
        cdef const uint8_t[::1] fv = f if isinstance(f, np.ndarray) else None
        cdef uint64_t f0 = 0 if isinstance(f, np.ndarray) else f
        cdef uint64_t[::1] hpa = hpa_arr
        cdef uint8_t[::1] level = level_arr
        cdef Py_ssize_t i, n = g.shape[0], ntables
        cdef uint64_t* mem = self.mem
        cdef PagingConfig cfg = self.cfg
        cdef Outcome out
        cdef bint per_element = fv is not None
        cdef RwLock lock = self.lock
        with nogil:
            lock.read_lock()
            ntables = load_count(&self.ntables)
            for i in range(n):
                out = translate_one(&cfg, mem, ntables, g[i], fv[i] if per_element else f0, NULL)
                if out.kind == OUT_TRANSLATED:
                    hpa[i] = out.value
                    level[i] = <uint8_t>out.level
            lock.read_unlock()
        return hpa_arr, level_arr
