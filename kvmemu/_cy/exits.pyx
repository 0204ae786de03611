# Vendor intake and exit handlers: hardware exit information -> the error code KVM
# hands to kvm_mmu_page_fault.
#
# The compiled twin of kvmemu/_pure/exits.py, which names the Linux 6.18 functions.
# Here the private/shared decision is made for the vendors whose hardware carries
# it: TDX (a clear shared-GPA bit) and SNP (GUEST_ENC, bit 34).  The error code is
# the single carrier of that decision from here on: PFERR_PRIVATE_ACCESS (bit 49).

from libc.errno cimport EIO
from libc.stdint cimport uint64_t

import numpy as np

from kvmemu import _args


cdef inline uint64_t bit(uint64_t value, uint64_t mask) noexcept nogil:
    """1 if the single bit ``mask`` is set in ``value``: a shift once ``mask`` is a constant."""
    return (value // mask) & 1


cdef inline uint64_t vmx_ec_access(uint64_t q) noexcept nogil:
    """The part of __vmx_handle_ept_violation that reads only the qualification.

    EPT read -> USER, write -> WRITE, fetch -> FETCH, any PROT bit -> PRESENT;
    with a valid guest linear address, GVA_TRANSLATED picks GUEST_FINAL, else
    GUEST_PAGE.  Written as shifts and masks without branches or compares:
    exit values in a batch are random (a mispredicted branch costs more than
    the whole rule) and this form vectorises with plain SSE2.
    """
    cdef uint64_t gva_valid = bit(q, EPT_VIOLATION_GVA_IS_VALID)
    cdef uint64_t translated = bit(q, EPT_VIOLATION_GVA_TRANSLATED)
    cdef uint64_t present = (bit(q, EPT_VIOLATION_PROT_READ) | bit(q, EPT_VIOLATION_PROT_WRITE)
                             | bit(q, EPT_VIOLATION_PROT_EXEC))
    return (bit(q, EPT_VIOLATION_ACC_READ) * PFERR_USER
            | bit(q, EPT_VIOLATION_ACC_WRITE) * PFERR_WRITE
            | bit(q, EPT_VIOLATION_ACC_INSTR) * PFERR_FETCH
            | present * PFERR_PRESENT
            | (gva_valid & translated) * PFERR_GUEST_FINAL
            | (gva_valid & (translated ^ 1)) * PFERR_GUEST_PAGE)


cdef inline uint64_t tdx_private_bit(uint64_t gpa, uint64_t shared_bit) noexcept nogil:
    """PFERR_PRIVATE_ACCESS iff vt_is_tdx_private_gpa: a shared bit exists and is clear."""
    cdef uint64_t private = (shared_bit != 0) & ((gpa & shared_bit) == 0)
    return -private & PFERR_PRIVATE_ACCESS


cdef inline uint64_t vmx_ec(uint64_t q, uint64_t gpa, uint64_t shared_bit) noexcept nogil:
    """Models __vmx_handle_ept_violation (arch/x86/kvm/vmx/common.h, Linux 6.18).

    ``shared_bit`` is the TDX shared-GPA mask (kvm_gfn_direct_bits as a GPA),
    0 for every VM that is not a TD; a TD GPA with it clear is private.
    """
    return vmx_ec_access(q) | tdx_private_bit(gpa, shared_bit)


cdef inline uint64_t svm_ec(uint64_t exit_info_1, bint snp) noexcept nogil:
    """Models the error-code part of npf_interception (arch/x86/kvm/svm/svm.c, 6.18).

    KVM's synthetic bits (48, 49) are cleared from the hardware value; on an
    SNP VM an encrypted access (GUEST_ENC) is private.
    """
    cdef uint64_t ec = exit_info_1 & ~PFERR_SYNTHETIC_MASK
    return ec | (bit(ec, PFERR_GUEST_ENC) & (snp != 0)) * PFERR_PRIVATE_ACCESS


cdef void vmx_ec_loop(const uint64_t[::1] q, const uint64_t[::1] gpa,
                      const uint64_t[::1] shared_bit, uint64_t[::1] out, uint64_t q0,
                      uint64_t gpa0, uint64_t shared_bit0) noexcept nogil:
    """out[i] = vmx_ec(q[i], gpa[i], shared_bit[i]); an empty view stands for its scalar
    (``q0``, ``gpa0``, ``shared_bit0``).  The common shapes get loops of their own."""
    cdef Py_ssize_t i, n = out.shape[0]
    cdef uint64_t private_bit, access
    cdef unsigned int shift
    if shared_bit.shape[0]:
        # The rare per-element shared bit: every operand through vmx_ec.
        for i in range(n):
            out[i] = vmx_ec(q[i] if q.shape[0] else q0, gpa[i] if gpa.shape[0] else gpa0,
                            shared_bit[i])
    elif q.shape[0] and gpa.shape[0]:
        if shared_bit0 == 0:
            for i in range(n):
                out[i] = vmx_ec_access(q[i])
        elif shared_bit0 & (shared_bit0 - 1) == 0:
            # One shared bit (every real TD): its complement is the private bit.
            shift = 0
            while (shared_bit0 >> shift) != 1:
                shift += 1
            for i in range(n):
                out[i] = vmx_ec_access(q[i]) | (((~gpa[i] >> shift) & 1) * PFERR_PRIVATE_ACCESS)
        else:
            for i in range(n):
                out[i] = vmx_ec(q[i], gpa[i], shared_bit0)
    elif q.shape[0]:
        private_bit = tdx_private_bit(gpa0, shared_bit0)
        for i in range(n):
            out[i] = vmx_ec_access(q[i]) | private_bit
    elif gpa.shape[0]:
        access = vmx_ec_access(q0)
        for i in range(n):
            out[i] = access | tdx_private_bit(gpa[i], shared_bit0)
    else:
        access = vmx_ec(q0, gpa0, shared_bit0)     # every operand scalar: one code
        for i in range(n):
            out[i] = access


cdef void svm_ec_loop(const uint64_t[::1] exit_info_1, bint snp, uint64_t[::1] out,
                      uint64_t exit_info_1_0) noexcept nogil:
    """out[i] = svm_ec(exit_info_1[i], snp); an empty view stands for ``exit_info_1_0``."""
    cdef Py_ssize_t i, n = out.shape[0]
    cdef uint64_t code
    if exit_info_1.shape[0]:
        for i in range(n):
            out[i] = svm_ec(exit_info_1[i], snp)
    else:
        code = svm_ec(exit_info_1_0, snp)
        for i in range(n):
            out[i] = code


cdef const uint64_t[::1] _EMPTY = np.empty(0, dtype=np.uint64)


cdef inline const uint64_t[::1] _operand(value):
    """An operand as the loops take it: its array, or an empty view for a scalar."""
    return value if isinstance(value, np.ndarray) else _EMPTY


def vmx_error_code(exit_qualification, gpa, shared_bit=0, *, out=None):
    """vmx_error_code(exit_qualification, gpa, shared_bit=0, *, out=None)

    The error code KVM's VMX/TDX EPT-violation path hands to kvm_mmu_page_fault
    (__vmx_handle_ept_violation, arch/x86/kvm/vmx/common.h, Linux 6.18).

    ``shared_bit`` is the TDX shared-GPA bit as a GPA mask (``tdx_shared_bit``;
    0 for every other VM type): a GPA with it clear is private and gets
    PFERR.PRIVATE_ACCESS.  Ints give an int; 1-D uint64 arrays (scalars
    broadcast) give a uint64 array, written into ``out`` when given.
    """
    cdef Py_ssize_t n
    cdef uint64_t q1, g1, s1
    if (out is None and type(exit_qualification) is int and type(gpa) is int
            and type(shared_bit) is int):
        try:                            # three u64 ints: no checks beyond the conversion
            q1, g1, s1 = exit_qualification, gpa, shared_bit
        except OverflowError:
            pass                        # _args.operands says which one, as the twin does
        else:
            return vmx_ec(q1, g1, s1)
    n, (q, g, s), out = _args.operands(out, ("exit_qualification", exit_qualification),
                                       ("gpa", gpa), ("shared_bit", shared_bit))
    if n < 0:
        return vmx_ec(q, g, s)
    cdef const uint64_t[::1] qv = _operand(q)
    cdef const uint64_t[::1] gv = _operand(g)
    cdef const uint64_t[::1] sv = _operand(s)
    cdef uint64_t[::1] ov = out
    cdef uint64_t q0 = 0 if isinstance(q, np.ndarray) else q
    cdef uint64_t g0 = 0 if isinstance(g, np.ndarray) else g
    cdef uint64_t s0 = 0 if isinstance(s, np.ndarray) else s
    with nogil:
        vmx_ec_loop(qv, gv, sv, ov, q0, g0, s0)
    return out


def svm_error_code(exit_info_1, snp=False, *, out=None):
    """svm_error_code(exit_info_1, snp=False, *, out=None)

    The error code of KVM's #NPF intercept (npf_interception,
    arch/x86/kvm/svm/svm.c, Linux 6.18): the synthetic bits 48-49 are cleared
    from the hardware value; PFERR.PRIVATE_ACCESS is added iff ``snp`` and
    GUEST_ENC (bit 34) is set.  Ints give an int; a 1-D uint64 array gives a
    uint64 array, written into ``out`` when given.
    """
    cdef bint is_snp
    cdef Py_ssize_t n
    cdef uint64_t e1
    if out is None and type(exit_info_1) is int and type(snp) is bool:
        try:
            e1 = exit_info_1
        except OverflowError:
            pass
        else:
            return svm_ec(e1, snp is True)
    is_snp = _args.flag("snp", snp)
    n, (e,), out = _args.operands(out, ("exit_info_1", exit_info_1))
    if n < 0:
        return svm_ec(e, is_snp)
    cdef const uint64_t[::1] ev = _operand(e)
    cdef uint64_t[::1] ov = out
    cdef uint64_t e0 = 0 if isinstance(e, np.ndarray) else e
    with nogil:
        svm_ec_loop(ev, is_snp, ov, e0)
    return out


# --- exit handlers ------------------------------------------------------------------------

cdef int trace_kvm_page_fault(VCPUState vcpu, uint64_t gpa, uint64_t error_code) except -1:
    """Models the kvm_page_fault tracepoint (arch/x86/kvm/trace.h, 6.18): VMX passes the raw exit
    qualification (TDX: 0x2 for a private GPA), SVM the error code with PRIVATE_ACCESS
    synthesized."""
    if vcpu.mmu.tracing:
        vcpu.mmu.tracer.page_fault(vcpu.vcpu_id, vcpu.rip, gpa, error_code)
    return 0


cdef int handle_ept_violation(VCPUState vcpu, uint64_t gpa,
                              uint64_t exit_qualification) except CORE_RETURN_PY_EXCEPTION:
    """Models handle_ept_violation (arch/x86/kvm/vmx/vmx.c, 6.18) on a VMX VM; a TD goes to
    tdx_handle_ept_violation."""
    if vcpu.tdx:
        return tdx_handle_ept_violation(vcpu, gpa, exit_qualification)
    trace_kvm_page_fault(vcpu, gpa, exit_qualification)
    return page_fault(vcpu, gpa, vmx_ec(exit_qualification, gpa, 0))


cdef bint tdx_is_sept_violation_unexpected_pending(uint64_t ext_exit_qual,
                                                   uint64_t exit_qualification) noexcept nogil:
    """Models tdx_is_sept_violation_unexpected_pending (tdx.c, 6.18): the TDX module says
    the EPT violation hit a PENDING page (extended type 6), and the qualification has no
    permission bits (the entry is not present to the TD)."""
    return ((ext_exit_qual & TDX_EXT_EXIT_QUAL_TYPE_MASK)
            == TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION
            and not (exit_qualification & (EPT_VIOLATION_PROT_MASK
                                           | EPT_VIOLATION_EXEC_FOR_RING3_LIN)))


cdef int tdx_fault_qualification(VCPUState vcpu, uint64_t gpa, uint64_t ext_exit_qual,
                                 uint64_t* exit_qualification) noexcept nogil:
    """The checks of tdx_handle_ept_violation (tdx.c, 6.18), the twin tells the rules:
    1 for a private GPA (its qualification becomes a write; the fault retries inside
    KVM), 0 for a shared one, -EIO for a KVM bug (the VM dead for an unexpected
    PENDING violation)."""
    if not (gpa & (vcpu.direct_bits_gfn << PAGE_SHIFT)):
        if tdx_is_sept_violation_unexpected_pending(ext_exit_qual, exit_qualification[0]):
            vcpu.memslots.c[VM_COUNTER_VM_DEAD] = 1   # "Guest access before accepting": kvm_vm_dead
            return -EIO
        exit_qualification[0] = EPT_VIOLATION_ACC_WRITE
        return 1
    if exit_qualification[0] & EPT_VIOLATION_ACC_INSTR:
        return -EIO
    return 0


cdef int tdx_handle_ept_violation(VCPUState vcpu, uint64_t gpa,
                                  uint64_t exit_qualification) except CORE_RETURN_PY_EXCEPTION:
    """Models tdx_handle_ept_violation (arch/x86/kvm/vmx/tdx.c, 6.18): a private GPA is
    handled as a write, and its fault retries inside KVM; a fetch from shared memory is
    a KVM bug (-EIO)."""
    cdef int local_retry = tdx_fault_qualification(vcpu, gpa, vcpu.ext_exit_qual,
                                                   &exit_qualification)
    cdef int r = RET_PF_RETRY, i
    if local_retry < 0:
        return local_retry
    trace_kvm_page_fault(vcpu, gpa, exit_qualification)
    for i in range(<int>TDX_LOCAL_RETRY_LIMIT):
        r = page_fault(vcpu, gpa, vmx_ec(exit_qualification, gpa,
                                         vcpu.direct_bits_gfn << PAGE_SHIFT))
        if r != RET_PF_RETRY or not local_retry:
            break
    return r


cdef void vmx_flush_pml_buffer(VCPUState vcpu) noexcept:
    """Models vmx_flush_pml_buffer (vmx.c, 6.18), which __vmx_handle_exit runs on every
    VM exit with PML on: each logged GPA, newest first, marks its page dirty
    (kvm_vcpu_mark_page_dirty), and the log is empty again (index 511)."""
    cdef PmlLog* pml = &vcpu.pml
    cdef SlotTable table
    cdef int i, tail
    cdef uint64_t gfn
    if pml.index == <int>PML_LOG_NR_ENTRIES - 1:
        return
    tail = 0 if pml.index >= <int>PML_LOG_NR_ENTRIES else pml.index + 1
    table = vcpu.memslots.srcu_read_lock()
    for i in range(PML_LOG_NR_ENTRIES - 1, tail - 1, -1):
        gfn = pml.gpa[i] >> PAGE_SHIFT
        mark_page_dirty_in_slot(table.gfn_to_memslot(gfn), gfn)
    vcpu.memslots.srcu_read_unlock(table)
    pml.index = PML_LOG_NR_ENTRIES - 1


cdef int handle_ept_misconfig(VCPUState vcpu, uint64_t gpa) except CORE_RETURN_PY_EXCEPTION:
    """Models handle_ept_misconfig (arch/x86/kvm/vmx/vmx.c, 6.18): a reserved-bit fault,
    i.e. the MMIO path.  A TD never takes one (a KVM bug: -EIO)."""
    if vcpu.tdx:
        return -EIO
    return page_fault(vcpu, gpa, PFERR_RSVD)


cdef int npf_interception(VCPUState vcpu, uint64_t gpa,
                          uint64_t exit_info_1) except CORE_RETURN_PY_EXCEPTION:
    """Models npf_interception (arch/x86/kvm/svm/svm.c, 6.18): the fault, then, when it
    resumes the guest and the RMP check failed, sev_handle_rmp_fault."""
    cdef uint64_t error_code = svm_ec(exit_info_1, vcpu.snp)
    cdef int rc
    trace_kvm_page_fault(vcpu, gpa, error_code)
    rc = page_fault(vcpu, gpa, error_code)
    if rc > 0 and error_code & PFERR_GUEST_RMP:
        sev_handle_rmp_fault(vcpu, gpa, error_code)
    return rc


cdef int sev_handle_rmp_fault(VCPUState vcpu, uint64_t gpa, uint64_t error_code) except -1:
    """Models sev_handle_rmp_fault (svm/sev.c, 6.18); the twin tells the rules."""
    cdef uint64_t gfn = gpa >> PAGE_SHIFT, pfn
    cdef const SlotRecord* slot
    cdef uint64_t* frame
    if not vcpu.memslots.mem_is_private(gfn):
        return 0
    slot = vcpu.srcu.gfn_to_memslot(gfn)
    if slot == NULL or slot.gmem_id < 0:
        return 0
    pfn = gmem_frame(vcpu.memslots.gmem_base, vcpu.memslots.gmem_file_pages, slot.gmem_id,
                     slot.gmem_pgoff + (gfn - slot.base_gfn))
    frame = vcpu.memslots.frame_state_alloc(pfn)
    gmem_prepare(vcpu, frame, gfn)
    if frame == NULL or not (load_entry(frame) & FRAME_STATE_RMP_ASSIGNED):
        return 0
    if vcpu.mmu.tracing:
        vcpu.mmu.tracer.rmp_fault(vcpu.vcpu_id, gpa, pfn, error_code, PG_LEVEL_4K, 0)
    return 0
