"""The API layer: ``VM``, ``VCPU``, ``GuestMemfd``, ``MemSlot``, ``Snapshot``, ``KvmRun``.

This layer sits above the cores and no core imports it.  ``VM`` is the ioctl
boundary: it converts and checks arguments once, runs KVM's validation in KVM's
order with KVM's errnos (KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2,
KVM_SET_MEMORY_ATTRIBUTES), and hands values KVM would accept to the VM's
memory bookkeeping (``kvmemu._memory.VMMemory``, written once) and to one
core's ``VCPUState``, ``TdpMmu`` and ``Memslots``.  ``bind(core, name)`` makes
the classes of one implementation (``kvmemu._select`` calls it); the cores
raise ``KvmError`` and ``RuntimeError`` themselves, so nothing here decodes a
result.
"""

from __future__ import annotations

import errno
import functools
import threading
from types import ModuleType
from typing import Any, Callable, NamedTuple, TypeVar

import numpy as np

from . import _args, _invariants
from ._host import Host, host_config
from ._hypercall import (NO_HYPERCALL, HypercallRun, complete_hypercall, emulate_hypercall,
                         snp_begin_psc_msr, snp_page_state_change, tdx_map_gpa)
from . import _launch, _snapshot
from ._memory import GmemBindings, Held, Slot, VMConfig, VMMemory
from .constants import (ACCESS_LOOP_LIMIT, KVM_INTERNAL_MEMSLOT_FLAGS, KVM_MEM_MAX_NR_PAGES,
                        KVM_MEM_SLOTS_NUM, KVM_MEMSLOT_GMEM_ONLY,
                        KVM_USER_MEM_SLOTS, PAGE_SHIFT, PAGE_SIZE, PF_STAT_NAMES, PG_LEVEL_1G,
                        PG_LEVEL_2M, PG_LEVEL_4K, TDX_GPAW_SHARED_BIT, ExitReason,
                        GuestMemfdFlag, KVM_X86_VALID_QUIRKS, DirtyLogManual, MemAttr, MemFlag,
                        KVM_EXIT_HYPERCALL_VALID_MASK, Quirk, VMType, FRAME_GPA_MASK,
                        KVM_SEV_SNP_PAGE_TYPE_NORMAL, SNP_GUEST_ASID, FrameState, VmCounter,
                        PT_LEVEL_BITS, ZapReason)
from .errors import KvmError
from .results import (AccessBatch, EptMisconfig, EptViolation, HypercallExit,
                      MemoryFaultExit, MmioExit,
                      NestedPageFault, RmpEntry, Translation)

_SVM_TYPES = (VMType.SEV, VMType.SEV_ES, VMType.SNP)
_PRIVATE_MEM_TYPES = (VMType.SW_PROTECTED, VMType.SNP, VMType.TDX)
_PROTECTED_STATE_TYPES = (VMType.SEV_ES, VMType.SNP, VMType.TDX)
_PAGE_MASK = PAGE_SIZE - 1
_U64 = (1 << 64) - 1
_LOFF_MAX = (1 << 63) - 1


_F = TypeVar("_F", bound=Callable[..., Any])
#: ZapReason values as on_zap reports them.
_ZAP_REASONS = {r.value: r.name.lower() for r in ZapReason}


def _locked(method: _F) -> _F:
    """One at a time per VM (kvm->slots_lock), then the trace events it made go to the
    sink."""
    @functools.wraps(method)
    def locked(self: "VM", *args: Any, **kwargs: Any) -> Any:
        try:
            with self._lock:
                result = method(self, *args, **kwargs)
        except BaseException:
            self._flush_trace(raise_errors=False)
            raise
        self._flush_trace()
        return result
    return locked  # type: ignore[return-value]


def _ioctl(method: _F) -> _F:
    """A VM ioctl (kvm_vm_ioctl, kvm_main.c, 6.18): EIO once the VM is dead, else as
    ``_locked``."""
    inner = _locked(method)

    @functools.wraps(method)
    def ioctl(self: "VM", *args: Any, **kwargs: Any) -> Any:
        self._check_alive()
        return inner(self, *args, **kwargs)
    return ioctl  # type: ignore[return-value]


def _einval(message: str) -> KvmError:
    return KvmError(errno.EINVAL, message)


