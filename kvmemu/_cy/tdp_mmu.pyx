# The TDP MMU: roots, mapping a fault, zapping ranges.
#
# The compiled twin of kvmemu/_pure/tdp_mmu.py, which names the Linux 6.18
# functions each part follows (arch/x86/kvm/mmu/tdp_mmu.c) and says which trace
# events are emitted where.  KVM's tables live in the VM's PageTables (TDX's
# mirror of the Secure EPT in a second one), so the hardware walk reads exactly
# the SPTEs KVM wrote; every SPTE read and write goes through PageTables.read /
# write.  Table allocation order matches the twin's (a LIFO free list), so table
# addresses in non-leaf SPTEs match too.  Tracing costs one C flag test per SPTE
# change and per map when it is off.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset


@cython.final
@cython.auto_pickle(False)      # it holds pointers into its tables' reservation
cdef class Root:
    """One TDP root: its PageTables plus KVM's per-table bookkeeping.

    sp->nx_huge_page_disallowed is the tables' flag byte (PageTables.flags, a byte per
    table of the reservation, after the tables): faults of several vCPUs set them under
    mmu_lock for read, and they never move under them."""

    def __init__(self, PageTables tables, uint64_t gfn_bits):
        self.pt = tables
        self.gfn_bits = gfn_bits
        tables.kvm_owned = True
        tables.fill(0, SHADOW_NONPRESENT_VALUE)

    cdef Root clone(self):
        """A copy, its tables' flags included (PageTables.clone copies them)."""
        cdef Root c = Root.__new__(Root)
        c.pt = self.pt.clone()
        c.gfn_bits = self.gfn_bits
        return c

    cdef Py_ssize_t child(self, uint64_t spte) noexcept nogil:
        """The table a present non-leaf SPTE points to (spte_to_child_sp).  Only KVM
        writes these tables, and its non-leaf SPTEs always point at a table (a release
        build reads the root rather than outside the tables if one did not)."""
        return (self.child_entries(spte) - self.pt.mem) >> PT_LEVEL_BITS

    cdef uint64_t* child_entries(self, uint64_t spte) noexcept nogil:
        """The entries of child(spte), found from the SPTE's address bits (the walk down
        then waits on an AND and an add per level, not on the table's number)."""
        cdef uint64_t hpa = spte & SPTE_BASE_ADDR_MASK
        if has_table(hpa, load_count(&self.pt.ntables)) and hpa != PT_BASE_HPA:
            return <uint64_t*>(table_bias(self.pt.mem) + hpa)
        debug_assert(False)
        return self.pt.mem

    cdef void set_nx_huge_page_disallowed(self, Py_ssize_t table, bint value) noexcept nogil:
        debug_assert(0 <= table < self.pt.reserved)
        store_flag(&self.pt.flags[table], value)      # faults of other vCPUs read it

    cdef bint nx_huge_page_disallowed(self, Py_ssize_t table) noexcept nogil:
        return 0 <= table < self.pt.reserved and load_flag(&self.pt.flags[table])

    def disallowed_tables(self):
        """The tables marked nx_huge_page_disallowed, ascending (for a snapshot's bytes)."""
        cdef Py_ssize_t t
        return [t for t in range(self.pt.ntables) if self.pt.flags[t]]

    def load_disallowed(self, tables):
        """Mark exactly ``tables`` (existing ones) nx_huge_page_disallowed."""
        cdef Py_ssize_t table
        for table in tables:
            if not 0 < table < self.pt.ntables:
                raise ValueError(f"table {table} does not exist")
        memset(self.pt.flags, 0, <size_t>self.pt.ntables)
        for table in tables:
            self.set_nx_huge_page_disallowed(table, True)


cdef bint spte_reduced(const SpteFormat* fmt, int level, uint64_t old, uint64_t new) noexcept nogil:
    """The change of a level-``level`` SPTE from ``old`` to ``new`` removes or reduces a
    mapping (the twin tells the rule)."""
    if not (is_shadow_present_pte(old) and is_last_spte(old, level)):
        return False
    if not is_shadow_present_pte(new):
        return True
    if not is_last_spte(new, level):
        return False
    if spte_to_pfn(new) != spte_to_pfn(old):
        return True
    if ((is_access_allowed(fmt, False, False, old) and not is_access_allowed(fmt, False, False, new))
            or (is_access_allowed(fmt, False, True, old)
                and not is_access_allowed(fmt, False, True, new))
            or (is_access_allowed(fmt, True, False, old)
                and not is_access_allowed(fmt, True, False, new))):
        return True
    return (old & PTE_WRITABLE) != 0 and (old & fmt.dirty) != 0 and not (new & fmt.dirty)


