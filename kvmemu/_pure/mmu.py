"""The MMU's fault path: from the error code to the TDP map.

The twin of ``_cy/mmu.pyx``.  Models, from Linux 6.18 (arch/x86/kvm/mmu/mmu.c and
mmu_internal.h unless named otherwise): ``kvm_mmu_page_fault``,
``handle_mmio_page_fault``, ``vcpu_cache_mmio_info`` (x86.h),
``kvm_mmu_do_page_fault`` with ``struct kvm_page_fault``, ``kvm_tdp_mmu_page_fault``,
``fast_page_fault`` and ``fast_pf_fix_direct_spte``, ``kvm_mmu_faultin_pfn`` and
its helpers, ``kvm_handle_noslot_fault``, ``is_page_fault_stale``,
``kvm_mmu_prepare_memory_fault_exit``, ``kvm_mmu_hugepage_adjust`` with
``kvm_mmu_max_mapping_level``, and ``disallowed_hugepage_adjust``.

The error code is the one carrier of the private/shared decision: the exit
handlers set PFERR_PRIVATE_ACCESS (TDX: shared bit clear; SNP: GUEST_ENC),
``page_fault`` sets it for SW_PROTECTED VMs from the attributes, and
``faultin_pfn`` compares it with the attributes, exiting to userspace with
KVM_EXIT_MEMORY_FAULT on a mismatch.  A conversion that lands between that
check and the map is caught by the invalidation sequence: ``faultin_pfn``
snapshots ``mmu_invalidate_seq`` and ``is_page_fault_stale`` compares it again
(``mmu_invalidate_retry_gfn``) before anything is mapped.
"""

from __future__ import annotations

import errno
import time
from typing import Any

from . import memslots, spte
from .cnames import *  # noqa: F403  (the constants under their C names)
from .locking import cmpxchg64
from .levels import gfn_to_index, pages_per_hpage


class FaultRecord:
    """struct kvm_page_fault: the facts of one fault, derived once (mmu_internal.h)."""

    __slots__ = ("addr", "error_code", "exec_", "write", "present", "rsvd", "user",
                 "prefetch", "is_private", "nx_huge_page_workaround_enabled", "max_level",
                 "req_level", "goal_level", "gfn", "slot", "mmu_seq", "pfn", "map_writable",
                 "huge_page_disallowed", "aug", "frame")
    addr: int
    error_code: int
    exec_: bool
    write: bool
    present: bool
    rsvd: bool
    user: bool
    prefetch: bool
    is_private: bool
    nx_huge_page_workaround_enabled: bool
    max_level: int
    req_level: int
    goal_level: int
    gfn: int
    slot: Any                      # a kvmemu._memory.Slot, or None
    mmu_seq: int
    pfn: int
    map_writable: bool
    huge_page_disallowed: bool
    aug: bool                      # a TD's private leaf goes in with TDH.MEM.PAGE.AUG
    frame: Any                     # the guest_memfd frame's state (Memslots.frame_state)


def init_fault(addr: int, error_code: int, gfn: int, slot: Any, nx: bool,
               prefetch: bool = False) -> FaultRecord:
    """Models the struct kvm_page_fault that kvm_mmu_do_page_fault fills
    (mmu_internal.h, 6.18)."""
    f = FaultRecord()
    f.addr = addr
    f.error_code = error_code
    f.exec_ = bool(error_code & PFERR_FETCH)
    f.write = bool(error_code & PFERR_WRITE)
    f.present = bool(error_code & PFERR_PRESENT)
    f.rsvd = bool(error_code & PFERR_RSVD)
    f.user = bool(error_code & PFERR_USER)
    f.prefetch = prefetch
    f.is_private = bool(error_code & PFERR_PRIVATE_ACCESS)
    f.nx_huge_page_workaround_enabled = nx
    f.max_level = KVM_MAX_HUGEPAGE_LEVEL
    f.req_level = PG_LEVEL_4K
    f.goal_level = PG_LEVEL_4K
    f.gfn = gfn
    f.slot = slot
    f.mmu_seq = 0
    f.pfn = 0
    f.map_writable = False
    f.huge_page_disallowed = False
    f.aug = False
    f.frame = None
    return f


