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
                        KVM_HC_CLOCK_PAIRING, KVM_HC_MAP_GPA_RANGE, KVM_HC_VAPIC_POLL_IRQ,
                        PAGE_SHIFT,
                        PAGE_SIZE, TDX_MAP_GPA_MAX_LEN, GHCB_MSR_PSC_RESP,
                        GHCB_MSR_PSC_RESP_ERROR, SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED,
                        VMGEXIT_PSC_ERROR_GENERIC, VMGEXIT_PSC_ERROR_INVALID_ENTRY,
                        VMGEXIT_PSC_ERROR_INVALID_HDR, VMGEXIT_PSC_MAX_COUNT, ExitReason,
                        MapGpaFlag, TdvmcallStatus)
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
    #: An SNP page state change in progress: the guest's entries as (gfn, operation,
    #: pagesize, cur_page), the header's (cur_entry, end_entry), and psc_idx /
    #: psc_inflight / psc_2m (vcpu_sev_es_state).
    psc: tuple[Any, ...] | None = None


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
    elif nr == KVM_HC_MAP_GPA_RANGE and exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE):
        gpa, npages, attrs = a0, a1, a2
        gfn = gpa >> PAGE_SHIFT
        if gpa & ((1 << PAGE_SHIFT) - 1) or not npages or (gfn + npages) & _U64 <= gfn:
            ret = -KVM_EINVAL
        else:
            return _exit(state, (gpa, npages, attrs, 0, 0, 0), "complete_hypercall_exit")
    state.hypercall = state.hypercall._replace(ret=ret & _U64, pending=None)
    return ret


def complete_hypercall(state: Any, ret: int, shared_bit: int, exit_enabled: int,
                       has_events: bool = False) -> Any:
    """KVM_RUN after a KVM_EXIT_HYPERCALL, userspace having written ``ret`` to
    kvm_run.hypercall.ret, runs the pending completion: complete_hypercall_exit puts it in
    the guest's RAX (returned signed); tdx_complete_vmcall_map_gpa goes on with the next
    chunk or ends the TDVMCALL (RETRY when ``has_events``: kvm_vcpu_has_events);
    snp_complete_psc_msr answers in the GHCB MSR;
    snp_complete_one_psc goes on with the next range.  RuntimeError when no hypercall
    exit is pending."""
    run = state.hypercall
    kind = run.pending
    if kind is None:
        raise RuntimeError("no hypercall exit is pending on this vCPU")
    state.hypercall = run = run._replace(ret=ret & _U64, pending=None)
    if kind == "tdx_complete_vmcall_map_gpa":
        return complete_vmcall_map_gpa(state, shared_bit, has_events)
    if kind == "snp_complete_psc_msr":
        return GHCB_MSR_PSC_RESP_ERROR if run.ret else GHCB_MSR_PSC_RESP
    if kind == "snp_complete_one_psc":
        return complete_one_psc(state, exit_enabled)
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
    return _exit(state, (gpa & ~shared_bit, size // PAGE_SIZE, attrs, 0, 0, 0),
                 "tdx_complete_vmcall_map_gpa")


def complete_vmcall_map_gpa(state: Any, shared_bit: int, has_events: bool = False) -> Any:
    """Models tdx_complete_vmcall_map_gpa (tdx.c, 6.18): userspace's non-zero ret ends the
    TDVMCALL with INVALID_OPERAND and R11 = the chunk's GPA; past the end, SUCCESS;
    with an event pending for the vCPU (``has_events``: kvm_vcpu_has_events, e.g. an
    interrupt to deliver) RETRY with R11 = the next chunk's GPA, where the guest
    resumes the request; else the next chunk exits."""
    run = state.hypercall
    if run.ret:
        state.hypercall = run._replace(map_gpa_end=0)
        return TdvmcallResult(TdvmcallStatus.INVALID_OPERAND, run.map_gpa_next)
    nxt = run.map_gpa_next + TDX_MAP_GPA_MAX_LEN
    if nxt >= run.map_gpa_end:
        state.hypercall = run._replace(map_gpa_next=nxt, map_gpa_end=0)
        return TdvmcallResult(TdvmcallStatus.SUCCESS, 0)
    if has_events:
        state.hypercall = run._replace(map_gpa_next=nxt, map_gpa_end=0)
        return TdvmcallResult(TdvmcallStatus.RETRY, nxt)
    state.hypercall = run._replace(map_gpa_next=nxt)
    return _map_gpa_exit(state, shared_bit)


# --- SEV-SNP page state changes (arch/x86/kvm/svm/sev.c, 6.18) ---------------------------

class PscResult(NamedTuple):
    """The end of a GHCB page-state-change request: SW_EXITINFO2 (0, or a
    VMGEXIT_PSC_ERROR_* code; SW_EXITINFO1 is always "no action"), the header's
    cur_entry, and each entry's cur_page as KVM left them."""

    ret: int
    cur_entry: int
    cur_pages: tuple[int, ...]


def snp_begin_psc_msr(state: Any, exit_enabled: int, gfn: int, op: int) -> Any:
    """Models snp_begin_psc_msr (sev.c, 6.18), the GHCB MSR protocol's page state change
    request for one 4K page: an operation other than PRIVATE (1) or SHARED (2), or
    KVM_HC_MAP_GPA_RANGE not exiting, answers GHCB_MSR_PSC_RESP_ERROR at once; else
    KVM_EXIT_HYPERCALL for the page (ENCRYPTED for PRIVATE, 4K)."""
    if op not in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED) or not (
            exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE)):
        return GHCB_MSR_PSC_RESP_ERROR
    attrs = MapGpaFlag.ENCRYPTED.value if op == SNP_PAGE_STATE_PRIVATE else 0
    return _exit(state, (gfn << PAGE_SHIFT, 1, attrs, 0, 0, 0), "snp_complete_psc_msr")


