# The VM's memory state: memslots, lpage_info, memory attributes, invalidation.
#
# The compiled VMState, twin of kvmemu/_pure/memory.py.  The thin kvmemu.VM
# class validates ioctl arguments in KVM's order; everything here holds state
# and keeps it the way Linux 6.18 does: memslot lookup (__gfn_to_memslot), x86
# memslot metadata (kvm_alloc_memslot_metadata), the attribute store with
# kvm_vm_set_mem_attributes and the x86 pre/post hooks, the invalidation
# protocol and the memslot generation.
#
# Lookups the fault path needs run without the GIL over C arrays: address
# space 0's slots sorted by base gfn (slot_c records pointing into each slot's
# lpage_info), and the attribute ranges (sorted, disjoint, merged).

from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport free, malloc

from bisect import bisect_right

from kvmemu import _vm


cdef inline uint64_t pages_per_hpage(int level) noexcept nogil:
    """KVM_PAGES_PER_HPAGE(level): 1, 512, 262144."""
    return (<uint64_t>1) << ((level - 1) * 9)


cdef inline uint64_t gfn_round_for_level(uint64_t gfn, int level) noexcept nogil:
    return gfn & ~(pages_per_hpage(level) - 1)


cdef inline uint64_t gfn_to_index(uint64_t gfn, uint64_t base_gfn, int level) noexcept nogil:
    cdef int shift = (level - 1) * 9
    return (gfn >> shift) - (base_gfn >> shift)


cdef class Slot:
    """A user memslot (struct kvm_memory_slot) with its x86 lpage_info."""

    cdef readonly int as_id
    cdef readonly int id
    cdef readonly uint64_t base_gfn
    cdef readonly uint64_t npages
    cdef readonly uint32_t flags
    cdef readonly uint64_t userspace_addr
    cdef readonly int gmem_id
    cdef readonly uint64_t gmem_pgoff
    cdef readonly int host_level
    # lpage_info[level - 2].disallow_lpage as u32: reasons in bits 30:0, mixed in bit 31.
    cdef uint32_t[::1] lpage_2m
    cdef uint32_t[::1] lpage_1g

    @property
    def end_gfn(self):
        return self.base_gfn + self.npages

    @property
    def gmem_only(self):
        """KVM_MEMSLOT_GMEM_ONLY: bound to a guest_memfd created with MMAP."""
        return (self.flags & KVM_MEMSLOT_GMEM_ONLY) != 0

    def __repr__(self):
        return f"Slot(as_id={self.as_id}, id={self.id}, gfns={self.base_gfn:#x}+{self.npages:#x})"

    cdef Slot clone(self):
        cdef Slot c = Slot.__new__(Slot)
        c.as_id, c.id, c.base_gfn, c.npages, c.flags = (self.as_id, self.id, self.base_gfn,
                                                        self.npages, self.flags)
        c.userspace_addr, c.gmem_id, c.gmem_pgoff = (self.userspace_addr, self.gmem_id,
                                                     self.gmem_pgoff)
        c.host_level = self.host_level
        c.lpage_2m = np.array(self.lpage_2m, dtype=np.uint32)
        c.lpage_1g = np.array(self.lpage_1g, dtype=np.uint32)
        return c

    cdef void record(self, slot_c* rec) noexcept:
        """This slot as the fault path reads it."""
        rec.base_gfn = self.base_gfn
        rec.npages = self.npages
        rec.userspace_addr = self.userspace_addr
        rec.gmem_pgoff = self.gmem_pgoff
        rec.id = self.id
        rec.flags = self.flags
        rec.gmem_id = self.gmem_id
        rec.host_level = self.host_level
        rec.lpage_2m = &self.lpage_2m[0]
        rec.lpage_1g = &self.lpage_1g[0]
        rec.owner = <void*>self

    cdef uint32_t[::1] lpage(self, int level) noexcept:
        return self.lpage_2m if level == PG_LEVEL_2M else self.lpage_1g


