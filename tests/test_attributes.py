"""KVM_SET_MEMORY_ATTRIBUTES, mixed-hugepage tracking and the invalidation protocol.

Rules from docs/reference.md §7 (the invalidation sequence) and §13 (attributes).
The property tests compare against plain per-gfn models: a numpy array of
attributes, and a brute-force recomputation of every hugepage's mixed flag.
"""

import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmemu import INVALID_GPA, KvmError, MemFlag, VMType

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
PRIVATE, MIXED = 8, 1 << 31
UADDR = 0x7F0000000000


def new_vm(kv, vm_type=VMType.SW_PROTECTED, slots=((10, GIB, 2 * GIB),)):
    vm = kv.VM(vm_type)
    for slot, gpa, size in slots:
        vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                                  userspace_addr=UADDR + gpa)
    return vm


@pytest.mark.parametrize("address, size, attributes, flags", [
    (0, 4096, PRIVATE, 1),                  # flags must be 0
    (0, 4096, 1, 0), (0, 4096, 1 << 63, 0),  # only PRIVATE is supported
    (0, 0, PRIVATE, 0),                     # size 0
    ((1 << 64) - 4096, 8192, PRIVATE, 0),   # wraps
    (0x800, 4096, PRIVATE, 0), (0, 0x1800, PRIVATE, 0),
])
def test_validation_einval(kv, address, size, attributes, flags):
    vm = new_vm(kv)
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(address, size, attributes, flags)
    assert info.value.errno == errno.EINVAL
    assert vm.memory_attribute_ranges() == []


@pytest.mark.parametrize("vm_type", [VMType.DEFAULT, VMType.SEV, VMType.SEV_ES])
def test_vms_without_private_memory_accept_only_zero(kv, vm_type):
    vm = new_vm(kv, vm_type)
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(GIB, 4096, PRIVATE)
    assert info.value.errno == errno.EINVAL
    vm.set_memory_attributes(GIB, 4096, 0)
    assert vm.get_memory_attributes(GIB >> 12) == 0
    assert vm.mmu_invalidate_seq == 0


@pytest.mark.parametrize("vm_type", [VMType.SW_PROTECTED, VMType.SNP, VMType.TDX])
def test_set_get_and_erase(kv, vm_type):
    vm = new_vm(kv, vm_type)
    vm.set_memory_attributes(GIB + 4096, 8192, PRIVATE)
    gfn = GIB >> 12
    assert [vm.get_memory_attributes(gfn + i) for i in range(4)] == [0, 8, 8, 0]
    vm.set_memory_attributes(GIB, 16384, PRIVATE)
    assert vm.memory_attribute_ranges() == [(gfn, gfn + 4, 8)]
    vm.set_memory_attributes(GIB + 8192, 4096, 0)
    assert vm.memory_attribute_ranges() == [(gfn, gfn + 2, 8), (gfn + 3, gfn + 4, 8)]


def test_ranges_without_memslot_store_but_do_not_invalidate(kv):
    vm = new_vm(kv)
    vm.set_memory_attributes(64 * GIB, 2 * MIB, PRIVATE)
    assert vm.get_memory_attributes((64 * GIB >> 12) + 5) == PRIVATE
    assert vm.mmu_invalidate_seq == 0
    assert vm.mmu_invalidate_range == (INVALID_GPA, INVALID_GPA)


def test_a_terabyte_is_a_range_not_pages(kv):
    vm = new_vm(kv)
    vm.set_memory_attributes(0, 4 * TIB, PRIVATE)
    assert vm.memory_attribute_ranges() == [(0, 4 * TIB >> 12, 8)]
    vm.set_memory_attributes(TIB, 4096, 0)
    assert len(vm.memory_attribute_ranges()) == 2
    assert vm.get_memory_attributes((4 * TIB >> 12) - 1) == PRIVATE


def test_nothing_to_do_leaves_the_sequence_alone(kv):
    vm = new_vm(kv)
    vm.set_memory_attributes(GIB, 2 * MIB, PRIVATE)
    assert vm.mmu_invalidate_seq == 1
    vm.set_memory_attributes(GIB, 2 * MIB, PRIVATE)
    vm.set_memory_attributes(GIB + 4096, 4096, PRIVATE)
    vm.set_memory_attributes(4 * GIB, 4096, 0)
    assert vm.mmu_invalidate_seq == 1
    assert vm.mmu_invalidate_in_progress == 0


