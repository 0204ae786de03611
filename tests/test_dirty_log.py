"""Dirty logging as Linux 6.18 does it with the TDP MMU.

Sources: kvm_mmu_slot_apply_flags, kvm_arch_sync_dirty_log (x86.c);
kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect, kvm_prepare_memory_region,
kvm_vm_ioctl_enable_cap_generic, mark_page_dirty_in_slot (virt/kvm/kvm_main.c);
kvm_arch_mmu_enable_log_dirty_pt_masked, fast_page_fault, fast_pf_fix_direct_spte,
kvm_mmu_hugepage_adjust (mmu.c); wrprot_gfn_range, clear_dirty_gfn_range,
clear_dirty_pt_masked, kvm_tdp_mmu_write_protect_gfn, tdp_mmu_split_huge_page,
recover_huge_pages_range (tdp_mmu.c); make_spte, make_small_spte, make_huge_spte
(spte.c); vmx_flush_pml_buffer, enable_pml (vmx.c); the SDM's page-modification log.

SPTE values are assembled from the masks of kvm_mmu_set_ept_masks and
kvm_mmu_reset_all_pte_masks (spte.c):

* EPT 2M leaf of pfn 0x40000: MMU_PRESENT 0x800 | SUPPRESS_VE bit 63 | A 0x100 | X 0x4
  | R 0x1 | PS 0x80 | WB 0x30 | IPAT 0x40 | host-writable bit 57 | W 0x2 | MMU-writable
  bit 58 | D 0x200 = 0x8600000040000bf7.  Its 4K children (make_small_spte) drop PS:
  0x8600000040000b77 + (i << 12); without D (PML's clear): ...977.
* NPT 2M leaf: MMU_PRESENT 0x800 | P 0x1 | A 0x20 | U 0x4 | PS 0x80 | host-writable
  0x200 | W 0x2 | MMU-writable 0x400 | D 0x40 = 0x40000ee7; 4K children 0x40000e67,
  write-protected (W cleared) 0x40000e65.
"""

import errno

import numpy as np
import pytest

from kvmemu import AccessFlags, DirtyLogManual, KvmError, MemFlag, VMType

UADDR = 1 << 30            # pfn 0x40000: the slot's pages are 2M-congruent
SLOT_4M = 4 << 20
LOG = MemFlag.LOG_DIRTY_PAGES
EPT_2M = 0x8600000040000BF7
NPT_2M = 0x40000EE7


def vm_with_2m_page(kv, vendor, **kw):
    """A VM whose slot 0 (4 MiB at GPA 0, host-mapped 2M) has its first 2M page mapped
    by a write."""
    vm = kv.VM(vendor=vendor, **kw)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, host_level=2)
    vcpu = vm.create_vcpu()
    assert vcpu.access(0x1000, write=True).level == 2
    return vm, vcpu


def set_log(vm, on):
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, host_level=2, flags=LOG if on else 0)