@cython.final
cdef class TdpMmu:
    """The VM's TDP MMU: its roots and what changes their SPTEs."""

    def __cinit__(self):
        self.zaps = NULL
        self.nzaps = self.zaps_cap = 0
        self.npages = <CountShard*>aligned_alloc(64, COUNT_SHARDS * sizeof(CountShard))
        if self.npages == NULL:
            raise MemoryError()
        memset(self.npages, 0, COUNT_SHARDS * sizeof(CountShard))

    def __dealloc__(self):
        free(self.zaps)
        free(self.npages)

    def __init__(self, config, make_tables):
        self.fmt = spte_format(config.ept, config.tdx, config.ad_enabled, config.npt_mmio_value)
        self.levels = config.levels
        self.nx_huge_pages = config.nx_huge_pages
        self.ad_enabled = config.ad_enabled
        self.direct = Root(make_tables(), config.direct_bits_gfn)
        self.mirror = Root(make_tables(), 0) if config.tdx else None
        self.share_lock(RwLock())
        self.skip_stale_check = False
        self.tracer, self.tracing = None, False
        self.zap_reason, self.zap_watch = 0, False

    def share_lock(self, RwLock lock):
        """Make ``lock`` kvm->mmu_lock, the lock of every root's tables."""
        self.mmu_lock = lock
        self.direct.pt.lock = lock
        if self.mirror is not None:
            self.mirror.pt.lock = lock

    def set_tracer(self, Tracer tracer):
        self.tracer, self.tracing = tracer, tracer is not None

    def watch_zaps(self, bint on):
        """Record the mappings removed or reduced from now on (VM.on_zap is set), or not."""
        self.zap_watch = on
        if not on:
            self.nzaps = 0

    cdef int record_zap(self, uint64_t gfn, int level) except -1:
        """Keep a removed or reduced level-``level`` mapping of ``gfn``, merged into the
        last one when it continues it (same level and reason, the next gfn)."""
        cdef uint64_t npages = pages_per_hpage(level)
        cdef ZapRecord* last
        gfn &= ~(npages - 1)
        if self.nzaps:
            last = &self.zaps[self.nzaps - 1]
            if (last.level == level and last.reason == self.zap_reason
                    and last.gfn + last.npages == gfn):
                last.npages += npages
                return 0
        if not with_room(<void**>&self.zaps, &self.zaps_cap, self.nzaps + 1, sizeof(ZapRecord),
                         16):
            raise MemoryError()
        last = &self.zaps[self.nzaps]
        last.gfn, last.npages, last.level, last.reason = gfn, npages, level, self.zap_reason
        self.nzaps += 1
        return 0

    def take_zaps(self):
        """The zaps recorded since the last call, [(gfn, npages, level, reason), ...] (the
        records are taken before any Python object is made, so nothing that runs while
        the list is built can change them under it)."""
        cdef ZapRecord* taken = self.zaps
        cdef Py_ssize_t i, n = self.nzaps
        self.zaps, self.nzaps, self.zaps_cap = NULL, 0, 0
        try:
            return [(taken[i].gfn, taken[i].npages, taken[i].level, taken[i].reason)
                    for i in range(n)]
        finally:
            free(taken)

    def clone(self):
        """A copy of the roots and counts (for VM snapshots); the tracer is not state."""
        cdef TdpMmu c = TdpMmu.__new__(TdpMmu)
        c.fmt, c.levels, c.nx_huge_pages = self.fmt, self.levels, self.nx_huge_pages
        c.ad_enabled = self.ad_enabled
        c.direct = self.direct.clone()
        c.mirror = None if self.mirror is None else self.mirror.clone()
        c.share_lock(RwLock())
        c.skip_stale_check = self.skip_stale_check
        c.load_pages(self.pages)
        c.tracer, c.tracing = None, False
        return c

    def load_pages(self, pages):
        """kvm->stat.pages as a snapshot's bytes hold it: [unused, 4K, 2M, 1G]."""
        cdef int i
        memset(self.npages, 0, COUNT_SHARDS * sizeof(CountShard))
        for i in range(4):
            self.npages[0].n[i] = pages[i]

    @property
    def pages(self):
        """Present leaf SPTEs per level: [unused, 4K, 2M, 1G]."""
        cdef int i, k
        cdef long total
        out = []
        for i in range(4):
            total = 0
            for k in range(COUNT_SHARDS):
                total += atomic_load(&self.npages[k].n[i])
            out.append(total)
        return out

    # --- changing SPTEs -----------------------------------------------------------------------

    cdef int set_spte(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                      uint64_t new, uint64_t gfn) except -1 nogil:
        """Models tdp_mmu_set_spte (tdp_mmu.c, 6.18): write, then handle_changed_spte;
        traced as kvm_tdp_mmu_spte_changed with iter->gfn: ``gfn`` indexes the root (with
        its gfn bits, as tdp_iter_refresh_sptep does), the trace drops them (iter->gfn is
        canonical, tdp_iter.c)."""
        cdef uint64_t old = root.pt.read(table, index)
        if self.tracing and old != new:
            with gil:
                self.tracer.spte_changed(0, gfn & ~root.gfn_bits, level, old, new)
        root.pt.write(table, index, new)
        return self.handle_changed_spte(root, gfn, level, old, new)

    cdef inline int set_spte_atomic(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                                    uint64_t old, uint64_t new, uint64_t gfn,
                                    uint64_t* aug) except -1 nogil:
        """Models tdp_mmu_set_spte_atomic (tdp_mmu.c, 6.18), a mirror SPTE's freeze
        included (set_external_spte_present); the twin tells the rules.  ``aug``: the
        frame TDH.MEM.PAGE.AUG adds, or NULL."""
        cdef uint64_t* sptep = &root.pt.mem[table * PT_ENTRIES + index]
        if root is self.mirror:
            if not cmpxchg64(sptep, old, FROZEN_SPTE):
                return 0
            if aug != NULL:
                atomic_or64(aug, FRAME_STATE_TDX_PENDING)
            store_entry(sptep, new)
        elif not cmpxchg64(sptep, old, new):
            return 0
        if self.tracing and old != new:
            with gil:
                self.tracer.spte_changed(0, gfn & ~root.gfn_bits, level, old, new)
        self.handle_changed_spte(root, gfn, level, old, new)
        return 1

    cdef inline int handle_changed_spte(self, Root root, uint64_t gfn, int level, uint64_t old,
                                        uint64_t new) except -1 nogil:
        """Models handle_changed_spte (tdp_mmu.c, 6.18) without its tracepoint, which
        set_spte emits: the per-level leaf counts (kvm_update_page_stats: atomic, since
        faults of several vCPUs change them under mmu_lock for read), and a table
        unlinked by the change is removed; a mapping removed or reduced is recorded for
        VM.on_zap."""
        if self.zap_watch and self.zap_reason and spte_reduced(&self.fmt, level, old, new):
            with gil:
                self.record_zap(gfn, level)
        if is_shadow_present_pte(old) and is_last_spte(old, level):
            atomic_add(&self.npages[my_shard()].n[level], -1)
        if is_shadow_present_pte(new) and is_last_spte(new, level):
            atomic_add(&self.npages[my_shard()].n[level], 1)
        if is_shadow_present_pte(old) and not is_last_spte(old, level):
            self.handle_removed_pt(root, root.child(old), level - 1,
                                   gfn & ~(pages_per_hpage(level) - 1))
        return 0

    cdef int handle_removed_pt(self, Root root, Py_ssize_t table, int level,
                               uint64_t base) except -1 nogil:
        """Models handle_removed_pt (tdp_mmu.c, 6.18): zap every entry of an unlinked table
        (mapping gfns from ``base``), free it."""
        cdef Py_ssize_t index
        cdef uint64_t old
        for index in range(<Py_ssize_t>PT_ENTRIES):
            old = root.pt.read(table, index)
            if is_shadow_present_pte(old):
                root.pt.write(table, index, SHADOW_NONPRESENT_VALUE)
                self.handle_changed_spte(root, base + index * pages_per_hpage(level), level,
                                         old, SHADOW_NONPRESENT_VALUE)
        root.set_nx_huge_page_disallowed(table, False)
        return root.pt.free(table)

    # --- mapping a fault ----------------------------------------------------------------------

    cdef Root get_root_for_fault(self, uint64_t addr, uint64_t direct_bits_gpa):
        """Models tdp_mmu_get_root_for_fault (tdp_mmu.h, 6.18): the mirror root for a TDX
        private GPA."""
        if self.mirror is not None and not (addr & direct_bits_gpa):
            return self.mirror
        return self.direct

    cdef inline int tdp_mmu_map(self, FaultRecord* f, Root root,
                                uint64_t generation) except CORE_RETURN_PY_EXCEPTION nogil:
        """Models kvm_tdp_mmu_map (tdp_mmu.c, 6.18): hugepage adjust, then walk down from
        the root, linking a new table where none is and splitting a huge leaf in the way,
        and map the target level; every link is a compare-and-exchange, and a lost one
        frees the new table and retries the fault, as does a frozen SPTE on the way
        (another fault's change of a mirror SPTE in progress).  A trace sink is called
        with the GIL taken; nothing else here needs it (access_many maps faults without
        it)."""
        cdef uint64_t indexed = f.gfn | root.gfn_bits
        cdef uint64_t old
        cdef Py_ssize_t table, index, child
        cdef uint64_t* mem = root.pt.mem
        cdef uint64_t* entries = mem                # the entries of the table walked
        cdef int level = self.levels, goal
        hugepage_adjust(f, self.nx_huge_pages)
        goal = f.goal_level
        if self.tracing:
            with gil:
                self.tracer.spte_requested(
                    f.gfn, (f.pfn if f.has_slot else KVM_PFN_NOSLOT)
                    | (f.gfn & (pages_per_hpage(goal) - 1)), goal)
        while True:
            index = spte_index(indexed, level)
            old = load_entry(&entries[index])
            if self.nx_huge_pages:
                disallowed_hugepage_adjust(f, root, old, level)
                goal = f.goal_level
            if level != goal and is_shadow_present_pte(old) and not (old & PTE_LARGE):
                # Down to the child table (its number is taken from ``entries`` only
                # where it is needed).
                entries, level = root.child_entries(old), level - 1
                continue
            table = (entries - mem) >> PT_LEVEL_BITS
            # Checked after the step down: a frozen SPTE is never present.
            if is_frozen_spte(old):          # another fault's change in progress
                return RET_PF_RETRY
            if level == goal:
                return self.map_handle_target_level(f, root, table, index, level, old,
                                                    generation,
                                                    indexed & ~(pages_per_hpage(level) - 1))
            if is_shadow_present_pte(old):               # a huge leaf in the way: split it
                child = self.split_huge_page(root, table, index, level, old,
                                             indexed & ~(pages_per_hpage(level) - 1),
                                             f.huge_page_disallowed)
            else:
                child = self.link_sp(root, table, index, level, old,
                                     indexed & ~(pages_per_hpage(level) - 1),
                                     f.huge_page_disallowed)
            if not child:
                return RET_PF_RETRY
            level -= 1
            entries = &mem[child * PT_ENTRIES]

    cdef Py_ssize_t link_sp(self, Root root, Py_ssize_t table, Py_ssize_t index, int level,
                            uint64_t old, uint64_t gfn, bint disallowed) except -1 nogil:
        """Models tdp_mmu_link_sp (tdp_mmu.c, 6.18): a new empty table where ``old`` (not
        present) was; 0 if the compare-and-exchange lost (the table is freed)."""
        cdef Py_ssize_t child = root.pt.alloc(SHADOW_NONPRESENT_VALUE)
        # Before the link, as tdp_mmu_map sets sp->nx_huge_page_disallowed: a fault of
        # another vCPU that meets the new table reads it (disallowed_hugepage_adjust).
        root.set_nx_huge_page_disallowed(child, disallowed)
        if not self.set_spte_atomic(root, table, index, level, old,
                                    make_nonleaf_spte(&self.fmt, table_hpa(child)), gfn, NULL):
            root.set_nx_huge_page_disallowed(child, False)     # a free table's is clear
            root.pt.free(child)
            return 0
        return child

    cdef Py_ssize_t split_huge_page(self, Root root, Py_ssize_t table, Py_ssize_t index,
                                    int level, uint64_t old, uint64_t gfn,
                                    bint disallowed) except -1 nogil:
        """Models tdp_mmu_split_huge_page (tdp_mmu.c, 6.18): a table of 512 make_small_spte
        children of the huge leaf ``old``, linked in its place (the children are not
        traced); the leaf count moves to the children.  0 if the link lost its race."""
        cdef Py_ssize_t child = root.pt.alloc(SHADOW_NONPRESENT_VALUE), i
        for i in range(<Py_ssize_t>PT_ENTRIES):
            root.pt.write(child, i, make_small_spte(&self.fmt, old, level - 1, i,
                                                    self.nx_huge_pages))
        root.set_nx_huge_page_disallowed(child, disallowed)     # before the link: link_sp
        if not self.set_spte_atomic(root, table, index, level, old,
                                    make_nonleaf_spte(&self.fmt, table_hpa(child)), gfn, NULL):
            root.set_nx_huge_page_disallowed(child, False)
            root.pt.free(child)
            return 0
        for i in range(<Py_ssize_t>PT_ENTRIES):
            self.handle_changed_spte(root, (gfn & ~(pages_per_hpage(level) - 1))
                                     + i * pages_per_hpage(level - 1), level - 1,
                                     SHADOW_NONPRESENT_VALUE, root.pt.read(child, i))
        return child

    cdef inline int map_handle_target_level(self, FaultRecord* f, Root root, Py_ssize_t table,
                                            Py_ssize_t index, int level, uint64_t old,
                                            uint64_t generation, uint64_t iter_gfn
                                            ) except CORE_RETURN_PY_EXCEPTION nogil:
        """Models tdp_mmu_map_handle_target_level (tdp_mmu.c, 6.18; ``iter_gfn``: iter->gfn,
        with the root's gfn bits): a leaf or an MMIO SPTE for the fault, FIXED, SPURIOUS or
        EMULATE."""
        cdef uint64_t new, gfn
        cdef int ret
        if (is_shadow_present_pte(old)
                and (f.prefetch or is_access_allowed(&self.fmt, f.exec_, f.write, old))
                and is_last_spte(old, level)):
            return RET_PF_SPURIOUS
        gfn = f.gfn & ~(pages_per_hpage(level) - 1)     # iter->gfn
        if not f.has_slot:
            new = make_mmio_spte(&self.fmt, gfn, generation)
        else:
            new = make_spte(&self.fmt, level, f.pfn, f.map_writable, self.nx_huge_pages,
                            f.prefetch)
            if new & PTE_WRITABLE:           # make_spte's last step, before the SPTE is set
                mark_page_dirty_in_slot(&f.slot, f.gfn)
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        else:
            if not self.set_spte_atomic(root, table, index, level, old, new, iter_gfn,
                                        f.frame if f.aug else NULL):
                return RET_PF_RETRY
        if is_mmio_spte(&self.fmt, new):
            ret = RET_PF_EMULATE        # (the kernel traces mark_mmio_spte here: not modelled)
        elif self.tracing:
            with gil:
                self.tracer.set_spte(level, iter_gfn & ~root.gfn_bits, new,
                                     table_hpa(table) + PT_ENTRY_BYTES * <uint64_t>index)
        return ret

    # --- lockless lookups ---------------------------------------------------------------------

    cdef LastSpte tdp_mmu_get_walk(self, Root root, uint64_t gfn) noexcept nogil:
        """Models kvm_tdp_mmu_get_walk / kvm_tdp_mmu_fast_pf_get_last_sptep (tdp_mmu.c,
        6.18): the deepest SPTE on gfn's path."""
        cdef uint64_t indexed = gfn | root.gfn_bits
        cdef LastSpte out
        out.table, out.level = 0, self.levels
        while True:
            out.index = spte_index(indexed, out.level)
            out.spte = root.pt.read(out.table, out.index)
            if (out.level == PG_LEVEL_4K or not is_shadow_present_pte(out.spte)
                    or out.spte & PTE_LARGE):
                return out
            out.table, out.level = root.child(out.spte), out.level - 1

    # --- zapping ------------------------------------------------------------------------------

    cdef int zap_leafs(self, Root root, uint64_t start, uint64_t end) except -1:
        """Models tdp_mmu_zap_leafs (tdp_mmu.c, 6.18): zap the present leaf SPTEs mapping
        any gfn of [start, end); tables stay.  Returns 1 if a TLB flush is needed."""
        return self.zap_table_leafs(root, 0, self.levels, 0, start, end)

    cdef int zap_table_leafs(self, Root root, Py_ssize_t table, int level, uint64_t base,
                             uint64_t start, uint64_t end) except -1:
        """zap_leafs below one table (mapping gfns from ``base``)."""
        cdef uint64_t span = pages_per_hpage(level), spte
        cdef uint64_t first = first_index(level, base, start)
        cdef uint64_t last = end_index(level, base, end)
        cdef uint64_t index
        cdef int flush = 0
        index = first
        while index < last:
            spte = root.pt.read(table, index)
            if is_shadow_present_pte(spte):
                if is_last_spte(spte, level):
                    self.set_spte(root, table, index, level, SHADOW_NONPRESENT_VALUE,
                                  base + index * span)
                    flush = 1
                elif self.zap_table_leafs(root, root.child(spte), level - 1, base + index * span,
                                          start, end):
                    flush = 1
            index += 1
        return flush

    cpdef int zap_all_fast(self) except -1:
        """Models kvm_mmu_zap_all_fast (mmu.c, 6.18): every SPTE of every root goes, MMIO SPTEs
        included."""
        cdef Py_ssize_t index
        cdef Root root
        for root in (self.direct, self.mirror):
            if root is not None:
                for index in range(<Py_ssize_t>PT_ENTRIES):
                    self.set_spte(root, 0, index, self.levels, SHADOW_NONPRESENT_VALUE,
                                  <uint64_t>index * pages_per_hpage(self.levels))
        return 0

    # --- dirty logging ------------------------------------------------------------------------

    def roots(self):
        """The valid roots (for_each_valid_tdp_mmu_root: direct, then TDX's mirror)."""
        return [self.direct] if self.mirror is None else [self.direct, self.mirror]

    cdef int clear_leaf_bits(self, uint64_t start, uint64_t end, int min_level,
                             uint64_t bits) except -1:
        """Clear ``bits`` in every present leaf at ``min_level`` or above that maps a gfn of
        [start, end) and has any of them, in every root (wrprot_gfn_range,
        clear_dirty_gfn_range); 1 if one changed."""
        cdef Root root
        cdef int changed = 0
        for root in self.roots():
            if self.clear_table_leaf_bits(root, 0, self.levels, 0, start + root.gfn_bits,
                                          end + root.gfn_bits, min_level, bits):
                changed = 1
        return changed

    cdef int clear_table_leaf_bits(self, Root root, Py_ssize_t table, int level, uint64_t base,
                                   uint64_t start, uint64_t end, int min_level,
                                   uint64_t bits) except -1:
        """clear_leaf_bits below one table (mapping gfns from ``base``)."""
        cdef uint64_t span = pages_per_hpage(level), value
        cdef uint64_t index = first_index(level, base, start)
        cdef uint64_t last = end_index(level, base, end)
        cdef int changed = 0
        while index < last:
            value = root.pt.read(table, index)
            if is_shadow_present_pte(value):
                if is_last_spte(value, level):
                    if level >= min_level and value & bits:
                        self.set_spte(root, table, index, level, value & ~bits,
                                      base + index * span)
                        changed = 1
                elif level - 1 >= min_level and self.clear_table_leaf_bits(
                        root, root.child(value), level - 1, base + index * span, start, end,
                        min_level, bits):
                    changed = 1
            index += 1
        return changed

    cdef int clear_gfn_bits(self, Root root, uint64_t gfn, int min_level, int max_level,
                            uint64_t bits) except -1:
        """Clear ``bits`` in the present leaf of ``root`` that maps ``gfn`` if its level is
        within [min_level, max_level] and it has any of them; 1 if it changed."""
        cdef LastSpte last = self.tdp_mmu_get_walk(root, gfn)
        if not (is_shadow_present_pte(last.spte) and is_last_spte(last.spte, last.level)
                and min_level <= last.level <= max_level and last.spte & bits):
            return 0
        self.set_spte(root, last.table, last.index, last.level, last.spte & ~bits,
                      (gfn | root.gfn_bits) & ~(pages_per_hpage(last.level) - 1))
        return 1

    cdef uint64_t dirty_bit(self, bint wrprot) noexcept:
        """PT_WRITABLE_MASK when asked to write-protect or without A/D bits
        (tdp_mmu_need_write_protect), else shadow_dirty_mask (tdp_mmu.c, 6.18)."""
        return PTE_WRITABLE if wrprot or not self.ad_enabled else self.fmt.dirty

    cpdef int wrprot_slot(self, uint64_t start, uint64_t end, int min_level) except -1:
        """Models kvm_tdp_mmu_wrprot_slot / wrprot_gfn_range (tdp_mmu.c, 6.18)."""
        return self.clear_leaf_bits(start, end, min_level, PTE_WRITABLE)

    cpdef int clear_dirty_slot(self, uint64_t start, uint64_t end) except -1:
        """Models kvm_tdp_mmu_clear_dirty_slot / clear_dirty_gfn_range (tdp_mmu.c, 6.18)."""
        return self.clear_leaf_bits(start, end, PG_LEVEL_4K, self.dirty_bit(False))

    cpdef int clear_dirty_pt_masked(self, uint64_t gfn, uint64_t mask, bint wrprot) except -1:
        """Models kvm_tdp_mmu_clear_dirty_pt_masked (tdp_mmu.c, 6.18): 4K leaves only, root
        by root."""
        cdef uint64_t bit = self.dirty_bit(wrprot)
        cdef Root root
        cdef int i
        for root in self.roots():
            for i in range(64):
                if (mask >> i) & 1:
                    self.clear_gfn_bits(root, gfn + i, PG_LEVEL_4K, PG_LEVEL_4K, bit)
        return 0

    cpdef int clear_dirty_pt_masked_words(self, uint64_t gfn, const uint64_t[::1] words,
                                          bint wrprot) except -1:
        """clear_dirty_pt_masked for each non-zero word (kvm_get_dirty_log_protect's and
        kvm_clear_dirty_log_protect's loops)."""
        cdef Py_ssize_t i = 0, n = words.shape[0]
        while True:
            i = next_set_word(&words[0], i, n) if n else n
            if i == n:
                return 0
            self.clear_dirty_pt_masked(gfn + 64 * <uint64_t>i, words[i], wrprot)
            i += 1

    cpdef int write_protect_gfn(self, uint64_t gfn, int min_level) except -1:
        """Models kvm_tdp_mmu_write_protect_gfn (tdp_mmu.c, 6.18): W and MMU-writable go."""
        cdef Root root
        cdef int changed = 0
        for root in self.roots():
            if self.clear_gfn_bits(root, gfn, min_level, PG_LEVEL_256T,
                                   PTE_WRITABLE | self.fmt.mmu_writable):
                changed = 1
        return changed

    cpdef int try_split_huge_pages(self, uint64_t start, uint64_t end,
                                   int target_level) except -1:
        """Models kvm_tdp_mmu_try_split_huge_pages (tdp_mmu.c, 6.18), pre-order."""
        cdef Root root
        for root in self.roots():
            self.split_table(root, 0, self.levels, 0, start + root.gfn_bits,
                             end + root.gfn_bits, target_level)
        return 0

    cdef int split_table(self, Root root, Py_ssize_t table, int level, uint64_t base,
                         uint64_t start, uint64_t end, int target_level) except -1:
        """try_split_huge_pages below one table (mapping gfns from ``base``)."""
        cdef uint64_t span = pages_per_hpage(level), value
        cdef uint64_t index = first_index(level, base, start)
        cdef uint64_t last = end_index(level, base, end)
        cdef Py_ssize_t child
        while index < last:
            value = root.pt.read(table, index)
            if is_shadow_present_pte(value) and level - 1 >= target_level:
                if is_last_spte(value, level):
                    child = self.split_huge_page(root, table, index, level, value,
                                                 base + index * span, False)
                else:
                    child = root.child(value)
                if level - 1 > target_level:
                    self.split_table(root, child, level - 1, base + index * span, start, end,
                                     target_level)
            index += 1
        return 0

    cpdef int recover_huge_pages(self, slot, uint64_t start, uint64_t end) except -1:
        """Models kvm_tdp_mmu_recover_huge_pages / recover_huge_pages_range (tdp_mmu.c,
        6.18); 1 if a table was replaced by a huge leaf."""
        cdef SlotRecord rec
        cdef Root root
        cdef int recovered = 0
        record_slot(slot, &rec)
        for root in self.roots():
            if self.recover_table(root, 0, self.levels, 0, start + root.gfn_bits,
                                  end + root.gfn_bits, &rec):
                recovered = 1
        return recovered

    cdef int recover_table(self, Root root, Py_ssize_t table, int level, uint64_t base,
                           uint64_t start, uint64_t end, const SlotRecord* slot) except -1:
        """recover_huge_pages below one table (mapping gfns from ``base``, with the root's
        gfn bits; the slot's lpage_info reads them without)."""
        cdef uint64_t span = pages_per_hpage(level), value, small, gfn
        cdef uint64_t index = first_index(level, base, start)
        cdef uint64_t last = end_index(level, base, end)
        cdef int recovered = 0
        while index < last:
            value = root.pt.read(table, index)
            gfn = base + index * span
            index += 1
            if not is_shadow_present_pte(value) or is_last_spte(value, level):
                continue
            if (level <= <int>KVM_MAX_HUGEPAGE_LEVEL and start <= gfn < end
                    and max_mapping_level(slot, gfn & ~root.gfn_bits,
                                          KVM_MAX_HUGEPAGE_LEVEL) >= level):
                small = self.first_present_leaf(root, root.child(value), level - 1)
                if small:
                    self.set_spte(root, table, index - 1, level,
                                  make_huge_spte(&self.fmt, small, level, self.nx_huge_pages),
                                  gfn)
                    recovered = 1
                    continue
            if level - 1 >= <int>PG_LEVEL_2M and self.recover_table(
                    root, root.child(value), level - 1, gfn, start, end, slot):
                recovered = 1
        return recovered

    cdef uint64_t first_present_leaf(self, Root root, Py_ssize_t table, int level) noexcept:
        """The first present leaf below a table, in gfn order, or 0."""
        cdef Py_ssize_t index
        cdef uint64_t value, found
        for index in range(<Py_ssize_t>PT_ENTRIES):
            value = root.pt.read(table, index)
            if not is_shadow_present_pte(value):
                continue
            if is_last_spte(value, level):
                return value
            found = self.first_present_leaf(root, root.child(value), level - 1)
            if found:
                return found
        return 0

    cpdef int set_ignore_guest_pat(self, bint ignore) except -1:
        """vmx_get_mt_mask (vmx.c, 6.18) for every leaf made from now on: WB, with IPAT
        while vmx_ignore_guest_pat() holds.  No non-coherent DMA is modelled, so the
        IGNORE_GUEST_PAT quirk alone decides; KVM does not rewrite existing SPTEs when the
        quirk is disabled.  NPT SPTEs carry no memory type."""
        if self.fmt.ept:
            if ignore:
                self.fmt.memtype |= EPTE_IPAT
            else:
                self.fmt.memtype &= ~(<uint64_t>EPTE_IPAT)
        return 0

    cpdef int unmap_gfn_range(self, uint64_t start, uint64_t end, bint private,
                              bint shared) except -1:
        """Models kvm_unmap_gfn_range (mmu.c, 6.18) with kvm_gfn_range_filter_to_root_types:
        TDX maps the private filter to the mirror root and the shared one to the direct
        root; every other VM has only the direct root, zapped for either filter.  The direct
        root is indexed with the shared bit, so the range is aliased by adding it.  Roots
        go in the order of kvm->arch.tdp_mmu_roots: direct, then mirror."""
        cdef int flush = 0
        cdef uint64_t bits = self.direct.gfn_bits
        if self.mirror is None:
            return self.zap_leafs(self.direct, start + bits, end + bits)
        if shared and self.zap_leafs(self.direct, start + bits, end + bits):
            flush = 1
        if private and self.zap_leafs(self.mirror, start, end):
            flush = 1
        return flush
