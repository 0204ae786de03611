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

from . import mmu, spte
from .cnames import *  # noqa: F403  (the constants under their C names)
from .levels import pages_per_hpage
from .locking import RwLock, cmpxchg64


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


class TdpMmu:
    """The VM's TDP MMU: its roots and what changes their SPTEs."""

    def __init__(self, config: Any, make_tables: Any) -> None:
        self.fmt = spte.spte_format(config.ept, config.tdx)
        self.levels = config.levels
        self.nx_huge_pages = config.nx_huge_pages
        self.direct = Root(make_tables(), config.direct_bits_gfn)
        self.mirror = Root(make_tables(), 0) if config.tdx else None
        self.share_lock(RwLock())
        #: A debug switch: is_page_fault_stale always says no.
        self.skip_stale_check = False
        #: kvm->stat.pages[level]: present leaf SPTEs per level (4K, 2M, 1G).
        self.npages = [0, 0, 0, 0]
        #: The VM's Tracer, or None when tracing is off.
        self.tracer: Any = None

    def share_lock(self, lock: RwLock) -> None:
        """Make ``lock`` kvm->mmu_lock, the lock of every root's tables."""
        self.mmu_lock = lock
        self.direct.pt.lock = lock
        if self.mirror is not None:
            self.mirror.pt.lock = lock

    def set_tracer(self, tracer: Any) -> None:
        self.tracer = tracer

    def clone(self) -> "TdpMmu":
        """A copy of the roots and counts (for VM snapshots); the tracer is not state."""
        c = TdpMmu.__new__(TdpMmu)
        c.fmt, c.levels, c.nx_huge_pages = self.fmt, self.levels, self.nx_huge_pages
        c.direct = self.direct.clone()
        c.mirror = None if self.mirror is None else self.mirror.clone()
        c.share_lock(RwLock())
        c.skip_stale_check = self.skip_stale_check
        c.npages = list(self.npages)
        c.tracer = None
        return c

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
        self.handle_changed_spte(root, level, old, new)

    def set_spte_atomic(self, root: Root, table: int, index: int, level: int, old: int,
                        new: int, gfn: int) -> int:
        """Models tdp_mmu_set_spte_atomic (tdp_mmu.c, 6.18): a fault, under mmu_lock for
        read, installs an SPTE with a compare-and-exchange; 0 if the SPTE is no longer
        ``old`` (another writer came first: the fault retries), else 1."""
        if not cmpxchg64(root.pt.mem, (table, index), old, new):
            return 0
        if self.tracer is not None and old != new:
            self.tracer.spte_changed(0, gfn & ~root.gfn_bits, level, old, new)
        self.handle_changed_spte(root, level, old, new)
        return 1

    def handle_changed_spte(self, root: Root, level: int, old: int, new: int) -> None:
        """Models handle_changed_spte (tdp_mmu.c, 6.18) without its tracepoint, which
        set_spte emits: the per-level leaf counts (kvm_update_page_stats), and a table
        unlinked by the change is removed."""
        if spte.is_shadow_present_pte(old) and spte.is_last_spte(old, level):
            self.npages[level] -= 1
        if spte.is_shadow_present_pte(new) and spte.is_last_spte(new, level):
            self.npages[level] += 1
        if spte.is_shadow_present_pte(old) and not spte.is_last_spte(old, level):
            self.handle_removed_pt(root, root.child(old), level - 1)

    def handle_removed_pt(self, root: Root, table: int, level: int) -> None:
        """Models handle_removed_pt (tdp_mmu.c, 6.18): zap every entry of an unlinked table,
        free it."""
        pt = root.pt
        for index in range(PT_ENTRIES):
            old = pt.read(table, index)
            if spte.is_shadow_present_pte(old):
                pt.write(table, index, SHADOW_NONPRESENT_VALUE)
                self.handle_changed_spte(root, level, old, SHADOW_NONPRESENT_VALUE)
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
        frees the new table and retries the fault."""
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
            if level == fault.goal_level:
                return self.map_handle_target_level(fault, root, table, index, level, old,
                                                    generation,
                                                    indexed & ~(pages_per_hpage(level) - 1))
            if spte.is_shadow_present_pte(old) and not old & PTE_LARGE:
                table, level = root.child(old), level - 1
                continue
            child = pt.alloc(SHADOW_NONPRESENT_VALUE)
            if spte.is_shadow_present_pte(old):       # a huge leaf in the way: split it
                for i in range(PT_ENTRIES):
                    pt.write(child, i, spte.make_small_spte(self.fmt, old, level - 1, i,
                                                            self.nx_huge_pages))
            if not self.set_spte_atomic(root, table, index, level, old,
                                        spte.make_nonleaf_spte(self.fmt, pt.hpa(child)),
                                        indexed & ~(pages_per_hpage(level) - 1)):
                pt.free(child)
                return RET_PF_RETRY
            root.set_nx_huge_page_disallowed(child, fault.huge_page_disallowed)
            if spte.is_shadow_present_pte(old):       # the leaf count moves to the children
                for i in range(PT_ENTRIES):
                    self.handle_changed_spte(root, level - 1, SHADOW_NONPRESENT_VALUE,
                                             pt.read(child, i))
            table, level = child, level - 1

    def map_handle_target_level(self, fault: Any, root: Root, table: int, index: int,
                                level: int, old: int, generation: int, iter_gfn: int) -> int:
        """Models tdp_mmu_map_handle_target_level (tdp_mmu.c, 6.18; ``iter_gfn``: iter->gfn,
        with the root's gfn bits): a leaf or an MMIO SPTE for the fault, FIXED, SPURIOUS or
        EMULATE."""
        fmt = self.fmt
        if (spte.is_shadow_present_pte(old)
                and spte.is_access_allowed(fmt, fault.exec_, fault.write, old)
                and spte.is_last_spte(old, level)):
            return RET_PF_SPURIOUS
        gfn = fault.gfn & ~(pages_per_hpage(level) - 1)   # iter->gfn
        if fault.slot is None:
            new = spte.make_mmio_spte(fmt, gfn, generation)
        else:
            new = spte.make_spte(fmt, level, fault.pfn, fault.map_writable, self.nx_huge_pages)
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        elif not self.set_spte_atomic(root, table, index, level, old, new, iter_gfn):
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
        first = max(start - base, 0) // span
        last = min((end - base + span - 1) // span, PT_ENTRIES) if end > base else 0
        flush = False
        for index in range(first, last):
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
        adding it.  Returns whether a TLB flush is needed."""
        bits = self.direct.gfn_bits
        if self.mirror is None:
            return self.zap_leafs(self.direct, start + bits, end + bits)
        flush = False
        if private and self.zap_leafs(self.mirror, start, end):
            flush = True
        if shared and self.zap_leafs(self.direct, start + bits, end + bits):
            flush = True
        return flush
