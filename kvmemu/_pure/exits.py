"""Vendor intake and exit handlers: hardware exit information → KVM's error code.

The twin of ``_cy/exits.pyx``.  This is where the private/shared decision is
made for the vendors whose hardware carries it: TDX (a clear shared-GPA bit)
and SNP (GUEST_ENC, bit 34).  From here on the error code is the single carrier
of that decision, as PFERR_PRIVATE_ACCESS (bit 49).

Models, from Linux 6.18: ``__vmx_handle_ept_violation`` (arch/x86/kvm/vmx/common.h),
``handle_ept_violation`` and ``handle_ept_misconfig`` (vmx/vmx.c),
``tdx_handle_ept_violation`` (vmx/tdx.c), ``npf_interception`` (svm/svm.c) and
the ``kvm_page_fault`` tracepoint they fire.
"""

from __future__ import annotations

import errno
from itertools import repeat
from typing import Any

import numpy as np

from .. import _args
from ..constants import EPT_VIOLATION_PROT_MASK
from . import memslots, mmu
from .cnames import *  # noqa: F403  (the constants under their C names)


def bit(value: int, mask: int) -> int:
    """1 if the single bit ``mask`` is set in ``value``."""
    return 1 if value & mask else 0


def vmx_ec_access(q: int) -> int:
    """The part of __vmx_handle_ept_violation that reads only the qualification: EPT
    read -> USER, write -> WRITE, fetch -> FETCH, any PROT bit -> PRESENT; with a valid
    guest linear address, GVA_TRANSLATED picks GUEST_FINAL, else GUEST_PAGE."""
    ec = 0
    if q & EPT_VIOLATION_ACC_READ:   # an EPT read is reported as a USER access
        ec |= PFERR_USER
    if q & EPT_VIOLATION_ACC_WRITE:
        ec |= PFERR_WRITE
    if q & EPT_VIOLATION_ACC_INSTR:
        ec |= PFERR_FETCH
    if q & EPT_VIOLATION_PROT_MASK:  # the GPA had some permission: the entry was present
        ec |= PFERR_PRESENT
    if q & EPT_VIOLATION_GVA_IS_VALID:
        ec |= PFERR_GUEST_FINAL if q & EPT_VIOLATION_GVA_TRANSLATED else PFERR_GUEST_PAGE
    return ec


def tdx_private_bit(gpa: int, shared_bit: int) -> int:
    """PFERR_PRIVATE_ACCESS iff vt_is_tdx_private_gpa: a shared bit exists and is clear."""
    return PFERR_PRIVATE_ACCESS if shared_bit != 0 and gpa & shared_bit == 0 else 0


def vmx_ec(q: int, gpa: int, shared_bit: int) -> int:
    """Models __vmx_handle_ept_violation (arch/x86/kvm/vmx/common.h, Linux 6.18).

    ``shared_bit`` is the TDX shared-GPA mask (kvm_gfn_direct_bits as a GPA), 0 for
    every VM that is not a TD; a TD GPA with it clear is private.
    """
    return vmx_ec_access(q) | tdx_private_bit(gpa, shared_bit)


def svm_ec(exit_info_1: int, snp: bool) -> int:
    """Models the error-code part of npf_interception (arch/x86/kvm/svm/svm.c, 6.18): the
    synthetic bits (48, 49) are cleared; on an SNP VM GUEST_ENC means private."""
    ec = exit_info_1 & ~PFERR_SYNTHETIC_MASK
    if snp and ec & PFERR_GUEST_ENC:
        ec |= PFERR_PRIVATE_ACCESS
    return ec


def _operand(value: Any, n: int) -> Any:
    """An operand as the loops take it: its elements, or the scalar ``n`` times."""
    return value.tolist() if isinstance(value, np.ndarray) else repeat(value, n)


def vmx_ec_loop(q: Any, gpa: Any, shared_bit: Any, out: np.ndarray) -> None:
    """out[i] = vmx_ec(q[i], gpa[i], shared_bit[i]); an int operand stands for every
    element."""
    n = len(out)
    for i, args in enumerate(zip(_operand(q, n), _operand(gpa, n), _operand(shared_bit, n))):
        out[i] = vmx_ec(*args)


def svm_ec_loop(exit_info_1: Any, snp: bool, out: np.ndarray) -> None:
    """out[i] = svm_ec(exit_info_1[i], snp); an int operand stands for every element."""
    for i, e in enumerate(_operand(exit_info_1, len(out))):
        out[i] = svm_ec(e, snp)


