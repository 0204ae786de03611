"""Vendor intake: hardware exit information → KVM's page-fault error code.

The twin of ``_intake.pxi``.  This is where the private/shared decision is
made for the vendors whose hardware carries it: TDX (a clear shared-GPA bit)
and SNP (GUEST_ENC).  From here on the error code is the single carrier of that
decision, as PFERR_PRIVATE_ACCESS (bit 49).
"""

from __future__ import annotations

from itertools import repeat
from typing import Any

import numpy as np

from .. import _args
from ..constants import (EPT_VIOLATION, EPT_VIOLATION_PROT_MASK, PFERR, PFERR_SYNTHETIC_MASK,
                         TDX_GPAW_SHARED_BIT)

# Plain ints: arithmetic on IntFlag members builds flag objects per operation.
_ACC_READ = EPT_VIOLATION.ACC_READ.value
_ACC_WRITE = EPT_VIOLATION.ACC_WRITE.value
_ACC_INSTR = EPT_VIOLATION.ACC_INSTR.value
_GVA_IS_VALID = EPT_VIOLATION.GVA_IS_VALID.value
_GVA_TRANSLATED = EPT_VIOLATION.GVA_TRANSLATED.value
_PRESENT = PFERR.PRESENT.value
_WRITE = PFERR.WRITE.value
_USER = PFERR.USER.value
_FETCH = PFERR.FETCH.value
_GUEST_FINAL = PFERR.GUEST_FINAL.value
_GUEST_PAGE = PFERR.GUEST_PAGE.value
_GUEST_ENC = PFERR.GUEST_ENC.value
_PRIVATE_ACCESS = PFERR.PRIVATE_ACCESS.value


def vmx_ec(q: int, gpa: int, shared_bit: int) -> int:
    """Models __vmx_handle_ept_violation (arch/x86/kvm/vmx/common.h, Linux 6.18)."""
    ec = 0
    if q & _ACC_READ:  # an EPT read is reported as a USER access
        ec |= _USER
    if q & _ACC_WRITE:
        ec |= _WRITE
    if q & _ACC_INSTR:
        ec |= _FETCH
    if q & EPT_VIOLATION_PROT_MASK:  # the GPA had some permission: the entry was present
        ec |= _PRESENT
    if q & _GVA_IS_VALID:
        ec |= _GUEST_FINAL if q & _GVA_TRANSLATED else _GUEST_PAGE
    if shared_bit != 0 and gpa & shared_bit == 0:  # vt_is_tdx_private_gpa
        ec |= _PRIVATE_ACCESS
    return ec


def svm_ec(exit_info_1: int, snp: bool) -> int:
    """Models the error-code part of npf_interception (arch/x86/kvm/svm/svm.c, 6.18)."""
    ec = exit_info_1 & ~PFERR_SYNTHETIC_MASK
    if snp and ec & _GUEST_ENC:
        ec |= _PRIVATE_ACCESS
    return ec


def _elementwise(rule: Any, n: int, values: list[Any], out: np.ndarray) -> np.ndarray:
    columns = [v.tolist() if isinstance(v, np.ndarray) else repeat(v, n) for v in values]
    for i, args in enumerate(zip(*columns)):
        out[i] = rule(*args)
    return out


def vmx_error_code(exit_qualification: Any, gpa: Any, shared_bit: Any = 0, *,
                   out: Any = None) -> Any:
    """The error code KVM's VMX/TDX EPT-violation path hands to kvm_mmu_page_fault."""
    n, values, out = _args.operands(out, ("exit_qualification", exit_qualification),
                                    ("gpa", gpa), ("shared_bit", shared_bit))
    if n < 0:
        return vmx_ec(*values)
    return _elementwise(vmx_ec, n, values, out)


def svm_error_code(exit_info_1: Any, snp: Any = False, *, out: Any = None) -> Any:
    """The error code of KVM's #NPF intercept (npf_interception)."""
    is_snp = _args.flag("snp", snp)
    n, values, out = _args.operands(out, ("exit_info_1", exit_info_1))
    if n < 0:
        return svm_ec(values[0], is_snp)
    return _elementwise(lambda e: svm_ec(e, is_snp), n, values, out)


def tdx_shared_bit(gpaw: Any) -> Any:
    """The TDX shared-GPA bit: ``1 << 47`` for GPAW 48, ``1 << 51`` for 52."""
    if isinstance(gpaw, np.ndarray):
        n, values, out = _args.operands(None, ("gpaw", gpaw))
        return _elementwise(lambda w: TDX_GPAW_SHARED_BIT[_args.gpaw(w)], n, values, out)
    return TDX_GPAW_SHARED_BIT[_args.gpaw(gpaw)]
