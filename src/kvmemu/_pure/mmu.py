"""The TDP MMU: SPTE formats, mapping a fault, zapping ranges.

The twin of ``_mmu.pxi``.  Models, from Linux 6.18: the SPTE masks
(``kvm_mmu_set_ept_masks``, ``kvm_mmu_reset_all_pte_masks``, spte.c), ``make_spte``,
``make_nonleaf_spte``, ``make_small_spte``, ``make_mmio_spte``, the predicates of
spte.h, ``kvm_mmu_hugepage_adjust`` / ``kvm_mmu_max_mapping_level`` /
``disallowed_hugepage_adjust`` (mmu.c), ``kvm_tdp_mmu_map`` and
``tdp_mmu_map_handle_target_level`` (tdp_mmu.c), ``tdp_mmu_zap_leafs`` and the
fast-path SPTE lookup.

KVM's tables live in the VM's ``PageTables`` (``vm.page_tables``; TDX's mirror of
the Secure EPT in ``vm.private_page_tables``), so the hardware walk reads exactly
the SPTEs KVM wrote.

With ``tracer`` set (a ``kvmemu._trace.Tracer``), the MMU emits
``kvm_mmu_spte_requested``, ``kvm_tdp_mmu_spte_changed`` and ``kvm_mmu_set_spte``
where the kernel does.  Like the kernel, it does not trace the entries of a new
table that splits a huge leaf (tdp_mmu_split_huge_page fills them directly) nor
the fast path's fix; unlike it, it does not trace the zapping of the entries of
a removed table (handle_removed_pt).
"""

from __future__ import annotations

from typing import Any

from ..constants import (ACC_ALL, ACC_EXEC, ACC_WRITE, EPT_MEMTYPE_SHIFT,
                         EPT_MISCONFIG_WX_VALUE, EPT_MMIO_MASK, KVM_PFN_NOSLOT, MMIO_SPTE_GEN_HIGH_START,
                         MMIO_SPTE_GEN_LOW_BITS, MMIO_SPTE_GEN_LOW_START, MMIO_SPTE_GEN_MASK,
                         NPT_MMIO_ACCESS_MASK, NPT_MMIO_VALUE, PAGE_SHIFT, PG_LEVEL_1G,
                         PG_LEVEL_4K, PT_ENTRIES, PT_LEVEL_BITS, SHADOW_NONPRESENT_VALUE, SPTE,
                         EPTE, MemFlag, MemType, PTE, RetPF)
from .levels import pages_per_hpage
from .paging import PageTables

