"""The VM's memory state: memslots, lpage_info, memory attributes, invalidation.

The twin of ``_memory.pxi``.  ``VMState`` holds everything about a VM's memory
that the fault path reads; the thin ``kvmemu.VM`` class validates ioctl
arguments in KVM's order and calls in here only with values KVM would accept.

Models, from Linux 6.18: memslot lookup (``kvm_vcpu_gfn_to_memslot``), the x86
memslot metadata (``kvm_alloc_memslot_metadata``, x86.c), the memory attribute
store and ``kvm_vm_set_mem_attributes`` (virt/kvm/kvm_main.c) with the x86
hooks ``kvm_arch_pre/post_set_memory_attributes`` and
``kvm_mmu_init_memslot_memory_attributes`` (mmu.c), the invalidation protocol
(``kvm_mmu_invalidate_begin/range_add/end``, ``mmu_invalidate_retry_gfn``) and
the memslot generation (``kvm_swap_active_memslots``).
"""

from __future__ import annotations

import copy
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .._vm import gmem_frame
from ..constants import (HOST_MAXPHYADDR, INVALID_GPA, KVM_LPAGE_MIXED_FLAG,
                         KVM_MEMSLOT_GMEM_ONLY, MMIO_SPTE_GEN_MASK, PAGE_SHIFT, MemAttr, MemFlag)
from .levels import gfn_round_for_level, gfn_to_index, pages_per_hpage
from .mmu import SpteFormat, TdpMmu
from .paging import PageTables
from .vcpu import VCPUState

_PRIVATE = MemAttr.PRIVATE.value
_LOG_DIRTY_PAGES = MemFlag.LOG_DIRTY_PAGES.value
#: The levels that have lpage_info: 2M and 1G (KVM_NR_PAGE_SIZES - 1 of them).
HUGE_LEVELS = (2, 3)