def page_fault(vcpu: Any, gpa: int, error_code: int) -> int:
    """Models kvm_mmu_page_fault (mmu.c, 6.18): the SW_PROTECTED private bit, the MMIO
    path for a reserved-bit fault, the fault, and the statistics of its result."""
    error_code = sw_protected_private(vcpu, gpa, error_code)
    vcpu.stage("fault", None)
    r = RET_PF_INVALID
    if error_code & PFERR_RSVD:
        if error_code & PFERR_PRIVATE_ACCESS:
            return -errno.EFAULT
        r = handle_mmio_page_fault(vcpu, gpa)
        if r == RET_PF_EMULATE:
            return r
    if r == RET_PF_INVALID:
        vcpu.counters[PF_STAT_PF_TAKEN] += 1
        r = do_page_fault(vcpu, gpa, error_code)
    return count_result(vcpu, r)


def sw_protected_private(vcpu: Any, gpa: int, error_code: int) -> int:
    """The start of kvm_mmu_page_fault (mmu.c, 6.18): on a SW_PROTECTED VM, a fault that
    is not a reserved-bit fault is private when the attributes say so
    (PFERR_PRIVATE_ACCESS)."""
    if (vcpu.sw_protected and not error_code & PFERR_RSVD
            and vcpu.memslots.mem_is_private(gpa >> PAGE_SHIFT)):
        error_code |= PFERR_PRIVATE_ACCESS
    return error_code


def count_result(vcpu: Any, r: int) -> int:
    """The end of kvm_mmu_page_fault (mmu.c, 6.18): the vCPU's pf_fixed, pf_emulate and
    pf_spurious statistics count the handler's result."""
    if r == RET_PF_FIXED:
        vcpu.counters[PF_STAT_PF_FIXED] += 1
    elif r == RET_PF_EMULATE:
        vcpu.counters[PF_STAT_PF_EMULATE] += 1
    elif r == RET_PF_SPURIOUS:
        vcpu.counters[PF_STAT_PF_SPURIOUS] += 1
    return r


def handle_mmio_page_fault(vcpu: Any, gpa: int) -> int:
    """Models handle_mmio_page_fault (mmu.c, 6.18): the vCPU's MMIO cache, then the MMIO
    SPTE and its generation."""
    generation = int(vcpu.memslots.counters[VM_COUNTER_GENERATION_0])
    gfn = gpa >> PAGE_SHIFT
    if vcpu.mmio_gen == generation and vcpu.mmio_gfn and vcpu.mmio_gfn == gfn:
        return RET_PF_EMULATE
    mmu = vcpu.mmu
    mmu.mmu_lock.acquire_read()       # the kernel's lockless walk runs under RCU
    try:
        _, _, _, value = mmu.tdp_mmu_get_walk(mmu.direct, gfn & ~vcpu.direct_bits_gfn)
    finally:
        mmu.mmu_lock.release_read()
    if spte.is_mmio_spte(mmu.fmt, value):
        if spte.get_mmio_spte_generation(value) != generation & MMIO_SPTE_GEN_MASK:
            return RET_PF_INVALID
        vcpu_cache_mmio_info(vcpu, gfn)
        return RET_PF_EMULATE
    return RET_PF_RETRY


def vcpu_cache_mmio_info(vcpu: Any, gfn: int) -> None:
    """Models vcpu_cache_mmio_info (arch/x86/kvm/x86.h, 6.18; gva 0 for TDP)."""
    vcpu.mmio_gfn = gfn
    vcpu.mmio_gen = int(vcpu.memslots.counters[VM_COUNTER_GENERATION_0])


def do_page_fault(vcpu: Any, gpa: int, error_code: int, prefetch: bool = False,
                  level: list[int] | None = None) -> int:
    """Models kvm_mmu_do_page_fault (mmu_internal.h, 6.18): the fault record, then the TDP
    handler; KVM cannot emulate private memory, so EMULATE there is a memory fault.
    ``level[0]`` receives the level mapped (fault.goal_level)."""
    gfn = (gpa >> PAGE_SHIFT) & ~vcpu.direct_bits_gfn
    fault = init_fault(gpa, error_code, gfn, vcpu.srcu.gfn_to_memslot(gfn), vcpu.nx_huge_pages,
                       prefetch)
    r = tdp_mmu_page_fault(vcpu, fault)
    if r == RET_PF_EMULATE and fault.is_private:
        return prepare_memory_fault_exit(vcpu, fault)
    if level is not None:
        level[0] = fault.goal_level
    return r


