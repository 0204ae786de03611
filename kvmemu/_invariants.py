"""``VM.check_invariants``: what must hold between the MMU's tables and the memory model.

Checked from scratch, through the public state of a VM (its tables, memslots,
attributes, lpage_info, statistics), so it can judge either core.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._pure.levels import gfn_to_index, pages_per_hpage
from .constants import (EPTE, KVM_MEMSLOT_GMEM_ONLY, PAGE_SHIFT, PG_LEVEL_1G,
                        PG_LEVEL_4K, PT_BASE_HPA, PTE, SPTE, SPTE_BASE_ADDR_MASK,
                        FrameState, MemAttr, MemFlag, VMType)

_LEVELS = range(PG_LEVEL_4K, PG_LEVEL_1G + 1)
_PRESENT = np.uint64(SPTE.MMU_PRESENT.value)


def check_invariants(vm: Any) -> list[str]:
    """The violations found (an empty list when all hold):

    * every table is linked once, from a present non-leaf entry;
    * every present leaf maps memory of an existing address-space-0 memslot, with
      the frame faultin would give it (guest_memfd frame for private or gmem-only
      memory, else the host frame), and writable only if the slot is not READONLY;
    * a guest_memfd frame that a leaf maps is prepared (its folio is up to date),
      and on SNP assigned in the RMP;
    * a TDX mirror leaf maps only private gfns, a direct leaf only shared ones; on
      other private-memory VMs the frame kind matches the gfn's attributes;
    * no huge leaf crosses a memslot edge, spans mixed attributes, or sits where
      lpage_info disallows it;
    * a writable leaf of a slot that logs dirty pages has its pages' bits set in the
      dirty bitmap, unless PML will see the next write (its dirty bit is clear);
    * the per-level leaf counts in ``stats`` equal the leaves found;
    * each vCPU's fault counters agree with kvm_mmu_page_fault's accounting.
    """
    problems: list[str] = []
    memory = vm._memory
    found = dict.fromkeys(_LEVELS, 0)
    lpage_info: dict[tuple[int, int], list[int]] = {}   # per (slot id, level), read once
    roots = [(vm.page_tables, memory.mmu.direct.gfn_bits, False)]
    if vm.private_page_tables is not None:
        roots.append((vm.private_page_tables, 0, True))

    def check_leaf(gfn: int, level: int, spte: int, mirror: bool) -> None:
        where = f"{'mirror' if mirror else 'direct'} leaf gfn {gfn:#x} level {level}"
        found[level] += 1
        n = pages_per_hpage(level)
        slot = memory.find_slot(0, gfn)
        if slot is None or gfn + n > slot.end_gfn:
            problems.append(f"{where} is outside every memslot")
            return
        attributes = int(memory.memslots.get_memory_attributes(gfn))
        private = bool(attributes & MemAttr.PRIVATE.value)
        if not memory.memslots.range_has_memory_attributes(gfn, gfn + n, ~0, attributes):
            problems.append(f"{where} spans mixed attributes")
        if vm.vm_type == VMType.TDX and private != mirror:
            problems.append(f"{where} maps a {'private' if private else 'shared'} gfn")
        if level > PG_LEVEL_4K:
            if (slot.id, level) not in lpage_info:
                lpage_info[slot.id, level] = memory.lpage_info(0, slot.id, level)
            if lpage_info[slot.id, level][gfn_to_index(gfn, slot.base_gfn, level)]:
                problems.append(f"{where} is where lpage_info disallows a huge page")
        if private or slot.flags & KVM_MEMSLOT_GMEM_ONLY:
            pfn = int(memory.memslots.gmem_get_pfn(slot, gfn)) if slot.gmem_id >= 0 else -1
        else:
            pfn = int(memory.memslots.hva_to_pfn(slot, gfn))
        frame = (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
        if frame != pfn:
            problems.append(f"{where} maps frame {frame:#x}, not {pfn:#x}")
        state = int(memory.memslots.frame(frame))
        if frame >= memory.config.gmem_base and pfn == frame:
            if not state & FrameState.PREPARED.value:
                problems.append(f"{where} maps a guest_memfd folio that is not prepared")
            if vm.vm_type == VMType.SNP and not state & FrameState.RMP_ASSIGNED.value:
                problems.append(f"{where} maps a guest_memfd frame the RMP does not assign")
        if spte & PTE.WRITABLE.value and slot.flags & MemFlag.READONLY.value:
            problems.append(f"{where} is writable in a READONLY memslot")
        bitmap = slot.dirty_bitmap
        if (bitmap is not None and spte & PTE.WRITABLE.value
                and not (memory.config.pml and not spte & EPTE.DIRTY.value)):
            first = gfn - slot.base_gfn
            for page in range(first, first + n):
                if not int(bitmap[page >> 6]) >> (page & 63) & 1:
                    problems.append(f"{where} is writable, page {page} is not in the dirty "
                                    f"log and no write to it would be logged")
                    break

    for tables, gfn_bits, is_mirror in roots:
        mem = tables.tables
        seen = {0}

        def visit(table: int, level: int, base_gfn: int) -> None:
            span = pages_per_hpage(level)
            row = mem[table]
            present = np.flatnonzero(row & _PRESENT)        # most entries of most tables
            for index, spte in zip(present.tolist(), row[present].tolist()):
                gfn = base_gfn + index * span
                if level == PG_LEVEL_4K or spte & PTE.LARGE.value:
                    check_leaf(gfn - gfn_bits, level, spte, is_mirror)
                    continue
                child = ((spte & SPTE_BASE_ADDR_MASK) - PT_BASE_HPA) >> PAGE_SHIFT
                if not 0 < child < len(mem) or child in seen:
                    problems.append(f"table {table}[{index}] links table {child} badly")
                    continue
                seen.add(child)
                visit(child, level - 1, gfn)

        visit(0, tables.levels, 0)
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
