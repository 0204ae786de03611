"""Callers that fight back, on one thread: each gets a clear error, a copy, or a correct
result, the same on both cores, and the VM stays whole."""

from __future__ import annotations

import copy
import errno
import pickle
import sys
import weakref

import numpy as np
import pytest

from kvmemu import (GMEM_FILE_PAGES, GMEM_PFN_BASE, KvmError, MemAttr, MemFlag, Translation,
                    VMType)

MIB = 1 << 20


def vm_with_vcpu(kv, vm_type=VMType.DEFAULT):
    vm = kv.VM(vm_type)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=8 * MIB,
                              userspace_addr=1 << 40)
    return vm, vm.create_vcpu()


def test_misaligned_arrays_are_read_whole(kv):
    buffer = np.zeros(9, dtype=np.uint64).view(np.uint8)
    gpas = np.frombuffer(buffer.data, dtype=np.uint64, count=8, offset=1).copy()
    gpas[:] = np.arange(8, dtype=np.uint64) << np.uint64(12)
    raw = bytearray(8 * 9)
    raw[1:65] = gpas.tobytes()
    misaligned = np.frombuffer(raw, dtype=np.uint64, count=8, offset=1)
    assert not misaligned.flags.aligned
    vm, vcpu = vm_with_vcpu(kv)
    assert vcpu.access_many(misaligned).hpa.tolist() == [(1 << 40) + (i << 12) for i in range(8)]
    assert kv.vmx_error_code(misaligned, 0).tolist() == [0] * 8
    out = np.frombuffer(bytearray(8 * 9), dtype=np.uint64, count=8, offset=1)
    with pytest.raises(ValueError, match="aligned"):
        kv.vmx_error_code(gpas, 0, out=out)


def test_vms_vcpus_and_tables_are_not_copied_or_pickled(kv):
    vm, vcpu = vm_with_vcpu(kv)
    for thing, words in ((vm, "use snapshot"), (vcpu, "VM.snapshot"),
                         (vm.page_tables, "cannot be copied"), (kv.PageTables("ept"), "cannot")):
        for action in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=words):
                action(thing)
    assert vm.check_invariants() == []


def test_restore_keeps_the_stage_hook_the_user_set(kv):
    vm, vcpu = vm_with_vcpu(kv)
    seen = []
    vcpu.stage_hook = seen.append
    snapshot = vm.snapshot()
    vcpu.stage_hook = None
    vm.restore(snapshot)
    vcpu.access(0x1000)
    assert seen == [] and vcpu.stage_hook is None


def test_a_guest_memfd_made_after_the_snapshot_is_gone_after_restore(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    snapshot = vm.snapshot()
    late = vm.create_guest_memfd(1 << 30)
    vm.restore(snapshot)
    vm.create_guest_memfd(2 * MIB)                     # takes the same index
    with pytest.raises(KvmError, match="no longer exists") as info:
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 30,
                                  userspace_addr=1 << 40, flags=MemFlag.GUEST_MEMFD,
                                  guest_memfd=late)
    assert info.value.errno == errno.EINVAL and vm.memslots == []