class GuestMemfd:
    """A guest_memfd file (KVM_CREATE_GUEST_MEMFD), a handle owned by one VM.

    ``size`` and ``flags`` are what it was created with; ``index`` is its number
    in the VM (creation order), which places its pages in host frames
    ``base + ((index * file_pages + page) mod base)``: on the default host
    ``GMEM_PFN_BASE`` and ``GMEM_FILE_PAGES``, in general the upper half of the host's
    physical space and an eighth of it at most per file.
    """

    __slots__ = ("_owner", "_vm", "_frame", "index", "size", "flags")

    def __init__(self, owner: object, vm: "VM", index: int, size: int, flags: int,
                 frame: Any) -> None:
        self._owner = owner
        self._vm = vm
        self._frame = frame         # the core's gmem_frame
        self.index = index
        self.size = size
        self.flags = flags

    @property
    def closed(self) -> bool:
        """The file was closed (``close``)."""
        return self.index in self._vm._memory.gmem_closed_files

    def punch_hole(self, offset: Any, size: Any) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) (vfs_fallocate, then
        kvm_gmem_fallocate and kvm_gmem_punch_hole, guest_memfd.c, 6.18): EBADF for a
        closed file; EINVAL for an offset negative as a loff_t or a size not above 0;
        EFBIG past the largest file size; EINVAL for an unaligned range.  Then an
        invalidation of the bound memslots' gfns in the range (mmu_invalidate_seq moves
        once if a slot is bound there): their private mappings are zapped (the shared
        ones for an INIT_SHARED file; a VM other than a TD has one root and loses both),
        and the pages are freed: a later fault allocates them again (in the model, at
        the same frames)."""
        self._vm._gmem_invalidate(self, _args.u64("offset", offset), _args.u64("size", size),
                                  close=False)

    def close(self) -> None:
        """The last close of the file (kvm_gmem_release, guest_memfd.c, 6.18): every
        bound memslot loses its file (a later fault on its guest_memfd memory fails with
        KVM_EXIT_MEMORY_FAULT), inside an invalidation that zaps what the file backed.
        The memory stays with the inode; binding the closed file again, punching it or
        closing it again is EBADF."""
        self._vm._gmem_invalidate(self, 0, 0, close=True)

    def pfn(self, page: Any) -> int:
        """The host frame backing page ``page`` of the file (ValueError beyond its end)."""
        page = _args.u64("page", page)
        if page >= self.size >> PAGE_SHIFT:
            raise ValueError(f"page {page} is beyond the guest_memfd's "
                             f"{self.size >> PAGE_SHIFT} pages")
        return int(self._frame(self.index, page))   # gmem_frame with the VM's layout

    def __repr__(self) -> str:
        return f"GuestMemfd(index={self.index}, size={self.size:#x}, flags={self.flags:#x})"


class HostInvalidation:
    """An MMU-notifier invalidation of host memory in progress (``VM.invalidate_host_range``):
    ``end()`` (or leaving a ``with`` block) finishes it, once."""

    __slots__ = ("_vm", "_memory", "_found", "_ended", "_thread", "hva", "size")

    def __init__(self, vm: "VM", memory: VMMemory, found: bool, hva: int, size: int) -> None:
        self._vm = vm
        self._memory = memory
        self._thread = threading.get_ident()
        self._found = found
        self._ended = False
        self.hva = hva
        self.size = size

    @property
    def active(self) -> bool:
        """Not ended yet."""
        return not self._ended

    def end(self) -> None:
        """kvm_mmu_notifier_invalidate_range_end: if the start found a memslot,
        mmu_invalidate_seq + 1 and mmu_invalidate_in_progress - 1.  A second end() is a
        RuntimeError.  After a ``restore`` the VM's state no longer holds this
        invalidation, and ending it changes nothing there."""
        with self._vm._lock:
            if self._ended:
                raise RuntimeError("this host invalidation has ended already")
            self._ended = True
            self._vm._host_invalidations.discard(self)
            if self._found:
                self._memory.invalidate_host_range_end()
            self._vm._invalidations_done.notify_all()
        self._vm._flush_trace()

    def __enter__(self) -> "HostInvalidation":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._ended:
            self.end()

    def __repr__(self) -> str:
        state = "active" if not self._ended else "ended"
        return f"HostInvalidation(hva={self.hva:#x}, size={self.size:#x}, {state})"


class MemSlot(NamedTuple):
    """A read-only view of one memslot (the fields of KVM_SET_USER_MEMORY_REGION2)."""

    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    flags: int
    guest_memfd: GuestMemfd | None
    guest_memfd_offset: int
    host_level: int

    @property
    def base_gfn(self) -> int:
        return self.guest_phys_addr >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return self.memory_size >> PAGE_SHIFT


class VM:
    """A KVM virtual machine: its type, memslots, guest_memfd files and memory attributes.

    ``VM(vm_type=VMType.DEFAULT, *, vendor=None, gpaw=48, nx_huge_pages=False)``.

    * ``vendor`` is ``"vmx"`` or ``"svm"``; SEV, SEV_ES and SNP imply ``"svm"``, TDX
      implies ``"vmx"``, DEFAULT and SW_PROTECTED default to ``"vmx"``; a
      contradiction is a ValueError.
    * ``gpaw`` is the guest physical-address width, 48 or 52.  For TDX it picks the
      shared bit (47 or 51) and 4- or 5-level EPT; for other VMs it picks the TDP root
      level the way kvm_mmu_get_tdp_level does (5 levels only for a 52-bit guest).
    * ``nx_huge_pages`` turns on the iTLB-multihit NX huge page workaround.

    * ``eager_page_split`` is the module parameter of that name (dirty logging).
    * ``host`` is the machine KVM runs on (``Host()``: 4-level paging, MAXPHYADDR 48,
      EPT A/D bits and PML, memory encryption for SEV VMs); a VM it cannot run is a
      ValueError.  Every host has SMM (two memslot address spaces for VMs without
      private memory).
    """

    _core: Any = None  # the core module; set by each implementation's subclass (bind)

    def __init__(self, vm_type: Any = VMType.DEFAULT, *, vendor: Any = None, gpaw: Any = 48,
                 nx_huge_pages: Any = False, eager_page_split: Any = True,
                 host: Any = None) -> None:
        vm_type = _args.enum_member("vm_type", vm_type, VMType)
        implied = "svm" if vm_type in _SVM_TYPES else "vmx" if vm_type == VMType.TDX else None
        if vendor is not None and not isinstance(vendor, str):
            raise TypeError(f"vendor must be 'vmx', 'svm' or None, not {type(vendor).__name__}")
        if vendor not in (None, "vmx", "svm"):
            raise ValueError(f"vendor must be 'vmx' or 'svm', not {vendor!r}")
        if implied is not None and vendor not in (None, implied):
            raise ValueError(f"vendor {vendor!r} contradicts vm_type {vm_type.name}, which runs "
                             f"on {implied}")
        if host is None:
            host = Host()
        if not isinstance(host, Host):
            raise TypeError(f"host must be a Host, not {type(host).__name__}")
        self.vm_type: VMType = vm_type
        self.vendor: str = vendor or implied or "vmx"
        #: The machine KVM runs on, and what KVM derives from it for this VM.
        self.host: Host = host
        self._host = host_config(host, vm_type, self.vendor)
        self.gpaw: int = _args.gpaw(gpaw)
        self.nx_huge_pages: bool = _args.flag("nx_huge_pages", nx_huge_pages)
        #: The eager_page_split module parameter (x86.c, default on).
        self.eager_page_split: bool = _args.flag("eager_page_split", eager_page_split)
        self.has_private_mem: bool = vm_type in _PRIVATE_MEM_TYPES
        self.has_protected_state: bool = vm_type in _PROTECTED_STATE_TYPES
        #: The TDX shared bit as a GPA mask (gfn_to_gpa(kvm_gfn_direct_bits)); 0 if not a TD.
        self.shared_bit: int = TDX_GPAW_SHARED_BIT[self.gpaw] if vm_type == VMType.TDX else 0
        #: kvm_arch_nr_memslot_as_ids: SMM's second address space only without private memory.
        self.nr_memslot_as_ids: int = 1 if self.has_private_mem else 2
        self._token = object()
        #: The creation arguments, resolved: what a snapshot's bytes carry, and what a VM
        #: must have been created with to take a snapshot of another VM.
        self._creation = {"vm_type": int(vm_type), "vendor": self.vendor, "gpaw": self.gpaw,
                          "nx_huge_pages": self.nx_huge_pages,
                          "eager_page_split": self.eager_page_split,
                          "host": list(host._key())}
        self._gmem: list[GuestMemfd] = []
        # Per guest_memfd index: its bindings, {(as_id, slot id): (first page, end page)}.
        self._gmem_bindings: dict[int, GmemBindings] = {}
        # kvm_mmu_get_tdp_level: 5-level EPT only for a guest wider than 48 bits (TDX: the
        # GPAW picks it); NPT follows the host's paging (get_npt_level).
        self.tdp_levels: int = ((5 if self.gpaw == 52 else 4) if self.vendor == "vmx"
                                else self._host.npt_levels)
        #: kvm->arch.cpu_dirty_log_size != 0: vmx_vm_init sets it when enable_pml (the
        #: host has PML and EPT A/D bits); not for a TD, not on SVM.
        self.pml: bool = self._host.pml
        self._config = VMConfig(self.vendor == "vmx", vm_type == VMType.TDX,
                                vm_type == VMType.SW_PROTECTED, vm_type == VMType.SNP,
                                self.has_private_mem, self.nr_memslot_as_ids, self.tdp_levels,
                                self.shared_bit >> PAGE_SHIFT, self.nx_huge_pages,
                                default_vm=vm_type == VMType.DEFAULT, pml=self.pml,
                                eager_page_split=self.eager_page_split,
                                pre_fault_allowed=vm_type not in (VMType.SNP, VMType.TDX),
                                ad_enabled=self._host.ad_enabled,
                                mmio_caching=self._host.mmio_caching,
                                npt_mmio_value=self._host.npt_mmio_mask,
                                max_gfn=self._host.max_gfn,
                                table_maxphyaddr=self._host.table_maxphyaddr,
                                pfn_mask=self._host.pfn_mask, gmem_base=self._host.gmem_base,
                                gmem_file_pages=self._host.gmem_file_pages)
        self._memory = VMMemory(self._core, self._config)
        # kvm_arch_init_vm (x86.c, 6.18): disabled_quirks = inapplicable_quirks &
        # supported_quirks.  Inapplicable are KVM_X86_CONDITIONAL_QUIRKS (CD_NW_CLEARED,
        # IGNORE_GUEST_PAT) less what the vendor applies: vmx_hardware_setup keeps
        # IGNORE_GUEST_PAT (the modelled host has self-snoop), svm_hardware_setup
        # CD_NW_CLEARED.  tdx_vm_init then disables IGNORE_GUEST_PAT for a TD.
        initial = Quirk.CD_NW_CLEARED if self.vendor == "vmx" else Quirk.IGNORE_GUEST_PAT
        if vm_type == VMType.TDX:
            initial |= Quirk.IGNORE_GUEST_PAT
        self._memory.disable_quirks(initial.value)
        self._vcpus: list[VCPU] = []
        self._hypercall_exit_enabled = 0
        #: Host invalidations begun and not ended (a snapshot cannot hold one).
        self._host_invalidations: set[HostInvalidation] = set()
        self._tracer: Any = None
        #: VM.on_zap, and the zaps the VM itself reports (a restore), not yet delivered.
        self._on_zap: Callable[[int, int, int, str], Any] | None = None
        self._vm_zaps: list[tuple[int, int, int, int]] = []
        #: Serialises the ioctls of this VM (kvm->slots_lock); faults do not take it.
        self._lock = threading.RLock()
        #: Signalled when a host invalidation ends (memslot changes wait for them all).
        self._invalidations_done = threading.Condition(self._lock)

    def __reduce__(self) -> Any:
        raise TypeError("a VM cannot be copied or pickled (it owns vCPUs and tables); "
                        "use snapshot() and restore()")

    def __repr__(self) -> str:
        return (f"VM({self.vm_type.name}, vendor={self.vendor!r}, gpaw={self.gpaw}, "
                f"memslots={len(self._memory.slots(0))})")

    # --- capabilities -------------------------------------------------------------------

    @property
    def supported_memory_attributes(self) -> int:
        """kvm_supported_mem_attributes: PRIVATE for VMs with private memory, else 0."""
        return MemAttr.PRIVATE.value if self.has_private_mem else 0

    @_ioctl
    def disable_quirks(self, mask: Any) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2) (kvm_vm_ioctl_enable_cap, x86.c, 6.18):
        EINVAL for a bit outside kvm_caps.supported_quirks (KVM_X86_VALID_QUIRKS here),
        else the bits join ``disabled_quirks``; a quirk cannot be enabled again.  What
        the model reads: SLOT_ZAP_ALL (memslot delete/move on DEFAULT VMs) and
        IGNORE_GUEST_PAT (IPAT in EPT leaves made from now on)."""
        value = _args.u64("mask", mask)
        if value & ~KVM_X86_VALID_QUIRKS:
            raise KvmError(errno.EINVAL, f"quirk bits {value & ~KVM_X86_VALID_QUIRKS:#x} "
                                         f"are not supported")
        self._memory.disable_quirks(value)

    @_ioctl
    def enable_exit_hypercall(self, mask: Any) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) (kvm_vm_ioctl_enable_cap, x86.c, 6.18):
        the hypercalls that exit to userspace; only ``1 << KVM_HC_MAP_GPA_RANGE`` exists
        (EINVAL for any other bit).  The mask replaces the previous one."""
        value = _args.u64("mask", mask)
        if value & ~KVM_EXIT_HYPERCALL_VALID_MASK:
            raise KvmError(errno.EINVAL, f"hypercall bits {value & ~KVM_EXIT_HYPERCALL_VALID_MASK:#x} "
                                         f"cannot exit to userspace")
        self._hypercall_exit_enabled = value

    @property
    def hypercall_exit_enabled(self) -> int:
        """kvm->arch.hypercall_exit_enabled."""
        return self._hypercall_exit_enabled

    # --- the launch of a confidential VM (API section 9) --------------------------------

    @property
    def dead(self) -> bool:
        """kvm->vm_dead: KVM killed the VM (kvm_vm_dead); every ioctl now fails with EIO."""
        return bool(self._memory.counters[VmCounter.VM_DEAD])

    def _check_alive(self) -> None:
        if self.dead:
            raise KvmError(errno.EIO, "the VM is dead (kvm_vm_dead): KVM refuses every ioctl")

    def _enter_guest(self) -> None:
        """What a KVM_RUN of any vCPU checks first: EIO on a dead VM; a TD or SNP guest
        whose launch was never ended ends it now (_launch_implicitly)."""
        self._check_alive()
        if not _launch.launched(self._memory):
            self._launch_implicitly()

    @property
    def launched(self) -> bool:
        """The launch is over: a TD is runnable (KVM_TDX_FINALIZE_VM), an SNP guest's
        launch finished (KVM_SEV_SNP_LAUNCH_FINISH), or the VM has no launch at all."""
        return _launch.launched(self._memory)

    @property
    def pre_fault_allowed(self) -> bool:
        """kvm->arch.pre_fault_allowed: KVM_PRE_FAULT_MEMORY is not EOPNOTSUPP."""
        return bool(self._memory.counters[VmCounter.PRE_FAULT_ALLOWED])

    def _launch_implicitly(self) -> None:
        """A vCPU of a TD or SNP guest whose launch was never ended runs: the launch ends
        as if the program had ended it, and the modelled guest accepts / validates its
        private pages on first touch (kvmemu._launch.finish_launch)."""
        with self._lock:
            if not _launch.launched(self._memory):
                _launch.finish_launch(self._memory, implicit=True)
                self._protect_vmsas()

    def _protect_vmsas(self) -> None:
        for vcpu in self._vcpus:
            vcpu._state_protected = True

    def _first_vcpu(self, ioctl: str) -> "VCPU":
        if not self._vcpus:
            raise KvmError(errno.EINVAL, f"{ioctl} is a vCPU ioctl: the VM has no vCPU")
        return self._vcpus[0]

    @_ioctl
    def tdx_init_mem_region(self, gpa: Any, size: Any, *, measure: Any = False) -> int:
        """KVM_TDX_INIT_MEM_REGION (tdx_vcpu_init_mem_region, vmx/tdx.c, 6.18; in the
        kernel a vCPU ioctl: it runs on the VM's first vCPU, EINVAL without one): add
        [gpa, gpa + size) to the TD's initial memory, a page at a time: the private GPA
        is mapped in the mirror root and the page added with TDH.MEM.PAGE.ADD, already
        accepted.  ``measure``: KVM_TDX_MEASURE_MEMORY_REGION (TDH.MR.EXTEND, not modelled
        further).  Errors (KvmError): EINVAL after finalize, for an unaligned or empty
        range or one with the shared bit, no guest_memfd memslot, memory not PRIVATE in
        the attributes; EEXIST for a page already added or faulted in; EFAULT for a closed
        guest_memfd.  Returns 0 (the pages left)."""
        if self.vm_type != VMType.TDX:       # vt_vcpu_mem_enc_ioctl; SVM has no such hook
            raise KvmError(errno.EINVAL if self.vendor == "vmx" else errno.ENOTTY,
                           "KVM_TDX_INIT_MEM_REGION is for a TD")
        g, n = _args.u64("gpa", gpa), _args.u64("size", size)
        flags = int(_args.flag("measure", measure))
        if n & _PAGE_MASK:
            raise _einval(f"KVM_TDX_INIT_MEM_REGION size {n:#x} is not a multiple of the page size")
        vcpu = self._first_vcpu("KVM_TDX_INIT_MEM_REGION")
        with _held(vcpu._mutex):
            return _launch.tdx_init_mem_region(self._memory, vcpu._c, self.shared_bit, g,
                                               n >> PAGE_SHIFT, flags) << PAGE_SHIFT

    @_ioctl
    def tdx_finalize_vm(self) -> None:
        """KVM_TDX_FINALIZE_VM (tdx_td_finalize, vmx/tdx.c, 6.18): the TD becomes runnable:
        KVM_PRE_FAULT_MEMORY works, KVM_TDX_INIT_MEM_REGION and a second finalize fail
        with EINVAL, and private pages faulted in from now on are PENDING until the guest
        accepts them (``VCPU.tdx_accept``)."""
        if self.vm_type != VMType.TDX:
            raise KvmError(errno.ENOTTY, "KVM_TDX_FINALIZE_VM is for a TD")
        _launch.tdx_finalize_vm(self._memory)

    @_ioctl
    def snp_launch_update(self, gpa: Any, size: Any,
                          page_type: Any = KVM_SEV_SNP_PAGE_TYPE_NORMAL) -> int:
        """KVM_SEV_SNP_LAUNCH_UPDATE (snp_launch_update, svm/sev.c, 6.18): encrypt
        [gpa, gpa + size) into the guest's initial memory: each page's RMP entry is
        assigned to the guest for its GPA and validated by the firmware.  EINVAL for a VM
        that is not SNP, an empty or unaligned size, an unknown ``page_type``, or no
        guest_memfd memslot at ``gpa``; EIO when the first page fails (already populated
        or faulted in, not PRIVATE in the attributes, a closed guest_memfd, or the launch
        finished).  Returns the bytes left: after progress an error stops it early, and
        the next call from there reports it."""
        g, n = _args.u64("gpa", gpa), _args.u64("size", size)
        t = _args.u64("page_type", page_type)
        if self.vm_type != VMType.SNP:
            if self.vm_type in (VMType.SEV, VMType.SEV_ES):
                raise KvmError(errno.EINVAL, "KVM_SEV_SNP_LAUNCH_UPDATE needs an SNP guest")
            raise KvmError(errno.ENOTTY, "KVM_SEV_SNP_LAUNCH_UPDATE needs an SEV guest")
        return _launch.snp_launch_update(self._memory, g, n, t)

    @_ioctl
    def snp_launch_finish(self) -> None:
        """KVM_SEV_SNP_LAUNCH_FINISH (snp_launch_finish, svm/sev.c, 6.18): the vCPUs' VMSAs
        become protected (EINVAL if one already is: a second finish with a vCPU) and
        KVM_PRE_FAULT_MEMORY works.  ENOTTY for a VM that is not SNP.  Private pages the
        guest gets from now on must be validated with ``VCPU.pvalidate`` before use."""
        if self.vm_type != VMType.SNP:
            raise KvmError(errno.ENOTTY, "KVM_SEV_SNP_LAUNCH_FINISH needs an SNP guest")
        if any(vcpu._state_protected for vcpu in self._vcpus):
            raise KvmError(errno.EINVAL, "KVM_SEV_SNP_LAUNCH_FINISH: a vCPU's state is "
                                         "already protected (sev_es_sync_vmsa)")
        _launch.snp_launch_finish(self._memory)
        self._protect_vmsas()

    def rmp_entry(self, pfn: Any) -> RmpEntry:
        """The RMP entry of host frame ``pfn`` (snp_lookup_rmpentry): what guest_memfd's
        prepare and invalidate (sev_gmem_prepare, sev_gmem_invalidate), launch update and
        the guest's PVALIDATE made of it.  A frame KVM never assigned reads as all zero
        (4K, not assigned).  Only for an SNP VM (ValueError)."""
        if self.vm_type != VMType.SNP:
            raise ValueError("only an SEV-SNP VM has RMP entries")
        p = _args.u64("pfn", pfn)
        state = self._memory.memslots.frame(p)
        assigned = bool(state & FrameState.RMP_ASSIGNED.value)
        return tuple.__new__(RmpEntry, (
            assigned, SNP_GUEST_ASID if assigned else 0, state & FRAME_GPA_MASK,
            PG_LEVEL_2M if state & FrameState.RMP_PAGESIZE_2M.value else PG_LEVEL_4K,
            bool(state & FrameState.RMP_VALIDATED.value),
            bool(state & FrameState.RMP_IMMUTABLE.value)))

    @property
    def disabled_quirks(self) -> Quirk:
        """kvm->arch.disabled_quirks."""
        return Quirk(self._memory.disabled_quirks)

    @property
    def readonly_mem(self) -> bool:
        """kvm_arch_has_readonly_mem: no READONLY memslots for protected-state VMs."""
        return not self.has_protected_state

    # --- KVM_CREATE_GUEST_MEMFD ---------------------------------------------------------

    @_ioctl
    def create_guest_memfd(self, size: Any, flags: Any = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD (kvm_gmem_create, Linux 6.18).

        EINVAL for flags other than MMAP (and INIT_SHARED on VMs without private
        memory), and for a size that is zero, negative as a loff_t, or not
        page-aligned.
        """
        size = _args.u64("size", size)
        flags = _args.u64("flags", flags)
        supported = GuestMemfdFlag.MMAP.value
        if not self.has_private_mem:
            supported |= GuestMemfdFlag.INIT_SHARED.value
        if flags & ~supported:
            raise _einval(f"guest_memfd flags {flags:#x} include unsupported bits "
                          f"{flags & ~supported:#x}")
        if size == 0 or size > _LOFF_MAX or size & _PAGE_MASK:
            raise _einval(f"guest_memfd size {size:#x} is not a positive multiple of the page size")
        base, pages = self._host.gmem_base, self._host.gmem_file_pages
        if len(self._gmem) * pages >= base:
            raise KvmError(errno.ENOSPC, f"the model's guest_memfd frames hold "
                                         f"{base // pages} files per VM")
        gmem = self._new_gmem(len(self._gmem), size, flags)
        self._memory.memslots.add_gmem_file(gmem.index, size >> PAGE_SHIFT)
        self._gmem.append(gmem)
        self._gmem_bindings[gmem.index] = GmemBindings()
        return gmem

    def _new_gmem(self, index: int, size: int, flags: int) -> GuestMemfd:
        """The handle of this VM's guest_memfd ``index``."""
        frame = functools.partial(self._core.gmem_frame, self._host.gmem_base,
                                  self._host.gmem_file_pages)
        return GuestMemfd(self._token, self, index, size, flags, frame)

    # --- KVM_SET_USER_MEMORY_REGION2 ------------------------------------------------------

    @_ioctl
    def set_user_memory_region(self, *, slot: Any, guest_phys_addr: Any, memory_size: Any,
                               userspace_addr: Any, flags: Any = 0, guest_memfd: Any = None,
                               guest_memfd_offset: Any = 0, host_level: Any = PG_LEVEL_4K) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (kvm_set_memory_region, Linux 6.18), checks in order.

        ``slot`` and ``flags`` are u32 (bits 31:16 of ``slot`` are the address space);
        ``memory_size`` 0 deletes.  ``host_level`` (1-3) is the level at which the host
        maps the slot's userspace memory.  Raises KvmError with KVM's errno.  A change
        waits for host invalidations in progress on other threads to end (and is then
        checked again from the start).
        """
        while True:
            try:
                return self._set_memory_region(slot, guest_phys_addr, memory_size,
                                               userspace_addr, flags, guest_memfd,
                                               guest_memfd_offset, host_level)
            except _WaitedForInvalidations:
                continue

    def _set_memory_region(self, slot: Any, guest_phys_addr: Any, memory_size: Any,
                           userspace_addr: Any, flags: Any, guest_memfd: Any,
                           guest_memfd_offset: Any, host_level: Any) -> None:
        """set_user_memory_region's body, with the VM's lock held."""
        slot = _args.u32("slot", slot)
        gpa = _args.u64("guest_phys_addr", guest_phys_addr)
        size = _args.u64("memory_size", memory_size)
        uaddr = _args.u64("userspace_addr", userspace_addr)
        flags = _args.u32("flags", flags)
        offset = _args.u64("guest_memfd_offset", guest_memfd_offset)
        host_level = _args.level("host_level", host_level, PG_LEVEL_4K, PG_LEVEL_1G)
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        gmem_flag = bool(flags & MemFlag.GUEST_MEMFD.value)

        # kvm_vm_ioctl_set_memory_region
        if slot_id >= KVM_USER_MEM_SLOTS:
            raise _einval(f"slot id {slot_id} is not below KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
        # check_memory_region_flags
        valid = MemFlag.LOG_DIRTY_PAGES.value | MemFlag.GUEST_MEMFD.value
        if gmem_flag:
            valid &= ~MemFlag.LOG_DIRTY_PAGES.value
        if self.readonly_mem and not gmem_flag:
            valid |= MemFlag.READONLY.value
        if flags & ~valid:
            raise _einval(f"memslot flags {flags:#x} include {flags & ~valid:#x}, not valid here")
        # General sanity checks
        if size & _PAGE_MASK:
            raise _einval(f"memory_size {size:#x} is not page-aligned")
        if gpa & _PAGE_MASK:
            raise _einval(f"guest_phys_addr {gpa:#x} is not page-aligned")
        if uaddr & _PAGE_MASK:
            raise _einval(f"userspace_addr {uaddr:#x} is not page-aligned")
        end_uaddr = (uaddr + size) & _U64
        if end_uaddr > self._host.user_ptr_max or end_uaddr < uaddr:
            raise _einval(f"userspace range {uaddr:#x}+{size:#x} fails access_ok")
        if gmem_flag and (offset & _PAGE_MASK or (offset + size) & _U64 < offset):
            raise _einval(f"guest_memfd_offset {offset:#x} is misaligned or wraps")
        if as_id >= self.nr_memslot_as_ids or slot_id >= KVM_MEM_SLOTS_NUM:
            raise _einval(f"address space {as_id} does not exist")
        if (gpa + size) & _U64 < gpa:
            raise _einval(f"guest_phys_addr {gpa:#x} + memory_size {size:#x} wraps")
        npages = size >> PAGE_SHIFT
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise _einval(f"{npages} pages exceed KVM_MEM_MAX_NR_PAGES")

        state = self._memory
        old = state.slot_by_id(as_id, slot_id)
        if not size:
            if old is None:
                raise _einval(f"slot {slot:#x} does not exist")
            self._wait_for_host_invalidations()
            self._delete_slot(as_id, slot_id, old)
            return
        base_gfn = gpa >> PAGE_SHIFT
        if old is None:
            change = "create"
        else:
            if gmem_flag:
                raise _einval("guest_memfd memslots cannot be modified, only deleted")
            if (uaddr != old.userspace_addr or npages != old.npages
                    or (flags ^ old.flags) & (MemFlag.READONLY.value | MemFlag.GUEST_MEMFD.value)):
                raise _einval("only the guest address or the dirty-logging flag of a memslot "
                              "may change")
            if base_gfn != old.base_gfn:
                change = "move"
            elif flags != old.flags:
                change = "flags"
            else:
                return
        if change in ("create", "move") and state.overlaps(as_id, slot_id, base_gfn,
                                                           base_gfn + npages):
            raise KvmError(errno.EEXIST,
                           f"GPA range {gpa:#x}+{size:#x} overlaps another memslot")
        gmem_index, pgoff = -1, 0
        self._wait_for_host_invalidations()
        if gmem_flag:
            gmem_index, pgoff = self._gmem_bind(guest_memfd, offset, npages, (as_id, slot_id))
            if self._gmem[gmem_index].flags & GuestMemfdFlag.MMAP.value:
                flags |= KVM_MEMSLOT_GMEM_ONLY
        if change == "flags":
            state.set_slot_flags(as_id, slot_id, flags)
            return
        if change == "move":
            state.invalidate_slot(as_id, slot_id)
        last_gfn = base_gfn + npages - 1
        if last_gfn > self._host.max_gfn or last_gfn & (self.shared_bit >> PAGE_SHIFT):
            if change == "move":
                state.reactivate_slot(as_id, slot_id)
            if gmem_flag:
                self._gmem_bindings[gmem_index].remove((as_id, slot_id))
            raise _einval(f"last gfn {last_gfn:#x} is beyond kvm_mmu_max_gfn() or a TDX alias")
        if change == "move":
            state.move_slot(as_id, slot_id, base_gfn, flags)
        else:
            state.create_slot(as_id, slot_id, base_gfn, npages, flags, uaddr, gmem_index, pgoff,
                              host_level)

    def _wait_for_host_invalidations(self) -> None:
        """kvm_swap_active_memslots (kvm_main.c, 6.18) waits while host invalidations are
        in progress (mn_active_invalidate_count), so that their start and end see the
        same memslots.  The caller holds the VM's lock, which the wait gives up.  An
        invalidation begun on this very thread could never end: RuntimeError."""
        me = threading.get_ident()
        if not self._host_invalidations:
            return
        while self._host_invalidations:
            if any(h._thread == me for h in self._host_invalidations):
                raise RuntimeError("a host invalidation begun on this thread is in progress: "
                                   "end() it before changing memslots")
            self._invalidations_done.wait()
        raise _WaitedForInvalidations        # the lock was given up: check everything again

    def _gmem_bind(self, gmem: Any, offset: int, npages: int, key: tuple[int, int]) -> tuple[int, int]:
        """kvm_gmem_bind: EBADF without a file, EINVAL for a foreign file or a bad range."""
        if gmem is None:
            raise KvmError(errno.EBADF, "GUEST_MEMFD memslot without a guest_memfd")
        if not isinstance(gmem, GuestMemfd) or gmem._owner is not self._token:
            raise _einval("guest_memfd is not a guest_memfd of this VM")
        if gmem.index >= len(self._gmem) or self._gmem[gmem.index] is not gmem:
            raise _einval("guest_memfd no longer exists (it was made after the snapshot that "
                          "was restored)")
        if gmem.closed:
            raise KvmError(errno.EBADF, "the guest_memfd was closed")
        # loff_t arithmetic, as the kernel does it (wrapping into the negative).
        signed_offset = offset - (1 << 64) if offset >> 63 else offset
        end = signed_offset + (npages << PAGE_SHIFT)
        end = (end + (1 << 63)) % (1 << 64) - (1 << 63)
        if signed_offset < 0 or end > gmem.size:
            raise _einval(f"guest_memfd range {offset:#x}+{npages << PAGE_SHIFT:#x} is beyond "
                          f"its size {gmem.size:#x}")
        first = offset >> PAGE_SHIFT
        bindings = self._gmem_bindings[gmem.index]
        if bindings.overlaps(first, first + npages):
            raise _einval("guest_memfd range overlaps another memslot's binding")
        bindings.add(key, first, first + npages)
        return gmem.index, first

    @_locked
    def _gmem_invalidate(self, gmem: GuestMemfd, offset: int, size: int, close: bool) -> None:
        """GuestMemfd.punch_hole / close: the checks, then the bound slots' gfns in the file
        range, in file order, for VMMemory.gmem_invalidate."""
        if gmem.index >= len(self._gmem) or self._gmem[gmem.index] is not gmem:
            raise ValueError("this guest_memfd is not part of the VM's current state (it was "
                             "made after the snapshot that was restored)")
        if gmem.closed:
            raise KvmError(errno.EBADF, "the guest_memfd was closed")
        if close:
            start, end = 0, 1 << 64                            # 0 .. -1ul
        else:
            if offset >> 63 or not size or size >> 63:
                raise _einval(f"offset {offset:#x} or size {size:#x} is not a positive loff_t")
            if offset + size > _LOFF_MAX:
                raise KvmError(errno.EFBIG, "the range passes the largest file size")
            if (offset | size) & _PAGE_MASK:
                raise _einval("offset and size must be page-aligned")
            start, end = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        pieces = []
        for first, stop, key in self._gmem_bindings[gmem.index].in_range(start, end):
            slot = self._memory.slot_by_id(*key)
            assert slot is not None
            pieces.append((slot, slot.base_gfn + max(first, start) - first,
                           slot.base_gfn + min(stop, end) - first))
        if close:
            self._memory.gmem_closed_files.add(gmem.index)
        self._memory.gmem_invalidate(pieces, bool(gmem.flags & GuestMemfdFlag.INIT_SHARED.value),
                                     close, None if close else (gmem.index, start, end))

    def _delete_slot(self, as_id: int, slot_id: int, old: Slot) -> None:
        self._memory.invalidate_slot(as_id, slot_id)
        self._memory.delete_slot(as_id, slot_id)
        if old.gmem_id >= 0:
            self._gmem_bindings[old.gmem_id].remove((as_id, slot_id))

    # --- KVM_SET_MEMORY_ATTRIBUTES ---------------------------------------------------------

    @_ioctl
    def set_memory_attributes(self, address: Any, size: Any, attributes: Any, flags: Any = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes, Linux 6.18).

        EINVAL for non-zero flags, unsupported attributes, a zero or wrapping size, or
        an unaligned address or size.  Attribute 0 erases; ranges without a memslot are
        allowed.  Stored as ranges: marking a terabyte private costs a few entries.
        """
        address = _args.u64("address", address)
        size = _args.u64("size", size)
        attributes = _args.u64("attributes", attributes)
        flags = _args.u64("flags", flags)
        if flags:
            raise _einval(f"flags {flags:#x} must be 0")
        if attributes & ~self.supported_memory_attributes:
            raise _einval(f"attributes {attributes:#x} are not supported by this VM "
                          f"(supported: {self.supported_memory_attributes:#x})")
        if size == 0 or (address + size) & _U64 < address:
            raise _einval(f"size {size:#x} is zero or address + size wraps")
        if address & _PAGE_MASK or size & _PAGE_MASK:
            raise _einval("address and size must be page-aligned")
        start = address >> PAGE_SHIFT
        self._memory.set_memory_attributes(start, start + (size >> PAGE_SHIFT), attributes)

    def get_memory_attributes(self, gfn: Any) -> int:
        """kvm_get_memory_attributes(gfn)."""
        return int(self._memory.memslots.get_memory_attributes(_args.u64("gfn", gfn)))

    # --- dirty logging ------------------------------------------------------------------------

    @_ioctl
    def enable_manual_dirty_log_protect(self, initially_set: Any = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) with MANUAL_PROTECT_ENABLE, and
        INITIALLY_SET if asked (kvm_vm_ioctl_enable_cap_generic, kvm_main.c, 6.18):
        KVM_GET_DIRTY_LOG then neither clears nor protects (KVM_CLEAR_DIRTY_LOG does);
        with INITIALLY_SET a new dirty bitmap starts all set and enabling logging
        protects nothing."""
        value = DirtyLogManual.PROTECT_ENABLE.value
        if _args.flag("initially_set", initially_set):
            value |= DirtyLogManual.INITIALLY_SET.value
        self._memory.manual_dirty_log_protect = value

    @property
    def manual_dirty_log_protect(self) -> DirtyLogManual:
        """kvm->manual_dirty_log_protect."""
        return DirtyLogManual(self._memory.manual_dirty_log_protect)

    def _dirty_log_slot(self, slot: int, first_page: int = 0) -> Slot:
        """The checks KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG share, in their order: EINVAL
        for an address space or slot id out of range, (CLEAR only) EINVAL for a
        ``first_page`` that is not a multiple of 64, ENOENT for a slot that is absent or
        not logging."""
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        if as_id >= self.nr_memslot_as_ids or slot_id >= KVM_USER_MEM_SLOTS:
            raise _einval(f"slot {slot:#x} is out of range")
        if first_page & 63:
            raise _einval(f"first_page {first_page:#x} is not a multiple of 64")
        found = self._memory.slot_by_id(as_id, slot_id)
        if found is None or found.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"slot {slot:#x} does not exist or does not log "
                                         f"dirty pages")
        return found

    @_ioctl
    def get_dirty_log(self, slot: Any) -> Any:
        """KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect, kvm_main.c, 6.18): the slot's dirty
        bitmap as uint64 words, bit i for page i of the slot.  Without manual protection
        the bits returned are cleared and their pages write-protected again (PML: their
        dirty bits cleared), so the next write is seen; with it, nothing changes.
        EINVAL for a slot id out of range, ENOENT for a slot absent or not logging."""
        found = self._dirty_log_slot(_args.u32("slot", slot))
        return self._memory.get_dirty_log(found)

    @_ioctl
    def clear_dirty_log(self, slot: Any, first_page: Any, num_pages: Any, bitmap: Any) -> None:
        """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect, kvm_main.c, 6.18): for each set
        bit j of ``bitmap`` (1-D uint64 words) that is set in the slot's bitmap too, page
        ``first_page + j`` is cleared there and protected again.  Checks in KVM's order:
        EINVAL for a slot id out of range or ``first_page`` not a multiple of 64, ENOENT
        for a slot absent or not logging, EINVAL for a range beyond the slot or a
        ``num_pages`` not a multiple of 64 that stops short of its end, EFAULT for a
        ``bitmap`` shorter than ``num_pages`` bits.  KVM does not require manual
        protection for it."""
        slot = _args.u32("slot", slot)
        first = _args.u64("first_page", first_page)
        count = _args.u32("num_pages", num_pages)
        if not (isinstance(bitmap, np.ndarray) and bitmap.dtype == np.uint64
                and bitmap.ndim == 1):
            raise TypeError("bitmap must be a 1-D numpy.uint64 array")
        found = self._dirty_log_slot(slot, first)
        npages = found.npages
        if first > npages or count > npages - first or (count < npages - first and count & 63):
            raise _einval(f"pages {first:#x}+{count:#x} do not fit slot {slot:#x} of "
                          f"{npages:#x} pages in whole 64-page words")
        words = (count + 63) // 64
        if len(bitmap) < words:
            raise KvmError(errno.EFAULT, f"bitmap holds {len(bitmap)} words, "
                                         f"{words} are read")
        self._memory.clear_dirty_log(found, first, np.array(bitmap[:words], dtype=np.uint64))

    # --- host (MMU-notifier) invalidations -----------------------------------------------------

    @_locked
    def invalidate_host_range(self, hva: Any, size: Any) -> HostInvalidation:
        """The start of an MMU-notifier invalidation of host memory [hva, hva + size)
        (kvm_mmu_notifier_invalidate_range_start, kvm_main.c, 6.18): if a memslot maps
        part of it, mmu_invalidate_begin, the gfns of each part added to the invalidated
        range, and their shared mappings zapped (a TD keeps its private ones; other VMs
        have one root and lose both).  Until the returned handle's ``end()``, faults on
        those gfns retry (``mmu_invalidate_retry_gfn``); a vCPU whose access keeps
        retrying on this thread raises RuntimeError, where KVM would spin.  No memslot
        in the range: nothing happens, and ``end()`` does nothing either.  ValueError
        for an empty or wrapping range (the mm never sends one)."""
        hva = _args.u64("hva", hva)
        size = _args.u64("size", size)
        if size == 0 or hva + size > 1 << 64:
            raise ValueError(f"host range {hva:#x}+{size:#x} is empty or wraps")
        found = self._memory.invalidate_host_range_start(hva, hva + size)
        handle = HostInvalidation(self, self._memory, found, hva, size)
        self._host_invalidations.add(handle)
        return handle

    @_locked
    def set_host_level(self, slot: Any, level: Any) -> None:
        """A THP collapse (level 2M / 1G) or split (4K) of a memslot's host memory: the
        host's invalidation of the slot's host range (its shared mappings are zapped,
        mmu_invalidate_seq moves once), then host_pfn_mapping_level finds ``level``;
        the next fault maps at it.  ValueError for a slot that does not exist."""
        slot = _args.u32("slot", slot)
        level = _args.level("level", level, PG_LEVEL_4K, PG_LEVEL_1G)
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        found = (self._memory.slot_by_id(as_id, slot_id)
                 if as_id < self.nr_memslot_as_ids else None)
        if found is None:
            raise ValueError(f"slot {slot:#x} does not exist")
        self._memory.set_host_level(found, level)

    # --- inspection --------------------------------------------------------------------------

    @property
    def memslots(self) -> list[MemSlot]:
        """Every memslot, address space 0 then 1, in GPA order."""
        result = []
        for as_id in range(self.nr_memslot_as_ids):
            for s in self._memory.slots(as_id):
                gmem = self._gmem[s.gmem_id] if s.gmem_id >= 0 else None
                result.append(MemSlot((as_id << 16) | s.id, s.base_gfn << PAGE_SHIFT,
                                      s.npages << PAGE_SHIFT, s.userspace_addr,
                                      s.flags & ~KVM_INTERNAL_MEMSLOT_FLAGS, gmem,
                                      s.gmem_pgoff << PAGE_SHIFT if gmem else 0, s.host_level))
        return result

    def find_memslot(self, gfn: Any) -> int | None:
        """The id of the address-space-0 memslot containing ``gfn`` (binary search), or None."""
        found = self._memory.memslots.find_memslot(_args.u64("gfn", gfn))
        return None if found < 0 else found

    def find_memslots(self, gfns: Any) -> Any:
        """``find_memslot`` for a 1-D uint64 array of gfns: an int32 array of slot ids, -1
        where no address-space-0 memslot contains the gfn (one binary search per element,
        in the core, without Python work per element)."""
        n, (values,), _ = _args.operands(None, ("gfns", gfns))
        if n < 0:
            raise TypeError("gfns must be a 1-D numpy.uint64 array")
        return self._memory.memslots.find_memslots(values)

    @_locked
    def lpage_info(self, slot: Any, level: Any) -> list[int]:
        """lpage_info[level].disallow_lpage of a memslot, as u32 (bit 31: mixed attributes)."""
        slot = _args.u32("slot", slot)
        level = _args.level("level", level, PG_LEVEL_2M, PG_LEVEL_1G)
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        if as_id >= self.nr_memslot_as_ids or self._memory.slot_by_id(as_id, slot_id) is None:
            raise ValueError(f"slot {slot:#x} does not exist")
        return self._memory.lpage_info(as_id, slot_id, level)

    @_locked
    def memory_attribute_ranges(self) -> list[tuple[int, int, int]]:
        """The attribute store as merged ``(start_gfn, end_gfn, attributes)`` ranges."""
        return self._memory.attribute_ranges()

    @property
    def mmu_invalidate_seq(self) -> int:
        return self._memory.mmu_invalidate_seq

    @property
    def mmu_invalidate_in_progress(self) -> int:
        return self._memory.mmu_invalidate_in_progress

    @property
    def mmu_invalidate_range(self) -> tuple[int, int]:
        """(mmu_invalidate_range_start, mmu_invalidate_range_end) in gfns; INVALID_GPA if none."""
        return self._memory.mmu_invalidate_range

    @_locked
    def memslots_generation(self, as_id: Any = 0) -> int:
        """The memslot generation of an address space (kvm_memslots(kvm)->generation)."""
        as_id = _args.u64("as_id", as_id)
        if as_id >= self.nr_memslot_as_ids:
            raise ValueError(f"as_id must be below {self.nr_memslot_as_ids}, not {as_id}")
        return self._memory.generation(as_id)

    # --- the MMU and vCPUs ------------------------------------------------------------------

    @property
    def page_tables(self) -> Any:
        """The PageTables KVM builds for the VM (TDX: the shared EPT, indexed with the
        shared bit)."""
        return self._memory.mmu.direct.pt

    @property
    def private_page_tables(self) -> Any:
        """TDX's private tables (KVM's mirror of the Secure EPT, 4K leaves); None otherwise."""
        mirror = self._memory.mmu.mirror
        return None if mirror is None else mirror.pt

    @property
    def stats(self) -> dict[str, int]:
        """The vCPUs' page-fault statistics, summed (as KVM's per-VM view of vcpu stats),
        and ``pages_4k`` / ``pages_2m`` / ``pages_1g``: present leaf SPTEs per level."""
        total = dict.fromkeys(PF_STAT_NAMES, 0)
        for vcpu in self._vcpus:
            for name, value in vcpu.stats.items():
                total[name] += value
        pages = self._memory.mmu.pages
        total.update(pages_4k=pages[PG_LEVEL_4K], pages_2m=pages[PG_LEVEL_2M],
                     pages_1g=pages[PG_LEVEL_1G])
        return total

    @property
    def trace(self) -> Any:
        """Where the model's decisions go as kernel trace events; None (default) = off.

        A callable is called as ``trace(event, text)``; an object with ``write`` (a
        text file) receives ``"event: text\n"``.  ``text`` is exactly what the
        kernel's TP_printk prints after ``event: `` in an ftrace line, for the events
        ``kvm_page_fault`` (vendor exit handlers), ``kvm_mmu_spte_requested``,
        ``kvm_tdp_mmu_spte_changed`` (every SPTE KVM changes, zaps included) and
        ``kvm_mmu_set_spte``, in the kernel's order; see docs/semantics.md for what
        is not traced.  The setting survives ``restore``; snapshots do not hold it.
        """
        return None if self._tracer is None else self._tracer.sink

    @trace.setter
    def trace(self, sink: Any) -> None:
        tracer = None if sink is None else self._core.Tracer(sink, self.vendor == "vmx")
        with self._lock:
            self._flush_trace()
            self._tracer = tracer
            self._set_mmu_sinks(self._memory)

    @property
    def on_zap(self) -> Callable[[int, int, int, str], Any] | None:
        """Called as ``on_zap(gfn, npages, level, reason)`` for every mapping KVM removes or
        reduces, so that an embedder caching translations drops its own; None (default):
        off.

        ``npages`` pages from ``gfn`` that were mapped at ``level`` (a run of same-level
        leaves zapped together is one call; ``gfn`` is as the guest addresses it, a TD's
        shared gfns with the shared bit).  "Reduced": a present leaf made not present,
        pointed at another frame, losing read, write or execute, or a writable leaf
        losing its dirty bit (dirty logging: the next write must reach KVM); a huge leaf
        split into a table of the same translations is not.  ``reason`` is
        ``"attributes"``, ``"memslot"``, ``"host"``, ``"gmem"``, ``"dirty_log"`` or
        ``"zap_all"`` (``ZapReason``); a restored snapshot reports one ``"zap_all"`` of
        the whole guest-physical space at the root level.  Faults never reduce a mapping
        and report nothing.  As with ``trace``, the calls come when the public call that
        made the zaps returns, with no lock held: the callback may call back into the
        VM, and an exception it raises is raised by that call after its work is done."""
        return self._on_zap

    @on_zap.setter
    def on_zap(self, callback: Callable[[int, int, int, str], Any] | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"on_zap must be a callable or None, not {type(callback).__name__}")
        with self._lock:
            self._flush_trace()
            self._on_zap = callback
            self._set_mmu_sinks(self._memory)
            self._vm_zaps.clear()

    def _set_mmu_sinks(self, memory: Any) -> None:
        """Give ``memory``'s MMU the trace sink and the zap watch, under mmu_lock for
        write: faults that run without the GIL (access_many's loop) read both under
        mmu_lock for read, so none is between its check of a flag and its use of the
        sink when they change."""
        with memory.mmu_write_locked():
            memory.mmu.set_tracer(self._tracer)
            memory.mmu.watch_zaps(self._on_zap is not None)

    def _flush_trace(self, raise_errors: bool = True) -> None:
        """Give the trace events made so far to the sink (see kvmemu._pure.trace), then the
        zaps to ``on_zap``; the first exception either raises is raised after both."""
        error: Exception | None = None
        tracer = self._tracer
        if tracer is not None and tracer.pending:
            try:
                tracer.flush(raise_errors)
            except Exception as exc:  # noqa: BLE001 - raised below, after the zaps
                error = exc
        callback = self._on_zap
        if callback is not None:
            with self._lock:          # every zap is made holding it: none is half recorded
                zaps = self._memory.mmu.take_zaps() + self._vm_zaps
                self._vm_zaps = []
            for gfn, npages, level, reason in zaps:
                try:
                    callback(gfn, npages, level, _ZAP_REASONS[reason])
                except Exception as exc:  # noqa: BLE001 - the first one is raised below
                    error = error or exc
        if error is not None and raise_errors:
            raise error

    def _running(self) -> "_AllVCPUs":
        """Every vCPU's mutex, taken in vCPU order: no access runs meanwhile."""
        return _AllVCPUs(self._vcpus)

    @_locked
    def snapshot(self) -> "Snapshot":
        """The whole VM state: memslots, guest_memfd files and bindings, attributes,
        lpage_info, page tables, invalidation and generation counters, vCPUs (stats,
        kvm_run, MMIO cache).  Copies of numpy storage; restorable any number of times.
        RuntimeError while a host invalidation is in progress (end it first)."""
        if self._host_invalidations:
            raise RuntimeError("a host invalidation is in progress: end() it before taking "
                               "a snapshot")
        with self._running():
            return Snapshot(self._token, dict(self._creation), self._memory,
                            [vcpu._c for vcpu in self._vcpus], list(self._gmem),
                            {k: v.copy() for k, v in self._gmem_bindings.items()})

    @classmethod
    def from_snapshot(cls, snapshot: "Snapshot") -> "VM":
        """A new VM, created as the snapshot's VM was (type, vendor, gpaw, host, ...),
        holding its state: its vCPUs made and restored too."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"snapshot must be a Snapshot, not {type(snapshot).__name__}")
        vm = cls(**snapshot._creation_args())
        vm.restore(snapshot)
        return vm

    @_locked
    def restore(self, snapshot: "Snapshot") -> None:
        """Put the state of ``snapshot`` back, exactly: one taken from this VM, or from
        another VM created with the same arguments (ValueError otherwise), in this process
        or another (``Snapshot.from_bytes``, pickle).  vCPUs that the snapshot does not
        have no longer exist afterwards (using them raises); those it has and this VM
        does not are made."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"snapshot must be a Snapshot, not {type(snapshot).__name__}")
        if snapshot._owner is self._token:
            memory, vcpu_states = snapshot._copy()
            gmem, bindings = list(snapshot._gmem), snapshot._bindings
        else:
            if snapshot._creation != self._creation:
                raise ValueError("the snapshot is of a VM created with other arguments: "
                                 f"{snapshot._creation_args()}")
            memory, vcpu_states = snapshot._copy_for(self._core, self._config)
            gmem = [self._gmem[i] if i < len(self._gmem) and self._gmem[i].size == size
                    and self._gmem[i].flags == flags else self._new_gmem(i, size, flags)
                    for i, (size, flags) in enumerate(snapshot._gmem_files())]
            bindings = snapshot._bindings
        with self._running():
            for vcpu in self._vcpus[len(vcpu_states):]:
                vcpu._detach()
            while len(self._vcpus) < len(vcpu_states):
                self._vcpus.append(VCPU(self, len(self._vcpus)))
            for vcpu, vcpu_state in zip(self._vcpus, vcpu_states):
                vcpu_state.stage_hook = vcpu._c.stage_hook   # a setting, not state
                vcpu._attach(vcpu_state)
            if self._on_zap is not None and any(self._memory.mmu.pages):
                # Every mapping of the replaced state goes: one zap of the whole space.
                levels = self.page_tables.levels
                self._vm_zaps.append((0, 1 << (PT_LEVEL_BITS * levels), levels,
                                      ZapReason.ZAP_ALL.value))
            self._memory = memory
            self._set_mmu_sinks(memory)
        del self._vcpus[len(vcpu_states):]
        self._host_invalidations.clear()      # they belong to the replaced state
        self._invalidations_done.notify_all()
        self._gmem = gmem
        self._gmem_bindings = {k: v.copy() for k, v in bindings.items()}

    @_locked
    def check_invariants(self) -> list[str]:
        """What must hold between the MMU's tables and the memory model, checked from
        scratch; returns the violations found (an empty list when all hold):

        * every table is linked once, from a present non-leaf entry;
        * every present leaf maps memory of an existing address-space-0 memslot, with
          the frame faultin would give it (guest_memfd frame for private or gmem-only
          memory, else the host frame), and writable only if the slot is not READONLY;
        * a TDX mirror leaf maps only private gfns, a direct leaf only shared ones; on
          other private-memory VMs the frame kind matches the gfn's attributes;
        * no huge leaf crosses a memslot edge, spans mixed attributes, or sits where
          lpage_info disallows it;
        * the per-level leaf counts in ``stats`` equal the leaves found;
        * each vCPU's fault counters agree with kvm_mmu_page_fault's accounting: every
          FIXED, SPURIOUS or EMULATE result counted is a fault taken (an MMIO-cache or
          MMIO-SPTE emulation skips both), every fast-path fix is a FIXED or SPURIOUS one,
          and every MMIO SPTE created made its fault EMULATE (the last two not for a
          vCPU that pre-faulted: kvm_tdp_map_page counts only pf_fast and
          pf_mmio_spte_created).
        """
        return self._check_with(_invariants.Checker())

    def _check_with(self, checker: "_invariants.Checker") -> list[str]:
        """``checker``'s verdict on this VM, with no access or MMU change running (the
        caller holds the VM's lock: ``kvmemu.testing.InvariantChecker``)."""
        with self._running(), self._memory.mmu_write_locked():
            return checker.check(self)

    @_ioctl
    def create_vcpu(self) -> "VCPU":
        """KVM_CREATE_VCPU: vCPU ids count from 0."""
        vcpu = VCPU(self, len(self._vcpus))
        self._vcpus.append(vcpu)
        return vcpu


class Snapshot:
    """An opaque, immutable copy of a VM's state (``VM.snapshot``).

    It restores into its VM or into any VM created with the same arguments
    (``VM.restore``, ``VM.from_snapshot``), and travels as bytes: ``to_bytes()`` /
    ``Snapshot.from_bytes(data)`` (a versioned format, kvmemu._snapshot; a corrupt or
    foreign blob raises ValueError) and ``pickle``, which uses them."""

    __slots__ = ("_owner", "_creation", "_memory", "_vcpus", "_gmem", "_bindings")

    def __init__(self, owner: object, creation: dict[str, Any], memory: VMMemory,
                 vcpus: list[Any], gmem: list[GuestMemfd],
                 bindings: dict[int, GmemBindings]) -> None:
        self._owner = owner
        self._creation = creation
        self._memory, self._vcpus = self._clone(memory, vcpus)
        self._gmem = gmem
        self._bindings = bindings

    @staticmethod
    def _clone(memory: VMMemory, vcpus: list[Any]) -> tuple[VMMemory, list[Any]]:
        """A copy of the memory state and of the vCPU states, attached to it."""
        copy = memory.clone()
        return copy, [vcpu.clone(copy.memslots, copy.mmu) for vcpu in vcpus]

    def _copy(self) -> tuple[VMMemory, list[Any]]:
        """A fresh copy to restore (the snapshot stays restorable)."""
        return self._clone(self._memory, self._vcpus)

    def _copy_for(self, core: Any, config: VMConfig) -> tuple[VMMemory, list[Any]]:
        """A fresh copy for a VM of ``core`` (the same configuration): a clone on the
        same core, else the state rebuilt from its plain form."""
        if core is self._memory.core:
            return self._copy()
        meta, arrays = self._export()
        return _import_state(core, config, meta, arrays)

    def _creation_args(self) -> dict[str, Any]:
        """The VM constructor's arguments this snapshot's VM was created with."""
        args = dict(self._creation)
        args["host"] = _host_from_key(args["host"])
        return args

    def _gmem_files(self) -> list[tuple[int, int]]:
        return [(g.size, g.flags) for g in self._gmem]

    def _export(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = _snapshot.export_memory(self._memory)
        arrays.update(_snapshot.export_frames(self._memory, len(self._gmem)))
        closed = self._memory.gmem_closed_files
        meta["vm"] = self._creation
        meta["gmem"] = [[g.size, g.flags, g.index in closed] for g in self._gmem]
        meta["bindings"] = [[[a, s, first, stop] for (a, s), (first, stop)
                             in sorted(self._bindings[i].by_key.items())]
                            for i in range(len(self._gmem))]
        meta["vcpus"] = [_snapshot.export_vcpu(state) for state in self._vcpus]
        return meta, arrays

    def to_bytes(self) -> bytes:
        """The snapshot in kvmemu's snapshot format (kvmemu._snapshot): restorable in
        another process or on another machine with ``Snapshot.from_bytes``."""
        return _snapshot.encode(*self._export())

    @staticmethod
    def from_bytes(data: Any) -> "Snapshot":
        """The snapshot ``data`` holds (from ``to_bytes``), checked: ValueError for
        anything else (another format, another version, a corrupt blob, or a state whose
        tables break the invariants of ``VM.check_invariants``), TypeError for data that
        is not bytes.  Built on the implementation selected at import."""
        from . import _select
        meta, arrays = _snapshot.decode(data)
        try:
            vm_class = _select.load(_select.default_implementation()).VM
            vm = vm_class(**{k: (_host_from_key(v) if k == "host" else v)
                             for k, v in dict(meta["vm"]).items()})
            if meta["vm"] != vm._creation:
                raise ValueError("its VM arguments are not in resolved form")
            memory, states = _import_state(vm._core, vm._config, meta, arrays)
            files = _snapshot.gmem_files(meta)
            gmem = [vm._new_gmem(i, size, flags) for i, (size, flags, _) in enumerate(files)]
            snap = Snapshot(object(), dict(vm._creation), memory, states, gmem,
                            _snapshot.bindings(meta))
            vm.restore(snap)            # a VM created with the same arguments: checked there
            problems = vm.check_invariants()
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError,
                KvmError, MemoryError) as exc:
            raise ValueError(f"a corrupt kvmemu snapshot: {exc!r}") from None
        if problems:
            raise ValueError(f"a corrupt kvmemu snapshot: its state breaks the invariants: "
                             f"{problems[:3]}")
        return snap

    def __reduce__(self) -> Any:
        return (Snapshot.from_bytes, (self.to_bytes(),))

    def __repr__(self) -> str:
        return f"Snapshot(vcpus={len(self._vcpus)}, memslots={len(self._memory.slots(0))})"


def _import_state(core: Any, config: VMConfig, meta: dict[str, Any],
                  arrays: Any) -> tuple[VMMemory, list[Any]]:
    """A VMMemory and vCPU states of ``core`` from a snapshot's plain form."""
    memory = _snapshot.import_memory(core, config, meta, arrays, _snapshot.gmem_files(meta))
    states = []
    for fields in meta["vcpus"]:
        state = core.VCPUState(config, memory.memslots, memory.mmu)
        _snapshot.import_vcpu(state, fields, HypercallRun)
        states.append(state)
    return memory, states


def _host_from_key(key: Any) -> Host:
    """A Host from its key (maxphyaddr, la57, ept_ad_bits, mem_encrypt, pml)."""
    maxphyaddr, la57, ept_ad_bits, mem_encrypt, pml = key
    return Host(maxphyaddr=maxphyaddr, la57=la57, ept_ad_bits=ept_ad_bits,
                mem_encrypt=mem_encrypt, pml=pml)


class KvmRun:
    """The parts of struct kvm_run a second-stage fault can fill (read-only view)."""

    __slots__ = ("_state",)

    class _MemoryFault(NamedTuple):
        flags: int
        gpa: int
        size: int

    class _Mmio(NamedTuple):
        phys_addr: int
        is_write: bool

    class _Hypercall(NamedTuple):
        nr: int
        args: tuple[int, ...]
        ret: int
        flags: int

    def __init__(self, state: Any) -> None:
        self._state = state

    @property
    def exit_reason(self) -> ExitReason:
        return ExitReason(self._state.exit_reason)

    @property
    def memory_fault(self) -> "KvmRun._MemoryFault":
        return KvmRun._MemoryFault(*self._state.memory_fault)

    @property
    def mmio(self) -> "KvmRun._Mmio":
        return KvmRun._Mmio(*self._state.mmio)

    @property
    def hypercall(self) -> "KvmRun._Hypercall":
        """kvm_run.hypercall: what the last KVM_EXIT_HYPERCALL carried, and ``ret``."""
        run = self._state.hypercall
        return KvmRun._Hypercall(run.nr, run.args, run.ret, run.flags)

    def __repr__(self) -> str:
        return (f"KvmRun(exit_reason={self.exit_reason.name}, memory_fault={self.memory_fault}, "
                f"mmio={self.mmio})")


class VCPU:
    """A vCPU: the exit handlers KVM runs and the access loop around them.

    Handlers return what KVM's do: a positive RetPF (RETRY, FIXED, SPURIOUS) resumes
    the guest, RetPF.EMULATE asks for instruction emulation / MMIO, a negative errno
    fails KVM_RUN with ``run`` filled (-EFAULT with KVM_EXIT_MEMORY_FAULT).  Another
    vendor's handler raises ValueError.

    ``stage_hook``: a callable run as ``hook(stage)`` at the pipeline points "fault",
    "faultin" and "map" (see kvmemu._pure.vcpu.VCPUState), to change the VM between
    them in a test; None (the default) for none.
    """

    def __init__(self, vm: VM, vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        #: Whether it ever pre-faulted: pre-faults count pf_fast and pf_mmio_spte_created
        #: without the FIXED / EMULATE results check_invariants otherwise pairs them with.
        self._pre_faulted = False
        #: vcpu->arch.guest_state_protected: SNP's LAUNCH_FINISH encrypted its VMSA.
        self._state_protected = False
        #: vcpu->mutex: one call at a time on this vCPU (a second thread waits).
        self._mutex = vm._core.Mutex()
        memory = vm._memory
        self._attach(vm._core.VCPUState(vm._config, memory.memslots, memory.mmu))

    def _attach(self, state: Any) -> None:
        state.mutex = self._mutex
        # VCPU.access goes straight to the core, which comes back to the method below
        # when it needs Python.
        state.slow_access = functools.partial(VCPU.access, self)
        state.slow_access_many = functools.partial(VCPU.access_many, self)
        self.access = state.access_api      # type: ignore[method-assign]
        self.access_many = state.access_many_api    # type: ignore[method-assign]
        if state.hypercall is None:
            state.hypercall = NO_HYPERCALL
        self._c = state
        state.vcpu_id = self.vcpu_id
        self.run = KvmRun(state)

    def _detach(self) -> None:
        self.__dict__.pop("access", None)
        self.__dict__.pop("access_many", None)
        self._c = _DetachedVCPU(self.vcpu_id)
        self.run = KvmRun(self._c)

    def __reduce__(self) -> Any:
        raise TypeError("a VCPU cannot be copied or pickled; use VM.snapshot()")

    def __repr__(self) -> str:
        return f"VCPU(id={self.vcpu_id}, {self.vm.vm_type.name})"

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._c.stats)

    @property
    def stage_hook(self) -> Any:
        return self._c.stage_hook

    @stage_hook.setter
    def stage_hook(self, hook: Any) -> None:
        if hook is not None and not callable(hook):
            raise TypeError(f"stage_hook must be callable or None, not {type(hook).__name__}")
        self._c.stage_hook = hook

    @property
    def rip(self) -> int:
        """The guest RIP that ``kvm_page_fault`` trace events report (the model runs no
        instructions: an embedder sets it before an access; 0 by default)."""
        return int(self._c.rip)

    @rip.setter
    def rip(self, value: Any) -> None:
        self._c.rip = _args.u64("rip", value)

    def _vendor(self, vendor: str, handler: str) -> None:
        if self.vm.vendor != vendor:
            raise ValueError(f"{handler} is a {vendor} exit; this VM runs on {self.vm.vendor}")

    def handle_ept_violation(self, gpa: Any, exit_qualification: Any,
                             ext_exit_qualification: Any = 0) -> int:
        """handle_ept_violation (VMX) or tdx_handle_ept_violation (TDX).  For a TD,
        ``ext_exit_qualification`` is the extended exit qualification the TDX module
        gives (RDX): type 6 (PENDING_EPT_VIOLATION) on a private GPA without permission
        bits means the guest touched a page it had not accepted, and KVM kills the VM
        (-EIO; ``VM.dead``)."""
        self._vendor("vmx", "handle_ept_violation")
        g, q = _args.u64("gpa", gpa), _args.u64("exit_qualification", exit_qualification)
        x = _args.u64("ext_exit_qualification", ext_exit_qualification)

        def handle(state: Any) -> int:
            state.ext_exit_qual = x
            return int(state.handle_ept_violation(g, q))
        return self._run(handle)

    def handle_ept_misconfig(self, gpa: Any) -> int:
        """handle_ept_misconfig: the MMIO path (a KVM bug, -EIO, for a TD)."""
        self._vendor("vmx", "handle_ept_misconfig")
        g = _args.u64("gpa", gpa)
        return self._run(lambda state: state.handle_ept_misconfig(g))

    def handle_npf(self, gpa: Any, exit_info_1: Any) -> int:
        """npf_interception: synthetic bits cleared, GUEST_ENC private on SNP."""
        self._vendor("svm", "handle_npf")
        g, e = _args.u64("gpa", gpa), _args.u64("exit_info_1", exit_info_1)
        return self._run(lambda state: state.handle_npf(g, e))

    def _run(self, call: Callable[[Any], Any], kvm_run: bool = True) -> Any:
        """``call(state)`` (the core takes the vCPU's mutex), then the trace events go out.
        A KVM_RUN (``kvm_run``) first runs a pending completion with what
        kvm_run.hypercall.ret holds (vcpu->arch.complete_userspace_io)."""
        vm = self.vm
        if kvm_run:
            vm._enter_guest()
        else:
            vm._check_alive()
        if kvm_run and self._c.hypercall.pending is not None:
            with _held(self._mutex):
                if self._c.hypercall.pending is not None:
                    self._complete(self._c, self._c.hypercall.ret)
        if kvm_run:
            self._c.interrupt_pending = False   # the guest runs and takes it
        try:
            result = call(self._c)
        except BaseException:
            self.vm._flush_trace(raise_errors=False)
            raise
        if self.vm._tracer is not None or self.vm._on_zap is not None:
            self.vm._flush_trace()
        return result

    def hypercall(self, nr: Any, a0: Any = 0, a1: Any = 0, a2: Any = 0, a3: Any = 0) -> Any:
        """The guest executes VMCALL / VMMCALL with RAX = ``nr`` and RBX, RCX, RDX, RSI =
        ``a0`` .. ``a3`` (kvm_emulate_hypercall, x86.c, 6.18; see kvmemu._hypercall):
        the guest's RAX afterwards (signed: -1000 is -KVM_ENOSYS), or a HypercallExit
        that userspace answers with ``complete_hypercall``.  Not for a TD
        (TDG.VP.VMCALL: ``tdvmcall_map_gpa``)."""
        if self.vm.vm_type == VMType.TDX:
            raise ValueError("a TD makes hypercalls with TDG.VP.VMCALL, not VMCALL")
        values = [_args.u64(name, v) for name, v in
                  (("nr", nr), ("a0", a0), ("a1", a1), ("a2", a2), ("a3", a3))]
        with _held(self._mutex):
            state = self._guest_request()
            return emulate_hypercall(state, self.vm._hypercall_exit_enabled, *values)

    def _guest_request(self) -> Any:
        """The vCPU's state for a guest request (the vCPU's mutex held): the next KVM_RUN
        (EIO on a dead VM; a launch never ended ends implicitly) first completes a
        pending exit with kvm_run.hypercall.ret as it stands, and starts with
        KVM_EXIT_UNKNOWN."""
        self.vm._enter_guest()
        state = self._c
        if state.hypercall.pending is not None:
            self._complete(state, state.hypercall.ret)
        state.exit_reason = ExitReason.UNKNOWN.value
        return state

    @property
    def interrupt_pending(self) -> bool:
        """An event is pending for the vCPU (kvm_vcpu_has_events: an interrupt the VMM
        injected or raised).  The model delivers nothing; it only lets a TD's MapGPA stop
        with RETRY (tdx_complete_vmcall_map_gpa).  Cleared when the guest next runs: a
        request's final result, an access."""
        return bool(self._c.interrupt_pending)

    @interrupt_pending.setter
    def interrupt_pending(self, value: Any) -> None:
        self._c.interrupt_pending = _args.flag("interrupt_pending", value)

    def _complete(self, state: Any, ret: int) -> Any:
        """A pending hypercall completion (the vCPU's mutex held); the guest runs again
        unless another exit follows, and takes a pending interrupt then."""
        result = complete_hypercall(state, ret, self.vm.shared_bit,
                                    self.vm._hypercall_exit_enabled, state.interrupt_pending)
        if not isinstance(result, HypercallExit):
            state.interrupt_pending = False
        return result

    def complete_hypercall(self, ret: Any) -> Any:
        """KVM_RUN after a HypercallExit, with kvm_run.hypercall.ret = ``ret`` (an int in
        -2**63 .. 2**64 - 1): the guest's RAX (signed).  RuntimeError when no hypercall
        exit is pending."""
        value = _args.integer("ret", ret)
        if not -(1 << 63) <= value < 1 << 64:
            raise OverflowError(f"ret {value} does not fit 64 bits")
        with _held(self._mutex):
            state = self._c
            state.exit_reason = ExitReason.UNKNOWN.value
            return self._complete(state, value)

    def tdvmcall_map_gpa(self, gpa: Any, size: Any) -> Any:
        """A TD's TDG.VP.VMCALL<MapGPA> (tdx_map_gpa, tdx.c, 6.18; see kvmemu._hypercall):
        a TdvmcallResult (status, r11) for the TD, or a HypercallExit per 2 MiB chunk,
        each answered with ``complete_hypercall``.  Only for a TD (ValueError)."""
        if self.vm.vm_type != VMType.TDX:
            raise ValueError("TDG.VP.VMCALL<MapGPA> is a TD's request")
        g = _args.u64("gpa", gpa)
        s = _args.u64("size", size)
        with _held(self._mutex):
            state = self._guest_request()
            return tdx_map_gpa(state, self.vm._hypercall_exit_enabled, self.vm.shared_bit,
                               self.vm.gpaw, g, s)

    def _snp_request(self, what: str) -> None:
        if self.vm.vm_type != VMType.SNP:
            raise ValueError(f"{what} is an SEV-SNP guest's request")

    def snp_page_state_change(self, entries: Any) -> Any:
        """An SNP guest's GHCB page state change request (VMGEXIT PSC; snp_begin_psc,
        svm/sev.c, 6.18; see kvmemu._hypercall): ``entries`` a list of ``(gfn,
        operation, page_size_2m)`` (gfn < 2**40, operation < 16: PRIVATE 1, SHARED 2).
        A PscResult when it ends, or a HypercallExit per range that userspace answers
        with ``complete_hypercall``."""
        self._snp_request("a page state change")
        checked = []
        for entry in list(entries):
            gfn, op, huge = entry
            checked.append((_args.int_range("gfn", gfn, 0, (1 << 40) - 1),
                            _args.int_range("operation", op, 0, 15),
                            _args.flag("page_size_2m", huge)))
        with _held(self._mutex):
            state = self._guest_request()
            return snp_page_state_change(state, self.vm._hypercall_exit_enabled, checked)

    def snp_psc_msr(self, gfn: Any, op: Any) -> Any:
        """The GHCB MSR protocol's page state change request for one page
        (snp_begin_psc_msr, svm/sev.c, 6.18): the GHCB MSR value the guest reads back
        (GHCB_MSR_PSC_RESP, or with bit 63 for an error), or a HypercallExit that
        ``complete_hypercall`` answers."""
        self._snp_request("a page state change")
        g = _args.int_range("gfn", gfn, 0, (1 << 40) - 1)
        o = _args.int_range("op", op, 0, 15)
        with _held(self._mutex):
            state = self._guest_request()
            return snp_begin_psc_msr(state, self.vm._hypercall_exit_enabled, g, o)

    def pvalidate(self, gpa: Any, page_size: Any = PG_LEVEL_4K, validate: Any = True) -> Any:
        """The SNP guest executes PVALIDATE on ``gpa`` (its GVA is its GPA in the model;
        AMD APM vol. 3, see kvmemu._launch.pvalidate): 0 when the RMP entry's Validated
        bit changed, 255 (PVALIDATE_FAIL_NOUPDATE) when it already had that value, 6 for
        a 2M request on a 4K RMP entry, 1 for an address not aligned to ``page_size``
        (PG_LEVEL_4K or PG_LEVEL_2M).  Its nested walk runs as any access of the
        guest's: a #NPF is handled by KVM, and when KVM leaves to userspace the exit
        (e.g. a MemoryFaultExit for a GPA the attributes call shared) is returned
        instead.  Only for an SNP VM (ValueError)."""
        if self.vm.vm_type != VMType.SNP:
            raise ValueError("PVALIDATE is an SEV-SNP guest's instruction")
        g = _args.u64("gpa", gpa)
        size = _args.int_range("page_size", page_size, PG_LEVEL_4K, PG_LEVEL_2M)
        v = _args.flag("validate", validate)
        return self._run(lambda state: _launch.pvalidate(
            self.vm._memory, lambda a, f: state.access(a, f, ACCESS_LOOP_LIMIT), g, size, v))

    def tdx_accept(self, gpa: Any, level: Any = PG_LEVEL_4K) -> Any:
        """The TD executes TDG.MEM.PAGE.ACCEPT on ``gpa`` at ``level`` (PG_LEVEL_4K,
        PG_LEVEL_2M or PG_LEVEL_1G; see kvmemu._launch.tdx_accept): a TdxModuleStatus
        (SUCCESS, PAGE_ALREADY_ACCEPTED, PAGE_SIZE_MISMATCH, OPERAND_INVALID).  A page
        not yet mapped is first an EPT violation that KVM handles (TDH.MEM.PAGE.AUG);
        when KVM leaves to userspace instead, that exit is returned.  Only for a TD
        (ValueError)."""
        if self.vm.vm_type != VMType.TDX:
            raise ValueError("TDG.MEM.PAGE.ACCEPT is a TD's instruction")
        g = _args.u64("gpa", gpa)
        lvl = _args.int_range("level", level, PG_LEVEL_4K, PG_LEVEL_1G)
        return self._run(lambda state: _launch.tdx_accept(
            self.vm._memory, lambda a, f: state.access(a, f, ACCESS_LOOP_LIMIT),
            self.vm.shared_bit, g, lvl))

    def pre_fault_memory(self, gpa: Any, size: Any, flags: Any = 0) -> int:
        """KVM_PRE_FAULT_MEMORY (kvm_vcpu_pre_fault_memory, kvm_main.c, and
        kvm_arch_vcpu_pre_fault_memory, mmu.c, 6.18): map [gpa, gpa + size) as a fault
        would (a prefetch: no accessed bit, no fault statistics; private where the
        attributes say so), a page or huge page at a time; returns the bytes left (0 when
        done).  Errors raise KvmError with the ioctl's errno when no page was mapped:
        EINVAL (flags, alignment, empty or wrapping range, a TD's shared-bit alias),
        EOPNOTSUPP (SNP before launch finish, TDX before finalize), ENOENT (no memslot:
        MMIO), EFAULT (private memory without guest_memfd), EAGAIN (the memslot went
        away meanwhile).  After some progress an error is not reported: the bytes left
        say where it stopped, and calling again from there reports it."""
        g = _args.u64("gpa", gpa)
        s = _args.u64("size", size)
        f = _args.u64("flags", flags)
        self._pre_faulted = True
        return self._run(lambda state: state.pre_fault_memory(g, s, f), kvm_run=False)

    def access_many(self, gpas: Any, flags: Any = 0, *, out: Any = None) -> AccessBatch:
        """``access`` for each element of ``gpas`` (1-D uint64) in order, ``flags`` an
        ``AccessFlags`` int or a 1-D uint8 array of them, stopping at the first access
        that leaves to userspace (``.exit``).  The loop runs in the core, without Python
        work per element; resume with ``gpas[result.count:]``.  ``out=(hpa, level)``
        gives the result arrays to fill (uint64 and uint8, as long as ``gpas``), so that
        a caller in a loop allocates them once."""
        tables = self.vm.page_tables
        g = _args.gpa_array(gpas, tables.levels)
        f = _args.access_flags_array(flags, len(g))
        o = _args.batch_out(out, g, f)
        if self._c.stage_hook is not None:
            # The hook could write into the caller's arrays during the batch: the core
            # reads a copy of what was checked.
            g = g.copy()
            f = f.copy() if isinstance(f, np.ndarray) else f
        return self._run(lambda state: state.access_many(g, f, ACCESS_LOOP_LIMIT, o))

    def access(self, gpa: Any, *, write: Any = False, fetch: Any = False, user: Any = False,
               stage: Any = "final", encrypted: Any = False, size: Any = None,
               data: Any = None) -> Any:
        """Hardware walk, exit, handler, resume, until the access translates (Translation)
        or KVM leaves to userspace (MemoryFaultExit, MmioExit) or the guest takes an
        exception (GuestException).  A TDX private GPA walks the private tables.  Another
        failure of KVM_RUN raises KvmError with its errno; a loop that does not settle
        raises RuntimeError.  ``size`` (1, 2, 4 or 8 bytes) and, for a write, ``data``
        (an int that fits, or that many bytes) are what an MmioExit then carries as
        kvm_run.mmio's len and data.  (Each VCPU calls its core's ``access_api``, which
        comes back here only when something around KVM_RUN needs Python.)"""
        mmio = _args.mmio_payload(size, data, write)
        result = self._run(lambda state: state.access_checked(gpa, write, fetch, user, stage,
                                                              encrypted, ACCESS_LOOP_LIMIT))
        if mmio is not None and type(result) is MmioExit:
            return MmioExit(result.gpa, result.is_write, *mmio)
        return result


class _WaitedForInvalidations(Exception):
    """A memslot change waited for host invalidations and must check its arguments
    against the VM's state again."""


def _held(mutex: Any) -> Held:
    """``with`` a vCPU's mutex held (vcpu->mutex around a vCPU ioctl)."""
    return Held(mutex.acquire, mutex.release)


class _AllVCPUs:
    """Holds the mutex of each vCPU of a list, taken in order and given back in reverse."""

    def __init__(self, vcpus: list["VCPU"]) -> None:
        self._vcpus = list(vcpus)
        self._held: list[Any] = []

    def __enter__(self) -> None:
        try:
            for vcpu in self._vcpus:
                vcpu._mutex.acquire()
                self._held.append(vcpu._mutex)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: Any) -> None:
        while self._held:
            self._held.pop().release()