_LARGE = PTE.LARGE.value                   # PT_PAGE_SIZE_MASK, the same bit in EPT
_WRITABLE = PTE.WRITABLE.value             # PT_WRITABLE_MASK == VMX_EPT_WRITABLE_MASK
_PRESENT_BIT = PTE.PRESENT.value           # PT_PRESENT_MASK (the R bit for EPT)
_MMU_PRESENT = SPTE.MMU_PRESENT.value
_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)   # SPTE_BASE_ADDR_MASK
_LOG_DIRTY = MemFlag.LOG_DIRTY_PAGES.value
_GEN_LOW_MASK = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
_GEN_HIGH_MASK = (MMIO_SPTE_GEN_MASK >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_START
_SPTE_BYTES = 8
_RETRY, _FIXED, _SPURIOUS, _EMULATE = (RetPF.RETRY.value, RetPF.FIXED.value,
                                       RetPF.SPURIOUS.value, RetPF.EMULATE.value)


class SpteFormat:
    """The per-vendor SPTE masks.

    EPT (kvm_mmu_set_ept_masks with A/D bits and execute-only support): present =
    SUPPRESS_VE, user = R, X for exec, A/D bits 8/9, host/MMU-writable bits 57/58,
    memtype WB with IPAT (WB without IPAT for TDX, whose IGNORE_GUEST_PAT quirk is
    off), MMIO value W|X (0 for TDX) under mask RWX|SVE.  NPT
    (kvm_mmu_reset_all_pte_masks): present = P, user = U, NX for no exec, A/D bits
    5/6, host/MMU-writable bits 9/10, no memtype, MMIO value = mask = BIT(51)|P with
    access bits W|U.
    """

    def __init__(self, ept: bool, tdx: bool) -> None:
        self.ept = ept
        if ept:
            self.present = EPTE.SUPPRESS_VE.value
            self.user = EPTE.READ.value
            self.x, self.nx = EPTE.EXEC.value, 0
            self.accessed, self.dirty = EPTE.ACCESSED.value, EPTE.DIRTY.value
            self.host_writable = SPTE.EPT_HOST_WRITABLE.value
            self.mmu_writable = SPTE.EPT_MMU_WRITABLE.value
            self.memtype = MemType.WB.value << EPT_MEMTYPE_SHIFT
            if not tdx:
                self.memtype |= EPTE.IPAT.value
            self.mmio_value = 0 if tdx else EPT_MISCONFIG_WX_VALUE
            self.mmio_mask, self.mmio_access_mask = EPT_MMIO_MASK, 0
        else:
            self.present = PTE.PRESENT.value
            self.user = PTE.USER.value
            self.x, self.nx = 0, PTE.NX.value
            self.accessed, self.dirty = PTE.ACCESSED.value, PTE.DIRTY.value
            self.host_writable = SPTE.HOST_WRITABLE.value
            self.mmu_writable = SPTE.MMU_WRITABLE.value
            self.memtype = 0
            self.mmio_value = self.mmio_mask = NPT_MMIO_VALUE
            self.mmio_access_mask = NPT_MMIO_ACCESS_MASK

    def make_spte(self, level: int, pfn: int, host_writable: bool, nx_huge_pages: bool) -> int:
        """make_spte for a TDP fault: ACC_ALL, not a prefetch, never write-protected."""
        spte = _MMU_PRESENT | self.present | self.accessed
        access = ACC_ALL
        if level > PG_LEVEL_4K and nx_huge_pages:      # huge leaves are never executable
            access &= ~ACC_EXEC
        spte |= self.x if access & ACC_EXEC else self.nx
        spte |= self.user                              # ACC_USER
        if level > PG_LEVEL_4K:
            spte |= _LARGE
        spte |= self.memtype
        if host_writable:
            spte |= self.host_writable
        else:
            access &= ~ACC_WRITE
        spte |= pfn << PAGE_SHIFT
        if access & ACC_WRITE:                         # D is set together with W
            spte |= _WRITABLE | self.mmu_writable | self.dirty
        return spte

    def make_nonleaf_spte(self, child_hpa: int) -> int:
        """make_nonleaf_spte: full access; A set (A/D enabled)."""
        return (_MMU_PRESENT | child_hpa | self.present | _WRITABLE | self.user | self.x
                | self.accessed)

    def make_small_spte(self, huge_spte: int, child_level: int, index: int,
                        nx_huge_pages: bool) -> int:
        """make_small_spte: entry ``index`` of the table that replaces a huge leaf."""
        spte = huge_spte | ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
        if child_level == PG_LEVEL_4K:
            spte &= ~_LARGE
            if nx_huge_pages:                          # make_spte_executable
                spte = (spte & ~self.nx) | self.x
        return spte

    def make_mmio_spte(self, gfn: int, generation: int) -> int:
        """make_mmio_spte(gfn, ACC_ALL): generation bits, the MMIO value, the GPA."""
        gen = generation & MMIO_SPTE_GEN_MASK
        spte = ((gen << MMIO_SPTE_GEN_LOW_START) & _GEN_LOW_MASK) | (
            (gen << _GEN_HIGH_SHIFT) & _GEN_HIGH_MASK)
        return spte | self.mmio_value | (ACC_ALL & self.mmio_access_mask) | (gfn << PAGE_SHIFT)

    def is_mmio_spte(self, spte: int) -> bool:
        return (spte & self.mmio_mask) == self.mmio_value

    def executable(self, spte: int) -> bool:
        return (spte & (self.x | self.nx)) == self.x

    def access_allowed(self, exec_: bool, write: bool, spte: int) -> bool:
        """is_access_allowed."""
        if exec_:
            return self.executable(spte)
        if write:
            return bool(spte & _WRITABLE)
        return bool(spte & _PRESENT_BIT)


def is_shadow_present(spte: int) -> bool:
    return bool(spte & _MMU_PRESENT)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or bool(spte & _LARGE)


def spte_to_pfn(spte: int) -> int:
    return (spte & _BASE_ADDR_MASK) >> PAGE_SHIFT


def mmio_spte_generation(spte: int) -> int:
    return ((spte & _GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START) | (
        (spte & _GEN_HIGH_MASK) >> _GEN_HIGH_SHIFT)


def spte_index(gfn: int, level: int) -> int:
    """SPTE_INDEX(gfn << 12, level)."""
    return (gfn >> (PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)


class Root:
    """One TDP root: its PageTables plus KVM's per-table bookkeeping."""

    def __init__(self, tables: PageTables, gfn_bits: int) -> None:
        self.pt = tables
        self.gfn_bits = gfn_bits                        # kvm_gfn_root_bits
        self.nx_huge_page_disallowed: dict[int, bool] = {}
        tables._kvm_fill(0, SHADOW_NONPRESENT_VALUE)

    def child(self, spte: int) -> int:
        """The table a present non-leaf SPTE points to (spte_to_child_sp)."""
        return self.pt._kvm_table_at(spte & _BASE_ADDR_MASK)


class TdpMmu:
    """The VM's TDP MMU: its roots and what changes their SPTEs."""

    def __init__(self, fmt: SpteFormat, levels: int, tdx: bool, direct_bits_gfn: int,
                 nx_huge_pages: bool, make_tables: Any) -> None:
        self.fmt = fmt
        self.levels = levels
        self.nx_huge_pages = nx_huge_pages
        self.direct = Root(make_tables(), direct_bits_gfn)
        self.mirror = Root(make_tables(), 0) if tdx else None
        #: kvm->stat.pages[level]: present leaf SPTEs per level (4K, 2M, 1G).
        self.pages = [0, 0, 0, 0]
        #: The VM's Tracer, or None when tracing is off.
        self.tracer: Any = None

    def set_tracer(self, tracer: Any) -> None:
        self.tracer = tracer

    # --- changing SPTEs (handle_changed_spte) ---------------------------------------------

    def _set_spte(self, root: Root, table: int, index: int, level: int, new: int,
                  gfn: int) -> None:
        """tdp_mmu_set_spte: write, then handle_changed_spte (traced, with iter->gfn)."""
        if self.tracer is not None:
            old = root.pt._kvm_get(table, index)
            if old != new:
                self.tracer.spte_changed(0, gfn, level, old, new)
        self._write_spte(root, table, index, level, new)

    def _write_spte(self, root: Root, table: int, index: int, level: int, new: int) -> None:
        """Store an SPTE and do handle_changed_spte's bookkeeping, untraced."""
        pt = root.pt
        old = pt._kvm_get(table, index)
        pt._kvm_set(table, index, new)
        if is_shadow_present(old) and is_last_spte(old, level):
            self.pages[level] -= 1
        if is_shadow_present(new) and is_last_spte(new, level):
            self.pages[level] += 1
        if is_shadow_present(old) and not is_last_spte(old, level):
            self._remove_table(root, root.child(old), level - 1)

    def _remove_table(self, root: Root, table: int, level: int) -> None:
        """handle_removed_pt: zap every entry of an unlinked table, free it."""
        for index in range(PT_ENTRIES):
            if is_shadow_present(root.pt._kvm_get(table, index)):
                self._write_spte(root, table, index, level, SHADOW_NONPRESENT_VALUE)
        root.nx_huge_page_disallowed.pop(table, None)
        root.pt._kvm_free(table)

    # --- mapping a fault (kvm_tdp_mmu_map) -------------------------------------------------

    def root_for(self, addr: int, direct_bits_gpa: int) -> Root:
        """tdp_mmu_get_root_for_fault: the mirror root for a TDX private GPA."""
        if self.mirror is not None and not addr & direct_bits_gpa:
            return self.mirror
        return self.direct

    def hugepage_adjust(self, fault: Any) -> None:
        """kvm_mmu_hugepage_adjust (with kvm_mmu_max_mapping_level, 6.18 form)."""
        fault.huge_page_disallowed = fault.exec and self.nx_huge_pages
        if fault.max_level == PG_LEVEL_4K or fault.slot is None:
            return
        slot = fault.slot
        if slot.flags & _LOG_DIRTY:
            return
        level = min(fault.max_level, PG_LEVEL_1G)      # max_huge_page_level
        while level > PG_LEVEL_4K and slot.lpage_entry(fault.gfn, level):
            level -= 1
        if level > PG_LEVEL_4K:
            # Private and gmem-only faults reach here only with a guest_memfd order above
            # 0, which mainline never reports; shared memory is capped by the host level.
            level = min(slot.host_level, level)
        fault.req_level = level
        if level == PG_LEVEL_4K or fault.huge_page_disallowed:
            return
        fault.goal_level = level
        mask = pages_per_hpage(level) - 1
        assert fault.gfn & mask == fault.pfn & mask, "gfn and pfn not congruent"
        fault.pfn &= ~mask

    def map(self, fault: Any, root: Root, mmio_generation: int, stats: dict[str, int]) -> int:
        """kvm_tdp_mmu_map: walk down from the root, link or split on the way, map."""
        self.hugepage_adjust(fault)
        pt, gfn = root.pt, fault.gfn
        indexed = gfn | root.gfn_bits
        if self.tracer is not None:
            pfn = fault.pfn if fault.slot is not None else KVM_PFN_NOSLOT
            self.tracer.spte_requested(
                gfn, pfn | (gfn & (pages_per_hpage(fault.goal_level) - 1)), fault.goal_level)
        table, level = 0, self.levels
        while True:
            index = spte_index(indexed, level)
            old = pt._kvm_get(table, index)
            if self.nx_huge_pages:
                self._disallowed_hugepage_adjust(fault, root, old, level)
            if level == fault.goal_level:
                return self._map_target_level(fault, root, table, index, level, old,
                                              mmio_generation, stats,
                                              indexed & ~(pages_per_hpage(level) - 1))
            if is_shadow_present(old) and not old & _LARGE:
                table, level = root.child(old), level - 1
                continue
            child = pt._kvm_alloc(SHADOW_NONPRESENT_VALUE)
            root.nx_huge_page_disallowed[child] = fault.huge_page_disallowed
            if is_shadow_present(old):                  # a huge leaf in the way: split it
                for i in range(PT_ENTRIES):
                    small = self.fmt.make_small_spte(old, level - 1, i, self.nx_huge_pages)
                    self._write_spte(root, child, i, level - 1, small)
            # Replacing a huge leaf by a table: the leaf count moves to the children.
            self._set_spte(root, table, index, level,
                           self.fmt.make_nonleaf_spte(pt._kvm_hpa(child)),
                           indexed & ~(pages_per_hpage(level) - 1))
            table, level = child, level - 1

    def _disallowed_hugepage_adjust(self, fault: Any, root: Root, spte: int, level: int) -> None:
        if (level > PG_LEVEL_4K and level == fault.goal_level and is_shadow_present(spte)
                and not spte & _LARGE and root.nx_huge_page_disallowed.get(root.child(spte))):
            fault.pfn |= fault.gfn & (pages_per_hpage(level) - pages_per_hpage(level - 1))
            fault.goal_level -= 1

    def _map_target_level(self, fault: Any, root: Root, table: int, index: int, level: int,
                          old: int, mmio_generation: int, stats: dict[str, int],
                          iter_gfn: int) -> int:
        """tdp_mmu_map_handle_target_level (``iter_gfn``: iter->gfn, with the root's
        gfn bits)."""
        fmt = self.fmt
        if (is_shadow_present(old) and fault.access_allowed(fmt, old)
                and is_last_spte(old, level)):
            return _SPURIOUS
        gfn = fault.gfn & ~(pages_per_hpage(level) - 1)  # iter->gfn
        if fault.slot is None:
            new = fmt.make_mmio_spte(gfn, mmio_generation)
        else:
            new = fmt.make_spte(level, fault.pfn, fault.map_writable, self.nx_huge_pages)
        ret = _FIXED
        if new == old:
            ret = _SPURIOUS
        else:
            self._set_spte(root, table, index, level, new, iter_gfn)
        if fmt.is_mmio_spte(new):
            stats["pf_mmio_spte_created"] += 1
            ret = _EMULATE              # (the kernel traces mark_mmio_spte here: not modelled)
        elif self.tracer is not None:
            self.tracer.set_spte(level, iter_gfn, new,
                                 root.pt._kvm_hpa(table) + index * _SPTE_BYTES)
        return ret

    # --- lockless lookups -----------------------------------------------------------------------

    def last_spte(self, root: Root, gfn: int) -> tuple[int, int, int, int]:
        """The deepest SPTE on gfn's path (kvm_tdp_mmu_fast_pf_get_last_sptep /
        kvm_tdp_mmu_get_walk): ``(table, index, level, spte)``."""
        indexed = gfn | root.gfn_bits
        table, level = 0, self.levels
        while True:
            index = spte_index(indexed, level)
            spte = root.pt._kvm_get(table, index)
            if level == PG_LEVEL_4K or not is_shadow_present(spte) or spte & _LARGE:
                return table, index, level, spte
            table, level = root.child(spte), level - 1

    def fast_fix(self, root: Root, table: int, index: int, new: int) -> None:
        """fast_pf_fix_direct_spte: the lockless cmpxchg of the fast path."""
        root.pt._kvm_set(table, index, new)

    # --- zapping (kvm_unmap_gfn_range → tdp_mmu_zap_leafs) ----------------------------------

    def zap_leafs(self, root: Root, start: int, end: int) -> bool:
        """Zap the present leaf SPTEs mapping any gfn of [start, end); tables stay."""
        return self._zap(root, 0, self.levels, 0, start, end)

    def _zap(self, root: Root, table: int, level: int, base: int, start: int, end: int) -> bool:
        span = pages_per_hpage(level)
        first = max(start - base, 0) // span
        last = min((end - base + span - 1) // span, PT_ENTRIES)
        flush = False
        for index in range(first, last):
            spte = root.pt._kvm_get(table, index)
            if not is_shadow_present(spte):
                continue
            if is_last_spte(spte, level):
                self._set_spte(root, table, index, level, SHADOW_NONPRESENT_VALUE,
                               base + index * span)
                flush = True
            else:
                flush |= self._zap(root, root.child(spte), level - 1, base + index * span,
                                   start, end)
        return flush

    def zap_all(self) -> None:
        """kvm_mmu_zap_all_fast: every SPTE of every root goes, MMIO SPTEs included."""
        for root in (self.direct, self.mirror):
            if root is not None:
                for index in range(PT_ENTRIES):
                    self._set_spte(root, 0, index, self.levels, SHADOW_NONPRESENT_VALUE,
                                   index * pages_per_hpage(self.levels))

    def unmap_gfn_range(self, start: int, end: int, private: bool, shared: bool) -> bool:
        """kvm_unmap_gfn_range with kvm_gfn_range_filter_to_root_types: TDX maps the
        private filter to the mirror root and the shared one to the direct root; every
        other VM has only the direct root, zapped for either filter."""
        flush = False
        if self.mirror is None:
            return self._zap_aliased(self.direct, start, end)
        if private:
            flush |= self.zap_leafs(self.mirror, start, end)
        if shared:
            flush |= self._zap_aliased(self.direct, start, end)
        return flush

    def _zap_aliased(self, root: Root, start: int, end: int) -> bool:
        """The direct root is indexed with the shared bit (kvm_gfn_root_bits); canonical
        gfns are below it, so adding it aliases the whole range."""
        return self.zap_leafs(root, start + root.gfn_bits, end + root.gfn_bits)
