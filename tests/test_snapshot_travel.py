"""Snapshots that travel (docs/api.md §10): pickle, bytes, other VMs, other processes."""

import multiprocessing
import pickle
import struct

import numpy as np
import pytest

from kvmemu import Host, MemAttr, MemFlag, Snapshot, VMType, _snapshot, _select

GIB, MIB = 1 << 30, 1 << 20
UADDR = 0x7F0000000000


def busy_vm(kv, vm_type=VMType.SW_PROTECTED):
    """A VM with guest_memfd, private and shared mappings, a 2M leaf, dirty logging on
    a second slot, two vCPUs with kvm_run filled, and an attribute range."""
    vm = kv.VM(vm_type, nx_huge_pages=True)
    gmem = vm.create_guest_memfd(GIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR,
                              flags=MemFlag.GUEST_MEMFD, guest_memfd=gmem, host_level=2)
    vm.set_user_memory_region(slot=1, guest_phys_addr=4 * GIB, memory_size=64 * MIB,
                              userspace_addr=UADDR + GIB, flags=MemFlag.LOG_DIRTY_PAGES)
    vcpus = [vm.create_vcpu(), vm.create_vcpu()]
    vcpus[0].access_many(np.arange(64, dtype=np.uint64) << np.uint64(12), 1)
    vcpus[0].access(0x400000, fetch=True)                     # NX workaround: 4K, split
    vm.set_memory_attributes(0x10000, 0x4000, MemAttr.PRIVATE)
    vcpus[1].access(0x11000, write=True)                      # private, from guest_memfd
    vcpus[1].access(4 * GIB + 0x5000, write=True)             # dirty-logged
    vcpus[1].access(8 * GIB)                                  # MMIO exit in kvm_run
    return vm, vcpus


def state_of(vm):
    """Everything observable (get_dirty_log takes the dirty bits: it changes the VM)."""
    return (vm.stats, [(s.slot, s.guest_phys_addr, s.memory_size) for s in vm.memslots],
            vm.memory_attribute_ranges(), vm.mmu_invalidate_seq, vm.memslots_generation(),
            vm.page_tables.tables.tolist(), vm.page_tables.ntables,
            [(v.stats, v.run.exit_reason, v.run.memory_fault, v.run.mmio)
             for v in vm._vcpus], vm.lpage_info(0, 2), vm.get_dirty_log(1).tolist())


def test_pickle_bytes_and_another_vm_give_the_same_state(kv):
    vm, _ = busy_vm(kv)
    snap = vm.snapshot()
    expected = state_of(vm)
    for travelled in (pickle.loads(pickle.dumps(snap)), Snapshot.from_bytes(snap.to_bytes())):
        other = kv.VM.from_snapshot(travelled)
        assert state_of(other) == expected and other.check_invariants() == []
        again = kv.VM(VMType.SW_PROTECTED, nx_huge_pages=True)     # same arguments
        again.restore(travelled)
        assert state_of(again) == expected
    # The new VM goes on exactly as the old one would.
    other = kv.VM.from_snapshot(snap)
    vm.restore(snap)
    for v in (vm, other):
        v._vcpus[0].access_many(np.arange(64, 128, dtype=np.uint64) << np.uint64(12), 1)
        v.set_memory_attributes(0x20000, 0x1000, MemAttr.PRIVATE)
    assert state_of(other) == state_of(vm)


def test_a_snapshot_crosses_cores():
    cython, python = _select.load("cython"), _select.load("python")
    vm, _ = busy_vm(cython)
    data = vm.snapshot().to_bytes()
    twin = python.VM.from_snapshot(Snapshot.from_bytes(data))
    assert twin.snapshot().to_bytes() == data      # the same bytes from either core
    assert state_of(twin) == state_of(vm)          # (get_dirty_log changes both alike)