def test_guest_memfd_frames_never_alias(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    files = GMEM_PFN_BASE // GMEM_FILE_PAGES
    frames = {vm.create_guest_memfd(4096).pfn(0) for _ in range(files)}
    assert len(frames) == files
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(4096)
    assert info.value.errno == errno.ENOSPC


def test_a_hook_cannot_change_a_batch_under_the_core(kv):
    """The hook writes a GPA beyond the walk's reach into the caller's array: the batch
    runs what was checked."""
    vm, vcpu = vm_with_vcpu(kv)
    gpas = np.arange(4, dtype=np.uint64) << np.uint64(12)

    def scribble(stage):
        gpas[:] = np.uint64(1 << 60 | 0x5000)

    vcpu.stage_hook = scribble
    result = vcpu.access_many(gpas)
    assert result.count == 4 and result.hpa.tolist() == [(1 << 40) + (i << 12) for i in range(4)]
    assert vm.check_invariants() == []


def test_an_interrupted_conversion_leaves_no_invalidation_behind(kv, monkeypatch):
    """Ctrl-C inside set_memory_attributes (here: in the pre-set hook, with the
    invalidation begun) used to leave
    mmu_invalidate_in_progress at 1 for good, and every later fault in the range retried
    until it 'did not settle'."""
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(8 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=8 * MIB,
                              userspace_addr=1 << 40, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem)
    vcpu = vm.create_vcpu()
    vcpu.access(0x1000)
    memory = vm._memory

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(memory, "_pre_set_memory_attributes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vm.set_memory_attributes(0, 2 * MIB, MemAttr.PRIVATE)
    monkeypatch.undo()
    assert vm.mmu_invalidate_in_progress == 0
    assert vm.memory_attribute_ranges() == []
    assert vcpu.access(0x1000).hpa == (1 << 40) + 0x1000
    assert vm.check_invariants() == []


def test_ctrl_c_stops_a_long_batch_and_says_where():
    """SIGINT during a long access_many of mapped pages: KeyboardInterrupt before the end
    (the compiled core's GIL-free loop looks for it), naming the element it stopped at;
    the VM is whole and the vCPU usable.  (How soon is a benchmark:
    benchmarks/test_bench_hostile.py.)"""
    import re

    from kvmemu import _select
    from kvmemu.testing import interrupted_batch

    kv = _select.load("cython")      # the twin's batches are Python: Ctrl-C stops them anyway
    vm, vcpu = vm_with_vcpu(kv)
    vcpu.access_many(np.arange(2048, dtype=np.uint64) << np.uint64(12))
    n = 40_000_000
    message, _ = interrupted_batch(vcpu, np.full(n, 0x1000, dtype=np.uint64), 1)
    found = re.search(r"access_many stopped at element (\d+)", message)
    assert found is not None and int(found.group(1)) < n
    assert vcpu.access(0x2000).hpa == (1 << 40) + 0x2000
    assert vm.check_invariants() == []


def test_results_are_freed_with_their_class_reference(kv):
    """A Translation per access, freed by the compiled core's deallocator: each one drops
    the reference it held to its class, once (a subclass's too), and what a subclass
    instance holds in its __dict__ goes with it.  (The compiled core keeps up to 64
    freed Translations for reuse, each with its class reference: the first loop fills
    that list, the second must not grow the count.)"""
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20,
                              userspace_addr=1 << 40)
    vcpu = vm.create_vcpu()
    vcpu.access(0x1000)
    for _ in range(2):
        before = sys.getrefcount(Translation)
        kept = [Translation(n, 1) for n in range(100)]
        del kept
        for _ in range(1000):
            assert vcpu.access(0x1000) == Translation(1 << 40 | 0x1000, 1)
    assert sys.getrefcount(Translation) == before

    class Tagged(Translation):
        pass

    class Payload:
        pass

    before = sys.getrefcount(Tagged), sys.getrefcount(Translation)
    for _ in range(1000):
        t = Tagged(0x1000, 1)
        t.payload = Payload()
        ref = weakref.ref(t.payload)
        del t
        assert ref() is None
    assert (sys.getrefcount(Tagged), sys.getrefcount(Translation)) == before


def test_reused_results_hold_their_own_fields(kv):
    """Translations freed and made again (the compiled core reuses freed ones): every
    result held keeps its own page's fields, whatever was freed and made meanwhile."""
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20,
                              userspace_addr=1 << 40)
    vcpu = vm.create_vcpu()
    held = []
    for page in range(200):
        vcpu.access(page << 12)                         # a result freed at once
        held.append((page, vcpu.access(page << 12 | 0x18)))
        del held[page // 2::7]                          # and some held ones
    assert len(held) > 30
    for page, t in held:
        assert type(t) is Translation
        assert t == Translation((1 << 40) + (page << 12) + 0x18, 1)


def test_deeply_nested_results_are_freed(run_python):
    """Results nested a million deep (built past the checking constructor) are freed
    without exhausting the C stack."""
    out = run_python("-c", "import kvmemu\n"
                     "t = 0\n"
                     "for _ in range(1_000_000):\n"
                     "    t = tuple.__new__(kvmemu.Translation, (t, 1))\n"
                     "del t\n"
                     "print('freed')\n")
    assert out.stdout == "freed\n"
