"""VM memory model: attribute conversion over large ranges, gfn → memslot lookup."""

import numpy as np
import pytest

from kvmemu import VMType, _select

GIB, TIB = 1 << 30, 1 << 40
SLOTS = 1000
N_LOOKUP = 1 << 20


def vm_with_slot(core, size=64 * GIB):
    vm = core.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=size,
                              userspace_addr=0x100000000000)
    return vm


@pytest.mark.benchmark(group="memory-attributes")
def test_convert_64g_slot_both_ways(benchmark, kv):
    """Private then shared over a 64 GiB slot: pre/post hooks walk 32768 2M + 64 1G entries."""
    vm = vm_with_slot(kv)

    def convert():
        vm.set_memory_attributes(0, 64 * GIB, 8)
        vm.set_memory_attributes(0, 64 * GIB, 0)

    benchmark(convert)
    assert vm.memory_attribute_ranges() == []


@pytest.mark.benchmark(group="memory-attributes")
def test_mark_a_terabyte_private(benchmark, kv):
    """4 TiB without memslots: a range, not 2**30 pages."""
    vm = kv.VM(VMType.SW_PROTECTED)

    def mark():
        vm.set_memory_attributes(0, 4 * TIB, 8)
        vm.set_memory_attributes(0, 4 * TIB, 0)

    benchmark(mark)


@pytest.mark.benchmark(group="memory-attributes")
def test_2m_conversion_churn(benchmark, kv, rng):
    """256 scattered 2 MiB conversions in a 64 GiB slot, then back: the mixed-flag edges."""
    vm = vm_with_slot(kv)
    starts = (rng.integers(0, 32768, 256) << 21).tolist()

    def churn():
        for start in starts:
            vm.set_memory_attributes(start + 4096, 2 << 20, 8)
        for start in starts:
            vm.set_memory_attributes(start + 4096, 2 << 20, 0)

    benchmark.pedantic(churn, rounds=5, iterations=1)


@pytest.fixture(scope="module")
def many_slots():
    vms = {}
    for name in ("cython", "python"):
        vm = _select.load(name).VM()
        for i in range(SLOTS):
            vm.set_user_memory_region(slot=i, guest_phys_addr=i * 4 * GIB, memory_size=GIB,
                                      userspace_addr=0x100000000000 + i * GIB)
        vms[name] = vm
    return vms


@pytest.mark.benchmark(group="memory-slot-lookup")
def test_find_memslot_scalar(scalar, many_slots, kv):
    vm = many_slots["cython" if kv.IMPLEMENTATION == "cython" else "python"]
    assert scalar(vm.find_memslot, (777 * 4 * GIB + 12345 * 4096) >> 12) == 777


@pytest.mark.benchmark(group="memory-slot-lookup")
def test_find_memslots_batch(benchmark, many_slots, rng, per_element):
    vm = many_slots["cython"]
    gfns = rng.integers(0, SLOTS * 4 * GIB >> 12, N_LOOKUP, dtype=np.uint64)
    ids = benchmark(vm.find_memslots, gfns)
    slot_of = (gfns // (4 * GIB >> 12)).astype(np.int64)
    expected = np.where((gfns % (4 * GIB >> 12)) < (GIB >> 12), slot_of, -1)
    np.testing.assert_array_equal(ids, expected)
    per_element(N_LOOKUP)


# --- how the bookkeeping grows (one round each: the curve, not a tight figure) ------------

@pytest.mark.benchmark(group="memory-slot-growth")
@pytest.mark.parametrize("gmem", [False, True], ids=["plain", "guest_memfd"])
@pytest.mark.parametrize("count", [1000, 8000, 32000])
def test_create_memslots(benchmark, count, gmem):
    """``count`` 2 MiB memslots created one after the other (compiled core): each change
    copies one chunk of records and moves list entries, so the curve is near-linear.
    ``guest_memfd``: every slot bound to its own range of one file (each bind bisects
    the file's bound ranges)."""
    from kvmemu import MemFlag, VMType, _select
    core = _select.load("cython")

    def build():
        vm = core.VM(VMType.SW_PROTECTED)
        extra = {}
        if gmem:
            file = vm.create_guest_memfd(count << 21)
        for i in range(count):
            if gmem:
                extra = {"flags": MemFlag.GUEST_MEMFD, "guest_memfd": file,
                         "guest_memfd_offset": i << 21}
            vm.set_user_memory_region(slot=i, guest_phys_addr=i << 21, memory_size=1 << 21,
                                      userspace_addr=(1 << 40) + (i << 21), **extra)
        return vm

    vm = benchmark.pedantic(build, rounds=1, iterations=1)
    assert len(vm.memslots) == count


@pytest.mark.benchmark(group="memory-attribute-growth")
@pytest.mark.parametrize("count", [1000, 16000, 128000, 1000000])
def test_build_attribute_ranges(benchmark, count):
    """``count`` separate private ranges set one after the other (compiled core): each
    change rewrites the chunk of ranges around it, so the curve is near-linear."""
    from kvmemu import MemAttr, VMType, _select
    core = _select.load("cython")

    def build():
        vm = core.VM(VMType.SW_PROTECTED)
        for i in range(count):
            vm.set_memory_attributes(i * 0x2000, 0x1000, MemAttr.PRIVATE)
        return vm

    vm = benchmark.pedantic(build, rounds=1, iterations=1)
    assert len(vm.memory_attribute_ranges()) == count
