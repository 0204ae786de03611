"""VCPU.access_many and VM.snapshot / VM.restore (docs/api.md §5)."""

import errno

import numpy as np
import pytest

from kvmemu import AccessFlags, KvmError, MemoryFaultExit, MmioExit, Translation, VMType
from kvmemu.constants import EPTE, PT_BASE_HPA
from kvmemu.testing import writable

GIB, MIB = 1 << 30, 1 << 20


def vm_and_vcpu(kv, vm_type=VMType.DEFAULT, gmem=False):
    vm = kv.VM(vm_type)
    extra = {}
    if gmem:
        extra = {"flags": 4, "guest_memfd": vm.create_guest_memfd(GIB)}
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0x7F0000000000, **extra)
    return vm, vm.create_vcpu()


def u64(*values):
    return np.array(values, dtype=np.uint64)


def test_access_many_matches_access(kv):
    vm, vcpu = vm_and_vcpu(kv)
    gpas = u64(0x1000, 0x2345, 0x1000, 0x3000)
    batch = vcpu.access_many(gpas, AccessFlags.WRITE)
    assert (batch.count, batch.exit) == (4, None)
    assert batch.hpa.tolist() == [0x7F0000001000, 0x7F0000002345, 0x7F0000001000, 0x7F0000003000]
    assert batch.level.dtype == np.uint8 and batch.level.tolist() == [1, 1, 1, 1]
    assert vm.stats["pf_fixed"] == 3
    twin_vm, twin = vm_and_vcpu(kv)
    for gpa in gpas.tolist():
        twin.access(gpa, write=True)
    assert twin_vm.stats == vm.stats
    np.testing.assert_array_equal(twin_vm.page_tables.tables, vm.page_tables.tables)


def test_access_many_stops_at_an_exit_and_resumes(kv):
    vm, vcpu = vm_and_vcpu(kv, VMType.SW_PROTECTED, gmem=True)
    vm.set_memory_attributes(0x3000, 4096, 0)
    vm.set_memory_attributes(0x2000, 4096, 8)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0, userspace_addr=0)
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=8192,
                              userspace_addr=0x7F0000000000)
    gpas = u64(0x1000, 0x2000, 0x5000, 0x1000)
    flags = np.array([0, 0, AccessFlags.WRITE, 0], dtype=np.uint8)
    batch = vcpu.access_many(gpas, flags)
    assert batch.count == 1 and batch.exit == MemoryFaultExit(8, 0x2000, 4096)
    vm.set_memory_attributes(0x2000, 4096, 0)                 # the VMM converts, resumes
    batch = vcpu.access_many(gpas[1:], flags[1:])             # shared now, no memslot: MMIO
    assert batch.count == 0 and batch.exit == MmioExit(0x2000, False)
    batch = vcpu.access_many(gpas[2:], flags[2:])
    assert batch.count == 0 and batch.exit == MmioExit(0x5000, True)
    batch = vcpu.access_many(gpas[3:], flags[3:])
    assert (batch.count, batch.exit, batch.hpa.tolist()) == (1, None, [0x7F0000001000])


def test_access_many_checks_its_arguments(kv):
    vm, vcpu = vm_and_vcpu(kv)
    for gpas, flags, exc in [
        ([0x1000], 0, TypeError), (u64(0x1000).astype(np.int64), 0, TypeError),
        (u64(1 << 48), 0, ValueError), (u64(0x1000), np.zeros(2, np.uint8), ValueError),
        (u64(0x1000), np.zeros(1, np.int8), TypeError), (u64(0x1000), 1 << 7, ValueError),
        (u64(0x1000), AccessFlags.FETCH | AccessFlags.WALK, ValueError),
    ]:
        with pytest.raises(exc):
            vcpu.access_many(gpas, flags)
    assert vm.stats["pf_taken"] == 0
    empty = vcpu.access_many(np.empty(0, np.uint64))
    assert (empty.count, empty.exit, len(empty.hpa)) == (0, None, 0)