def pre_fault_memory(vcpu: Any, gpa: int, size: int) -> int:
    """Models kvm_arch_vcpu_pre_fault_memory (mmu.c, 6.18): -EOPNOTSUPP until the VM allows
    pre-faulting (SNP after launch, TDX after finalize), -EINVAL for a TDX alias (shared
    bit set); the error code is GUEST_FINAL, plus PRIVATE_ACCESS when the attributes say
    private (else a TD's shared bit picks the direct root); then kvm_tdp_map_page.
    Returns the bytes done, up to the end of the page mapped (a huge page maps to its
    end), or a negative errno."""
    if not vcpu.pre_fault_allowed:
        return -errno.EOPNOTSUPP
    if (gpa >> PAGE_SHIFT) & vcpu.direct_bits_gfn:
        return -errno.EINVAL
    error_code = PFERR_GUEST_FINAL
    direct_bits = 0
    if vcpu.has_private_mem and vcpu.memslots.mem_is_private(gpa >> PAGE_SHIFT):
        error_code |= PFERR_PRIVATE_ACCESS
    else:
        direct_bits = vcpu.direct_bits_gfn << PAGE_SHIFT
    level = [PG_LEVEL_4K]
    r = tdp_map_page(vcpu, gpa | direct_bits, error_code, level)
    if r < 0:
        return r
    span = pages_per_hpage(level[0]) << PAGE_SHIFT
    return min(size, (gpa & ~(span - 1)) + span - gpa)


def tdp_map_page(vcpu: Any, gpa: int, error_code: int, level: list[int]) -> int:
    """Models kvm_tdp_map_page (mmu.c, 6.18): a prefetch fault, again while it says RETRY
    (another thread's invalidation; KVM loops until a signal, the model gives up after
    ACCESS_RETRY_LIMIT tries with RuntimeError); FIXED or SPURIOUS -> 0, EMULATE (no
    memslot: an MMIO SPTE if it can) -> -ENOENT, an errno as is."""
    for _ in range(ACCESS_RETRY_LIMIT):
        r = do_page_fault(vcpu, gpa, error_code, True, level)
        if r != RET_PF_RETRY:
            break
        time.sleep(0)
    else:
        raise RuntimeError(f"pre-fault of GPA {gpa:#x} kept retrying: an invalidation of it "
                           "is in progress")
    if r < 0:
        return r
    if r in (RET_PF_FIXED, RET_PF_SPURIOUS):
        return 0
    if r == RET_PF_EMULATE:
        return -errno.ENOENT
    return -errno.EIO


def prepare_memory_fault_exit(vcpu: Any, fault: FaultRecord) -> int:
    """Models kvm_mmu_prepare_memory_fault_exit (mmu.c, 6.18): KVM_EXIT_MEMORY_FAULT with
    the page and PRIVATE when the access was, and -EFAULT for KVM_RUN."""
    vcpu.exit_reason = EXIT_REASON_MEMORY_FAULT
    vcpu.mf_flags = MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
    vcpu.mf_gpa = fault.gfn << PAGE_SHIFT
    vcpu.mf_size = PAGE_SIZE
    return -errno.EFAULT


def tdp_mmu_page_fault(vcpu: Any, fault: FaultRecord) -> int:
    """Models kvm_tdp_mmu_page_fault (mmu.c, 6.18): fast path, faultin, the stale check,
    then the map under mmu_lock (which counts pf_mmio_spte_created with its EMULATE
    result: tdp_mmu_map_handle_target_level returns EMULATE exactly for an MMIO SPTE)."""
    r = fast_page_fault(vcpu, fault)
    if r != RET_PF_INVALID:
        return r
    r = faultin_pfn(vcpu, fault)
    if r != RET_PF_CONTINUE:
        return r
    if vcpu.stage("map", fault):                             # the memslot was deleted or moved
        return -errno.EAGAIN if fault.prefetch else RET_PF_RETRY
    mmu = vcpu.mmu
    mmu.mmu_lock.acquire_read()
    try:
        r = map_under_lock(vcpu, fault,
                           mmu.get_root_for_fault(fault.addr, vcpu.direct_bits_gfn << PAGE_SHIFT))
    finally:
        mmu.mmu_lock.release_read()
    if r == RET_PF_EMULATE:
        vcpu.counters[PF_STAT_PF_MMIO_SPTE_CREATED] += 1
    return r


