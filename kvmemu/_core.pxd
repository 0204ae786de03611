# The declarations of the compiled core: one declaration file per part, in the order
# their types depend on each other (a part refers to a later part's class through a
# forward declaration).  The constants come from kvmemu_constants.pxd, which setup.py
# generates from kvmemu/constants.py into the build directory.

from kvmemu_constants cimport *

include "_cy/levels.pxd"
include "_cy/locking.pxd"
include "_cy/paging.pxd"
include "_cy/spte.pxd"
include "_cy/trace.pxd"
include "_cy/memslots.pxd"
include "_cy/mmu.pxd"
include "_cy/tdp_mmu.pxd"
include "_cy/vcpu.pxd"
include "_cy/exits.pxd"
