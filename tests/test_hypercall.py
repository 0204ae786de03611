"""Guest hypercalls: KVM_CAP_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE and its completion.

Sources (Linux 6.18): kvm_vm_ioctl_enable_cap's KVM_CAP_EXIT_HYPERCALL and
KVM_EXIT_HYPERCALL_VALID_MASK, ____kvm_emulate_hypercall, complete_hypercall_exit
(arch/x86/kvm/x86.c), __kvm_emulate_hypercall and user_exit_on_hypercall (x86.h);
include/uapi/linux/kvm_para.h (KVM_ENOSYS 1000, KVM_EINVAL, KVM_HC_* numbers) and
arch/x86/include/uapi/asm/kvm_para.h (KVM_MAP_GPA_RANGE_*); KVM_EXIT_HYPERCALL 3 and
KVM_EXIT_HYPERCALL_LONG_MODE in include/uapi/linux/kvm.h.
"""

import errno

import pytest

from kvmemu import (KVM_HC_MAP_GPA_RANGE, ExitReason, HypercallExit, KvmError, MapGpaFlag,
                    VMType)


def test_uapi_values():
    assert KVM_HC_MAP_GPA_RANGE == 12
    assert (MapGpaFlag.PAGE_SZ_2M, MapGpaFlag.PAGE_SZ_1G, MapGpaFlag.ENCRYPTED) == (1, 2, 16)


def test_enable_exit_hypercall_accepts_only_map_gpa_range(kv):
    vm = kv.VM(VMType.SNP)
    for bad in (1, 1 << 11, (1 << 12) | 1):
        with pytest.raises(KvmError) as info:
            vm.enable_exit_hypercall(bad)
        assert info.value.errno == errno.EINVAL
    assert vm.hypercall_exit_enabled == 0
    vm.enable_exit_hypercall(1 << 12)
    assert vm.hypercall_exit_enabled == 1 << 12
    vm.enable_exit_hypercall(0)                       # the mask is replaced
    assert vm.hypercall_exit_enabled == 0


def test_without_the_exit_the_guest_sees_enosys(kv):
    vcpu = kv.VM(VMType.SNP).create_vcpu()
    assert vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0x1000, 1, MapGpaFlag.ENCRYPTED) == -1000
    assert vcpu.run.hypercall.ret == (1 << 64) - 1000       # kvm_run.hypercall.ret


def test_map_gpa_range_exits_and_completes(kv):
    """The exit carries gpa, npages, attrs in args[0..2], flags LONG_MODE, ret 0; the
    attributes are not checked; complete_hypercall_exit puts userspace's ret in RAX."""
    vm = kv.VM(VMType.SW_PROTECTED)
    vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    vcpu = vm.create_vcpu()
    exit_ = vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0x200000, 512, 0xFFFF)
    assert exit_ == HypercallExit(12, (0x200000, 512, 0xFFFF, 0, 0, 0), 1)
    assert exit_.exit_reason == ExitReason.HYPERCALL
    assert vcpu.run.exit_reason == ExitReason.HYPERCALL
    assert vcpu.run.hypercall == (12, (0x200000, 512, 0xFFFF, 0, 0, 0), 0, 1)
    assert vcpu.complete_hypercall(-22) == -22
    assert vcpu.run.hypercall.ret == (1 << 64) - 22
    with pytest.raises(RuntimeError):
        vcpu.complete_hypercall(0)                     # nothing pending any more


@pytest.mark.parametrize("gpa, npages", [(0x1001, 1), (0x1000, 0),
                                         (0x1000, (1 << 64) - 1), (0x5000, (1 << 64) - 3)])
def test_map_gpa_range_argument_errors_are_kvm_einval(kv, gpa, npages):
    """Unaligned gpa, npages 0, gfn + npages wrapping around 2**64 (the u64 sum, not the
    GPA width): -KVM_EINVAL (-22), no exit."""
    vm = kv.VM(VMType.SEV)
    vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    vcpu = vm.create_vcpu()
    assert vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, npages) == -22
    assert vcpu.run.exit_reason == ExitReason.UNKNOWN


def test_a_range_beyond_any_gpa_still_exits(kv):
    """Only the u64 sum of gfn and npages is checked: the last page of the 64-bit space
    goes to userspace."""
    vm = kv.VM(VMType.SEV)
    vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    exit_ = vm.create_vcpu().hypercall(KVM_HC_MAP_GPA_RANGE, (1 << 64) - 0x1000, 1 << 52)
    assert exit_.args[:2] == ((1 << 64) - 0x1000, 1 << 52)


