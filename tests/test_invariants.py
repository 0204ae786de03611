"""``kvmemu.testing.InvariantChecker``: ``vm.check_invariants()`` made incremental.

Each test first lets the checker see a sound VM, then breaks one input of the
judgements behind KVM's back (a table entry, a dirty bitmap word, a frame state, the
attribute store, lpage_info, a memslot's flags) and asserts the violation that input
now gives, from the incremental check and the full one alike.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmemu import MemAttr, MemFlag, PageTables, VMType
from kvmemu.constants import PT_BASE_HPA, SPTE_BASE_ADDR_MASK, FrameState
from kvmemu.testing import (CONTRACT_ERRORS, Divergence, InvariantChecker, Side, _fresh, _run,
                            decode, run_ops, writable)

UADDR = 1 << 30
SLOT_4M = 4 << 20


def both(checker):
    """The incremental verdict, asserted equal to the full one."""
    problems = checker.check()
    assert problems == checker.vm.check_invariants()
    return problems


def mapped_vm(kv, vendor="vmx", flags=0, **kw):
    """4 MiB at GPA 0 (host-mapped 4K), pages 0..3 mapped by writes, and a checker that
    has seen it sound."""
    vm = kv.VM(vendor=vendor, **kw)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, flags=flags)
    vcpu = vm.create_vcpu()
    for page in range(4):
        assert vcpu.access(page << 12, write=True).level == 1
    checker = InvariantChecker(vm)
    assert both(checker) == []
    assert checker.judged == 4              # the root, the 1G, 2M and 4K tables: all
    return vm, vcpu, checker


def test_a_checker_needs_a_vm():
    with pytest.raises(TypeError, match="needs a kvmemu VM, not PageTables"):
        InvariantChecker(PageTables("ept"))


def test_nothing_changed_judges_nothing(kv):
    vm, vcpu, checker = mapped_vm(kv)
    assert both(checker) == [] and checker.judged == 0
    vcpu.access(0x5000)                     # one new leaf: its table only
    assert both(checker) == [] and checker.judged == 1


def test_a_table_linked_twice(kv):
    """A 1G-level entry of a second gigabyte linked to the 2M table the first one uses."""
    vm, _, checker = mapped_vm(kv)
    pt = vm.page_tables
    link = pt.get_entry(0, 3)
    with writable(pt):
        pt.set_entry(1 << 30, 3, link)
    table = ((link & ~0xFFF & ((1 << 52) - 1)) - PT_BASE_HPA) >> 12
    problems = both(checker)
    assert problems[0] == f"table 1[1] links table {table} badly"


def test_a_link_out_of_range(kv):
    vm, _, checker = mapped_vm(kv)
    pt = vm.page_tables
    with writable(pt):
        pt.set_entry(1 << 30, 3, (PT_BASE_HPA + (1000 << 12)) | (pt.get_entry(0, 3) & 0xFFF))
    assert both(checker) == ["table 1[1] links table 1000 badly"]


def test_a_leaf_the_stats_do_not_count(kv):
    """A 4K leaf written into the mapped 4K table: a frame the slot does not give, and
    one more leaf than pages_4k counts."""
    vm, _, checker = mapped_vm(kv)
    pt = vm.page_tables
    with writable(pt):
        pt.set_entry(0x9000, 1, pt.get_entry(0, 1) & ~SPTE_BASE_ADDR_MASK | 0x1234 << 12)
    assert both(checker) == [
        "direct leaf gfn 0x9 level 1 maps frame 0x1234, not 0x40009",
        "leaf counts [4, 0, 0] differ from the tables [5, 0, 0]"]
    assert checker.judged == 1


def test_a_dirty_bitmap_word_cleared(kv):
    """svm (no PML): a writable leaf of a logging slot must have its bit set."""
    vm, _, checker = mapped_vm(kv, "svm", flags=MemFlag.LOG_DIRTY_PAGES)
    vm._memory.slot_by_id(0, 0).dirty_bitmap[0] = 0
    problems = both(checker)
    assert len(problems) == 4 and "page 0 is not in the dirty log" in problems[0]
    assert checker.judged == 4              # each table on the path holds pages 0..63


def test_a_table_relinked_after_a_change_while_unlinked(kv):
    """The 4K table unlinked, the dirty log cleared meanwhile, the table linked back
    unchanged at its old place: it is judged again, not taken from before."""
    vm, _, checker = mapped_vm(kv, "svm", flags=MemFlag.LOG_DIRTY_PAGES)
    pt = vm.page_tables
    link = pt.get_entry(0, 2)
    with writable(pt):
        pt.set_entry(0, 2, 0)
    assert both(checker) == ["leaf counts [4, 0, 0] differ from the tables [0, 0, 0]"]
    vm._memory.slot_by_id(0, 0).dirty_bitmap[0] = 0
    assert both(checker) == ["leaf counts [4, 0, 0] differ from the tables [0, 0, 0]"]
    with writable(pt):
        pt.set_entry(0, 2, link)
    problems = both(checker)
    assert len(problems) == 4 and "page 3 is not in the dirty log" in problems[3]


def test_a_memslot_made_read_only(kv):
    vm, _, checker = mapped_vm(kv)
    vm._memory.slot_by_id(0, 0).flags |= MemFlag.READONLY
    assert both(checker) == [f"direct leaf gfn {g:#x} level 1 is writable in a READONLY "
                             "memslot" for g in range(4)]


def huge_leaf_vm(kv):
    """4 MiB at GPA 0, host-mapped 2M, its first 2M mapped by one leaf, and a checker
    that has seen it sound."""
    vm = kv.VM(vendor="vmx")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, host_level=2)
    assert vm.create_vcpu().access(0x1000).level == 2
    checker = InvariantChecker(vm)
    assert both(checker) == []
    return vm, checker


def test_lpage_info_changed_under_a_huge_leaf(kv):
    vm, checker = huge_leaf_vm(kv)
    vm._memory.slot_by_id(0, 0).lpage[0][0] = 1
    assert both(checker) == ["direct leaf gfn 0x0 level 2 is where lpage_info disallows a "
                             "huge page"]


def test_the_host_split_a_huge_page_without_an_invalidation(kv):
    """kvm_mmu_max_mapping_level caps a mapping at the host's level; a THP split
    invalidates the range first.  A lower host level without that leaves a 2M leaf
    above it."""
    vm, checker = huge_leaf_vm(kv)
    vm._memory.slot_by_id(0, 0).host_level = 1
    assert both(checker) == ["direct leaf gfn 0x0 level 2 is above the host's mapping "
                             "level 1"]
    vm.set_host_level(0, 1)                  # the real split: the leaf is zapped
    assert both(checker) == []


def private_vm(kv):
    """SW_PROTECTED, 4 MiB of guest_memfd at GPA 0, page 1 private and mapped."""
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(SLOT_4M)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT_4M,
                              userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD, guest_memfd=gmem)
    vm.set_memory_attributes(0x1000, 0x1000, MemAttr.PRIVATE)
    vm.create_vcpu().access(0x1000, write=True)
    checker = InvariantChecker(vm)
    assert both(checker) == []
    return vm, gmem, checker


def test_a_frame_no_longer_prepared(kv):
    vm, gmem, checker = private_vm(kv)
    pfn = gmem.pfn(1)
    assert vm._memory.memslots.frame(pfn) & FrameState.PREPARED.value
    vm._memory.memslots.set_frame(pfn, 0)
    assert both(checker) == ["direct leaf gfn 0x1 level 1 maps a guest_memfd folio that is "
                             "not prepared"]
    assert checker.judged == 1


def test_attributes_changed_without_a_zap(kv):
    """Page 1 made shared in the store alone: its leaf keeps the guest_memfd frame."""
    vm, gmem, checker = private_vm(kv)
    vm._memory.memslots.store_attributes(1, 2, 0)
    assert both(checker) == [f"direct leaf gfn 0x1 level 1 maps frame {gmem.pfn(1):#x}, "
                             f"not {(UADDR >> 12) + 1:#x}"]


CORRUPTIONS = ("entry", "bitmap", "frame", "attributes", "lpage", "flags")


def corrupt(vm, kind, value):
    """Break one input of the judgements, as ``value`` picks."""
    memory = vm._memory
    slots = memory.slots(0)
    if not slots:
        return
    slot = slots[value % len(slots)]
    gfn = slot.base_gfn + (value >> 8) % slot.npages
    if kind == "entry":
        with writable(vm.page_tables) as pt:
            try:
                pt.set_entry(gfn << 12, 1 + (value >> 40) % 2, value & ~(1 << 7 | 0xFF000))
            except (ValueError, OverflowError):
                pass
    elif kind == "bitmap" and slot.dirty_bitmap is not None:
        slot.dirty_bitmap[((value >> 8) % slot.npages) >> 6] = 0
    elif kind == "frame":
        frames = [(e & SPTE_BASE_ADDR_MASK) >> 12 for e in vm.page_tables.tables.ravel().tolist()
                  if (e & SPTE_BASE_ADDR_MASK) >> 12 >= memory.config.gmem_base]
        try:
            if frames:
                memory.memslots.set_frame(frames[value % len(frames)], (value >> 32) & 3)
        except ValueError:      # a frame of a closed guest_memfd, or a wild one
            pass
    elif kind == "attributes":
        memory.memslots.store_attributes(gfn, gfn + 1 + (value >> 48) % 600,
                                         (value >> 20) & 8)
    elif kind == "lpage":
        slot.lpage[(value >> 4) & 1][0] ^= 1
    else:
        slot.flags ^= MemFlag.READONLY


@settings(max_examples=60)
@given(seed=st.integers(0, 2**64 - 1), size=st.integers(64, 600),
       breaks=st.lists(st.tuples(st.sampled_from(CORRUPTIONS), st.integers(0, 2**64 - 1)),
                       max_size=4))
def test_incremental_equals_full(kv, seed, size, breaks):
    """A fuzzer's call sequence (random bytes, decoded), then inputs broken one by one
    (KVM's own code is not run on broken inputs): after every step the incremental
    checker, kept across the steps, agrees with a full check."""
    side, checker = Side(kv), None
    for op in decode(random.Random(seed).randbytes(size)):
        try:
            _run(side, tuple(_fresh(a) for a in op))
        except CONTRACT_ERRORS:
            pass
        if side.vm is not None:
            if checker is None or checker.vm is not side.vm:
                checker = InvariantChecker(side.vm)
            both(checker)
    for kind, value in breaks if checker is not None else ():
        corrupt(checker.vm, kind, value)
        both(checker)


def test_the_twin_checks_the_incremental_verdict_from_scratch(monkeypatch):
    """Twin.check judges each VM with its InvariantChecker, and every 8th step from
    scratch too: a checker that misses a broken invariant is a Divergence."""
    twin = run_ops([("vm", VMType.DEFAULT, "svm", 48, False), ("vcpu",),
                    ("slot", 0, 0, SLOT_4M, UADDR, 0, None, 0, 1)])
    for side in twin.sides:
        side.vcpus[0].access(0x1000, write=True)
        side.vm._memory.slot_by_id(0, 0).flags |= MemFlag.READONLY
    monkeypatch.setattr(InvariantChecker, "check", lambda self: [])
    twin.steps = 7
    twin.check()                            # step 7: the checkers alone
    twin.steps = 8
    with pytest.raises(Divergence, match="incremental invariant check differs"):
        twin.check()
