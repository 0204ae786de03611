"""The TDP MMU: roots, mapping a fault, zapping ranges.

The twin of ``_cy/tdp_mmu.pyx``.  Models, from Linux 6.18 (arch/x86/kvm/mmu/
tdp_mmu.c unless named otherwise): ``tdp_mmu_set_spte``, ``handle_changed_spte``,
``handle_removed_pt``, ``kvm_tdp_mmu_map``, ``tdp_mmu_map_handle_target_level``,
``tdp_mmu_get_root_for_fault``, ``kvm_tdp_mmu_get_walk`` /
``kvm_tdp_mmu_fast_pf_get_last_sptep``, ``tdp_mmu_zap_leafs``,
``kvm_unmap_gfn_range`` / ``kvm_tdp_mmu_unmap_gfn_range`` and
``kvm_mmu_zap_all_fast`` (mmu.c).

KVM's tables live in the VM's ``PageTables`` (``vm.page_tables``; TDX's mirror of
the Secure EPT in ``vm.private_page_tables``), so the hardware walk reads exactly
the SPTEs KVM wrote.  Tables are taken from and given back to the PageTables'
LIFO free list, so table addresses are a pure function of the call sequence.

With ``tracer`` set (a ``kvmemu._trace.Tracer``), the MMU emits
``kvm_mmu_spte_requested``, ``kvm_tdp_mmu_spte_changed`` and ``kvm_mmu_set_spte``
where the kernel does.  Like the kernel, it does not trace the entries of a new
table that splits a huge leaf (tdp_mmu_split_huge_page fills them directly) nor
the fast path's fix; unlike it, it does not trace the zapping of the entries of
a removed table (handle_removed_pt).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import memslots, mmu, spte
from .cnames import *  # noqa: F403  (the constants under their C names)
from .levels import end_index, first_index, pages_per_hpage
from .locking import RwLock, cmpxchg64


def spte_reduced(fmt: Any, level: int, old: int, new: int) -> bool:
    """The change of a level-``level`` SPTE from ``old`` to ``new`` removes or reduces a
    mapping, so that an embedder caching the translation must drop it (VM.on_zap): a
    present leaf becomes not present, maps another frame, or loses read, write or
    execute (is_access_allowed, spte.h); or a writable dirty leaf loses its dirty bit
    (dirty logging's clear_dirty: the next write must reach KVM to be logged).  A huge
    leaf replaced by a table (a split) is not: the table's children map the same
    frames with the same permissions (tdp_mmu_split_huge_page, make_small_spte)."""
    if not (spte.is_shadow_present_pte(old) and spte.is_last_spte(old, level)):
        return False
    if not spte.is_shadow_present_pte(new):
        return True
    if not spte.is_last_spte(new, level):
        return False
    if spte.spte_to_pfn(new) != spte.spte_to_pfn(old):
        return True
    for exec_, write in ((False, False), (False, True), (True, False)):
        if (spte.is_access_allowed(fmt, exec_, write, old)
                and not spte.is_access_allowed(fmt, exec_, write, new)):
            return True
    return bool(old & PTE_WRITABLE and old & fmt.dirty and not new & fmt.dirty)


class Root:
    """One TDP root: its PageTables plus KVM's per-table bookkeeping."""

    def __init__(self, tables: Any, gfn_bits: int) -> None:
        self.pt = tables
        self.gfn_bits = gfn_bits                        # kvm_gfn_root_bits
        self.disallowed: dict[int, bool] = {}          # sp->nx_huge_page_disallowed
        tables.kvm_owned = True
        tables.fill(0, SHADOW_NONPRESENT_VALUE)

    def clone(self) -> "Root":
        c = Root.__new__(Root)
        c.pt, c.gfn_bits, c.disallowed = self.pt.clone(), self.gfn_bits, dict(self.disallowed)
        return c

    def child(self, spte_value: int) -> int:
        """The table a present non-leaf SPTE points to (spte_to_child_sp).  Only KVM
        writes these tables, and its non-leaf SPTEs always point at a table."""
        table = self.pt.table_at(spte_value & SPTE_BASE_ADDR_MASK)
        assert table > 0, f"non-leaf SPTE {spte_value:#x} points at no table"
        return table

    def set_nx_huge_page_disallowed(self, table: int, value: bool) -> None:
        self.disallowed[table] = value

    def nx_huge_page_disallowed(self, table: int) -> bool:
        return self.disallowed.get(table, False)

    def disallowed_tables(self) -> list[int]:
        """The tables marked nx_huge_page_disallowed, ascending (for a snapshot's bytes)."""
        return sorted(t for t, on in self.disallowed.items() if on)

    def load_disallowed(self, tables: list[int]) -> None:
        """Mark exactly ``tables`` (existing ones) nx_huge_page_disallowed."""
        self.disallowed = {}
        for table in tables:
            if not 0 < table < self.pt.ntables:
                raise ValueError(f"table {table} does not exist")
            self.disallowed[table] = True


class TdpMmu:
    """The VM's TDP MMU: its roots and what changes their SPTEs."""

    def __init__(self, config: Any, make_tables: Any) -> None:
        self.fmt = spte.spte_format(config.ept, config.tdx, config.ad_enabled,
                                    config.npt_mmio_value)
        self.levels = config.levels
        self.nx_huge_pages = config.nx_huge_pages
        #: kvm_ad_enabled: the host's EPT has A/D bits (NPT always does).
        self.ad_enabled = config.ad_enabled
        self.direct = Root(make_tables(), config.direct_bits_gfn)
        self.mirror = Root(make_tables(), 0) if config.tdx else None
        self.share_lock(RwLock())
        #: A debug switch: is_page_fault_stale always says no.
        self.skip_stale_check = False
        #: kvm->stat.pages[level]: present leaf SPTEs per level (4K, 2M, 1G).
        self.npages = [0, 0, 0, 0]
        #: The VM's Tracer, or None when tracing is off.
        self.tracer: Any = None
        #: The ZapReason of the change being made (0: a fault's own changes).
        self.zap_reason = 0
        #: VM.on_zap is set: the mappings removed or reduced are recorded in ``zaps``,
        #: [gfn, npages, level, reason] each, a run of the same level and reason merged.
        self.zap_watch = False
        self.zaps: list[list[int]] = []

    def share_lock(self, lock: RwLock) -> None:
        """Make ``lock`` kvm->mmu_lock, the lock of every root's tables."""
        self.mmu_lock = lock
        self.direct.pt.lock = lock
        if self.mirror is not None:
            self.mirror.pt.lock = lock

    def set_tracer(self, tracer: Any) -> None:
        self.tracer = tracer

    def watch_zaps(self, on: bool) -> None:
        """Record the mappings removed or reduced from now on (VM.on_zap is set), or not."""
        self.zap_watch = on
        if not on:
            self.zaps = []

    def record_zap(self, gfn: int, level: int) -> None:
        """Keep a removed or reduced level-``level`` mapping of ``gfn``, merged into the
        last one when it continues it (same level and reason, the next gfn)."""
        npages = pages_per_hpage(level)
        gfn &= ~(npages - 1)
        if self.zaps:
            last = self.zaps[-1]
            if last[2] == level and last[3] == self.zap_reason and last[0] + last[1] == gfn:
                last[1] += npages
                return
        self.zaps.append([gfn, npages, level, self.zap_reason])

    def take_zaps(self) -> list[tuple[int, int, int, int]]:
        """The zaps recorded since the last call, [(gfn, npages, level, reason), ...]."""
        zaps, self.zaps = self.zaps, []
        return [(z[0], z[1], z[2], z[3]) for z in zaps]

    def clone(self) -> "TdpMmu":
        """A copy of the roots and counts (for VM snapshots); the tracer is not state."""
        c = TdpMmu.__new__(TdpMmu)
        c.fmt, c.levels, c.nx_huge_pages = self.fmt, self.levels, self.nx_huge_pages
        c.ad_enabled = self.ad_enabled
        c.direct = self.direct.clone()
        c.mirror = None if self.mirror is None else self.mirror.clone()
        c.share_lock(RwLock())
        c.skip_stale_check = self.skip_stale_check
        c.npages = list(self.npages)
        c.tracer = None
        c.zap_reason, c.zap_watch, c.zaps = 0, False, []
        return c

    def load_pages(self, pages: list[int]) -> None:
        """kvm->stat.pages as a snapshot's bytes hold it: [unused, 4K, 2M, 1G]."""
        self.npages = [int(p) for p in pages]

    @property
    def pages(self) -> list[int]:
        """Present leaf SPTEs per level: [unused, 4K, 2M, 1G]."""
        return list(self.npages)

    # --- changing SPTEs ---------------------------------------------------------------------

    def set_spte(self, root: Root, table: int, index: int, level: int, new: int,
                 gfn: int) -> None:
        """Models tdp_mmu_set_spte (tdp_mmu.c, 6.18): write, then handle_changed_spte;
        traced as kvm_tdp_mmu_spte_changed with iter->gfn: ``gfn`` indexes the root (with
        its gfn bits, as tdp_iter_refresh_sptep does), the trace drops them (iter->gfn is
        canonical, tdp_iter.c)."""
        old = root.pt.read(table, index)
        if self.tracer is not None and old != new:
            self.tracer.spte_changed(0, gfn & ~root.gfn_bits, level, old, new)
        root.pt.write(table, index, new)
        self.handle_changed_spte(root, gfn, level, old, new)

    def set_spte_atomic(self, root: Root, table: int, index: int, level: int, old: int,
                        new: int, gfn: int, aug: Any) -> int:
        """Models tdp_mmu_set_spte_atomic (tdp_mmu.c, 6.18): a fault, under mmu_lock for
        read, installs an SPTE with a compare-and-exchange; 0 if the SPTE is no longer
        ``old`` (another writer came first: the fault retries), else 1.  A mirror SPTE
        (a TD's private tables) goes through set_external_spte_present: frozen by the
        compare-and-exchange, then the S-EPT is changed (``aug``: the frame that
        tdx_sept_set_private_spte adds with TDH.MEM.PAGE.AUG on a runnable TD, PENDING
        until the TD accepts it; None: nothing to add), then the new SPTE is written.
        Meanwhile another fault that meets the frozen SPTE retries, and a walk finds it
        not present."""
        if root is self.mirror:
            if not cmpxchg64(root.pt.mem, (table, index), old, FROZEN_SPTE):
                return 0
            if aug is not None:
                aug[0].update(aug[1], lambda state: state | FRAME_STATE_TDX_PENDING)
            root.pt.write(table, index, new)
        elif not cmpxchg64(root.pt.mem, (table, index), old, new):
            return 0
        if self.tracer is not None and old != new:
            self.tracer.spte_changed(0, gfn & ~root.gfn_bits, level, old, new)
        self.handle_changed_spte(root, gfn, level, old, new)
        return 1

    def handle_changed_spte(self, root: Root, gfn: int, level: int, old: int,
                            new: int) -> None:
        """Models handle_changed_spte (tdp_mmu.c, 6.18) without its tracepoint, which
        set_spte emits: the per-level leaf counts (kvm_update_page_stats), and a table
        unlinked by the change is removed; a mapping removed or reduced is recorded for
        VM.on_zap (``gfn`` with the root's gfn bits, as the guest addresses it)."""
        if self.zap_watch and self.zap_reason and spte_reduced(self.fmt, level, old, new):
            self.record_zap(gfn, level)
        if spte.is_shadow_present_pte(old) and spte.is_last_spte(old, level):
            self.npages[level] -= 1
        if spte.is_shadow_present_pte(new) and spte.is_last_spte(new, level):
            self.npages[level] += 1
        if spte.is_shadow_present_pte(old) and not spte.is_last_spte(old, level):
            self.handle_removed_pt(root, root.child(old), level - 1,
                                   gfn & ~(pages_per_hpage(level) - 1))

    def handle_removed_pt(self, root: Root, table: int, level: int, base: int) -> None:
        """Models handle_removed_pt (tdp_mmu.c, 6.18): zap every entry of an unlinked table
        (mapping gfns from ``base``), free it."""
        pt = root.pt
        for index in range(PT_ENTRIES):
            old = pt.read(table, index)
            if spte.is_shadow_present_pte(old):
                pt.write(table, index, SHADOW_NONPRESENT_VALUE)
                self.handle_changed_spte(root, base + index * pages_per_hpage(level), level,
                                         old, SHADOW_NONPRESENT_VALUE)
        root.disallowed.pop(table, None)
        pt.free(table)

    # --- mapping a fault ----------------------------------------------------------------------

    def get_root_for_fault(self, addr: int, direct_bits_gpa: int) -> Root:
        """Models tdp_mmu_get_root_for_fault (tdp_mmu.h, 6.18): the mirror root for a TDX
        private GPA."""
        if self.mirror is not None and not addr & direct_bits_gpa:
            return self.mirror
        return self.direct

    def tdp_mmu_map(self, fault: Any, root: Root, generation: int) -> int:
        """Models kvm_tdp_mmu_map (tdp_mmu.c, 6.18): hugepage adjust, then walk down from
        the root, linking a new table where none is and splitting a huge leaf in the way,
        and map the target level; every link is a compare-and-exchange, and a lost one
        frees the new table and retries the fault, as does a frozen SPTE on the way
        (another fault's change of a mirror SPTE in progress)."""
        mmu.hugepage_adjust(fault, self.nx_huge_pages)
        pt, gfn = root.pt, fault.gfn
        indexed = gfn | root.gfn_bits
        if self.tracer is not None:
            pfn = fault.pfn if fault.slot is not None else KVM_PFN_NOSLOT
            self.tracer.spte_requested(
                gfn, pfn | (gfn & (pages_per_hpage(fault.goal_level) - 1)), fault.goal_level)
        table, level = 0, self.levels
        while True:
            index = spte.spte_index(indexed, level)
            old = pt.read(table, index)
            if self.nx_huge_pages:
                mmu.disallowed_hugepage_adjust(fault, root, old, level)
            if (level != fault.goal_level and spte.is_shadow_present_pte(old)
                    and not old & PTE_LARGE):
                table, level = root.child(old), level - 1
                continue
            # Checked after the step down: a frozen SPTE is never present.
            if spte.is_frozen_spte(old):     # another fault's change in progress
                return RET_PF_RETRY
            if level == fault.goal_level:
                return self.map_handle_target_level(fault, root, table, index, level, old,
                                                    generation,
                                                    indexed & ~(pages_per_hpage(level) - 1))
            if spte.is_shadow_present_pte(old):       # a huge leaf in the way: split it
                child = self.split_huge_page(root, table, index, level, old,
                                             indexed & ~(pages_per_hpage(level) - 1),
                                             fault.huge_page_disallowed)
            else:
                child = self.link_sp(root, table, index, level, old,
                                     indexed & ~(pages_per_hpage(level) - 1),
                                     fault.huge_page_disallowed)
            if not child:
                return RET_PF_RETRY
            table, level = child, level - 1

    def link_sp(self, root: Root, table: int, index: int, level: int, old: int, gfn: int,
                disallowed: bool) -> int:
        """Models tdp_mmu_link_sp (tdp_mmu.c, 6.18): a new empty table where ``old`` (not
        present) was; 0 if the compare-and-exchange lost (the table is freed)."""
        pt = root.pt
        child = pt.alloc(SHADOW_NONPRESENT_VALUE)
        # Before the link, as tdp_mmu_map sets sp->nx_huge_page_disallowed: a fault of
        # another vCPU that meets the new table reads it (disallowed_hugepage_adjust).
        root.set_nx_huge_page_disallowed(child, disallowed)
        if not self.set_spte_atomic(root, table, index, level, old,
                                    spte.make_nonleaf_spte(self.fmt, pt.hpa(child)), gfn,
                                    None):
            root.set_nx_huge_page_disallowed(child, False)     # a free table's is clear
            pt.free(child)
            return 0
        return child

    def split_huge_page(self, root: Root, table: int, index: int, level: int, old: int,
                        gfn: int, disallowed: bool) -> int:
        """Models tdp_mmu_split_huge_page (tdp_mmu.c, 6.18): a table of 512 make_small_spte
        children of the huge leaf ``old``, linked in its place (the children are not
        traced); the leaf count moves to the children.  0 if the link lost its race."""
        pt = root.pt
        child = pt.alloc(SHADOW_NONPRESENT_VALUE)
        for i in range(PT_ENTRIES):
            pt.write(child, i, spte.make_small_spte(self.fmt, old, level - 1, i,
                                                    self.nx_huge_pages))
        root.set_nx_huge_page_disallowed(child, disallowed)     # before the link: link_sp
        if not self.set_spte_atomic(root, table, index, level, old,
                                    spte.make_nonleaf_spte(self.fmt, pt.hpa(child)), gfn,
                                    None):
            root.set_nx_huge_page_disallowed(child, False)
            pt.free(child)
            return 0
        for i in range(PT_ENTRIES):
            self.handle_changed_spte(root, (gfn & ~(pages_per_hpage(level) - 1))
                                     + i * pages_per_hpage(level - 1), level - 1,
                                     SHADOW_NONPRESENT_VALUE, pt.read(child, i))
        return child

    def map_handle_target_level(self, fault: Any, root: Root, table: int, index: int,
                                level: int, old: int, generation: int, iter_gfn: int) -> int:
        """Models tdp_mmu_map_handle_target_level (tdp_mmu.c, 6.18; ``iter_gfn``: iter->gfn,
        with the root's gfn bits): a leaf or an MMIO SPTE for the fault, FIXED, SPURIOUS or
        EMULATE."""
        fmt = self.fmt
        if (spte.is_shadow_present_pte(old)
                and (fault.prefetch or spte.is_access_allowed(fmt, fault.exec_, fault.write, old))
                and spte.is_last_spte(old, level)):
            return RET_PF_SPURIOUS
        gfn = fault.gfn & ~(pages_per_hpage(level) - 1)   # iter->gfn
        if fault.slot is None:
            new = spte.make_mmio_spte(fmt, gfn, generation)
        else:
            new = spte.make_spte(fmt, level, fault.pfn, fault.map_writable, self.nx_huge_pages,
                                 fault.prefetch)
            if new & PTE_WRITABLE:           # make_spte's last step, before the SPTE is set
                memslots.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        else:
            if not self.set_spte_atomic(root, table, index, level, old, new, iter_gfn,
                                        fault.frame if fault.aug else None):
                return RET_PF_RETRY
        if spte.is_mmio_spte(fmt, new):
            ret = RET_PF_EMULATE        # (the kernel traces mark_mmio_spte here: not modelled)
        elif self.tracer is not None:
            self.tracer.set_spte(level, iter_gfn & ~root.gfn_bits, new,
                                 root.pt.hpa(table) + index * PT_ENTRY_BYTES)
        return ret

    # --- lockless lookups ---------------------------------------------------------------------

    def tdp_mmu_get_walk(self, root: Root, gfn: int) -> tuple[int, int, int, int]:
        """Models kvm_tdp_mmu_get_walk / kvm_tdp_mmu_fast_pf_get_last_sptep (tdp_mmu.c,
        6.18): the deepest SPTE on gfn's path, as ``(table, index, level, spte)``."""
        indexed = gfn | root.gfn_bits
        table, level = 0, self.levels
        while True:
            index = spte.spte_index(indexed, level)
            value = root.pt.read(table, index)
            if (level == PG_LEVEL_4K or not spte.is_shadow_present_pte(value)
                    or value & PTE_LARGE):
                return table, index, level, value
            table, level = root.child(value), level - 1

    # --- zapping ------------------------------------------------------------------------------

    def zap_leafs(self, root: Root, start: int, end: int) -> bool:
        """Models tdp_mmu_zap_leafs (tdp_mmu.c, 6.18): zap the present leaf SPTEs mapping
        any gfn of [start, end); tables stay.  Returns whether a TLB flush is needed."""
        return self.zap_table_leafs(root, 0, self.levels, 0, start, end)

    def zap_table_leafs(self, root: Root, table: int, level: int, base: int, start: int,
                        end: int) -> bool:
        """zap_leafs below one table (mapping gfns from ``base``)."""
        span = pages_per_hpage(level)
        flush = False
        for index in range(first_index(level, base, start), end_index(level, base, end)):
            value = root.pt.read(table, index)
            if not spte.is_shadow_present_pte(value):
                continue
            if spte.is_last_spte(value, level):
                self.set_spte(root, table, index, level, SHADOW_NONPRESENT_VALUE,
                              base + index * span)
                flush = True
            elif self.zap_table_leafs(root, root.child(value), level - 1, base + index * span,
                                      start, end):
                flush = True
        return flush

    def zap_all_fast(self) -> None:
        """Models kvm_mmu_zap_all_fast (mmu.c, 6.18): every SPTE of every root goes, MMIO SPTEs
        included."""
        for root in (self.direct, self.mirror):
            if root is not None:
                for index in range(PT_ENTRIES):
                    self.set_spte(root, 0, index, self.levels, SHADOW_NONPRESENT_VALUE,
                                  index * pages_per_hpage(self.levels))

    # --- dirty logging ------------------------------------------------------------------------

    def roots(self) -> list[Root]:
        """The valid roots (for_each_valid_tdp_mmu_root: direct and, for TDX, mirror)."""
        return [self.direct] if self.mirror is None else [self.direct, self.mirror]

    def clear_leaf_bits(self, start: int, end: int, min_level: int, bits: int) -> bool:
        """Clear ``bits`` in every present leaf SPTE at ``min_level`` or above that maps a
        gfn of [start, end) and has any of them, in every root.  Models wrprot_gfn_range
        (bits = PT_WRITABLE_MASK) and clear_dirty_gfn_range (bits = the dirty bit, or W
        without A/D bits; every leaf level) of tdp_mmu.c, 6.18.  True if one changed."""
        changed = False
        for root in self.roots():
            if self.clear_table_leaf_bits(root, 0, self.levels, 0, start + root.gfn_bits,
                                          end + root.gfn_bits, min_level, bits):
                changed = True
        return changed

    def clear_table_leaf_bits(self, root: Root, table: int, level: int, base: int, start: int,
                              end: int, min_level: int, bits: int) -> bool:
        """clear_leaf_bits below one table (mapping gfns from ``base``)."""
        span = pages_per_hpage(level)
        changed = False
        for index in range(first_index(level, base, start), end_index(level, base, end)):
            value = root.pt.read(table, index)
            if not spte.is_shadow_present_pte(value):
                continue
            if spte.is_last_spte(value, level):
                if level >= min_level and value & bits:
                    self.set_spte(root, table, index, level, value & ~bits, base + index * span)
                    changed = True
            elif level - 1 >= min_level and self.clear_table_leaf_bits(
                    root, root.child(value), level - 1, base + index * span, start, end,
                    min_level, bits):
                changed = True
        return changed

    def clear_gfn_bits(self, root: Root, gfn: int, min_level: int, max_level: int,
                       bits: int) -> bool:
        """Clear ``bits`` in the present leaf SPTE of ``root`` that maps ``gfn`` if its level
        is within [min_level, max_level] and it has any of them; True if it changed."""
        table, index, level, value = self.tdp_mmu_get_walk(root, gfn)
        if not (spte.is_shadow_present_pte(value) and spte.is_last_spte(value, level)
                and min_level <= level <= max_level and value & bits):
            return False
        self.set_spte(root, table, index, level, value & ~bits,
                      (gfn | root.gfn_bits) & ~(pages_per_hpage(level) - 1))
        return True

    def dirty_bit(self, wrprot: bool) -> int:
        """The bit that dirty logging clears: PT_WRITABLE_MASK when asked to write-protect or
        when tdp_mmu_need_write_protect (no A/D bits), else shadow_dirty_mask (the dbit of
        clear_dirty_gfn_range / clear_dirty_pt_masked, tdp_mmu.c, 6.18)."""
        return PTE_WRITABLE if wrprot or not self.ad_enabled else self.fmt.dirty

    def wrprot_slot(self, start: int, end: int, min_level: int) -> bool:
        """Models kvm_tdp_mmu_wrprot_slot / wrprot_gfn_range (tdp_mmu.c, 6.18): W cleared in
        the leaves at ``min_level`` and above (MMU-writable kept: the fast path may give
        W back)."""
        return self.clear_leaf_bits(start, end, min_level, PTE_WRITABLE)

    def clear_dirty_slot(self, start: int, end: int) -> bool:
        """Models kvm_tdp_mmu_clear_dirty_slot / clear_dirty_gfn_range (tdp_mmu.c, 6.18):
        the dirty bit (W without A/D bits) cleared in the leaves of every level."""
        return self.clear_leaf_bits(start, end, PG_LEVEL_4K, self.dirty_bit(False))

    def clear_dirty_pt_masked(self, gfn: int, mask: int, wrprot: bool) -> None:
        """Models kvm_tdp_mmu_clear_dirty_pt_masked (tdp_mmu.c, 6.18): for each set bit i
        of the 64-bit ``mask``, the 4K leaf mapping ``gfn + i`` loses the dirty bit (W when
        ``wrprot``, or without A/D bits); huge leaves are left alone.  Root by root."""
        bit = self.dirty_bit(wrprot)
        for root in self.roots():
            for i in range(64):
                if mask >> i & 1:
                    self.clear_gfn_bits(root, gfn + i, PG_LEVEL_4K, PG_LEVEL_4K, bit)

    def clear_dirty_pt_masked_words(self, gfn: int, words: np.ndarray, wrprot: bool) -> None:
        """clear_dirty_pt_masked for each non-zero word i of ``words``, on the 64 pages from
        ``gfn + 64 * i`` (kvm_get_dirty_log_protect's and kvm_clear_dirty_log_protect's
        loops, when kvm_arch_mmu_enable_log_dirty_pt_masked has nothing else to do)."""
        for i in np.flatnonzero(words).tolist():
            self.clear_dirty_pt_masked(gfn + 64 * i, int(words[i]), wrprot)

    def write_protect_gfn(self, gfn: int, min_level: int) -> bool:
        """Models kvm_tdp_mmu_write_protect_gfn (tdp_mmu.c, 6.18): the leaf mapping ``gfn``
        at ``min_level`` or above loses W and MMU-writable (only the slow path can make it
        writable again)."""
        changed = False
        for root in self.roots():
            if self.clear_gfn_bits(root, gfn, min_level, PG_LEVEL_256T,
                                   PTE_WRITABLE | self.fmt.mmu_writable):
                changed = True
        return changed

    def try_split_huge_pages(self, start: int, end: int, target_level: int) -> None:
        """Models kvm_tdp_mmu_try_split_huge_pages (tdp_mmu.c, 6.18): every huge leaf above
        ``target_level`` that maps a gfn of [start, end) is split, and its new children
        again, down to ``target_level`` (pre-order: 1G, then its 2M children)."""
        for root in self.roots():
            self.split_table(root, 0, self.levels, 0, start + root.gfn_bits,
                             end + root.gfn_bits, target_level)

    def split_table(self, root: Root, table: int, level: int, base: int, start: int, end: int,
                    target_level: int) -> None:
        """split_huge_pages below one table (mapping gfns from ``base``)."""
        span = pages_per_hpage(level)
        for index in range(first_index(level, base, start), end_index(level, base, end)):
            value = root.pt.read(table, index)
            if not spte.is_shadow_present_pte(value) or level - 1 < target_level:
                continue
            if spte.is_last_spte(value, level):
                child = self.split_huge_page(root, table, index, level, value,
                                             base + index * span, False)
            else:
                child = root.child(value)
            if level - 1 > target_level:
                self.split_table(root, child, level - 1, base + index * span, start, end,
                                 target_level)

    def recover_huge_pages(self, slot: Any, start: int, end: int) -> bool:
        """Models kvm_tdp_mmu_recover_huge_pages / recover_huge_pages_range (tdp_mmu.c,
        6.18), run when dirty logging stops: a table at 2M or 1G whose gfn lies in
        [start, end) and may be mapped huge (kvm_mmu_max_mapping_level) is replaced by a
        huge leaf made from the first present leaf below it (make_huge_spte); the table
        goes.  True if one was replaced."""
        recovered = False
        for root in self.roots():
            if self.recover_table(root, 0, self.levels, 0, start + root.gfn_bits,
                                  end + root.gfn_bits, slot):
                recovered = True
        return recovered

    def recover_table(self, root: Root, table: int, level: int, base: int, start: int,
                      end: int, slot: Any) -> bool:
        """recover_huge_pages below one table (mapping gfns from ``base``, with the root's
        gfn bits; the slot's lpage_info reads them without)."""
        span = pages_per_hpage(level)
        recovered = False
        for index in range(first_index(level, base, start), end_index(level, base, end)):
            value = root.pt.read(table, index)
            if not spte.is_shadow_present_pte(value) or spte.is_last_spte(value, level):
                continue
            gfn = base + index * span
            if (level <= KVM_MAX_HUGEPAGE_LEVEL and start <= gfn < end
                    and mmu.max_mapping_level(slot, gfn & ~root.gfn_bits,
                                             KVM_MAX_HUGEPAGE_LEVEL) >= level):
                small = self.first_present_leaf(root, root.child(value), level - 1)
                if small:
                    self.set_spte(root, table, index, level,
                                  spte.make_huge_spte(self.fmt, small, level,
                                                      self.nx_huge_pages), gfn)
                    recovered = True
                    continue
            if level - 1 >= PG_LEVEL_2M and self.recover_table(
                    root, root.child(value), level - 1, gfn, start, end, slot):
                recovered = True
        return recovered

    def first_present_leaf(self, root: Root, table: int, level: int) -> int:
        """The first present leaf SPTE below a table, in gfn order (tdp_mmu_make_huge_spte's
        walk), or 0 if there is none."""
        for index in range(PT_ENTRIES):
            value = root.pt.read(table, index)
            if not spte.is_shadow_present_pte(value):
                continue
            if spte.is_last_spte(value, level):
                return value
            found = self.first_present_leaf(root, root.child(value), level - 1)
            if found:
                return found
        return 0

    def set_ignore_guest_pat(self, ignore: bool) -> None:
        """vmx_get_mt_mask (vmx.c, 6.18) for every leaf made from now on: WB, with IPAT
        while vmx_ignore_guest_pat() holds.  No non-coherent DMA is modelled, so the
        IGNORE_GUEST_PAT quirk alone decides; KVM does not rewrite existing SPTEs when the
        quirk is disabled.  NPT SPTEs carry no memory type."""
        if self.fmt.ept:
            fmt = spte.SpteFormat()          # a new one: clones share the old
            for name in spte.SpteFormat.__slots__:
                setattr(fmt, name, getattr(self.fmt, name))
            fmt.memtype = fmt.memtype | EPTE_IPAT if ignore else fmt.memtype & ~EPTE_IPAT
            self.fmt = fmt

    def unmap_gfn_range(self, start: int, end: int, private: bool, shared: bool) -> bool:
        """Models kvm_unmap_gfn_range (mmu.c, 6.18) with kvm_gfn_range_filter_to_root_types:
        TDX maps the private filter to the mirror root and the shared one to the direct
        root; every other VM has only the direct root, zapped for either filter.  The direct
        root is indexed with the shared bit (kvm_gfn_root_bits), so the range is aliased by
        adding it.  Roots go in the order of kvm->arch.tdp_mmu_roots: the newest first, and
        mmu_alloc_direct_roots makes the mirror root before the direct one.  Returns
        whether a TLB flush is needed."""
        bits = self.direct.gfn_bits
        if self.mirror is None:
            return self.zap_leafs(self.direct, start + bits, end + bits)
        flush = False
        if shared and self.zap_leafs(self.direct, start + bits, end + bits):
            flush = True
        if private and self.zap_leafs(self.mirror, start, end):
            flush = True
        return flush