def test_other_hypercalls(kv):
    """VAPIC_POLL_IRQ: 0; KICK_CPU, SEND_IPI, SCHED_YIELD without the PV features:
    -KVM_ENOSYS; CLOCK_PAIRING without a TSC clocksource: -KVM_EOPNOTSUPP (-95);
    anything else -KVM_ENOSYS."""
    vcpu = kv.VM().create_vcpu()
    assert [vcpu.hypercall(nr) for nr in (1, 5, 9, 10, 11, 0, 2, 13, 1 << 63)] == [
        0, -1000, -95, -1000, -1000, -1000, -1000, -1000, -1000]


def test_a_pending_exit_is_completed_by_the_next_run(kv):
    """KVM_RUN runs complete_userspace_io first: an access after an unanswered exit
    completes it with kvm_run.hypercall.ret as KVM left it (0)."""
    vm = kv.VM(VMType.SNP)
    vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    vcpu = vm.create_vcpu()
    assert isinstance(vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0, 1), HypercallExit)
    vcpu.access(0x1000)
    with pytest.raises(RuntimeError):
        vcpu.complete_hypercall(0)
    assert isinstance(vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0, 1), HypercallExit)
    assert vcpu.hypercall(1) == 0                       # completes the first, then runs


def test_arguments_and_td(kv):
    vcpu = kv.VM().create_vcpu()
    with pytest.raises(OverflowError):
        vcpu.hypercall(1 << 64)
    with pytest.raises(TypeError):
        vcpu.hypercall("12")
    with pytest.raises(ValueError):
        kv.VM(VMType.TDX).create_vcpu().hypercall(KVM_HC_MAP_GPA_RANGE)
    vm = kv.VM(VMType.SNP)
    vm.enable_exit_hypercall(1 << 12)
    v = vm.create_vcpu()
    v.hypercall(12, 0, 1)
    with pytest.raises(OverflowError):
        v.complete_hypercall(1 << 64)
    snap = vm.snapshot()                                 # the pending exit is state
    assert v.complete_hypercall(5) == 5
    vm.restore(snap)
    assert v.complete_hypercall(7) == 7


# --- TDX: TDG.VP.VMCALL<MapGPA> (tdx_map_gpa, __tdx_map_gpa, tdx_complete_vmcall_map_gpa,
# arch/x86/kvm/vmx/tdx.c; status codes from arch/x86/include/asm/shared/tdx.h) ----------

SHARED = 1 << 47          # a TD with GPAW 48


def vm_and_vcpu(kv, vm_type, enabled=True):
    """A VM of ``vm_type`` (KVM_HC_MAP_GPA_RANGE exiting if ``enabled``) and a vCPU."""
    vm = kv.VM(vm_type)
    if enabled:
        vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    return vm, vm.create_vcpu()


def td(kv, enabled=True):
    return vm_and_vcpu(kv, VMType.TDX, enabled)


def test_map_gpa_goes_to_userspace_2mib_at_a_time(kv):
    """5 MiB to shared: three exits of 512, 512 and 256 pages, each GPA without the
    shared bit and attributes DECRYPTED (0); then SUCCESS."""
    from kvmemu import TdvmcallResult, TdvmcallStatus
    vm, vcpu = td(kv)
    exit_ = vcpu.tdvmcall_map_gpa(SHARED | 0x400000, 5 << 20)
    assert exit_ == HypercallExit(12, (0x400000, 512, 0, 0, 0, 0), 1)
    exit_ = vcpu.complete_hypercall(0)
    assert exit_ == HypercallExit(12, (0x600000, 512, 0, 0, 0, 0), 1)
    exit_ = vcpu.complete_hypercall(0)
    assert exit_ == HypercallExit(12, (0x800000, 256, 0, 0, 0, 0), 1)
    assert vcpu.complete_hypercall(0) == TdvmcallResult(TdvmcallStatus.SUCCESS, 0)
    assert vcpu.tdvmcall_map_gpa(0x1000, 0x1000) == HypercallExit(
        12, (0x1000, 1, MapGpaFlag.ENCRYPTED, 0, 0, 0), 1)          # private: ENCRYPTED


def test_map_gpa_userspace_error_stops_at_the_chunk(kv):
    """A non-zero ret: INVALID_OPERAND with R11 = the GPA of the chunk that failed."""
    from kvmemu import TdvmcallResult, TdvmcallStatus
    vm, vcpu = td(kv)
    vcpu.tdvmcall_map_gpa(0x200000, 4 << 20)
    vcpu.complete_hypercall(0)
    assert vcpu.complete_hypercall(-22) == TdvmcallResult(TdvmcallStatus.INVALID_OPERAND,
                                                          0x400000)


