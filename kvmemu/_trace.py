"""What both cores' trace parts share (kvmemu/_pure/trace.py tells the rules):
the tracepoints' names and the sink's calling convention.

The sink is a callable, called as ``sink(event, text)``, or an object with a
``write`` method (a text file), which receives ``"event: text\\n"`` lines.
"""

from __future__ import annotations

from typing import Any, Callable

#: The tracepoints, in the order of the cores' record kinds.
EVENT_NAMES = ("kvm_page_fault", "kvm_rmp_fault", "kvm_mmu_spte_requested",
               "kvm_tdp_mmu_spte_changed", "kvm_mmu_set_spte")


def sink_writer(sink: Any) -> Callable[[str, str], Any]:
    """The ``(event, text)`` callable for a sink: the sink itself, or its ``write``."""
    if callable(sink):
        return sink  # type: ignore[no-any-return]
    write = getattr(sink, "write", None)
    if not callable(write):
        raise TypeError(f"trace must be a callable, a file or None, not {type(sink).__name__}")
    return lambda event, text: write(f"{event}: {text}\n")
