"""A vCPU: its state, the stage hook, and the access loop (KVM_RUN for one access).

The twin of ``_cy/vcpu.pyx``.  ``vcpu_run`` is what KVM_RUN does for one guest
access in the model: the hardware walk (paging), the exit it gives, the vendor's
exit handler (exits), and again, until the access translates or KVM leaves to
userspace (KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO) or fails.  The exit handlers
and the fault path take the vCPU as their first argument, as the kernel's take
``struct kvm_vcpu *``.
"""

from __future__ import annotations

import copy
import errno
import time
from typing import Any, Callable

import numpy as np

from .. import _args
from ..constants import PF_STAT_NAMES
from ..errors import KvmError
from ..results import AccessBatch, GuestException, MemoryFaultExit, MmioExit, Translation
from . import exits, mmu, paging
from .cnames import *  # noqa: F403  (the constants under their C names)

_U64 = (1 << 64) - 1
#: The named points of the pipeline where ``stage_hook`` runs (see VCPUState).
STAGES = ("fault", "faultin", "map")
# What vcpu_run came to (enum AccessStatus).
ACCESS_TRANSLATED = 0
ACCESS_MEMORY_FAULT = 1
ACCESS_MMIO = 2
ACCESS_UNSETTLED = 3
ACCESS_FAILED = 4
ACCESS_GUEST_EXCEPTION = 5


