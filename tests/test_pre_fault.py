"""KVM_PRE_FAULT_MEMORY as Linux 6.18 does it.

Sources: kvm_vcpu_pre_fault_memory (virt/kvm/kvm_main.c: checks, the loop, "success if
at least one page was mapped"); kvm_arch_vcpu_pre_fault_memory and kvm_tdp_map_page
(mmu.c: pre_fault_allowed, GUEST_FINAL plus PRIVATE_ACCESS from the attributes, the
step to the end of the page mapped, RET_PF_* to errno); kvm_mmu_do_page_fault with
prefetch (mmu_internal.h: no pf_* statistic counted); make_spte with prefetch (spte.c:
no accessed bit); tdp_mmu_map_handle_target_level (tdp_mmu.c: a present leaf is
SPURIOUS for a prefetch, an MMIO SPTE counts pf_mmio_spte_created);
kvm_mmu_faultin_pfn (KVM_MEMSLOT_INVALID -> -EAGAIN for a prefetch);
kvm_arch_init_vm / svm_vm_init (x86.c, svm.c: pre_fault_allowed).
"""

import errno

import pytest

from kvmemu import ExitReason, KvmError, MemAttr, MemFlag, VMType

UADDR = 1 << 30
MIB = 1 << 20


def vm_with_slot(kv, vm_type=VMType.DEFAULT, vendor=None, host_level=2, **slot):
    vm = kv.VM(vm_type, vendor=vendor)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, host_level=host_level, **slot)
    return vm, vm.create_vcpu()


def failure(call, *args):
    with pytest.raises(KvmError) as info:
        call(*args)
    return info.value.errno


def test_maps_like_a_fault_but_without_the_accessed_bit_or_statistics(kv):
    """EPT 2M leaf of pfn 0x40000 as a fault makes it is 0x8600000040000bf7; a prefetch
    leaves A (0x100) clear: 0x8600000040000af7.  No kvm_page_fault event (that is the
    exit handler's), no pf_* counted."""
    vm, vcpu = vm_with_slot(kv)
    events = []
    vm.trace = lambda event, text: events.append(event)
    assert vcpu.pre_fault_memory(0x1FF000, 0x3000) == 0
    pt = vm.page_tables
    assert pt.get_entry(0, 2) == 0x8600000040000AF7
    assert pt.get_entry(0x200000, 2) == 0x8600000040200AF7
    assert "kvm_page_fault" not in events and events.count("kvm_mmu_set_spte") == 2
    assert set(vcpu.stats.values()) == {0}
    vcpu.access(0x5000, write=True)                    # the CPU sets A on use
    assert pt.get_entry(0, 2) == 0x8600000040000BF7


def test_npt_prefetch_spte(kv):
    """NPT: 0x40000ee7 without A (0x20)."""
    vm, vcpu = vm_with_slot(kv, vendor="svm")
    assert vcpu.pre_fault_memory(0, 0x1000) == 0
    assert vm.page_tables.get_entry(0, 2) == 0x40000EC7


def test_progress_then_failure_reports_the_bytes_left(kv):
    """Step 1 maps up to the end of the 2M page holding 0x300000 (1 MiB); step 2 finds no
    memslot at 4 MiB: -ENOENT after progress, so the ioctl returns 0 and 1 MiB is left.
    From there, the error itself; each MMIO SPTE made counts pf_mmio_spte_created."""
    vm, vcpu = vm_with_slot(kv)
    assert vcpu.pre_fault_memory(0x300000, 2 * MIB) == MIB
    assert failure(vcpu.pre_fault_memory, 4 * MIB, MIB) == errno.ENOENT
    assert vcpu.stats["pf_mmio_spte_created"] == 2
    # make_mmio_spte: generation 2 (one memslot swap, two address spaces) in bits 3..10,
    # the EPT MMIO value W|X (0x6), the GPA.
    assert vm.page_tables.get_entry(4 * MIB, 1) == 4 * MIB | 2 << 3 | 0x6


def test_argument_errors_are_einval(kv):
    """kvm_vcpu_pre_fault_memory: flags, then alignment / empty / wrapping (one test)."""
    vm, vcpu = vm_with_slot(kv)
    assert failure(vcpu.pre_fault_memory, 0, 0x1000, 1) == errno.EINVAL
    assert failure(vcpu.pre_fault_memory, 0x800, 0x1000) == errno.EINVAL
    assert failure(vcpu.pre_fault_memory, 0, 0x800) == errno.EINVAL
    assert failure(vcpu.pre_fault_memory, 0, 0) == errno.EINVAL
    assert failure(vcpu.pre_fault_memory, (1 << 64) - 0x1000, 0x1000) == errno.EINVAL
    with pytest.raises(OverflowError):
        vcpu.pre_fault_memory(1 << 64, 0x1000)


