# The MMU's fault path: from the error code to the TDP map.
#
# The compiled twin of kvmemu/_pure/mmu.py, which names the Linux 6.18 functions
# each step follows (arch/x86/kvm/mmu/mmu.c, mmu_internal.h) and tells how the
# error code carries the private/shared decision and how the invalidation
# sequence catches a conversion racing with a fault.  One fault is a C struct
# (FaultRecord) holding a copy of its memslot's record; handlers return a RET_PF
# value or a negative errno, and CORE_RETURN_PY_EXCEPTION (neither) when a stage
# hook or a trace sink raised.

from libc.errno cimport EAGAIN, EFAULT, EINVAL, EIO, ENOENT, EOPNOTSUPP
from libc.stdint cimport uint32_t, uint64_t


cdef inline void init_fault(FaultRecord* f, uint64_t addr, uint64_t error_code, uint64_t gfn,
                            const SlotRecord* slot, bint nx, bint prefetch) noexcept nogil:
    """Models the struct kvm_page_fault that kvm_mmu_do_page_fault fills
    (mmu_internal.h, 6.18)."""
    f.addr = addr
    f.error_code = error_code
    f.exec_ = (error_code & PFERR_FETCH) != 0
    f.write = (error_code & PFERR_WRITE) != 0
    f.present = (error_code & PFERR_PRESENT) != 0
    f.rsvd = (error_code & PFERR_RSVD) != 0
    f.user = (error_code & PFERR_USER) != 0
    f.prefetch = prefetch
    f.is_private = (error_code & PFERR_PRIVATE_ACCESS) != 0
    f.nx_huge_page_workaround_enabled = nx
    f.max_level = KVM_MAX_HUGEPAGE_LEVEL
    f.req_level = PG_LEVEL_4K
    f.goal_level = PG_LEVEL_4K
    f.gfn = gfn
    f.has_slot = slot != NULL
    if slot != NULL:
        f.slot = slot[0]
    f.mmu_seq = 0
    f.pfn = 0
    f.map_writable = False
    f.huge_page_disallowed = False
    f.aug = False
    f.frame = NULL


cdef int page_fault(VCPUState vcpu, uint64_t gpa,
                    uint64_t error_code) except CORE_RETURN_PY_EXCEPTION:
    """Models kvm_mmu_page_fault (mmu.c, 6.18)."""
    cdef int r
    error_code = sw_protected_private(vcpu, gpa, error_code)
    if vcpu.hook is not None:     # (checked here: no call at all without a hook)
        vcpu.stage("fault", NULL)
    r = RET_PF_INVALID
    if error_code & PFERR_RSVD:
        if error_code & PFERR_PRIVATE_ACCESS:
            return -EFAULT
        r = handle_mmio_page_fault(vcpu, gpa)
        if r == RET_PF_EMULATE:
            return r
    if r == RET_PF_INVALID:
        vcpu.counters[PF_STAT_PF_TAKEN] += 1
        r = do_page_fault(vcpu, gpa, error_code, False, NULL)
    return count_result(vcpu, r)


cdef inline uint64_t sw_protected_private(VCPUState vcpu, uint64_t gpa,
                                          uint64_t error_code) noexcept nogil:
    """The start of kvm_mmu_page_fault (mmu.c, 6.18): on a SW_PROTECTED VM, a fault that
    is not a reserved-bit fault is private when the attributes say so
    (PFERR_PRIVATE_ACCESS)."""
    if (vcpu.sw_protected and not (error_code & PFERR_RSVD)
            and vcpu.memslots.mem_is_private(gpa >> PAGE_SHIFT)):
        error_code |= PFERR_PRIVATE_ACCESS
    return error_code


cdef inline int count_result(VCPUState vcpu, int r) noexcept nogil:
    """The end of kvm_mmu_page_fault (mmu.c, 6.18): the vCPU's pf_fixed, pf_emulate and
    pf_spurious statistics count the handler's result (written once: other threads read
    them while the GIL-free loop runs)."""
    if r == RET_PF_FIXED:
        once_add(&vcpu.counters[PF_STAT_PF_FIXED], 1)
    elif r == RET_PF_EMULATE:
        once_add(&vcpu.counters[PF_STAT_PF_EMULATE], 1)
    elif r == RET_PF_SPURIOUS:
        once_add(&vcpu.counters[PF_STAT_PF_SPURIOUS], 1)
    return r