def test_restore_needs_the_same_creation_arguments(kv):
    snap = kv.VM(VMType.SW_PROTECTED).snapshot()
    for other in (kv.VM(VMType.DEFAULT), kv.VM(VMType.SW_PROTECTED, gpaw=52),
                  kv.VM(VMType.SW_PROTECTED, host=Host(maxphyaddr=46)),
                  kv.VM(VMType.SW_PROTECTED, eager_page_split=False)):
        with pytest.raises(ValueError, match="other arguments"):
            other.restore(snap)
    with pytest.raises(TypeError):
        kv.VM.from_snapshot(b"not a snapshot")


def corrupt(data, edit):
    meta, arrays = _snapshot.decode(data)
    edit(meta, arrays)
    return _snapshot.encode(meta, arrays)


def test_corrupt_or_foreign_blobs_raise_value_error(kv):
    vm, _ = busy_vm(kv)
    data = vm.snapshot().to_bytes()
    version = len(_snapshot.MAGIC)

    def dangling(meta, arrays):                 # a non-leaf SPTE to a table that is not there
        tables = arrays["root0_tables"].copy()
        tables[0, 5] = 0x8000000000000907 | (0x800000000 + 4096 * 10**6)
        arrays["root0_tables"] = tables

    def free_root(meta, arrays):
        arrays["root0_free"] = np.array([0], dtype=np.int64)

    blobs = [b"", b"garbage", data[:version], data[:version + 4] + b"PK\x03\x04",
             data[:version] + struct.pack("<I", 2) + data[version + 4:],
             data[:len(data) // 2], data[:len(data) // 3] + bytes([data[len(data) // 3] ^ 0xFF])
             + data[len(data) // 3 + 1:],
             corrupt(data, lambda m, a: m.pop("slots")),
             corrupt(data, lambda m, a: m.update(counters=[-1])),
             corrupt(data, lambda m, a: m["vcpus"][0].update(counters="x")),
             corrupt(data, lambda m, a: m["vm"].update(vm_type=99)),
             corrupt(data, lambda m, a: a.update(attributes=np.zeros((1, 3), np.uint64))),
             corrupt(data, dangling), corrupt(data, free_root)]
    for blob in blobs:
        with pytest.raises(ValueError):
            Snapshot.from_bytes(blob)
    with pytest.raises(TypeError):
        Snapshot.from_bytes("a string")
    assert state_of(kv.VM.from_snapshot(Snapshot.from_bytes(data))) == state_of(vm)


def _restore_in_a_worker(data):
    import kvmemu
    vm = kvmemu.VM.from_snapshot(pickle.loads(data))
    vm._vcpus[0].access(0x2000, write=True)
    return state_of(vm), vm.check_invariants()


def test_a_snapshot_goes_to_a_spawned_process():
    vm, _ = busy_vm(_select.load("cython"))
    snap = vm.snapshot()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        state, problems = pool.apply(_restore_in_a_worker, (pickle.dumps(snap),))
    vm._vcpus[0].access(0x2000, write=True)
    assert problems == [] and state == state_of(vm)


@pytest.mark.parametrize("how", ["restore", "bytes"])
def test_a_snapshot_keeps_the_tables_nx_huge_page_flags(kv, how):
    """A fetch under the NX workaround maps 4K and marks the tables it made
    nx_huge_page_disallowed; a read of another page of that 2M region then stays 4K
    (disallowed_hugepage_adjust, mmu.c, 6.18) instead of replacing the table with a 2M
    leaf.  The same in the VM restored from a snapshot, and in a VM made from its bytes."""
    vm = kv.VM(nx_huge_pages=True)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=UADDR, host_level=2)
    vm.create_vcpu().access(0x405000, fetch=True)
    snapshot = vm.snapshot()
    if how == "restore":
        vm.restore(snapshot)
    else:
        vm = kv.VM.from_snapshot(Snapshot.from_bytes(snapshot.to_bytes()))
    assert vm.create_vcpu().access(0x407000).level == 1
    assert vm.create_vcpu().access(0x605000).level == 2          # another 2M region
