# Declarations of the TDP MMU (tdp_mmu.pyx).

from libc.stdint cimport int64_t, uint8_t, uint64_t

# The deepest SPTE on a gfn's path (kvm_tdp_mmu_get_walk).
cdef struct LastSpte:
    Py_ssize_t table, index
    int level
    uint64_t spte

# A mapping KVM removed or reduced (VM.on_zap): ``npages`` pages from ``gfn`` (with the
# root's gfn bits), mapped at ``level``, for a kvmemu.constants.ZapReason.
cdef struct ZapRecord:
    uint64_t gfn, npages
    int level, reason

cdef bint spte_reduced(const SpteFormat* fmt, int level, uint64_t old, uint64_t new) noexcept nogil

cdef class Root:
    cdef readonly PageTables pt
    cdef readonly uint64_t gfn_bits         # kvm_gfn_root_bits
    cdef Root clone(self)
    cdef Py_ssize_t child(self, uint64_t spte) noexcept nogil
    cdef uint64_t* child_entries(self, uint64_t spte) noexcept nogil
    cdef void set_nx_huge_page_disallowed(self, Py_ssize_t table, bint value) noexcept nogil
    cdef bint nx_huge_page_disallowed(self, Py_ssize_t table) noexcept nogil

cdef class TdpMmu:
    cdef SpteFormat fmt
    cdef readonly int levels
    cdef readonly bint nx_huge_pages
    cdef readonly Root direct
    cdef readonly Root mirror               # None unless TDX
    cdef readonly RwLock mmu_lock           # kvm->mmu_lock, shared by the roots' tables
    cdef public bint skip_stale_check       # a debug switch: is_page_fault_stale says no
    cdef readonly bint ad_enabled           # kvm_ad_enabled
    cdef CountShard* npages                 # kvm->stat.pages[level]: summed over shards
    cdef readonly Tracer tracer             # the VM's Tracer, or None
    cdef bint tracing                       # tracer is not None
    cdef public int zap_reason              # the ZapReason of the change being made (0: a fault)
    cdef bint zap_watch                     # VM.on_zap is set: record zaps
    cdef ZapRecord* zaps                    # the zaps recorded since the last take_zaps
    cdef Py_ssize_t nzaps, zaps_cap
    cdef int record_zap(self, uint64_t gfn, int level) except -1
    cdef int set_spte(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                      uint64_t new, uint64_t gfn) except -1 nogil
    # inline: the fault path (tdp_mmu_map, map_handle_target_level, set_spte_atomic,
    # handle_changed_spte, and mmu.pyx's fault_without_gil .. hugepage_adjust) is one
    # piece of code in access_many's loop; as calls, which GCC's heuristics took for
    # cold, they cost a first touch a fifth of its time (50 -> 41 ns, measured).
    cdef inline int set_spte_atomic(self, Root root, Py_ssize_t table, Py_ssize_t index,
                                    int level, uint64_t old, uint64_t new, uint64_t gfn,
                                    uint64_t* aug) except -1 nogil
    cdef inline int handle_changed_spte(self, Root root, uint64_t gfn, int level, uint64_t old,
                                        uint64_t new) except -1 nogil
    cdef int handle_removed_pt(self, Root root, Py_ssize_t table, int level,
                               uint64_t base) except -1 nogil
    cdef Root get_root_for_fault(self, uint64_t addr, uint64_t direct_bits_gpa)
    cdef inline int tdp_mmu_map(self, FaultRecord* f, Root root,
                                uint64_t generation) except CORE_RETURN_PY_EXCEPTION nogil
    cdef Py_ssize_t link_sp(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                            uint64_t old, uint64_t gfn, bint disallowed) except -1 nogil
    cdef Py_ssize_t split_huge_page(self, Root root, Py_ssize_t table, Py_ssize_t index,
                                    int level, uint64_t old, uint64_t gfn,
                                    bint disallowed) except -1 nogil
    cdef inline int map_handle_target_level(self, FaultRecord* f, Root root, Py_ssize_t table,
                                            Py_ssize_t index, int level, uint64_t old,
                                            uint64_t generation, uint64_t iter_gfn
                                            ) except CORE_RETURN_PY_EXCEPTION nogil
    cdef LastSpte tdp_mmu_get_walk(self, Root root, uint64_t gfn) noexcept nogil
    cdef int zap_leafs(self, Root root, uint64_t start, uint64_t end) except -1
    cdef int zap_table_leafs(self, Root root, Py_ssize_t table, int level, uint64_t base,
                             uint64_t start, uint64_t end) except -1
    cpdef int zap_all_fast(self) except -1
    cdef int clear_leaf_bits(self, uint64_t start, uint64_t end, int min_level,
                             uint64_t bits) except -1
    cdef int clear_table_leaf_bits(self, Root root, Py_ssize_t table, int level, uint64_t base,
                                   uint64_t start, uint64_t end, int min_level,
                                   uint64_t bits) except -1
    cdef int clear_gfn_bits(self, Root root, uint64_t gfn, int min_level, int max_level,
                            uint64_t bits) except -1
    cdef uint64_t dirty_bit(self, bint wrprot) noexcept
    cpdef int wrprot_slot(self, uint64_t start, uint64_t end, int min_level) except -1
    cpdef int clear_dirty_slot(self, uint64_t start, uint64_t end) except -1
    cpdef int clear_dirty_pt_masked(self, uint64_t gfn, uint64_t mask, bint wrprot) except -1
    cpdef int clear_dirty_pt_masked_words(self, uint64_t gfn, const uint64_t[::1] words,
                                          bint wrprot) except -1
    cpdef int write_protect_gfn(self, uint64_t gfn, int min_level) except -1
    cpdef int try_split_huge_pages(self, uint64_t start, uint64_t end,
                                   int target_level) except -1
    cdef int split_table(self, Root root, Py_ssize_t table, int level, uint64_t base,
                         uint64_t start, uint64_t end, int target_level) except -1
    cpdef int recover_huge_pages(self, slot, uint64_t start, uint64_t end) except -1
    cdef int recover_table(self, Root root, Py_ssize_t table, int level, uint64_t base,
                           uint64_t start, uint64_t end, const SlotRecord* slot) except -1
    cdef uint64_t first_present_leaf(self, Root root, Py_ssize_t table, int level) noexcept
    cpdef int set_ignore_guest_pat(self, bint ignore) except -1
    cpdef int unmap_gfn_range(self, uint64_t start, uint64_t end, bint private,
                              bint shared) except -1
