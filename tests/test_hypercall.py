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