def test_invalidation_range_is_widened_to_straddled_hugepages(kv):
    vm = new_vm(kv)
    gfn = GIB >> 12
    # One page in the first 2M of the first 1G of the slot: the pre hook adds the head 2M
    # and 1G pages, neither mixed yet.
    vm.set_memory_attributes(GIB + 4096, 4096, PRIVATE)
    assert vm.mmu_invalidate_range == (gfn, gfn + 262144)
    # Now both are mixed: only the range itself is added.
    vm.set_memory_attributes(GIB + 8192, 4096, PRIVATE)
    assert vm.mmu_invalidate_range == (gfn + 2, gfn + 3)
    assert vm.mmu_invalidate_seq == 2


def test_attribute_range_clipped_to_slots(kv):
    vm = new_vm(kv, slots=((1, GIB, 4 * MIB), (2, 2 * GIB, 4 * MIB)))
    vm.set_memory_attributes(0, 4 * GIB, PRIVATE)
    # Both slots are covered whole (no straddled hugepage inside a slot): the range added
    # spans the first slot's start to the second slot's end.
    assert vm.mmu_invalidate_range == (GIB >> 12, (2 * GIB + 4 * MIB) >> 12)
    assert vm.mmu_invalidate_seq == 1


def test_mixed_flags(kv):
    vm = new_vm(kv)                          # slot 10: [1 GiB, 3 GiB), two whole 1G pages
    vm.set_memory_attributes(GIB + 4096, 4096, PRIVATE)
    lp2, lp1 = vm.lpage_info(10, 2), vm.lpage_info(10, 3)
    assert lp2[0] == MIXED and lp2[1:] == [0] * 1023
    assert lp1 == [MIXED, 0]
    vm.set_memory_attributes(GIB, 2 * MIB, PRIVATE)   # the whole 2M page is now private
    assert vm.lpage_info(10, 2)[0] == 0
    assert vm.lpage_info(10, 3) == [MIXED, 0]          # but the 1G page is mixed
    vm.set_memory_attributes(GIB, GIB, PRIVATE)
    assert vm.lpage_info(10, 3) == [0, 0]
    vm.set_memory_attributes(GIB, 2 * GIB, 0)
    assert vm.lpage_info(10, 2) == [0] * 1024 and vm.lpage_info(10, 3) == [0, 0]


def test_mixed_flags_sit_on_top_of_disallow_counts(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    vm.set_memory_attributes(GIB + 4096, 4096, PRIVATE)
    # Created after the attributes: kvm_mmu_init_memslot_memory_attributes sets mixed.
    vm.set_user_memory_region(slot=1, guest_phys_addr=GIB, memory_size=GIB + 2 * MIB,
                              userspace_addr=UADDR)
    lp2, lp1 = vm.lpage_info(1, 2), vm.lpage_info(1, 3)
    assert lp2[0] == MIXED and len(lp2) == 513
    assert lp1 == [MIXED, 1]                 # partial 1G tail: disallowed, not tracked
    # A page in the partial tail 1G: not tracked at 1G, tracked at 2M.
    vm.set_memory_attributes(2 * GIB + 4096, 4096, PRIVATE)
    assert vm.lpage_info(1, 2)[512] == MIXED
    assert vm.lpage_info(1, 3) == [MIXED, 1]


def test_dirty_logging_flag_keeps_metadata(kv):
    vm = new_vm(kv)
    vm.set_memory_attributes(GIB + 4096, 4096, PRIVATE)
    vm.set_user_memory_region(slot=10, guest_phys_addr=GIB, memory_size=2 * GIB,
                              userspace_addr=UADDR + GIB, flags=MemFlag.LOG_DIRTY_PAGES)
    assert vm.lpage_info(10, 2)[0] == MIXED


def test_move_recomputes_metadata(kv):
    vm = new_vm(kv)
    vm.set_memory_attributes(4 * GIB + 4096, 4096, PRIVATE)
    assert vm.lpage_info(10, 2)[0] == 0
    vm.set_user_memory_region(slot=10, guest_phys_addr=4 * GIB, memory_size=2 * GIB,
                              userspace_addr=UADDR + GIB)
    assert vm.lpage_info(10, 2)[0] == MIXED


def test_get_memory_attributes_checks_gfn(kv):
    vm = new_vm(kv)
    with pytest.raises(OverflowError):
        vm.get_memory_attributes(-1)
    with pytest.raises(TypeError):
        vm.get_memory_attributes("0")
    assert vm.get_memory_attributes(2**64 - 1) == 0


# --- properties against plain models -------------------------------------------------------------

UNIVERSE = 1 << 20          # gfns 0 .. 4 GiB
PAGES = st.integers(0, UNIVERSE - 1)


def brute_force_mixed(attrs, base, npages, level):
    """Mixed flag of every hugepage fully inside [base, base + npages), from per-gfn attrs."""
    n = 512 if level == 2 else 262144
    first = -(-base // n) * n
    last = (base + npages) // n * n
    expected = {}
    for gfn in range(first, last, n):
        window = attrs[gfn:gfn + n]
        expected[gfn] = bool(window.min() != window.max())
    return expected


def check_against_models(vm, attrs, slots):
    ranges = vm.memory_attribute_ranges()
    model = np.zeros(UNIVERSE, dtype=np.uint64)
    for start, end, value in ranges:
        assert start < end and value
        model[start:min(end, UNIVERSE)] = value
    for (s1, e1, v1), (s2, _, v2) in zip(ranges, ranges[1:]):
        assert e1 < s2 or (e1 == s2 and v1 != v2)      # disjoint, sorted, merged
    np.testing.assert_array_equal(model, attrs)
    for slot, (base, npages) in slots.items():
        for level in (2, 3):
            info = vm.lpage_info(slot, level)
            for gfn, mixed in brute_force_mixed(attrs, base, npages, level).items():
                index = (gfn >> (9 * (level - 1))) - (base >> (9 * (level - 1)))
                assert bool(info[index] & MIXED) == mixed, (slot, level, hex(gfn))
            assert all(v & ~MIXED in (0, 1) for v in info)


@settings(max_examples=40)
@given(ops=st.lists(st.tuples(PAGES, st.integers(1, 3 * 262144), st.sampled_from([0, 8]),
                              st.booleans()), max_size=12),
       slot_layout=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 4096)), min_size=1,
                            max_size=3, unique_by=lambda t: t[0]))