# Inline, as the rest of the fault path it calls (tdp_mmu.pxd says why).
cdef inline int fault_without_gil(VCPUState vcpu, SlotTable table, long seen, const Outcome* exit_,
                                  uint64_t gpa,
                                  const SlotRecord** last) except CORE_RETURN_PY_EXCEPTION nogil:
    """An exit of access_many's GIL-free loop, handled in that loop when nothing in its
    handling needs Python; FAULT_ELSEWHERE (nothing changed) sends it to handle_exit.

    The loop holds mmu_lock for read and ``table``, the memslots current when its
    kvm->srcu read-side section began (``seen``: Memslots.publishes then).  Handled
    here: an EPT violation of a VMX VM or a #NPF of an SVM VM, with no stage hook, trace
    sink or unflushed PML entry, on a gfn of a memslot, that is not a fast_page_fault
    candidate, not an RMP violation (sev_handle_rmp_fault follows those), not a TD's
    fetch from shared memory or access to a PENDING page, and does not leave for
    userspace (an MMIO or reserved-bit fault, a write to a read-only memslot, a memory
    fault).  Then the steps are those of handle_exit: handle_ept_violation /
    tdx_handle_ept_violation (a TD's private GPA: a write, mapped in the mirror root,
    AUG'd on a runnable TD) / npf_interception (SNP: private from GUEST_ENC),
    kvm_mmu_page_fault (SW_PROTECTED: private from the attributes),
    kvm_mmu_do_page_fault, kvm_mmu_faultin_pfn (guest_memfd, prepared on first use, for
    SNP with its RMP entry assigned; or the host mapping), and
    the stale check and the map of kvm_tdp_mmu_page_fault, with mmu_lock held
    throughout: one of the orders KVM allows, in which no invalidation runs between
    the snapshot and the map, and no attribute changes (the store changes under
    mmu_lock for write).  A memslot change published since ``seen`` sends the exit to
    handle_exit, which reads the new memslots.  ``last`` is the vCPU's last_used_slot
    for the loop's ``table`` (kvm_vcpu_gfn_to_memslot tries it before the search; NULL
    at first)."""
    cdef uint64_t error_code, q, shared_bit = vcpu.direct_bits_gfn << PAGE_SHIFT
    cdef uint64_t gfn = (gpa >> PAGE_SHIFT) & ~vcpu.direct_bits_gfn   # kvm_mmu_do_page_fault
    cdef const SlotRecord* slot
    cdef FaultRecord f
    cdef int r
    if (atomic_load(&vcpu.hooked) or vcpu.mmu.tracing
            or (vcpu.pml_on and vcpu.pml.index != <int>PML_LOG_NR_ENTRIES - 1)
            or atomic_load(&vcpu.memslots.publishes) != seen):
        return FAULT_ELSEWHERE
    if exit_.kind == OUT_EPT_VIOLATION and not vcpu.tdx:
        error_code = vmx_ec(exit_.value, gpa, 0)
    elif exit_.kind == OUT_EPT_VIOLATION:
        # A TD's: its exits here carry no extended qualification (one on a PENDING page
        # is OUT_TDX_PENDING, for the exit handler), so -EIO is a fetch from shared
        # memory, which the exit handler fails.
        q = exit_.value
        if tdx_fault_qualification(vcpu, gpa, 0, &q) < 0:
            return FAULT_ELSEWHERE
        error_code = vmx_ec(q, gpa, shared_bit)
    elif exit_.kind == OUT_NPF:
        error_code = svm_ec(exit_.value, vcpu.snp)
    else:
        return FAULT_ELSEWHERE
    if error_code & (PFERR_RSVD | PFERR_GUEST_RMP):
        return FAULT_ELSEWHERE
    error_code = sw_protected_private(vcpu, gpa, error_code)
    slot = last[0]
    if slot == NULL or not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
        slot = table.gfn_to_memslot(gfn)
        if slot != NULL:
            last[0] = slot
    if slot == NULL:
        return FAULT_ELSEWHERE
    init_fault(&f, gpa, error_code, gfn, slot, vcpu.nx_huge_pages, False)
    # What would leave for userspace (a memory fault, an MMIO exit: faultin_pfn and
    # faultin_slot return those) goes to the exit handler before anything is counted;
    # so does the fast path.
    if (can_be_fast(vcpu, &f) or (f.write and f.slot.flags & MEM_FLAG_READONLY)
            or f.is_private != vcpu.memslots.mem_is_private(gfn)
            or ((f.is_private or f.slot.flags & KVM_MEMSLOT_GMEM_ONLY) and f.slot.gmem_id < 0)):
        return FAULT_ELSEWHERE
    if vcpu.ext_exit_qual:          # as vcpu_run clears it (0 but after a TD's exit)
        vcpu.ext_exit_qual = 0
    once_add(&vcpu.counters[PF_STAT_PF_TAKEN], 1)
    f.mmu_seq = vcpu.memslots.c[VM_COUNTER_MMU_INVALIDATE_SEQ]
    r = faultin_slot(vcpu, &f)
    if r != RET_PF_CONTINUE:
        return r                    # RET_PF_RETRY (a TD's local retries: vcpu_run's exit)
    if vcpu.tdx and not (gpa & shared_bit):      # tdp_mmu_get_root_for_fault
        r = map_under_lock(vcpu, &f, vcpu.mmu.mirror)
    else:
        r = map_under_lock(vcpu, &f, vcpu.mmu.direct)
    return count_result(vcpu, r)


