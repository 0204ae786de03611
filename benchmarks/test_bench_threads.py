"""vCPUs on threads: one thread against two over the same total work, on one VM.

``mapped``: 2M random reads of mapped 4K pages with ``access_many`` into reused
``out=`` arrays (the walks run without the GIL, holding mmu_lock for read).
``first-touch``: 200K first-touch 4K faults with ``access_many`` (faulted in by its
GIL-free loop); ``first-touch-private``: the same on SW_PROTECTED private memory;
``first-touch-snp``: C-bit writes to SNP private memory (RMP entries assigned);
``first-touch-tdx``: reads of a TD's private memory (mapped in the mirror root,
added with TDH.MEM.PAGE.AUG and accepted).

Each vCPU runs on a thread of its own that lives as long as the module's benchmarks,
as an embedder runs its vCPUs, pinned to a CPU of its own (as a VMM pins vCPU
threads) where the process may run on enough CPUs (``extra_info["pinned"]``).
Unpinned, this machine's scheduler often starts or wakes both threads on one core
and moves one only milliseconds later, which is the length of a whole run here; the
two-thread cases record that too (``unpinned_speedup_*``, below).

They run after 3 warm-up rounds (a process's first VMs pay the kernel's first touch
of their table memory).  Each two-thread case splits the work in halves, one per
vCPU; ``extra_info`` records the elements and ns per element.  This machine's share
of its cores changes from minute to minute, so the two-thread cases also time one
thread and two alternately, 10 times each (``speedup_same_moments``: the median of
the pairs' ratios; ``speedup_best``: best against best), the same on unpinned vCPU
threads (``unpinned_speedup_*``), and, as a reference at the same moments, two numpy
sorts on one pinned thread and on two (``machine_speedup_*``).
"""

import gc
import os
import statistics
import threading
import time

import numpy as np
import pytest

from kvmemu import AccessFlags, MemAttr, MemFlag, VMType, _select

N_MAPPED = 1 << 21
N_PAGES = 64 * 1024
N_FAULTS = 200_000


class VcpuThreads:
    """``n`` threads that live until ``close``, one per vCPU; ``run(jobs)`` runs
    ``jobs[k]`` on thread k, waits for all, and raises what a job raised.  ``pinned``:
    thread k runs only on the k-th CPU the process may use, if it may use ``n``."""

    def __init__(self, n, pinned):
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.pinned = pinned and hasattr(os, "sched_setaffinity") and len(cpus) >= n
        self._cpus = cpus[:n] if self.pinned else None
        self._start = threading.Barrier(n + 1)
        self._end = threading.Barrier(n + 1)
        self._jobs = None
        self._errors = []
        self._threads = [threading.Thread(target=self._serve, args=(k,), daemon=True)
                         for k in range(n)]
        for thread in self._threads:
            thread.start()

    def _serve(self, k):
        try:
            if self._cpus:
                os.sched_setaffinity(0, {self._cpus[k]})    # 0: the calling thread
            while True:
                self._start.wait()
                jobs = self._jobs
                if jobs is None:
                    return
                try:
                    jobs[k]()
                except BaseException as exc:  # noqa: BLE001 - handed to run's caller
                    self._errors.append(exc)
                self._end.wait()
        except threading.BrokenBarrierError:
            return          # run or close gave up (the caller was interrupted)
        except BaseException as exc:  # noqa: BLE001 - the pinning failed: run raises it
            self._errors.append(exc)
            self._start.abort()

    def run(self, jobs):
        assert len(jobs) == len(self._threads)
        self._jobs = jobs
        try:
            self._start.wait()
            self._end.wait()
        except BaseException:
            self._abort()
            if not self._errors:        # else: a worker's pinning failed, raised below
                raise
        errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self):
        self._jobs = None
        try:
            self._start.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        self._abort()
        for thread in self._threads:
            thread.join()

    def _abort(self):
        self._start.abort()
        self._end.abort()


@pytest.fixture(scope="module")
def vcpu_threads():
    """``vcpu_threads(n, pinned=True)``: the module's VcpuThreads of ``n`` threads."""
    made = {}

    def get(n, pinned=True):
        if (n, pinned) not in made:
            made[n, pinned] = VcpuThreads(n, pinned)
        return made[n, pinned]
    yield get
    for threads in made.values():
        threads.close()


def access_jobs(vcpus, chunks, outs=None, flags=AccessFlags.WRITE):
    """One job per vCPU: its access_many on its chunk, filling ``outs`` (one (hpa, level)
    pair per chunk) when given."""
    outs = outs or [None] * len(chunks)

    def job(vcpu, chunk, out):
        assert vcpu.access_many(chunk, flags, out=out).exit is None
    return [lambda v=v, c=c, o=o: job(v, c, o) for v, c, o in zip(vcpus, chunks, outs)]


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