def bits(words):
    return [i for i in range(64 * len(words)) if int(words[i // 64]) >> (i % 64) & 1]


def test_pml_is_on_for_vmx_only(kv):
    """vmx_vm_init sets cpu_dirty_log_size with enable_pml; a TD and SVM have none."""
    assert kv.VM(vendor="vmx").pml and not kv.VM(vendor="svm").pml
    assert not kv.VM(VMType.TDX).pml


def test_enabling_logging_with_pml_splits_and_clears_dirty_bits(kv):
    """Eager split, then kvm_mmu_slot_leaf_clear_dirty: each 4K child loses D (0x200),
    traced once per child after the link of the new table; nothing is zapped."""
    vm, vcpu = vm_with_2m_page(kv, "vmx")
    assert vm.page_tables.get_entry(0, 2) == EPT_2M
    events = []
    vm.trace = lambda event, text: events.append(text)
    set_log(vm, True)
    pt = vm.page_tables
    assert [pt.get_entry(i << 12, 1) for i in (0, 1, 511)] == [
        0x8600000040000977, 0x8600000040001977, 0x86000000401FF977]
    assert len(events) == 1 + 512
    assert events[0].startswith("as id 0 gfn 0 level 2 old_spte 8600000040000bf7 new_spte ")
    assert events[1] == "as id 0 gfn 0 level 1 old_spte 8600000040000b77 new_spte 8600000040000977"
    assert vm.stats["pages_4k"] == 512 and vm.stats["pages_2m"] == 0


def test_pml_logs_hardware_writes_and_get_dirty_log_clears_them(kv):
    """A write to a D-clear writable leaf: the CPU sets D and logs the GPA; the flush
    marks the page; KVM_GET_DIRTY_LOG returns it and clears D again
    (kvm_mmu_clear_dirty_pt_masked).  No fault is taken."""
    vm, vcpu = vm_with_2m_page(kv, "vmx")
    set_log(vm, True)
    vcpu.access(0x3000, write=True)
    vcpu.access(0x5000, write=True)
    vcpu.access(0x7000)                        # a read sets A only
    assert vm.page_tables.get_entry(0x3000, 1) == 0x8600000040003B77
    assert vcpu.stats["pf_taken"] == 1
    words = vm.get_dirty_log(0)
    assert words.dtype == np.uint64 and len(words) == 1024 // 64
    assert bits(words) == [3, 5]
    assert vm.page_tables.get_entry(0x3000, 1) == 0x8600000040003977
    vcpu.access(0x5000, write=True)
    assert bits(vm.get_dirty_log(0)) == [5]
    assert bits(vm.get_dirty_log(0)) == []


def test_without_pml_writes_are_fixed_by_the_fast_path(kv):
    """NPT: enabling logging write-protects every leaf (W only; MMU-writable stays); a
    write takes an #NPF that fast_page_fault fixes (pf_fast, pf_fixed) and marks."""
    vm, vcpu = vm_with_2m_page(kv, "svm")
    assert vm.page_tables.get_entry(0, 2) == NPT_2M
    set_log(vm, True)
    pt = vm.page_tables
    assert pt.get_entry(0x3000, 1) == 0x40003E65
    before = dict(vcpu.stats)
    vcpu.access(0x3000, write=True)
    assert pt.get_entry(0x3000, 1) == 0x40003E67
    after = vcpu.stats
    assert (after["pf_fast"] - before["pf_fast"], after["pf_fixed"] - before["pf_fixed"],
            after["pf_taken"] - before["pf_taken"]) == (1, 1, 1)
    assert bits(vm.get_dirty_log(0)) == [3]
    assert pt.get_entry(0x3000, 1) == 0x40003E65        # write-protected again


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_get_dirty_log_takes_every_word_of_a_log_of_odd_length(kv, vendor):
    """A slot of 327 pages has a log of 6 words (kvm_dirty_bitmap_bytes: ALIGN(npages,
    BITS_PER_LONG) / 8): the bits of pages in its first and last words are taken and
    their pages write-protected again (NPT: W cleared, 0x...E65), the rest stay clear."""
    vm = kv.VM(vendor=vendor)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=327 << 12,
                              userspace_addr=UADDR, flags=LOG)
    vcpu = vm.create_vcpu()
    pages = [0, 63, 64, 200, 320, 326]
    for page in pages:
        vcpu.access(page << 12, write=True)
    words = vm.get_dirty_log(0)
    assert len(words) == 6 and bits(words) == pages
    assert bits(vm.get_dirty_log(0)) == []
    if vendor == "svm":
        assert vm.page_tables.get_entry(326 << 12, 1) == 0x40146E65
    vcpu.access(326 << 12, write=True)
    assert bits(vm.get_dirty_log(0)) == [326]
    vcpu.access(192 << 12, write=True)                  # the fourth word alone
    assert bits(vm.get_dirty_log(0)) == [192]


def test_without_eager_split_a_write_splits_the_huge_page(kv):
    """eager_page_split off: the 2M leaf is only write-protected; the fast path leaves a
    huge leaf of a logged slot to the slow path, which maps 4K (hugepage adjust) by
    splitting it; make_spte marks the page."""
    vm, vcpu = vm_with_2m_page(kv, "svm", eager_page_split=False)
    set_log(vm, True)
    pt = vm.page_tables
    assert pt.get_entry(0, 2) == NPT_2M & ~0x2
    before = vcpu.stats["pf_fast"]
    assert vcpu.access(0x3000, write=True).level == 1
    assert vcpu.stats["pf_fast"] == before
    assert pt.get_entry(0x3000, 1) == 0x40003E67
    assert pt.get_entry(0x4000, 1) == 0x40004E65        # a child of the protected leaf
    assert bits(vm.get_dirty_log(0)) == [3]


def test_a_read_fault_on_a_logged_slot_marks_the_page(kv):
    """TDP faults map ACC_ALL and hva_to_pfn maps a read fault writable when it can, so
    make_spte makes a writable SPTE and marks the page dirty."""
    vm = kv.VM(vendor="svm")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, flags=LOG)
    vcpu = vm.create_vcpu()
    vcpu.access(0x9000)
    assert bits(vm.get_dirty_log(0)) == [9]


def test_disabling_logging_recovers_the_huge_page(kv):
    """kvm_mmu_recover_huge_pages: the table becomes a 2M leaf made from its first
    present leaf (make_huge_spte: PS set, address cut to 2M), W and D as that leaf had
    them."""
    vm, vcpu = vm_with_2m_page(kv, "svm")
    set_log(vm, True)
    set_log(vm, False)
    assert vm.page_tables.get_entry(0, 2) == 0x40000EE5
    assert vm.stats["pages_2m"] == 1 and vm.stats["pages_4k"] == 0
    vcpu.access(0x1000, write=True)                     # the fast path gives W back
    assert vm.page_tables.get_entry(0, 2) == 0x40000EE7


def test_manual_protection_get_leaves_the_log_and_clear_protects(kv):
    vm, vcpu = vm_with_2m_page(kv, "svm")
    vm.enable_manual_dirty_log_protect()
    assert vm.manual_dirty_log_protect == DirtyLogManual.PROTECT_ENABLE
    set_log(vm, True)
    vcpu.access(0x3000, write=True)
    vcpu.access(0x4000, write=True)
    assert bits(vm.get_dirty_log(0)) == [3, 4]
    assert bits(vm.get_dirty_log(0)) == [3, 4]          # nothing cleared
    assert vm.page_tables.get_entry(0x3000, 1) == 0x40003E67
    vm.clear_dirty_log(0, 0, 64, np.array([1 << 3 | 1 << 9], dtype=np.uint64))
    assert bits(vm.get_dirty_log(0)) == [4]             # only bits set on both sides
    assert vm.page_tables.get_entry(0x3000, 1) == 0x40003E65
    assert vm.page_tables.get_entry(0x4000, 1) == 0x40004E67


def test_initially_set_starts_all_dirty_and_protects_nothing(kv):
    """KVM_DIRTY_LOG_INITIALLY_SET: a new bitmap has all npages bits set and enabling
    logging returns before any split or write-protection."""
    vm, vcpu = vm_with_2m_page(kv, "vmx")
    vm.enable_manual_dirty_log_protect(initially_set=True)
    set_log(vm, True)
    assert vm.page_tables.get_entry(0, 2) == EPT_2M
    assert bits(vm.get_dirty_log(0)) == list(range(1024))


def test_initially_set_clear_write_protects_the_huge_page_first(kv):
    """kvm_arch_mmu_enable_log_dirty_pt_masked under INITIALLY_SET without eager split:
    kvm_tdp_mmu_write_protect_gfn clears W and MMU-writable (0x2 | bit 58) of the 2M leaf
    at the mask's first page; a write then takes the slow path, which splits it."""
    vm, vcpu = vm_with_2m_page(kv, "vmx", eager_page_split=False)
    vm.enable_manual_dirty_log_protect(initially_set=True)
    set_log(vm, True)
    vm.clear_dirty_log(0, 0, 64, np.full(1, (1 << 64) - 1, dtype=np.uint64))
    assert vm.page_tables.get_entry(0, 2) == 0x8200000040000BF5
    assert bits(vm.get_dirty_log(0)) == list(range(64, 1024))
    before = dict(vcpu.stats)
    assert vcpu.access(0x3000, write=True).level == 1
    assert vcpu.stats["pf_fast"] == before["pf_fast"]
    assert bits(vm.get_dirty_log(0))[:1] == [3]


def test_a_full_pml_log_exits_and_loses_nothing(kv):
    """The log holds 512 GPAs; the 513th dirty write exits (PML full), the exit flushes
    the log, the write is logged after it."""
    vm = kv.VM(vendor="vmx")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR)
    vcpu = vm.create_vcpu()
    gpas = np.arange(0, SLOT_4M, 0x1000, dtype=np.uint64)
    assert vcpu.access_many(gpas, AccessFlags.WRITE).count == 1024   # mapped, W and D
    set_log(vm, True)
    assert vm.get_dirty_log(0).tolist() == [0] * 16
    assert vcpu.access_many(gpas[:600], AccessFlags.WRITE).count == 600
    assert bits(vm.get_dirty_log(0)) == list(range(600))


