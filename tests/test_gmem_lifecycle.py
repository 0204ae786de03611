"""guest_memfd's lifecycle: punching holes and closing the file.

Sources (Linux 6.18): vfs_fallocate (fs/open.c: EINVAL for a negative offset or a size
not above 0, EFBIG past s_maxbytes), kvm_gmem_fallocate, kvm_gmem_punch_hole,
__kvm_gmem_invalidate_begin / _end, kvm_gmem_get_invalidate_filter and
kvm_gmem_release (virt/kvm/guest_memfd.c: slot->gmem.file = NULL, then an
invalidation of every binding), kvm_gmem_get_pfn (-EFAULT without a file), and
kvm_mmu_faultin_pfn_gmem (mmu.c: KVM_EXIT_MEMORY_FAULT for that -EFAULT).
"""

import errno

import pytest

from kvmemu import KvmError, MemAttr, MemFlag, MemoryFaultExit, Translation, VMType

MIB = 1 << 20
UADDR = 1 << 30


def gmem_vm(kv, vm_type=VMType.SW_PROTECTED):
    vm = kv.VM(vm_type)
    gmem = vm.create_guest_memfd(4 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem)
    vm.set_memory_attributes(0, 2 * MIB, MemAttr.PRIVATE)
    return vm, vm.create_vcpu(), gmem


def test_punch_hole_invalidates_the_bound_range(kv):
    """One begin/end over the bound slot's gfns in the file range: the private mapping
    goes, mmu_invalidate_seq moves once, the range is the punched pages; a later fault
    maps the page again.  A range no slot binds changes nothing."""
    vm, vcpu, gmem = gmem_vm(kv)
    vcpu.access(0x3000)
    vcpu.access(0x4000)
    seq = vm.mmu_invalidate_seq
    gmem.punch_hole(0x3000, 0x1000)
    assert vm.mmu_invalidate_seq == seq + 1 and vm.mmu_invalidate_range == (3, 4)
    assert vm.stats["pages_4k"] == 1
    assert vcpu.access(0x3000) == Translation((gmem.pfn(3) << 12), 1)
    gmem.punch_hole(8 * MIB, 0x1000)                      # past every binding
    assert vm.mmu_invalidate_seq == seq + 1


def test_punch_hole_errors(kv):
    _, _, gmem = gmem_vm(kv)
    for args, code in [((1 << 63, 0x1000), errno.EINVAL), ((0, 0), errno.EINVAL),
                       ((0x800, 0x1000), errno.EINVAL),
                       (((1 << 63) - 0x1000, 0x2000), errno.EFBIG)]:
        with pytest.raises(KvmError) as info:
            gmem.punch_hole(*args)
        assert info.value.errno == code


def test_close_drops_the_file_from_its_memslots(kv):
    """kvm_gmem_release: an invalidation of every binding (a VM other than a TD has one
    root, so shared mappings in the range go too), then guest_memfd faults fail with
    KVM_EXIT_MEMORY_FAULT; shared memory from the host still maps."""
    vm, vcpu, gmem = gmem_vm(kv)
    vcpu.access(0x3000)
    vcpu.access(0x203000)
    gmem.close()
    assert gmem.closed and vm.stats["pages_4k"] == 0
    assert vcpu.access(0x3000) == MemoryFaultExit(8, 0x3000, 0x1000)
    assert vcpu.access(0x203000) == Translation(UADDR + 0x203000, 1)
    for call in (gmem.close, lambda: gmem.punch_hole(0, 0x1000),
                 lambda: vm.set_user_memory_region(
                     slot=1, guest_phys_addr=1 << 30, memory_size=MIB,
                     userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD, guest_memfd=gmem)):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert vm.check_invariants() == []


def test_a_td_keeps_its_shared_mappings_when_the_file_closes(kv):
    """kvm_gmem_get_invalidate_filter: PRIVATE; a TD's shared (direct) root is spared."""
    vm, vcpu, gmem = gmem_vm(kv, VMType.TDX)
    shared = vm.shared_bit
    vcpu.access(0x3000)
    vcpu.access(shared | 0x203000)
    gmem.close()
    assert vm.private_page_tables.get_entry(0x3000, 1) == 1 << 63
    assert vm.page_tables.get_entry(shared | 0x203000, 1) != 1 << 63


def test_snapshots_restore_an_open_file(kv):
    vm, vcpu, gmem = gmem_vm(kv)
    snap = vm.snapshot()
    gmem.close()
    vm.restore(snap)
    assert not gmem.closed
    assert vcpu.access(0x3000) == Translation(gmem.pfn(3) << 12, 1)


def test_bindings_of_one_file_overlap_checks_and_range_queries():
    """kvm_gmem_bind refuses a range that intersects a bound one (EINVAL); the
    invalidation of a file range finds the bound ranges it intersects, in file order."""
    from kvmemu._memory import GmemBindings
    b = GmemBindings()
    b.add((0, 3), 16, 32)
    b.add((0, 1), 0, 8)
    b.add((0, 2), 40, 41)
    assert [b.overlaps(lo, hi) for lo, hi in
            [(8, 16), (7, 8), (31, 40), (32, 40), (41, 1 << 40), (0, 1 << 40), (40, 41)]] == [
        False, True, True, False, False, True, True]
    assert [k for _, _, k in b.in_range(0, 1 << 40)] == [(0, 1), (0, 3), (0, 2)]
    assert b.in_range(8, 16) == [] and b.in_range(41, 50) == []
    assert b.in_range(31, 41) == [(16, 32, (0, 3)), (40, 41, (0, 2))]
    b.remove((0, 3))
    assert not b.overlaps(8, 40) and b.copy().in_range(0, 64) == b.in_range(0, 64)


def test_many_slots_bound_to_one_file(kv):
    """4K one-page memslots over one guest_memfd: each bind checks its neighbours only;
    an overlapping bind fails with EINVAL; a punch-hole finds the slots it covers."""
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(4096 << 12)
    for i in range(4096):
        vm.set_user_memory_region(slot=i, guest_phys_addr=i << 13, memory_size=4096,
                                  userspace_addr=0x7F0000000000, flags=MemFlag.GUEST_MEMFD,
                                  guest_memfd=gmem, guest_memfd_offset=i << 12)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(slot=5000, guest_phys_addr=1 << 30, memory_size=8192,
                                  userspace_addr=0x7F0000000000, flags=MemFlag.GUEST_MEMFD,
                                  guest_memfd=gmem, guest_memfd_offset=4095 << 12)
    assert info.value.errno == errno.EINVAL
    vm.set_memory_attributes(0, 1 << 30, MemAttr.PRIVATE)
    vcpu = vm.create_vcpu()
    vcpu.access(5 << 13)
    vcpu.access(6 << 13)
    gmem.punch_hole(5 << 12, 4096)
    assert vm.stats["pages_4k"] == 1
