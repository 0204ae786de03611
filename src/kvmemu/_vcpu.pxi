# A vCPU's fault handling: exit handlers, kvm_mmu_page_fault, the access loop.
#
# The compiled twin of kvmemu/_pure/vcpu.py, which names the Linux 6.18
# functions each step follows (handle_ept_violation, tdx_handle_ept_violation,
# handle_ept_misconfig, npf_interception, kvm_mmu_page_fault,
# handle_mmio_page_fault, kvm_tdp_mmu_page_fault, fast_page_fault,
# kvm_mmu_faultin_pfn, kvm_handle_noslot_fault, kvm_prepare_memory_fault_exit).
#
# One fault is a C struct (FaultRec) with a copy of its memslot's record; the
# counters are C.  Python objects appear only at the edges: the result objects
# of access(), and the optional stage hook, called only when one is set (after
# it, the memslot record is re-read from the Slot object, which the hook may
# have changed; the fault keeps a reference to it meanwhile).

from libc.errno cimport EFAULT, EIO

from kvmemu.results import MemoryFaultExit, MmioExit

cdef enum AccessStatus:
    ACCESS_TRANSLATED = 0
    ACCESS_MEMORY_FAULT = 1
    ACCESS_MMIO = 2
    ACCESS_UNSETTLED = 3
    ACCESS_FAILED = 4

#: access_many releases the GIL once this many accesses in a row translated.
cdef int TRANSLATION_STREAK = 8

#: The named points of the pipeline where ``stage_hook`` runs (see VCPUState).
STAGES = ("fault", "faultin", "map")

cdef tuple STAT_NAMES = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious",
                         "pf_mmio_spte_created", "pf_fast")


cdef void fault_init(FaultRec* f, uint64_t addr, uint64_t error_code, uint64_t gfn,
                     const slot_c* slot, bint nx) noexcept nogil:
    """struct kvm_page_fault, as kvm_mmu_do_page_fault fills it."""
    f.addr = addr
    f.error_code = error_code
    f.exec_ = (error_code & PFERR_FETCH) != 0
    f.write = (error_code & PFERR_WRITE) != 0
    f.present = (error_code & PFERR_PRESENT) != 0
    f.rsvd = (error_code & PFERR_RSVD) != 0
    f.user = (error_code & PFERR_USER) != 0
    f.prefetch = False
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