def map_under_lock(vcpu: Any, fault: FaultRecord, root: Any) -> int:
    """The part of kvm_tdp_mmu_page_fault (mmu.c, 6.18) under mmu_lock for read: the stale
    check, then kvm_tdp_mmu_map into ``root``."""
    if is_page_fault_stale(vcpu, fault):
        return RET_PF_RETRY
    return int(vcpu.mmu.tdp_mmu_map(fault, root,
                                    int(vcpu.memslots.counters[VM_COUNTER_GENERATION_0])))


def is_page_fault_stale(vcpu: Any, fault: FaultRecord) -> bool:
    """Models is_page_fault_stale (mmu.c, 6.18) for the TDP MMU: an invalidation that
    covers the gfn started or finished since faultin's snapshot.  A fault without a
    memslot maps an MMIO SPTE, whose generation guards it instead.  (The TdpMmu's
    skip_stale_check debug switch turns it off, to show what it guards.)"""
    if vcpu.mmu.skip_stale_check:
        return False
    return fault.slot is not None and vcpu.memslots.mmu_invalidate_retry_gfn(fault.mmu_seq,
                                                                              fault.gfn)


def fast_page_fault(vcpu: Any, fault: FaultRecord) -> int:
    """Models page_fault_can_be_fast and fast_page_fault (mmu.c, 6.18): a write to a
    present leaf that the MMU may make writable (write-protected for dirty logging) is
    fixed locklessly, except a huge leaf of a dirty-logged slot, which the slow path
    splits; without A/D bits an access-tracked leaf (any fault on it is not-present)
    gets its R and X back and the accessed bit."""
    if not can_be_fast(vcpu, fault):
        return RET_PF_INVALID
    if vcpu.has_private_mem and fault.is_private != vcpu.memslots.mem_is_private(fault.gfn):
        return RET_PF_INVALID
    mmu = vcpu.mmu
    r = RET_PF_INVALID
    mmu.mmu_lock.acquire_read()       # the kernel's lockless walk runs under RCU
    try:
        for _ in range(4):            # fast_page_fault gives up after 4 lost races
            table, index, level, value = mmu.tdp_mmu_get_walk(mmu.direct, fault.gfn)
            if not (spte.is_shadow_present_pte(value) and spte.is_last_spte(value, level)):
                break
            if spte.is_access_allowed(mmu.fmt, fault.exec_, fault.write, value):
                r = RET_PF_SPURIOUS
                break
            new = value
            if not mmu.ad_enabled and spte.is_access_track_spte(mmu.fmt, value):
                new = spte.restore_acc_track_spte(mmu.fmt, new) | mmu.fmt.accessed
            if fault.write and value & mmu.fmt.mmu_writable:
                new |= PTE_WRITABLE
                if (level > PG_LEVEL_4K and fault.slot is not None
                        and fault.slot.flags & MEM_FLAG_LOG_DIRTY_PAGES):
                    break
            if new == value or not spte.is_access_allowed(mmu.fmt, fault.exec_, fault.write,
                                                          new):
                break
            if fast_pf_fix_direct_spte(fault, mmu.direct, table, index, value, new):
                r = RET_PF_FIXED
                break
    finally:
        mmu.mmu_lock.release_read()
    if r != RET_PF_INVALID:
        vcpu.counters[PF_STAT_PF_FAST] += 1
    return r


def can_be_fast(vcpu: Any, fault: FaultRecord) -> bool:
    """Models page_fault_can_be_fast (mmu.c, 6.18) for the TDP MMU, but for its check of
    the attributes (fast_page_fault makes it): not a reserved-bit fault, and a write to
    a present page, or, without A/D bits, an access to an access-tracked SPTE (the only
    not-present SPTEs the fast path fixes)."""
    if fault.rsvd:
        return False
    if not fault.present:
        return not vcpu.mmu.ad_enabled
    return fault.write