@dataclass
class Slot:
    """A user memslot (struct kvm_memory_slot) with its x86 lpage_info."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem_id: int  # -1: no guest_memfd
    gmem_pgoff: int
    host_level: int
    #: lpage_info[level - 2].disallow_lpage as u32: a count of reasons in bits 30:0,
    #: KVM_LPAGE_MIXED_FLAG in bit 31.
    lpage: list[np.ndarray] = field(default_factory=list)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def gmem_only(self) -> bool:
        """KVM_MEMSLOT_GMEM_ONLY: bound to a guest_memfd created with MMAP."""
        return bool(self.flags & KVM_MEMSLOT_GMEM_ONLY)

    def lpage_entry(self, gfn: int, level: int) -> int:
        return int(self.lpage[level - 2][gfn_to_index(gfn, self.base_gfn, level)])


class VMState:
    """All of a VM's memory state (the twin of the compiled ``VMState``)."""

    def __init__(self, has_private_mem: bool, nr_as_ids: int, config: Any) -> None:
        self.config = config
        #: kvm_mmu_max_gfn(): limited by the host MAXPHYADDR with TDP.
        self.max_gfn = (1 << (HOST_MAXPHYADDR - PAGE_SHIFT)) - 1
        self.has_private_mem = has_private_mem
        self.supported_attributes = _PRIVATE if has_private_mem else 0
        self.nr_as_ids = nr_as_ids
        self._slots: list[dict[int, Slot]] = [{} for _ in range(nr_as_ids)]
        # Per address space: slots sorted by base_gfn, and their bases for bisect.
        self._sorted: list[list[Slot]] = [[] for _ in range(nr_as_ids)]
        self._bases: list[list[int]] = [[] for _ in range(nr_as_ids)]
        # kvm_create_vm: address space i starts at generation i.
        self.generation = list(range(nr_as_ids))
        # Memory attributes: disjoint, sorted, merged ranges [start, end) of non-zero value.
        self._attr_starts: list[int] = []
        self._attr_ends: list[int] = []
        self._attr_values: list[int] = []
        # The invalidation protocol (struct kvm).
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = INVALID_GPA
        self.mmu_invalidate_range_end = INVALID_GPA
        self.mmu = TdpMmu(SpteFormat(config.ept, config.tdx), config.levels, config.tdx,
                          config.direct_bits_gfn, config.nx_huge_pages, self._new_page_tables)

    def _new_page_tables(self) -> PageTables:
        """The second-stage paging structures KVM builds for this VM's host: EPT with A/D
        bits, execute-only and 1G pages, or long-mode NPT with host NX; MAXPHYADDR 48."""
        cfg = self.config
        return PageTables("ept" if cfg.ept else "npt", cfg.levels, ad_bits=True, exec_only=True,
                          mbec=False, maxphyaddr=HOST_MAXPHYADDR, huge_1g=True, host_nx=True,
                          host_smep=False)

    def new_vcpu(self) -> VCPUState:
        return VCPUState(self)

    def clone(self) -> "VMState":
        """A deep copy: slots with their lpage_info, attributes, page tables, counters.
        The tracer is not part of the state: the copy has none."""
        tracer, self.mmu.tracer = self.mmu.tracer, None
        try:
            return copy.deepcopy(self)
        finally:
            self.mmu.tracer = tracer

    def clone_vcpus(self, vcpus: list[VCPUState]) -> list[VCPUState]:
        return [vcpu.clone(self) for vcpu in vcpus]

    def gmem_pfn(self, slot: Slot, gfn: int) -> int:
        """The guest_memfd frame backing gfn (kvm_gmem_get_pfn; see GMEM_PFN_BASE)."""
        return gmem_frame(slot.gmem_id, slot.gmem_pgoff + (gfn - slot.base_gfn))

    # --- memslots -----------------------------------------------------------------------

    def _reindex(self, as_id: int) -> None:
        ordered = sorted(self._slots[as_id].values(), key=lambda s: s.base_gfn)
        self._sorted[as_id] = ordered
        self._bases[as_id] = [s.base_gfn for s in ordered]

    def find_slot(self, as_id: int, gfn: int) -> Slot | None:
        """The memslot containing ``gfn`` (a binary search, as __gfn_to_memslot)."""
        i = bisect_right(self._bases[as_id], gfn) - 1
        if i >= 0:
            slot = self._sorted[as_id][i]
            if gfn < slot.end_gfn:
                return slot
        return None

    def find_slots(self, gfns: np.ndarray) -> np.ndarray:
        """Slot ids of address space 0 for an array of gfns, -1 where there is none."""
        found = [self.find_slot(0, gfn) for gfn in gfns.tolist()]
        return np.array([-1 if s is None else s.id for s in found], dtype=np.int32)

    def slot_by_id(self, as_id: int, slot_id: int) -> Slot | None:
        return self._slots[as_id].get(slot_id)

    def slots(self, as_id: int) -> list[Slot]:
        return list(self._sorted[as_id])

    def lpage_info(self, as_id: int, slot_id: int, level: int) -> list[int]:
        return self._slots[as_id][slot_id].lpage[level - 2].tolist()

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
        self.generation[as_id] += self.nr_as_ids
        if not self.generation[as_id] & MMIO_SPTE_GEN_MASK & ~(self.nr_as_ids - 1):
            self.mmu.zap_all()

    def create_slot(self, as_id: int, slot_id: int, base_gfn: int, npages: int, flags: int,
                    userspace_addr: int, gmem_id: int, gmem_pgoff: int, host_level: int) -> None:
        """KVM_MR_CREATE: metadata (kvm_alloc_memslot_metadata), install, one swap."""
        slot = Slot(as_id, slot_id, base_gfn, npages, flags, userspace_addr, gmem_id, gmem_pgoff,
                    host_level)
        self._alloc_metadata(slot)
        self._slots[as_id][slot_id] = slot
        self._reindex(as_id)
        self.swap_active_memslots(as_id)

    def invalidate_slot(self, as_id: int, slot_id: int) -> None:
        """kvm_invalidate_memslot (DELETE / MOVE): swap in the INVALID copy, zap the slot."""
        slot = self._slots[as_id][slot_id]
        self.swap_active_memslots(as_id)
        self.zap_memslot(slot)

    def reactivate_slot(self, as_id: int, slot_id: int) -> None:
        """A DELETE / MOVE whose prepare step failed: the old slot is swapped back in."""
        self.swap_active_memslots(as_id)

    def delete_slot(self, as_id: int, slot_id: int) -> None:
        """KVM_MR_DELETE after kvm_invalidate_memslot."""
        del self._slots[as_id][slot_id]
        self._reindex(as_id)
        self.swap_active_memslots(as_id)

    def move_slot(self, as_id: int, slot_id: int, base_gfn: int, flags: int) -> None:
        """KVM_MR_MOVE after kvm_invalidate_memslot: new metadata at the new base."""
        slot = self._slots[as_id][slot_id]
        slot.base_gfn = base_gfn
        slot.flags = flags
        self._alloc_metadata(slot)
        self._reindex(as_id)
        self.swap_active_memslots(as_id)

    def set_slot_flags(self, as_id: int, slot_id: int, flags: int) -> None:
        """KVM_MR_FLAGS_ONLY: the metadata is kept (memcpy of slot->arch); one swap."""
        slot = self._slots[as_id][slot_id]
        slot.flags = flags
        self.swap_active_memslots(as_id)
        self.zap_memslot(slot)

    def zap_memslot(self, slot: Slot) -> bool:
        """kvm_mmu_zap_memslot: unmap the slot's gfns in every root (both filters)."""
        return self.unmap_gfn_range(slot, slot.base_gfn, slot.end_gfn, private=True, shared=True)

    def unmap_gfn_range(self, slot: Slot, start: int, end: int, *, private: bool,
                        shared: bool) -> bool:
        """kvm_unmap_gfn_range: remove the leaf mappings of [start, end) in the roots of the
        slot's address space that the attribute filter selects (TDX: private → mirror
        root, shared → direct root; every other VM: the one direct root).  SMM's address
        space has no roots here: no vCPU runs in SMM.  Returns whether to flush TLBs."""
        if slot.as_id != 0:
            return False
        return self.mmu.unmap_gfn_range(start, end, private, shared)

    def _alloc_metadata(self, slot: Slot) -> None:
        """kvm_alloc_memslot_metadata (x86.c): lpage_info with edge and congruence rules."""
        slot.lpage = []
        ugfn = slot.userspace_addr >> 12
        for level in HUGE_LEVELS:
            mask = pages_per_hpage(level) - 1
            lpages = gfn_to_index(slot.base_gfn + slot.npages - 1, slot.base_gfn, level) + 1
            linfo = np.zeros(lpages, dtype=np.uint32)
            if slot.base_gfn & mask:
                linfo[0] = 1
            if (slot.base_gfn + slot.npages) & mask:
                linfo[lpages - 1] = 1
            if (slot.base_gfn ^ ugfn) & mask:
                linfo[:] = 1
            slot.lpage.append(linfo)
        if self.has_private_mem:
            self._init_memslot_memory_attributes(slot)

    # --- mixed hugepage tracking (mmu.c) -------------------------------------------------

    def _test_mixed(self, slot: Slot, gfn: int, level: int) -> bool:
        return bool(slot.lpage_entry(gfn, level) & KVM_LPAGE_MIXED_FLAG)

    def _set_mixed(self, slot: Slot, gfn: int, level: int, mixed: bool) -> None:
        linfo = slot.lpage[level - 2]
        i = gfn_to_index(gfn, slot.base_gfn, level)
        if mixed:
            linfo[i] |= np.uint32(KVM_LPAGE_MIXED_FLAG)
        else:
            linfo[i] &= np.uint32(~KVM_LPAGE_MIXED_FLAG & 0xFFFFFFFF)

    def _hugepage_has_attrs(self, slot: Slot, gfn: int, level: int, attrs: int) -> bool:
        """hugepage_has_attrs: 2M reads the attributes, 1G reads the 2M mixed flags."""
        n = pages_per_hpage(level)
        if level == 2:
            return self.range_has_attributes(gfn, gfn + n, ~0, attrs)
        step = pages_per_hpage(level - 1)
        return all(not self._test_mixed(slot, g, level - 1) and self.get_attributes(g) == attrs
                   for g in range(gfn, gfn + n, step))

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
        i = max(bisect_right(self._attr_starts, start) - 1, 0)
        for k in range(i, len(self._attr_starts)):
            s, e = self._attr_starts[k], self._attr_ends[k]
            if s >= end:
                break
            for point in (s, e):
                if start < point < end:
                    yield point

    def _pre_set_memory_attributes(self, slot: Slot, start: int, end: int, attrs: int) -> bool:
        """kvm_pre_set_memory_attributes + kvm_arch_pre_set_memory_attributes (clipped range)."""
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
                slot.lpage[level - 2][first:first + count] &= np.uint32(~KVM_LPAGE_MIXED_FLAG
                                                                       & 0xFFFFFFFF)
                gfn += count * n
            if gfn < end and gfn + n <= slot.end_gfn:  # the tail page straddles the range
                self._set_mixed(slot, gfn, level,
                                not self._hugepage_has_attrs(slot, gfn, level, attrs))

    # --- memory attributes (kvm_main.c) ------------------------------------------------------

    def get_attributes(self, gfn: int) -> int:
        """kvm_get_memory_attributes."""
        i = bisect_right(self._attr_starts, gfn) - 1
        if i >= 0 and gfn < self._attr_ends[i]:
            return self._attr_values[i]
        return 0

    def is_private(self, gfn: int) -> bool:
        """kvm_mem_is_private."""
        return bool(self.get_attributes(gfn) & _PRIVATE)

    def attribute_ranges(self) -> list[tuple[int, int, int]]:
        return list(zip(self._attr_starts, self._attr_ends, self._attr_values))

    def range_has_attributes(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """kvm_range_has_memory_attributes."""
        mask &= self.supported_attributes
        if attrs & ~mask:
            return False
        if end == start + 1:
            return (self.get_attributes(start) & mask) == attrs
        i = max(bisect_right(self._attr_starts, start) - 1, 0)
        if not attrs:
            return not any(self._attr_starts[k] < end and self._attr_ends[k] > start
                           for k in range(i, min(i + 2, len(self._attr_starts))))
        gfn = start
        for k in range(i, len(self._attr_starts)):
            s, e, v = self._attr_starts[k], self._attr_ends[k], self._attr_values[k]
            if e <= gfn:
                continue
            if s > gfn or (v & mask) != attrs:
                return False
            gfn = e
            if gfn >= end:
                return True
        return False

    def _store_attributes(self, start: int, end: int, attrs: int) -> None:
        """xa_store over [start, end) (attribute 0 erases), keeping ranges merged."""
        starts, ends, values = self._attr_starts, self._attr_ends, self._attr_values
        new: list[tuple[int, int, int]] = []
        for s, e, v in zip(starts, ends, values):
            if e <= start or s >= end:
                new.append((s, e, v))
                continue
            if s < start:
                new.append((s, start, v))
            if e > end:
                new.append((end, e, v))
        if attrs:
            new.append((start, end, attrs))
        new.sort()
        merged: list[tuple[int, int, int]] = []
        for s, e, v in new:
            if merged and merged[-1][1] == s and merged[-1][2] == v:
                merged[-1] = (merged[-1][0], e, v)
            else:
                merged.append((s, e, v))
        self._attr_starts = [s for s, _, _ in merged]
        self._attr_ends = [e for _, e, _ in merged]
        self._attr_values = [v for _, _, v in merged]

    def set_memory_attributes(self, start: int, end: int, attrs: int) -> None:
        """kvm_vm_set_mem_attributes for a validated gfn range [start, end)."""
        if self.range_has_attributes(start, end, ~0, attrs):
            return
        touched = [(slot, max(start, slot.base_gfn), min(end, slot.end_gfn))
                   for as_id in range(self.nr_as_ids)
                   for slot in self.slots_in_range(as_id, start, end)]
        if touched:
            self.invalidate_begin()
            for slot, s, e in touched:
                self._pre_set_memory_attributes(slot, s, e, attrs)
        self._store_attributes(start, end, attrs)
        if touched:
            self.invalidate_end()
            for slot, s, e in touched:
                self._post_set_memory_attributes(slot, s, e, attrs)

    # --- the invalidation protocol (include/linux/kvm_host.h, kvm_main.c) ----------------

    def invalidate_begin(self) -> None:
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range_start = INVALID_GPA
            self.mmu_invalidate_range_end = INVALID_GPA

    def invalidate_range_add(self, start: int, end: int) -> None:
        if self.mmu_invalidate_range_start == INVALID_GPA:
            self.mmu_invalidate_range_start, self.mmu_invalidate_range_end = start, end
        else:
            self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
            self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)

    def invalidate_end(self) -> None:
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1

    def invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn: must a fault that snapshotted ``mmu_seq`` retry?"""
        if self.mmu_invalidate_in_progress:
            if self.mmu_invalidate_range_start == INVALID_GPA:
                return True
            if self.mmu_invalidate_range_start <= gfn < self.mmu_invalidate_range_end:
                return True
        return self.mmu_invalidate_seq != mmu_seq
