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
                        PAGE_SIZE, TDX_MAP_GPA_MAX_LEN, ExitReason, MapGpaFlag, TdvmcallStatus)
from .results import HypercallExit

_U64 = (1 << 64) - 1
KVM_EINVAL = 22                       # KVM_EINVAL is EINVAL (kvm_para.h)


class HypercallRun(NamedTuple):
    """kvm_run.hypercall (nr, args[6], ret, flags), the pending completion, and a TD's
    MapGPA progress (vcpu_tdx's map_gpa_next / map_gpa_end)."""

    nr: int = 0
    args: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
    ret: int = 0
    flags: int = 0
    pending: str | None = None
    map_gpa_next: int = 0
    map_gpa_end: int = 0


class TdvmcallResult(NamedTuple):
    """What a TDG.VP.VMCALL returns to the TD: the status in R10 and R11 (for MapGPA: the
    GPA where the mapping stopped, after an error or RETRY)."""

    status: TdvmcallStatus
    r11: int


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


def complete_hypercall(state: Any, ret: int, shared_bit: int) -> Any:
    """KVM_RUN after a KVM_EXIT_HYPERCALL, userspace having written ``ret`` to
    kvm_run.hypercall.ret, runs the pending completion: complete_hypercall_exit puts it in
    the guest's RAX (returned signed); tdx_complete_vmcall_map_gpa goes on with the next
    chunk or ends the TDVMCALL.  RuntimeError when no hypercall exit is pending."""
    run = state.hypercall
    if run.pending is None:
        raise RuntimeError("no hypercall exit is pending on this vCPU")
    state.hypercall = run = run._replace(ret=ret & _U64, pending=None)
    if run.map_gpa_end:
        return complete_vmcall_map_gpa(state, shared_bit)
    return signed(ret & _U64)


def tdx_map_gpa(state: Any, exit_enabled: int, shared_bit: int, gpaw: int, gpa: int,
                size: int) -> Any:
    """Models tdx_map_gpa (arch/x86/kvm/vmx/tdx.c, 6.18), TDG.VP.VMCALL<MapGPA> with R12 =
    ``gpa`` and R13 = ``size``: SUBFUNC_UNSUPPORTED unless KVM_HC_MAP_GPA_RANGE exits
    to userspace; INVALID_OPERAND for a range that wraps, leaves the guest's physical
    space (kvm_vcpu_is_legal_gpa: below 2**GPAW in the model) or has its ends on
    different sides of the shared bit; ALIGN_ERROR when not page-aligned (R11 = ``gpa``
    for each).  Otherwise the first chunk of at most 2 MiB exits (__tdx_map_gpa)."""
    status = None
    if not exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE):
        status = TdvmcallStatus.SUBFUNC_UNSUPPORTED
    elif ((gpa + size) & _U64 <= gpa or gpa >> gpaw or (gpa + size - 1) >> gpaw
          or bool(gpa & shared_bit) != bool((gpa + size - 1) & shared_bit)):
        status = TdvmcallStatus.INVALID_OPERAND
    elif gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        status = TdvmcallStatus.ALIGN_ERROR
    if status is not None:
        return TdvmcallResult(status, gpa)
    state.hypercall = state.hypercall._replace(map_gpa_next=gpa, map_gpa_end=gpa + size)
    return _map_gpa_exit(state, shared_bit)


def _map_gpa_exit(state: Any, shared_bit: int) -> HypercallExit:
    """Models __tdx_map_gpa (tdx.c, 6.18): KVM_EXIT_HYPERCALL for the next chunk, the GPA
    without the shared bit, ENCRYPTED for a private GPA."""
    run = state.hypercall
    gpa = run.map_gpa_next
    size = min(run.map_gpa_end - gpa, TDX_MAP_GPA_MAX_LEN)
    attrs = 0 if gpa & shared_bit else MapGpaFlag.ENCRYPTED.value
    args = (gpa & ~shared_bit, size // PAGE_SIZE, attrs, 0, 0, 0)
    state.exit_reason = ExitReason.HYPERCALL.value
    state.hypercall = run._replace(nr=KVM_HC_MAP_GPA_RANGE, args=args, ret=0,
                                   flags=KVM_EXIT_HYPERCALL_LONG_MODE,
                                   pending="tdx_complete_vmcall_map_gpa")
    return HypercallExit(KVM_HC_MAP_GPA_RANGE, args, KVM_EXIT_HYPERCALL_LONG_MODE)


def complete_vmcall_map_gpa(state: Any, shared_bit: int) -> Any:
    """Models tdx_complete_vmcall_map_gpa (tdx.c, 6.18): userspace's non-zero ret ends the
    TDVMCALL with INVALID_OPERAND and R11 = the chunk's GPA; past the end, SUCCESS;
    else the next chunk exits (no interrupt is ever pending in the model, so RETRY does
    not happen)."""
    run = state.hypercall
    if run.ret:
        state.hypercall = run._replace(map_gpa_end=0)
        return TdvmcallResult(TdvmcallStatus.INVALID_OPERAND, run.map_gpa_next)
    nxt = run.map_gpa_next + TDX_MAP_GPA_MAX_LEN
    if nxt >= run.map_gpa_end:
        state.hypercall = run._replace(map_gpa_next=nxt, map_gpa_end=0)
        return TdvmcallResult(TdvmcallStatus.SUCCESS, 0)
    state.hypercall = run._replace(map_gpa_next=nxt)
    return _map_gpa_exit(state, shared_bit)