def test_access_many_fills_the_callers_arrays(kv):
    vm, vcpu = vm_and_vcpu(kv)
    gpas = u64(0x1000, 0x2345, 0x3000)
    hpa, level = np.full(3, 7, np.uint64), np.full(3, 9, np.uint8)
    batch = vcpu.access_many(gpas, AccessFlags.WRITE, out=(hpa, level))
    assert batch.hpa is hpa and batch.level is level and batch.count == 3
    assert hpa.tolist() == [0x7F0000001000, 0x7F0000002345, 0x7F0000003000]
    assert level.tolist() == [1, 1, 1]
    # Reused for a batch that stops at an exit: filled up to .count, the rest untouched.
    vm.set_user_memory_region(slot=1, guest_phys_addr=2 * GIB, memory_size=MIB,
                              userspace_addr=0x7F0080000000)
    hpa[:] = 7
    batch = vcpu.access_many(u64(0x1000, 4 * GIB, 0x3000), out=(hpa, level))
    assert batch.count == 1 and batch.exit == MmioExit(4 * GIB, False)
    assert hpa.tolist() == [0x7F0000001000, 7, 7]


def test_access_many_checks_out(kv):
    vm, vcpu = vm_and_vcpu(kv)
    gpas = u64(0x1000, 0x2000)
    hpa, level = np.zeros(2, np.uint64), np.zeros(2, np.uint8)
    read_only = np.zeros(2, np.uint64)
    read_only.flags.writeable = False
    both = np.zeros(3, np.uint64)
    for out, exc in [
        ([hpa, level], TypeError), ((hpa,), TypeError), ((hpa, level.astype(np.int8)), TypeError),
        ((hpa.astype(np.int64), level), TypeError), ((list(hpa), level), TypeError),
        ((np.zeros(3, np.uint64), level), ValueError), ((hpa, np.zeros((2, 1), np.uint8)), ValueError),
        ((read_only, level), ValueError), ((np.zeros(4, np.uint64)[::2], level), ValueError),
        ((gpas, level), ValueError), ((both[:2], both[1:].view(np.uint8)[:2]), ValueError),
        ((hpa, gpas.view(np.uint8)[:2]), ValueError),
    ]:
        with pytest.raises(exc):
            vcpu.access_many(gpas, out=out)
    assert vm.stats["pf_taken"] == 0 and not hpa.any()
    flags = np.zeros(2, np.uint8)
    with pytest.raises(ValueError):
        vcpu.access_many(gpas, flags, out=(hpa, flags))


def test_access_many_refuses_a_flag_of_another_class(kv):
    """PFERR.WRITE and EPT_VIOLATION.ACC_WRITE are both 2, AccessFlags.FETCH's value."""
    from kvmemu import EPT_VIOLATION, PFERR
    vm, vcpu = vm_and_vcpu(kv)
    for flag in (PFERR.WRITE, EPT_VIOLATION.ACC_WRITE):
        with pytest.raises(TypeError, match="AccessFlags"):
            vcpu.access_many(u64(0x1000), flag)
        with pytest.raises(TypeError, match="AccessFlags"):
            vm.page_tables.translate_many(u64(0x1000), flag)
    assert vm.stats["pf_taken"] == 0
    assert vcpu.access_many(u64(0x1000), AccessFlags.WRITE).count == 1


