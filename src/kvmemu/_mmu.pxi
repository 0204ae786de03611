# The TDP MMU: SPTE formats, mapping a fault, zapping ranges.
#
# The compiled twin of kvmemu/_pure/mmu.py, which names the Linux 6.18 functions
# each part follows (spte.c / spte.h, kvm_mmu_hugepage_adjust, kvm_tdp_mmu_map,
# tdp_mmu_map_handle_target_level, tdp_mmu_zap_leafs, the fast-path lookup).
#
# KVM's tables live in the VM's PageTables (TDX's mirror of the Secure EPT in a
# second one), so the hardware walk reads exactly the SPTEs KVM wrote.  Every
# SPTE read and write goes through the PageTables memoryview; the SPTE makers
# and predicates are C over a struct of masks.  Table allocation order matches
# the twin's (a LIFO free list), so table addresses in non-leaf SPTEs match too.
# Tracing (the twin's docstring says which events) costs one C flag test per
# SPTE change and per map when it is off.

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

cdef uint64_t SPTE_BASE_ADDR_MASK = bits_from(PAGE_SHIFT, 51)
cdef uint64_t GEN_LOW_MASK = ((<uint64_t>1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
cdef uint64_t GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
cdef uint64_t GEN_HIGH_MASK = (MMIO_SPTE_GEN_MASK >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_START


cdef SpteFmt spte_format(bint ept, bint tdx) noexcept:
    """The per-vendor SPTE masks (see kvmemu._pure.mmu.SpteFormat)."""
    cdef SpteFmt f
    f.ept = ept
    if ept:
        f.present = EPTE_SUPPRESS_VE
        f.user = EPTE_READ
        f.x, f.nx = EPTE_EXEC, 0
        f.accessed, f.dirty = EPTE_ACCESSED, EPTE_DIRTY
        f.host_writable = SPTE_EPT_HOST_WRITABLE
        f.mmu_writable = SPTE_EPT_MMU_WRITABLE
        f.memtype = MEMTYPE_WB << EPT_MEMTYPE_SHIFT
        if not tdx:
            f.memtype |= EPTE_IPAT
        f.mmio_value = 0 if tdx else EPT_MISCONFIG_WX_VALUE
        f.mmio_mask, f.mmio_access_mask = EPT_MMIO_MASK, 0
    else:
        f.present = PTE_PRESENT
        f.user = PTE_USER
        f.x, f.nx = 0, PTE_NX
        f.accessed, f.dirty = PTE_ACCESSED, PTE_DIRTY
        f.host_writable = SPTE_HOST_WRITABLE
        f.mmu_writable = SPTE_MMU_WRITABLE
        f.memtype = 0
        f.mmio_value = f.mmio_mask = NPT_MMIO_VALUE
        f.mmio_access_mask = NPT_MMIO_ACCESS_MASK
    return f


cdef inline uint64_t make_spte(const SpteFmt* f, int level, uint64_t pfn, bint host_writable,
                               bint nx_huge_pages) noexcept nogil:
    """make_spte for a TDP fault: ACC_ALL, not a prefetch, never write-protected."""
    cdef uint64_t spte = SPTE_MMU_PRESENT | f.present | f.accessed
    cdef uint64_t access = ACC_ALL
    if level > <int>PG_LEVEL_4K and nx_huge_pages:    # huge leaves are never executable
        access &= ~ACC_EXEC
    spte |= f.x if access & ACC_EXEC else f.nx
    spte |= f.user                                   # ACC_USER
    if level > <int>PG_LEVEL_4K:
        spte |= PTE_LARGE
    spte |= f.memtype
    if host_writable:
        spte |= f.host_writable
    else:
        access &= ~ACC_WRITE
    spte |= pfn << PAGE_SHIFT
    if access & ACC_WRITE:                           # D is set together with W
        spte |= PTE_WRITABLE | f.mmu_writable | f.dirty
    return spte


cdef inline uint64_t make_nonleaf_spte(const SpteFmt* f, uint64_t child_hpa) noexcept nogil:
    """make_nonleaf_spte: full access; A set (A/D enabled)."""
    return SPTE_MMU_PRESENT | child_hpa | f.present | PTE_WRITABLE | f.user | f.x | f.accessed


cdef inline uint64_t make_small_spte(const SpteFmt* f, uint64_t huge_spte, int child_level,
                                     uint64_t index, bint nx_huge_pages) noexcept nogil:
    """make_small_spte: entry ``index`` of the table that replaces a huge leaf."""
    cdef uint64_t spte = huge_spte | ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PTE_LARGE
        if nx_huge_pages:                            # make_spte_executable
            spte = (spte & ~f.nx) | f.x
    return spte


cdef inline uint64_t make_mmio_spte(const SpteFmt* f, uint64_t gfn,
                                    uint64_t generation) noexcept nogil:
    """make_mmio_spte(gfn, ACC_ALL): generation bits, the MMIO value, the GPA."""
    cdef uint64_t gen = generation & MMIO_SPTE_GEN_MASK
    cdef uint64_t spte = (((gen << MMIO_SPTE_GEN_LOW_START) & GEN_LOW_MASK)
                          | ((gen << GEN_HIGH_SHIFT) & GEN_HIGH_MASK))
    return spte | f.mmio_value | (ACC_ALL & f.mmio_access_mask) | (gfn << PAGE_SHIFT)


cdef inline bint is_mmio_spte(const SpteFmt* f, uint64_t spte) noexcept nogil:
    return (spte & f.mmio_mask) == f.mmio_value


cdef inline bint access_allowed(const SpteFmt* f, bint exec_, bint write,
                                uint64_t spte) noexcept nogil:
    """is_access_allowed."""
    if exec_:
        return (spte & (f.x | f.nx)) == f.x
    if write:
        return (spte & PTE_WRITABLE) != 0
    return (spte & PTE_PRESENT) != 0      # PT_PRESENT_MASK (the R bit for EPT)


cdef inline bint is_shadow_present(uint64_t spte) noexcept nogil:
    return (spte & SPTE_MMU_PRESENT) != 0


cdef inline bint is_last_spte(uint64_t spte, int level) noexcept nogil:
    return level == PG_LEVEL_4K or (spte & PTE_LARGE) != 0


cdef inline uint64_t mmio_spte_generation(uint64_t spte) noexcept nogil:
    return ((spte & GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START) | ((spte & GEN_HIGH_MASK) >> GEN_HIGH_SHIFT)


cdef inline Py_ssize_t spte_index(uint64_t gfn, int level) noexcept nogil:
    """SPTE_INDEX(gfn << 12, level)."""
    return (gfn >> (PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)


cdef class Root:
    """One TDP root: its PageTables plus KVM's per-table bookkeeping."""

    cdef readonly PageTables pt
    cdef readonly uint64_t gfn_bits          # kvm_gfn_root_bits
    # nx_huge_page_disallowed of each table this root allocated, by table index.
    cdef uint8_t* nx_disallowed
    cdef Py_ssize_t nx_cap

    def __cinit__(self):
        self.nx_disallowed = NULL
        self.nx_cap = 0

    def __dealloc__(self):
        free(self.nx_disallowed)

    def __init__(self, PageTables tables, uint64_t gfn_bits):
        self.pt = tables
        self.gfn_bits = gfn_bits
        tables.c_fill(0, SHADOW_NONPRESENT_VALUE)

    cdef Root clone(self):
        cdef Root c = Root.__new__(Root)
        c.pt = self.pt.clone()
        c.gfn_bits = self.gfn_bits
        if self.nx_cap:
            c.nx_disallowed = <uint8_t*>malloc(self.nx_cap)
            if c.nx_disallowed == NULL:
                raise MemoryError()
            memcpy(c.nx_disallowed, self.nx_disallowed, self.nx_cap)
            c.nx_cap = self.nx_cap
        return c

    cdef inline Py_ssize_t child(self, uint64_t spte) noexcept:
        """The table a present non-leaf SPTE points to (spte_to_child_sp).  KVM's own
        SPTEs always point at a table; one written over with set_entry may not, and
        then this is the storage's last row, the row the twin's index -1 reads."""
        cdef Py_ssize_t table = table_at(spte & SPTE_BASE_ADDR_MASK, self.pt.ntables)
        return table if table >= 0 else self.pt.mem.shape[0] - 1

    cdef int set_disallowed(self, Py_ssize_t table, bint value) except -1:
        cdef Py_ssize_t cap
        cdef uint8_t* grown
        if table >= self.nx_cap:
            cap = max(2 * self.nx_cap, table + 1, 64)
            grown = <uint8_t*>realloc(self.nx_disallowed, cap)
            if grown == NULL:
                raise MemoryError()
            memset(grown + self.nx_cap, 0, cap - self.nx_cap)
            self.nx_disallowed, self.nx_cap = grown, cap
        self.nx_disallowed[table] = value
        return 0

    cdef inline bint disallowed(self, Py_ssize_t table) noexcept:
        return 0 <= table < self.nx_cap and self.nx_disallowed[table] != 0


cdef class TdpMmu:
    """The VM's TDP MMU: its roots and what changes their SPTEs."""

    cdef SpteFmt fmt
    cdef readonly int levels
    cdef readonly bint nx_huge_pages
    cdef readonly Root direct
    cdef readonly Root mirror                # None unless TDX
    cdef int64_t npages[4]                   # kvm->stat.pages[level]
    cdef readonly object tracer              # a kvmemu._trace.Tracer, or None
    cdef bint tracing                        # tracer is not None

    def __init__(self, bint ept, bint tdx, int levels, uint64_t direct_bits_gfn,
                 bint nx_huge_pages, make_tables):
        self.fmt = spte_format(ept, tdx)
        self.levels = levels
        self.nx_huge_pages = nx_huge_pages
        self.direct = Root(make_tables(), direct_bits_gfn)
        self.mirror = Root(make_tables(), 0) if tdx else None
        memset(self.npages, 0, sizeof(self.npages))
        self.tracer, self.tracing = None, False

    def set_tracer(self, tracer):
        self.tracer, self.tracing = tracer, tracer is not None

    cdef TdpMmu clone(self):
        cdef TdpMmu c = TdpMmu.__new__(TdpMmu)
        c.fmt, c.levels, c.nx_huge_pages = self.fmt, self.levels, self.nx_huge_pages
        c.direct = self.direct.clone()
        c.mirror = None if self.mirror is None else self.mirror.clone()
        memcpy(c.npages, self.npages, sizeof(self.npages))
        c.tracer, c.tracing = None, False        # the tracer is not part of the state
        return c

    @property
    def pages(self):
        """Present leaf SPTEs per level: [unused, 4K, 2M, 1G]."""
        return [self.npages[i] for i in range(4)]

    # --- changing SPTEs (handle_changed_spte) ---------------------------------------------

    cdef int set_spte(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                      uint64_t new, uint64_t gfn) except -1:
        """tdp_mmu_set_spte: write, then handle_changed_spte (traced, with iter->gfn)."""
        cdef uint64_t old
        if self.tracing:
            old = root.pt.mem[table, index]
            if old != new:
                self.tracer.spte_changed(0, gfn, level, old, new)
        return self.write_spte(root, table, index, level, new)

    cdef int write_spte(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                        uint64_t new) except -1:
        """Store an SPTE and do handle_changed_spte's bookkeeping, untraced."""
        cdef PageTables pt = root.pt
        cdef uint64_t old = pt.mem[table, index]
        pt.mem[table, index] = new
        if is_shadow_present(old) and is_last_spte(old, level):
            self.npages[level] -= 1
        if is_shadow_present(new) and is_last_spte(new, level):
            self.npages[level] += 1
        if is_shadow_present(old) and not is_last_spte(old, level):
            self.remove_table(root, root.child(old), level - 1)
        return 0

    cdef int remove_table(self, Root root, Py_ssize_t table, int level) except -1:
        """handle_removed_pt: zap every entry of an unlinked table, free it."""
        cdef Py_ssize_t index
        for index in range(<Py_ssize_t>PT_ENTRIES):
            if is_shadow_present(root.pt.mem[table, index]):
                self.write_spte(root, table, index, level, SHADOW_NONPRESENT_VALUE)
        if table < root.nx_cap:
            root.nx_disallowed[table] = 0
        return root.pt.c_free(table)

    # --- mapping a fault (kvm_tdp_mmu_map) -------------------------------------------------

    cdef inline Root root_for(self, uint64_t addr, uint64_t direct_bits_gpa):
        """tdp_mmu_get_root_for_fault: the mirror root for a TDX private GPA."""
        if self.mirror is not None and not (addr & direct_bits_gpa):
            return self.mirror
        return self.direct

    cdef void hugepage_adjust(self, FaultRec* f) noexcept nogil:
        """kvm_mmu_hugepage_adjust (with kvm_mmu_max_mapping_level, 6.18 form)."""
        cdef int level
        cdef uint64_t mask
        cdef const uint32_t* linfo
        f.huge_page_disallowed = f.exec_ and self.nx_huge_pages
        if f.max_level == PG_LEVEL_4K or not f.has_slot:
            return
        if f.slot.flags & MEMFLAG_LOG_DIRTY_PAGES:
            return
        level = min(f.max_level, <int>PG_LEVEL_1G)   # max_huge_page_level
        while level > <int>PG_LEVEL_4K:
            linfo = f.slot.lpage_2m if level == PG_LEVEL_2M else f.slot.lpage_1g
            if not linfo[gfn_to_index(f.gfn, f.slot.base_gfn, level)]:
                break
            level -= 1
        if level > <int>PG_LEVEL_4K:
            level = min(f.slot.host_level, level)
        f.req_level = level
        if level == PG_LEVEL_4K or f.huge_page_disallowed:
            return
        f.goal_level = level
        mask = pages_per_hpage(level) - 1
        f.pfn &= ~mask                      # gfn and pfn are congruent (lpage_info)

    cdef int map(self, FaultRec* f, Root root, uint64_t generation,
                 uint64_t* mmio_created) except -1:
        """kvm_tdp_mmu_map: walk down from the root, link or split on the way, map."""
        cdef PageTables pt = root.pt
        cdef uint64_t indexed = f.gfn | root.gfn_bits
        cdef uint64_t old
        cdef Py_ssize_t table = 0, index, child, i
        cdef int level = self.levels
        self.hugepage_adjust(f)
        if self.tracing:
            self.tracer.spte_requested(
                f.gfn, (f.pfn if f.has_slot else KVM_PFN_NOSLOT)
                | (f.gfn & (pages_per_hpage(f.goal_level) - 1)), f.goal_level)
        while True:
            index = spte_index(indexed, level)
            old = pt.mem[table, index]
            if self.nx_huge_pages:
                self.disallowed_hugepage_adjust(f, root, old, level)
            if level == f.goal_level:
                return self.map_target_level(f, root, table, index, level, old, generation,
                                             mmio_created,
                                             indexed & ~(pages_per_hpage(level) - 1))
            if is_shadow_present(old) and not (old & PTE_LARGE):
                table, level = root.child(old), level - 1
                continue
            child = pt.c_alloc(SHADOW_NONPRESENT_VALUE)
            root.set_disallowed(child, f.huge_page_disallowed)
            if is_shadow_present(old):                   # a huge leaf in the way: split it
                for i in range(<Py_ssize_t>PT_ENTRIES):
                    self.write_spte(root, child, i, level - 1,
                                    make_small_spte(&self.fmt, old, level - 1, i,
                                                    self.nx_huge_pages))
            # Replacing a huge leaf by a table: the leaf count moves to the children.
            self.set_spte(root, table, index, level,
                          make_nonleaf_spte(&self.fmt, PT_BASE_HPA + (<uint64_t>child << PAGE_SHIFT)),
                          indexed & ~(pages_per_hpage(level) - 1))
            table, level = child, level - 1

    cdef inline void disallowed_hugepage_adjust(self, FaultRec* f, Root root, uint64_t spte,
                                                int level) noexcept:
        if (level > <int>PG_LEVEL_4K and level == f.goal_level and is_shadow_present(spte)
                and not (spte & PTE_LARGE) and root.disallowed(root.child(spte))):
            f.pfn |= f.gfn & (pages_per_hpage(level) - pages_per_hpage(level - 1))
            f.goal_level -= 1

    cdef int map_target_level(self, FaultRec* f, Root root, Py_ssize_t table, Py_ssize_t index,
                              int level, uint64_t old, uint64_t generation,
                              uint64_t* mmio_created, uint64_t iter_gfn) except -1:
        """tdp_mmu_map_handle_target_level (``iter_gfn``: iter->gfn, with the root's
        gfn bits)."""
        cdef uint64_t new, gfn
        cdef int ret
        if (is_shadow_present(old) and access_allowed(&self.fmt, f.exec_, f.write, old)
                and is_last_spte(old, level)):
            return RET_PF_SPURIOUS
        gfn = f.gfn & ~(pages_per_hpage(level) - 1)     # iter->gfn
        if not f.has_slot:
            new = make_mmio_spte(&self.fmt, gfn, generation)
        else:
            new = make_spte(&self.fmt, level, f.pfn, f.map_writable, self.nx_huge_pages)
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        else:
            self.set_spte(root, table, index, level, new, iter_gfn)
        if is_mmio_spte(&self.fmt, new):
            mmio_created[0] += 1
            ret = RET_PF_EMULATE        # (the kernel traces mark_mmio_spte here: not modelled)
        elif self.tracing:
            self.tracer.set_spte(level, iter_gfn, new,
                                 PT_BASE_HPA + (<uint64_t>table << PAGE_SHIFT) + 8 * <uint64_t>index)
        return ret

    # --- lockless lookups -----------------------------------------------------------------------

    cdef LastSpte last_spte(self, Root root, uint64_t gfn) noexcept:
        """The deepest SPTE on gfn's path (kvm_tdp_mmu_fast_pf_get_last_sptep /
        kvm_tdp_mmu_get_walk)."""
        cdef uint64_t indexed = gfn | root.gfn_bits
        cdef LastSpte out
        out.table, out.level = 0, self.levels
        while True:
            out.index = spte_index(indexed, out.level)
            out.spte = root.pt.mem[out.table, out.index]
            if (out.level == PG_LEVEL_4K or not is_shadow_present(out.spte)
                    or out.spte & PTE_LARGE):
                return out
            out.table, out.level = root.child(out.spte), out.level - 1

    # --- zapping (kvm_unmap_gfn_range -> tdp_mmu_zap_leafs) ----------------------------------

    cdef int zap_leafs(self, Root root, uint64_t start, uint64_t end) except -1:
        """Zap the present leaf SPTEs mapping any gfn of [start, end); tables stay.
        Returns 1 if a TLB flush is needed."""
        return self.zap(root, 0, self.levels, 0, start, end)

    cdef int zap(self, Root root, Py_ssize_t table, int level, uint64_t base, uint64_t start,
                 uint64_t end) except -1:
        cdef uint64_t span = pages_per_hpage(level), spte
        cdef uint64_t first = (start - base) // span if start > base else 0
        cdef uint64_t last = 0
        cdef uint64_t index
        cdef int flush = 0
        if end > base:
            last = min((end - base) // span + ((end - base) % span != 0), <uint64_t>PT_ENTRIES)
        index = first
        while index < last:
            spte = root.pt.mem[table, index]
            if is_shadow_present(spte):
                if is_last_spte(spte, level):
                    self.set_spte(root, table, index, level, SHADOW_NONPRESENT_VALUE,
                                  base + index * span)
                    flush = 1
                elif self.zap(root, root.child(spte), level - 1, base + index * span, start, end):
                    flush = 1
            index += 1
        return flush

    cdef int zap_all(self) except -1:
        """kvm_mmu_zap_all_fast: every SPTE of every root goes, MMIO SPTEs included."""
        cdef Py_ssize_t index
        cdef Root root
        for root in (self.direct, self.mirror):
            if root is not None:
                for index in range(<Py_ssize_t>PT_ENTRIES):
                    self.set_spte(root, 0, index, self.levels, SHADOW_NONPRESENT_VALUE,
                                  <uint64_t>index * pages_per_hpage(self.levels))
        return 0

    cdef int unmap_range(self, uint64_t start, uint64_t end, bint private,
                         bint shared) except -1:
        """kvm_unmap_gfn_range with kvm_gfn_range_filter_to_root_types: TDX maps the
        private filter to the mirror root and the shared one to the direct root; every
        other VM has only the direct root, zapped for either filter.  The direct root is
        indexed with the shared bit, so the range is aliased by adding it."""
        cdef int flush = 0
        cdef uint64_t bits = self.direct.gfn_bits
        if self.mirror is None:
            return self.zap_leafs(self.direct, start + bits, end + bits)
        if private and self.zap_leafs(self.mirror, start, end):
            flush = 1
        if shared and self.zap_leafs(self.direct, start + bits, end + bits):
            flush = 1
        return flush