cdef class VCPUState:
    """One vCPU: its exit handlers, kvm_run, MMIO cache and statistics.

    ``stage_hook``, when set, is called as ``stage_hook(stage)`` at the named points
    of the pipeline (see kvmemu._pure.vcpu.VCPUState): "fault", "faultin", "map".
    """

    cdef readonly VMState vm
    cdef uint64_t counters[6]                # in the order of STAT_NAMES
    cdef public int exit_reason
    cdef uint64_t mf_flags, mf_gpa, mf_size  # run.memory_fault
    cdef uint64_t mmio_gpa                   # run.mmio
    cdef bint mmio_is_write
    cdef public uint64_t mmio_gfn, mmio_gen  # the vCPU's MMIO cache
    cdef public object stage_hook
    cdef public unsigned int vcpu_id         # what kvm_page_fault reports
    cdef public uint64_t rip

    def __init__(self, VMState vm):
        self.vm = vm
        memset(self.counters, 0, sizeof(self.counters))
        self.exit_reason = EXIT_REASON_UNKNOWN
        self.mf_flags = self.mf_gpa = self.mf_size = 0
        self.mmio_gpa, self.mmio_is_write = 0, False
        self.mmio_gfn = self.mmio_gen = 0
        self.stage_hook = None
        self.vcpu_id = 0
        self.rip = 0

    @property
    def stats(self):
        return {name: self.counters[i] for i, name in enumerate(STAT_NAMES)}

    @property
    def memory_fault(self):
        return (self.mf_flags, self.mf_gpa, self.mf_size)

    @property
    def mmio(self):
        return (self.mmio_gpa, self.mmio_is_write)

    cdef int stage(self, str name, FaultRec* f) except -1:
        """Run the stage hook, if set; then re-read the fault's memslot record.  Returns 1
        if the hook deleted or moved the fault's memslot (the fault then retries: see the
        twin's VCPUState), else 0."""
        cdef Slot s = None
        cdef uint64_t base_gfn = 0
        if self.stage_hook is None:
            return 0
        if f != NULL and f.has_slot:
            s = <Slot>f.slot.owner          # a reference: the hook may delete the slot
            base_gfn = f.slot.base_gfn
        self.stage_hook(name)
        if s is None:
            return 0
        if self.vm.slot_by_id(0, s.id) is not s or s.base_gfn != base_gfn:
            return 1
        s.record(&f.slot)
        return 0

    # --- vendor entry points ----------------------------------------------------------------

    cdef int c_handle_ept_violation(self, uint64_t gpa, uint64_t q) except -1:
        """handle_ept_violation (VMX) / tdx_handle_ept_violation (TDX)."""
        cdef uint64_t shared_bit
        cdef bint local_retry
        cdef int r = 0, i
        if self.vm.tdx:
            shared_bit = self.vm.direct_bits_gfn << PAGE_SHIFT
            local_retry = not (gpa & shared_bit)
            if local_retry:    # private: handled as a write, the module's qualification ignored
                q = EPT_VIOLATION_ACC_WRITE
            elif q & EPT_VIOLATION_ACC_INSTR:
                return -EIO    # KVM_BUG_ON: a fetch from shared memory
            if self.vm.mmu.tracing:
                self.trace_page_fault(gpa, q)
            for i in range(<int>TDX_LOCAL_RETRY_LIMIT):
                r = self.page_fault(gpa, vmx_ec(q, gpa, shared_bit))
                if r != RET_PF_RETRY or not local_retry:
                    break
            return r
        if self.vm.mmu.tracing:
            self.trace_page_fault(gpa, q)
        return self.page_fault(gpa, vmx_ec(q, gpa, 0))

    cdef int trace_page_fault(self, uint64_t gpa, uint64_t error_code) except -1:
        """trace_kvm_page_fault: VMX passes the raw exit qualification (TDX: 0x2 for a
        private GPA), SVM the error code with PRIVATE_ACCESS synthesized."""
        self.vm.mmu.tracer.page_fault(self.vcpu_id, self.rip, gpa, error_code)
        return 0

    cdef int c_handle_ept_misconfig(self, uint64_t gpa) except -1:
        """handle_ept_misconfig: a reserved-bit fault, i.e. the MMIO path."""
        if self.vm.tdx:
            return -EIO        # a real EPT misconfig TD exit is a KVM bug
        return self.page_fault(gpa, PFERR_RSVD)

    cdef int c_handle_npf(self, uint64_t gpa, uint64_t exit_info_1) except -1:
        """npf_interception (no RMP model: sev_handle_rmp_fault does nothing)."""
        cdef uint64_t error_code = svm_ec(exit_info_1, self.vm.snp)
        if self.vm.mmu.tracing:
            self.trace_page_fault(gpa, error_code)
        return self.page_fault(gpa, error_code)

    def handle_ept_violation(self, uint64_t gpa, uint64_t exit_qualification):
        return self.c_handle_ept_violation(gpa, exit_qualification)

    def handle_ept_misconfig(self, uint64_t gpa):
        return self.c_handle_ept_misconfig(gpa)

    def handle_npf(self, uint64_t gpa, uint64_t exit_info_1):
        return self.c_handle_npf(gpa, exit_info_1)

    # --- kvm_mmu_page_fault ------------------------------------------------------------------

    cdef int page_fault(self, uint64_t gpa, uint64_t error_code) except -1:
        """kvm_mmu_page_fault (mmu.c)."""
        cdef VMState vm = self.vm
        cdef int r
        if (vm.sw_protected and not (error_code & PFERR_RSVD)
                and vm.attributes(gpa >> PAGE_SHIFT) & MEMATTR_PRIVATE):
            error_code |= PFERR_PRIVATE_ACCESS
        self.stage("fault", NULL)
        r = RET_PF_INVALID
        if error_code & PFERR_RSVD:
            if error_code & PFERR_PRIVATE_ACCESS:
                return -EFAULT
            r = self.handle_mmio_page_fault(gpa)
            if r == RET_PF_EMULATE:
                return r
        if r == RET_PF_INVALID:
            self.counters[0] += 1                         # pf_taken
            r = self.do_page_fault(gpa, error_code)
        if r < 0:
            return r
        if r == RET_PF_FIXED:
            self.counters[1] += 1
        elif r == RET_PF_EMULATE:
            self.counters[2] += 1
        elif r == RET_PF_SPURIOUS:
            self.counters[3] += 1
        return r

    cdef int handle_mmio_page_fault(self, uint64_t gpa) noexcept:
        """handle_mmio_page_fault: the vCPU's MMIO cache, then the MMIO SPTE."""
        cdef VMState vm = self.vm
        cdef uint64_t generation = vm.gen[0], gfn = gpa >> PAGE_SHIFT
        cdef TdpMmu mmu = vm.mmu
        cdef LastSpte last
        if self.mmio_gen == generation and self.mmio_gfn and self.mmio_gfn == gfn:
            return RET_PF_EMULATE
        last = mmu.last_spte(mmu.direct, gfn & ~vm.direct_bits_gfn)
        if is_mmio_spte(&mmu.fmt, last.spte):
            if mmio_spte_generation(last.spte) != generation & MMIO_SPTE_GEN_MASK:
                return RET_PF_INVALID
            self.cache_mmio_info(gfn)
            return RET_PF_EMULATE
        return RET_PF_RETRY

    cdef inline void cache_mmio_info(self, uint64_t gfn) noexcept:
        """vcpu_cache_mmio_info (gva 0 for TDP)."""
        self.mmio_gfn = gfn
        self.mmio_gen = self.vm.gen[0]

    cdef int do_page_fault(self, uint64_t gpa, uint64_t error_code) except -1:
        """kvm_mmu_do_page_fault: the fault record, then the TDP handler."""
        cdef VMState vm = self.vm
        cdef uint64_t gfn = (gpa >> PAGE_SHIFT) & ~vm.direct_bits_gfn
        cdef Py_ssize_t k = vm.slot_index(gfn)
        cdef FaultRec f
        cdef object keep = None
        cdef int r
        fault_init(&f, gpa, error_code, gfn, &vm.cslots[k] if k >= 0 else NULL,
                   vm.mmu.nx_huge_pages)
        if f.has_slot and self.stage_hook is not None:
            keep = <object>f.slot.owner     # a hook may delete the slot; the fault keeps it
        r = self.tdp_page_fault(&f)
        if r == RET_PF_EMULATE and f.is_private:    # KVM cannot emulate private memory
            return self.memory_fault_exit(&f)
        return r

    cdef int memory_fault_exit(self, const FaultRec* f) noexcept:
        """kvm_mmu_prepare_memory_fault_exit: KVM_EXIT_MEMORY_FAULT, return -EFAULT."""
        self.exit_reason = EXIT_REASON_MEMORY_FAULT
        self.mf_flags = MEMORY_EXIT_FLAG_PRIVATE if f.is_private else 0
        self.mf_gpa = f.gfn << PAGE_SHIFT
        self.mf_size = PAGE_SIZE
        return -EFAULT

    cdef int tdp_page_fault(self, FaultRec* f) except -1:
        """kvm_tdp_mmu_page_fault."""
        cdef VMState vm = self.vm
        cdef TdpMmu mmu = vm.mmu
        cdef int r = self.fast_page_fault(f)
        if r != RET_PF_INVALID:
            return r
        r = self.faultin_pfn(f)
        if r != RET_PF_CONTINUE:
            return r
        if self.stage("map", f):
            return RET_PF_RETRY                             # the memslot was deleted or moved
        if f.has_slot and vm.retry_gfn(f.mmu_seq, f.gfn):
            return RET_PF_RETRY                             # is_page_fault_stale
        return mmu.map(f, mmu.root_for(f.addr, vm.direct_bits_gfn << PAGE_SHIFT), vm.gen[0],
                       &self.counters[4])

    cdef int fast_page_fault(self, FaultRec* f) noexcept:
        """fast_page_fault: only present faults can be fast with A/D bits enabled."""
        cdef VMState vm = self.vm
        cdef TdpMmu mmu = vm.mmu
        cdef LastSpte last
        cdef int r = RET_PF_INVALID
        if f.rsvd:
            return RET_PF_INVALID
        if vm.has_private_mem and f.is_private != ((vm.attributes(f.gfn) & MEMATTR_PRIVATE) != 0):
            return RET_PF_INVALID
        if not f.present or not f.write:
            return RET_PF_INVALID
        last = mmu.last_spte(mmu.direct, f.gfn)
        if is_shadow_present(last.spte) and is_last_spte(last.spte, last.level):
            if access_allowed(&mmu.fmt, f.exec_, f.write, last.spte):
                r = RET_PF_SPURIOUS
            elif last.spte & mmu.fmt.mmu_writable and not (
                    last.level > <int>PG_LEVEL_4K and f.has_slot
                    and f.slot.flags & MEMFLAG_LOG_DIRTY_PAGES):
                # fast_pf_fix_direct_spte: the lockless cmpxchg
                mmu.direct.pt.mem[last.table, last.index] = last.spte | PTE_WRITABLE
                r = RET_PF_FIXED
        if r != RET_PF_INVALID:
            self.counters[5] += 1                           # pf_fast
        return r

    # --- kvm_mmu_faultin_pfn --------------------------------------------------------------------

    cdef int faultin_pfn(self, FaultRec* f) except -1:
        cdef VMState vm = self.vm
        f.mmu_seq = vm.mmu_invalidate_seq
        if f.is_private != ((vm.attributes(f.gfn) & MEMATTR_PRIVATE) != 0):
            return self.memory_fault_exit(f)
        if not f.has_slot:
            return self.handle_noslot_fault(f)
        if self.stage("faultin", f):
            return RET_PF_RETRY             # the memslot was deleted or moved
        if vm.retry_gfn(f.mmu_seq, f.gfn):
            return RET_PF_RETRY
        if f.is_private or f.slot.flags & KVM_MEMSLOT_GMEM_ONLY:
            if f.slot.gmem_id < 0:
                return self.memory_fault_exit(f)
            f.pfn = vm.c_gmem_pfn(&f.slot, f.gfn)
            f.map_writable = not (f.slot.flags & MEMFLAG_READONLY)
            f.max_level = PG_LEVEL_4K   # kvm_max_level_for_order(0): mainline order is 0
        else:
            if f.slot.flags & MEMFLAG_READONLY and f.write:
                return RET_PF_EMULATE   # KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn
            f.pfn = (f.slot.userspace_addr >> PAGE_SHIFT) + (f.gfn - f.slot.base_gfn)
            f.map_writable = not (f.slot.flags & MEMFLAG_READONLY)
        if vm.retry_gfn(f.mmu_seq, f.gfn):
            return RET_PF_RETRY
        return RET_PF_CONTINUE

    cdef int handle_noslot_fault(self, FaultRec* f) noexcept:
        """kvm_handle_noslot_fault: private -> memory fault; shared -> MMIO."""
        if f.is_private:
            return self.memory_fault_exit(f)
        self.cache_mmio_info(f.gfn)
        if f.gfn > self.vm.max_gfn:
            return RET_PF_EMULATE               # cannot encode an MMIO SPTE
        return RET_PF_CONTINUE

    # --- the access loop ------------------------------------------------------------------------

    cdef VCPUState clone(self, VMState vm):
        """This vCPU's state, attached to ``vm`` (a clone of its VM state)."""
        cdef VCPUState c = VCPUState.__new__(VCPUState)
        c.vm = vm
        memcpy(c.counters, self.counters, sizeof(self.counters))
        c.exit_reason = self.exit_reason
        c.mf_flags, c.mf_gpa, c.mf_size = self.mf_flags, self.mf_gpa, self.mf_size
        c.mmio_gpa, c.mmio_is_write = self.mmio_gpa, self.mmio_is_write
        c.mmio_gfn, c.mmio_gen = self.mmio_gfn, self.mmio_gen
        c.stage_hook = self.stage_hook
        c.vcpu_id, c.rip = self.vcpu_id, self.rip
        return c

    # --- the access loop ------------------------------------------------------------------------

    cdef int c_access(self, uint64_t gpa, uint64_t flags, int limit, Outcome* out,
                      int* err) except -1:
        """Walk, exit, handle, resume until the access translates or leaves to userspace.

        Like KVM_RUN (vcpu_run) it starts with exit_reason KVM_EXIT_UNKNOWN.  Returns an
        AccessStatus; ``out`` holds the translation, ``err`` the errno of a failure."""
        cdef VMState vm = self.vm
        cdef uint64_t shared_bit = vm.direct_bits_gfn << PAGE_SHIFT
        cdef PageTables pt
        cdef int r, i
        self.exit_reason = EXIT_REASON_UNKNOWN
        for i in range(limit):
            if vm.tdx and not (gpa & shared_bit):
                pt = vm.mmu.mirror.pt
            else:
                pt = vm.mmu.direct.pt
            out[0] = translate_one(&pt.cfg, &pt.mem[0, 0], pt.ntables, gpa, flags)
            if out.kind == OUT_TRANSLATED:
                return ACCESS_TRANSLATED
            if out.kind == OUT_EPT_VIOLATION:
                r = self.c_handle_ept_violation(gpa, out.value)
            elif out.kind == OUT_EPT_MISCONFIG:
                r = self.c_handle_ept_misconfig(gpa)
            else:
                r = self.c_handle_npf(gpa, out.value)
            if r < 0:
                if r == -EFAULT and self.exit_reason == EXIT_REASON_MEMORY_FAULT:
                    return ACCESS_MEMORY_FAULT
                err[0] = r
                return ACCESS_FAILED
            if r == RET_PF_EMULATE:
                self.exit_reason = EXIT_REASON_MMIO
                self.mmio_gpa = gpa & ~shared_bit
                self.mmio_is_write = (flags & ACCESS_WRITE) != 0
                return ACCESS_MMIO
        return ACCESS_UNSETTLED

    cdef object outcome_of(self, int status, const Outcome* out, int err):
        # The result classes are tuples: built directly, without their checking __new__.
        if status == ACCESS_TRANSLATED:
            return tuple.__new__(Translation, (out.value, out.level))
        if status == ACCESS_MEMORY_FAULT:
            return tuple.__new__(MemoryFaultExit, (self.mf_flags, self.mf_gpa, self.mf_size))
        if status == ACCESS_MMIO:
            return tuple.__new__(MmioExit, (self.mmio_gpa, bool(self.mmio_is_write)))
        if status == ACCESS_FAILED:
            return err
        return None

    def access_checked(self, gpa, write, fetch, user, stage, encrypted, int limit):
        """``access`` from the keyword arguments of ``VCPU.access``, checked here: plain
        bools, ``stage="final"`` and an int GPA within the walk's reach take a fast path;
        anything else goes through kvmemu._args, as in the pure-Python twin."""
        cdef uint64_t g = 0, f
        cdef bint fast = (type(write) is bool and type(fetch) is bool and type(user) is bool
                          and type(encrypted) is bool and type(stage) is str
                          and stage == "final" and type(gpa) is int and gpa >= 0)
        if fast:
            try:
                g = gpa
            except OverflowError:
                fast = False
            else:
                fast = (g >> (PAGE_SHIFT + PT_LEVEL_BITS * self.vm.mmu.levels)) == 0
        if fast:
            f = ((ACCESS_WRITE if write is True else 0) | (ACCESS_FETCH if fetch is True else 0)
                 | (ACCESS_USER if user is True else 0)
                 | (ACCESS_ENCRYPTED if encrypted is True else 0))
        else:
            f = _args.access(write, fetch, user, stage, encrypted)
            g = _args.gpa(gpa, self.vm.mmu.levels)
        cdef Outcome out
        cdef int err = 0
        cdef int status = self.c_access(g, f, limit, &out, &err)
        return self.outcome_of(status, &out, err)

    def access(self, uint64_t gpa, uint64_t flags, int limit):
        """Translation, MemoryFaultExit, MmioExit, a negative errno, or None (unsettled)."""
        cdef Outcome out
        cdef int err = 0
        cdef int status = self.c_access(gpa, flags, limit, &out, &err)
        return self.outcome_of(status, &out, err)

    def access_many(self, const uint64_t[::1] gpas, flags, uint64_t[::1] hpa,
                    uint8_t[::1] level, int limit):
        """``access`` for each GPA in order into ``hpa``/``level``; returns ``(count,
        outcome)``: outcome None (all translated), the exit object, a negative errno, or 0
        when element ``count`` did not settle.

        Accesses that translate without an exit (mapped pages, the common case) run in
        a C loop with the GIL released, once a run of them has started; an access that
        exits goes through the fault pipeline in C with the GIL held (it may grow the
        table storage or call the stage hook).  No Python object is made per element."""
        cdef VMState vm = self.vm
        cdef Py_ssize_t i = 0, n = gpas.shape[0]
        cdef bint per_element = not isinstance(flags, int)
        cdef const uint8_t[::1] fl
        cdef uint64_t f = 0, g, shared_bit = vm.direct_bits_gfn << PAGE_SHIFT
        cdef bint tdx = vm.tdx
        cdef PageTables dpt = vm.mmu.direct.pt, mpt = vm.mmu.mirror.pt if tdx else dpt
        cdef uint64_t* dmem
        cdef uint64_t* mmem
        cdef Py_ssize_t dn, mn
        cdef Outcome out
        cdef int status, err = 0, streak = 0
        # The common case inlined: the one-pass walk of 4-level EPT (translate_one
        # takes it too; this saves a call per access in the GIL-free loop).
        cdef bint fast4 = dpt.cfg.ept and dpt.cfg.levels == 4
        if per_element:
            fl = flags
        else:
            f = flags
        while i < n:
            if streak >= TRANSLATION_STREAK:
                dmem, dn, mmem, mn = &dpt.mem[0, 0], dpt.ntables, &mpt.mem[0, 0], mpt.ntables
                with nogil:
                    while i < n:
                        g = gpas[i]
                        if per_element:
                            f = fl[i]
                        if tdx and not (g & shared_bit):
                            out = translate_one(&mpt.cfg, mmem, mn, g, f)
                        elif not (fast4 and ept_fast_translate(&dpt.cfg, dmem, dn, g, f, &out, 4)):
                            out = translate_one(&dpt.cfg, dmem, dn, g, f)
                        if out.kind != OUT_TRANSLATED:
                            break
                        hpa[i] = out.value
                        level[i] = out.level
                        i += 1
                if i == n:
                    break
                streak = 0
            if per_element:
                f = fl[i]
            status = self.c_access(gpas[i], f, limit, &out, &err)
            if status == ACCESS_UNSETTLED:
                return i, 0                  # as the twin: 0 = element i did not settle
            if status != ACCESS_TRANSLATED:
                return i, self.outcome_of(status, &out, err)
            hpa[i] = out.value
            level[i] = out.level
            i += 1
            streak += 1
        return n, None