def _exit(state: Any, args: tuple[int, ...], pending: str) -> HypercallExit:
    """KVM_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE with ``args``, ret 0 (what every 6.18
    handler writes for QEMU's sake), long mode, and the completion to run."""
    state.exit_reason = ExitReason.HYPERCALL.value
    state.hypercall = state.hypercall._replace(nr=KVM_HC_MAP_GPA_RANGE, args=args, ret=0,
                                               flags=KVM_EXIT_HYPERCALL_LONG_MODE,
                                               pending=pending)
    return HypercallExit(KVM_HC_MAP_GPA_RANGE, args, KVM_EXIT_HYPERCALL_LONG_MODE)


def snp_page_state_change(state: Any, exit_enabled: int, entries: list[tuple[int, int, bool]],
                          ) -> Any:
    """A GHCB page state change request (VMGEXIT PSC) whose buffer holds ``entries``
    ((gfn, operation, 2M page size)), cur_entry 0 and end_entry len - 1 (u16), every
    cur_page 0: snp_begin_psc."""
    psc = (tuple((gfn, op, bool(huge), 0) for gfn, op, huge in entries),
           0, (len(entries) - 1) & 0xFFFF, 0, 0, False)
    state.hypercall = state.hypercall._replace(psc=psc)
    return begin_psc(state, exit_enabled)


def _complete_psc(state: Any, ret: int) -> PscResult:
    """Models snp_complete_psc (sev.c, 6.18): the request ends with SW_EXITINFO2 ``ret``."""
    entries, cur_entry = state.hypercall.psc[0], state.hypercall.psc[1]
    state.hypercall = state.hypercall._replace(psc=None)
    return PscResult(ret, cur_entry, tuple(e[3] for e in entries))


def _complete_one_psc_entries(state: Any) -> None:
    """Models __snp_complete_one_psc (sev.c, 6.18): the in-flight entries are done
    (cur_page 512 or 1), cur_entry moves past them."""
    entries, _, end, idx, inflight, _ = state.hypercall.psc
    new = list(entries)
    while inflight:
        gfn, op, huge, _ = new[idx]
        new[idx] = (gfn, op, huge, 512 if huge else 1)
        inflight -= 1
        idx += 1
    state.hypercall = state.hypercall._replace(psc=(tuple(new), idx, end, 0, 0, False))


def complete_one_psc(state: Any, exit_enabled: int) -> Any:
    """Models snp_complete_one_psc (sev.c, 6.18): userspace's non-zero ret ends the request
    with VMGEXIT_PSC_ERROR_GENERIC; else the in-flight range is done, on to the next."""
    if state.hypercall.ret:
        return _complete_psc(state, VMGEXIT_PSC_ERROR_GENERIC)
    _complete_one_psc_entries(state)
    return begin_psc(state, exit_enabled)


def begin_psc(state: Any, exit_enabled: int) -> Any:
    """Models snp_begin_psc (sev.c, 6.18): GENERIC error without the exit; INVALID_HDR for
    end_entry at or past the buffer's 253 entries; INVALID_ENTRY for an entry whose
    cur_page exceeds its pages or whose gfn is not aligned to them; a partly done 2M
    entry goes on in 4K pages; adjacent entries of the same operation and size join one
    exit; operations other than PRIVATE and SHARED count as done; 0 when nothing is
    left."""
    if not exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE):
        return _complete_psc(state, VMGEXIT_PSC_ERROR_GENERIC)
    while True:
        entries, cur_entry, end, _, _, _ = state.hypercall.psc
        if end >= VMGEXIT_PSC_MAX_COUNT:
            return _complete_psc(state, VMGEXIT_PSC_ERROR_INVALID_HDR)
        idx = cur_entry
        while idx <= end:
            gfn, op, huge, cur_page = entries[idx]
            npages = 512 if huge else 1
            if cur_page > npages or gfn % npages:
                state.hypercall = state.hypercall._replace(
                    psc=(entries, idx, end, 0, 0, False))
                return _complete_psc(state, VMGEXIT_PSC_ERROR_INVALID_ENTRY)
            if cur_page:
                npages -= cur_page
                gfn += cur_page
                huge = False
            if npages:
                break
            idx += 1
        if idx > end:
            state.hypercall = state.hypercall._replace(psc=(entries, idx, end, 0, 0, False))
            return _complete_psc(state, 0)
        start_gfn, start_op, start_huge = gfn, op, entries[idx][2]
        first, inflight = idx, 1
        while idx + 1 <= end:
            nxt = entries[idx + 1]
            # entry_start.gfn: the entry's own gfn, even when cur_page moved the start.
            if (nxt[1] != start_op or nxt[0] != entries[first][0] + npages or nxt[3]
                    or nxt[2] != huge):
                break
            idx += 1
            inflight += 1
            npages += 512 if huge else 1
        state.hypercall = state.hypercall._replace(
            psc=(entries, first, end, first, inflight, huge))
        if start_op in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED):
            attrs = ((MapGpaFlag.ENCRYPTED.value if start_op == SNP_PAGE_STATE_PRIVATE else 0)
                     | (MapGpaFlag.PAGE_SZ_2M.value if start_huge else 0))
            return _exit(state, (start_gfn << PAGE_SHIFT, npages, attrs, 0, 0, 0),
                         "snp_complete_one_psc")
        _complete_one_psc_entries(state)