class _DetachedVCPU:
    """Stands in for the core state of a vCPU that a restore removed."""

    def __init__(self, vcpu_id: int) -> None:
        self._vcpu_id = vcpu_id

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"vCPU {self._vcpu_id} was created after the snapshot that was "
                           "restored; it no longer exists")


#: The names each implementation provides; kvmemu re-exports them from the chosen one.
IMPLEMENTATION_NAMES = ("vmx_error_code", "svm_error_code", "tdx_shared_bit", "PageTables",
                        "Translation", "EptViolation", "EptMisconfig", "NestedPageFault", "VM",
                        "MemoryFaultExit", "MmioExit")


def tdx_shared_bit(gpaw: Any) -> Any:
    """tdx_shared_bit(gpaw)

    The TDX shared-GPA bit for a guest physical-address width (TDX_SHARED_BIT_PWL_4 /
    _PWL_5, arch/x86/kvm/vmx/tdx.c, 6.18): ``1 << 47`` for 48, ``1 << 51`` for 52;
    ValueError for any other width.  A 1-D uint64 array of widths gives an array of
    bits.  A table lookup, not a per-access rule: one function serves both cores.
    """
    if isinstance(gpaw, np.ndarray):
        _, (widths,), out = _args.operands(None, ("gpaw", gpaw))
        bad = (widths != 48) & (widths != 52)
        if bad.any():
            raise ValueError(f"gpaw must be 48 or 52, not {int(widths[bad.argmax()])}")
        out[:] = np.where(widths == 52, np.uint64(TDX_GPAW_SHARED_BIT[52]),
                          np.uint64(TDX_GPAW_SHARED_BIT[48]))
        return out
    return TDX_GPAW_SHARED_BIT[_args.gpaw(gpaw)]


def bind(core: ModuleType, name: str) -> ModuleType:
    """The public names of one implementation: the core's functions and PageTables, the
    result classes, and a ``VM`` class that builds its state from ``core``."""
    api = ModuleType(f"kvmemu.implementation.{name}",
                     f"kvmemu's API over the {name} core ({core.__name__}).")
    vm_class = type("VM", (VM,), {"__doc__": VM.__doc__, "__module__": VM.__module__,
                                  "__qualname__": "VM", "_core": core})
    values = {"vmx_error_code": core.vmx_error_code, "svm_error_code": core.svm_error_code,
              "tdx_shared_bit": tdx_shared_bit, "PageTables": core.PageTables,
              "Translation": Translation, "EptViolation": EptViolation,
              "EptMisconfig": EptMisconfig, "NestedPageFault": NestedPageFault, "VM": vm_class,
              "MemoryFaultExit": MemoryFaultExit, "MmioExit": MmioExit}
    for attr in IMPLEMENTATION_NAMES:
        setattr(api, attr, values[attr])
    setattr(api, "IMPLEMENTATION", name)
    setattr(api, "core", core)
    return api
