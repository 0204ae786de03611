"""The fault pipeline through VCPU.access: first-touch faults and re-walks of mapped pages."""

import pytest

from kvmemu import Translation, VMType

N_PAGES = 2000
GIB = 1 << 30


def fresh_vcpu(core, vm_type=VMType.DEFAULT):
    vm = core.VM(vm_type)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0x7F0000000000)
    return vm, vm.create_vcpu()


@pytest.mark.benchmark(group="fault-first-touch")
def test_first_touch_4k(benchmark, kv, per_element):
    """N_PAGES first-touch 4K faults on a DEFAULT VM: walk, EPT violation, fault, map."""
    def setup():
        return (fresh_vcpu(kv)[1],), {}

    def touch(vcpu):
        for i in range(N_PAGES):
            vcpu.access(i << 12, write=True)

    benchmark.pedantic(touch, setup=setup, rounds=5, iterations=1)
    per_element(N_PAGES)


@pytest.mark.benchmark(group="fault-mapped-access")
def test_mapped_access(scalar, kv):
    """VCPU.access on a page that is already mapped: one hardware walk, no exit."""
    _, vcpu = fresh_vcpu(kv)
    vcpu.access(0x5000)
    assert scalar(vcpu.access, 0x5123) == Translation(0x7F0000005123, 1)


@pytest.mark.benchmark(group="fault-mapped-access")
def test_harness_floor(scalar):
    """What the harness itself costs per call (``len`` of a short string, 14 ns alone):
    subtract it from the scalar calls' figures for the call alone."""
    assert scalar(len, "abc") == 3


@pytest.mark.benchmark(group="fault-first-touch")
def test_first_touch_tdx_private(benchmark, kv, per_element):
    """TDX private first touches: handled as writes, mapped 4K in the mirror root."""
    def setup():
        vm = kv.VM(VMType.TDX)
        gmem = vm.create_guest_memfd(GIB)
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                                  userspace_addr=0x7F0000000000, flags=4, guest_memfd=gmem)
        vm.set_memory_attributes(0, GIB, 8)
        return (vm.create_vcpu(),), {}

    def touch(vcpu):
        for i in range(N_PAGES):
            vcpu.access(i << 12)

    benchmark.pedantic(touch, setup=setup, rounds=5, iterations=1)
    per_element(N_PAGES)


@pytest.mark.benchmark(group="fault-first-touch-batch")
def test_first_touch_batch(benchmark, kv, per_element):
    """First-touch 4K faults through VCPU.access_many: the loop runs in the core.  Each
    round on a new VM made after a collection, whose table memory comes from the pool
    the VMs of the rounds before the last gave back (pytest-benchmark still holds the
    last round's arguments while setup runs).  The first VM of a process also waits for
    the kernel to zero each new table page: about 4 ns more per fault, one page per 512."""
    import gc

    import numpy as np
    n = 16 * N_PAGES                         # the same work on both cores
    gpas = np.arange(n, dtype=np.uint64) << np.uint64(12)

    def setup():
        gc.collect()
        return (fresh_vcpu(kv)[1], gpas), {}

    def touch(vcpu, gpas):
        assert vcpu.access_many(gpas, 1).count == n

    benchmark.pedantic(touch, setup=setup, rounds=10, iterations=1)
    per_element(n)


@pytest.mark.benchmark(group="fault-first-touch-new-2m-region")
def test_first_touch_each_in_a_new_2m_region(benchmark, kv, per_element):
    """First-touch faults 2 MiB apart, each mapped 4K (the host mapping is not 2M
    aligned) so each needs a new leaf table, on a VM made after a collection: a later
    VM in the same process takes its table memory from the pool that the VMs of the
    rounds before the last gave back (pytest-benchmark still holds the last round's
    arguments while setup runs)."""
    import gc

    import numpy as np
    n = 4 * N_PAGES
    gpas = np.arange(n, dtype=np.uint64) << np.uint64(21)

    def setup():
        gc.collect()                     # the earlier rounds' VMs give their tables back
        vm = kv.VM(VMType.DEFAULT)
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=n << 21,
                                  userspace_addr=0x7F0000001000)
        return (vm.create_vcpu(), gpas), {}

    def touch(vcpu, gpas):
        batch = vcpu.access_many(gpas, 1)
        assert batch.count == n and batch.level.max() == 1

    benchmark.pedantic(touch, setup=setup, rounds=5, iterations=1)
    per_element(n)


@pytest.mark.benchmark(group="fault-first-touch-traced")
def test_first_touch_batch_traced(benchmark, kv, per_element):
    """The batch above with ``vm.trace`` set to a no-op callable: four events per fault
    (kvm_page_fault, kvm_mmu_spte_requested, kvm_tdp_mmu_spte_changed, kvm_mmu_set_spte),
    each recorded in the fault path and formatted and handed to the sink at the end."""
    import numpy as np
    n = 4 * N_PAGES
    gpas = np.arange(n, dtype=np.uint64) << np.uint64(12)
    events = []

    def setup():
        vm, vcpu = fresh_vcpu(kv)
        vm.trace = lambda event, text: None
        vcpu.access(n << 12)                      # the tables down to the first leaf table
        events.clear()
        vm.trace = lambda event, text: events.append(event)
        vcpu.access((n + 1) << 12)
        assert len(events) == 4
        vm.trace = lambda event, text: None
        return (vcpu, gpas), {}

    def touch(vcpu, gpas):
        assert vcpu.access_many(gpas, 1).count == n

    benchmark.pedantic(touch, setup=setup, rounds=5, iterations=1)
    per_element(n)


@pytest.mark.benchmark(group="snapshot")
def test_snapshot_restore(benchmark, kv):
    """Snapshot and restore a VM with 16K mapped 4K pages and a converted range."""
    import numpy as np
    vm = kv.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0x7F0000000000)
    vcpu = vm.create_vcpu()
    vcpu.access_many(np.arange(1 << 14, dtype=np.uint64) << np.uint64(12))
    vm.set_memory_attributes(1 << 28, 1 << 21, 8)

    def round_trip():
        vm.restore(vm.snapshot())

    benchmark(round_trip)
    assert vm.stats["pages_4k"] == 1 << 14
