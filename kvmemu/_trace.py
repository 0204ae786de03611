"""The model's decisions as the kernel's tracepoints (``vm.trace``).

Both cores call one ``Tracer``, only when a sink is set, so their lines are the
same character for character.  Each event is formatted exactly as the kernel's
TP_printk (Linux 6.18; docs/reference.md §14), and the cores emit them in
the kernel's order for a fault: ``kvm_page_fault`` (the vendor handler) →
``kvm_mmu_spte_requested`` (after hugepage adjust) → ``kvm_tdp_mmu_spte_changed``
for each SPTE changed, top-down → ``kvm_mmu_set_spte`` (the target level).

The sink is a callable, called as ``sink(event, text)``, or an object with a
``write`` method (a text file), which receives ``"event: text\\n"`` lines.

The model never calls the sink in the middle of an operation: events are kept
and handed over when the public call that made them returns (``flush``), with
the VM consistent and no lock held.  A sink may therefore call back into the
VM, and a sink that raises makes the call raise after its work is done.
"""

from __future__ import annotations

from typing import Any, Callable

from .constants import EPTE, PTE

_WRITABLE = PTE.WRITABLE.value             # PT_WRITABLE_MASK, bit 1 in both formats


def sink_writer(sink: Any) -> Callable[[str, str], Any]:
    """The ``(event, text)`` callable for a sink: the sink itself, or its ``write``."""
    if callable(sink):
        return sink  # type: ignore[no-any-return]
    write = getattr(sink, "write", None)
    if not callable(write):
        raise TypeError(f"trace must be a callable, a file or None, not {type(sink).__name__}")
    return lambda event, text: write(f"{event}: {text}\n")


class Tracer:
    """Formats and emits the TDP fault path's trace events for one VM.

    ``ept`` picks the SPTE masks that ``kvm_mmu_set_spte`` reads: executable is X
    (EPT) or not NX (NPT), "u" is the R bit (EPT) or U (NPT); "r" is always printed,
    since shadow_present_mask is non-zero in both formats.
    """

    __slots__ = ("sink", "write", "pending", "x", "nx", "user")

    def __init__(self, sink: Any, ept: bool) -> None:
        self.sink = sink
        self.write = sink_writer(sink)
        self.pending: list[tuple[str, str]] = []
        if ept:
            self.x, self.nx, self.user = EPTE.EXEC.value, 0, EPTE.READ.value
        else:
            self.x, self.nx, self.user = 0, PTE.NX.value, PTE.USER.value

    def emit(self, event: str, text: str) -> None:
        """Keep an event for the next flush."""
        self.pending.append((event, text))

    def flush(self, raise_errors: bool = True) -> None:
        """Hand the kept events to the sink, in order; the first exception the sink
        raises is raised after all of them were offered (unless ``raise_errors`` is off,
        when the call that made them is failing anyway)."""
        error: BaseException | None = None
        while self.pending:
            batch, self.pending = self.pending, []
            for event, text in batch:
                try:
                    self.write(event, text)
                except Exception as exc:  # noqa: BLE001 - reported once, below
                    error = error or exc
        if error is not None and raise_errors:
            raise error

    def page_fault(self, vcpu_id: int, rip: int, address: int, error_code: int) -> None:
        """kvm:kvm_page_fault (trace.h)."""
        self.emit("kvm_page_fault",
                  f"vcpu {vcpu_id} rip 0x{rip:x} address 0x{address:016x} "
                  f"error_code 0x{error_code:x}")

    def rmp_fault(self, vcpu_id: int, gpa: int, pfn: int, error_code: int, rmp_level: int,
                  psmash_ret: int) -> None:
        """kvm:kvm_rmp_fault (trace.h): sev_handle_rmp_fault's verdict."""
        self.emit("kvm_rmp_fault",
                  f"vcpu {vcpu_id} gpa {gpa:016x} pfn 0x{pfn:x} error_code 0x{error_code:x} "
                  f"rmp_level {rmp_level} psmash_ret {psmash_ret}")

    def spte_requested(self, gfn: int, pfn: int, level: int) -> None:
        """kvmmmu:kvm_mmu_spte_requested: ``pfn`` already includes the gfn's offset
        inside the goal level's huge page."""
        self.emit("kvm_mmu_spte_requested", f"gfn {gfn:x} pfn {pfn:x} level {level}")

    def spte_changed(self, as_id: int, gfn: int, level: int, old: int, new: int) -> None:
        """kvmmmu:kvm_tdp_mmu_spte_changed (handle_changed_spte)."""
        self.emit("kvm_tdp_mmu_spte_changed",
                  f"as id {as_id} gfn {gfn:x} level {level} old_spte {old:x} new_spte {new:x}")

    def set_spte(self, level: int, gfn: int, spte: int, sptep: int) -> None:
        """kvmmmu:kvm_mmu_set_spte: ``sptep`` is the SPTE's host-physical address."""
        w = "w" if spte & _WRITABLE else "-"
        x = "x" if (spte & (self.x | self.nx)) == self.x else "-"
        u = "u" if spte & self.user else "-"
        self.emit("kvm_mmu_set_spte",
                  f"gfn {gfn:x} spte {spte:x} (r{w}{x}{u}) level {level} at {sptep:x}")