def fast_pf_fix_direct_spte(fault: FaultRecord, root: Any, table: int, index: int, old: int,
                            new: int) -> bool:
    """Models fast_pf_fix_direct_spte (mmu.c, 6.18): the lockless cmpxchg of the fast path
    (False if the SPTE changed meanwhile: a walk set A/D bits, or a fault replaced it);
    a write made possible again marks the page dirty (the D bit is left to the CPU)."""
    if not cmpxchg64(root.pt.mem, (table, index), old, new):
        return False
    if new & PTE_WRITABLE and not old & PTE_WRITABLE:
        memslots.mark_page_dirty_in_slot(fault.slot, fault.gfn)
    return True


def faultin_pfn(vcpu: Any, fault: FaultRecord) -> int:
    """Models kvm_mmu_faultin_pfn (mmu.c, 6.18): the invalidation snapshot, the
    private/shared check against the attributes, no memslot, then the frame from
    guest_memfd (private or gmem-only) or from the host mapping."""
    memslots = vcpu.memslots
    fault.mmu_seq = int(memslots.counters[VM_COUNTER_MMU_INVALIDATE_SEQ])
    if fault.is_private != memslots.mem_is_private(fault.gfn):
        return prepare_memory_fault_exit(vcpu, fault)
    slot = fault.slot
    if slot is None:
        return handle_noslot_fault(vcpu, fault)
    if vcpu.stage("faultin", fault):         # the memslot was deleted or moved
        return -errno.EAGAIN if fault.prefetch else RET_PF_RETRY
    return faultin_slot(vcpu, fault)


def faultin_slot(vcpu: Any, fault: FaultRecord) -> int:
    """The end of kvm_mmu_faultin_pfn (mmu.c, 6.18) for a fault with a memslot, the
    invalidation snapshot taken: the frame from guest_memfd (private or gmem-only; a
    memory fault without one) or from the host mapping (a write to a read-only memslot
    is emulated), between two stale checks."""
    memslots, slot = vcpu.memslots, fault.slot
    if memslots.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn):
        return RET_PF_RETRY
    if fault.is_private or slot.flags & KVM_MEMSLOT_GMEM_ONLY:
        if slot.gmem_id < 0 or slot.gmem_closed:   # no guest_memfd, or kvm_gmem_get_pfn's
            return prepare_memory_fault_exit(vcpu, fault)   # -EFAULT for a closed one
        faultin_gmem(vcpu, fault)
    elif slot.flags & MEM_FLAG_READONLY and fault.write:
        return RET_PF_EMULATE                # KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn
    else:
        faultin_host(memslots, fault)
    if memslots.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn):
        return RET_PF_RETRY
    return RET_PF_CONTINUE


def faultin_gmem(vcpu: Any, fault: FaultRecord) -> int:
    """The frame behind a fault's gfn in its memslot's guest_memfd (kvm_mmu_faultin_pfn_gmem
    -> kvm_gmem_get_pfn, prepared on first use), mapped at 4K: a TD's private page goes
    in with TDH.MEM.PAGE.AUG once the TD runs."""
    memslots = vcpu.memslots
    fault.pfn = memslots.gmem_get_pfn(fault.slot, fault.gfn)
    fault.frame = memslots.frame_state_alloc(fault.pfn)
    gmem_prepare(vcpu, fault.frame, fault.gfn)
    fault.aug = bool(vcpu.tdx and fault.is_private and memslots.counters[VM_COUNTER_LAUNCHED])
    fault.map_writable = not fault.slot.flags & MEM_FLAG_READONLY
    fault.max_level = PG_LEVEL_4K    # kvm_max_level_for_order(0): mainline order is 0
    return 0


def faultin_host(memslots: Any, fault: FaultRecord) -> None:
    """The frame behind a fault's gfn in the host mapping of its memslot (__kvm_faultin_pfn
    -> hva_to_pfn, as Memslots.hva_to_pfn computes it), writable unless the memslot is
    read-only."""
    fault.pfn = memslots.hva_to_pfn(fault.slot, fault.gfn)
    fault.map_writable = not fault.slot.flags & MEM_FLAG_READONLY


