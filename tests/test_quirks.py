"""KVM_CAP_DISABLE_QUIRKS2 and what the MMU reads of the quirks (Linux 6.18).

Values: the KVM_X86_QUIRK_* bits of arch/x86/include/uapi/asm/kvm.h; the initial
mask of kvm_arch_init_vm (x86.c: inapplicable_quirks & supported_quirks, with
vmx_hardware_setup / svm_hardware_setup trimming KVM_X86_CONDITIONAL_QUIRKS and
tdx_vm_init disabling IGNORE_GUEST_PAT); the EINVAL of kvm_vm_ioctl_enable_cap;
vmx_get_mt_mask (vmx.c: WB, plus IPAT while the quirk is on) with the worked
SPTE values of docs/reference.md §10.2; kvm_memslot_flush_zap_all (mmu.c).
"""

import errno

import pytest

from kvmemu import KvmError, Quirk, VMType

GIB = 1 << 30
UADDR = 0xABCDE000


def test_uapi_values():
    assert (Quirk.SLOT_ZAP_ALL, Quirk.IGNORE_GUEST_PAT, Quirk.CD_NW_CLEARED) == (0x80, 0x200, 0x2)
    assert Quirk.VMCS12_ALLOW_FREEZE_IN_SMM == 1 << 10


@pytest.mark.parametrize("vm_type, vendor, initial", [
    (VMType.DEFAULT, "vmx", 0x2), (VMType.DEFAULT, "svm", 0x200),
    (VMType.SW_PROTECTED, "vmx", 0x2), (VMType.SEV, "svm", 0x200),
    (VMType.SNP, "svm", 0x200), (VMType.TDX, "vmx", 0x202)])
def test_initial_mask(kv, vm_type, vendor, initial):
    vm = kv.VM(vm_type, vendor=vendor)
    assert vm.disabled_quirks == initial
    assert isinstance(vm.disabled_quirks, Quirk)


def test_disable_accumulates_and_checks(kv):
    vm = kv.VM()
    vm.disable_quirks(Quirk.SLOT_ZAP_ALL)
    vm.disable_quirks(0)
    assert vm.disabled_quirks == 0x82
    with pytest.raises(KvmError) as info:
        vm.disable_quirks(1 << 11)                 # outside kvm_caps.supported_quirks
    assert info.value.errno == errno.EINVAL
    assert vm.disabled_quirks == 0x82              # nothing changed on the error
    with pytest.raises(OverflowError):
        vm.disable_quirks(1 << 64)
    with pytest.raises(OverflowError):
        vm.disable_quirks(-1)
    with pytest.raises(TypeError):
        vm.disable_quirks("0x80")


def _leaf(vm, gpa):
    return vm.page_tables.walk(gpa)[-1][1]


def test_ignore_guest_pat_decides_ipat_for_new_leaves(kv):
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=UADDR)
    cpu = vm.create_vcpu()
    cpu.access(0, write=True)
    assert _leaf(vm, 0) == 0x86000000ABCDEB77      # WB | IPAT
    before = vm.snapshot()
    vm.disable_quirks(Quirk.IGNORE_GUEST_PAT)
    assert _leaf(vm, 0) == 0x86000000ABCDEB77      # existing SPTEs are not rewritten
    cpu.access(0x1000, write=True)
    assert _leaf(vm, 0x1000) == 0x86000000ABCDFB37  # WB without IPAT (bit 6)
    assert kv.VM().disabled_quirks == 0x2          # per VM
    vm.restore(before)                             # the quirk is VM state
    assert vm.disabled_quirks == 0x2
    cpu.access(0x2000, write=True)
    assert _leaf(vm, 0x2000) == 0x86000000ABCE0B77
    assert vm.check_invariants() == []


def test_npt_has_no_memory_type_either_way(kv):
    vm = kv.VM(vendor="svm")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=UADDR)
    vm.create_vcpu().access(0, write=True)
    assert _leaf(vm, 0) == 0xABCDEE67


def test_slot_zap_all_off_zaps_only_the_slot(kv):
    vm = kv.VM()
    vm.disable_quirks(Quirk.SLOT_ZAP_ALL)
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=2 << 20,
                              userspace_addr=UADDR)
    vm.set_user_memory_region(slot=2, guest_phys_addr=GIB, memory_size=2 << 20,
                              userspace_addr=UADDR + GIB)
    cpu = vm.create_vcpu()
    cpu.access(0x1000)
    cpu.access(GIB + 0x1000)
    vm.set_user_memory_region(slot=2, guest_phys_addr=GIB, memory_size=0, userspace_addr=0)
    assert _leaf(vm, 0x1000) & 0x7                 # kvm_mmu_zap_memslot: slot 1 stays
    assert not _leaf(vm, GIB + 0x1000) & 0x7
