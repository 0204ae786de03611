"""vCPUs on threads: one thread against two over the same total work, on one VM.

``mapped``: 2M random reads of mapped 4K pages with ``access_many`` into reused
``out=`` arrays (the walks run without the GIL, holding mmu_lock for read).  ``first-touch``: 200K first-touch 4K
faults with ``access_many``.  Each two-thread case splits the work in halves, one per
vCPU; ``extra_info`` records the elements and ns per element.
"""

import threading

import numpy as np
import pytest

from kvmemu import VMType, _select

N_MAPPED = 1 << 21
N_PAGES = 64 * 1024
N_FAULTS = 200_000


def run_split(vcpus, chunks, outs=None):
    """Each vCPU's access_many on its chunk, each on its own thread (one: in this one),
    filling ``outs`` (one (hpa, level) pair per chunk) when given."""
    outs = outs or [None] * len(chunks)
    if len(vcpus) == 1:
        assert vcpus[0].access_many(chunks[0], 1, out=outs[0]).exit is None
        return
    threads = [threading.Thread(target=lambda v=v, c=c, o=o: v.access_many(c, 1, out=o))
               for v, c, o in zip(vcpus, chunks, outs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def vm_with_vcpus(n):
    vm = _select.load("cython").VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 30,
                              userspace_addr=0x7F0000000000)
    return vm, [vm.create_vcpu() for _ in range(n)]


@pytest.mark.benchmark(group="threads-mapped", disable_gc=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_mapped_access_many(benchmark, threads, rng, per_element):
    vm, vcpus = vm_with_vcpus(threads)
    vcpus[0].access_many(np.arange(N_PAGES, dtype=np.uint64) << np.uint64(12), 1)
    gpas = rng.integers(0, N_PAGES, N_MAPPED, dtype=np.uint64) << np.uint64(12)
    chunks = np.array_split(gpas, threads)
    outs = [(np.empty(len(c), np.uint64), np.empty(len(c), np.uint8)) for c in chunks]
    benchmark(run_split, vcpus, chunks, outs)
    per_element(N_MAPPED)
    assert vm.check_invariants() == []


@pytest.mark.benchmark(group="threads-first-touch", disable_gc=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_first_touch_access_many(benchmark, threads, per_element):
    gpas = np.arange(N_FAULTS, dtype=np.uint64) << np.uint64(12)
    chunks = np.array_split(gpas, threads)

    def setup():
        return (vm_with_vcpus(threads)[1], chunks), {}

    benchmark.pedantic(run_split, setup=setup, rounds=15, iterations=1)
    per_element(N_FAULTS)
