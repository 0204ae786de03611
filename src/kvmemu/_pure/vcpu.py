"""A vCPU's fault handling: exit handlers, kvm_mmu_page_fault, the access loop.

The twin of ``_vcpu.pxi``.  Models, from Linux 6.18: ``handle_ept_violation`` /
``__vmx_handle_ept_violation`` (vmx.c, vmx/common.h), ``tdx_handle_ept_violation``
(tdx.c), ``handle_ept_misconfig`` (vmx.c), ``npf_interception`` (svm.c),
``kvm_mmu_page_fault``, ``handle_mmio_page_fault``, ``kvm_mmu_do_page_fault``,
``kvm_tdp_mmu_page_fault``, ``fast_page_fault``, ``kvm_mmu_faultin_pfn`` and its
helpers, ``kvm_handle_noslot_fault``, ``is_page_fault_stale`` (mmu.c,
mmu_internal.h), and ``kvm_prepare_memory_fault_exit``.

The error code is the one carrier of the private/shared decision: intake sets
PFERR_PRIVATE_ACCESS (TDX: shared bit clear; SNP: GUEST_ENC), kvm_mmu_page_fault
sets it for SW_PROTECTED VMs from the attributes, and faultin compares it with
the attributes, exiting to userspace with KVM_EXIT_MEMORY_FAULT on a mismatch.
"""

from __future__ import annotations

import copy
import errno
from typing import Any, Callable

from .. import _args
from ..constants import (EPT_VIOLATION, KVM_MAX_HUGEPAGE_LEVEL, MEMORY_EXIT_FLAG_PRIVATE,
                         MMIO_SPTE_GEN_MASK, PAGE_SHIFT, PAGE_SIZE, PFERR, PG_LEVEL_4K,
                         TDX_LOCAL_RETRY_LIMIT, AccessFlags, ExitReason, MemFlag, RetPF)
from ..results import EptViolation, MemoryFaultExit, MmioExit, Translation
from .intake import svm_ec, vmx_ec
from .mmu import is_last_spte, is_shadow_present, mmio_spte_generation

_CONTINUE, _RETRY, _EMULATE, _INVALID = (RetPF.CONTINUE.value, RetPF.RETRY.value,
                                         RetPF.EMULATE.value, RetPF.INVALID.value)
_FIXED, _SPURIOUS = RetPF.FIXED.value, RetPF.SPURIOUS.value
_PF_PRESENT, _PF_WRITE, _PF_USER, _PF_RSVD, _PF_FETCH = (
    PFERR.PRESENT.value, PFERR.WRITE.value, PFERR.USER.value, PFERR.RSVD.value, PFERR.FETCH.value)
_PF_PRIVATE = PFERR.PRIVATE_ACCESS.value
_ACC_WRITE, _ACC_INSTR = EPT_VIOLATION.ACC_WRITE.value, EPT_VIOLATION.ACC_INSTR.value
_READONLY, _LOG_DIRTY = MemFlag.READONLY.value, MemFlag.LOG_DIRTY_PAGES.value
_WRITABLE = _PF_WRITE   # PT_WRITABLE_MASK: bit 1 in both SPTE formats
_WRITE_FLAG = AccessFlags.WRITE.value

#: The named points of the pipeline where ``stage_hook`` runs (see VCPUState).
STAGES = ("fault", "faultin", "map")


class FaultRecord:
    """struct kvm_page_fault: the facts of one fault, derived once (mmu_internal.h)."""

    __slots__ = ("addr", "error_code", "exec", "write", "present", "rsvd", "user", "prefetch",
                 "is_private", "nx_huge_page_workaround_enabled", "max_level", "req_level",
                 "goal_level", "gfn", "slot", "mmu_seq", "pfn", "map_writable",
                 "huge_page_disallowed")

    def __init__(self, addr: int, error_code: int, gfn: int, slot: Any, nx: bool) -> None:
        self.addr = addr
        self.error_code = error_code
        self.exec = bool(error_code & _PF_FETCH)
        self.write = bool(error_code & _PF_WRITE)
        self.present = bool(error_code & _PF_PRESENT)
        self.rsvd = bool(error_code & _PF_RSVD)
        self.user = bool(error_code & _PF_USER)
        self.prefetch = False
        self.is_private = bool(error_code & _PF_PRIVATE)
        self.nx_huge_page_workaround_enabled = nx
        self.max_level = KVM_MAX_HUGEPAGE_LEVEL
        self.req_level = PG_LEVEL_4K
        self.goal_level = PG_LEVEL_4K
        self.gfn = gfn
        self.slot = slot
        self.mmu_seq = 0
        self.pfn = 0
        self.map_writable = False
        self.huge_page_disallowed = False

    def access_allowed(self, fmt: Any, spte: int) -> bool:
        return fmt.access_allowed(self.exec, self.write, spte)


