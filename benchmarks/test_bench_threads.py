"""vCPUs on threads: one thread against two over the same total work, on one VM.

``mapped``: 2M random reads of mapped 4K pages with ``access_many`` into reused
``out=`` arrays (the walks run without the GIL, holding mmu_lock for read).
``first-touch``: 200K first-touch 4K faults with ``access_many`` (faulted in by its
GIL-free loop); ``first-touch-private``: the same on SW_PROTECTED private memory;
``first-touch-snp``: C-bit writes to SNP private memory (RMP entries assigned);
``first-touch-tdx``: reads of a TD's private memory (mapped in the mirror root,
added with TDH.MEM.PAGE.AUG and accepted).
They run after 3 warm-up rounds (a process's first VMs pay the kernel's first touch
of their table memory).  Each two-thread case splits the work in halves, one per
vCPU; ``extra_info`` records the elements and ns per element.  This machine's share
of its cores changes from minute to minute, so the two-thread cases also time one
thread and two alternately, 10 times each (``speedup_same_moments``: the median of
the pairs' ratios; ``speedup_best``: best against best), and, as a reference at the
same moments, two numpy sorts on one thread and on two (``machine_speedup_*``).
"""

import gc
import statistics
import threading
import time

import numpy as np
import pytest

from kvmemu import AccessFlags, MemAttr, MemFlag, VMType, _select

N_MAPPED = 1 << 21
N_PAGES = 64 * 1024
N_FAULTS = 200_000


def run_split(vcpus, chunks, outs=None, flags=AccessFlags.WRITE):
    """Each vCPU's access_many on its chunk, each on its own thread (one: in this one),
    filling ``outs`` (one (hpa, level) pair per chunk) when given."""
    outs = outs or [None] * len(chunks)
    if len(vcpus) == 1:
        assert vcpus[0].access_many(chunks[0], flags, out=outs[0]).exit is None
        return
    run_threads([lambda v=v, c=c, o=o: v.access_many(c, flags, out=o)
                 for v, c, o in zip(vcpus, chunks, outs)])


def vm_with_vcpus(n, vm_type=VMType.DEFAULT):
    """A VM with 16 GiB at GPA 0 and ``n`` vCPUs: DEFAULT; or SW_PROTECTED, SNP or TDX with
    the memory in guest_memfd and marked private (the host mapping within the frames of
    a confidential VM's host)."""
    size = 16 << 30
    private = vm_type != VMType.DEFAULT
    vm = _select.load("cython").VM(vm_type)
    gmem = vm.create_guest_memfd(size) if private else None
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=size,
                              userspace_addr=(1 << 30 if vm_type in (VMType.SNP, VMType.TDX)
                                              else 0x7F0000000000),
                              flags=MemFlag.GUEST_MEMFD if private else 0, guest_memfd=gmem)
    if private:
        vm.set_memory_attributes(0, size, MemAttr.PRIVATE)
    return vm, [vm.create_vcpu() for _ in range(n)]


def same_moments(benchmark, work, pairs=10, warm=False):
    """Time ``work(1)()`` and ``work(2)()`` (the whole work on one thread, on two; ``work``
    makes the VM and arrays, untimed) alternately, and record the speed-up of two threads
    in ``extra_info``; ``warm``: run each once untimed first (as the benchmark's rounds
    after the first are: each thread's caches hold its tables).  Nothing when timing is
    off."""
    if benchmark.disabled:
        return
    times = {(kind, threads): [] for kind in ("work", "machine") for threads in (1, 2)}
    gc.disable()
    try:
        for _ in range(pairs):
            for threads in (1, 2):
                for kind, run in (("work", work(threads)), ("machine", sorts(threads))):
                    if warm:
                        run()
                    wake()
                    start = time.perf_counter()
                    run()
                    times[kind, threads].append(time.perf_counter() - start)
    finally:
        gc.enable()
    for kind, name in (("work", "speedup"), ("machine", "machine_speedup")):
        one, two = times[kind, 1], times[kind, 2]
        benchmark.extra_info[f"{name}_same_moments"] = round(
            statistics.median(a / b for a, b in zip(one, two)), 2)
        benchmark.extra_info[f"{name}_best"] = round(min(one) / min(two), 2)