cdef int handle_mmio_page_fault(VCPUState vcpu, uint64_t gpa) noexcept:
    """Models handle_mmio_page_fault (mmu.c, 6.18): the vCPU's MMIO cache, then the MMIO
    SPTE and its generation."""
    cdef uint64_t generation = vcpu.memslots.c[VM_COUNTER_GENERATION_0]
    cdef uint64_t gfn = gpa >> PAGE_SHIFT
    cdef TdpMmu mmu = vcpu.mmu
    cdef LastSpte last
    if vcpu.mmio_gen == generation and vcpu.mmio_gfn and vcpu.mmio_gfn == gfn:
        return RET_PF_EMULATE
    mmu.mmu_lock.acquire_read()       # the kernel's lockless walk runs under RCU
    last = mmu.tdp_mmu_get_walk(mmu.direct, gfn & ~vcpu.direct_bits_gfn)
    mmu.mmu_lock.release_read()
    if is_mmio_spte(&mmu.fmt, last.spte):
        if get_mmio_spte_generation(last.spte) != generation & MMIO_SPTE_GEN_MASK:
            return RET_PF_INVALID
        vcpu_cache_mmio_info(vcpu, gfn)
        return RET_PF_EMULATE
    return RET_PF_RETRY


cdef void vcpu_cache_mmio_info(VCPUState vcpu, uint64_t gfn) noexcept:
    """Models vcpu_cache_mmio_info (arch/x86/kvm/x86.h, 6.18; gva 0 for TDP)."""
    vcpu.mmio_gfn = gfn
    vcpu.mmio_gen = vcpu.memslots.c[VM_COUNTER_GENERATION_0]


cdef int do_page_fault(VCPUState vcpu, uint64_t gpa, uint64_t error_code, bint prefetch,
                       int* level) except CORE_RETURN_PY_EXCEPTION:
    """Models kvm_mmu_do_page_fault (mmu_internal.h, 6.18): the fault record, then the TDP
    handler; KVM cannot emulate private memory, so EMULATE there is a memory fault.
    ``level`` (if not NULL) receives the level mapped."""
    cdef uint64_t gfn = (gpa >> PAGE_SHIFT) & ~vcpu.direct_bits_gfn
    cdef FaultRecord f
    cdef int r
    init_fault(&f, gpa, error_code, gfn, vcpu.srcu.gfn_to_memslot(gfn), vcpu.nx_huge_pages,
               prefetch)
    r = tdp_mmu_page_fault(vcpu, &f)
    if r == RET_PF_EMULATE and f.is_private:
        return prepare_memory_fault_exit(vcpu, &f)
    if level != NULL:
        level[0] = f.goal_level
    return r