def vmx_error_code(exit_qualification: Any, gpa: Any, shared_bit: Any = 0, *,
                   out: Any = None) -> Any:
    """The error code KVM's VMX/TDX EPT-violation path hands to kvm_mmu_page_fault
    (__vmx_handle_ept_violation, arch/x86/kvm/vmx/common.h, Linux 6.18).

    ``shared_bit`` is the TDX shared-GPA bit as a GPA mask (``tdx_shared_bit``; 0 for
    every other VM type): a GPA with it clear is private and gets
    PFERR.PRIVATE_ACCESS.  Ints give an int; 1-D uint64 arrays (scalars broadcast)
    give a uint64 array, written into ``out`` when given.
    """
    n, (q, g, s), out = _args.operands(out, ("exit_qualification", exit_qualification),
                                       ("gpa", gpa), ("shared_bit", shared_bit))
    if n < 0:
        return vmx_ec(q, g, s)
    vmx_ec_loop(q, g, s, out)
    return out


def svm_error_code(exit_info_1: Any, snp: Any = False, *, out: Any = None) -> Any:
    """The error code of KVM's #NPF intercept (npf_interception, arch/x86/kvm/svm/svm.c,
    Linux 6.18): the synthetic bits 48-49 are cleared from the hardware value;
    PFERR.PRIVATE_ACCESS is added iff ``snp`` and GUEST_ENC (bit 34) is set.  Ints give
    an int; a 1-D uint64 array gives a uint64 array, written into ``out`` when given.
    """
    is_snp = _args.flag("snp", snp)
    n, (e,), out = _args.operands(out, ("exit_info_1", exit_info_1))
    if n < 0:
        return svm_ec(e, is_snp)
    svm_ec_loop(e, is_snp, out)
    return out


# --- exit handlers ------------------------------------------------------------------------

def trace_kvm_page_fault(vcpu: Any, gpa: int, error_code: int) -> None:
    """Models the kvm_page_fault tracepoint (arch/x86/kvm/trace.h, 6.18): VMX passes the raw exit
    qualification (TDX: 0x2 for a private GPA), SVM the error code with PRIVATE_ACCESS
    synthesized."""
    tracer = vcpu.mmu.tracer
    if tracer is not None:
        tracer.page_fault(vcpu.vcpu_id, vcpu.rip, gpa, error_code)


def handle_ept_violation(vcpu: Any, gpa: int, exit_qualification: int) -> int:
    """Models handle_ept_violation (arch/x86/kvm/vmx/vmx.c, 6.18) on a VMX VM; a TD
    goes to tdx_handle_ept_violation."""
    if vcpu.tdx:
        return tdx_handle_ept_violation(vcpu, gpa, exit_qualification)
    trace_kvm_page_fault(vcpu, gpa, exit_qualification)
    return mmu.page_fault(vcpu, gpa, vmx_ec(exit_qualification, gpa, 0))


def tdx_is_sept_violation_unexpected_pending(ext_exit_qual: int,
                                             exit_qualification: int) -> bool:
    """Models tdx_is_sept_violation_unexpected_pending (tdx.c, 6.18): the TDX module says
    the EPT violation hit a PENDING page (extended type 6), and the qualification has no
    permission bits (the entry is not present to the TD)."""
    return ((ext_exit_qual & TDX_EXT_EXIT_QUAL_TYPE_MASK)
            == TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION
            and not exit_qualification & (EPT_VIOLATION_PROT_MASK
                                          | EPT_VIOLATION_EXEC_FOR_RING3_LIN))


def tdx_handle_ept_violation(vcpu: Any, gpa: int, exit_qualification: int) -> int:
    """Models tdx_handle_ept_violation (arch/x86/kvm/vmx/tdx.c, 6.18): a private GPA on a
    page the TD has not accepted (the extended exit qualification, ``vcpu.ext_exit_qual``,
    says PENDING) kills the VM (kvm_vm_dead, -EIO); any other private GPA is handled as a
    write whatever the TDX module reported, and its fault retries inside KVM (up to
    TDX_LOCAL_RETRY_LIMIT times here); a fetch from shared memory is a KVM bug (-EIO)."""
    local_retry, exit_qualification = tdx_fault_qualification(
        vcpu, gpa, vcpu.ext_exit_qual, exit_qualification)
    if local_retry < 0:
        return local_retry
    trace_kvm_page_fault(vcpu, gpa, exit_qualification)
    r = RET_PF_RETRY
    for _ in range(TDX_LOCAL_RETRY_LIMIT):
        r = mmu.page_fault(vcpu, gpa, vmx_ec(exit_qualification, gpa,
                                             vcpu.direct_bits_gfn << PAGE_SHIFT))
        if r != RET_PF_RETRY or not local_retry:
            break
    return r