@pytest.mark.parametrize("gpa, size, status", [
    (0x1000, 0, 0x8000000000000000),                   # gpa + size <= gpa
    (1 << 48, 0x1000, 0x8000000000000000),             # beyond the GPA width
    (SHARED - 0x1000, 0x2000, 0x8000000000000000),     # ends on both sides of the shared bit
    (0x1800, 0x1000, 0x8000000000000002),              # ALIGN_ERROR
    (0x1000, 0x800, 0x8000000000000002)])
def test_map_gpa_checks(kv, gpa, size, status):
    vm, vcpu = td(kv)
    result = vcpu.tdvmcall_map_gpa(gpa, size)
    assert (result.status, result.r11) == (status, gpa)


def test_map_gpa_without_the_exit_is_unsupported(kv):
    vm, vcpu = td(kv, enabled=False)
    assert vcpu.tdvmcall_map_gpa(0x1000, 0x1000).status == 0x8000000000000003
    with pytest.raises(ValueError):
        kv.VM(VMType.SNP).create_vcpu().tdvmcall_map_gpa(0, 0x1000)


# --- SEV-SNP page state change (snp_begin_psc, snp_complete_one_psc, __snp_complete_one_psc,
# snp_complete_psc, snp_begin_psc_msr, snp_complete_psc_msr: arch/x86/kvm/svm/sev.c; the
# values of arch/x86/include/asm/sev-common.h) -------------------------------------------

def snp(kv, enabled=True):
    return vm_and_vcpu(kv, VMType.SNP, enabled)


def test_psc_msr_protocol(kv):
    """One page: ENCRYPTED for PRIVATE (1), DECRYPTED for SHARED (2), 4K; the guest reads
    GHCB_MSR_PSC_RESP (0x15) back, or with bit 63 set on error."""
    vm, vcpu = snp(kv)
    assert vcpu.snp_psc_msr(5, 1) == HypercallExit(12, (0x5000, 1, 0x10, 0, 0, 0), 1)
    assert vcpu.complete_hypercall(0) == 0x15
    assert vcpu.snp_psc_msr(5, 2) == HypercallExit(12, (0x5000, 1, 0, 0, 0, 0), 1)
    assert vcpu.complete_hypercall(1) == 0x8000000000000015
    assert vcpu.snp_psc_msr(5, 3) == 0x8000000000000015          # not PRIVATE/SHARED
    assert snp(kv, enabled=False)[1].snp_psc_msr(5, 1) == 0x8000000000000015


def test_psc_merges_adjacent_entries_and_skips_unknown_operations(kv):
    """Adjacent entries with the same operation and size make one exit (two 2M entries:
    1024 pages, PAGE_SZ_2M); an operation other than PRIVATE/SHARED counts as done;
    each finished entry's cur_page is 512 or 1; SW_EXITINFO2 0 at the end."""
    from kvmemu import PscResult
    vm, vcpu = snp(kv)
    entries = [(0, 2, True), (512, 2, True), (2000, 1, False), (2001, 1, False),
               (7, 3, False), (3000, 2, False)]
    assert vcpu.snp_page_state_change(entries) == HypercallExit(
        12, (0, 1024, MapGpaFlag.PAGE_SZ_2M, 0, 0, 0), 1)
    assert vcpu.complete_hypercall(0) == HypercallExit(
        12, (2000 << 12, 2, MapGpaFlag.ENCRYPTED, 0, 0, 0), 1)
    assert vcpu.complete_hypercall(0) == HypercallExit(12, (3000 << 12, 1, 0, 0, 0, 0), 1)
    assert vcpu.complete_hypercall(0) == PscResult(0, 6, (512, 512, 1, 1, 1, 1))


def test_psc_errors(kv):
    """VMGEXIT_PSC_ERROR_*: INVALID_ENTRY (1 << 32 | 2) for a 2M entry whose gfn is not
    2M-aligned; INVALID_HDR (1 << 32 | 1) for end_entry >= 253 (an empty list makes it
    0xffff); GENERIC (0x100 << 32) without the exit or for userspace's error."""
    from kvmemu import PscResult
    vm, vcpu = snp(kv)
    assert vcpu.snp_page_state_change([(1, 2, True)]) == PscResult((1 << 32) | 2, 0, (0,))
    assert vcpu.snp_page_state_change([]) == PscResult((1 << 32) | 1, 0, ())
    assert vcpu.snp_page_state_change([(0, 1, False)] * 254).ret == (1 << 32) | 1
    assert isinstance(vcpu.snp_page_state_change([(0, 1, False)] * 253), HypercallExit)
    assert vcpu.complete_hypercall(7).ret == 0x100 << 32
    vcpu.snp_page_state_change([(0, 1, False), (9, 1, False)])
    assert vcpu.complete_hypercall(5) == PscResult(0x100 << 32, 0, (0, 0))
    assert snp(kv, enabled=False)[1].snp_page_state_change([(0, 1, False)]) == PscResult(
        0x100 << 32, 0, (0,))
    with pytest.raises(ValueError):
        vcpu.snp_page_state_change([(1 << 40, 1, False)])
    with pytest.raises(ValueError):
        kv.VM(VMType.SEV).create_vcpu().snp_psc_msr(0, 1)