def test_attributes_and_mixed_flags_match_plain_models(kv, ops, slot_layout):
    vm = kv.VM(VMType.SW_PROTECTED)
    slots = {}
    for i, (pos, pages_2m) in enumerate(slot_layout):
        base = pos * (UNIVERSE // 8) + (i * 7 % 3) * 256       # some slots start unaligned
        npages = min(pages_2m * 512 - (i % 2) * 100, UNIVERSE // 8 - 512)
        vm.set_user_memory_region(slot=i, guest_phys_addr=base << 12, memory_size=npages << 12,
                                  userspace_addr=base << 12)
        slots[i] = (base, npages)
    attrs = np.zeros(UNIVERSE, dtype=np.uint64)
    for start, length, value, misaligned in ops:
        end = min(start + length, UNIVERSE)
        address, size = start << 12, (end - start) << 12
        if misaligned:                                         # rejected: nothing changes
            with pytest.raises(KvmError):
                vm.set_memory_attributes(address + 2048, size, value)
            continue
        vm.set_memory_attributes(address, size, value)
        attrs[start:end] = value
    check_against_models(vm, attrs, slots)


class AttributeMachine(RuleBasedStateMachine):
    """Slots come and go while attributes change: every step is checked against the models."""

    kv = None

    def __init__(self):
        super().__init__()
        self.vm = self.kv.VM(VMType.SW_PROTECTED)
        self.attrs = np.zeros(UNIVERSE, dtype=np.uint64)
        self.slots = {}
        self.seq = 0

    @rule(slot=st.integers(0, 3), pos=st.integers(0, 7), npages=st.integers(1, 600000))
    def add_slot(self, slot, pos, npages):
        base = pos * (UNIVERSE // 8) + 64 * pos
        npages = min(npages, UNIVERSE // 8 - 64 * pos)
        if slot in self.slots:
            expected = None if self.slots[slot] == (base, npages) else errno.EINVAL
        else:
            overlaps = any(b < base + npages and base < b + n for b, n in self.slots.values())
            expected = errno.EEXIST if overlaps else None
        try:
            self.vm.set_user_memory_region(slot=slot, guest_phys_addr=base << 12,
                                           memory_size=npages << 12, userspace_addr=base << 12)
        except KvmError as exc:
            assert exc.errno == expected
            return
        assert expected is None
        self.slots[slot] = (base, npages)

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def delete_slot(self, data):
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        self.vm.set_user_memory_region(slot=slot, guest_phys_addr=0, memory_size=0,
                                       userspace_addr=0)
        del self.slots[slot]

    @rule(start=PAGES, length=st.integers(1, 300000), value=st.sampled_from([0, 8]))
    def set_attributes(self, start, length, value):
        end = min(start + length, UNIVERSE)
        changes = bool((self.attrs[start:end] != value).any())
        touches_slot = any(b < end and start < b + n for b, n in self.slots.values())
        self.vm.set_memory_attributes(start << 12, (end - start) << 12, value)
        self.attrs[start:end] = value
        self.seq += changes and touches_slot
        assert self.vm.mmu_invalidate_seq == self.seq

    @rule(gfn=st.integers(0, UNIVERSE - 1))
    def get_attributes(self, gfn):
        assert self.vm.get_memory_attributes(gfn) == self.attrs[gfn]

    @invariant()
    def matches_models(self):
        assert self.vm.mmu_invalidate_in_progress == 0
        check_against_models(self.vm, self.attrs, self.slots)


@pytest.mark.thread_unsafe          # Hypothesis is not thread-safe
@pytest.mark.parametrize("implementation", ["cython", "python"])
def test_attribute_state_machine(implementation):
    from kvmemu import _select
    machine = type("Machine", (AttributeMachine,), {"kv": _select.load(implementation)})
    machine.TestCase.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)
    machine.TestCase().runTest()


def test_invalidation_makes_a_racing_fault_retry(kv):
    """mmu_invalidate_retry_gfn (reference §7): a fault that snapshotted the sequence before an
    attribute change, or that targets a gfn inside an invalidation in progress, retries."""
    vm = new_vm(kv)
    memory, gfn = vm._memory, (GIB >> 12) + 1
    retry = memory.memslots.mmu_invalidate_retry_gfn
    seq = vm.mmu_invalidate_seq
    assert not retry(seq, gfn)
    vm.set_memory_attributes(GIB + 4096, 4096, PRIVATE)
    assert retry(seq, gfn)
    assert not retry(vm.mmu_invalidate_seq, gfn)
    seq = vm.mmu_invalidate_seq
    memory.invalidate_begin()
    assert retry(seq, 0)              # no range added yet: every gfn
    memory.invalidate_range_add(gfn, gfn + 512)
    assert retry(seq, gfn + 511)
    assert not retry(seq, gfn + 512)
    memory.invalidate_end()
    assert retry(seq, gfn + 512)      # the sequence moved on
    assert vm.mmu_invalidate_in_progress == 0


def test_thousands_of_ranges_match_a_page_by_page_model(kv):
    """Random stores and erases over a 64K-page space, enough ranges that the compiled
    core's store spreads them over many chunks: the ranges, the lookups and
    kvm_range_has_memory_attributes match a page-by-page model."""
    import random

    import numpy as np
    rng = random.Random(11)
    vm = kv.VM(VMType.SW_PROTECTED)
    pages = np.zeros(1 << 16, dtype=np.uint8)
    for step in range(5000):
        start = rng.randrange(1 << 16)
        size = rng.choice((1, 1, 2, 3, 17, 40)) if step % 100 else rng.randrange(1, 2000)
        end = min(start + size, 1 << 16)
        attrs = 0 if rng.random() < 0.3 else 8
        vm.set_memory_attributes(start << 12, (end - start) << 12, attrs)
        pages[start:end] = attrs
    # The model's runs, merged, are the store's ranges.
    expect, run = [], None
    for gfn, value in enumerate(pages.tolist()):
        if value and run is not None and run[1] == gfn:
            run[1] = gfn + 1
        elif value:
            run = [gfn, gfn + 1, value]
            expect.append(run)
        else:
            run = None
    assert vm.memory_attribute_ranges() == [tuple(r) for r in expect]
    assert len(expect) > 1000
    probe = rng.sample(range(1 << 16), 500)
    assert [vm.get_memory_attributes(g) for g in probe] == [int(pages[g]) for g in probe]
    mem = vm._memory.memslots
    for _ in range(300):
        s = rng.randrange(1 << 16)
        e = min(s + rng.choice((2, 5, 40)), 1 << 16)
        for attrs in (0, 8):
            assert mem.range_has_memory_attributes(s, e, ~0, attrs) == bool(
                (pages[s:e] == attrs).all()), (s, e, attrs)