cdef int pre_fault_memory(VCPUState vcpu, uint64_t gpa,
                          uint64_t size) except CORE_RETURN_PY_EXCEPTION:
    """Models kvm_arch_vcpu_pre_fault_memory (mmu.c, 6.18); the twin tells the rules.
    Returns the bytes done or a negative errno (as int: a step is at most 1 GiB)."""
    cdef uint64_t error_code = PFERR_GUEST_FINAL, direct_bits = 0, span
    cdef int level = PG_LEVEL_4K, r
    if not vcpu.memslots.c[VM_COUNTER_PRE_FAULT_ALLOWED]:
        return -EOPNOTSUPP
    if (gpa >> PAGE_SHIFT) & vcpu.direct_bits_gfn:
        return -EINVAL
    if vcpu.has_private_mem and vcpu.memslots.mem_is_private(gpa >> PAGE_SHIFT):
        error_code |= PFERR_PRIVATE_ACCESS
    else:
        direct_bits = vcpu.direct_bits_gfn << PAGE_SHIFT
    r = tdp_map_page(vcpu, gpa | direct_bits, error_code, &level)
    if r < 0:
        return r
    span = pages_per_hpage(level) << PAGE_SHIFT
    return <int>min(size, (gpa & ~(span - 1)) + span - gpa)


cdef int tdp_map_page(VCPUState vcpu, uint64_t gpa, uint64_t error_code,
                      int* level) except CORE_RETURN_PY_EXCEPTION:
    """Models kvm_tdp_map_page (mmu.c, 6.18): prefetch faults while they say RETRY (the
    model gives up with RuntimeError after ACCESS_RETRY_LIMIT), then FIXED or SPURIOUS
    -> 0, EMULATE -> -ENOENT, an errno as is, anything else -EIO."""
    cdef int r = RET_PF_RETRY
    cdef uint64_t tries
    for tries in range(ACCESS_RETRY_LIMIT):
        r = do_page_fault(vcpu, gpa, error_code, True, level)
        if r != RET_PF_RETRY:
            break
        with nogil:
            sched_yield()
    if r == RET_PF_RETRY:
        raise RuntimeError(f"pre-fault of GPA {gpa:#x} kept retrying: an invalidation of it "
                           "is in progress")
    if r < 0:
        return r
    if r == RET_PF_FIXED or r == RET_PF_SPURIOUS:
        return 0
    if r == RET_PF_EMULATE:
        return -ENOENT
    return -EIO


cdef int prepare_memory_fault_exit(VCPUState vcpu, const FaultRecord* f) noexcept nogil:
    """Models kvm_mmu_prepare_memory_fault_exit (mmu.c, 6.18): KVM_EXIT_MEMORY_FAULT with
    the page and PRIVATE when the access was, and -EFAULT for KVM_RUN."""
    vcpu.exit_reason = EXIT_REASON_MEMORY_FAULT
    vcpu.mf_flags = MEMORY_EXIT_FLAG_PRIVATE if f.is_private else 0
    vcpu.mf_gpa = f.gfn << PAGE_SHIFT
    vcpu.mf_size = PAGE_SIZE
    return -EFAULT


cdef int tdp_mmu_page_fault(VCPUState vcpu, FaultRecord* f) except CORE_RETURN_PY_EXCEPTION:
    """Models kvm_tdp_mmu_page_fault (mmu.c, 6.18): fast path, faultin, the stale check,
    then the map under mmu_lock (which counts pf_mmio_spte_created with its EMULATE
    result: tdp_mmu_map_handle_target_level returns EMULATE exactly for an MMIO SPTE)."""
    cdef TdpMmu mmu = vcpu.mmu
    cdef int r = fast_page_fault(vcpu, f)
    if r != RET_PF_INVALID:
        return r
    r = faultin_pfn(vcpu, f)
    if r != RET_PF_CONTINUE:
        return r
    if vcpu.hook is not None and vcpu.stage("map", f):   # the memslot was deleted or moved
        return -EAGAIN if f.prefetch else RET_PF_RETRY
    mmu.mmu_lock.acquire_read()
    try:
        r = map_under_lock(vcpu, f, mmu.get_root_for_fault(f.addr,
                                                           vcpu.direct_bits_gfn << PAGE_SHIFT))
    finally:
        mmu.mmu_lock.release_read()
    if r == RET_PF_EMULATE:
        vcpu.counters[PF_STAT_PF_MMIO_SPTE_CREATED] += 1
    return r


