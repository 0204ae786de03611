"""``VM.check_invariants``: what must hold between the MMU's tables and the memory model.

Judged through the public state of a VM (its tables, memslots, attributes,
lpage_info, frame states, dirty bitmaps, statistics), so it can judge either core.
A ``Checker`` keeps what it found per table: a later check re-judges only the
leaves whose inputs changed since (``kvmemu.testing.InvariantChecker``); a new
``Checker`` judges everything, which is ``VM.check_invariants``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._pure.levels import gfn_to_index, pages_per_hpage
from ._pure.memslots import gmem_frame
from .constants import (EPTE, KVM_MEMSLOT_GMEM_ONLY, PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M,
                        PG_LEVEL_4K, PT_BASE_HPA, PT_ENTRIES, PTE, SPTE,
                        SPTE_BASE_ADDR_MASK, FrameState, MemAttr, MemFlag, VMType)

_LEVELS = range(PG_LEVEL_4K, PG_LEVEL_1G + 1)
_PRESENT = np.uint64(SPTE.MMU_PRESENT.value)

#: Every gfn: the inputs changed in a way the check does not follow range by range.
_EVERYWHERE = [(-(1 << 64), 1 << 64)]


class _Inputs:
    """The inputs of the leaf judgements other than the tables, read once per check:
    the address-space-0 memslots, attribute ranges, lpage_info, dirty bitmaps and the
    guest_memfd frame states."""

    __slots__ = ("key", "slots", "attributes", "lpage", "bitmaps", "frames")

    def __init__(self, vm: Any) -> None:
        memory = vm._memory
        self.slots = memory.slots(0)
        #: What a change of makes every leaf's judgement stale: the memory model
        #: itself, the VM type and every memslot's fields.
        self.key = (id(memory), vm.vm_type, tuple(
            (s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr, s.gmem_id, s.gmem_pgoff,
             s.host_level) for s in self.slots))
        self.attributes = set(memory.attribute_ranges())
        self.lpage = {(s.id, level): s.lpage[level - PG_LEVEL_2M].copy()
                      for s in self.slots for level in (PG_LEVEL_2M, PG_LEVEL_1G)}
        self.bitmaps = {s.id: None if s.dirty_bitmap is None else s.dirty_bitmap.copy()
                        for s in self.slots}
        memslots = memory.memslots
        self.frames = [dict(memslots.frame_items(index)) for index in range(len(vm._gmem))]

    def changes(self, old: "_Inputs", memory: Any) -> tuple[list[tuple[int, int]], set[int]]:
        """Where the judgements made with ``old`` may no longer hold: gfn intervals
        [start, end), merged and sorted, and the frames whose state changed."""
        if old.key != self.key:
            return _EVERYWHERE, set()
        spans = [(s, e) for s, e, _ in old.attributes ^ self.attributes]
        for slot in self.slots:
            for level in (PG_LEVEL_2M, PG_LEVEL_1G):
                shift = (level - PG_LEVEL_4K) * 9
                new, was = self.lpage[slot.id, level], old.lpage[slot.id, level]
                first = slot.base_gfn >> shift
                spans += [((first + i) << shift, (first + i + 1) << shift)
                          for i in np.flatnonzero(new != was).tolist()]
            new_map, old_map = self.bitmaps[slot.id], old.bitmaps[slot.id]
            if new_map is not None and old_map is not None:     # else the flags differ
                spans += [(slot.base_gfn + w * 64, slot.base_gfn + w * 64 + 64)
                          for w in np.flatnonzero(new_map != old_map).tolist()]
        frames: set[int] = set()
        base, file_pages = memory.memslots.gmem_base, memory.memslots.gmem_file_pages
        for index, states in enumerate(self.frames):
            was = old.frames[index] if index < len(old.frames) else {}
            frames.update(gmem_frame(base, file_pages, index, page)
                          for page, _ in states.items() ^ was.items())
        return _merge(spans), frames


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


_LARGE = np.uint64(PTE.LARGE.value)
_ADDRESS = np.uint64(SPTE_BASE_ADDR_MASK)
_FIRST_TABLE = np.uint64(PT_BASE_HPA)
_SHIFT = np.uint64(PAGE_SHIFT)
_GFN_LIMIT = 1 << 62            # beyond every gfn: keeps interval ends within int64
_PRIVATE, _PREPARED = MemAttr.PRIVATE.value, FrameState.PREPARED.value
_RMP_ASSIGNED, _WRITABLE = FrameState.RMP_ASSIGNED.value, PTE.WRITABLE.value
_READONLY, _DIRTY = MemFlag.READONLY.value, EPTE.DIRTY.value
_FEW = 32                       # tables of a level followed one at a time, not all at once


class _Root:
    """What a Checker keeps of one root's tables: the rows as last seen; per table, the
    place its leaves were last judged at (level, 0: not judged; first gfn) and how
    many there were; the problems found there (tables with some only); the guest_memfd frames its leaves
    map, and the other way round."""

    def __init__(self) -> None:
        self.rows: np.ndarray | None = None
        self.level = np.zeros(0, np.int8)
        self.base = np.zeros(0, np.int64)
        self.leaves = np.zeros(0, np.int64)
        self.problems: dict[int, list[str]] = {}
        self.frames: dict[int, set[int]] = {}
        self.owners: dict[int, set[int]] = {}

    def grow(self, n: int) -> None:
        if len(self.level) < n:
            self.level = np.concatenate([self.level, np.zeros(n - len(self.level), np.int8)])
            self.base = np.concatenate([self.base, np.zeros(n - len(self.base), np.int64)])
            self.leaves = np.concatenate([self.leaves,
                                          np.zeros(n - len(self.leaves), np.int64)])

    def set_frames(self, table: int, frames: set[int]) -> None:
        for frame in self.frames.pop(table, ()):
            owners = self.owners[frame]
            owners.discard(table)
            if not owners:
                del self.owners[frame]
        if frames:
            self.frames[table] = frames
            for frame in frames:
                self.owners.setdefault(frame, set()).add(table)


class _Judged:
    """The leaf judgements of one table, as ``_judge_leaf`` fills them in."""

    __slots__ = ("level", "problems", "frames")

    def __init__(self, level: int) -> None:
        self.level = level
        self.problems: list[str] = []
        self.frames: set[int] = set()


class Checker:
    """``VM.check_invariants``, keeping what it found.  The walk over the tables' links
    and the leaf counts are made each time, over whole levels at once; the leaf
    judgements only where they may have changed: the first check judges every table,
    a later one only tables whose entries or place changed, or that lie where another
    input of the judgements changed (attribute ranges, lpage_info, dirty bitmaps, by
    gfn; guest_memfd frame states, by frame; any memslot's fields, everywhere).

    What must hold:

    * every table is linked once, from a present non-leaf entry;
    * every present leaf maps memory of an existing address-space-0 memslot, with
      the frame faultin would give it (guest_memfd frame for private or gmem-only
      memory, else the host frame), and writable only if the slot is not READONLY;
    * a guest_memfd frame that a leaf maps is prepared (its folio is up to date),
      and on SNP assigned in the RMP;
    * a TDX mirror leaf maps only private gfns, a direct leaf only shared ones; on
      other private-memory VMs the frame kind matches the gfn's attributes;
    * no leaf above the 1 GiB level; no huge leaf crosses a memslot edge, spans mixed
      attributes, or sits where lpage_info disallows it;
    * a writable leaf of a slot that logs dirty pages has its pages' bits set in the
      dirty bitmap, unless PML will see the next write (its dirty bit is clear);
    * the per-level leaf counts in ``stats`` equal the leaves found;
    * each vCPU's fault counters agree with kvm_mmu_page_fault's accounting.

    The caller holds the VM's locks (``VM._check_with``).
    """

    def __init__(self) -> None:
        self._inputs: _Inputs | None = None
        self._roots: dict[bool, _Root] = {}        # False: direct, True: mirror
        #: Tables whose leaves the last check judged.
        self.judged = 0

    def check(self, vm: Any) -> list[str]:
        memory = vm._memory
        inputs = _Inputs(vm)
        spans, frames = (_EVERYWHERE, set()) if self._inputs is None else \
            inputs.changes(self._inputs, memory)
        if spans is _EVERYWHERE:
            self._roots = {}
        self._inputs = inputs
        starts = np.array([max(s, -_GFN_LIMIT) for s, _ in spans], np.int64)
        ends = np.array([min(e, _GFN_LIMIT) for _, e in spans], np.int64)
        problems: list[str] = []
        found: dict[int, int] = dict.fromkeys(_LEVELS, 0)
        self.judged = 0
        roots = [(vm.page_tables, memory.mmu.direct.gfn_bits, False)]
        if vm.private_page_tables is not None:
            roots.append((vm.private_page_tables, 0, True))
        for tables, gfn_bits, mirror in roots:
            root = self._roots.setdefault(mirror, _Root())
            mem = tables.tables
            n = len(mem)
            stale = np.ones(n, bool)
            if root.rows is not None:
                m = min(n, len(root.rows))
                stale[:m] = (mem[:m] != root.rows[:m]).any(axis=1)
            for frame in frames:
                for table in root.owners.get(frame, ()):
                    if table < n:
                        stale[table] = True
            root.rows = mem
            root.grow(n)
            depths, reached = self._links(mem, tables.levels, problems)
            for level, where, bases in depths:
                first = bases - gfn_bits
                redo = stale[where] | (root.level[where] != level) | (root.base[where] != first)
                if len(starts):
                    last = first + PT_ENTRIES * pages_per_hpage(level)
                    i = np.searchsorted(starts, last, side="left")
                    redo |= (i > 0) & (ends[np.maximum(i - 1, 0)] > first)
                for table, base in zip(where[redo].tolist(), first[redo].tolist()):
                    self._judge(vm, root, table, level, base, mem[table], mirror)
                root.level[where], root.base[where] = level, first
                found[level] = found.get(level, 0) + int(root.leaves[where].sum())
            root.level[~reached] = 0
            for table in [t for t in root.problems if t >= n or not reached[t]]:
                del root.problems[table]
            for table in [t for t in root.frames if t >= n or not reached[t]]:
                root.set_frames(table, set())
            if root.problems:
                for _, where, _ in depths:
                    for table in where.tolist():
                        problems += root.problems.get(table, ())
        for vcpu in vm._vcpus:
            st = vcpu.stats
            if st["pf_fixed"] + st["pf_spurious"] + st["pf_emulate"] > st["pf_taken"]:
                problems.append(f"vCPU {vcpu.vcpu_id}: more fault results than faults taken {st}")
            if vcpu._pre_faulted:
                continue        # kvm_tdp_map_page counts pf_fast and pf_mmio_spte_created only
            if st["pf_fast"] > st["pf_fixed"] + st["pf_spurious"]:
                problems.append(f"vCPU {vcpu.vcpu_id}: more fast fixes than FIXED/SPURIOUS {st}")
            if st["pf_mmio_spte_created"] > st["pf_emulate"]:
                problems.append(f"vCPU {vcpu.vcpu_id}: more MMIO SPTEs than EMULATE results {st}")
        counted = memory.mmu.pages
        if [counted[level] for level in _LEVELS] != [found[level] for level in _LEVELS]:
            problems.append(f"leaf counts {[counted[level] for level in _LEVELS]} differ from the "
                            f"tables {[found[level] for level in _LEVELS]}")
        return problems

    @staticmethod
    def _leaves(rows: np.ndarray, level: int) -> np.ndarray:
        """Which entries of ``rows`` (tables at ``level``) are present leaves."""
        present = (rows & _PRESENT) != 0
        return present if level == PG_LEVEL_4K else present & ((rows & _LARGE) != 0)

    def _links(self, mem: np.ndarray, levels: int, problems: list[str]
               ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], np.ndarray]:
        """Follow the links from table 0 (at ``levels``), a level at a time: the tables
        reached at each level with the first gfn each maps, and which tables were
        reached.  A link to a table out of range, to the root or to a table already
        linked (earlier in this order) is a problem."""
        n = len(mem)
        reached = np.zeros(n, bool)
        reached[0] = True
        where, bases = np.zeros(1, np.int64), np.zeros(1, np.int64)
        depths = []
        for level in range(levels, PG_LEVEL_4K - 1, -1):
            if not len(where):
                break
            depths.append((level, where, bases))
            if level == PG_LEVEL_4K:
                break
            follow = self._follow_few if len(where) < _FEW else self._follow_many
            where, bases = follow(mem, level, where, bases, reached, problems)
        return depths, reached

    @staticmethod
    def _follow_many(mem: np.ndarray, level: int, where: np.ndarray, bases: np.ndarray,
                     reached: np.ndarray, problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The links of the tables ``where`` at ``level`` (the first gfns ``bases``) in
        table order, then entry order, all at once: the tables they reach next, with
        their first gfns; ``reached`` is updated."""
        n = len(mem)
        rows = mem[where]
        t, index = np.nonzero(((rows & _PRESENT) != 0) & ~Checker._leaves(rows, level))
        raw = ((rows[t, index] & _ADDRESS) - _FIRST_TABLE) >> _SHIFT     # wraps below
        ok = (raw > 0) & (raw < n)
        child = np.where(ok, raw, 0).astype(np.int64)
        ok &= ~reached[child]
        keep = np.zeros(len(child), bool)
        candidates = np.flatnonzero(ok)
        keep[candidates[np.unique(child[candidates], return_index=True)[1]]] = True
        for k in np.flatnonzero(~keep).tolist():
            _bad_link(problems, mem, int(where[t[k]]), int(index[k]))
        reached[child[keep]] = True
        return child[keep], bases[t[keep]] + index[keep].astype(np.int64) * pages_per_hpage(level)

    @staticmethod
    def _follow_few(mem: np.ndarray, level: int, where: np.ndarray, bases: np.ndarray,
                    reached: np.ndarray, problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``_follow_many`` for a few tables, one at a time (numpy's fixed cost per call
        outweighs the work then)."""
        n, span = len(mem), pages_per_hpage(level)
        below, firsts = [], []
        for table, base in zip(where.tolist(), bases.tolist()):
            row = mem[table]
            links = np.flatnonzero(((row & _PRESENT) != 0) & ~Checker._leaves(row, level))
            for index, spte in zip(links.tolist(), row[links].tolist()):
                child = ((spte & SPTE_BASE_ADDR_MASK) - PT_BASE_HPA) >> PAGE_SHIFT
                if not 0 < child < n or reached[child]:
                    _bad_link(problems, mem, table, index)
                    continue
                reached[child] = True
                below.append(child)
                firsts.append(base + index * span)
        return np.array(below, np.int64), np.array(firsts, np.int64)

    def _judge(self, vm: Any, root: _Root, table: int, level: int, first: int,
               row: np.ndarray, mirror: bool) -> None:
        """Judge every leaf of ``table`` afresh (``first``: the gfn of its entry 0)."""
        self.judged += 1
        judged = _Judged(level)
        span = pages_per_hpage(level)
        leaves = np.flatnonzero(self._leaves(row, level))
        root.leaves[table] = len(leaves)
        for index, spte in zip(leaves.tolist(), row[leaves].tolist()):
            gfn = first + index * span
            found: list[str] = []
            _judge_leaf(vm, vm._memory, self._inputs, judged, gfn, spte, mirror, found)
            if found:               # the text only for a leaf that has a problem
                where = f"{'mirror' if mirror else 'direct'} leaf gfn {gfn:#x} level {level}"
                judged.problems += [f"{where} {problem}" for problem in found]
        if judged.problems:
            root.problems[table] = judged.problems
        else:
            root.problems.pop(table, None)
        root.set_frames(table, judged.frames)


def _bad_link(problems: list[str], mem: np.ndarray, table: int, index: int) -> None:
    target = ((int(mem[table, index]) & SPTE_BASE_ADDR_MASK) - PT_BASE_HPA) >> PAGE_SHIFT
    problems.append(f"table {table}[{index}] links table {target} badly")


def _judge_leaf(vm: Any, memory: Any, inputs: Any, entry: _Judged, gfn: int, spte: int,
                mirror: bool, problems: list[str]) -> None:
    """The leaf judgements of one leaf of ``entry``'s table: what is wrong goes to
    ``problems`` (without the leaf's name), the guest_memfd frame it maps to
    ``entry.frames``."""
    level = entry.level
    if level > PG_LEVEL_1G:
        problems.append("is a leaf above the 1 GiB level")
        return
    n = pages_per_hpage(level)
    slot = memory.find_slot(0, gfn)
    if slot is None or gfn + n > slot.end_gfn:
        problems.append("is outside every memslot")
        return
    attributes = int(memory.memslots.get_memory_attributes(gfn))
    private = bool(attributes & _PRIVATE)
    if not memory.memslots.range_has_memory_attributes(gfn, gfn + n, ~0, attributes):
        problems.append("spans mixed attributes")
    if vm.vm_type == VMType.TDX and private != mirror:
        problems.append(f"maps a {'private' if private else 'shared'} gfn")
    if level > PG_LEVEL_4K and inputs.lpage[slot.id, level][
            gfn_to_index(gfn, slot.base_gfn, level)]:
        problems.append("is where lpage_info disallows a huge page")
    if private or slot.flags & KVM_MEMSLOT_GMEM_ONLY:
        pfn = int(memory.memslots.gmem_get_pfn(slot, gfn)) if slot.gmem_id >= 0 else -1
    else:
        pfn = int(memory.memslots.hva_to_pfn(slot, gfn))
        # kvm_mmu_max_mapping_level caps a mapping of host memory at the host's own
        # (host_pfn_mapping_level); a host split invalidates the range first.
        if level > slot.host_level:
            problems.append(f"is above the host's mapping level {slot.host_level}")
    frame = (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
    if frame != pfn:
        problems.append(f"maps frame {frame:#x}, not {pfn:#x}")
    if frame >= memory.config.gmem_base and pfn == frame:
        entry.frames.add(frame)
        state = int(memory.memslots.frame(frame))
        if not state & _PREPARED:
            problems.append("maps a guest_memfd folio that is not prepared")
        if vm.vm_type == VMType.SNP and not state & _RMP_ASSIGNED:
            problems.append("maps a guest_memfd frame the RMP does not assign")
    if spte & _WRITABLE and slot.flags & _READONLY:
        problems.append("is writable in a READONLY memslot")
    bitmap = slot.dirty_bitmap
    if (bitmap is not None and spte & _WRITABLE
            and not (memory.config.pml and not spte & _DIRTY)):
        first = gfn - slot.base_gfn
        for page in range(first, first + n):
            if not int(bitmap[page >> 6]) >> (page & 63) & 1:
                problems.append(f"is writable, page {page} is not in the dirty "
                                f"log and no write to it would be logged")
                break