@pytest.mark.parametrize("vm_type, allowed", [
    (VMType.DEFAULT, True), (VMType.SW_PROTECTED, True), (VMType.SEV, True),
    (VMType.SEV_ES, True), (VMType.SNP, False), (VMType.TDX, False)])
def test_pre_fault_allowed(kv, vm_type, allowed):
    """pre_fault_allowed: set at creation for DEFAULT, SW_PROTECTED, SEV and SEV_ES; SNP
    and TDX get it at launch finish / finalize, which the model does not have yet."""
    vm = kv.VM(vm_type)
    vcpu = vm.create_vcpu()
    if allowed:
        assert failure(vcpu.pre_fault_memory, 0, 0x1000) == errno.ENOENT   # no memslot: MMIO
    else:
        assert failure(vcpu.pre_fault_memory, 0, 0x1000) == errno.EOPNOTSUPP


def test_private_memory_follows_the_attributes(kv):
    """SW_PROTECTED: a private gfn is pre-faulted with PRIVATE_ACCESS from guest_memfd (4K:
    order 0); private without guest_memfd is -EFAULT with run.memory_fault filled, as
    kvm_mmu_prepare_memory_fault_exit does (the exit is not delivered)."""
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem, host_level=2)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=4 * MIB,
                              userspace_addr=UADDR + 4 * MIB)
    vm.set_memory_attributes(0, 2 * MIB, MemAttr.PRIVATE)
    vm.set_memory_attributes(1 << 30, 0x1000, MemAttr.PRIVATE)
    vcpu = vm.create_vcpu()
    assert vcpu.pre_fault_memory(0x3000, 0x1000) == 0
    entry = vm.page_tables.get_entry(0x3000, 1)
    assert entry >> 12 & 0xFFFFFFFFF == gmem.pfn(3) and vm.stats["pages_4k"] == 1
    assert failure(vcpu.pre_fault_memory, 1 << 30, 0x1000) == errno.EFAULT
    assert vcpu.run.exit_reason == ExitReason.MEMORY_FAULT
    assert vcpu.run.memory_fault == (8, 1 << 30, 0x1000)


def test_a_present_leaf_is_spurious_whatever_its_permissions(kv):
    """For a prefetch, any present leaf at the goal level is SPURIOUS: a write-protected
    leaf of a dirty-logged slot stays write-protected (NPT 4K leaf 0x40003e65)."""
    vm, vcpu = vm_with_slot(kv, vendor="svm", host_level=1, flags=MemFlag.LOG_DIRTY_PAGES)
    vcpu.access(0x3000, write=True)
    vm.get_dirty_log(0)
    assert vm.page_tables.get_entry(0x3000, 1) == 0x40003E65
    assert vcpu.pre_fault_memory(0x3000, 0x1000) == 0
    assert vm.page_tables.get_entry(0x3000, 1) == 0x40003E65


def test_a_leftover_table_becomes_a_huge_leaf(kv):
    """After a THP collapse KVM has zapped the 4K leaves but kept their table; the
    prefetch's goal is 2M (host_pfn_mapping_level), and the table is replaced by the huge
    leaf (handle_removed_pt frees it)."""
    vm, vcpu = vm_with_slot(kv, host_level=1)
    vcpu.access(0x1000)
    pt = vm.page_tables
    table = pt.get_entry(0, 2)
    assert not table & 0x80                              # a table, not a leaf
    vm.set_host_level(0, 2)
    assert pt.get_entry(0, 2) == table
    assert vcpu.pre_fault_memory(0, 0x1000) == 0
    assert pt.get_entry(0, 2) == 0x8600000040000AF7
    assert vm.stats["pages_2m"] == 1 and vm.check_invariants() == []


@pytest.mark.parametrize("stage", ["faultin", "map"])
def test_a_memslot_going_away_is_eagain(kv, stage):
    """kvm_mmu_faultin_pfn: a memslot being deleted or moved (KVM_MEMSLOT_INVALID) is
    -EAGAIN for a prefetch, where a fault would retry.  Pre-fault holds kvm->srcu for the
    whole range, so in KVM a delete cannot finish under it; the model runs a hook's
    delete first and answers -EAGAIN at either stage, with nothing mapped."""
    vm, vcpu = vm_with_slot(kv)

    def hook(name):
        if name == stage:
            vcpu.stage_hook = None
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0,
                                      userspace_addr=0)

    vcpu.stage_hook = hook
    assert failure(vcpu.pre_fault_memory, 0, 0x1000) == errno.EAGAIN
    assert vcpu.stats["pf_mmio_spte_created"] == 0
