"""Host (MMU-notifier) invalidations of guest memory, as Linux 6.18 handles them.

Sources: kvm_mmu_notifier_invalidate_range_start / _end, kvm_handle_hva_range,
kvm_mmu_invalidate_begin / _range_add / _end, kvm_mmu_unmap_gfn_range
(virt/kvm/kvm_main.c); mmu_invalidate_retry_gfn (include/linux/kvm_host.h);
kvm_unmap_gfn_range (mmu.c), kvm_tdp_mmu_unmap_gfn_range and
kvm_gfn_range_filter_to_root_types (tdp_mmu.c / tdp_mmu.h), tdp_mmu_zap_leafs (a huge
leaf that overlaps the range goes whole); host_pfn_mapping_level (mmu.c) with a THP
collapse (mm/khugepaged.c collapse_huge_page) and split (mm/huge_memory.c
__split_huge_pmd), each an MMU_NOTIFY_CLEAR of the 2M host range.
"""

import pytest

from kvmemu import INVALID_GPA, MemAttr, MemFlag, VMType

UADDR = 1 << 30
MIB = 1 << 20
GIB = 1 << 30
NONPRESENT = 0x8000000000000000


def vm_with_slot(kv, vm_type=VMType.DEFAULT, host_level=2, **slot):
    vm = kv.VM(vm_type)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, host_level=host_level, **slot)
    return vm, vm.create_vcpu()


def counters(vm):
    return vm.mmu_invalidate_seq, vm.mmu_invalidate_in_progress, vm.mmu_invalidate_range


def test_start_zaps_what_the_host_range_maps_and_end_moves_the_sequence(kv):
    """One 4K page of host memory inside a 2M mapping: the whole 2M leaf goes
    (tdp_mmu_zap_leafs); begin sets in_progress 1 and the range [gfn, gfn + 1); end does
    seq + 1 and in_progress - 1, leaving the range as it was."""
    vm, vcpu = vm_with_slot(kv)
    vcpu.access(0x1000, write=True)
    vcpu.access(0x201000, write=True)
    events = []
    vm.trace = lambda event, text: events.append(text)
    handle = vm.invalidate_host_range(UADDR + 0x1000, 0x1000)
    assert counters(vm) == (0, 1, (1, 2))
    assert events == ["as id 0 gfn 0 level 2 old_spte 8600000040000bf7 new_spte "
                      "8000000000000000"]
    assert vm.page_tables.get_entry(0x200000, 2) == 0x8600000040200BF7
    handle.end()
    assert counters(vm) == (1, 0, (1, 2))
    assert not handle.active


def test_a_range_no_memslot_maps_changes_nothing(kv):
    """No memslot intersects: no begin, no end, mmu_invalidate_seq stays."""
    vm, _ = vm_with_slot(kv)
    with vm.invalidate_host_range(UADDR + 4 * MIB, MIB):
        assert counters(vm) == (0, 0, (INVALID_GPA, INVALID_GPA))
    assert counters(vm) == (0, 0, (INVALID_GPA, INVALID_GPA))


def test_one_begin_for_every_slot_and_the_range_is_their_union(kv):
    """kvm_handle_hva_range calls on_lock (begin) once, at the first memslot; each piece
    adds its gfns, the range widens to min/max; the end counts once."""
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=MIB,
                              userspace_addr=UADDR)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=MIB,
                              userspace_addr=UADDR + MIB)
    with vm.invalidate_host_range(UADDR + MIB - 0x1000, 0x2000):
        assert counters(vm) == (0, 1, (0xFF, 0x40001))
    assert vm.mmu_invalidate_seq == 1


def test_a_fault_retries_until_the_invalidation_ends(kv):
    """mmu_invalidate_retry_gfn: a fault on a gfn in the range of an invalidation in
    progress retries; after the end it retries once more (its snapshot of
    mmu_invalidate_seq is old), then maps: three faults for one access."""
    vm, vcpu = vm_with_slot(kv)
    opened = []

    def hook(stage):
        if stage != "faultin":
            return
        if not opened:
            opened.append(vm.invalidate_host_range(UADDR + 0x1000, 0x1000))
        elif opened[0].active:
            opened[0].end()

    vcpu.stage_hook = hook
    assert vcpu.access(0x1000).level == 2
    assert vcpu.stats["pf_taken"] == 3 and vcpu.stats["pf_fixed"] == 1
    assert counters(vm)[:2] == (1, 0)