class VCPUState:
    """One vCPU: its exit handlers, kvm_run, MMIO cache and statistics.

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

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.stats = {"pf_taken": 0, "pf_fixed": 0, "pf_emulate": 0, "pf_spurious": 0,
                      "pf_mmio_spte_created": 0, "pf_fast": 0}
        self.exit_reason = ExitReason.UNKNOWN.value
        self.memory_fault = (0, 0, 0)      # flags, gpa, size
        self.mmio = (0, False)             # phys_addr, is_write
        self.mmio_gfn = 0
        self.mmio_gen = 0
        self.stage_hook: Callable[[str], Any] | None = None
        #: What the kvm_page_fault trace event reports: vcpu_id and the guest RIP.
        self.vcpu_id = 0
        self.rip = 0

    def _stage(self, name: str, fault: FaultRecord | None = None) -> bool:
        """Run the stage hook, if set; True if it deleted or moved ``fault``'s memslot."""
        if self.stage_hook is None:
            return False
        slot = None if fault is None else fault.slot
        base_gfn = None if slot is None else slot.base_gfn
        self.stage_hook(name)
        return slot is not None and (self.vm.slot_by_id(0, slot.id) is not slot
                                     or slot.base_gfn != base_gfn)

    # --- vendor entry points ----------------------------------------------------------------

    def handle_ept_violation(self, gpa: int, exit_qualification: int) -> int:
        """handle_ept_violation (VMX) / tdx_handle_ept_violation (TDX)."""
        cfg = self.vm.config
        if cfg.tdx:
            shared_bit = cfg.direct_bits_gfn << PAGE_SHIFT
            local_retry = not gpa & shared_bit
            if local_retry:    # private: handled as a write, the module's qualification ignored
                exit_qualification = _ACC_WRITE
            elif exit_qualification & _ACC_INSTR:
                return -errno.EIO    # KVM_BUG_ON: a fetch from shared memory
            self._trace_page_fault(gpa, exit_qualification)
            for _ in range(TDX_LOCAL_RETRY_LIMIT):
                r = self.page_fault(gpa, vmx_ec(exit_qualification, gpa, shared_bit))
                if r != _RETRY or not local_retry:
                    break
            return r
        self._trace_page_fault(gpa, exit_qualification)
        return self.page_fault(gpa, vmx_ec(exit_qualification, gpa, 0))

    def _trace_page_fault(self, gpa: int, error_code: int) -> None:
        """trace_kvm_page_fault: VMX passes the raw exit qualification (TDX: 0x2 for a
        private GPA), SVM the error code with PRIVATE_ACCESS synthesized."""
        tracer = self.vm.mmu.tracer
        if tracer is not None:
            tracer.page_fault(self.vcpu_id, self.rip, gpa, error_code)

    def handle_ept_misconfig(self, gpa: int) -> int:
        """handle_ept_misconfig: a reserved-bit fault, i.e. the MMIO path."""
        if self.vm.config.tdx:
            return -errno.EIO        # a real EPT misconfig TD exit is a KVM bug
        return self.page_fault(gpa, _PF_RSVD)

    def handle_npf(self, gpa: int, exit_info_1: int) -> int:
        """npf_interception.  Without an RMP model, sev_handle_rmp_fault finds no
        assigned RMP entry and does nothing, as KVM does in that case."""
        error_code = svm_ec(exit_info_1, self.vm.config.snp)
        self._trace_page_fault(gpa, error_code)
        return self.page_fault(gpa, error_code)

    # --- kvm_mmu_page_fault ------------------------------------------------------------------

    def page_fault(self, gpa: int, error_code: int) -> int:
        """kvm_mmu_page_fault (mmu.c)."""
        vm = self.vm
        if (vm.config.sw_protected and not error_code & _PF_RSVD
                and vm.is_private(gpa >> PAGE_SHIFT)):
            error_code |= _PF_PRIVATE
        self._stage("fault")
        r = _INVALID
        if error_code & _PF_RSVD:
            if error_code & _PF_PRIVATE:
                return -errno.EFAULT
            r = self._handle_mmio_page_fault(gpa)
            if r == _EMULATE:
                return r
        if r == _INVALID:
            self.stats["pf_taken"] += 1
            r = self._do_page_fault(gpa, error_code)
        if r < 0:
            return r
        if r == _FIXED:
            self.stats["pf_fixed"] += 1
        elif r == _EMULATE:
            self.stats["pf_emulate"] += 1
        elif r == _SPURIOUS:
            self.stats["pf_spurious"] += 1
        return r

    def _handle_mmio_page_fault(self, gpa: int) -> int:
        """handle_mmio_page_fault: the vCPU's MMIO cache, then the MMIO SPTE."""
        vm = self.vm
        generation = vm.generation[0]
        if self.mmio_gen == generation and self.mmio_gfn and self.mmio_gfn == gpa >> PAGE_SHIFT:
            return _EMULATE
        mmu = vm.mmu
        _, _, _, spte = mmu.last_spte(mmu.direct, (gpa >> PAGE_SHIFT) & ~vm.config.direct_bits_gfn)
        if mmu.fmt.is_mmio_spte(spte):
            if mmio_spte_generation(spte) != generation & MMIO_SPTE_GEN_MASK:
                return _INVALID
            self._cache_mmio_info(gpa >> PAGE_SHIFT)
            return _EMULATE
        return _RETRY

    def _cache_mmio_info(self, gfn: int) -> None:
        """vcpu_cache_mmio_info (gva 0 for TDP)."""
        self.mmio_gfn = gfn
        self.mmio_gen = self.vm.generation[0]

    def _do_page_fault(self, gpa: int, error_code: int) -> int:
        """kvm_mmu_do_page_fault: the fault record, then the TDP handler."""
        vm = self.vm
        gfn = (gpa >> PAGE_SHIFT) & ~vm.config.direct_bits_gfn
        fault = FaultRecord(gpa, error_code, gfn, vm.find_slot(0, gfn), vm.config.nx_huge_pages)
        r = self._tdp_page_fault(fault)
        if r == _EMULATE and fault.is_private:     # KVM cannot emulate private memory
            return self._memory_fault_exit(fault)
        return r

    def _memory_fault_exit(self, fault: FaultRecord) -> int:
        """kvm_mmu_prepare_memory_fault_exit: KVM_EXIT_MEMORY_FAULT, return -EFAULT."""
        self.exit_reason = ExitReason.MEMORY_FAULT.value
        flags = MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
        self.memory_fault = (flags, fault.gfn << PAGE_SHIFT, PAGE_SIZE)
        return -errno.EFAULT

    def _tdp_page_fault(self, fault: FaultRecord) -> int:
        """kvm_tdp_mmu_page_fault."""
        r = self._fast_page_fault(fault)
        if r != _INVALID:
            return r
        r = self._faultin_pfn(fault)
        if r != _CONTINUE:
            return r
        if self._stage("map", fault):
            return _RETRY                               # the memslot was deleted or moved
        vm = self.vm
        if fault.slot is not None and vm.invalidate_retry_gfn(fault.mmu_seq, fault.gfn):
            return _RETRY                               # is_page_fault_stale
        mmu = vm.mmu
        root = mmu.root_for(fault.addr, vm.config.direct_bits_gfn << PAGE_SHIFT)
        return mmu.map(fault, root, vm.generation[0], self.stats)

    def _fast_page_fault(self, fault: FaultRecord) -> int:
        """fast_page_fault: only present faults can be fast with A/D bits enabled."""
        vm = self.vm
        if fault.rsvd:
            return _INVALID
        if vm.has_private_mem and fault.is_private != vm.is_private(fault.gfn):
            return _INVALID
        if not fault.present or not fault.write:
            return _INVALID
        mmu = vm.mmu
        table, index, level, spte = mmu.last_spte(mmu.direct, fault.gfn)
        r = _INVALID
        if is_shadow_present(spte) and is_last_spte(spte, level):
            if fault.access_allowed(mmu.fmt, spte):
                r = _SPURIOUS
            elif spte & mmu.fmt.mmu_writable and not (
                    level > PG_LEVEL_4K and fault.slot is not None
                    and fault.slot.flags & _LOG_DIRTY):
                mmu.fast_fix(mmu.direct, table, index, spte | _WRITABLE)
                r = _FIXED
        if r != _INVALID:
            self.stats["pf_fast"] += 1
        return r

    # --- kvm_mmu_faultin_pfn --------------------------------------------------------------------

    def _faultin_pfn(self, fault: FaultRecord) -> int:
        vm = self.vm
        fault.mmu_seq = vm.mmu_invalidate_seq
        if fault.is_private != vm.is_private(fault.gfn):
            return self._memory_fault_exit(fault)
        slot = fault.slot
        if slot is None:
            return self._handle_noslot_fault(fault)
        if self._stage("faultin", fault):
            return _RETRY                   # the memslot was deleted or moved
        if vm.invalidate_retry_gfn(fault.mmu_seq, fault.gfn):
            return _RETRY
        if fault.is_private or slot.gmem_only:
            if slot.gmem_id < 0:
                return self._memory_fault_exit(fault)
            fault.pfn = vm.gmem_pfn(slot, fault.gfn)
            fault.map_writable = not slot.flags & _READONLY
            fault.max_level = PG_LEVEL_4K   # kvm_max_level_for_order(0): mainline order is 0
        else:
            if slot.flags & _READONLY and fault.write:
                return _EMULATE             # KVM_PFN_ERR_RO_FAULT → kvm_handle_error_pfn
            fault.pfn = (slot.userspace_addr >> PAGE_SHIFT) + (fault.gfn - slot.base_gfn)
            fault.map_writable = not slot.flags & _READONLY
        if vm.invalidate_retry_gfn(fault.mmu_seq, fault.gfn):
            return _RETRY
        return _CONTINUE

    def _handle_noslot_fault(self, fault: FaultRecord) -> int:
        """kvm_handle_noslot_fault: private → memory fault; shared → MMIO."""
        if fault.is_private:
            return self._memory_fault_exit(fault)
        self._cache_mmio_info(fault.gfn)
        if fault.gfn > self.vm.max_gfn:
            return _EMULATE                 # cannot encode an MMIO SPTE
        return _CONTINUE

    # --- the access loop ------------------------------------------------------------------------

    def access_checked(self, gpa: Any, write: Any, fetch: Any, user: Any, stage: Any,
                       encrypted: Any, limit: int) -> Any:
        """``access`` from the keyword arguments of ``VCPU.access``, checked by _args."""
        flags = _args.access(write, fetch, user, stage, encrypted)
        return self.access(_args.gpa(gpa, self.vm.mmu.levels), flags, limit)

    def access_many(self, gpas: Any, flags: Any, hpa: Any, level: Any, limit: int) -> Any:
        """``access`` for each GPA in order into ``hpa``/``level``; returns ``(count,
        outcome)``: outcome None (all translated), the exit object, a negative errno, or 0
        when element ``count`` did not settle."""
        per_element = flags.tolist() if not isinstance(flags, int) else None
        for i, gpa in enumerate(gpas.tolist()):
            result = self.access(gpa, flags if per_element is None else per_element[i], limit)
            if type(result) is not Translation:
                return i, 0 if result is None else result
            hpa[i], level[i] = result.hpa, result.level
        return len(gpas), None

    def clone(self, vm: Any) -> "VCPUState":
        """This vCPU's state, attached to ``vm`` (a clone of its VM state)."""
        twin = copy.copy(self)
        twin.vm = vm
        twin.stats = dict(self.stats)
        return twin

    def access(self, gpa: int, flags: int, limit: int) -> Any:
        """Walk, exit, handle, resume until the access translates or leaves to userspace."""
        vm = self.vm
        cfg = vm.config
        shared_bit = cfg.direct_bits_gfn << PAGE_SHIFT
        self.exit_reason = ExitReason.UNKNOWN.value    # vcpu_run: each KVM_RUN starts afresh
        for _ in range(limit):
            private_walk = cfg.tdx and not gpa & shared_bit
            tables = vm.mmu.mirror.pt if private_walk else vm.mmu.direct.pt
            result = tables._translate(gpa, flags)
            if type(result) is Translation:
                return result
            if cfg.ept:
                if type(result) is EptViolation:
                    r = self.handle_ept_violation(gpa, result.exit_qualification)
                else:
                    r = self.handle_ept_misconfig(gpa)
            else:
                r = self.handle_npf(gpa, result.exit_info_1)
            if r < 0:
                if r == -errno.EFAULT and self.exit_reason == ExitReason.MEMORY_FAULT.value:
                    return MemoryFaultExit(*self.memory_fault)
                return r
            if r == _EMULATE:
                self.exit_reason = ExitReason.MMIO.value
                self.mmio = (gpa & ~shared_bit, bool(flags & _WRITE_FLAG))
                return MmioExit(*self.mmio)
        return None