cdef inline int map_under_lock(VCPUState vcpu, FaultRecord* f,
                               Root root) except CORE_RETURN_PY_EXCEPTION nogil:
    """The part of kvm_tdp_mmu_page_fault (mmu.c, 6.18) under mmu_lock for read: the stale
    check, then kvm_tdp_mmu_map into ``root``."""
    if is_page_fault_stale(vcpu, f):
        return RET_PF_RETRY
    return vcpu.mmu.tdp_mmu_map(f, root, vcpu.memslots.c[VM_COUNTER_GENERATION_0])


cdef bint is_page_fault_stale(VCPUState vcpu, const FaultRecord* f) noexcept nogil:
    """Models is_page_fault_stale (mmu.c, 6.18) for the TDP MMU: an invalidation that
    covers the gfn started or finished since faultin's snapshot.  (The TdpMmu's
    skip_stale_check debug switch turns it off, to show what it guards.)"""
    if vcpu.mmu.skip_stale_check:
        return False
    return f.has_slot and vcpu.memslots.mmu_invalidate_retry_gfn(f.mmu_seq, f.gfn)


cdef int fast_page_fault(VCPUState vcpu, FaultRecord* f) noexcept:
    """Models page_fault_can_be_fast and fast_page_fault (mmu.c, 6.18): a write to a
    present leaf that the MMU may make writable is fixed locklessly, except a huge leaf of
    a dirty-logged slot, which the slow path splits."""
    cdef TdpMmu mmu = vcpu.mmu
    cdef LastSpte last
    cdef uint64_t new
    cdef int r = RET_PF_INVALID
    if not can_be_fast(vcpu, f):
        return RET_PF_INVALID
    if vcpu.has_private_mem and f.is_private != vcpu.memslots.mem_is_private(f.gfn):
        return RET_PF_INVALID
    mmu.mmu_lock.acquire_read()       # the kernel's lockless walk runs under RCU
    for attempt in range(4):          # fast_page_fault gives up after 4 lost races
        last = mmu.tdp_mmu_get_walk(mmu.direct, f.gfn)
        if not (is_shadow_present_pte(last.spte) and is_last_spte(last.spte, last.level)):
            break
        if is_access_allowed(&mmu.fmt, f.exec_, f.write, last.spte):
            r = RET_PF_SPURIOUS
            break
        new = last.spte
        if not mmu.ad_enabled and is_access_track_spte(&mmu.fmt, last.spte):
            new = restore_acc_track_spte(&mmu.fmt, new) | mmu.fmt.accessed
        if f.write and last.spte & mmu.fmt.mmu_writable:
            new |= PTE_WRITABLE
            if (last.level > <int>PG_LEVEL_4K and f.has_slot
                    and f.slot.flags & MEM_FLAG_LOG_DIRTY_PAGES):
                break
        if new == last.spte or not is_access_allowed(&mmu.fmt, f.exec_, f.write, new):
            break
        if fast_pf_fix_direct_spte(f, mmu.direct, last.table, last.index, last.spte, new):
            r = RET_PF_FIXED
            break
    mmu.mmu_lock.release_read()
    if r != RET_PF_INVALID:
        vcpu.counters[PF_STAT_PF_FAST] += 1
    return r


cdef bint can_be_fast(VCPUState vcpu, const FaultRecord* f) noexcept nogil:
    """Models page_fault_can_be_fast (mmu.c, 6.18) for the TDP MMU, but for its check of
    the attributes (fast_page_fault makes it): not a reserved-bit fault, and a write to
    a present page, or, without A/D bits, an access to an access-tracked SPTE (the only
    not-present SPTEs the fast path fixes)."""
    if f.rsvd:
        return False
    if not f.present:
        return not vcpu.mmu.ad_enabled
    return f.write


cdef bint fast_pf_fix_direct_spte(FaultRecord* f, Root root, Py_ssize_t table,
                                  Py_ssize_t index, uint64_t old, uint64_t new) noexcept:
    """Models fast_pf_fix_direct_spte (mmu.c, 6.18): the lockless cmpxchg of the fast path
    (False if the SPTE changed meanwhile); a write made possible again marks the page
    dirty (the D bit is left to the CPU)."""
    if not cmpxchg64(&root.pt.mem[table * PT_ENTRIES + index], old, new):
        return False
    if (new & PTE_WRITABLE) and not (old & PTE_WRITABLE) and f.has_slot:
        mark_page_dirty_in_slot(&f.slot, f.gfn)
    return True


