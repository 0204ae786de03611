"""The lookups the fault path makes in a VM's memory state, per access.

The twin of ``_cy/memslots.pyx``.  ``kvmemu._memory`` keeps the state (memslots,
lpage_info, attribute ranges, the ``counters`` array of struct kvm fields) and
hands it over with ``publish`` after every change; ``Memslots`` answers the
questions the fault path asks.  Models, from Linux 6.18: ``__gfn_to_memslot`` /
``search_memslots`` (include/linux/kvm_host.h), ``kvm_get_memory_attributes``,
``kvm_range_has_memory_attributes`` (virt/kvm/kvm_main.c), ``kvm_mem_is_private``,
``mmu_invalidate_retry_gfn`` (kvm_host.h), and the frame ``kvm_gmem_get_pfn``
gives a guest_memfd page.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from typing import Any

import numpy as np

from .. import _args
from .cnames import *  # noqa: F403  (the constants under their C names)
from .locking import atomic_or64


#: The twin's stand-in for the atomic updates of frame states.
_FRAMES = threading.Lock()


class FrameFile:
    """One guest_memfd file's frame states (struct FrameFile): ``pages`` and
    ``states``, {page: state} without the zeros.  frame_state gives (file, page) where
    the compiled core gives a ``uint64_t*``."""

    __slots__ = ("pages", "states")

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.states: dict[int, int] = {}

    def get(self, page: int) -> int:
        return self.states.get(page, 0)

    def update(self, page: int, change: Any) -> int:
        """Atomically replace page's state with ``change(old)``; returns the old."""
        with _FRAMES:
            old = self.states.get(page, 0)
            new = change(old)
            if new:
                self.states[page] = new
            else:
                self.states.pop(page, None)
        return old


def gmem_frame(base: int, file_pages: int, gmem_id: int, page: int) -> int:
    """The host frame of page ``page`` of guest_memfd number ``gmem_id`` of a VM: the
    upper half of the host physical space (from frame ``base``), a window of
    ``file_pages`` frames per file."""
    return base + (gmem_id * file_pages + page) % base


def mark_page_dirty_in_slot(slot: Any, gfn: int) -> None:
    """Models mark_page_dirty_in_slot (virt/kvm/kvm_main.c, 6.18): with dirty logging on
    the slot, set the gfn's bit in its dirty bitmap (set_bit_le: atomic)."""
    if slot is not None and slot.flags & MEM_FLAG_LOG_DIRTY_PAGES:
        bitmap = slot.dirty_bitmap
        if bitmap is not None:
            rel = gfn - slot.base_gfn
            atomic_or64(bitmap, rel >> 6, 1 << (rel & 63))


class SlotTable:
    """One published set of address-space-0 memslots, by base gfn (struct kvm_memslots);
    never changed after it is made.  ``readers`` counts the faults in flight that read
    it (their kvm->srcu read-side sections)."""

    def __init__(self, slots: list[Any]) -> None:
        self.slots = list(slots)
        self.bases = [s.base_gfn for s in self.slots]
        self.nslots = len(self.slots)
        self.readers = 0

    @property
    def in_flight(self) -> int:
        """Faults in flight that read this table."""
        return self.readers

    def with_changes(self, removed: list[tuple[int, Any]], added: list[Any]) -> "SlotTable":
        """A new table: this one without the slots ``removed`` ((base gfn when published,
        Slot) pairs) and with ``added`` (Slots, published at their base gfn).  The compiled
        core copies only the chunks of records it changes."""
        slots = list(self.slots)
        bases = list(self.bases)
        for base, owner in removed:
            i = bisect_right(bases, base) - 1
            while i >= 0 and bases[i] == base and slots[i] is not owner:
                i -= 1
            if i < 0 or bases[i] != base:
                raise ValueError(f"no published memslot at gfn {base:#x} to remove")
            del slots[i], bases[i]
        for slot in added:
            i = bisect_right(bases, slot.base_gfn)
            slots.insert(i, slot)
            bases.insert(i, slot.base_gfn)
        return SlotTable(slots)

    def search_memslots(self, gfn: int) -> int:
        """Index of the slot containing ``gfn``, or -1 (search_memslots, a binary search by
        base gfn)."""
        i = bisect_right(self.bases, gfn) - 1
        if i >= 0 and gfn - self.bases[i] < self.slots[i].npages:
            return i
        return -1

    def gfn_to_memslot(self, gfn: int) -> Any:
        """Models __gfn_to_memslot (include/linux/kvm_host.h, 6.18): the memslot holding
        ``gfn``, or None."""
        i = self.search_memslots(gfn)
        return self.slots[i] if i >= 0 else None