def test_access_flags_go_straight_to_the_compiled_batch_loop():
    """The compiled core's access_many takes AccessFlags members as it takes ints: into
    its batch loop at once, not through the checking path (``slow_access_many``), which
    made a call of one GPA 5 times slower.  A flag of another class, or bits that
    AccessFlags does not allow together, still go to the checks."""
    from kvmemu import PFERR, _select
    vm, vcpu = vm_and_vcpu(_select.load("cython"))
    state, checked = vcpu._c, []
    slow = state.slow_access_many

    def checking(*args, **kwargs):
        checked.append(args[1])
        return slow(*args, **kwargs)
    state.slow_access_many = checking
    for flags in (0, AccessFlags.WRITE, AccessFlags.WRITE | AccessFlags.USER, AccessFlags(0)):
        assert vcpu.access_many(u64(0x1000, 0x2000), flags).count == 2
    assert checked == []
    with pytest.raises(TypeError, match="AccessFlags"):
        vcpu.access_many(u64(0x1000), PFERR.WRITE)
    rejected = [(AccessFlags.FETCH | AccessFlags.WALK, "instruction fetch"),
                (AccessFlags.WALK | AccessFlags.NOGVA, "both WALK and NOGVA"),
                (AccessFlags(1 << 6), "0x40 has bits that are not AccessFlags"),
                (~AccessFlags.WRITE, "0xfffffffffffffffe has bits that are not")]
    for flags, message in rejected:
        with pytest.raises(ValueError, match=message):
            vcpu.access_many(u64(0x1000), flags)
    assert checked == [PFERR.WRITE] + [flags for flags, _ in rejected]


def test_access_many_errors(kv):
    vm, vcpu = vm_and_vcpu(kv, VMType.TDX)
    with pytest.raises(KvmError) as info:
        vcpu.access_many(u64(0x1000 | vm.shared_bit), AccessFlags.FETCH)
    assert info.value.errno == errno.EIO


def state_of(vm, vcpus):
    return (vm.stats, vm.memslots, vm.memory_attribute_ranges(), vm.mmu_invalidate_seq,
            vm.mmu_invalidate_range, vm.memslots_generation(), vm.page_tables.tables.copy(),
            [(v.stats, v.run.exit_reason, v.run.memory_fault, v.run.mmio) for v in vcpus],
            [vm.lpage_info(s.slot, 2) for s in vm.memslots])


def assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_snapshot_restore_is_exact_and_repeatable(kv):
    vm, vcpu = vm_and_vcpu(kv, VMType.SW_PROTECTED, gmem=True)
    vcpu.access_many(u64(*range(0, 64 * 4096, 4096)))
    vm.set_memory_attributes(0x10000, 2 * MIB, 8)
    vcpu.access(0x10000)
    snap = vm.snapshot()
    before = state_of(vm, [vcpu])
    vm.set_memory_attributes(0x10000, 2 * MIB, 0)
    vcpu.access_many(u64(*range(0x100000, 0x140000, 4096)), AccessFlags.WRITE)
    vm.set_user_memory_region(slot=1, guest_phys_addr=4 * GIB, memory_size=MIB,
                              userspace_addr=0x7F0080000000)
    after_first_run = state_of(vm, [vcpu])
    vm.restore(snap)
    assert_same(state_of(vm, [vcpu]), before)
    vcpu.access_many(u64(*range(0x100000, 0x140000, 4096)), AccessFlags.WRITE)
    vm.set_user_memory_region(slot=1, guest_phys_addr=4 * GIB, memory_size=MIB,
                              userspace_addr=0x7F0080000000)
    vm.set_memory_attributes(0x10000, 2 * MIB, 0)     # the other order: same end state
    vm.restore(snap)
    vm.set_memory_attributes(0x10000, 2 * MIB, 0)
    vcpu.access_many(u64(*range(0x100000, 0x140000, 4096)), AccessFlags.WRITE)
    vm.set_user_memory_region(slot=1, guest_phys_addr=4 * GIB, memory_size=MIB,
                              userspace_addr=0x7F0080000000)
    assert_same(state_of(vm, [vcpu]), after_first_run)


def test_restore_checks_and_vcpus_after_the_snapshot(kv):
    vm, vcpu = vm_and_vcpu(kv)
    other = kv.VM(VMType.DEFAULT, nx_huge_pages=True)      # created with other arguments
    snap = vm.snapshot()
    with pytest.raises(ValueError):
        other.restore(snap)
    with pytest.raises(TypeError):
        vm.restore("snapshot")
    late = vm.create_vcpu()
    late.access(0x1000)
    vm.restore(snap)
    assert vm.stats["pf_taken"] == 0
    with pytest.raises(RuntimeError):
        late.access(0x1000)
    assert vcpu.access(0x1000) == Translation(0x7F0000001000, 1)


