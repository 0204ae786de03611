"""A confidential VM's launch and the guest's side of its memory: written once for both
cores.

Launch-time population (``kvm_gmem_populate``, virt/kvm/guest_memfd.c) with TDX's
``tdx_gmem_post_populate`` (KVM_TDX_INIT_MEM_REGION, vmx/tdx.c) and SNP's
``sev_gmem_post_populate`` (KVM_SEV_SNP_LAUNCH_UPDATE, svm/sev.c); the end of the launch
(``tdx_td_finalize``, ``snp_launch_finish``); and the two instructions a guest uses on
its private memory: PVALIDATE (AMD APM vol. 3) and TDG.MEM.PAGE.ACCEPT (Intel TDX Module
ABI).  Linux 6.18 throughout.

The state they change is the VM's counters (``LAUNCHED``, ``PRE_FAULT_ALLOWED``,
``GUEST_ACCEPTS``) and the guest_memfd frames' state words (``FrameState``: the folio's
uptodate flag, the SNP RMP entry, the TDX PENDING state), which the cores' fault path and
hardware walk read.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from .constants import (ACCESS_PROBE, FRAME_GPA_MASK, KVM_SEV_SNP_PAGE_TYPE_CPUID,
                        KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_SECRETS,
                        KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, KVM_SEV_SNP_PAGE_TYPE_ZERO,
                        PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_2M, PG_LEVEL_4K,
                        PVALIDATE_FAIL_INPUT, PVALIDATE_FAIL_NOUPDATE,
                        PVALIDATE_FAIL_SIZEMISMATCH, PVALIDATE_SUCCESS, AccessFlags,
                        FrameState, MemAttr, PFERR, TdxModuleStatus, VmCounter)
from .errors import KvmError
from .results import Translation

_PREPARED = FrameState.PREPARED.value
_ASSIGNED = FrameState.RMP_ASSIGNED.value
_VALIDATED = FrameState.RMP_VALIDATED.value
_PENDING = FrameState.TDX_PENDING.value
_PRIVATE = MemAttr.PRIVATE.value
_U64 = (1 << 64) - 1
#: The KVM_SEV_SNP_LAUNCH_UPDATE page types snp_launch_update accepts (0x2, VMSA, is
#: KVM's own).
SNP_PAGE_TYPES = (KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_ZERO,
                  KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, KVM_SEV_SNP_PAGE_TYPE_SECRETS,
                  KVM_SEV_SNP_PAGE_TYPE_CPUID)

#: post_populate(gfn, pfn): 0 or a negative errno.
PostPopulate = Callable[[int, Any], int]


def launched(memory: Any) -> bool:
    """TD_STATE_RUNNABLE / SNP launch finished (always true for other VMs)."""
    return bool(memory.counters[VmCounter.LAUNCHED])


def finish_launch(memory: Any, *, implicit: bool) -> None:
    """The launch ends: kvm->arch.pre_fault_allowed is set, a TD's later private faults
    add pages with TDH.MEM.PAGE.AUG.  ``implicit``: a program that never ended the
    launch ran the guest, and the modelled guest then accepts or validates each private
    page before its first touch, as a Linux guest does before it uses memory."""
    c = memory.counters
    c[VmCounter.LAUNCHED] = 1
    c[VmCounter.PRE_FAULT_ALLOWED] = 1
    c[VmCounter.GUEST_ACCEPTS] = int(implicit)


def gmem_populate(memory: Any, gfn: int, npages: int, post_populate: PostPopulate) -> int:
    """Models kvm_gmem_populate (guest_memfd.c, 6.18): EINVAL without a guest_memfd
    memslot at ``gfn``, EFAULT when its file was closed; then, page by page up to the
    memslot's end: EEXIST for a folio already up to date (prepared), EINVAL unless the
    attributes say PRIVATE, then ``post_populate``, and the folio is marked up to date
    when it succeeds.  Returns the pages done, or the error if none was."""
    slot = memory.find_slot(0, gfn)
    if slot is None or slot.gmem_id < 0:
        return -errno.EINVAL
    if slot.gmem_closed:
        return -errno.EFAULT
    npages = min(slot.end_gfn - gfn, npages)
    memslots = memory.memslots
    ret, i = 0, 0
    while i < npages:
        g = gfn + i
        pfn = memslots.gmem_get_pfn(slot, g)
        if memslots.frame(pfn) & _PREPARED:
            ret = -errno.EEXIST
            break
        if not memslots.range_has_memory_attributes(g, g + 1, _PRIVATE, _PRIVATE):
            ret = -errno.EINVAL
            break
        ret = post_populate(g, pfn)
        if ret:
            break
        memslots.set_frame(pfn, memslots.frame(pfn) | _PREPARED)   # kvm_gmem_mark_prepared
        i += 1
    return ret if ret and not i else i


# --- TDX ----------------------------------------------------------------------------------

def tdx_init_mem_region(memory: Any, state: Any, shared_bit: int, gpa: int, nr_pages: int,
                        flags: int) -> int:
    """Models tdx_vcpu_init_mem_region (vmx/tdx.c, 6.18) on ``state``'s vCPU (its mutex
    held): EINVAL after finalize, for flags other than MEASURE_MEMORY_REGION, an
    unaligned GPA, no pages, a wrapping range or one with the shared bit; then one page
    at a time kvm_gmem_populate with tdx_gmem_post_populate: kvm_tdp_map_page into the
    mirror root (a premap: the TD is not runnable, so no AUG), then TDH.MEM.PAGE.ADD,
    which leaves the page MAPPED (accepted).  Returns the pages left (0 when done) or
    raises KvmError with the errno, naming the page it stopped at (the kernel copies
    the advanced region back in both cases)."""
    if launched(memory):
        raise KvmError(errno.EINVAL, "KVM_TDX_INIT_MEM_REGION after KVM_TDX_FINALIZE_VM: "
                                     "the initial memory is fixed")
    if flags & ~1:
        raise KvmError(errno.EINVAL, f"KVM_TDX_INIT_MEM_REGION flags {flags:#x}: only "
                                     "KVM_TDX_MEASURE_MEMORY_REGION (1) exists")
    end = gpa + (nr_pages << PAGE_SHIFT)
    if (gpa & (PAGE_SIZE - 1) or not nr_pages or end <= gpa or end >> 64
            or gpa & shared_bit or (end - 1) & shared_bit):
        raise KvmError(errno.EINVAL, f"KVM_TDX_INIT_MEM_REGION gpa {gpa:#x} nr_pages "
                                     f"{nr_pages:#x}: not an aligned, non-empty range of "
                                     "private GPAs")

    def post_populate(gfn: int, pfn: int) -> int:
        r = state.map_page(gfn << PAGE_SHIFT, PFERR.GUEST_FINAL.value
                           | PFERR.PRIVATE_ACCESS.value)
        if r < 0:
            return int(r)
        # TDH.MEM.PAGE.ADD: the page is MAPPED, not PENDING.
        memory.memslots.set_frame(pfn, memory.memslots.frame(pfn) & ~_PENDING & _U64)
        return 0

    while nr_pages:
        r = gmem_populate(memory, gpa >> PAGE_SHIFT, 1, post_populate)
        if r != 1:
            err = -r if r < 0 else errno.EIO
            raise KvmError(err, f"KVM_TDX_INIT_MEM_REGION stopped at GPA {gpa:#x} with "
                                f"{nr_pages} pages left")
        gpa += PAGE_SIZE
        nr_pages -= 1
    return 0


def tdx_finalize_vm(memory: Any) -> None:
    """Models tdx_td_finalize (vmx/tdx.c, 6.18): EINVAL when already finalized (the
    nr_premapped check never fails in the model: INIT_MEM_REGION adds every page it
    premaps); then TD_STATE_RUNNABLE and pre_fault_allowed."""
    if launched(memory):
        raise KvmError(errno.EINVAL, "KVM_TDX_FINALIZE_VM: the TD is already runnable")
    finish_launch(memory, implicit=False)


# --- SEV-SNP ------------------------------------------------------------------------------

def snp_launch_update(memory: Any, gpa: int, length: int, page_type: int) -> int:
    """Models snp_launch_update (svm/sev.c, 6.18): EINVAL for an empty or unaligned
    length, an unknown page type, or no guest_memfd memslot at the first gfn; then
    kvm_gmem_populate with sev_gmem_post_populate: EEXIST for an RMP entry already
    assigned, rmp_make_private(pfn, gpa, 4K, asid, immutable=true) and the firmware's
    SNP_LAUNCH_UPDATE, which leaves the page validated and mutable (SEV-SNP firmware
    ABI); after LAUNCH_FINISH the firmware refuses (the guest is not in the launch state)
    and the page is reclaimed to shared.  A failure on the first page is EIO, as
    snp_launch_update reports every populate error; after progress it returns the bytes
    left, which the next call starts from."""
    if not length or length & (PAGE_SIZE - 1) or page_type not in SNP_PAGE_TYPES:
        raise KvmError(errno.EINVAL, f"KVM_SEV_SNP_LAUNCH_UPDATE len {length:#x} type "
                                     f"{page_type:#x}: not a page-aligned length and a "
                                     "known page type")
    slot = memory.find_slot(0, gpa >> PAGE_SHIFT)
    if slot is None or slot.gmem_id < 0:
        raise KvmError(errno.EINVAL, f"KVM_SEV_SNP_LAUNCH_UPDATE: no guest_memfd memslot at "
                                     f"GPA {gpa:#x}")
    finished = launched(memory)

    def post_populate(gfn: int, pfn: int) -> int:
        state = memory.memslots.frame(pfn)
        if state & _ASSIGNED:
            return -errno.EEXIST
        if finished:                    # firmware error, snp_page_reclaim: shared again
            return -errno.EIO
        # rmp_make_private(..., immutable=true), then the firmware: validated, mutable.
        memory.memslots.set_frame(pfn, (state & _PREPARED) | _ASSIGNED | _VALIDATED
                                  | ((gfn << PAGE_SHIFT) & FRAME_GPA_MASK))
        return 0

    count = gmem_populate(memory, gpa >> PAGE_SHIFT, length >> PAGE_SHIFT, post_populate)
    if count < 0:
        raise KvmError(errno.EIO, f"KVM_SEV_SNP_LAUNCH_UPDATE failed at GPA {gpa:#x} "
                                  f"({errno.errorcode.get(-count, -count)} from populate)")
    return length - (count << PAGE_SHIFT)


def snp_launch_finish(memory: Any) -> None:
    """Models snp_launch_finish (svm/sev.c, 6.18): the vCPUs' VMSAs become protected
    (the caller checks that none already is: EINVAL), and pre_fault_allowed."""
    finish_launch(memory, implicit=False)


# --- the guest's instructions ---------------------------------------------------------------

def pvalidate(memory: Any, access: Callable[[int, int], Any], gpa: int, page_size: int,
              validate: bool) -> Any:
    """PVALIDATE (AMD APM vol. 3, "PVALIDATE"; the guest's GVA is its GPA here): FAIL_INPUT
    for an address not aligned to the page size; the nested walk with the C-bit, whose
    RMP checks other than Validated apply (a #NPF that KVM handles, or leaves to
    userspace: that exit is returned); FAIL_SIZEMISMATCH for a 2M request on a 4K RMP
    entry; FAIL_NOUPDATE (255, what the kernel's pvalidate() returns for rFLAGS.CF)
    when Validated already has the requested value; else Validated is set or cleared
    and the result is 0."""
    span = PAGE_SIZE << (9 * (page_size - PG_LEVEL_4K))
    if gpa & (span - 1):
        return PVALIDATE_FAIL_INPUT
    result = access(gpa, AccessFlags.ENCRYPTED.value | ACCESS_PROBE)
    if not isinstance(result, Translation):
        return result
    pfn = result.hpa >> PAGE_SHIFT
    with memory.mmu_write_locked():                 # no GIL-free walk meanwhile
        state = memory.memslots.frame(pfn)
        if page_size == PG_LEVEL_2M and not state & FrameState.RMP_PAGESIZE_2M.value:
            return PVALIDATE_FAIL_SIZEMISMATCH
        if bool(state & _VALIDATED) == validate:
            return PVALIDATE_FAIL_NOUPDATE
        memory.memslots.set_frame(pfn, state | _VALIDATED if validate
                                  else state & ~_VALIDATED & _U64)
    return PVALIDATE_SUCCESS


def tdx_accept(memory: Any, access: Callable[[int, int], Any], shared_bit: int, gpa: int,
               level: int) -> Any:
    """TDG.MEM.PAGE.ACCEPT (Intel TDX Module ABI): OPERAND_INVALID for a shared GPA or one
    not aligned to the level; the page's Secure-EPT walk (a page not mapped is an EPT
    violation that KVM handles by adding it with TDH.MEM.PAGE.AUG, or leaves to
    userspace: that exit is returned); PAGE_SIZE_MISMATCH when it is mapped at a smaller
    level than asked (6.18 maps private memory at 4K only); PAGE_ALREADY_ACCEPTED when it
    is not PENDING; else it is accepted (SUCCESS)."""
    span = PAGE_SIZE << (9 * (level - PG_LEVEL_4K))
    if gpa & shared_bit or gpa & (span - 1):
        return TdxModuleStatus.OPERAND_INVALID
    result = access(gpa, AccessFlags.WRITE.value | ACCESS_PROBE)
    if not isinstance(result, Translation):
        return result
    if result.level < level:
        return TdxModuleStatus.PAGE_SIZE_MISMATCH
    pfn = result.hpa >> PAGE_SHIFT
    with memory.mmu_write_locked():                 # no GIL-free walk meanwhile
        state = memory.memslots.frame(pfn)
        if not state & _PENDING:
            return TdxModuleStatus.PAGE_ALREADY_ACCEPTED
        memory.memslots.set_frame(pfn, state & ~_PENDING & _U64)
    return TdxModuleStatus.SUCCESS