def test_a_moved_slot_keeps_its_log(kv):
    """kvm_prepare_memory_region reuses old->dirty_bitmap when both log."""
    vm = kv.VM(vendor="svm")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, flags=LOG)
    vm.create_vcpu().access(0x2000, write=True)
    vm.set_user_memory_region(slot=0, guest_phys_addr=1 << 30, memory_size=SLOT_4M,
                              userspace_addr=UADDR, flags=LOG)
    assert bits(vm.get_dirty_log(0)) == [2]


def test_errnos(kv):
    """KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG, in kvm_main.c's order."""
    vm = kv.VM(vendor="svm")
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=0x41000,
                              userspace_addr=UADDR)
    vm.set_user_memory_region(slot=2, guest_phys_addr=1 << 30, memory_size=0x41000,
                              userspace_addr=UADDR, flags=LOG)      # 65 pages
    one = np.zeros(2, dtype=np.uint64)

    def code(call, *args):
        with pytest.raises(KvmError) as info:
            call(*args)
        return info.value.errno

    assert code(vm.get_dirty_log, 32764) == errno.EINVAL        # KVM_USER_MEM_SLOTS
    assert code(vm.get_dirty_log, 2 << 16) == errno.EINVAL      # address space 2
    assert code(vm.get_dirty_log, 0) == errno.ENOENT            # no such slot
    assert code(vm.get_dirty_log, 1) == errno.ENOENT            # not logging
    assert code(vm.get_dirty_log, 1 << 16 | 2) == errno.ENOENT  # SMM space: no slot 2
    assert code(vm.clear_dirty_log, 2, 1, 64, one) == errno.EINVAL   # first_page & 63
    assert code(vm.clear_dirty_log, 1, 0, 64, one) == errno.ENOENT
    assert code(vm.clear_dirty_log, 2, 0, 66, one) == errno.EINVAL   # beyond the slot
    assert code(vm.clear_dirty_log, 2, 128, 0, one) == errno.EINVAL  # first_page > npages
    assert code(vm.clear_dirty_log, 2, 0, 63, one) == errno.EINVAL   # not a whole word
    assert code(vm.clear_dirty_log, 2, 0, 65, one[:1]) == errno.EFAULT  # 2 words read
    vm.clear_dirty_log(2, 0, 65, one)                           # ends at the slot's end
    vm.clear_dirty_log(2, 64, 1, one)
    vm.clear_dirty_log(2, 0, 0, one[:0])
    with pytest.raises(TypeError):
        vm.clear_dirty_log(2, 0, 64, [0])
    assert kv.VM(VMType.SW_PROTECTED).nr_memslot_as_ids == 1
    with pytest.raises(KvmError) as info:
        kv.VM(VMType.SW_PROTECTED).get_dirty_log(1 << 16)
    assert info.value.errno == errno.EINVAL