def test_snapshot_keeps_guest_memfd_bindings(kv):
    vm, vcpu = vm_and_vcpu(kv, VMType.SNP, gmem=True)
    gmem = vm.memslots[0].guest_memfd
    snap = vm.snapshot()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0, userspace_addr=0)
    vm.set_user_memory_region(slot=5, guest_phys_addr=GIB, memory_size=GIB, flags=4,
                              userspace_addr=0x7F0000000000, guest_memfd=gmem)
    vm.restore(snap)
    with pytest.raises(KvmError) as info:                 # the binding is back
        vm.set_user_memory_region(slot=5, guest_phys_addr=GIB, memory_size=GIB, flags=4,
                                  userspace_addr=0x7F0000000000, guest_memfd=gmem)
    assert info.value.errno == errno.EINVAL


def test_a_long_mapped_batch_keeps_the_walk_rules(kv):
    """access_many over thousands of mapped pages (the compiled core's tight loop takes
    most of them) follows the walk's rules for the accesses that must store (SDM 29.3.5):
    an accessed flag cleared on a leaf or a PDE is set again, a write sets its leaf's
    dirty flag, and a 2M leaf translates at level 2 (though its frame's address is
    the root table's, and its memtype UC leaves no other bit 3-7 set but the page-size bit)."""
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 * MIB,
                              userspace_addr=0x7F0000000000)
    vm.set_user_memory_region(slot=1, guest_phys_addr=GIB, memory_size=4 * MIB,
                              userspace_addr=PT_BASE_HPA, host_level=2)   # frames like tables
    vcpu = vm.create_vcpu()
    pages = np.arange(16384, dtype=np.uint64) << np.uint64(12)
    huge = u64(GIB + 0x234, GIB + 2 * MIB + 0x10)
    assert vcpu.access_many(np.concatenate([pages, huge])).count == 16386
    pt, accessed, dirty = vm.page_tables, EPTE.ACCESSED.value, EPTE.DIRTY.value
    assert all(pt.get_entry(p << 12, 1) & dirty for p in (0, 5000, 9999, 16383))  # make_spte
    with writable(pt):
        pt.set_entry(5000 << 12, 1, pt.get_entry(5000 << 12, 1) & ~accessed)
        pt.set_entry(24 * MIB, 2, pt.get_entry(24 * MIB, 2) & ~accessed)
        for p in (1, 5001, 9999):
            pt.set_entry(p << 12, 1, pt.get_entry(p << 12, 1) & ~dirty)
        pt.set_entry(GIB, 2, pt.get_entry(GIB, 2) & ~(0xF << 3))    # memtype UC, no IPAT
    batch = vcpu.access_many(np.concatenate([pages | np.uint64(0x123), huge]))
    assert batch.count == 16386 and batch.exit is None
    assert batch.hpa[:16384].tolist() == (0x7F0000000123 + pages).tolist()
    assert batch.hpa[16384:].tolist() == [PT_BASE_HPA + 0x234, PT_BASE_HPA + 0x200010]
    assert batch.level.tolist() == [1] * 16384 + [2, 2]
    assert pt.get_entry(5000 << 12, 1) & accessed and pt.get_entry(24 * MIB, 2) & accessed
    assert not any(pt.get_entry(p << 12, 1) & dirty for p in (1, 5001, 9999))   # reads
    batch = vcpu.access_many(pages[:9999], AccessFlags.WRITE)
    assert batch.count == 9999 and batch.hpa.tolist() == (0x7F0000000000 + pages[:9999]).tolist()
    assert pt.get_entry(1 << 12, 1) & dirty and pt.get_entry(5001 << 12, 1) & dirty
    assert not pt.get_entry(9999 << 12, 1) & dirty                  # not written