def same_moments(benchmark, work, vcpu_threads, pairs=10, warm=False):
    """Time the jobs of ``work(1)`` and ``work(2)`` (the whole work for one vCPU, for two;
    ``work`` makes the VM and arrays, untimed) alternately, on pinned and on unpinned
    vCPU threads, and record the speed-ups of two threads in ``extra_info``; ``warm``:
    run each once untimed first (as the benchmark's rounds after the first are: each
    thread's caches hold its tables).  Nothing when timing is off."""
    if benchmark.disabled:
        return
    cases = {"speedup": (work, True), "machine_speedup": (sorts, True),
             "unpinned_speedup": (work, False)}
    times = {(name, threads): [] for name in cases for threads in (1, 2)}
    gc.disable()
    try:
        for _ in range(pairs):
            for threads in (1, 2):
                for name, (make, pinned) in cases.items():
                    on, jobs = vcpu_threads(threads, pinned), make(threads)
                    if warm:
                        on.run(jobs)
                    wake(vcpu_threads)
                    start = time.perf_counter()
                    on.run(jobs)
                    times[name, threads].append(time.perf_counter() - start)
    finally:
        gc.enable()
    for name in cases:
        one, two = times[name, 1], times[name, 2]
        benchmark.extra_info[f"{name}_same_moments"] = round(
            statistics.median(a / b for a, b in zip(one, two)), 2)
        benchmark.extra_info[f"{name}_best"] = round(min(one) / min(two), 2)


def wake(vcpu_threads):
    """Both cores busy for a moment (two sorts on two pinned threads), untimed, before
    each timed run: on this VM a core that was idle while one thread ran takes
    milliseconds to run at full speed again, which would otherwise count against
    whichever case runs next."""
    vcpu_threads(2).run(sorts(2))


def sorts(threads):
    """The machine's own two-thread speed-up at that moment, as a reference: numpy sorts
    of two arrays of 200K random int64 (each in a core's cache; numpy releases the GIL),
    as the jobs of one thread or of two."""
    arrays = [np.random.default_rng(k).integers(0, 1 << 62, 200_000) for k in range(2)]
    if threads == 1:
        return [lambda: [np.sort(a) for a in arrays]]
    return [lambda a=a: np.sort(a) for a in arrays]


def mapped_work(threads, rng):
    """A VM with N_PAGES mapped pages and a vCPU per thread; the jobs of N_MAPPED random
    reads split over them."""
    vm, vcpus = vm_with_vcpus(threads)
    vcpus[0].access_many(np.arange(N_PAGES, dtype=np.uint64) << np.uint64(12),
                         AccessFlags.WRITE)
    gpas = rng.integers(0, N_PAGES, N_MAPPED, dtype=np.uint64) << np.uint64(12)
    chunks = np.array_split(gpas, threads)
    outs = [(np.empty(len(c), np.uint64), np.empty(len(c), np.uint8)) for c in chunks]
    return vm, access_jobs(vcpus, chunks, outs, flags=AccessFlags(0))


def first_touch_work(threads, vm_type=VMType.DEFAULT):
    """A new VM and a vCPU per thread; the jobs of N_FAULTS first touches (writes, with
    the C-bit on SNP; reads on a TD, which handles a private fault as a write) split
    over them."""
    gpas = np.arange(N_FAULTS, dtype=np.uint64) << np.uint64(12)
    vcpus = vm_with_vcpus(threads, vm_type)[1]
    flags = {VMType.SNP: AccessFlags.WRITE | AccessFlags.ENCRYPTED,
             VMType.TDX: AccessFlags(0)}.get(vm_type, AccessFlags.WRITE)
    return access_jobs(vcpus, np.array_split(gpas, threads), flags=flags)


@pytest.mark.benchmark(group="threads-mapped", disable_gc=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_mapped_access_many(benchmark, threads, rng, per_element, vcpu_threads):
    vm, jobs = mapped_work(threads, rng)
    on = vcpu_threads(threads)
    benchmark.extra_info["pinned"] = on.pinned
    benchmark(on.run, jobs)
    per_element(N_MAPPED)
    assert vm.check_invariants() == []
    if threads == 2:
        same_moments(benchmark, lambda n: mapped_work(n, rng)[1], vcpu_threads, warm=True)


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
def test_first_touch_access_many(benchmark, threads, vm_type, per_element, vcpu_threads):
    """N_FAULTS first touches on one thread or two, in the group of their VM type."""
    benchmark.group = FIRST_TOUCH_GROUPS[vm_type]
    on = vcpu_threads(threads)
    benchmark.extra_info["pinned"] = on.pinned

    def setup():
        return (first_touch_work(threads, vm_type),), {}

    benchmark.pedantic(on.run, setup=setup, rounds=15, iterations=1, warmup_rounds=3)
    per_element(N_FAULTS)
    if threads == 2:
        same_moments(benchmark, lambda n: first_touch_work(n, vm_type), vcpu_threads)