def wake():
    """Both cores busy for a moment (two sorts on two threads), untimed, before each timed
    run: on this VM a core that was idle while one thread ran takes milliseconds to run at
    full speed again, which would otherwise count against whichever case runs next."""
    sorts(2)()


def sorts(threads):
    """The machine's own two-thread speed-up at that moment, as a reference: numpy sorts
    two arrays of 200K random int64 (each in a core's cache; numpy releases the GIL)
    on one thread or on two."""
    arrays = [np.random.default_rng(k).integers(0, 1 << 62, 200_000) for k in range(2)]
    if threads == 1:
        return lambda: [np.sort(a) for a in arrays]
    return lambda: run_threads([lambda a=a: np.sort(a) for a in arrays])


def run_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def mapped_work(threads, rng):
    """A VM with N_PAGES mapped pages and a vCPU per thread; the run of N_MAPPED random
    reads split over them."""
    vm, vcpus = vm_with_vcpus(threads)
    vcpus[0].access_many(np.arange(N_PAGES, dtype=np.uint64) << np.uint64(12), 1)
    gpas = rng.integers(0, N_PAGES, N_MAPPED, dtype=np.uint64) << np.uint64(12)
    chunks = np.array_split(gpas, threads)
    outs = [(np.empty(len(c), np.uint64), np.empty(len(c), np.uint8)) for c in chunks]
    return vm, lambda: run_split(vcpus, chunks, outs)


def first_touch_work(threads, vm_type=VMType.DEFAULT):
    """A new VM and a vCPU per thread; the run of N_FAULTS first touches (writes, with the
    C-bit on SNP; reads on a TD, which handles a private fault as a write) split over
    them."""
    gpas = np.arange(N_FAULTS, dtype=np.uint64) << np.uint64(12)
    vcpus = vm_with_vcpus(threads, vm_type)[1]
    chunks = np.array_split(gpas, threads)
    flags = {VMType.SNP: AccessFlags.WRITE | AccessFlags.ENCRYPTED,
             VMType.TDX: AccessFlags(0)}.get(vm_type, AccessFlags.WRITE)
    return lambda: run_split(vcpus, chunks, flags=flags)


@pytest.mark.benchmark(group="threads-mapped", disable_gc=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_mapped_access_many(benchmark, threads, rng, per_element):
    vm, run = mapped_work(threads, rng)
    benchmark(run)
    per_element(N_MAPPED)
    assert vm.check_invariants() == []
    if threads == 2:
        same_moments(benchmark, lambda n: mapped_work(n, rng)[1], warm=True)


#: The first-touch benchmarks' groups, one per kind of memory faulted in.
FIRST_TOUCH_GROUPS = {
    VMType.DEFAULT: "threads-first-touch",
    # SW_PROTECTED private memory: guest_memfd frames, prepared on first use.
    VMType.SW_PROTECTED: "threads-first-touch-private",
    # C-bit writes to SNP private memory: guest_memfd frames prepared with their RMP
    # entries assigned, then the RMP check (the guest validates each page first).
    VMType.SNP: "threads-first-touch-snp",
    # Reads of a TD's private memory: guest_memfd frames mapped in the mirror root, each
    # mirror SPTE frozen while its page is added, then accepted by the guest.
    VMType.TDX: "threads-first-touch-tdx",
}


@pytest.mark.benchmark(disable_gc=True)
@pytest.mark.parametrize("vm_type", list(FIRST_TOUCH_GROUPS), ids=lambda t: t.name)
@pytest.mark.parametrize("threads", [1, 2])
def test_first_touch_access_many(benchmark, threads, vm_type, per_element):
    """N_FAULTS first touches on one thread or two, in the group of their VM type."""
    benchmark.group = FIRST_TOUCH_GROUPS[vm_type]
    first_touches(benchmark, threads, per_element, vm_type)


def first_touches(benchmark, threads, per_element, vm_type):
    def setup():
        return (first_touch_work(threads, vm_type),), {}

    benchmark.pedantic(lambda run: run(), setup=setup, rounds=15, iterations=1,
                       warmup_rounds=3)
    per_element(N_FAULTS)
    if threads == 2:
        same_moments(benchmark, lambda n: first_touch_work(n, vm_type))