cdef class VMState:
    """All of a VM's memory state (the twin of kvmemu._pure.memory.VMState)."""

    cdef readonly bint has_private_mem
    cdef readonly uint64_t supported_attributes
    cdef readonly int nr_as_ids
    cdef uint64_t gen[2]
    cdef list _slots       # per address space: {id: Slot}
    cdef list _sorted      # per address space: [Slot] by base gfn
    cdef list _bases       # per address space: [base gfn] for bisect
    # Address space 0 for the fault path: slots by base gfn as C records.
    cdef slot_c* cslots
    cdef uint64_t* cbases
    cdef Py_ssize_t ncslots
    # Attribute ranges [start, end) -> value, sorted, disjoint, merged; nattr in use.
    cdef object _attr_start_arr, _attr_end_arr, _attr_value_arr
    cdef uint64_t[::1] attr_start
    cdef uint64_t[::1] attr_end
    cdef uint64_t[::1] attr_value
    cdef Py_ssize_t nattr
    # The invalidation protocol (struct kvm).
    cdef readonly uint64_t mmu_invalidate_seq
    cdef readonly int64_t mmu_invalidate_in_progress
    cdef readonly uint64_t mmu_invalidate_range_start
    cdef readonly uint64_t mmu_invalidate_range_end
    # What the MMU needs to know (kvmemu._vm.MmuConfig), and the MMU.
    cdef readonly object config
    cdef bint ept, tdx, sw_protected, snp
    cdef uint64_t direct_bits_gfn
    cdef readonly uint64_t max_gfn           # kvm_mmu_max_gfn(): the host MAXPHYADDR
    cdef readonly TdpMmu mmu

    def __cinit__(self):
        self.cslots = NULL
        self.cbases = NULL
        self.ncslots = 0

    def __init__(self, bint has_private_mem, int nr_as_ids, config):
        if nr_as_ids not in (1, 2):
            raise ValueError(f"nr_as_ids must be 1 or 2, not {nr_as_ids}")
        self.config = config
        self.ept, self.tdx = config.ept, config.tdx
        self.sw_protected, self.snp = config.sw_protected, config.snp
        self.direct_bits_gfn = config.direct_bits_gfn
        self.max_gfn = (<uint64_t>1 << (HOST_MAXPHYADDR - PAGE_SHIFT)) - 1
        self.has_private_mem = has_private_mem
        self.supported_attributes = MEMATTR_PRIVATE if has_private_mem else 0
        self.nr_as_ids = nr_as_ids
        self.gen[0] = 0   # kvm_create_vm: address space i starts at generation i
        self.gen[1] = 1
        self._slots = [{} for _ in range(nr_as_ids)]
        self._sorted = [[] for _ in range(nr_as_ids)]
        self._bases = [[] for _ in range(nr_as_ids)]
        self._set_attr_arrays(np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                              np.zeros(0, np.uint64))
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = INVALID_GPA
        self.mmu_invalidate_range_end = INVALID_GPA
        self.mmu = TdpMmu(config.ept, config.tdx, config.levels, config.direct_bits_gfn,
                          config.nx_huge_pages, self._new_page_tables)

    def _new_page_tables(self):
        """The second-stage paging structures KVM builds for this VM's host: EPT with A/D
        bits, execute-only and 1G pages, or long-mode NPT with host NX; MAXPHYADDR 48."""
        return PageTables("ept" if self.ept else "npt", self.config.levels, ad_bits=True,
                          exec_only=True, mbec=False, maxphyaddr=HOST_MAXPHYADDR, huge_1g=True,
                          host_nx=True, host_smep=False)

    def new_vcpu(self):
        return VCPUState(self)

    def clone(self):
        """A deep copy: slots with their lpage_info, attributes, page tables, counters.
        Copies numpy storage; no Python object per page or per table entry."""
        cdef VMState c = VMState.__new__(VMState)
        cdef Slot s
        cdef int as_id
        c.config = self.config
        c.ept, c.tdx, c.sw_protected, c.snp = self.ept, self.tdx, self.sw_protected, self.snp
        c.direct_bits_gfn, c.max_gfn = self.direct_bits_gfn, self.max_gfn
        c.has_private_mem, c.supported_attributes = self.has_private_mem, self.supported_attributes
        c.nr_as_ids = self.nr_as_ids
        c.gen[0], c.gen[1] = self.gen[0], self.gen[1]
        c._slots = [{slot_id: (<Slot>s).clone() for slot_id, s in slots.items()}
                    for slots in self._slots]
        c._sorted = [[] for _ in range(self.nr_as_ids)]
        c._bases = [[] for _ in range(self.nr_as_ids)]
        for as_id in range(self.nr_as_ids):
            c._reindex(as_id)
        c._set_attr_arrays(self._attr_start_arr.copy(), self._attr_end_arr.copy(),
                           self._attr_value_arr.copy())
        c.mmu_invalidate_seq = self.mmu_invalidate_seq
        c.mmu_invalidate_in_progress = self.mmu_invalidate_in_progress
        c.mmu_invalidate_range_start = self.mmu_invalidate_range_start
        c.mmu_invalidate_range_end = self.mmu_invalidate_range_end
        c.mmu = self.mmu.clone()
        return c

    def clone_vcpus(self, vcpus):
        cdef VCPUState v
        return [v.clone(self) for v in vcpus]

    cdef inline uint64_t c_gmem_pfn(self, const slot_c* s, uint64_t gfn) noexcept nogil:
        """The guest_memfd frame backing gfn (kvm_gmem_get_pfn; see GMEM_PFN_BASE)."""
        cdef uint64_t page = s.gmem_pgoff + (gfn - s.base_gfn)
        return GMEM_PFN_BASE + (<uint64_t>s.gmem_id * GMEM_FILE_PAGES + page) % GMEM_PFN_BASE

    def gmem_pfn(self, Slot slot, uint64_t gfn):
        cdef slot_c rec
        slot.record(&rec)
        return self.c_gmem_pfn(&rec, gfn)

    def __dealloc__(self):
        free(self.cslots)
        free(self.cbases)

    @property
    def generation(self):
        return [self.gen[i] for i in range(self.nr_as_ids)]

    # --- memslots -------------------------------------------------------------------------

    cdef void _reindex(self, int as_id) except *:
        cdef Slot s
        cdef Py_ssize_t i, n
        cdef slot_c* records
        cdef uint64_t* bases
        ordered = sorted(self._slots[as_id].values(), key=lambda s: s.base_gfn)
        self._sorted[as_id] = ordered
        self._bases[as_id] = [s.base_gfn for s in ordered]
        if as_id != 0:
            return
        n = len(ordered)
        records = <slot_c*>malloc(max(n, 1) * sizeof(slot_c))
        bases = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        if records == NULL or bases == NULL:
            free(records)
            free(bases)
            raise MemoryError()
        for i in range(n):
            s = ordered[i]
            s.record(&records[i])
            bases[i] = s.base_gfn
        free(self.cslots)
        free(self.cbases)
        self.cslots = records
        self.cbases = bases
        self.ncslots = n

    cdef Py_ssize_t slot_index(self, uint64_t gfn) noexcept nogil:
        """Index in cslots of the address-space-0 slot containing gfn, or -1.

        A branch-free binary search over the contiguous base gfns: lookups in a
        batch are random, and a mispredicted branch per step would dominate.
        """
        cdef Py_ssize_t lo = 0, n = self.ncslots, half
        if n == 0:
            return -1
        while n > 1:
            half = n >> 1
            lo = lo + half if self.cbases[lo + half] <= gfn else lo
            n -= half
        if self.cbases[lo] <= gfn and gfn - self.cbases[lo] < self.cslots[lo].npages:
            return lo
        return -1

    def find_slot(self, int as_id, uint64_t gfn):
        """The memslot containing ``gfn`` (a binary search, as __gfn_to_memslot)."""
        cdef Py_ssize_t i
        cdef Slot s
        if as_id == 0:
            i = self.slot_index(gfn)
            return None if i < 0 else self._sorted[0][i]
        i = bisect_right(self._bases[as_id], gfn) - 1
        if i >= 0:
            s = self._sorted[as_id][i]
            if gfn - s.base_gfn < s.npages:
                return s
        return None

    def find_slots(self, const uint64_t[::1] gfns):
        """Slot ids of address space 0 for an array of gfns, -1 where there is none."""
        cdef Py_ssize_t i, k, n = gfns.shape[0]
        out = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] ids = out
        with nogil:
            for i in range(n):
                k = self.slot_index(gfns[i])
                ids[i] = -1 if k < 0 else <int32_t>self.cslots[k].id
        return out

    def slot_by_id(self, int as_id, int slot_id):
        return self._slots[as_id].get(slot_id)

    def slots(self, int as_id):
        return list(self._sorted[as_id])

    def lpage_info(self, int as_id, int slot_id, int level):
        cdef Slot s = self._slots[as_id][slot_id]
        return list(s.lpage(level))

    def _slots_in_range(self, int as_id, uint64_t start, uint64_t end):
        """Slots intersecting [start, end), in gfn order (kvm_for_each_memslot_in_gfn_range)."""
        cdef Slot s
        cdef Py_ssize_t i = max(bisect_right(self._bases[as_id], start) - 1, 0)
        found = []
        for s in self._sorted[as_id][i:]:
            if s.base_gfn >= end:
                break
            if s.base_gfn + s.npages > start:
                found.append(s)
        return found

    def overlaps(self, int as_id, int slot_id, uint64_t start, uint64_t end):
        """kvm_check_memslot_overlap: another slot of the address space intersects."""
        cdef Slot s
        for s in self._slots_in_range(as_id, start, end):
            if s.id != slot_id:
                return True
        return False

    def swap_active_memslots(self, int as_id):
        """kvm_swap_active_memslots: the generation advances by the number of address spaces.

        kvm_mmu_invalidate_mmio_sptes: when the MMIO generation wraps to 0, every SPTE
        goes (kvm_mmu_zap_all_fast) so that no stale MMIO SPTE can match again.
        """
        self.gen[as_id] += self.nr_as_ids
        if not (self.gen[as_id] & MMIO_SPTE_GEN_MASK & ~(<uint64_t>self.nr_as_ids - 1)):
            self.mmu.zap_all()

    def create_slot(self, int as_id, int slot_id, uint64_t base_gfn, uint64_t npages,
                    uint32_t flags, uint64_t userspace_addr, int gmem_id, uint64_t gmem_pgoff,
                    int host_level):
        """KVM_MR_CREATE: metadata (kvm_alloc_memslot_metadata), install, one swap."""
        cdef Slot s = Slot.__new__(Slot)
        s.as_id, s.id, s.base_gfn, s.npages, s.flags = as_id, slot_id, base_gfn, npages, flags
        s.userspace_addr, s.gmem_id, s.gmem_pgoff = userspace_addr, gmem_id, gmem_pgoff
        s.host_level = host_level
        self._alloc_metadata(s)
        self._slots[as_id][slot_id] = s
        self._reindex(as_id)
        self.swap_active_memslots(as_id)

    def invalidate_slot(self, int as_id, int slot_id):
        """kvm_invalidate_memslot (DELETE / MOVE): swap in the INVALID copy, zap the slot."""
        self.swap_active_memslots(as_id)
        self.zap_memslot(self._slots[as_id][slot_id])

    def reactivate_slot(self, int as_id, int slot_id):
        """A DELETE / MOVE whose prepare step failed: the old slot is swapped back in."""
        self.swap_active_memslots(as_id)

    def delete_slot(self, int as_id, int slot_id):
        """KVM_MR_DELETE after kvm_invalidate_memslot."""
        del self._slots[as_id][slot_id]
        self._reindex(as_id)
        self.swap_active_memslots(as_id)

    def move_slot(self, int as_id, int slot_id, uint64_t base_gfn, uint32_t flags):
        """KVM_MR_MOVE after kvm_invalidate_memslot: new metadata at the new base."""
        cdef Slot s = self._slots[as_id][slot_id]
        s.base_gfn, s.flags = base_gfn, flags
        self._alloc_metadata(s)
        self._reindex(as_id)
        self.swap_active_memslots(as_id)

    def set_slot_flags(self, int as_id, int slot_id, uint32_t flags):
        """KVM_MR_FLAGS_ONLY: the metadata is kept (memcpy of slot->arch); one swap."""
        cdef Slot s = self._slots[as_id][slot_id]
        s.flags = flags
        self._reindex(as_id)
        self.swap_active_memslots(as_id)
        self.zap_memslot(s)

    def zap_memslot(self, Slot slot):
        """kvm_mmu_zap_memslot: unmap the slot's gfns in every root (both filters)."""
        return self.unmap_gfn_range(slot, slot.base_gfn, slot.base_gfn + slot.npages,
                                    private=True, shared=True)

    def unmap_gfn_range(self, Slot slot, uint64_t start, uint64_t end, *, bint private,
                        bint shared):
        """kvm_unmap_gfn_range: remove the leaf mappings of [start, end) in the roots of the
        slot's address space that the attribute filter selects (TDX: private -> mirror
        root, shared -> direct root; every other VM: the one direct root).  SMM's address
        space has no roots here: no vCPU runs in SMM.  Returns whether to flush TLBs."""
        if slot.as_id != 0:
            return False
        return self.mmu.unmap_range(start, end, private, shared) != 0

    cdef void _alloc_metadata(self, Slot s) except *:
        """kvm_alloc_memslot_metadata (x86.c): lpage_info with edge and congruence rules."""
        cdef int level
        cdef uint64_t mask, lpages
        cdef uint64_t ugfn = s.userspace_addr >> PAGE_SHIFT
        cdef uint32_t[::1] linfo
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            mask = pages_per_hpage(level) - 1
            lpages = gfn_to_index(s.base_gfn + s.npages - 1, s.base_gfn, level) + 1
            linfo = np.zeros(lpages, dtype=np.uint32)
            if s.base_gfn & mask:
                linfo[0] = 1
            if (s.base_gfn + s.npages) & mask:
                linfo[lpages - 1] = 1
            if (s.base_gfn ^ ugfn) & mask:
                linfo[:] = 1
            if level == PG_LEVEL_2M:
                s.lpage_2m = linfo
            else:
                s.lpage_1g = linfo
        if self.has_private_mem:
            self._init_memslot_memory_attributes(s)

    # --- mixed hugepage tracking (mmu.c) ----------------------------------------------------

    cdef inline bint _test_mixed(self, Slot s, uint64_t gfn, int level) noexcept:
        return (s.lpage(level)[gfn_to_index(gfn, s.base_gfn, level)] & KVM_LPAGE_MIXED_FLAG) != 0

    cdef inline void _set_mixed(self, Slot s, uint64_t gfn, int level, bint mixed) noexcept:
        cdef uint32_t[::1] linfo = s.lpage(level)
        cdef uint64_t i = gfn_to_index(gfn, s.base_gfn, level)
        if mixed:
            linfo[i] |= <uint32_t>KVM_LPAGE_MIXED_FLAG
        else:
            linfo[i] &= ~(<uint32_t>KVM_LPAGE_MIXED_FLAG)

    cdef bint _hugepage_has_attrs(self, Slot s, uint64_t gfn, int level, uint64_t attrs) noexcept:
        """hugepage_has_attrs: 2M reads the attributes, 1G reads the 2M mixed flags."""
        cdef uint64_t n = pages_per_hpage(level), step, g
        if level == PG_LEVEL_2M:
            return self.range_has(gfn, gfn + n, ~(<uint64_t>0), attrs)
        step = pages_per_hpage(level - 1)
        g = gfn
        while g < gfn + n:
            if self._test_mixed(s, g, level - 1) or self.attributes(g) != attrs:
                return False
            g += step
        return True

    cdef void _init_memslot_memory_attributes(self, Slot s) noexcept:
        """kvm_mmu_init_memslot_memory_attributes, for every hugepage fully inside the slot.

        A hugepage has uniform attributes (hugepage_has_attrs at 2M, and at 1G given
        exact 2M flags) exactly when no attribute change point lies strictly inside
        it, so only the pages around change points are visited.
        """
        cdef int level
        cdef uint64_t n, first, last, gfn, point
        cdef uint64_t end = s.base_gfn + s.npages
        cdef Py_ssize_t k = self._attr_search(s.base_gfn), j
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            n = pages_per_hpage(level)
            first = gfn_round_for_level(s.base_gfn, level)
            if first < s.base_gfn:
                first += n
            last = gfn_round_for_level(end, level)
            for j in range(max(k, 0), self.nattr):
                if self.attr_start[j] >= end:
                    break
                for point in (self.attr_start[j], self.attr_end[j]):
                    if s.base_gfn < point < end:
                        gfn = gfn_round_for_level(point, level)
                        if gfn != point and first <= gfn < last:
                            self._set_mixed(s, gfn, level, True)

    cdef void _pre_set(self, Slot s, uint64_t start, uint64_t end, uint64_t attrs) except *:
        """kvm_pre_set_memory_attributes + kvm_arch_pre_set_memory_attributes (clipped range)."""
        cdef int level
        cdef uint64_t n, head, tail, slot_end = s.base_gfn + s.npages
        self.range_add(start, end)
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            n = pages_per_hpage(level)
            head = gfn_round_for_level(start, level)
            tail = gfn_round_for_level(end - 1, level)
            if ((head != start or head + n > end) and head >= s.base_gfn
                    and head + n <= slot_end and not self._test_mixed(s, head, level)):
                self.range_add(head, head + n)
            if tail == head:
                continue
            if tail + n > end and tail + n <= slot_end and not self._test_mixed(s, tail, level):
                self.range_add(tail, tail + n)
        # The filter names the *old* state: making memory private unmaps shared mappings.
        to_private = (attrs & MEMATTR_PRIVATE) != 0
        self.unmap_gfn_range(s, start, end, private=not to_private, shared=to_private)

    cdef void _post_set(self, Slot s, uint64_t start, uint64_t end, uint64_t attrs) noexcept:
        """kvm_arch_post_set_memory_attributes: 2M first, 1G reads the 2M results."""
        cdef int level
        cdef uint64_t n, gfn, i, i_end, slot_end = s.base_gfn + s.npages
        cdef uint32_t[::1] linfo
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            n = pages_per_hpage(level)
            linfo = s.lpage(level)
            gfn = gfn_round_for_level(start, level)
            if gfn != start or gfn + n > end:        # the head page straddles the range
                if gfn >= s.base_gfn and gfn + n <= slot_end:
                    self._set_mixed(s, gfn, level, not self._hugepage_has_attrs(s, gfn, level, attrs))
                gfn += n
            if gfn + n <= end:                       # pages entirely covered: not mixed
                i = gfn_to_index(gfn, s.base_gfn, level)
                i_end = i + (end - gfn) // n
                gfn += (i_end - i) * n
                with nogil:
                    while i < i_end:
                        linfo[i] &= ~(<uint32_t>KVM_LPAGE_MIXED_FLAG)
                        i += 1
            if gfn < end and gfn + n <= slot_end:    # the tail page straddles the range
                self._set_mixed(s, gfn, level, not self._hugepage_has_attrs(s, gfn, level, attrs))

    # --- memory attributes (kvm_main.c) ----------------------------------------------------------

    cdef void _set_attr_arrays(self, starts, ends, values) except *:
        self._attr_start_arr, self._attr_end_arr, self._attr_value_arr = starts, ends, values
        self.attr_start, self.attr_end, self.attr_value = starts, ends, values
        self.nattr = len(starts)

    cdef inline Py_ssize_t _attr_search(self, uint64_t gfn) noexcept nogil:
        """Index of the last range starting at or below gfn, or -1."""
        cdef Py_ssize_t lo = 0, hi = self.nattr, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.attr_start[mid] <= gfn:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    cdef uint64_t attributes(self, uint64_t gfn) noexcept nogil:
        """kvm_get_memory_attributes."""
        cdef Py_ssize_t i = self._attr_search(gfn)
        if i >= 0 and gfn < self.attr_end[i]:
            return self.attr_value[i]
        return 0

    cdef bint range_has(self, uint64_t start, uint64_t end, uint64_t mask,
                        uint64_t attrs) noexcept nogil:
        """kvm_range_has_memory_attributes."""
        cdef Py_ssize_t i, k
        cdef uint64_t gfn
        mask &= self.supported_attributes
        if attrs & ~mask:
            return False
        if end == start + 1:
            return (self.attributes(start) & mask) == attrs
        i = self._attr_search(start)
        if i < 0:
            i = 0
        if not attrs:
            for k in range(i, min(i + 2, self.nattr)):
                if self.attr_start[k] < end and self.attr_end[k] > start:
                    return False
            return True
        gfn = start
        for k in range(i, self.nattr):
            if self.attr_end[k] <= gfn:
                continue
            if self.attr_start[k] > gfn or (self.attr_value[k] & mask) != attrs:
                return False
            gfn = self.attr_end[k]
            if gfn >= end:
                return True
        return False

    def get_attributes(self, uint64_t gfn):
        return self.attributes(gfn)

    def is_private(self, uint64_t gfn):
        """kvm_mem_is_private."""
        return (self.attributes(gfn) & MEMATTR_PRIVATE) != 0

    def range_has_attributes(self, uint64_t start, uint64_t end, mask, uint64_t attrs):
        return self.range_has(start, end, <uint64_t>(mask & _args.U64_MAX), attrs)

    def attribute_ranges(self):
        return [(int(self.attr_start[i]), int(self.attr_end[i]), int(self.attr_value[i]))
                for i in range(self.nattr)]

    cdef void _store(self, uint64_t start, uint64_t end, uint64_t attrs) except *:
        """xa_store over [start, end) (attribute 0 erases), keeping ranges merged."""
        cdef Py_ssize_t n = self.nattr
        starts = self._attr_start_arr[:n]
        ends = self._attr_end_arr[:n]
        values = self._attr_value_arr[:n]
        # Ranges left of / right of [start, end) survive whole; the two straddling it are cut.
        lo = int(np.searchsorted(ends, start, side="right"))
        hi = int(np.searchsorted(starts, end, side="left"))
        pieces_s, pieces_e, pieces_v = [], [], []
        if lo < hi and starts[lo] < start:
            pieces_s.append(int(starts[lo])); pieces_e.append(start); pieces_v.append(int(values[lo]))
        if attrs:
            pieces_s.append(start); pieces_e.append(end); pieces_v.append(attrs)
        if lo < hi and ends[hi - 1] > end:
            pieces_s.append(end); pieces_e.append(int(ends[hi - 1])); pieces_v.append(int(values[hi - 1]))
        new_s = np.concatenate([starts[:lo], np.array(pieces_s, np.uint64), starts[hi:]])
        new_e = np.concatenate([ends[:lo], np.array(pieces_e, np.uint64), ends[hi:]])
        new_v = np.concatenate([values[:lo], np.array(pieces_v, np.uint64), values[hi:]])
        # Merge neighbours that touch and carry the same value.
        if len(new_s) > 1:
            last = len(new_s) - 1
            joins = (new_e[:last] == new_s[1:]) & (new_v[:last] == new_v[1:])
            if joins.any():
                first_of_run = np.concatenate([[True], ~joins])
                last_of_run = np.concatenate([~joins, [True]])
                new_s, new_e, new_v = new_s[first_of_run], new_e[last_of_run], new_v[first_of_run]
        self._set_attr_arrays(np.ascontiguousarray(new_s, np.uint64),
                              np.ascontiguousarray(new_e, np.uint64),
                              np.ascontiguousarray(new_v, np.uint64))

    def set_memory_attributes(self, uint64_t start, uint64_t end, uint64_t attrs):
        """kvm_vm_set_mem_attributes for a validated gfn range [start, end)."""
        cdef Slot s
        if self.range_has(start, end, ~(<uint64_t>0), attrs):
            return
        touched = [(s, max(start, s.base_gfn), min(end, s.base_gfn + s.npages))
                   for as_id in range(self.nr_as_ids)
                   for s in self._slots_in_range(as_id, start, end)]
        if touched:
            self.invalidate_begin()
            for s, lo, hi in touched:
                self._pre_set(s, lo, hi, attrs)
        self._store(start, end, attrs)
        if touched:
            self.invalidate_end()
            for s, lo, hi in touched:
                self._post_set(s, lo, hi, attrs)

    # --- the invalidation protocol (include/linux/kvm_host.h, kvm_main.c) ------------------------

    def invalidate_begin(self):
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range_start = INVALID_GPA
            self.mmu_invalidate_range_end = INVALID_GPA

    cdef void range_add(self, uint64_t start, uint64_t end) noexcept:
        """kvm_mmu_invalidate_range_add."""
        if self.mmu_invalidate_range_start == INVALID_GPA:
            self.mmu_invalidate_range_start, self.mmu_invalidate_range_end = start, end
        else:
            self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
            self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)

    def invalidate_range_add(self, uint64_t start, uint64_t end):
        self.range_add(start, end)

    def invalidate_end(self):
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1

    cdef bint retry_gfn(self, uint64_t mmu_seq, uint64_t gfn) noexcept nogil:
        """mmu_invalidate_retry_gfn: must a fault that snapshotted ``mmu_seq`` retry?"""
        if self.mmu_invalidate_in_progress:
            if self.mmu_invalidate_range_start == INVALID_GPA:
                return True
            if self.mmu_invalidate_range_start <= gfn < self.mmu_invalidate_range_end:
                return True
        return self.mmu_invalidate_seq != mmu_seq

    def invalidate_retry_gfn(self, uint64_t mmu_seq, uint64_t gfn):
        return self.retry_gfn(mmu_seq, gfn)


class VM(_vm.VM):
    __doc__ = _vm.VM.__doc__
    _State = VMState