cdef int faultin_pfn(VCPUState vcpu, FaultRecord* f) except CORE_RETURN_PY_EXCEPTION:
    """Models kvm_mmu_faultin_pfn (mmu.c, 6.18): the invalidation snapshot, the
    private/shared check against the attributes, no memslot, then the frame from
    guest_memfd (private or gmem-only) or from the host mapping."""
    cdef Memslots memslots = vcpu.memslots
    f.mmu_seq = memslots.c[VM_COUNTER_MMU_INVALIDATE_SEQ]
    if f.is_private != memslots.mem_is_private(f.gfn):
        return prepare_memory_fault_exit(vcpu, f)
    if not f.has_slot:
        return handle_noslot_fault(vcpu, f)
    if vcpu.hook is not None and vcpu.stage("faultin", f):   # deleted or moved memslot
        return -EAGAIN if f.prefetch else RET_PF_RETRY
    return faultin_slot(vcpu, f)


cdef inline int faultin_slot(VCPUState vcpu, FaultRecord* f) except CORE_RETURN_PY_EXCEPTION nogil:
    """The end of kvm_mmu_faultin_pfn (mmu.c, 6.18) for a fault with a memslot, the
    invalidation snapshot taken: the frame from guest_memfd (private or gmem-only; a
    memory fault without one) or from the host mapping (a write to a read-only memslot
    is emulated), between two stale checks."""
    if vcpu.memslots.mmu_invalidate_retry_gfn(f.mmu_seq, f.gfn):
        return RET_PF_RETRY
    if f.is_private or f.slot.flags & KVM_MEMSLOT_GMEM_ONLY:
        if f.slot.gmem_id < 0:
            return prepare_memory_fault_exit(vcpu, f)
        faultin_gmem(vcpu, f)
    elif f.slot.flags & MEM_FLAG_READONLY and f.write:
        return RET_PF_EMULATE       # KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn
    else:
        faultin_host(vcpu.memslots, f)
    if vcpu.memslots.mmu_invalidate_retry_gfn(f.mmu_seq, f.gfn):
        return RET_PF_RETRY
    return RET_PF_CONTINUE


cdef int faultin_gmem(VCPUState vcpu, FaultRecord* f) except -1 nogil:
    """The frame behind a fault's gfn in its memslot's guest_memfd (kvm_mmu_faultin_pfn_gmem
    -> kvm_gmem_get_pfn, prepared on first use), mapped at 4K: a TD's private page goes
    in with TDH.MEM.PAGE.AUG once the TD runs."""
    f.pfn = gmem_frame(vcpu.memslots.gmem_base, vcpu.memslots.gmem_file_pages, f.slot.gmem_id,
                       f.slot.gmem_pgoff + (f.gfn - f.slot.base_gfn))
    f.frame = vcpu.memslots.frame_state_alloc(f.pfn)
    gmem_prepare(vcpu, f.frame, f.gfn)
    f.aug = vcpu.tdx and f.is_private and vcpu.memslots.c[VM_COUNTER_LAUNCHED] != 0
    f.map_writable = not (f.slot.flags & MEM_FLAG_READONLY)
    f.max_level = PG_LEVEL_4K   # kvm_max_level_for_order(0): mainline order is 0
    return 0


cdef void faultin_host(Memslots memslots, FaultRecord* f) noexcept nogil:
    """The frame behind a fault's gfn in the host mapping of its memslot (__kvm_faultin_pfn
    -> hva_to_pfn, as Memslots.hva_to_pfn computes it), writable unless the memslot is
    read-only."""
    f.pfn = (((f.slot.userspace_addr >> PAGE_SHIFT) + (f.gfn - f.slot.base_gfn))
             & memslots.pfn_mask)
    f.map_writable = not (f.slot.flags & MEM_FLAG_READONLY)