# --- the guest asks, the VMM answers, KVM maps what the attributes say ---------------------

def test_a_td_converts_a_buffer_to_shared_with_map_gpa(kv):
    """The VMM's part of MapGPA: on each exit, set the attributes the request names, then
    answer 0.  Afterwards the shared alias of the buffer maps shared (host) memory and the
    private GPA no longer does: a private access is KVM_EXIT_MEMORY_FAULT."""
    from kvmemu import GuestMemfd, MemAttr, MemFlag, MemoryFaultExit, TdvmcallResult
    vm, vcpu = td(kv)
    gmem = vm.create_guest_memfd(8 << 20)
    assert isinstance(gmem, GuestMemfd)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=8 << 20,
                              userspace_addr=1 << 30, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem)
    vm.set_memory_attributes(0, 8 << 20, MemAttr.PRIVATE)
    assert vcpu.access(0x201000).hpa >> 12 == gmem.pfn(0x201)
    result = vcpu.tdvmcall_map_gpa(SHARED | 0x200000, 3 << 20)
    while not isinstance(result, TdvmcallResult):
        gpa, pages, attrs = result.args[:3]
        vm.set_memory_attributes(gpa, pages << 12,
                                 MemAttr.PRIVATE if attrs & MapGpaFlag.ENCRYPTED else 0)
        result = vcpu.complete_hypercall(0)
    assert result.status == 0
    assert vcpu.access(SHARED | 0x201000).hpa == (1 << 30) + 0x201000
    assert vcpu.access(0x201000) == MemoryFaultExit(8, 0x201000, 4096)
    assert vm.check_invariants() == []


def test_an_snp_guest_converts_pages_to_private_with_psc(kv):
    """SNP: a page-state-change to PRIVATE; the VMM marks the range private and answers;
    an encrypted access then maps the guest_memfd frame."""
    from kvmemu import MemAttr, MemFlag, PscResult
    vm, vcpu = snp(kv)
    gmem = vm.create_guest_memfd(4 << 20)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20,
                              userspace_addr=1 << 30, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem)
    assert vcpu.access(0x3000).hpa == (1 << 30) + 0x3000          # shared to begin with
    result = vcpu.snp_page_state_change([(3, 1, False), (4, 1, False)])
    while not isinstance(result, PscResult):
        gpa, pages, attrs = result.args[:3]
        vm.set_memory_attributes(gpa, pages << 12,
                                 MemAttr.PRIVATE if attrs & MapGpaFlag.ENCRYPTED else 0)
        result = vcpu.complete_hypercall(0)
    assert result == PscResult(0, 2, (1, 1))
    assert vcpu.access(0x3000, encrypted=True).hpa >> 12 == gmem.pfn(3)
    assert vm.check_invariants() == []


def test_map_gpa_stops_with_retry_when_an_interrupt_is_pending(kv):
    """tdx_complete_vmcall_map_gpa: after a chunk, kvm_vcpu_has_events -> RETRY with R11 =
    the next chunk's GPA (as the guest gave it, shared bit included); the guest resumes
    from there.  Past the last chunk the request ends with SUCCESS whatever is pending,
    and a userspace error wins over the interrupt."""
    from kvmemu import TdvmcallResult, TdvmcallStatus
    vm, vcpu = td(kv)
    assert vcpu.tdvmcall_map_gpa(SHARED | 0x400000, 5 << 20).args[:2] == (0x400000, 512)
    vcpu.interrupt_pending = True
    assert vcpu.complete_hypercall(0) == TdvmcallResult(TdvmcallStatus.RETRY, SHARED | 0x600000)
    assert not vcpu.interrupt_pending                        # the guest ran and took it
    assert vcpu.tdvmcall_map_gpa(SHARED | 0x600000, 3 << 20).args[:2] == (0x600000, 512)
    assert vcpu.complete_hypercall(0).args[:2] == (0x800000, 256)
    vcpu.interrupt_pending = True
    assert vcpu.complete_hypercall(0) == TdvmcallResult(TdvmcallStatus.SUCCESS, 0)
    vcpu.tdvmcall_map_gpa(0x1000, 4 << 20)
    vcpu.interrupt_pending = True
    assert vcpu.complete_hypercall(-22) == TdvmcallResult(TdvmcallStatus.INVALID_OPERAND, 0x1000)
    with pytest.raises(TypeError):
        vcpu.interrupt_pending = "yes"
