# Declarations of the second-stage page tables and the hardware walk (paging.pyx).

from libc.stdint cimport uint8_t, uint64_t

cdef enum WalkStop:
    STOP_NOT_PRESENT = 0
    STOP_RESERVED = 1       # EPT misconfiguration / NPT reserved bit
    STOP_LEAF = 2

cdef enum OutcomeKind:
    OUT_TRANSLATED = 0
    OUT_EPT_VIOLATION = 1
    OUT_EPT_MISCONFIG = 2
    OUT_NPF = 3
    OUT_PML_FULL = 4        # the VMX exit "page-modification log full" (reason 62)
    OUT_TDX_PENDING = 5     # an EPT violation on a PENDING private page (extended type 6)
    OUT_GUEST_VC = 6        # #VC in the guest: no VM exit

# ept4_walk's view of 4-level EPT tables for one access type (ept4_walk_init).
cdef struct Ept4Walk:
    const uint64_t* mem
    uint64_t mask           # addr_mask
    uint64_t need, leaf_need, top_bad, mid_bad, leaf_bad, present
    uint64_t violation      # the qualification of an EPT violation on a not-present entry

# A vCPU's page-modification log: the 512-entry buffer and the PML index, which counts
# down from 511 and wraps to 0xFFFF after entry 0.
cdef struct PmlLog:
    uint64_t gpa[512]
    int index

# What the walk needs to know about a PageTables (its fields of the same names).
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

cdef void* take_reservation() noexcept nogil
cdef void give_back_reservation(void* mem) noexcept nogil

cdef class PageTables:
    cdef PagingConfig cfg
    cdef uint64_t* mem                  # RESERVED_TABLES tables, mapped once: never moves
    cdef Py_ssize_t reserved            # tables the mapping holds
    cdef uint8_t* flags                 # a byte per table, after them: the owner's flags
                                        # (zero when handed out; none set past ntables)
    cdef readonly Py_ssize_t ntables
    cdef readonly bint kvm_owned        # the tables of a VM's TDP MMU: no writes from outside
    cdef public RwLock lock             # its own, or the VM's mmu_lock (TdpMmu shares it)
    cdef readonly Py_ssize_t max_tables
    cdef readonly uint64_t nonleaf      # what set_entry links new tables with
    cdef readonly uint64_t present_mask, addr_mask, large_bit, rsvd_high
    cdef readonly str kind
    cdef readonly int levels, maxphyaddr
    cdef readonly bint ept, ad_bits, exec_only, mbec, huge_1g, host_nx, host_smep
    cdef Py_ssize_t* free_list          # KVM's freed tables, a LIFO stack
    cdef Py_ssize_t nfree, free_cap
    cdef pthread_mutex_t alloc_lock     # the free list and ntables, as KVM allocates
    cdef int init_storage(self) except -1
    cpdef Py_ssize_t new_table(self) except -1
    cdef Py_ssize_t grow(self) except -1 nogil
    cdef PageTables clone(self)
    # KVM's use of the storage (the TDP MMU): unchecked.
    cdef Py_ssize_t alloc(self, uint64_t fill) except -1 nogil
    cdef int free(self, Py_ssize_t table) except -1 nogil
    cdef void fill(self, Py_ssize_t table, uint64_t value) noexcept nogil
    cdef uint64_t read(self, Py_ssize_t table, Py_ssize_t index) noexcept nogil
    cdef void write(self, Py_ssize_t table, Py_ssize_t index, uint64_t value) noexcept nogil
    # Checked access for the written-once set_entry / get_entry (kvmemu/_tables.py).
    cpdef uint64_t entry(self, Py_ssize_t table, Py_ssize_t index) except? 0
    cpdef int store(self, Py_ssize_t table, Py_ssize_t index, uint64_t value) except -1
    cpdef uint64_t hpa(self, Py_ssize_t table) noexcept
    cpdef Py_ssize_t table_at(self, uint64_t hpa) noexcept
    cpdef bint is_large(self, int level, uint64_t e) noexcept

cdef uint64_t ept_access_bits(const PagingConfig* c, uint64_t flags) noexcept nogil
cdef uint64_t ept_gva_bits(uint64_t q, uint64_t flags) noexcept nogil
cdef uint64_t npf_error_bits(const PagingConfig* c, uint64_t flags) noexcept nogil
cdef bint plain_access(object gpa, object write, object fetch, object user, object stage,
                       object encrypted, int levels, uint64_t* g, uint64_t* flags)
cdef uint64_t bits_from(unsigned int lo, unsigned int hi) noexcept nogil
cdef uint64_t table_hpa(Py_ssize_t table) noexcept nogil
cdef Py_ssize_t gpa_index(uint64_t gpa, int level) noexcept nogil
cdef uint64_t level_page_mask(int level) noexcept nogil
cdef Py_ssize_t table_at(uint64_t hpa, Py_ssize_t ntables) noexcept nogil
cdef bint is_large(const PagingConfig* c, int level, uint64_t e) noexcept nogil
cdef bint ept_misconfigured(const PagingConfig* c, int level, uint64_t e) noexcept nogil
cdef bint npt_reserved(const PagingConfig* c, int level, uint64_t e) noexcept nogil
cdef void hw_walk(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables, uint64_t gpa,
                  WalkPath* path) noexcept nogil
cdef Outcome translated(const WalkPath* path, const PagingConfig* c, uint64_t gpa,
                        uint64_t* mem, uint64_t accessed, uint64_t dirty,
                        bint write, PmlLog* pml) noexcept nogil
cdef Outcome ept_translate(const PagingConfig* c, uint64_t* mem, uint64_t gpa, uint64_t flags,
                           const WalkPath* path, PmlLog* pml) noexcept nogil
cdef Outcome npt_translate(const PagingConfig* c, uint64_t* mem, uint64_t gpa, uint64_t flags,
                           const WalkPath* path) noexcept nogil
cdef bint ept_fast_translate(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                             uint64_t gpa, uint64_t flags, Outcome* out,
                             const int levels, PmlLog* pml) noexcept nogil
cdef bint pml_log(PmlLog* pml, uint64_t gpa) noexcept nogil
cdef bint ept4_step(const uint64_t* mem, Py_ssize_t ntables, uint64_t mask, uint64_t gpa,
                    int level, uint64_t need, uint64_t bad, uint64_t* e) noexcept nogil
cdef bint ept4_walk_init(Ept4Walk* w, const PagingConfig* c, const uint64_t* mem,
                         uint64_t flags) noexcept nogil
cdef bint ept4_walk(const Ept4Walk* w, Py_ssize_t ntables, uint64_t gpa,
                    Outcome* out) noexcept nogil
cdef bint ept4_leaf(const Ept4Walk* w, Py_ssize_t ntables, uint64_t gpa,
                    uint64_t* e) noexcept nogil
cdef Py_ssize_t ept4_mapped_run(const Ept4Walk* w, Py_ssize_t ntables, const uint64_t* gpas,
                                Py_ssize_t i, Py_ssize_t stop, uint64_t* hpa,
                                uint8_t* level) noexcept nogil
cdef Outcome translate_one(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                           uint64_t gpa, uint64_t flags, PmlLog* pml) noexcept nogil
cdef Outcome translate_walked(const PagingConfig* c, uint64_t* mem, Py_ssize_t ntables,
                              uint64_t gpa, uint64_t flags, PmlLog* pml) noexcept nogil
cdef object outcome_object(const Outcome* out, uint64_t gpa)