class Memslots:
    """What the fault path reads of a VM's memory: address space 0's memslots (one
    SlotTable at a time), the attribute ranges, and the counters (mmu_invalidate_seq and
    friends, the memslot generations)."""

    def __init__(self, config: Any, counters: np.ndarray) -> None:
        self.supported_attributes = MEM_ATTR_PRIVATE if config.has_private_mem else 0
        #: The host's frames: user memory below gmem_base, guest_memfd files above.
        self.pfn_mask = config.pfn_mask
        self.gmem_base, self.gmem_file_pages = config.gmem_base, config.gmem_file_pages
        #: The uint64 array kvmemu._memory writes, indexed by VmCounter.
        self.counters = counters
        self.table = SlotTable([])
        self._srcu = threading.Condition(threading.Lock())
        empty = np.zeros(0, dtype=np.uint64)
        #: The attribute ranges (starts, ends, values), replaced as one: a reader takes
        #: the tuple once and sees one consistent set whatever other threads publish.
        self.attrs = (empty, empty, empty)
        #: Per guest_memfd file (by index): its page count and its frames' state
        #: (kvmemu.constants.FrameState), {page: state} without the zeros.
        self.max_files = self.gmem_base // self.gmem_file_pages
        self.files: dict[int, FrameFile] = {}

    def add_gmem_file(self, index: int, pages: int) -> None:
        """Guest_memfd number ``index`` has ``pages`` pages: their frame states start at 0
        (no folio yet).  The file's frame window holds at most gmem_file_pages."""
        if not 0 <= index < self.max_files:
            raise ValueError(f"guest_memfd {index} is beyond the {self.max_files} files")
        if index in self.files:
            raise ValueError(f"guest_memfd {index} already has its frames")
        self.files[index] = FrameFile(min(pages, self.gmem_file_pages))

    def frame_file(self, pfn: int) -> tuple[FrameFile, int] | None:
        """The guest_memfd file holding frame ``pfn`` and the page, or None for a frame
        of user memory (never assigned in the RMP, never in a Secure EPT)."""
        if pfn < self.gmem_base:
            return None
        k, page = divmod(pfn - self.gmem_base, self.gmem_file_pages)
        file = self.files.get(k)
        if file is None or page >= file.pages:
            return None
        return file, page

    def frame_state(self, pfn: int) -> tuple[FrameFile, int] | None:
        """The state of guest_memfd frame ``pfn``, as (file, page), or None for a frame
        of user memory."""
        return self.frame_file(pfn)

    def frame_state_alloc(self, pfn: int) -> tuple[FrameFile, int] | None:
        """frame_state (the compiled core makes the frame's chunk here; the twin's
        states need none)."""
        return self.frame_file(pfn)

    def frame(self, pfn: int) -> int:
        """The state of frame ``pfn`` (0 for a frame of user memory)."""
        where = self.frame_state(pfn)
        return 0 if where is None else where[0].get(where[1])

    def set_frame(self, pfn: int, value: int) -> None:
        """Store the state of guest_memfd frame ``pfn`` (ValueError for another frame)."""
        where = self.frame_state(pfn)
        if where is None:
            raise ValueError(f"frame {pfn:#x} is not a guest_memfd page")
        where[0].update(where[1], lambda _: value)

    def clear_frames(self, index: int, start: int, end: int) -> None:
        """Pages [start, end) of guest_memfd ``index`` have no folio any more: state 0."""
        file = self.files.get(index)
        if file is not None:
            with _FRAMES:
                for page in [p for p in file.states if start <= p < end]:
                    del file.states[page]

    def frame_items(self, index: int) -> list[tuple[int, int]]:
        """The non-zero frame states of guest_memfd ``index``: [(page, state), ...]."""
        file = self.files.get(index)
        return [] if file is None else sorted(file.states.items())

    def copy_frames(self, src: "Memslots") -> None:
        """Take a copy of every file's frame states from ``src`` (a snapshot's clone)."""
        with _FRAMES:
            for i, file in src.files.items():
                self.add_gmem_file(i, file.pages)
                self.files[i].states = dict(file.states)

    def publish_changes(self, removed: list[tuple[int, Any]], added: list[Any],
                        synchronize: bool) -> None:
        """publish_slots of the current table with ``removed`` and ``added`` (see
        SlotTable.with_changes): what one memslot change publishes, without rebuilding
        the others' records."""
        old, self.table = self.table, self.table.with_changes(removed, added)
        if synchronize:
            self.synchronize_srcu(old)

    def publish_slots(self, slots: list[Any], synchronize: bool) -> None:
        """Make ``slots`` (address space 0's, sorted by base gfn) the current memslots
        (rcu_assign_pointer in kvm_swap_active_memslots); with ``synchronize``, wait for
        the faults that read the old ones to finish (synchronize_srcu_expedited)."""
        old, self.table = self.table, SlotTable(slots)
        if synchronize:
            self.synchronize_srcu(old)

    def synchronize_srcu(self, old: SlotTable) -> None:
        """Wait until no fault reads ``old`` any more."""
        with self._srcu:
            while old.readers:
                self._srcu.wait()

    def store_attributes(self, start: int, end: int, attrs: int, lock: Any = None) -> None:
        """xa_store over [start, end) (attribute 0 erases), keeping ranges merged; the
        new ranges are put in place with ``lock`` held for write if given (mmu_lock);
        writers are serialised by the caller (the VM's ioctl lock, kvm->slots_lock).

        New arrays each time (a reader holds the tuple it took): the ranges left and
        right of [start, end) survive whole, the two that straddle it are cut, and a new
        range merges with a neighbour that touches it and has the same value.  (The
        compiled core rewrites only the chunks of ranges around the change.)"""
        starts, ends, values = self.attrs
        lo = int(ends.searchsorted(np.uint64(start), side="right"))
        hi = int(starts.searchsorted(np.uint64(end), side="left"))
        pieces: list[tuple[int, int, int]] = []
        if lo < hi and int(starts[lo]) < start:
            pieces.append((int(starts[lo]), start, int(values[lo])))
        if attrs:
            pieces.append((start, end, attrs))
        if lo < hi and int(ends[hi - 1]) > end:
            pieces.append((end, int(ends[hi - 1]), int(values[hi - 1])))
        # Neighbours that touch the pieces with the same value join them.
        if (pieces and lo > 0 and int(ends[lo - 1]) == pieces[0][0]
                and int(values[lo - 1]) == pieces[0][2]):
            lo -= 1
            pieces[0] = (int(starts[lo]), pieces[0][1], pieces[0][2])
        if (pieces and hi < len(starts) and int(starts[hi]) == pieces[-1][1]
                and int(values[hi]) == pieces[-1][2]):
            pieces[-1] = (pieces[-1][0], int(ends[hi]), pieces[-1][2])
            hi += 1
        merged: list[tuple[int, int, int]] = []
        for piece in pieces:
            if merged and merged[-1][1] == piece[0] and merged[-1][2] == piece[2]:
                merged[-1] = (merged[-1][0], piece[1], piece[2])
            else:
                merged.append(piece)
        middle = np.array(merged, dtype=np.uint64).reshape(-1, 3)
        new = [np.concatenate((old[:lo], middle[:, column], old[hi:]))
               for column, old in enumerate((starts, ends, values))]
        if lock is not None:
            lock.acquire_write()
        try:
            self.attrs = (new[0], new[1], new[2])
        finally:
            if lock is not None:
                lock.release_write()

    def attribute_ranges(self, start: int = 0,
                         end: int = 0xFFFF_FFFF_FFFF_FFFF) -> list[tuple[int, int, int]]:
        """The attribute ranges intersecting [start, end), as (start, end, value)."""
        starts, ends, values = self.attrs
        k = max(self.attribute_index(starts, start), 0)
        out = []
        for s, e, v in zip(starts[k:].tolist(), ends[k:].tolist(), values[k:].tolist()):
            if s >= end:
                break
            if e > start:
                out.append((s, e, v))
        return out

    def attributes_at(self, gfns: np.ndarray) -> np.ndarray:
        """kvm_get_memory_attributes for each element of ``gfns``."""
        return np.array([self.get_memory_attributes(g) for g in gfns.tolist()],
                        dtype=np.uint64)

    def copy_attributes(self, src: "Memslots") -> None:
        """Take a copy of ``src``'s attribute ranges (a snapshot's clone)."""
        self.attrs = src.attrs

    def srcu_read_lock(self) -> SlotTable:
        """srcu_read_lock(&kvm->srcu): the current memslots, held until the unlock."""
        with self._srcu:
            table = self.table
            table.readers += 1
        return table

    def srcu_read_unlock(self, table: SlotTable) -> None:
        with self._srcu:
            table.readers -= 1
            if not table.readers:
                self._srcu.notify_all()

    # --- memslots -----------------------------------------------------------------------

    def find_memslot(self, gfn: int) -> int:
        """The id of the address-space-0 memslot holding ``gfn``, or -1."""
        slot = self.table.gfn_to_memslot(gfn)
        return -1 if slot is None else slot.id

    def find_memslots(self, gfns: np.ndarray) -> np.ndarray:
        """Slot ids of address space 0 for an array of gfns, -1 where there is none (the
        loop holds the table it started with)."""
        table = self.table
        return np.array([-1 if (s := table.gfn_to_memslot(gfn)) is None else s.id
                         for gfn in gfns.tolist()], dtype=np.int32)

    def gmem_get_pfn(self, slot: Any, gfn: int) -> int:
        """The frame kvm_gmem_get_pfn gives for ``gfn`` of a guest_memfd-backed slot."""
        return gmem_frame(self.gmem_base, self.gmem_file_pages, slot.gmem_id,
                          slot.gmem_pgoff + (gfn - slot.base_gfn))

    def hva_to_pfn(self, slot: Any, gfn: int) -> int:
        """The host frame behind ``gfn`` of a slot's user memory (__gfn_to_hva_memslot, then
        the host's page tables): in the model, the hva's page number within the lower
        half of the host physical space."""
        return ((slot.userspace_addr >> PAGE_SHIFT) + (gfn - slot.base_gfn)) & self.pfn_mask

    # --- memory attributes ----------------------------------------------------------------

    def attribute_index(self, starts: np.ndarray, gfn: int) -> int:
        """Index of the last attribute range starting at or below ``gfn``, or -1."""
        # A uint64 key: a Python int would make numpy compare in float64 (a whole copy).
        return int(starts.searchsorted(np.uint64(gfn), side="right")) - 1

    def get_memory_attributes(self, gfn: int) -> int:
        """Models kvm_get_memory_attributes (include/linux/kvm_host.h, 6.18)."""
        starts, ends, values = self.attrs
        i = self.attribute_index(starts, gfn)
        if i >= 0 and gfn < int(ends[i]):
            return int(values[i])
        return 0

    def mem_is_private(self, gfn: int) -> bool:
        """Models kvm_mem_is_private (include/linux/kvm_host.h, 6.18)."""
        return bool(self.get_memory_attributes(gfn) & MEM_ATTR_PRIVATE)

    def range_has_memory_attributes(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """Models kvm_range_has_memory_attributes (virt/kvm/kvm_main.c, 6.18): every gfn of
        [start, end) has ``attrs`` under ``mask`` (masked by what the VM supports)."""
        mask &= self.supported_attributes & _args.U64_MAX
        if attrs & ~mask:
            return False
        if end == start + 1:
            return (self.get_memory_attributes(start) & mask) == attrs
        starts, ends, values = self.attrs
        i = max(self.attribute_index(starts, start), 0)
        n = len(starts)
        if not attrs:
            return not any(int(starts[k]) < end and int(ends[k]) > start
                           for k in range(i, min(i + 2, n)))
        gfn = start
        for k in range(i, n):
            s, e, v = int(starts[k]), int(ends[k]), int(values[k])
            if e <= gfn:
                continue
            if s > gfn or (v & mask) != attrs:
                return False
            gfn = e
            if gfn >= end:
                return True
        return False

    # --- the invalidation protocol ----------------------------------------------------------

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """Models mmu_invalidate_retry_gfn (include/linux/kvm_host.h, 6.18): must a fault that
        snapshotted ``mmu_seq`` retry?  Yes while an invalidation covering ``gfn`` (or one
        whose range is not known yet) is in progress, and when one finished since."""
        c = self.counters
        if c[VM_COUNTER_MMU_INVALIDATE_IN_PROGRESS]:
            start = int(c[VM_COUNTER_MMU_INVALIDATE_RANGE_START])
            if start == INVALID_GPA:
                return True
            if start <= gfn < int(c[VM_COUNTER_MMU_INVALIDATE_RANGE_END]):
                return True
        return int(c[VM_COUNTER_MMU_INVALIDATE_SEQ]) != mmu_seq
