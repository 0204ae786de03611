# A vCPU: its state, the stage hook, and the access loop (KVM_RUN for one access).
#
# The compiled twin of kvmemu/_pure/vcpu.py.  One fault is a C struct; the counters
# are C.  Python objects appear only at the edges: the result objects, and the
# optional stage hook, called only when one is set (after it, the fault's memslot
# record is re-read from the published records; the fault keeps the Slot object
# alive meanwhile).  Failures are raised here, as the twin raises them.

cimport numpy as cnp
from libc.errno cimport EFAULT, EINVAL
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

cnp.import_array()

from kvmemu import _args
from kvmemu.constants import PF_STAT_NAMES, AccessFlags
from kvmemu.errors import KvmError
from kvmemu.results import (AccessBatch, GuestException, MemoryFaultExit, MmioExit,
                            Translation)

#: access_many releases the GIL once this many accesses in a row translated without a
#: fault.
cdef int TRANSLATION_STREAK = 8
#: ... and holds mmu_lock for read for at most this many accesses at a time.
cdef Py_ssize_t LOCKED_RUN = 4096
#: ... and looks for a pending signal (Ctrl-C) every this many of those runs (~1 ms).
cdef Py_ssize_t SIGNAL_RUNS = 16

cdef extern from "Python.h":
    int PyErr_CheckSignals()
    void PyErr_Clear()

#: The named points of the pipeline where ``stage_hook`` runs (see the twin's VCPUState).
STAGES = ("fault", "faultin", "map")


cdef bint within_reach(const uint64_t[::1] gpas, int reach) noexcept:
    """No GPA has a bit at or above bit ``reach`` (read without the GIL: the view keeps
    the buffer from moving)."""
    cdef uint64_t top = 0
    cdef Py_ssize_t i
    with nogil:
        for i in range(gpas.shape[0]):
            top |= gpas[i]
    return (top >> reach) == 0


