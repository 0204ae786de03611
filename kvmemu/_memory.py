"""A VM's memory bookkeeping, written once for both cores.

Everything here changes only when userspace changes the VM (an ioctl), never per
access: memslot create, move, flags change and delete (the tail of
``kvm_set_memory_region`` and ``kvm_set_memslot``: ``kvm_invalidate_memslot``,
``kvm_swap_active_memslots``), the x86 memslot metadata
(``kvm_alloc_memslot_metadata``, x86.c), the memory attribute store
(``kvm_vm_set_mem_attributes``, kvm_main.c) with the x86 hooks
``kvm_arch_pre_set_memory_attributes``, ``kvm_arch_post_set_memory_attributes``
and ``kvm_mmu_init_memslot_memory_attributes`` (mmu.c), the writing side of
the invalidation protocol (``kvm_mmu_invalidate_begin/range_add/end``), the
memslot generation, and snapshots.  Linux 6.18 throughout.

What the fault path reads is kept in numpy arrays that the core reads in place:

* ``counters`` (uint64, indexed by ``VmCounter``): the invalidation sequence,
  the in-progress count, the invalidated gfn range, the generations;
* each slot's ``lpage`` arrays (uint32 ``lpage_info[level].disallow_lpage``).

The memory attributes live in the core (``Memslots.store_attributes``; the
compiled core keeps the ranges in chunks and rewrites the ones around a change).
After each memslot change the core's ``Memslots`` is told what changed
(``publish_changes``: the compiled core copies only the chunk of records it
touches); its hot lookups
(``gfn_to_memslot``, ``get_memory_attributes``, ``range_has_memory_attributes``,
``mmu_invalidate_retry_gfn``) are the per-access rules, one per core.  The
zaps go to the core's ``TdpMmu``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any, Iterator, NamedTuple

import numpy as np

from ._pure.levels import gfn_round_for_level, gfn_to_index, pages_per_hpage
from .constants import (GMEM_FILE_PAGES, GMEM_PFN_BASE, HOST_MAXPHYADDR, INVALID_GPA,
                        KVM_MMU_MAX_GFN, NPT_MMIO_VALUE, KVM_LPAGE_MIXED_FLAG,
                        KVM_MAX_HUGEPAGE_LEVEL, KVM_MEMSLOT_GMEM_ONLY, MMIO_SPTE_GEN_MASK,
                        PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_2M, PG_LEVEL_4K, DirtyLogManual, MemAttr,
                        MemFlag, Quirk, VmCounter, ZapReason)

_PRIVATE = MemAttr.PRIVATE.value
_MIXED = np.uint32(KVM_LPAGE_MIXED_FLAG)
_NOT_MIXED = np.uint32(~KVM_LPAGE_MIXED_FLAG & 0xFFFF_FFFF)
#: The levels that have lpage_info: 2M .. KVM_MAX_HUGEPAGE_LEVEL.
HUGE_LEVELS = tuple(range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1))
_SEQ, _IN_PROGRESS = VmCounter.MMU_INVALIDATE_SEQ, VmCounter.MMU_INVALIDATE_IN_PROGRESS
_RANGE_START, _RANGE_END = VmCounter.MMU_INVALIDATE_RANGE_START, VmCounter.MMU_INVALIDATE_RANGE_END
_LOG = MemFlag.LOG_DIRTY_PAGES.value
_READONLY = MemFlag.READONLY.value
_ALL_ONES = (1 << 64) - 1


class VMConfig(NamedTuple):
    """What the cores need to know about a VM, fixed when it is created."""

    ept: bool                  # VMX (EPT) or SVM (NPT)
    tdx: bool
    sw_protected: bool
    snp: bool
    has_private_mem: bool      # kvm_arch_has_private_mem
    nr_memslot_as_ids: int     # kvm_arch_nr_memslot_as_ids: 2 with SMM, 1 with private memory
    levels: int                # the TDP root level, 4 or 5
    direct_bits_gfn: int       # kvm_gfn_direct_bits: the TDX shared bit as a gfn mask
    nx_huge_pages: bool
    default_vm: bool = False   # KVM_X86_DEFAULT_VM (kvm_memslot_flush_zap_all asks)
    pml: bool = False          # kvm->arch.cpu_dirty_log_size != 0 (VMX with enable_pml)
    eager_page_split: bool = True   # the eager_page_split module parameter (x86.c)
    pre_fault_allowed: bool = True  # kvm->arch.pre_fault_allowed at creation
    # From the host (kvmemu._host.host_config); the defaults are the default Host().
    ad_enabled: bool = True         # kvm_ad_enabled
    mmio_caching: bool = True       # enable_mmio_caching
    npt_mmio_value: int = NPT_MMIO_VALUE   # NPT shadow_mmio_value = shadow_mmio_mask
    max_gfn: int = KVM_MMU_MAX_GFN  # kvm_mmu_max_gfn()
    table_maxphyaddr: int = HOST_MAXPHYADDR  # the CPU walk's MAXPHYADDR
    pfn_mask: int = GMEM_PFN_BASE - 1        # the frames of user memory (lower half)
    gmem_base: int = GMEM_PFN_BASE           # the first guest_memfd frame (upper half)
    gmem_file_pages: int = GMEM_FILE_PAGES   # the frames of one guest_memfd file


class Slot:
    """A user memslot (struct kvm_memory_slot) with its x86 lpage_info."""

    __slots__ = ("as_id", "id", "base_gfn", "npages", "flags", "userspace_addr", "gmem_id",
                 "gmem_pgoff", "host_level", "lpage", "dirty_bitmap", "gmem_closed",
                 "published")

    def __init__(self, as_id: int, slot_id: int, base_gfn: int, npages: int, flags: int,
                 userspace_addr: int, gmem_id: int, gmem_pgoff: int, host_level: int) -> None:
        self.as_id = as_id
        self.id = slot_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.flags = flags
        self.userspace_addr = userspace_addr
        self.gmem_id = gmem_id            # -1: no guest_memfd
        self.gmem_pgoff = gmem_pgoff
        self.host_level = host_level
        #: lpage_info[level - 2].disallow_lpage as uint32 arrays, 2M then 1G: a count of
        #: reasons in bits 30:0, KVM_LPAGE_MIXED_FLAG in bit 31.
        self.lpage: list[np.ndarray] = []
        #: memslot->dirty_bitmap: uint64 words, bit i = page i; None without dirty logging.
        self.dirty_bitmap: np.ndarray | None = None
        #: slot->gmem.file is NULL: its guest_memfd was closed (kvm_gmem_release).
        self.gmem_closed = False
        #: The base gfn the core's current SlotTable has it at; None: not published.
        self.published: int | None = None

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def gmem_only(self) -> bool:
        """KVM_MEMSLOT_GMEM_ONLY: bound to a guest_memfd created with MMAP."""
        return bool(self.flags & KVM_MEMSLOT_GMEM_ONLY)

    def lpage_entry(self, gfn: int, level: int) -> int:
        return int(self.lpage[level - PG_LEVEL_2M][gfn_to_index(gfn, self.base_gfn, level)])

    def clone(self) -> "Slot":
        c = Slot(self.as_id, self.id, self.base_gfn, self.npages, self.flags,
                 self.userspace_addr, self.gmem_id, self.gmem_pgoff, self.host_level)
        c.lpage = [linfo.copy() for linfo in self.lpage]
        c.dirty_bitmap = None if self.dirty_bitmap is None else self.dirty_bitmap.copy()
        c.gmem_closed = self.gmem_closed
        return c

    def __repr__(self) -> str:
        return f"Slot(as_id={self.as_id}, id={self.id}, gfns={self.base_gfn:#x}+{self.npages:#x})"


class GmemBindings:
    """The ranges of one guest_memfd file bound to memslots (kvm_gmem_bind's
    ``gmem->bindings`` xarray, guest_memfd.c, 6.18): file page ranges [first, stop), by
    memslot key (as_id, slot id).  The ranges never overlap, so sorted by ``first`` they
    are sorted by ``stop`` too: an overlap check or a range query bisects."""

    __slots__ = ("by_key", "firsts", "entries")

    def __init__(self) -> None:
        self.by_key: dict[tuple[int, int], tuple[int, int]] = {}
        self.firsts: list[int] = []
        self.entries: list[tuple[int, int, tuple[int, int]]] = []

    def copy(self) -> GmemBindings:
        c = GmemBindings()
        c.by_key, c.firsts, c.entries = dict(self.by_key), list(self.firsts), list(self.entries)
        return c

    def overlaps(self, first: int, stop: int) -> bool:
        """A bound range intersects [first, stop) (kvm_gmem_bind's xa_find)."""
        i = bisect_left(self.firsts, stop)       # the ranges starting before stop
        return i > 0 and self.entries[i - 1][1] > first

    def add(self, key: tuple[int, int], first: int, stop: int) -> None:
        i = bisect_left(self.firsts, first)
        self.firsts.insert(i, first)
        self.entries.insert(i, (first, stop, key))
        self.by_key[key] = (first, stop)

    def remove(self, key: tuple[int, int]) -> None:
        first, _ = self.by_key.pop(key)
        i = bisect_left(self.firsts, first)
        del self.firsts[i], self.entries[i]

    def in_range(self, start: int, end: int) -> list[tuple[int, int, tuple[int, int]]]:
        """The bound ranges that intersect [start, end), in file order."""
        i = bisect_right(self.firsts, start)
        if i and self.entries[i - 1][1] > start:
            i -= 1
        j = bisect_left(self.firsts, end, lo=i)
        return self.entries[i:j]


def new_page_tables(core: Any, config: VMConfig) -> Any:
    """The second-stage paging structures KVM builds on the host: EPT with execute-only and
    1G pages, A/D bits in the EPTP when the host has them (construct_eptp), or long-mode
    NPT with host NX; the walk's MAXPHYADDR is the host's (for NPT with memory
    encryption, the reduced width)."""
    return core.PageTables("ept" if config.ept else "npt", config.levels,
                           ad_bits=config.ad_enabled, exec_only=True, mbec=False,
                           maxphyaddr=config.table_maxphyaddr, huge_1g=True, host_nx=True,
                           host_smep=False)


class Held:
    """``with`` a lock held: ``acquire()`` on entry, ``release()`` on exit (kvm->mmu_lock
    for write, a vCPU's mutex, ...)."""

    __slots__ = ("acquire", "release")

    def __init__(self, acquire: Any, release: Any) -> None:
        self.acquire = acquire
        self.release = release

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class VMMemory:
    """All of a VM's memory state, over one core's ``Memslots`` and ``TdpMmu``."""

    def __init__(self, core: Any, config: VMConfig) -> None:
        self.core = core
        self.config = config
        self.supported_attributes = _PRIVATE if config.has_private_mem else 0
        self.nr_as_ids = config.nr_memslot_as_ids
        self.counters = np.zeros(VmCounter.COUNT, dtype=np.uint64)
        self.counters[_RANGE_START] = self.counters[_RANGE_END] = INVALID_GPA
        # kvm_create_vm: address space i starts at generation i.
        for as_id in range(self.nr_as_ids):
            self.counters[VmCounter.GENERATION_0 + as_id] = as_id
        # kvm->arch.pre_fault_allowed from vm_init; a VM without a launch is launched.
        self.counters[VmCounter.PRE_FAULT_ALLOWED] = config.pre_fault_allowed
        self.counters[VmCounter.LAUNCHED] = not (config.tdx or config.snp)
        self._slots: list[dict[int, Slot]] = [{} for _ in range(self.nr_as_ids)]
        # Per address space: slots sorted by base gfn, and their bases for bisect.
        self._sorted: list[list[Slot]] = [[] for _ in range(self.nr_as_ids)]
        self._bases: list[list[int]] = [[] for _ in range(self.nr_as_ids)]
        # Slots being deleted or moved (KVM_MEMSLOT_INVALID): no fault finds them.
        self._invalid: set[tuple[int, int]] = set()
        #: kvm->arch.disabled_quirks (the VM layer sets it at creation and on
        #: KVM_CAP_DISABLE_QUIRKS2).
        self.disabled_quirks = 0
        #: kvm->manual_dirty_log_protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's argument).
        self.manual_dirty_log_protect = 0
        #: The guest_memfd files (by index) that were closed.
        self.gmem_closed_files: set[int] = set()
        self.mmu = core.TdpMmu(config, lambda: new_page_tables(core, config))
        self.memslots = core.Memslots(config, self.counters)
        self._publish_slots(synchronize=False)

    def _publish_slots(self, synchronize: bool = True) -> None:
        """Hand the core address space 0's usable slots; with ``synchronize``, return
        when no fault reads the slots it replaced (synchronize_srcu)."""
        usable = [s for s in self._sorted[0] if (0, s.id) not in self._invalid]
        for slot in self._sorted[0]:
            slot.published = None
        for slot in usable:
            slot.published = slot.base_gfn
        self.memslots.publish_slots(usable, synchronize)

    def _publish_change(self, slots: list[Slot], synchronize: bool = True) -> None:
        """Publish what changed for ``slots`` of address space 0 (each dropped from where
        the core had it, and published again if still usable): the core copies only the
        records it touches."""
        removed, added = [], []
        for slot in dict.fromkeys(slots):
            if slot.published is not None:
                removed.append((slot.published, slot))
            usable = (self._slots[0].get(slot.id) is slot
                      and (0, slot.id) not in self._invalid)
            slot.published = slot.base_gfn if usable else None
            if usable:
                added.append(slot)
        self.memslots.publish_changes(removed, added, synchronize)


    def mmu_write_locked(self, reason: int = 0) -> Held:
        """write_lock(&kvm->mmu_lock) ... write_unlock, as a ``with`` block: no fault maps
        and no walk reads the tables meanwhile.  ``reason``: the ZapReason of the
        mappings the block removes or reduces (for VM.on_zap)."""
        mmu = self.mmu
        lock = mmu.mmu_lock
        if not reason:
            return Held(lock.acquire_write, lock.release_write)

        def acquire() -> None:
            lock.acquire_write()
            mmu.zap_reason = reason

        def release() -> None:
            mmu.zap_reason = 0
            lock.release_write()
        return Held(acquire, release)

    def clone(self) -> "VMMemory":
        """A deep copy, with a copy of the core's MMU (tables included) and a new
        ``Memslots`` reading the copy.  The tracer is not part of the state."""
        c = VMMemory.__new__(VMMemory)
        c.core, c.config = self.core, self.config
        c.supported_attributes, c.nr_as_ids = self.supported_attributes, self.nr_as_ids
        with self.mmu_write_locked():
            c.counters = self.counters.copy()
            c.mmu = self.mmu.clone()
        c._invalid = set(self._invalid)
        c.disabled_quirks = self.disabled_quirks
        c.manual_dirty_log_protect = self.manual_dirty_log_protect
        c.gmem_closed_files = set(self.gmem_closed_files)
        c._slots = [{slot_id: s.clone() for slot_id, s in slots.items()} for slots in self._slots]
        c._sorted = [[] for _ in range(self.nr_as_ids)]
        c._bases = [[] for _ in range(self.nr_as_ids)]
        for as_id in range(self.nr_as_ids):
            c._reindex(as_id)
        c.memslots = self.core.Memslots(self.config, c.counters)
        c._publish_slots(synchronize=False)
        c.memslots.copy_attributes(self.memslots)
        with self.mmu_write_locked():           # faults update frames under mmu_lock
            c.memslots.copy_frames(self.memslots)
        return c

    # --- guest_memfd frames (folio state, the SNP RMP, TDX page states) -------------------

    def free_gmem_folios(self, index: int, start: int, end: int) -> None:
        """The folios of pages [start, end) of guest_memfd ``index`` leave its page cache
        (truncate_inode_pages_range in kvm_gmem_punch_hole, guest_memfd.c, 6.18): each
        goes through kvm_gmem_free_folio, whose sev_gmem_invalidate (svm/sev.c) makes an
        assigned RMP entry shared again (rmp_make_shared: every field 0); the page is no
        longer prepared, and no Secure-EPT entry maps it any more (the zap removed it)."""
        with self.mmu_write_locked():
            self.memslots.clear_frames(index, start, end)

    # --- the counters (struct kvm) ------------------------------------------------------

    @property
    def mmu_invalidate_seq(self) -> int:
        return int(self.counters[_SEQ])

    @property
    def mmu_invalidate_in_progress(self) -> int:
        return int(self.counters[_IN_PROGRESS])

    @property
    def mmu_invalidate_range(self) -> tuple[int, int]:
        return int(self.counters[_RANGE_START]), int(self.counters[_RANGE_END])

    def generation(self, as_id: int) -> int:
        return int(self.counters[VmCounter.GENERATION_0 + as_id])

    # --- memslots -----------------------------------------------------------------------

    def _reindex(self, as_id: int) -> None:
        ordered = sorted(self._slots[as_id].values(), key=lambda s: s.base_gfn)
        self._sorted[as_id] = ordered
        self._bases[as_id] = [s.base_gfn for s in ordered]

    def _resort(self, as_id: int, slot: Slot, old_base: int | None) -> None:
        """Keep address space ``as_id``'s slots sorted after ``slot`` changed: out of its
        old place (``old_base``, None if it was not there), into its new one if it is
        still a slot (a binary search and a list move each)."""
        ordered, bases = self._sorted[as_id], self._bases[as_id]
        if old_base is not None:
            i = bisect_left(bases, old_base)
            while ordered[i] is not slot:
                i += 1
            del ordered[i], bases[i]
        if self._slots[as_id].get(slot.id) is slot:
            i = bisect_right(bases, slot.base_gfn)
            ordered.insert(i, slot)
            bases.insert(i, slot.base_gfn)

    def find_slot(self, as_id: int, gfn: int) -> Slot | None:
        """The memslot of address space ``as_id`` containing ``gfn`` (a binary search)."""
        i = bisect_right(self._bases[as_id], gfn) - 1
        if i >= 0:
            slot = self._sorted[as_id][i]
            if gfn < slot.end_gfn:
                return slot
        return None

    def slot_by_id(self, as_id: int, slot_id: int) -> Slot | None:
        return self._slots[as_id].get(slot_id)

    def slots(self, as_id: int) -> list[Slot]:
        return list(self._sorted[as_id])

    def lpage_info(self, as_id: int, slot_id: int, level: int) -> list[int]:
        return self._slots[as_id][slot_id].lpage[level - PG_LEVEL_2M].tolist()

    def slots_in_range(self, as_id: int, start: int, end: int) -> Iterator[Slot]:
        """Slots intersecting [start, end), in gfn order (kvm_for_each_memslot_in_gfn_range)."""
        i = max(bisect_right(self._bases[as_id], start) - 1, 0)
        for slot in self._sorted[as_id][i:]:
            if slot.base_gfn >= end:
                break
            if slot.end_gfn > start:
                yield slot

    def overlaps(self, as_id: int, slot_id: int, start: int, end: int) -> bool:
        """kvm_check_memslot_overlap: another slot of the address space intersects."""
        return any(s.id != slot_id for s in self.slots_in_range(as_id, start, end))

    def swap_active_memslots(self, as_id: int) -> None:
        """kvm_swap_active_memslots: the generation advances by the number of address spaces.

        kvm_mmu_invalidate_mmio_sptes: when the MMIO generation wraps to 0, every SPTE
        goes (kvm_mmu_zap_all_fast) so that no stale MMIO SPTE can match again.
        """
        index = VmCounter.GENERATION_0 + as_id
        self.counters[index] += self.nr_as_ids
        if not int(self.counters[index]) & MMIO_SPTE_GEN_MASK & ~(self.nr_as_ids - 1):
            with self.mmu_write_locked(ZapReason.ZAP_ALL):
                self.mmu.zap_all_fast()

    def _changed(self, as_id: int, slot: Slot, old_base: int | None) -> None:
        """``slot`` of ``as_id`` changed (it was at ``old_base``): re-sort, publish
        (waiting for the faults that read the old slots), swap (one generation step)."""
        self._resort(as_id, slot, old_base)
        if as_id == 0:
            self._publish_change([slot])
        self.swap_active_memslots(as_id)

    def create_slot(self, as_id: int, slot_id: int, base_gfn: int, npages: int, flags: int,
                    userspace_addr: int, gmem_id: int, gmem_pgoff: int, host_level: int) -> None:
        """KVM_MR_CREATE: metadata (kvm_alloc_memslot_metadata), install, one swap."""
        slot = Slot(as_id, slot_id, base_gfn, npages, flags, userspace_addr, gmem_id, gmem_pgoff,
                    host_level)
        self._alloc_metadata(slot)
        slot.dirty_bitmap = self._prepare_dirty_bitmap(slot, flags)
        self._slots[as_id][slot_id] = slot
        self._changed(as_id, slot, None)
        self._count_dirty_logging(0, flags)

    def invalidate_slot(self, as_id: int, slot_id: int) -> None:
        """kvm_invalidate_memslot (DELETE / MOVE): swap in the INVALID copy (faults no
        longer find the slot, and those that did have finished), then
        kvm_arch_flush_shadow_memslot.  Both run before the prepare step, so a MOVE that
        then fails has zapped too."""
        slot = self._slots[as_id][slot_id]
        self._invalid.add((as_id, slot_id))
        if as_id == 0:
            self._publish_change([slot])
        self.swap_active_memslots(as_id)
        self.flush_shadow_memslot(slot)

    def disable_quirks(self, mask: int) -> None:
        """kvm->arch.disabled_quirks |= mask (KVM_CAP_DISABLE_QUIRKS2, x86.c, 6.18; the
        caller checked ``mask``), and what the MMU reads of it: the IGNORE_GUEST_PAT quirk
        for the leaves made from now on (vmx_get_mt_mask)."""
        with self.mmu_write_locked():
            self.disabled_quirks |= mask
            self.mmu.set_ignore_guest_pat(not self.disabled_quirks & Quirk.IGNORE_GUEST_PAT)

    def memslot_flush_zap_all(self) -> bool:
        """kvm_memslot_flush_zap_all (mmu.c, 6.18): a DEFAULT VM whose SLOT_ZAP_ALL quirk
        is on (kvm_check_has_quirk)."""
        return self.config.default_vm and not self.disabled_quirks & Quirk.SLOT_ZAP_ALL

    def flush_shadow_memslot(self, slot: Slot) -> None:
        """kvm_arch_flush_shadow_memslot (mmu.c, 6.18): kvm_mmu_zap_all_fast when
        kvm_memslot_flush_zap_all() holds (a DEFAULT VM with the SLOT_ZAP_ALL quirk), which
        takes every mapping of every slot and address space; otherwise
        kvm_mmu_zap_memslot, only the slot's own gfns."""
        if self.memslot_flush_zap_all():
            with self.mmu_write_locked(ZapReason.ZAP_ALL):
                self.mmu.zap_all_fast()
        else:
            self.zap_memslot(slot)

    def reactivate_slot(self, as_id: int, slot_id: int) -> None:
        """A DELETE / MOVE whose prepare step failed: the old slot is swapped back in."""
        self._invalid.discard((as_id, slot_id))
        if as_id == 0:
            self._publish_change([self._slots[as_id][slot_id]])
        self.swap_active_memslots(as_id)

    def delete_slot(self, as_id: int, slot_id: int) -> None:
        """KVM_MR_DELETE after kvm_invalidate_memslot."""
        old = self._slots[as_id].pop(slot_id)
        self._invalid.discard((as_id, slot_id))
        self._changed(as_id, old, old.base_gfn)
        self._count_dirty_logging(old.flags, 0)

    def move_slot(self, as_id: int, slot_id: int, base_gfn: int, flags: int) -> None:
        """KVM_MR_MOVE after kvm_invalidate_memslot: new metadata at the new base."""
        slot = self._slots[as_id][slot_id]
        old_flags, old_base = slot.flags, slot.base_gfn
        slot.base_gfn = base_gfn
        slot.dirty_bitmap = self._prepare_dirty_bitmap(slot, flags)
        slot.flags = flags
        self._alloc_metadata(slot)
        self._invalid.discard((as_id, slot_id))
        self._changed(as_id, slot, old_base)
        self._count_dirty_logging(old_flags, flags)

    def set_slot_flags(self, as_id: int, slot_id: int, flags: int) -> None:
        """KVM_MR_FLAGS_ONLY (only LOG_DIRTY_PAGES can change): the metadata is kept (memcpy
        of slot->arch), the dirty bitmap made or dropped, one swap, then
        kvm_mmu_slot_apply_flags.  Nothing is zapped."""
        slot = self._slots[as_id][slot_id]
        old_flags = slot.flags
        slot.dirty_bitmap = self._prepare_dirty_bitmap(slot, flags)
        slot.flags = flags
        self._changed(as_id, slot, slot.base_gfn)
        self._count_dirty_logging(old_flags, flags)
        self._slot_apply_flags(slot, old_flags, flags)

    # --- dirty logging -------------------------------------------------------------------

    def _prepare_dirty_bitmap(self, slot: Slot, flags: int) -> np.ndarray | None:
        """The dirty bitmap kvm_prepare_memory_region (kvm_main.c, 6.18) gives the new slot:
        none without LOG_DIRTY_PAGES; the old one, bits and all, if the slot logged
        already (a MOVE too); else a new one (kvm_alloc_dirty_bitmap: zeroed, one bit per
        page in 64-bit words), with every page's bit set under INITIALLY_SET."""
        if not flags & _LOG:
            return None
        if slot.dirty_bitmap is not None:
            return slot.dirty_bitmap
        bitmap = np.zeros((slot.npages + 63) // 64, dtype=np.uint64)
        if self.manual_dirty_log_protect & DirtyLogManual.INITIALLY_SET:
            bitmap[:slot.npages // 64] = _ALL_ONES
            if slot.npages % 64:
                bitmap[-1] = (1 << slot.npages % 64) - 1
        return bitmap

    def _count_dirty_logging(self, old_flags: int, new_flags: int) -> None:
        """kvm_commit_memory_region (kvm_main.c, 6.18): kvm->nr_memslots_dirty_logging
        follows LOG_DIRTY_PAGES (while it is not 0, PML is on in the vCPUs' VMCS)."""
        if (old_flags ^ new_flags) & _LOG:
            index = VmCounter.NR_MEMSLOTS_DIRTY_LOGGING
            self.counters[index] = int(self.counters[index]) + (1 if new_flags & _LOG else -1)

    def _slot_apply_flags(self, slot: Slot, old_flags: int, new_flags: int) -> None:
        """kvm_mmu_slot_apply_flags for KVM_MR_FLAGS_ONLY (x86.c, 6.18), under mmu_lock.
        Nothing for a READONLY slot.  Logging stops: the huge pages come back
        (kvm_mmu_recover_huge_pages).  Logging starts: nothing under INITIALLY_SET (every
        page counts as dirty); else eager_page_split splits huge pages to 4K, then with
        PML the leaves' dirty bits are cleared and huge leaves write-protected, without
        PML every leaf is write-protected.  Address space 1 (SMM) has no roots here."""
        if new_flags & _READONLY or slot.as_id != 0:
            return
        start, end = slot.base_gfn, slot.end_gfn
        with self.mmu_write_locked(ZapReason.DIRTY_LOG):
            if not new_flags & _LOG:
                self.mmu.recover_huge_pages(slot, start, end)
                return
            if self.manual_dirty_log_protect & DirtyLogManual.INITIALLY_SET:
                return
            if self.config.eager_page_split:
                self.mmu.try_split_huge_pages(start, end, PG_LEVEL_4K)
            if self.config.pml:
                self.mmu.clear_dirty_slot(start, end)
                self.mmu.wrprot_slot(start, end, PG_LEVEL_2M)
            else:
                self.mmu.wrprot_slot(start, end, PG_LEVEL_4K)

    def enable_log_dirty_pt_masked(self, slot: Slot, offset: int, mask: int) -> None:
        """kvm_arch_mmu_enable_log_dirty_pt_masked (mmu.c, 6.18), mmu_lock held for write:
        the pages of ``mask`` (64 pages from page ``offset`` of the slot) are protected
        again.  Under INITIALLY_SET the huge pages at the mask's first and last page are
        split (eager_page_split) and write-protected with MMU-writable cleared first.
        With PML their dirty bits are cleared, else W."""
        if slot.as_id != 0:
            return
        gfn = slot.base_gfn + offset
        if self.manual_dirty_log_protect & DirtyLogManual.INITIALLY_SET:
            start = gfn + ((mask & -mask).bit_length() - 1)
            end = gfn + (mask.bit_length() - 1)
            if self.config.eager_page_split:
                self.mmu.try_split_huge_pages(start, end + 1, PG_LEVEL_4K)
            self.mmu.write_protect_gfn(start, PG_LEVEL_2M)
            if -(-start // 512) != -(-end // 512):          # ALIGN to PMD_SIZE differs
                self.mmu.write_protect_gfn(end, PG_LEVEL_2M)
        self.mmu.clear_dirty_pt_masked(gfn, mask, not self.config.pml)

    def get_dirty_log(self, slot: Slot) -> np.ndarray:
        """kvm_get_dirty_log_protect (kvm_main.c, 6.18) for a slot with a dirty bitmap: with
        manual protection a copy of the bitmap; else each non-zero word is taken (xchg with
        0) and its pages protected again, under mmu_lock.  (kvm_arch_sync_dirty_log only
        kicks running vCPUs; the model's vCPUs flush their PML log when a call ends.)"""
        bitmap = slot.dirty_bitmap
        assert bitmap is not None
        if self.manual_dirty_log_protect:
            return bitmap.copy()
        with self.mmu_write_locked(ZapReason.DIRTY_LOG):
            taken = self.core.xchg_words(bitmap)
            self._enable_log_dirty_words(slot, 0, taken)
        return taken

    def clear_dirty_log(self, slot: Slot, first_page: int, words: np.ndarray) -> None:
        """The clearing part of kvm_clear_dirty_log_protect (kvm_main.c, 6.18), arguments
        checked: under mmu_lock, each word's bits that were set in the bitmap too are
        cleared (atomic_long_fetch_andnot) and those pages protected again."""
        bitmap = slot.dirty_bitmap
        assert bitmap is not None
        with self.mmu_write_locked(ZapReason.DIRTY_LOG):
            cleared = self.core.fetch_andnot_words(bitmap, first_page // 64, words)
            self._enable_log_dirty_words(slot, first_page, cleared)

    def _enable_log_dirty_words(self, slot: Slot, first_page: int, words: np.ndarray) -> None:
        """enable_log_dirty_pt_masked for each non-zero word, in order (the core runs the
        loop when only clear_dirty_pt_masked has work to do)."""
        if slot.as_id != 0:
            return
        if self.manual_dirty_log_protect & DirtyLogManual.INITIALLY_SET:
            for i in np.flatnonzero(words).tolist():
                self.enable_log_dirty_pt_masked(slot, first_page + i * 64, int(words[i]))
        else:
            self.mmu.clear_dirty_pt_masked_words(slot.base_gfn + first_page, words,
                                                 not self.config.pml)

    def zap_memslot(self, slot: Slot) -> bool:
        """kvm_mmu_zap_memslot: unmap the slot's gfns in every root (both filters), under
        mmu_lock for write."""
        with self.mmu_write_locked(ZapReason.MEMSLOT):
            return self.unmap_gfn_range(slot, slot.base_gfn, slot.end_gfn, private=True,
                                        shared=True)

    def unmap_gfn_range(self, slot: Slot, start: int, end: int, *, private: bool,
                        shared: bool) -> bool:
        """kvm_unmap_gfn_range over the slot's address space: the core's TDP MMU zaps
        the roots the attribute filter selects.  SMM's address space has no roots here
        (no vCPU runs in SMM).  The caller holds mmu_lock for write.  Returns whether to
        flush TLBs."""
        if slot.as_id != 0:
            return False
        return bool(self.mmu.unmap_gfn_range(start, end, private, shared))

    def _alloc_metadata(self, slot: Slot) -> None:
        """kvm_alloc_memslot_metadata (x86.c): lpage_info with edge and congruence rules."""
        slot.lpage = []
        ugfn = slot.userspace_addr >> PAGE_SHIFT
        for level in HUGE_LEVELS:
            mask = pages_per_hpage(level) - 1
            lpages = gfn_to_index(slot.end_gfn - 1, slot.base_gfn, level) + 1
            linfo = np.zeros(lpages, dtype=np.uint32)
            if slot.base_gfn & mask:
                linfo[0] = 1
            if slot.end_gfn & mask:
                linfo[lpages - 1] = 1
            if (slot.base_gfn ^ ugfn) & mask:
                linfo[:] = 1
            slot.lpage.append(linfo)
        if self.config.has_private_mem:
            self._init_memslot_memory_attributes(slot)

    # --- mixed hugepage tracking (mmu.c) ---------------------------------------------------

    def _test_mixed(self, slot: Slot, gfn: int, level: int) -> bool:
        """hugepage_test_mixed."""
        return bool(slot.lpage_entry(gfn, level) & KVM_LPAGE_MIXED_FLAG)

    def _set_mixed(self, slot: Slot, gfn: int, level: int, mixed: bool) -> None:
        """hugepage_set_mixed / hugepage_clear_mixed."""
        i = gfn_to_index(gfn, slot.base_gfn, level)
        linfo = slot.lpage[level - PG_LEVEL_2M]
        linfo[i] = (linfo[i] | _MIXED) if mixed else (linfo[i] & _NOT_MIXED)

    def _hugepage_has_attrs(self, slot: Slot, gfn: int, level: int, attrs: int) -> bool:
        """hugepage_has_attrs: 2M reads the attributes, 1G reads the 2M mixed flags and
        the attributes at the start of each 2M page (all 512 at once)."""
        n = pages_per_hpage(level)
        if level == PG_LEVEL_2M:
            return bool(self.memslots.range_has_memory_attributes(gfn, gfn + n, ~0, attrs))
        first = gfn_to_index(gfn, slot.base_gfn, level - 1)
        step = pages_per_hpage(level - 1)
        if (slot.lpage[level - 1 - PG_LEVEL_2M][first:first + n // step] & _MIXED).any():
            return False
        starts = np.arange(gfn, gfn + n, step, dtype=np.uint64)
        return bool((self._attributes_at(starts) == attrs).all())

    def _attributes_at(self, gfns: np.ndarray) -> np.ndarray:
        """kvm_get_memory_attributes for each element of ``gfns``."""
        return self.memslots.attributes_at(np.ascontiguousarray(gfns, dtype=np.uint64))

    def _init_memslot_memory_attributes(self, slot: Slot) -> None:
        """kvm_mmu_init_memslot_memory_attributes, for every hugepage fully inside the slot.

        A hugepage has uniform attributes (hugepage_has_attrs at 2M, and at 1G given
        exact 2M flags) exactly when no attribute change point lies strictly inside
        it, so only the pages around change points are visited.
        """
        for level in HUGE_LEVELS:
            n = pages_per_hpage(level)
            first = gfn_round_for_level(slot.base_gfn, level)
            if first < slot.base_gfn:
                first += n
            last = gfn_round_for_level(slot.end_gfn, level)
            for point in self._change_points(slot.base_gfn, slot.end_gfn):
                gfn = gfn_round_for_level(point, level)
                if gfn != point and first <= gfn < last:
                    self._set_mixed(slot, gfn, level, True)

    def _change_points(self, start: int, end: int) -> Iterator[int]:
        """gfns g in (start, end) where attributes(g - 1) != attributes(g)."""
        for s, e, _ in self.memslots.attribute_ranges(start, end):
            for point in (s, e):
                if start < point < end:
                    yield point

    def _pre_set_memory_attributes(self, slot: Slot, start: int, end: int, attrs: int) -> bool:
        """kvm_pre_set_memory_attributes + kvm_arch_pre_set_memory_attributes (the range
        clipped to the slot): the invalidated range grows to the hugepages that straddle
        it and are not mixed yet, then the mappings of the old state are zapped."""
        self.invalidate_range_add(start, end)
        for level in HUGE_LEVELS:
            n = pages_per_hpage(level)
            head = gfn_round_for_level(start, level)
            tail = gfn_round_for_level(end - 1, level)
            if ((head != start or head + n > end) and head >= slot.base_gfn
                    and head + n <= slot.end_gfn and not self._test_mixed(slot, head, level)):
                self.invalidate_range_add(head, head + n)
            if tail == head:
                continue
            if (tail + n > end and tail + n <= slot.end_gfn
                    and not self._test_mixed(slot, tail, level)):
                self.invalidate_range_add(tail, tail + n)
        # The filter names the *old* state: making memory private unmaps shared mappings.
        to_private = bool(attrs & _PRIVATE)
        return self.unmap_gfn_range(slot, start, end, private=not to_private, shared=to_private)

    def _post_set_memory_attributes(self, slot: Slot, start: int, end: int, attrs: int) -> None:
        """kvm_arch_post_set_memory_attributes: 2M first, 1G reads the 2M results."""
        for level in HUGE_LEVELS:
            n = pages_per_hpage(level)
            gfn = gfn_round_for_level(start, level)
            if gfn != start or gfn + n > end:  # the head page straddles the range
                if gfn >= slot.base_gfn and gfn + n <= slot.end_gfn:
                    self._set_mixed(slot, gfn, level,
                                    not self._hugepage_has_attrs(slot, gfn, level, attrs))
                gfn += n
            if gfn + n <= end:  # pages entirely covered have only the new attributes
                first = gfn_to_index(gfn, slot.base_gfn, level)
                count = (end - gfn) // n
                slot.lpage[level - PG_LEVEL_2M][first:first + count] &= _NOT_MIXED
                gfn += count * n
            if gfn < end and gfn + n <= slot.end_gfn:  # the tail page straddles the range
                self._set_mixed(slot, gfn, level,
                                not self._hugepage_has_attrs(slot, gfn, level, attrs))

    # --- memory attributes (kvm_main.c) --------------------------------------------------

    def attribute_ranges(self) -> list[tuple[int, int, int]]:
        return [(int(s), int(e), int(v)) for s, e, v in self.memslots.attribute_ranges()]

    def set_memory_attributes(self, start: int, end: int, attrs: int) -> None:
        """kvm_vm_set_mem_attributes for a validated gfn range [start, end)."""
        if self.memslots.range_has_memory_attributes(start, end, ~0, attrs):
            return
        touched = [(slot, max(start, slot.base_gfn), min(end, slot.end_gfn))
                   for as_id in range(self.nr_as_ids)
                   for slot in self.slots_in_range(as_id, start, end)]
        begun = stored = False
        try:
            if touched:
                with self.mmu_write_locked(ZapReason.ATTRIBUTES):
                    self.invalidate_begin()
                    begun = True
                    for slot, s, e in touched:
                        self._pre_set_memory_attributes(slot, s, e, attrs)
            # The xarray's update, which faults read under RCU: here under mmu_lock for
            # write, since access_many's GIL-free loop reads the store holding it for read.
            self.memslots.store_attributes(start, end, attrs, self.mmu.mmu_lock)
            stored = True
        finally:
            # Even when interrupted (Ctrl-C): the invalidation ends, and the mixed flags
            # follow what was stored, so no fault is left retrying for good.
            if begun:
                with self.mmu_write_locked():
                    self.invalidate_end()
                    if stored:
                        for slot, s, e in touched:
                            self._post_set_memory_attributes(slot, s, e, attrs)

    # --- host (MMU-notifier) invalidations (virt/kvm/kvm_main.c) ---------------------------

    def hva_ranges(self, start: int, end: int) -> list[tuple[Slot, int, int]]:
        """The pieces of the host range [start, end) that memslots map, as
        ``(slot, first gfn, end gfn)``, address space by address space, slots in host
        address order (kvm_handle_hva_range's interval-tree walk): the host range is
        clipped to the slot and turned into gfns (hva_to_gfn_memslot), the end rounded up
        to a page.  guest_memfd slots are in the tree too."""
        pieces = []
        for as_id in range(self.nr_as_ids):
            for slot in sorted(self._slots[as_id].values(),
                               key=lambda s: (s.userspace_addr, s.base_gfn)):
                slot_end = slot.userspace_addr + (slot.npages << PAGE_SHIFT)
                hva_start, hva_end = max(start, slot.userspace_addr), min(end, slot_end)
                if hva_start < hva_end:
                    first = slot.base_gfn + ((hva_start - slot.userspace_addr) >> PAGE_SHIFT)
                    last = slot.base_gfn + ((hva_end + PAGE_SIZE - 1 - slot.userspace_addr)
                                            >> PAGE_SHIFT)
                    pieces.append((slot, first, last))
        return pieces

    def invalidate_host_range_start(self, start: int, end: int) -> bool:
        """kvm_mmu_notifier_invalidate_range_start (kvm_main.c, 6.18), under mmu_lock: if a
        memslot maps part of the host range, one kvm_mmu_invalidate_begin, then per piece
        kvm_mmu_invalidate_range_add and kvm_unmap_gfn_range with the SHARED filter (which
        only a TD's roots tell apart: on other VMs private mappings in the range go too).
        No memslot: nothing at all, mmu_invalidate_seq stays.  Returns whether one was
        found (the end does its half only then)."""
        pieces = self.hva_ranges(start, end)
        if not pieces:
            return False
        self.invalidate_pieces(pieces, private=False, shared=True, reason=ZapReason.HOST)
        return True

    def invalidate_pieces(self, pieces: list[tuple[Slot, int, int]], *, private: bool,
                          shared: bool, reason: int) -> None:
        """The start that the MMU notifier and guest_memfd share (kvm_handle_hva_range,
        __kvm_gmem_invalidate_begin), under mmu_lock: one kvm_mmu_invalidate_begin, then
        per piece kvm_mmu_unmap_gfn_range (kvm_mmu_invalidate_range_add, then
        kvm_unmap_gfn_range with the attribute filter); ``reason`` for VM.on_zap."""
        with self.mmu_write_locked(reason):
            self.invalidate_begin()
            for slot, first, last in pieces:
                self.invalidate_range_add(first, last)
                self.unmap_gfn_range(slot, first, last, private=private, shared=shared)

    def invalidate_host_range_end(self) -> None:
        """kvm_mmu_notifier_invalidate_range_end (and __kvm_gmem_invalidate_end) for a start
        that found a memslot: kvm_mmu_invalidate_end under mmu_lock (seq + 1, then
        in_progress - 1)."""
        with self.mmu_write_locked():
            self.invalidate_end()

    def set_host_level(self, slot: Slot, level: int) -> None:
        """A THP collapse or split of the slot's host memory: the host invalidates the
        slot's host range (MMU_NOTIFY_CLEAR: the start zaps its shared mappings), changes
        its page tables, and ends the invalidation; afterwards host_pfn_mapping_level
        finds ``level``.  KVM recovers nothing itself: the next fault maps at the new
        level, replacing a leftover table by a huge leaf."""
        found = self.invalidate_host_range_start(
            slot.userspace_addr, slot.userspace_addr + (slot.npages << PAGE_SHIFT))
        try:
            slot.host_level = level
            if slot.as_id == 0:
                # Not a memslot change: faults that read the old level are inside the
                # invalidation and retry, so nothing waits for them (a THP collapse never
                # waits for kvm->srcu).
                self._publish_change([slot], synchronize=False)
        finally:
            if found:
                self.invalidate_host_range_end()

    # --- guest_memfd invalidations (virt/kvm/guest_memfd.c) ----------------------------------

    def gmem_invalidate(self, pieces: list[tuple[Slot, int, int]], shared_filter: bool,
                        close: bool, freed: tuple[int, int, int] | None = None) -> None:
        """A guest_memfd invalidation over ``pieces`` (each bound slot's gfns in the range,
        in file order): __kvm_gmem_invalidate_begin (begin at the first piece, then
        kvm_mmu_unmap_gfn_range with the PRIVATE filter, or SHARED for an INIT_SHARED
        file), the change itself (``close``: kvm_gmem_release sets slot->gmem.file to
        NULL, so later faults on the slot's guest_memfd memory fail), and
        __kvm_gmem_invalidate_end.  No invalidation when no slot is bound in the range.
        ``freed``: (file, first page, end page) whose folios a punch-hole frees between
        the begin and the end (free_gmem_folios)."""
        if not pieces:
            if freed is not None:
                self.free_gmem_folios(*freed)
            return
        self.invalidate_pieces(pieces, private=not shared_filter, shared=shared_filter,
                               reason=ZapReason.GMEM)
        try:
            if freed is not None:
                self.free_gmem_folios(*freed)
            if close:
                for slot, _, _ in pieces:
                    slot.gmem_closed = True
                self._publish_change([slot for slot, _, _ in pieces if slot.as_id == 0],
                                     synchronize=False)
        finally:
            self.invalidate_host_range_end()

    # --- the invalidation protocol (include/linux/kvm_host.h, kvm_main.c) ----------------

    def invalidate_begin(self) -> None:
        """kvm_mmu_invalidate_begin."""
        self.counters[_IN_PROGRESS] += 1
        if self.counters[_IN_PROGRESS] == 1:
            self.counters[_RANGE_START] = self.counters[_RANGE_END] = INVALID_GPA

    def invalidate_range_add(self, start: int, end: int) -> None:
        """kvm_mmu_invalidate_range_add."""
        c = self.counters
        if c[_RANGE_START] == INVALID_GPA:
            c[_RANGE_START], c[_RANGE_END] = start, end
        else:
            c[_RANGE_START] = min(int(c[_RANGE_START]), start)
            c[_RANGE_END] = max(int(c[_RANGE_END]), end)

    def invalidate_end(self) -> None:
        """kvm_mmu_invalidate_end."""
        self.counters[_SEQ] += 1
        self.counters[_IN_PROGRESS] -= 1