def gmem_prepare(vcpu: Any, frame: Any, gfn: int) -> None:
    """Models the preparation in __kvm_gmem_get_pfn (guest_memfd.c, 6.18): a folio not
    yet up to date is cleared and prepared (kvm_gmem_prepare_folio), which for SNP runs
    sev_gmem_prepare (svm/sev.c): an RMP entry not yet assigned becomes
    rmp_make_private(pfn, gfn_to_gpa(gfn), PG_LEVEL_4K, asid, immutable=false), and
    RMPUPDATE leaves it not validated (APM vol. 2, "RMPUPDATE")."""
    if frame is None:
        return

    def prepare(state: int) -> int:
        if state & FRAME_STATE_PREPARED:
            return state
        if vcpu.snp and not state & FRAME_STATE_RMP_ASSIGNED:
            return (FRAME_STATE_PREPARED | FRAME_STATE_RMP_ASSIGNED
                    | ((gfn << PAGE_SHIFT) & FRAME_GPA_MASK))
        return state | FRAME_STATE_PREPARED
    frame[0].update(frame[1], prepare)


def handle_noslot_fault(vcpu: Any, fault: FaultRecord) -> int:
    """Models kvm_handle_noslot_fault (mmu.c, 6.18): private -> memory fault; shared ->
    MMIO, cached, and an MMIO SPTE unless MMIO caching is off or the gfn is beyond
    kvm_mmu_max_gfn()."""
    if fault.is_private:
        return prepare_memory_fault_exit(vcpu, fault)
    vcpu_cache_mmio_info(vcpu, fault.gfn)
    if not vcpu.mmu.fmt.mmio_caching:
        return RET_PF_EMULATE                # no MMIO SPTEs on this host
    if fault.gfn > vcpu.max_gfn:
        return RET_PF_EMULATE                # cannot encode an MMIO SPTE
    return RET_PF_CONTINUE


def max_mapping_level(slot: Any, gfn: int, max_level: int) -> int:
    """Models kvm_mmu_max_mapping_level for shared memory (mmu.c, 6.18): the largest level
    up to ``max_level`` (and max_huge_page_level, 1G) that lpage_info allows, capped by
    the host mapping (host_pfn_mapping_level: the slot's host level)."""
    level = min(max_level, PG_LEVEL_1G)
    while level > PG_LEVEL_4K and slot.lpage[level - PG_LEVEL_2M][
            gfn_to_index(gfn, slot.base_gfn, level)]:
        level -= 1
    if level == PG_LEVEL_4K:
        return level
    return min(slot.host_level, level)


def hugepage_adjust(fault: FaultRecord, nx_huge_pages: bool) -> None:
    """Models kvm_mmu_hugepage_adjust (mmu.c, 6.18): no huge page while dirty logging is
    on, else the level kvm_mmu_max_mapping_level allows; the NX huge page workaround keeps
    fetches at 4K.  (Private and gmem-only faults reach here with max_level 4K: mainline
    guest_memfd reports order 0.)"""
    fault.huge_page_disallowed = fault.exec_ and nx_huge_pages
    slot = fault.slot
    if fault.max_level == PG_LEVEL_4K or slot is None:
        return
    if slot.flags & MEM_FLAG_LOG_DIRTY_PAGES:
        return
    level = max_mapping_level(slot, fault.gfn, fault.max_level)
    fault.req_level = level
    if level == PG_LEVEL_4K or fault.huge_page_disallowed:
        return
    fault.goal_level = level
    mask = pages_per_hpage(level) - 1
    assert fault.gfn & mask == fault.pfn & mask, "gfn and pfn not congruent"
    fault.pfn &= ~mask


def disallowed_hugepage_adjust(fault: FaultRecord, root: Any, value: int, level: int) -> None:
    """Models disallowed_hugepage_adjust (mmu.c, 6.18): a table the NX workaround split
    stays split, so the fault maps one level lower, with the pfn of its part."""
    if (level > PG_LEVEL_4K and level == fault.goal_level and spte.is_shadow_present_pte(value)
            and not value & PTE_LARGE
            and root.nx_huge_page_disallowed(root.child(value))):
        fault.pfn |= fault.gfn & (pages_per_hpage(level) - pages_per_hpage(level - 1))
        fault.goal_level -= 1
