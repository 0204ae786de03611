# The compiled core of kvmemu: one extension module made of parts.
#
# Each part models one stage of a fault and is named after the kernel source it
# follows (docs/architecture.md has the table); its declarations are in
# _cy/<part>.pxd (all included by _core.pxd, so the order below does not matter
# to the compiler), and kvmemu/_pure/<part>.py is its pure-Python twin, with the
# same function names.  One module, so that the walk inlines into the batch loop.

include "_cy/locking.pyx"
include "_cy/paging.pyx"
include "_cy/exits.pyx"
include "_cy/spte.pyx"
include "_cy/trace.pyx"
include "_cy/memslots.pyx"
include "_cy/mmu.pyx"
include "_cy/tdp_mmu.pyx"
include "_cy/vcpu.pyx"