class VCPUState:
    """One vCPU: kvm_run, the MMIO cache, the statistics, and the VM parts it reads.

    ``stage_hook``, when set, is called as ``stage_hook(stage)`` at the named points
    of the pipeline, so a test can change the VM between them:

    * ``"fault"``: the error code is final (intake and the SW_PROTECTED synthesis
      are done), before kvm_mmu_do_page_fault;
    * ``"faultin"``: kvm_mmu_faultin_pfn has taken its mmu_invalidate_seq snapshot
      and passed the private/shared check, before the pfn lookup;
    * ``"map"``: faultin is done, before the stale check under mmu_lock.

    A hook that deletes or moves the fault's memslot makes the fault retry
    (RET_PF_RETRY) at ``"faultin"`` and ``"map"``.  In KVM that change cannot
    finish while the fault holds kvm->srcu (kvm_swap_active_memslots waits for
    it), and the flush that follows zaps whatever the fault mapped; the model
    runs the change first, so it must not map from a memslot that is gone or
    elsewhere.
    """

    def __init__(self, config: Any, memslots: Any, mmu: Any) -> None:
        self.memslots = memslots
        self.mmu = mmu
        self.ept, self.tdx, self.snp = config.ept, config.tdx, config.snp
        self.sw_protected, self.has_private_mem = config.sw_protected, config.has_private_mem
        self.direct_bits_gfn = config.direct_bits_gfn
        self.nx_huge_pages = config.nx_huge_pages
        self.levels = config.levels
        #: kvm_mmu_max_gfn().
        self.max_gfn = config.max_gfn
        #: enable_pml for this VM (kvm->arch.cpu_dirty_log_size), and the vCPU's log.
        self.pml_on = config.pml
        self.pml = paging.PmlLog()
        self.counters = [0] * len(PF_STAT_NAMES)
        self.exit_reason = EXIT_REASON_UNKNOWN
        self.mf_flags = self.mf_gpa = self.mf_size = 0     # run.memory_fault
        self.mmio_gpa, self.mmio_is_write = 0, False        # run.mmio
        self.mmio_gfn = 0
        self.mmio_gen = 0
        self.stage_hook: Callable[[str], Any] | None = None
        #: run.hypercall (a kvmemu._hypercall.HypercallRun; the API layer sets it).
        self.hypercall: Any = None
        #: What the kvm_page_fault trace event reports: vcpu_id and the guest RIP.
        self.vcpu_id = 0
        self.rip = 0
        #: A TD exit's extended exit qualification (RDX; tdx->ext_exit_qualification).
        self.ext_exit_qual = 0
        #: The page of the last #VC.
        self.vc_gpa = 0
        #: kvm_vcpu_has_events (the API sets it).
        self.interrupt_pending = False
        #: The API's VCPU.access and access_many, for what needs Python.
        self.slow_access: Any = None
        self.slow_access_many: Any = None
        #: The memslots an exit's handling reads (its kvm->srcu read-side section).
        self.srcu: Any = None
        #: vcpu->mutex (the API's VCPU owns it).
        self.mutex: Any = None

    @property
    def stats(self) -> dict[str, int]:
        return dict(zip(PF_STAT_NAMES, self.counters))

    @property
    def pre_fault_allowed(self) -> bool:
        """kvm->arch.pre_fault_allowed (VM-wide: launch finish / finalize sets it)."""
        return bool(self.memslots.counters[VM_COUNTER_PRE_FAULT_ALLOWED])

    @property
    def memory_fault(self) -> tuple[int, int, int]:
        return (self.mf_flags, self.mf_gpa, self.mf_size)

    @property
    def mmio(self) -> tuple[int, bool]:
        return (self.mmio_gpa, self.mmio_is_write)

    def export(self) -> dict[str, Any]:
        """The vCPU's state as plain values (what a snapshot's bytes hold; the
        configuration, the stage hook and the API's bindings are not state)."""
        return {"counters": [int(c) for c in self.counters], "exit_reason": self.exit_reason,
                "memory_fault": [self.mf_flags, self.mf_gpa, self.mf_size],
                "mmio": [self.mmio_gpa, bool(self.mmio_is_write)],
                "mmio_cache": [self.mmio_gfn, self.mmio_gen],
                "pml": [int(g) for g in self.pml.gpa] + [self.pml.index],
                "vcpu_id": self.vcpu_id, "rip": self.rip, "ext_exit_qual": self.ext_exit_qual,
                "vc_gpa": self.vc_gpa, "interrupt_pending": bool(self.interrupt_pending)}

    def load(self, state: dict[str, Any]) -> None:
        """Take ``state`` (from export, checked by the caller's format)."""
        self.counters = list(state["counters"])
        self.exit_reason = state["exit_reason"]
        self.mf_flags, self.mf_gpa, self.mf_size = state["memory_fault"]
        self.mmio_gpa, self.mmio_is_write = state["mmio"]
        self.mmio_gfn, self.mmio_gen = state["mmio_cache"]
        self.pml.gpa, self.pml.index = list(state["pml"][:-1]), state["pml"][-1]
        self.vcpu_id, self.rip = state["vcpu_id"], state["rip"]
        self.ext_exit_qual, self.vc_gpa = state["ext_exit_qual"], state["vc_gpa"]
        self.interrupt_pending = state["interrupt_pending"]

    def clone(self, memslots: Any, mmu: Any) -> "VCPUState":
        """This vCPU's state, attached to ``memslots`` and ``mmu`` (a VM's copies)."""
        c = copy.copy(self)
        c.memslots, c.mmu = memslots, mmu
        c.counters = list(self.counters)
        c.pml = paging.PmlLog()
        c.pml.gpa, c.pml.index = list(self.pml.gpa), self.pml.index
        c.srcu = None
        return c

    def handle_exit(self, kind: int, gpa: int, value: int) -> int:
        """The exit's handler, inside a kvm->srcu read-side section (vcpu_run holds it
        while it handles exits): a memslot change waits for it to end."""
        if self.pml_on:
            exits.vmx_flush_pml_buffer(self)
        self.srcu = self.memslots.srcu_read_lock()
        try:
            if kind == paging.OUT_EPT_VIOLATION:
                return exits.handle_ept_violation(self, gpa, value)
            if kind == paging.OUT_EPT_MISCONFIG:
                return exits.handle_ept_misconfig(self, gpa)
            return exits.npf_interception(self, gpa, value)
        finally:
            self.memslots.srcu_read_unlock(self.srcu)
            self.srcu = None

    def stage(self, name: str, fault: Any) -> bool:
        """Run the stage hook, if set, outside the srcu read-side section (so that the hook
        may change memslots); True if it deleted or moved ``fault``'s memslot (the fault
        then retries)."""
        if self.stage_hook is None:
            return False
        slot = None if fault is None else fault.slot
        base_gfn = None if slot is None else slot.base_gfn
        self.memslots.srcu_read_unlock(self.srcu)
        try:
            self.stage_hook(name)
        finally:
            self.srcu = self.memslots.srcu_read_lock()
        return slot is not None and (self.srcu.gfn_to_memslot(fault.gfn) is not slot
                                     or slot.base_gfn != base_gfn)

    # --- the exit handlers, as the API calls them ---------------------------------------------

    def handle_ept_violation(self, gpa: int, exit_qualification: int) -> int:
        self.mutex.acquire()
        try:
            return self.handle_exit(paging.OUT_EPT_VIOLATION, gpa, exit_qualification)
        finally:
            self.mutex.release()

    def handle_ept_misconfig(self, gpa: int) -> int:
        self.mutex.acquire()
        try:
            return self.handle_exit(paging.OUT_EPT_MISCONFIG, gpa, 0)
        finally:
            self.mutex.release()

    def handle_npf(self, gpa: int, exit_info_1: int) -> int:
        self.mutex.acquire()
        try:
            return self.handle_exit(paging.OUT_NPF, gpa, exit_info_1)
        finally:
            self.mutex.release()

    # --- KVM_PRE_FAULT_MEMORY ---------------------------------------------------------------

    def pre_fault_memory(self, gpa: int, size: int, flags: int) -> int:
        """Models kvm_vcpu_pre_fault_memory (virt/kvm/kvm_main.c, 6.18), holding the vCPU's
        mutex and kvm->srcu throughout: EINVAL for flags, an unaligned range or one that
        is empty or wraps; then kvm_arch_vcpu_pre_fault_memory step by step until the
        range is done or a step fails.  A failure after some progress is not reported
        (the ioctl returns 0 with the range advanced).  Returns the bytes left."""
        self.mutex.acquire()
        try:
            r = -errno.EINVAL
            if not flags and not (gpa | size) & (PAGE_SIZE - 1) and gpa < (gpa + size) & _U64:
                full = size
                self.srcu = self.memslots.srcu_read_lock()
                try:
                    while True:
                        r = mmu.pre_fault_memory(self, gpa, size)
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

    # --- the access loop ------------------------------------------------------------------------

    def active_pml(self) -> Any:
        """The PML log while PML is enabled in the VMCS, else None: vmx_update_cpu_dirty_logging
        (vmx.c, 6.18) enables it while a memslot has dirty logging on."""
        if self.pml_on and self.memslots.counters[VM_COUNTER_NR_MEMSLOTS_DIRTY_LOGGING]:
            return self.pml
        return None

    def leave_guest(self) -> None:
        """The vCPU leaves the guest at the end of a call (a VM exit): the PML log is
        flushed, as __vmx_handle_exit does on every exit."""
        if self.pml_on:
            exits.vmx_flush_pml_buffer(self)

    def confidential_check(self, c: Any, gpa: int, flags: int, out: Any) -> Any:
        """The checks the hardware makes after a translation ``out`` of a confidential VM's
        access; returns ``out`` or the outcome of the check that failed.

        SEV-SNP (AMD APM vol. 2, "RMP and VMPL Access Checks"): an access with the
        C-bit (ENCRYPTED) needs the frame's RMP entry assigned to the guest (a frame of
        user memory never is), for this GPA, not immutable and of the NPT mapping's page
        size, else #NPF with GUEST_RMP; then validated, else #VC 0x404 in the guest.  A
        write (or guest page-table access) without the C-bit needs a frame not assigned,
        else #NPF with GUEST_RMP; a read without it is not checked.  A TD's private
        access to a PENDING page (after TDH.MEM.PAGE.AUG, before TDG.MEM.PAGE.ACCEPT)
        is an EPT violation with extended exit qualification type 6 (TDX module ABI).
        When the VM's guest accepts on first touch (an implicit launch finish), it
        validates or accepts the page first instead (PVALIDATE / TDG.MEM.PAGE.ACCEPT).
        The access of those instructions themselves (ACCESS_PROBE) passes both checks."""
        accepts = self.memslots.counters[VM_COUNTER_GUEST_ACCEPTS]
        if self.snp:
            frame = self.memslots.frame_state(out.value >> PAGE_SHIFT)
            e = 0 if frame is None else frame[0].get(frame[1])
            if flags & ACCESS_FLAGS_ENCRYPTED:
                rmp_fault = bool(not e & FRAME_STATE_RMP_ASSIGNED
                                 or e & FRAME_STATE_RMP_IMMUTABLE
                                 or e & FRAME_GPA_MASK != gpa & FRAME_GPA_MASK
                                 or (out.level > PG_LEVEL_4K)
                                 != bool(e & FRAME_STATE_RMP_PAGESIZE_2M))
                if (not rmp_fault and not e & FRAME_STATE_RMP_VALIDATED
                        and not flags & ACCESS_PROBE):
                    if not accepts:
                        return paging.Outcome(paging.OUT_GUEST_VC, 0,
                                              SVM_EXIT_PAGE_NOT_VALIDATED)
                    frame[0].update(frame[1], lambda old: old | FRAME_STATE_RMP_VALIDATED)
            else:
                rmp_fault = bool(flags & (ACCESS_FLAGS_WRITE | ACCESS_FLAGS_WALK)
                                 and e & FRAME_STATE_RMP_ASSIGNED)
            if rmp_fault:
                return paging.Outcome(paging.OUT_NPF, 0, paging.npf_error_bits(c, flags)
                                      | PFERR_PRESENT | PFERR_GUEST_RMP)
        elif self.tdx and not gpa & (self.direct_bits_gfn << PAGE_SHIFT):
            frame = self.memslots.frame_state(out.value >> PAGE_SHIFT)
            if (frame is not None and frame[0].get(frame[1]) & FRAME_STATE_TDX_PENDING
                    and not flags & ACCESS_PROBE):
                if not accepts:
                    return paging.Outcome(paging.OUT_TDX_PENDING, 0, paging.ept_gva_bits(
                        paging.ept_access_bits(c, flags), flags))
                frame[0].update(frame[1], lambda old: old & ~FRAME_STATE_TDX_PENDING)
        return out

    def map_page(self, gpa: int, error_code: int) -> int:
        """kvm_tdp_map_page as a launch-time population calls it (the caller holds the
        vCPU's mutex): 0, or a negative errno."""
        self.srcu = self.memslots.srcu_read_lock()
        try:
            return mmu.tdp_map_page(self, gpa, error_code, [PG_LEVEL_4K])
        finally:
            self.memslots.srcu_read_unlock(self.srcu)
            self.srcu = None

    def vcpu_run(self, gpa: int, flags: int, limit: int) -> tuple[int, Any]:
        """Walk, exit, handle, resume until the access translates or leaves to userspace.

        Like KVM_RUN (vcpu_run) it starts with exit_reason KVM_EXIT_UNKNOWN.  Returns an
        access status and the translation's Outcome or the errno of a failure."""
        shared_bit = self.direct_bits_gfn << PAGE_SHIFT
        self.exit_reason = EXIT_REASON_UNKNOWN
        n_exits = retries = 0
        while n_exits < limit:
            pt = self.mmu.mirror.pt if self.tdx and not gpa & shared_bit else self.mmu.direct.pt
            pt.lock.acquire_read()           # the twin's writers yield the GIL anywhere
            try:
                out = paging.translate_one(pt, pt.mem, pt.ntables, gpa, flags,
                                           self.active_pml())
            finally:
                pt.lock.release_read()
            if out.kind == paging.OUT_TRANSLATED and (self.snp or self.tdx):
                out = self.confidential_check(pt, gpa, flags, out)
            if out.kind == paging.OUT_TRANSLATED:
                return ACCESS_TRANSLATED, out
            if out.kind == paging.OUT_PML_FULL:
                exits.vmx_flush_pml_buffer(self)     # handle_pml_full: resume the guest
                n_exits += 1
                continue
            if out.kind == paging.OUT_GUEST_VC:
                self.vc_gpa = gpa & ~(PAGE_SIZE - 1)
                return ACCESS_GUEST_EXCEPTION, out.value
            self.ext_exit_qual = 0
            kind = out.kind
            if kind == paging.OUT_TDX_PENDING:
                kind = paging.OUT_EPT_VIOLATION
                self.ext_exit_qual = TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION
            r = self.handle_exit(kind, gpa, out.value)
            if r < 0:
                if r == -errno.EFAULT and self.exit_reason == EXIT_REASON_MEMORY_FAULT:
                    return ACCESS_MEMORY_FAULT, None
                return ACCESS_FAILED, r
            if r == RET_PF_EMULATE:
                self.exit_reason = EXIT_REASON_MMIO
                self.mmio_gpa = gpa & ~shared_bit
                self.mmio_is_write = bool(flags & ACCESS_FLAGS_WRITE)
                return ACCESS_MMIO, None
            if r == RET_PF_RETRY and self.stage_hook is None and retries < ACCESS_RETRY_LIMIT:
                retries += 1                 # another thread's invalidation: let it finish
                time.sleep(0)
                continue
            n_exits += 1
        return ACCESS_UNSETTLED, None

    def outcome_of(self, status: int, value: Any, gpa: int, where: str, limit: int) -> Any:
        """The result object of a vcpu_run: Translation, MemoryFaultExit or MmioExit; a
        failure of KVM_RUN raises KvmError with its errno, a loop that did not settle
        RuntimeError (``where`` names the access)."""
        if status == ACCESS_TRANSLATED:
            return Translation(value.value, value.level)
        if status == ACCESS_MEMORY_FAULT:
            return MemoryFaultExit(*self.memory_fault)
        if status == ACCESS_MMIO:
            return MmioExit(*self.mmio, 0, b"")
        if status == ACCESS_GUEST_EXCEPTION:
            return GuestException(X86_TRAP_VC, value, self.vc_gpa)
        if status == ACCESS_FAILED:
            raise KvmError(-value, f"KVM_RUN failed at GPA {gpa:#x}{where}")
        raise RuntimeError(f"access to GPA {gpa:#x}{where} did not settle after {limit} exits")

    def access(self, gpa: int, flags: int, limit: int) -> Any:
        """One access of valid arguments: Translation, MemoryFaultExit or MmioExit."""
        self.mutex.acquire()
        try:
            try:
                status, value = self.vcpu_run(gpa, flags, limit)
            finally:
                self.leave_guest()
        finally:
            self.mutex.release()
        return self.outcome_of(status, value, gpa, "", limit)

    def quiet(self) -> bool:
        """Nothing around KVM_RUN needs Python: the VM alive and launched, no trace sink,
        no pending hypercall completion or interrupt."""
        c = self.memslots.counters
        return bool(not self.interrupt_pending and self.mmu.tracer is None
                    and c[VM_COUNTER_LAUNCHED] and not c[VM_COUNTER_VM_DEAD]
                    and self.hypercall.pending is None)

    def access_many_api(self, gpas: Any, flags: Any = 0, *, out: Any = None) -> Any:
        """VCPU.access_many as the API binds it (the compiled core checks a plain call
        itself); the twin always goes through ``slow_access_many``."""
        return self.slow_access_many(gpas, flags, out=out)

    def access_api(self, gpa: Any, *, write: Any = False, fetch: Any = False,
                   user: Any = False, stage: Any = "final", encrypted: Any = False,
                   size: Any = None, data: Any = None) -> Any:
        """VCPU.access as the API binds it: straight to ``access_checked`` when nothing
        around KVM_RUN needs Python (the VM alive and launched, no trace sink, no pending
        hypercall completion or interrupt, no MMIO size or data to attach); else
        ``slow_access``."""
        if self.quiet() and size is None and data is None:
            return self.access_checked(gpa, write, fetch, user, stage, encrypted,
                                       ACCESS_LOOP_LIMIT)
        return self.slow_access(gpa, write=write, fetch=fetch, user=user, stage=stage,
                                encrypted=encrypted, size=size, data=data)

    def access_checked(self, gpa: Any, write: Any, fetch: Any, user: Any, stage: Any,
                       encrypted: Any, limit: int) -> Any:
        """``access`` from the keyword arguments of ``VCPU.access``, checked by _args."""
        flags = _args.access(write, fetch, user, stage, encrypted)
        return self.access(_args.gpa(gpa, self.levels), flags, limit)

    def access_many(self, gpas: np.ndarray, flags: Any, limit: int,
                    out: tuple[np.ndarray, np.ndarray] | None = None) -> AccessBatch:
        """``access`` for each GPA in order (checked arrays), stopping at the first access
        that leaves to userspace (``.exit``); KVM_RUN failing raises KvmError, an access
        that does not settle RuntimeError, both naming the element.  ``out``: the
        checked ``(hpa, level)`` arrays to fill, else new zeroed ones."""
        n = len(gpas)
        if out is None:
            hpa = np.zeros(n, dtype=np.uint64)
            level = np.zeros(n, dtype=np.uint8)
        else:
            hpa, level = out
        per_element = isinstance(flags, np.ndarray)
        self.mutex.acquire()
        try:
            try:
                return self.run_batch(gpas, flags if per_element else None,
                                      0 if per_element else flags, per_element, hpa, level,
                                      limit)
            finally:
                self.leave_guest()
        finally:
            self.mutex.release()

    def run_batch(self, gpas: np.ndarray, fl: Any, f: int, per_element: bool, hpa: np.ndarray,
                  level: np.ndarray, limit: int) -> AccessBatch:
        """access_many's loop, holding the vCPU's mutex."""
        n = len(gpas)
        flags_list = fl.tolist() if per_element else []
        for i, gpa in enumerate(gpas.tolist()):
            status, value = self.vcpu_run(gpa, flags_list[i] if per_element else f, limit)
            if status != ACCESS_TRANSLATED:
                exit_ = self.outcome_of(status, value, gpa, f" (element {i})", limit)
                return AccessBatch(hpa, level, i, exit_)
            hpa[i], level[i] = value.value, value.level
        return AccessBatch(hpa, level, n, None)