def test_guest_memfd_slots_cannot_log(kv):
    """check_memory_region_flags: GUEST_MEMFD | LOG_DIRTY_PAGES is EINVAL."""
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(SLOT_4M)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                                  userspace_addr=UADDR, flags=LOG | MemFlag.GUEST_MEMFD,
                                  guest_memfd=gmem)
    assert info.value.errno == errno.EINVAL


def test_the_bitmap_has_npages_bits_in_whole_words(kv):
    """kvm_dirty_bitmap_bytes: ALIGN(npages, 64) / 8; bits past npages stay clear, even
    under INITIALLY_SET (bitmap_set of npages bits)."""
    vm = kv.VM()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0x41000,
                              userspace_addr=UADDR, flags=LOG)
    words = vm.get_dirty_log(0)
    assert words.tolist() == [(1 << 64) - 1, 1]


def test_snapshots_hold_the_log(kv):
    vm, vcpu = vm_with_2m_page(kv, "svm")
    set_log(vm, True)
    vcpu.access(0x3000, write=True)
    snap = vm.snapshot()
    assert bits(vm.get_dirty_log(0)) == [3]
    vm.restore(snap)
    assert bits(vm.get_dirty_log(0)) == [3]
    assert vm.check_invariants() == []


def test_check_invariants_sees_a_write_the_log_would_miss(kv):
    """check_invariants: a writable leaf of a logging slot must have its page in the
    bitmap (a write through it would not be logged); clearing the bit behind KVM's back
    breaks that."""
    vm, vcpu = vm_with_2m_page(kv, "svm")
    set_log(vm, True)
    vcpu.access(0x3000, write=True)
    assert vm.check_invariants() == []
    vm._memory.slot_by_id(0, 0).dirty_bitmap[0] = 0
    problems = vm.check_invariants()
    assert len(problems) == 1 and "page 3 is not in the dirty log" in problems[0]
