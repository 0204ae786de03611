# The compiled core of kvmemu.
#
# One extension module, read in the order data flows through KVM: each
# included part models one stage and names the kernel functions it follows;
# kvmemu/_pure/ holds the pure-Python twin of each part, module for module.
# Python-facing functions check their arguments once, through kvmemu._args
# (shared with the twin, so both reject the same inputs the same way);
# everything below them is C over typed memoryviews and runs without the GIL,
# except the fault pipeline's table allocation and its optional stage hook.

include "_paging.pxi"
include "_intake.pxi"
include "_memory.pxi"
include "_mmu.pxi"
include "_vcpu.pxi"