@cython.final
cdef class VCPUState:
    """One vCPU: kvm_run, the MMIO cache, the statistics, and the VM parts it reads.

    ``stage_hook``, when set, is called as ``stage_hook(stage)`` at the named points
    of the pipeline (see kvmemu._pure.vcpu.VCPUState): "fault", "faultin", "map".
    """

    def __init__(self, config, Memslots memslots, TdpMmu mmu):
        self.memslots, self.mmu = memslots, mmu
        self.ept, self.tdx, self.snp = config.ept, config.tdx, config.snp
        self.confidential = config.tdx or config.snp
        self.sw_protected, self.has_private_mem = config.sw_protected, config.has_private_mem
        self.direct_bits_gfn = config.direct_bits_gfn
        self.nx_huge_pages = config.nx_huge_pages
        self.levels = config.levels
        self.max_gfn = config.max_gfn
        self.pml_on = config.pml
        self.pml.index = PML_LOG_NR_ENTRIES - 1
        memset(self.counters, 0, sizeof(self.counters))
        self.exit_reason = EXIT_REASON_UNKNOWN
        self.mf_flags = self.mf_gpa = self.mf_size = 0
        self.mmio_gpa, self.mmio_is_write = 0, False
        self.mmio_gfn = self.mmio_gen = 0
        self.stage_hook = None
        self.hypercall = None
        self.vcpu_id = 0
        self.rip = 0
        self.ext_exit_qual = 0
        self.vc_gpa = 0
        self.interrupt_pending = False
        self.slow_access = self.slow_access_many = None

    @property
    def stats(self):
        return {name: load_entry(&self.counters[i]) for i, name in enumerate(PF_STAT_NAMES)}

    @property
    def loop_faults(self):
        """Faults access_many's GIL-free loop handled itself (a diagnostic of this core)."""
        return load_entry(&self.loop_fault_count)

    @property
    def stage_hook(self):
        return self.hook

    @stage_hook.setter
    def stage_hook(self, value):
        # access_many's GIL-free loop reads only ``hooked``, atomically, before each fault
        # it handles: a hook that another thread sets while the loop runs sends the
        # loop's next fault to vcpu_run, which calls it.  The old hook is released after
        # the store (its __del__ may let another thread's setter run in between).
        old = self.hook
        self.hook = value
        atomic_store(&self.hooked, value is not None)
        del old

    @property
    def hypercall(self):
        """run.hypercall (a kvmemu._hypercall.HypercallRun; the API layer sets it)."""
        return self.run_hypercall

    @hypercall.setter
    def hypercall(self, value):
        # Whether a completion is pending is kept in C as well: quiet() reads it on
        # every access, without a Python attribute lookup.
        self.hypercall_pending = value is not None and value.pending is not None
        self.run_hypercall = value

    @property
    def pre_fault_allowed(self):
        """kvm->arch.pre_fault_allowed (VM-wide: launch finish / finalize sets it)."""
        return self.memslots.c[VM_COUNTER_PRE_FAULT_ALLOWED] != 0

    @property
    def memory_fault(self):
        return (self.mf_flags, self.mf_gpa, self.mf_size)

    @property
    def mmio(self):
        return (self.mmio_gpa, self.mmio_is_write)

    def export(self):
        """The vCPU's state as plain values (see the twin)."""
        cdef int i
        return {"counters": [self.counters[i] for i in range(len(PF_STAT_NAMES))],
                "exit_reason": self.exit_reason,
                "memory_fault": [self.mf_flags, self.mf_gpa, self.mf_size],
                "mmio": [self.mmio_gpa, bool(self.mmio_is_write)],
                "mmio_cache": [self.mmio_gfn, self.mmio_gen],
                "pml": [self.pml.gpa[i] for i in range(PML_LOG_NR_ENTRIES)] + [self.pml.index],
                "vcpu_id": self.vcpu_id, "rip": self.rip, "ext_exit_qual": self.ext_exit_qual,
                "vc_gpa": self.vc_gpa, "interrupt_pending": bool(self.interrupt_pending)}

    def load(self, state):
        """Take ``state`` (from export, checked by the caller's format)."""
        cdef int i
        for i in range(len(PF_STAT_NAMES)):
            self.counters[i] = state["counters"][i]
        self.exit_reason = state["exit_reason"]
        self.mf_flags, self.mf_gpa, self.mf_size = state["memory_fault"]
        self.mmio_gpa, self.mmio_is_write = state["mmio"]
        self.mmio_gfn, self.mmio_gen = state["mmio_cache"]
        for i in range(PML_LOG_NR_ENTRIES):
            self.pml.gpa[i] = state["pml"][i]
        self.pml.index = state["pml"][PML_LOG_NR_ENTRIES]
        self.vcpu_id, self.rip = state["vcpu_id"], state["rip"]
        self.ext_exit_qual, self.vc_gpa = state["ext_exit_qual"], state["vc_gpa"]
        self.interrupt_pending = state["interrupt_pending"]

    def clone(self, Memslots memslots, TdpMmu mmu):
        """This vCPU's state, attached to ``memslots`` and ``mmu`` (a VM's copies)."""
        cdef VCPUState c = VCPUState.__new__(VCPUState)
        c.memslots, c.mmu = memslots, mmu
        c.ept, c.tdx, c.snp = self.ept, self.tdx, self.snp
        c.confidential = self.confidential
        c.sw_protected, c.has_private_mem = self.sw_protected, self.has_private_mem
        c.direct_bits_gfn, c.nx_huge_pages, c.levels = (self.direct_bits_gfn,
                                                        self.nx_huge_pages, self.levels)
        memcpy(c.counters, self.counters, sizeof(self.counters))
        c.max_gfn = self.max_gfn
        c.pml_on = self.pml_on
        c.pml = self.pml
        c.exit_reason = self.exit_reason
        c.mf_flags, c.mf_gpa, c.mf_size = self.mf_flags, self.mf_gpa, self.mf_size
        c.mmio_gpa, c.mmio_is_write = self.mmio_gpa, self.mmio_is_write
        c.mmio_gfn, c.mmio_gen = self.mmio_gfn, self.mmio_gen
        c.stage_hook = self.hook
        c.hypercall = self.hypercall
        c.vcpu_id, c.rip = self.vcpu_id, self.rip
        c.ext_exit_qual, c.vc_gpa = self.ext_exit_qual, self.vc_gpa
        c.interrupt_pending = self.interrupt_pending
        c.slow_access = self.slow_access
        c.slow_access_many = self.slow_access_many
        return c

    cdef int handle_exit(self, int kind, uint64_t gpa,
                         uint64_t value) except CORE_RETURN_PY_EXCEPTION:
        """The exit's handler, inside a kvm->srcu read-side section (vcpu_run holds it
        while it handles exits): a memslot change waits for it to end."""
        if self.pml_on:
            vmx_flush_pml_buffer(self)
        self.srcu = self.memslots.srcu_read_lock()
        try:
            if kind == OUT_EPT_VIOLATION:
                return handle_ept_violation(self, gpa, value)
            if kind == OUT_EPT_MISCONFIG:
                return handle_ept_misconfig(self, gpa)
            return npf_interception(self, gpa, value)
        finally:
            self.memslots.srcu_read_unlock(self.srcu)
            self.srcu = None

    cdef int stage(self, str name, FaultRecord* f) except -1:
        """Run the stage hook, if set, outside the srcu read-side section (so that the hook
        may change memslots); then re-read the fault's memslot record.  Returns 1 if the
        hook deleted or moved the fault's memslot (the fault then retries), else 0."""
        cdef const SlotRecord* now
        cdef void* owner = NULL
        cdef uint64_t base_gfn = 0
        if self.hook is None:
            return 0
        if f != NULL and f.has_slot:
            owner, base_gfn = f.slot.owner, f.slot.base_gfn
        self.memslots.srcu_read_unlock(self.srcu)
        try:
            self.hook(name)
        finally:
            self.srcu = self.memslots.srcu_read_lock()
        if owner == NULL:
            return 0
        now = self.srcu.gfn_to_memslot(f.gfn)
        if now == NULL or now.owner != owner or now.base_gfn != base_gfn:
            return 1
        f.slot = now[0]
        return 0

    # --- the exit handlers, as the API calls them ---------------------------------------------

    def handle_ept_violation(self, uint64_t gpa, uint64_t exit_qualification):
        self.mutex.acquire()
        try:
            return self.handle_exit(OUT_EPT_VIOLATION, gpa, exit_qualification)
        finally:
            self.mutex.release()

    def handle_ept_misconfig(self, uint64_t gpa):
        self.mutex.acquire()
        try:
            return self.handle_exit(OUT_EPT_MISCONFIG, gpa, 0)
        finally:
            self.mutex.release()

    def handle_npf(self, uint64_t gpa, uint64_t exit_info_1):
        self.mutex.acquire()
        try:
            return self.handle_exit(OUT_NPF, gpa, exit_info_1)
        finally:
            self.mutex.release()

    # --- KVM_PRE_FAULT_MEMORY ---------------------------------------------------------------

    def pre_fault_memory(self, uint64_t gpa, uint64_t size, uint64_t flags):
        """Models kvm_vcpu_pre_fault_memory (virt/kvm/kvm_main.c, 6.18); the twin tells the
        rules.  Returns the bytes left; Ctrl-C between steps raises KeyboardInterrupt."""
        cdef int r = -EINVAL
        cdef uint64_t full = size
        self.mutex.acquire()
        try:
            if not flags and not ((gpa | size) & (PAGE_SIZE - 1)) and gpa < gpa + size:
                self.srcu = self.memslots.srcu_read_lock()
                try:
                    while True:
                        if PyErr_CheckSignals():
                            PyErr_Clear()
                            raise KeyboardInterrupt(f"pre-fault stopped at GPA {gpa:#x}")
                        r = pre_fault_memory(self, gpa, size)
                        if r <= 0:
                            break
                        size -= r
                        gpa += r
                        if not size:
                            break
                finally:
                    self.memslots.srcu_read_unlock(self.srcu)
                    self.srcu = None
                if size != full:
                    r = 0
        finally:
            self.mutex.release()
        if r < 0:
            raise KvmError(-r, f"KVM_PRE_FAULT_MEMORY failed at GPA {gpa:#x}")
        return size

    def map_page(self, uint64_t gpa, uint64_t error_code):
        """kvm_tdp_map_page as a launch-time population calls it (the caller holds the
        vCPU's mutex): 0, or a negative errno."""
        cdef int level = PG_LEVEL_4K, r
        self.srcu = self.memslots.srcu_read_lock()
        try:
            r = tdp_map_page(self, gpa, error_code, &level)
        finally:
            self.memslots.srcu_read_unlock(self.srcu)
            self.srcu = None
        return r

    # --- the access loop ------------------------------------------------------------------------

    cdef PmlLog* active_pml(self) noexcept:
        """The PML log while PML is enabled in the VMCS (a memslot logs dirty pages:
        vmx_update_cpu_dirty_logging, vmx.c, 6.18), else NULL."""
        if self.pml_on and self.memslots.c[VM_COUNTER_NR_MEMSLOTS_DIRTY_LOGGING]:
            return &self.pml
        return NULL

    cdef void leave_guest(self) noexcept:
        """The vCPU leaves the guest at the end of a call (a VM exit): the PML log is
        flushed, as __vmx_handle_exit does on every exit."""
        if self.pml_on and self.pml.index != <int>PML_LOG_NR_ENTRIES - 1:
            vmx_flush_pml_buffer(self)

    cdef void confidential_check(self, const PagingConfig* c, uint64_t gpa, uint64_t flags,
                                 Outcome* out) noexcept nogil:
        """The checks the hardware makes after a translation of a confidential VM's access
        (the twin tells the rules): the SNP RMP check, or a TD's PENDING page.  ``out``
        becomes the exit (or the #VC) when one fails."""
        cdef uint64_t* frame
        cdef uint64_t e
        cdef bint rmp_fault
        if self.snp:
            frame = self.memslots.frame_state(out.value >> PAGE_SHIFT)
            e = load_entry(frame) if frame != NULL else 0
            if flags & ACCESS_FLAGS_ENCRYPTED:
                rmp_fault = (not (e & FRAME_STATE_RMP_ASSIGNED) or (e & FRAME_STATE_RMP_IMMUTABLE)
                             or (e & FRAME_GPA_MASK) != (gpa & FRAME_GPA_MASK)
                             or (out.level > <int>PG_LEVEL_4K)
                             != ((e & FRAME_STATE_RMP_PAGESIZE_2M) != 0))
                if (not rmp_fault and not (e & FRAME_STATE_RMP_VALIDATED)
                        and not (flags & ACCESS_PROBE)):
                    if self.memslots.c[VM_COUNTER_GUEST_ACCEPTS]:
                        atomic_or64(frame, FRAME_STATE_RMP_VALIDATED)   # PVALIDATE first
                    else:
                        out.kind = OUT_GUEST_VC
                        out.value = SVM_EXIT_PAGE_NOT_VALIDATED
            else:
                rmp_fault = ((flags & (ACCESS_FLAGS_WRITE | ACCESS_FLAGS_WALK)) != 0
                             and (e & FRAME_STATE_RMP_ASSIGNED) != 0)
            if rmp_fault:
                out.kind = OUT_NPF
                out.value = npf_error_bits(c, flags) | PFERR_PRESENT | PFERR_GUEST_RMP
        elif self.tdx and not (gpa & (self.direct_bits_gfn << PAGE_SHIFT)):
            frame = self.memslots.frame_state(out.value >> PAGE_SHIFT)
            if (frame != NULL and load_entry(frame) & FRAME_STATE_TDX_PENDING
                    and not (flags & ACCESS_PROBE)):
                if self.memslots.c[VM_COUNTER_GUEST_ACCEPTS]:
                    fetch_andnot64(frame, FRAME_STATE_TDX_PENDING)      # TDG.MEM.PAGE.ACCEPT first
                else:
                    out.kind = OUT_TDX_PENDING
                    out.value = ept_gva_bits(ept_access_bits(c, flags), flags)

    cdef int vcpu_run(self, uint64_t gpa, uint64_t flags, int limit, Outcome* out,
                      int* err) except -1:
        """Walk, exit, handle, resume until the access translates or leaves to userspace.

        Like KVM_RUN (vcpu_run) it starts with exit_reason KVM_EXIT_UNKNOWN.  Returns an
        AccessStatus; ``out`` holds the translation, ``err`` the errno of a failure."""
        cdef uint64_t shared_bit = self.direct_bits_gfn << PAGE_SHIFT
        # The tables the access walks: a vCPU's TdpMmu and its roots are set when they
        # are made and never replaced.
        cdef PageTables pt = self.mmu.mirror.pt if self.tdx and not (gpa & shared_bit) \
            else self.mmu.direct.pt
        cdef int r, n_exits = 0, retries = 0
        self.exit_reason = EXIT_REASON_UNKNOWN
        while n_exits < limit:
            # No mmu_lock, as the hardware's walk: it reads entries that faults in other
            # vCPUs' GIL-free loops may be installing (each entry read once, in table
            # memory that never moves); a zap holds mmu_lock for write and the GIL, so
            # none runs meanwhile (walks without the GIL, in access_many, take the lock).
            out[0] = translate_one(&pt.cfg, pt.mem, load_count(&pt.ntables), gpa, flags,
                                   self.active_pml())
            if out.kind == OUT_TRANSLATED and self.confidential:
                self.confidential_check(&pt.cfg, gpa, flags, out)
            if out.kind == OUT_TRANSLATED:
                return ACCESS_TRANSLATED
            if out.kind == OUT_PML_FULL:
                vmx_flush_pml_buffer(self)           # handle_pml_full: resume the guest
                n_exits += 1
                continue
            if out.kind == OUT_GUEST_VC:
                self.vc_gpa = gpa & ~(<uint64_t>PAGE_SIZE - 1)
                return ACCESS_GUEST_EXCEPTION
            self.ext_exit_qual = 0
            if out.kind == OUT_TDX_PENDING:
                out.kind = OUT_EPT_VIOLATION
                self.ext_exit_qual = TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION
            r = self.handle_exit(out.kind, gpa, out.value)
            if r < 0:
                if r == -EFAULT and self.exit_reason == EXIT_REASON_MEMORY_FAULT:
                    return ACCESS_MEMORY_FAULT
                err[0] = r
                return ACCESS_FAILED
            if r == RET_PF_EMULATE:
                self.exit_reason = EXIT_REASON_MMIO
                self.mmio_gpa = gpa & ~shared_bit
                self.mmio_is_write = (flags & ACCESS_FLAGS_WRITE) != 0
                return ACCESS_MMIO
            if r == RET_PF_RETRY and self.hook is None and retries < ACCESS_RETRY_LIMIT:
                retries += 1                 # another thread's invalidation: let it finish
                with nogil:
                    sched_yield()
                continue
            n_exits += 1
        return ACCESS_UNSETTLED

    cdef object outcome_of(self, int status, const Outcome* out, int err, uint64_t gpa,
                           str where, int limit):
        """The result object of a vcpu_run: Translation, MemoryFaultExit or MmioExit (built
        directly, by tuple's constructor: paging.result); a failure of KVM_RUN raises KvmError
        with its errno, a loop that did not settle RuntimeError."""
        if status == ACCESS_TRANSLATED:
            return result2(Translation, out.value, out.level)
        if status == ACCESS_MEMORY_FAULT:
            return result(MemoryFaultExit, (self.mf_flags, self.mf_gpa, self.mf_size))
        if status == ACCESS_MMIO:
            return result(MmioExit, (self.mmio_gpa, bool(self.mmio_is_write), 0, b""))
        if status == ACCESS_GUEST_EXCEPTION:
            return result(GuestException, (X86_TRAP_VC, out.value, self.vc_gpa))
        if status == ACCESS_FAILED:
            raise KvmError(-err, f"KVM_RUN failed at GPA {gpa:#x}{where}")
        raise RuntimeError(f"access to GPA {gpa:#x}{where} did not settle after {limit} exits")

    cpdef object access(self, uint64_t gpa, uint64_t flags, int limit):
        """One access of valid arguments: Translation, MemoryFaultExit or MmioExit."""
        cdef Outcome out
        cdef int err = 0, status
        self.mutex.acquire()
        try:
            try:
                status = self.vcpu_run(gpa, flags, limit, &out, &err)
            finally:
                self.leave_guest()
        finally:
            self.mutex.release()
        return self.outcome_of(status, &out, err, gpa, "", limit)

    def access_api(self, gpa, *, write=False, fetch=False, user=False, stage="final",
                   encrypted=False, size=None, data=None):
        """VCPU.access as the API binds it: straight to ``access_checked`` when nothing
        around KVM_RUN needs Python (the VM alive and launched, no trace sink, no pending
        hypercall completion or interrupt); else ``slow_access``.  Plain arguments go
        straight to ``access``, without a Python-level call of ``access_checked``."""
        cdef uint64_t g = 0, f = 0
        if self.quiet() and size is None and data is None:
            if plain_access(gpa, write, fetch, user, stage, encrypted, self.levels, &g, &f):
                return self.access(g, f, ACCESS_LOOP_LIMIT)
            return self.access_checked(gpa, write, fetch, user, stage, encrypted,
                                       ACCESS_LOOP_LIMIT)
        return self.slow_access(gpa, write=write, fetch=fetch, user=user, stage=stage,
                                encrypted=encrypted, size=size, data=data)

    cdef bint quiet(self) noexcept:
        """Nothing around KVM_RUN needs Python: the VM alive and launched, no trace sink,
        no pending hypercall completion or interrupt."""
        return (not self.interrupt_pending and not self.mmu.tracing
                and self.memslots.c[VM_COUNTER_LAUNCHED] != 0
                and not self.memslots.c[VM_COUNTER_VM_DEAD]
                and not self.hypercall_pending)

    def access_many_api(self, gpas, flags=0, *, out=None):
        """VCPU.access_many as the API binds it: a C-contiguous, aligned 1-D uint64
        ndarray within the walk's reach, a valid AccessFlags (or int) and no ``out`` (or one
        that fits) go straight to the batch loop when ``quiet`` and no stage hook is set;
        anything else (arrays of flags, errors to report) goes to ``slow_access_many``."""
        cdef const uint64_t[::1] view
        cdef uint64_t f
        if (type(gpas) is np.ndarray and (type(flags) is int or type(flags) is AccessFlags)
                and self.hook is None and self.quiet()):
            try:
                view = gpas
                f = flags
            except (ValueError, TypeError, OverflowError, BufferError):
                pass
            else:
                if (f < 64 and (f & (ACCESS_FLAGS_WALK | ACCESS_FLAGS_NOGVA))
                        != (ACCESS_FLAGS_WALK | ACCESS_FLAGS_NOGVA)
                        and not (f & (ACCESS_FLAGS_WALK | ACCESS_FLAGS_NOGVA)
                                 and f & ACCESS_FLAGS_FETCH)
                        and (view.shape[0] == 0 or (<size_t>&view[0]) % 8 == 0)
                        and within_reach(view, PAGE_SHIFT + PT_LEVEL_BITS * self.levels)):
                    if out is None:
                        return self.batch(view, f, ACCESS_LOOP_LIMIT, None, None, NULL, NULL)
                    batch = self.batch_into(view, f, out)
                    if batch is not None:
                        return batch
        return self.slow_access_many(gpas, flags, out=out)

    cdef object batch_into(self, const uint64_t[::1] gpas, uint64_t f, object out):
        """The fast path's batch into ``out`` when it is ``(hpa, level)`` as
        _args.batch_out accepts it, in the cheap cases: two writable C-contiguous arrays
        of the right types and length, apart from each other and from ``gpas``.  None
        sends the call to the checking path."""
        cdef uint64_t[::1] hpa
        cdef uint8_t[::1] level
        cdef size_t g0, g1, h0, h1, l0, l1
        cdef Py_ssize_t n = gpas.shape[0]
        if type(out) is not tuple or len(out) != 2 or n == 0:
            return None
        if type(out[0]) is not np.ndarray or type(out[1]) is not np.ndarray:
            return None
        try:
            hpa = out[0]
            level = out[1]
        except (ValueError, TypeError, BufferError):
            return None
        if hpa.shape[0] != n or level.shape[0] != n or (<size_t>&hpa[0]) % 8:
            return None
        g0, h0, l0 = <size_t>&gpas[0], <size_t>&hpa[0], <size_t>&level[0]
        g1, h1, l1 = g0 + 8 * n, h0 + 8 * n, l0 + n
        if not ((h1 <= g0 or g1 <= h0) and (l1 <= g0 or g1 <= l0) and (l1 <= h0 or h1 <= l0)):
            return None
        # hpa and level stay held (as buffers) until the batch returns.
        return self.batch(gpas, f, ACCESS_LOOP_LIMIT, out[0], out[1], &hpa[0], &level[0])

    def access_checked(self, gpa, write, fetch, user, stage, encrypted, int limit):
        """``access`` from the keyword arguments of ``VCPU.access``, checked here: plain
        bools, ``stage="final"`` and an int GPA within the walk's reach take a fast path;
        anything else goes through kvmemu._args, as in the pure-Python twin."""
        cdef uint64_t g = 0, f = 0
        if not plain_access(gpa, write, fetch, user, stage, encrypted, self.levels, &g, &f):
            f = _args.access(write, fetch, user, stage, encrypted)
            g = _args.gpa(gpa, self.levels)
        return self.access(g, f, limit)

    def access_many(self, const uint64_t[::1] gpas, flags, int limit, out=None):
        """``access`` for each GPA in order (checked arrays), stopping at the first access
        that leaves to userspace (``.exit``); KVM_RUN failing raises KvmError, an access
        that does not settle RuntimeError, both naming the element.

        Accesses run in a C loop with the GIL released and mmu_lock held for read: those
        that translate without an exit (mapped pages, the common case), and the faults
        that need nothing of Python (mmu.fault_without_gil).  Any other access goes
        through the fault pipeline in C with the GIL held (it may call the stage hook).
        No Python object is made per element.
        ``out``: the checked ``(hpa, level)`` arrays to fill, else new zeroed ones."""
        cdef uint64_t[::1] out_hpa
        cdef uint8_t[::1] out_level
        if out is None:
            return self.batch(gpas, flags, limit, None, None, NULL, NULL)
        out_hpa, out_level = out                      # held as buffers until it returns
        return self.batch(gpas, flags, limit, out[0], out[1],
                          &out_hpa[0] if out_hpa.shape[0] else NULL,
                          &out_level[0] if out_level.shape[0] else NULL)

    cdef object batch(self, const uint64_t[::1] gpas, object flags, int limit, object hpa_arr,
                      object level_arr, uint64_t* hpa, uint8_t* level):
        """access_many after its checks: the result arrays (``hpa_arr`` and ``level_arr``
        with their memory at ``hpa`` and ``level``, which the caller holds as buffers;
        None: numpy's C API makes new zeroed ones), then the loop."""
        cdef cnp.npy_intp dims[1]
        cdef bint per_element = not isinstance(flags, int)
        cdef const uint8_t[::1] fl = flags if per_element else None
        cdef uint64_t f = 0 if per_element else flags
        if hpa_arr is None:
            dims[0] = gpas.shape[0]
            hpa_arr = cnp.PyArray_ZEROS(1, dims, cnp.NPY_UINT64, 0)
            level_arr = cnp.PyArray_ZEROS(1, dims, cnp.NPY_UINT8, 0)
            # Arrays no other code holds yet: nothing can move them during the loop.
            hpa = <uint64_t*>cnp.PyArray_DATA(hpa_arr)
            level = <uint8_t*>cnp.PyArray_DATA(level_arr)
        self.mutex.acquire()
        try:
            try:
                return self.run_batch(gpas, fl, f, per_element, hpa_arr, level_arr, hpa,
                                      level, limit)
            finally:
                self.leave_guest()
        finally:
            self.mutex.release()

    cdef object run_batch(self, const uint64_t[::1] gpas, const uint8_t[::1] fl, uint64_t f,
                          bint per_element, object hpa_arr, object level_arr, uint64_t* hpa,
                          uint8_t* level, int limit):
        """access_many's loop, holding the vCPU's mutex.

        Runs of accesses go through a C loop without the GIL, holding mmu_lock for read
        and a kvm->srcu read-side section: mapped pages translate there, and, on a VM
        whose faults can be handled there (fault_without_gil), first touches fault and
        map there too.  Everything else (an exit to userspace, a stage hook, a fault that
        needs Python or another part of the VM) leaves the loop for vcpu_run, with the
        exits the access took so far counted against ``limit``."""
        cdef Py_ssize_t i = 0, n = gpas.shape[0]
        cdef uint64_t g, shared_bit = self.direct_bits_gfn << PAGE_SHIFT
        cdef bint tdx = self.tdx, snp = self.snp
        cdef PageTables dpt = self.mmu.direct.pt, mpt = self.mmu.mirror.pt if tdx else dpt
        cdef uint64_t* dmem
        cdef uint64_t* mmem
        cdef Py_ssize_t dn, mn, stop
        cdef RwLock lock = dpt.lock
        cdef Outcome out
        cdef int status, err = 0, streak = 0, used = 0, r
        cdef uint64_t taken
        cdef bint interrupted = False
        cdef Py_ssize_t runs = 0
        cdef PmlLog* pml
        cdef Ept4Walk walk                  # ept4_walk's masks for the batch's flags
        cdef bint lean = False
        cdef SlotTable table
        cdef long seen
        cdef const SlotRecord* last_slot
        # The last access faulted: the next one is tried without ept4_mapped_run (a run of
        # first touches would have it walk each access once more in vain).
        cdef bint faulted = False
        # Local copies of the walks' configuration: the loop stores into table memory
        # (A/D bits) through uint64_t pointers, which the compiler must otherwise assume
        # may change the PageTables' fields.
        cdef PagingConfig dcfg = dpt.cfg, mcfg = mpt.cfg
        # The common case inlined: the one-pass walk of 4-level EPT (translate_one
        # takes it too; this saves a call per access in the GIL-free loop).
        cdef bint fast4 = dcfg.ept and dcfg.levels == 4
        # Most accesses of a mapped batch: ept4_mapped_run's tight loop, up to the first
        # access that must store an A/D bit, exit or take a huge leaf (which the lines
        # below take).  Not for a TD (the mirror root) or per-element flags.
        cdef bint mapped_run = fast4 and not tdx and not per_element
        # Faults handled in the GIL-free loop (fault_without_gil says which, per fault;
        # here: the VM and what is set when the batch starts): the loop starts at once,
        # and an access vcpu_run took counts toward the streak even if it faulted.
        cdef bint faults_here = (self.hook is None
                                 and not self.mmu.tracing and self.active_pml() == NULL)
        if n:
            self.exit_reason = EXIT_REASON_UNKNOWN      # as vcpu_run starts
        if faults_here and limit > 0:
            streak = TRANSLATION_STREAK
        while i < n:
            if streak >= TRANSLATION_STREAK:
                dmem, mmem = dpt.mem, mpt.mem
                lean = not per_element and ept4_walk_init(&walk, &dcfg, dmem, f)
                pml = self.active_pml()
                table = self.memslots.srcu_read_lock()
                seen = atomic_load(&self.memslots.publishes)
                last_slot = NULL
                try:
                    with nogil:
                        lock.read_lock()
                        try:
                            dn, mn = load_count(&dpt.ntables), load_count(&mpt.ntables)
                            stop = min(n, i + LOCKED_RUN)
                            while i < n:
                                if i == stop:        # let a waiting writer in now and then,
                                    lock.read_unlock()   # and look for Ctrl-C
                                    runs += 1
                                    if runs % SIGNAL_RUNS == 0:
                                        with gil:
                                            interrupted = PyErr_CheckSignals() != 0
                                    lock.read_lock()
                                    # A memslot change waits for this srcu section: end it.
                                    if interrupted or atomic_load(&self.memslots.publishes) != seen:
                                        break
                                    dn, mn = load_count(&dpt.ntables), load_count(&mpt.ntables)
                                    stop = min(n, i + LOCKED_RUN)
                                if mapped_run and lean and not used and not faulted:
                                    i = ept4_mapped_run(&walk, dn, &gpas[0], i, stop, hpa,
                                                        level)
                                    if i == stop:
                                        continue
                                g = gpas[i]
                                if per_element:
                                    f = fl[i]
                                if tdx and not (g & shared_bit):
                                    out = translate_one(&mcfg, mmem, mn, g, f, pml)
                                    if out.kind == OUT_TRANSLATED:
                                        self.confidential_check(&mcfg, g, f, &out)
                                elif not fast4:
                                    out = translate_one(&dcfg, dmem, dn, g, f, pml)
                                    if snp and out.kind == OUT_TRANSLATED:
                                        self.confidential_check(&dcfg, g, f, &out)
                                elif (not (lean and ept4_walk(&walk, dn, g, &out))
                                      and not ept_fast_translate(&dcfg, dmem, dn, g, f, &out, 4,
                                                                 pml)):
                                    # (EPT: not SNP; translate_one without its fast walk again)
                                    out = translate_walked(&dcfg, dmem, dn, g, f, pml)
                                if out.kind != OUT_TRANSLATED:
                                    if not faults_here:
                                        break
                                    r = fault_without_gil(self, table, seen, &out, g,
                                                          &last_slot)
                                    if r == FAULT_ELSEWHERE:
                                        break        # vcpu_run handles it
                                    once_add(&self.loop_fault_count, 1)
                                    if r == RET_PF_RETRY:
                                        break        # vcpu_run retries it, as it does
                                    used += 1
                                    if used >= limit:
                                        break        # vcpu_run finds it unsettled
                                    dn = load_count(&dpt.ntables)    # the tables it may have linked
                                    mn = load_count(&mpt.ntables)
                                    continue
                                hpa[i] = out.value
                                level[i] = out.level
                                i += 1
                                faulted = used != 0
                                used = 0
                        finally:
                            lock.read_unlock()
                finally:
                    self.memslots.srcu_read_unlock(table)
                if interrupted:
                    PyErr_Clear()
                    raise KeyboardInterrupt(f"access_many stopped at element {i}: the {i} "
                                            "before it translated")
                if i == n:
                    break
                streak = 0
            if per_element:
                f = fl[i]
            taken = self.counters[PF_STAT_PF_TAKEN]
            status = self.vcpu_run(gpas[i], f, limit - used, &out, &err)
            used = 0
            if status != ACCESS_TRANSLATED:
                exit_ = self.outcome_of(status, &out, err, gpas[i], f" (element {i})", limit)
                return AccessBatch(hpa_arr, level_arr, i, exit_)
            hpa[i] = out.value
            level[i] = out.level
            i += 1
            # An access that took no fault counts toward the streak (and, on a VM whose
            # faults the loop handles, one that did): a run of faults that need vcpu_run
            # stays here, without a GIL-free loop that would stop at once.
            if faults_here or self.counters[PF_STAT_PF_TAKEN] == taken:
                streak += 1
            else:
                streak = 0
        return AccessBatch(hpa_arr, level_arr, n, None)