def test_an_invalidation_between_faultin_and_map_is_caught(kv):
    """The race the sequence exists for: begin and end after faultin took its snapshot;
    is_page_fault_stale sees the new sequence and the fault retries instead of mapping
    the page the host just took away."""
    vm, vcpu = vm_with_slot(kv)
    fired = []

    def hook(stage):
        if stage == "map" and not fired:
            fired.append(1)
            vm.invalidate_host_range(UADDR, 0x1000).end()

    vcpu.stage_hook = hook
    assert vcpu.access(0x1000).level == 2
    assert vcpu.stats["pf_taken"] == 2


def test_the_shared_filter_spares_a_tds_private_mappings_only(kv):
    """KVM_FILTER_SHARED: a TD keeps its private (mirror) mappings; for SW_PROTECTED the
    filter means nothing (one root) and the private mapping goes too."""
    for vm_type, private_kept in ((VMType.TDX, True), (VMType.SW_PROTECTED, False)):
        vm = kv.VM(vm_type)
        gmem = vm.create_guest_memfd(4 * MIB)
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                                  userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD,
                                  guest_memfd=gmem)
        vm.set_memory_attributes(0, 0x1000, MemAttr.PRIVATE)
        vcpu = vm.create_vcpu()
        vcpu.access(0, write=True)
        private = vm.private_page_tables or vm.page_tables
        assert private.get_entry(0, 1) != NONPRESENT
        vm.invalidate_host_range(UADDR, 0x1000).end()
        assert (private.get_entry(0, 1) != NONPRESENT) == private_kept


def test_a_thp_collapse_maps_the_next_fault_huge(kv):
    """set_host_level(slot, 2M): the host's invalidation zaps the 4K leaves (seq + 1);
    the next fault maps 2M, replacing the leftover table by a huge leaf."""
    vm, vcpu = vm_with_slot(kv, host_level=1)
    vcpu.access(0x1000, write=True)
    vcpu.access(0x2000, write=True)
    assert vm.stats["pages_4k"] == 2
    vm.set_host_level(0, 2)
    assert counters(vm)[:2] == (1, 0) and vm.stats["pages_4k"] == 0
    assert vcpu.access(0x3000).level == 2
    assert vm.page_tables.get_entry(0, 2) == 0x8600000040000BF7
    assert vm.check_invariants() == []


def test_a_thp_split_maps_the_next_fault_small(kv):
    vm, vcpu = vm_with_slot(kv, host_level=2)
    vcpu.access(0x1000)
    vm.set_host_level(0, 1)
    assert vm.stats["pages_2m"] == 0
    assert vcpu.access(0x1000).level == 1
    assert [s.host_level for s in vm.memslots] == [1]


def test_handles_end_once_and_snapshots_wait_for_them(kv):
    vm, vcpu = vm_with_slot(kv)
    snap = vm.snapshot()
    handle = vm.invalidate_host_range(UADDR, 0x1000)
    with pytest.raises(RuntimeError):
        vm.snapshot()
    vm.restore(snap)                      # the open invalidation belonged to the old state
    assert counters(vm)[:2] == (0, 0)
    handle.end()                          # ends nothing of the restored state
    assert counters(vm)[:2] == (0, 0)
    with pytest.raises(RuntimeError):
        handle.end()
    vm.snapshot()


def test_arguments(kv):
    vm, _ = vm_with_slot(kv)
    for hva, size in ((0, 0), ((1 << 64) - 0x1000, 0x2000)):
        with pytest.raises(ValueError):
            vm.invalidate_host_range(hva, size)
    with pytest.raises(TypeError):
        vm.invalidate_host_range("0", 1)
    with pytest.raises(OverflowError):
        vm.invalidate_host_range(1 << 64, 1)
    with pytest.raises(ValueError):
        vm.set_host_level(5, 2)
    with pytest.raises(ValueError):
        vm.set_host_level(0, 4)


def test_memslot_changes_wait_for_invalidations_in_progress(kv):
    """kvm_swap_active_memslots waits while mn_active_invalidate_count is not 0 (even for
    an invalidation that found no memslot), so that start and end see the same memslots.
    On the thread that holds one the wait could never end: RuntimeError."""
    import threading
    import time

    vm, _ = vm_with_slot(kv)
    handle = vm.invalidate_host_range(UADDR + 8 * MIB, 0x1000)     # no memslot there
    with pytest.raises(RuntimeError):
        vm.set_user_memory_region(slot=1, guest_phys_addr=GIB, memory_size=MIB,
                                  userspace_addr=UADDR + 8 * MIB)
    done = []

    def change():
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=MIB,
                                  userspace_addr=UADDR + 8 * MIB)
        done.append(vm.mmu_invalidate_in_progress)

    thread = threading.Thread(target=change)
    thread.start()
    time.sleep(0.05)
    assert not done                                      # still waiting
    handle.end()
    thread.join(30)
    assert done == [0] and len(vm.memslots) == 2
