"""Guest hypercalls that reach KVM: VMCALL / VMMCALL and the KVM_EXIT_HYPERCALL protocol.

Written once for both cores: nothing here runs per access.  Models, from Linux
6.18 (arch/x86/kvm/x86.c unless named otherwise): ``____kvm_emulate_hypercall``
with ``__kvm_emulate_hypercall`` (x86.h), ``complete_hypercall_exit``, and
``user_exit_on_hypercall`` (x86.h).  The modelled guest runs in 64-bit mode at CPL 0
(``is_64_bit_hypercall``; a protected-state guest always counts as 64-bit) and has
no KVM PV features in its CPUID.

What a call leaves in ``kvm_run.hypercall`` is the vCPU state's ``hypercall``
(a ``HypercallRun``, replaced whole on every change, so snapshots may share it);
``pending`` names the completion KVM will run at the next KVM_RUN
(``vcpu->arch.complete_userspace_io``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .constants import (KVM_ENOSYS, KVM_EOPNOTSUPP, KVM_EXIT_HYPERCALL_LONG_MODE,
                        KVM_HC_CLOCK_PAIRING, KVM_HC_KICK_CPU, KVM_HC_MAP_GPA_RANGE,
                        KVM_HC_SCHED_YIELD, KVM_HC_SEND_IPI, KVM_HC_VAPIC_POLL_IRQ, PAGE_SHIFT,
                        ExitReason)
from .results import HypercallExit

_U64 = (1 << 64) - 1
KVM_EINVAL = 22                       # KVM_EINVAL is EINVAL (kvm_para.h)


class HypercallRun(NamedTuple):
    """kvm_run.hypercall (nr, args[6], ret, flags) and the pending completion."""

    nr: int = 0
    args: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
    ret: int = 0
    flags: int = 0
    pending: str | None = None


NO_HYPERCALL = HypercallRun()


def signed(value: int) -> int:
    """A u64 register value as the guest's signed long."""
    return value - (1 << 64) if value >> 63 else value


def emulate_hypercall(state: Any, exit_enabled: int, nr: int, a0: int, a1: int, a2: int,
                      a3: int) -> Any:
    """Models ____kvm_emulate_hypercall and __kvm_emulate_hypercall (x86.c / x86.h, 6.18)
    for a 64-bit guest at CPL 0: KVM_HC_MAP_GPA_RANGE exits to userspace when
    KVM_CAP_EXIT_HYPERCALL enabled it (-KVM_ENOSYS otherwise) and its address is
    page-aligned, ``npages`` is not 0 and gfn + npages does not wrap (-KVM_EINVAL); its
    attributes are not checked.  KVM_HC_VAPIC_POLL_IRQ gives 0; KICK_CPU, SEND_IPI and
    SCHED_YIELD need PV features the modelled guest lacks (-KVM_ENOSYS);
    KVM_HC_CLOCK_PAIRING needs a TSC clocksource the modelled host lacks
    (kvm_pv_clock_pairing: -KVM_EOPNOTSUPP); any other number is -KVM_ENOSYS.
    Returns the guest's RAX (complete_hypercall_exit, run at once) as a signed value,
    or a HypercallExit with the exit in ``state``."""
    ret = -KVM_ENOSYS
    if nr == KVM_HC_VAPIC_POLL_IRQ:
        ret = 0
    elif nr == KVM_HC_CLOCK_PAIRING:
        ret = -KVM_EOPNOTSUPP
    elif nr in (KVM_HC_KICK_CPU, KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD):
        ret = -KVM_ENOSYS
    elif nr == KVM_HC_MAP_GPA_RANGE and exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE):
        gpa, npages, attrs = a0, a1, a2
        gfn = gpa >> PAGE_SHIFT
        if gpa & ((1 << PAGE_SHIFT) - 1) or not npages or (gfn + npages) & _U64 <= gfn:
            ret = -KVM_EINVAL
        else:
            state.exit_reason = ExitReason.HYPERCALL.value
            state.hypercall = HypercallRun(KVM_HC_MAP_GPA_RANGE, (gpa, npages, attrs, 0, 0, 0),
                                           0, KVM_EXIT_HYPERCALL_LONG_MODE,
                                           "complete_hypercall_exit")
            return HypercallExit(KVM_HC_MAP_GPA_RANGE, state.hypercall.args,
                                 KVM_EXIT_HYPERCALL_LONG_MODE)
    state.hypercall = state.hypercall._replace(ret=ret & _U64, pending=None)
    return ret


def complete_hypercall(state: Any, ret: int) -> Any:
    """KVM_RUN after a KVM_EXIT_HYPERCALL, userspace having written ``ret`` to
    kvm_run.hypercall.ret: complete_hypercall_exit puts it in the guest's RAX and skips
    the instruction.  Returns the guest's RAX, signed.  RuntimeError when no hypercall
    exit is pending."""
    run = state.hypercall
    if run.pending is None:
        raise RuntimeError("no hypercall exit is pending on this vCPU")
    state.hypercall = run._replace(ret=ret & _U64, pending=None)
    return signed(ret & _U64)
