"""The model's decisions as the kernel's tracepoints (the twin of kvmemu/_cy/trace.pyx).

A ``Tracer`` records each event as its kind and numbers, the way the kernel's
ring buffer holds a tracepoint's fields, and formats it only when the events are
handed to the sink (``flush``): the text is exactly the kernel's TP_printk (Linux
6.18; docs/reference.md §14), and the cores emit the events in the kernel's order
for a fault: ``kvm_page_fault`` (the vendor handler) → ``kvm_mmu_spte_requested``
(after hugepage adjust) → ``kvm_tdp_mmu_spte_changed`` for each SPTE changed,
top-down → ``kvm_mmu_set_spte`` (the target level).

The model never calls the sink in the middle of an operation: events are kept and
handed over when the public call that made them returns, with the VM consistent
and no lock held.  A sink may therefore call back into the VM, and a sink that
raises makes the call raise after its work is done.
"""

from __future__ import annotations

from typing import Any

from kvmemu._trace import EVENT_NAMES, sink_writer
from kvmemu.constants import EPTE, PTE

#: The kinds of record, indexes into EVENT_NAMES.
TRACE_PAGE_FAULT, TRACE_RMP_FAULT, TRACE_SPTE_REQUESTED, TRACE_SPTE_CHANGED, TRACE_SET_SPTE = range(5)
_WRITABLE = PTE.WRITABLE.value             # PT_WRITABLE_MASK, bit 1 in both formats


class Tracer:
    """Records and emits the TDP fault path's trace events for one VM.

    ``ept`` picks the SPTE masks that ``kvm_mmu_set_spte`` reads: executable is X
    (EPT) or not NX (NPT), "u" is the R bit (EPT) or U (NPT); "r" is always printed,
    since shadow_present_mask is non-zero in both formats.
    """

    def __init__(self, sink: Any, ept: bool) -> None:
        self.sink = sink
        self.write = sink_writer(sink)
        self.records: list[tuple[int, ...]] = []
        if ept:
            self.x, self.nx, self.user = EPTE.EXEC.value, 0, EPTE.READ.value
        else:
            self.x, self.nx, self.user = 0, PTE.NX.value, PTE.USER.value

    @property
    def pending(self) -> int:
        """How many events are kept for the next flush."""
        return len(self.records)

    def emit(self, kind: int, *fields: int) -> None:
        """Keep an event, as its kind and fields, for the next flush."""
        self.records.append((kind, *fields))

    def line(self, record: tuple[int, ...]) -> tuple[str, str]:
        """(event, text) of a kept record: the tracepoint's name and its TP_printk."""
        kind, a, b, c, d, e, f = (record + (0, 0, 0, 0, 0, 0))[:7]
        if kind == TRACE_PAGE_FAULT:        # kvm_page_fault: vcpu, rip, address, error code
            text = f"vcpu {a} rip 0x{b:x} address 0x{c:016x} error_code 0x{d:x}"
        elif kind == TRACE_RMP_FAULT:       # vcpu, gpa, pfn, error code, rmp level, psmash
            text = (f"vcpu {a} gpa {b:016x} pfn 0x{c:x} error_code 0x{d:x} "
                    f"rmp_level {e} psmash_ret {f}")
        elif kind == TRACE_SPTE_REQUESTED:  # gfn, pfn, level
            text = f"gfn {a:x} pfn {b:x} level {c}"
        elif kind == TRACE_SPTE_CHANGED:    # as id, gfn, level, old, new
            text = f"as id {a} gfn {b:x} level {c} old_spte {d:x} new_spte {e:x}"
        else:                               # kvm_mmu_set_spte: level, gfn, spte, sptep
            w = "w" if c & _WRITABLE else "-"
            x = "x" if (c & (self.x | self.nx)) == self.x else "-"
            u = "u" if c & self.user else "-"
            text = f"gfn {b:x} spte {c:x} (r{w}{x}{u}) level {a} at {d:x}"
        return EVENT_NAMES[kind], text

    def flush(self, raise_errors: bool = True) -> None:
        """Format the kept events and hand them to the sink, in order; the first
        exception the sink raises is raised after all of them were offered (unless
        ``raise_errors`` is off, when the call that made them is failing anyway).
        Events the sink's calls back into the VM make are handed over too."""
        error: BaseException | None = None
        while self.records:
            batch, self.records = self.records, []
            for record in batch:
                try:
                    self.write(*self.line(record))
                except Exception as exc:  # noqa: BLE001 - reported once, below
                    error = error or exc
        if error is not None and raise_errors:
            raise error

    def page_fault(self, vcpu_id: int, rip: int, address: int, error_code: int) -> None:
        """kvm:kvm_page_fault (trace.h)."""
        self.emit(TRACE_PAGE_FAULT, vcpu_id, rip, address, error_code)

    def rmp_fault(self, vcpu_id: int, gpa: int, pfn: int, error_code: int, rmp_level: int,
                  psmash_ret: int) -> None:
        """kvm:kvm_rmp_fault (trace.h): sev_handle_rmp_fault's verdict."""
        self.emit(TRACE_RMP_FAULT, vcpu_id, gpa, pfn, error_code, rmp_level, psmash_ret)

    def spte_requested(self, gfn: int, pfn: int, level: int) -> None:
        """kvmmmu:kvm_mmu_spte_requested: ``pfn`` already includes the gfn's offset
        inside the goal level's huge page."""
        self.emit(TRACE_SPTE_REQUESTED, gfn, pfn, level)

    def spte_changed(self, as_id: int, gfn: int, level: int, old: int, new: int) -> None:
        """kvmmmu:kvm_tdp_mmu_spte_changed (handle_changed_spte)."""
        self.emit(TRACE_SPTE_CHANGED, as_id, gfn, level, old, new)

    def set_spte(self, level: int, gfn: int, spte: int, sptep: int) -> None:
        """kvmmmu:kvm_mmu_set_spte: ``sptep`` is the SPTE's host-physical address."""
        self.emit(TRACE_SET_SPTE, level, gfn, spte, sptep)