def tdx_fault_qualification(vcpu: Any, gpa: int, ext_exit_qual: int,
                            exit_qualification: int) -> tuple[int, int]:
    """The checks of tdx_handle_ept_violation (tdx.c, 6.18), with the qualification its
    fault goes on with: (1, a write) for a private GPA, whose fault retries inside KVM;
    (0, as it is) for a shared one; -EIO for a KVM bug: a private GPA on a page the TD
    has not accepted (``ext_exit_qual`` says PENDING) kills the VM (kvm_vm_dead), and a
    fetch from shared memory."""
    if not gpa & (vcpu.direct_bits_gfn << PAGE_SHIFT):
        if tdx_is_sept_violation_unexpected_pending(ext_exit_qual, exit_qualification):
            # pr_warn("Guest access before accepting ..."), then kvm_vm_dead.
            vcpu.memslots.counters[VM_COUNTER_VM_DEAD] = 1
            return -errno.EIO, exit_qualification
        return 1, EPT_VIOLATION_ACC_WRITE
    if exit_qualification & EPT_VIOLATION_ACC_INSTR:
        return -errno.EIO, exit_qualification
    return 0, exit_qualification


def vmx_flush_pml_buffer(vcpu: Any) -> None:
    """Models vmx_flush_pml_buffer (vmx.c, 6.18), which __vmx_handle_exit runs on every
    VM exit with PML on: each logged GPA, newest first, marks its page dirty
    (kvm_vcpu_mark_page_dirty), and the log is empty again (index 511)."""
    pml = vcpu.pml
    if pml.index == PML_LOG_NR_ENTRIES - 1:
        return
    tail = 0 if pml.index >= PML_LOG_NR_ENTRIES else pml.index + 1
    table = vcpu.memslots.srcu_read_lock()
    try:
        for i in range(PML_LOG_NR_ENTRIES - 1, tail - 1, -1):
            gfn = pml.gpa[i] >> PAGE_SHIFT
            memslots.mark_page_dirty_in_slot(table.gfn_to_memslot(gfn), gfn)
    finally:
        vcpu.memslots.srcu_read_unlock(table)
    pml.index = PML_LOG_NR_ENTRIES - 1


def handle_ept_misconfig(vcpu: Any, gpa: int) -> int:
    """Models handle_ept_misconfig (arch/x86/kvm/vmx/vmx.c, 6.18): a reserved-bit fault,
    i.e. the MMIO path.  A TD never takes one (tdx.c treats it as a KVM bug: -EIO)."""
    if vcpu.tdx:
        return -errno.EIO
    return mmu.page_fault(vcpu, gpa, PFERR_RSVD)


def npf_interception(vcpu: Any, gpa: int, exit_info_1: int) -> int:
    """Models npf_interception (arch/x86/kvm/svm/svm.c, 6.18): the fault, then, when it
    resumes the guest (rc > 0) and the RMP check failed (GUEST_RMP), sev_handle_rmp_fault."""
    error_code = svm_ec(exit_info_1, vcpu.snp)
    trace_kvm_page_fault(vcpu, gpa, error_code)
    rc = mmu.page_fault(vcpu, gpa, error_code)
    if rc > 0 and error_code & PFERR_GUEST_RMP:
        sev_handle_rmp_fault(vcpu, gpa, error_code)
    return rc


def sev_handle_rmp_fault(vcpu: Any, gpa: int, error_code: int) -> None:
    """Models sev_handle_rmp_fault (arch/x86/kvm/svm/sev.c, 6.18): nothing for a gfn the
    attributes call shared, a memslot without guest_memfd or a file that is gone
    (kvm_gmem_get_pfn fails); otherwise the frame is got (and prepared if it was not),
    nothing more if its RMP entry is not assigned, and a 4K entry is a spurious fault:
    only the kvm_rmp_fault event (rmp_level 1, psmash_ret 0).  The PSMASH of a 2M entry
    and the zap of its 512 gfns never happen: 6.18's guest_memfd has only 4K folios, so
    every RMP entry KVM makes is 4K."""
    gfn = gpa >> PAGE_SHIFT
    memslots_ = vcpu.memslots
    if not memslots_.mem_is_private(gfn):
        return
    slot = vcpu.srcu.gfn_to_memslot(gfn)
    if slot is None or slot.gmem_id < 0 or slot.gmem_closed:
        return
    pfn = memslots_.gmem_get_pfn(slot, gfn)
    frame = memslots_.frame_state_alloc(pfn)
    mmu.gmem_prepare(vcpu, frame, gfn)
    if frame is None or not frame[0].get(frame[1]) & FRAME_STATE_RMP_ASSIGNED:
        return
    tracer = vcpu.mmu.tracer
    if tracer is not None:
        tracer.rmp_fault(vcpu.vcpu_id, gpa, pfn, error_code, PG_LEVEL_4K, 0)