cdef void gmem_prepare(VCPUState vcpu, uint64_t* frame, uint64_t gfn) noexcept nogil:
    """Models the preparation in __kvm_gmem_get_pfn (guest_memfd.c, 6.18): a folio not
    yet up to date is cleared and prepared (kvm_gmem_prepare_folio), which for SNP runs
    sev_gmem_prepare (svm/sev.c): an RMP entry not yet assigned becomes
    rmp_make_private(pfn, gfn_to_gpa(gfn), PG_LEVEL_4K, asid, immutable=false), and
    RMPUPDATE leaves it not validated (APM vol. 2, "RMPUPDATE")."""
    cdef uint64_t state
    if frame == NULL:
        return
    state = load_entry(frame)       # other vCPUs' walks and faults read and prepare it
    while not (state & FRAME_STATE_PREPARED):
        if not vcpu.snp or state & FRAME_STATE_RMP_ASSIGNED:
            atomic_or64(frame, FRAME_STATE_PREPARED)
            return
        # The assignment replaces the word: a compare-and-exchange, so that what another
        # vCPU did meanwhile (prepared it first, or its walk validated the page that
        # vCPU mapped) is not overwritten; then look again.
        if cmpxchg64(frame, state, FRAME_STATE_PREPARED | FRAME_STATE_RMP_ASSIGNED
                     | ((gfn << PAGE_SHIFT) & FRAME_GPA_MASK)):
            return
        state = load_entry(frame)


cdef int handle_noslot_fault(VCPUState vcpu, FaultRecord* f) noexcept:
    """Models kvm_handle_noslot_fault (mmu.c, 6.18): private -> memory fault; shared ->
    MMIO, cached, and an MMIO SPTE unless the gfn is beyond kvm_mmu_max_gfn()."""
    if f.is_private:
        return prepare_memory_fault_exit(vcpu, f)
    vcpu_cache_mmio_info(vcpu, f.gfn)
    if not vcpu.mmu.fmt.mmio_caching:
        return RET_PF_EMULATE               # no MMIO SPTEs on this host
    if f.gfn > vcpu.max_gfn:
        return RET_PF_EMULATE               # cannot encode an MMIO SPTE
    return RET_PF_CONTINUE


cdef int max_mapping_level(const SlotRecord* slot, uint64_t gfn, int max_level) noexcept nogil:
    """Models kvm_mmu_max_mapping_level for shared memory (mmu.c, 6.18): the largest level
    lpage_info allows up to ``max_level`` and 1G, capped by the host mapping."""
    cdef int level = min(max_level, <int>PG_LEVEL_1G)
    cdef const uint32_t* linfo
    while level > <int>PG_LEVEL_4K:
        linfo = slot.lpage_2m if level == PG_LEVEL_2M else slot.lpage_1g
        if not linfo[gfn_to_index(gfn, slot.base_gfn, level)]:
            break
        level -= 1
    if level == PG_LEVEL_4K:
        return level
    return min(slot.host_level, level)


cdef inline void hugepage_adjust(FaultRecord* f, bint nx_huge_pages) noexcept nogil:
    """Models kvm_mmu_hugepage_adjust (mmu.c, 6.18): no huge page while dirty logging is
    on, else the level kvm_mmu_max_mapping_level allows."""
    cdef int level
    f.huge_page_disallowed = f.exec_ and nx_huge_pages
    if f.max_level == PG_LEVEL_4K or not f.has_slot:
        return
    if f.slot.flags & MEM_FLAG_LOG_DIRTY_PAGES:
        return
    level = max_mapping_level(&f.slot, f.gfn, f.max_level)
    f.req_level = level
    if level == PG_LEVEL_4K or f.huge_page_disallowed:
        return
    f.goal_level = level
    f.pfn &= ~(pages_per_hpage(level) - 1)   # gfn and pfn are congruent (lpage_info)


cdef void disallowed_hugepage_adjust(FaultRecord* f, Root root, uint64_t spte,
                                     int level) noexcept nogil:
    """Models disallowed_hugepage_adjust (mmu.c, 6.18): a table the NX workaround split
    stays split, so the fault maps one level lower, with the pfn of its part."""
    if (level > <int>PG_LEVEL_4K and level == f.goal_level and is_shadow_present_pte(spte)
            and not (spte & PTE_LARGE)
            and root.nx_huge_page_disallowed(root.child(spte))):
        f.pfn |= f.gfn & (pages_per_hpage(level) - pages_per_hpage(level - 1))
        f.goal_level -= 1
