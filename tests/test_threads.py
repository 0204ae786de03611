"""Public calls from many threads: memory-safe, serialisable, invariants intact.

The first tests run the program that used to crash (vCPU threads faulting in
parallel on one VM while the table storage grew) and mixes of every public
call on one VM and on several.  Then the race KVM's invalidation sequence
exists for, with real threads: vCPU threads fault while a converter thread
flips memory attributes and a third moves a memslot; after every conversion
``check_invariants`` must be empty, which covers "no private frame mapped for
a shared gfn and no shared frame for a private one".  With the stale check
switched off (the TdpMmu's ``skip_stale_check`` debug switch) the same test
must find mappings that disagree with the attributes: the test can fail.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvmemu import AccessFlags, KvmError, MemAttr, MemFlag, VMType

MIB, GIB = 1 << 20, 1 << 30
PRIVATE = MemAttr.PRIVATE


def run_threads(*targets, timeout=120):
    """Run each callable in its own thread; re-raise the first exception any raised."""
    errors = []

    def guard(target):
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]


def scale(kv, compiled, twin):
    return compiled if kv.IMPLEMENTATION == "cython" else twin


def test_vcpus_fault_in_parallel_on_one_vm(kv):
    """The program that crashed (heap-use-after-free when a fault grew the storage that
    another vCPU's GIL-free walk was reading), at a size each core runs quickly."""
    vm = kv.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 30,
                              userspace_addr=0x7F0000000000)
    rounds, size = scale(kv, (8, 50_000), (2, 300))

    def worker(seed):
        vcpu, rng = vm.create_vcpu(), np.random.default_rng(seed)
        for _ in range(rounds):
            gpas = rng.integers(0, 1 << 22, size=size, dtype=np.uint64) << np.uint64(12)
            result = vcpu.access_many(gpas)
            assert result.count == size and result.exit is None
            np.testing.assert_array_equal(result.hpa, gpas + np.uint64(0x7F0000000000))

    run_threads(*[lambda s=s: worker(s) for s in range(4)])
    assert vm.check_invariants() == []
    assert sum(v.stats["pf_taken"] for v in vm._vcpus) >= vm.stats["pages_4k"]


def test_every_call_from_every_thread(kv):
    """Accesses, batches, walks, lookups, conversions, memslot changes, snapshots and
    restores, tracing switched on and off, on two VMs from six threads."""
    vms = []
    for vm_type in (VMType.SW_PROTECTED, VMType.DEFAULT):
        vm = kv.VM(vm_type)
        gmem = vm.create_guest_memfd(64 * MIB) if vm_type == VMType.SW_PROTECTED else None
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 * MIB,
                                  userspace_addr=1 << 40, host_level=2,
                                  flags=MemFlag.GUEST_MEMFD if gmem else 0, guest_memfd=gmem)
        vms.append(vm)
    steps = scale(kv, 300, 40)
    events = []

    def vcpu_thread(vm, seed):
        vcpu, rng = vm.create_vcpu(), np.random.default_rng(seed)
        for i in range(steps):
            gpa = int(rng.integers(0, 80 * MIB)) & ~0xFFF
            if i % 3:
                vcpu.access(gpa, write=bool(i & 4))
            else:
                gpas = rng.integers(0, 80 * MIB >> 12, 64, dtype=np.uint64) << np.uint64(12)
                vcpu.access_many(gpas, 1)

    def reader_thread(vm, seed):
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            gpas = rng.integers(0, 64 * MIB >> 12, 256, dtype=np.uint64) << np.uint64(12)
            vm.page_tables.translate_many(gpas)
            vm.find_memslots(gpas >> np.uint64(12))
            vm.memslots, vm.stats, vm.memory_attribute_ranges()

    def ioctl_thread(vm, seed):
        rng = np.random.default_rng(seed)
        snapshot = vm.snapshot()
        for i in range(steps // 4):
            start = int(rng.integers(0, 32)) * 2 * MIB + int(rng.integers(0, 2)) * 4096
            if vm.has_private_mem:
                vm.set_memory_attributes(start, 2 * MIB, PRIVATE if i & 1 else 0)
            if i % 7 == 3:
                try:
                    vm.set_user_memory_region(slot=1, guest_phys_addr=96 * MIB,
                                              memory_size=(2 * MIB) * (i & 1),
                                              userspace_addr=(1 << 40) + GIB)
                except KvmError:
                    pass
            if i % 11 == 5:
                vm.trace = (lambda e, t: events.append(e)) if i & 1 else None
            if i % 13 == 7:
                vm.restore(snapshot)
            if i % 17 == 9:
                snapshot = vm.snapshot()

    targets = []
    for n, vm in enumerate(vms):
        targets += [lambda vm=vm, n=n: vcpu_thread(vm, n), lambda vm=vm, n=n: reader_thread(vm, n),
                    lambda vm=vm, n=n: ioctl_thread(vm, n)]
    run_threads(*targets)
    for vm in vms:
        assert vm.check_invariants() == []


def test_one_vcpu_serialises_its_callers(kv):
    """Two threads on one vCPU take turns (KVM_RUN on one vCPU fd), and a callback that
    re-enters its own vCPU gets a clear error instead of a deadlock."""
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 * MIB,
                              userspace_addr=1 << 40)
    vcpu = vm.create_vcpu()
    n = scale(kv, 2000, 200)

    def toucher(base):
        for i in range(n):
            assert vcpu.access(base + i * 4096, write=True).hpa == (1 << 40) + base + i * 4096

    run_threads(lambda: toucher(0), lambda: toucher(32 * MIB))
    assert vcpu.stats["pf_taken"] == 2 * n
    seen = []

    def reenter(stage):
        if stage == "faultin":
            with pytest.raises(RuntimeError, match="already running on this thread"):
                vcpu.access(0x10000)
            seen.append(stage)

    vcpu.stage_hook = reenter
    vcpu.access(48 * MIB)
    assert seen == ["faultin"]
    assert vm.check_invariants() == []


def test_a_sink_that_raises_or_calls_back_leaves_the_vm_whole(kv):
    """Trace events reach the sink when the call that made them is done: a sink that
    raises makes the call raise with the VM consistent, and a sink that converts the
    gfn or deletes the slot does what a later call would."""
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=1 << 40, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem, host_level=2)
    vcpu = vm.create_vcpu()

    def closed_file(event, text):
        raise ValueError("I/O operation on closed file")

    vm.trace = closed_file
    with pytest.raises(ValueError, match="closed file"):
        vcpu.access(0x3000, write=True)                # a 2M leaf: the fault completed
    assert vm.stats["pages_2m"] == 1 and vm.mmu_invalidate_in_progress == 0
    with pytest.raises(ValueError, match="closed file"):
        vm.set_memory_attributes(0x1000, 4096, PRIVATE)
    assert vm.mmu_invalidate_in_progress == 0 and vm.check_invariants() == []
    calls = []

    def meddler(event, text):
        if event == "kvm_mmu_set_spte" and not calls:
            calls.append(text)
            vm.set_memory_attributes(0x5000, 4096, PRIVATE)
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0,
                                      userspace_addr=0)

    vm.trace = meddler
    vcpu.access(0x5000)
    assert calls and vm.memslots == [] and vm.check_invariants() == []
    assert vm.stats["pages_4k"] == vm.stats["pages_2m"] == 0


# --- the race the invalidation sequence exists for ------------------------------------------

def race_vm(kv, vm_type):
    vm = kv.VM(vm_type)
    gmem = vm.create_guest_memfd(8 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=8 * MIB,
                              userspace_addr=1 << 40, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem, host_level=2)
    return vm


def shared_and_private(vm, gpa):
    """An access the VM's vendor reports as shared and one it reports as private."""
    if vm.vm_type == VMType.TDX:
        return {"gpa": gpa | vm.shared_bit}, {"gpa": gpa}
    if vm.vm_type == VMType.SNP:
        return {"gpa": gpa, "encrypted": False}, {"gpa": gpa, "encrypted": True}
    return {"gpa": gpa}, {"gpa": gpa}


def race(kv, vm_type, skip_stale_check, rounds):
    """Two vCPU threads fault on a few pages (shared and private, scalar and batch) while
    a converter thread flips their attributes and a mover moves a second memslot to and
    fro.  One vCPU lets the converter in exactly where KVM's race is: its fault has
    passed faultin (the private/shared decision is made) and not yet taken mmu_lock; it
    waits at that point until the converter, on its own thread, has converted.  The
    other vCPU runs freely.  The converter checks the invariants after each round and
    returns the first problems it saw (an empty list when every check passed)."""
    vm = race_vm(kv, vm_type)
    vm.set_user_memory_region(slot=1, guest_phys_addr=16 * MIB, memory_size=2 * MIB,
                              userspace_addr=(1 << 40) + GIB)
    vm._memory.mmu.skip_stale_check = skip_stale_check
    stop, want, at_map, converted = (threading.Event(), threading.Event(), threading.Event(),
                                     threading.Event())
    problems = []
    pages = [0x1000, 0x2000, 0x201000, 0x3FF000]

    def meet_the_converter(stage):
        if stage == "map" and want.is_set():
            want.clear()
            at_map.set()
            converted.wait(1)

    def vcpu_thread(seed, hook):
        vcpu, rng = vm.create_vcpu(), np.random.default_rng(seed)
        vcpu.stage_hook = hook
        while not stop.is_set():
            page = pages[int(rng.integers(len(pages)))]
            shared, private = shared_and_private(vm, page)
            if hook is not None:               # the access the attributes call for: it
                is_private = vm.get_memory_attributes(page >> 12) & PRIVATE   # reaches "map"
            else:
                is_private = rng.integers(2)
            kwargs = dict(private if is_private else shared)
            gpa = kwargs.pop("gpa")
            try:
                if rng.integers(4):
                    vcpu.access(gpa, write=bool(rng.integers(2)), **kwargs)
                else:
                    flags = 8 if kwargs.get("encrypted") else 0
                    vcpu.access_many(np.array([gpa, gpa | 0x800], dtype=np.uint64), flags)
            except RuntimeError as exc:
                # With a hook every retry counts: under this much churn an access may
                # retry ACCESS_LOOP_LIMIT times; it is simply tried again.
                assert "did not settle" in str(exc)
            time.sleep(0)                      # let the converter take the vCPU mutexes

    def converter():
        private = False
        try:
            for i in range(rounds):
                converted.clear()
                want.set()
                at_map.wait(0.05)
                at_map.clear()
                private = not private
                size = 4 * MIB if i % 3 else 4096
                vm.set_memory_attributes(pages[i % len(pages)] & ~(size - 1), size,
                                         PRIVATE if private else 0)
                converted.set()
                found = vm.check_invariants()
                if found:
                    problems.extend(found)
                    break
        finally:
            stop.set()
            converted.set()

    def mover():
        base = 16 * MIB
        while not stop.is_set():
            base = 20 * MIB if base == 16 * MIB else 16 * MIB
            vm.set_user_memory_region(slot=1, guest_phys_addr=base, memory_size=2 * MIB,
                                      userspace_addr=(1 << 40) + GIB)
            time.sleep(0.001)

    run_threads(converter, mover, lambda: vcpu_thread(1, meet_the_converter),
                lambda: vcpu_thread(2, None))
    if not problems:
        problems.extend(vm.check_invariants())
    return problems


@pytest.mark.parametrize("vm_type", [VMType.SW_PROTECTED, VMType.TDX, VMType.SNP])
def test_conversions_racing_faults_leave_every_mapping_right(kv, vm_type):
    assert race(kv, vm_type, skip_stale_check=False, rounds=scale(kv, 200, 60)) == []


@pytest.mark.parametrize("vm_type", [VMType.SW_PROTECTED, VMType.TDX])
def test_without_the_stale_check_the_race_maps_the_wrong_frame(kv, vm_type):
    problems = race(kv, vm_type, skip_stale_check=True, rounds=scale(kv, 200, 60))
    assert problems, "the race never happened: the test could not fail"
    assert any("maps frame" in p or "maps a private" in p or "maps a shared" in p
               for p in problems), problems


def test_a_fault_waits_out_a_host_invalidation_on_another_thread(kv):
    """The MMU-notifier race with real threads: while another thread holds a host
    invalidation of the page, the vCPU's fault retries (mmu_invalidate_retry_gfn); when
    it ends, the access maps the page.  Meanwhile dirty logging and pre-fault run on a
    third thread, on other pages."""
    vm = kv.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 * MIB,
                              userspace_addr=GIB, flags=MemFlag.LOG_DIRTY_PAGES)
    vcpu, other = vm.create_vcpu(), vm.create_vcpu()
    handle = vm.invalidate_host_range(GIB + 0x5000, 0x1000)
    started = threading.Event()
    results = []

    def fault():
        started.set()
        results.append(vcpu.access(0x5000, write=True))

    def end_later():
        started.wait(30)
        time.sleep(0.01)
        handle.end()

    def busy():
        for i in range(scale(kv, 200, 20)):
            other.pre_fault_memory((8 * MIB) + (i << 12), 0x1000)
            vm.get_dirty_log(0)

    run_threads(fault, end_later, busy)
    assert results[0].hpa == GIB + 0x5000
    assert vcpu.stats["pf_taken"] > 1 and vcpu.stats["pf_fixed"] == 1
    assert vm.mmu_invalidate_in_progress == 0 and vm.check_invariants() == []


def test_a_stage_hook_set_while_its_vcpu_runs_a_batch(kv):
    """A hook that another thread sets while a vCPU's access_many faults pages in, in a
    batch that started without one (the compiled core's GIL-free loop looks, before each
    fault it handles, whether one is set), runs at the stages of the batch's later
    faults, and every access is still mapped to its frame.  (The ThreadSanitizer build
    checks the read against the setter's store.)"""
    n = scale(kv, 1 << 18, 1 << 11)
    gpas = np.arange(n, dtype=np.uint64) << np.uint64(12)
    for _ in range(5):       # again if the batch ended before the hook was set
        vm = kv.VM()
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                                  userspace_addr=1 << 40)
        vcpu = vm.create_vcpu()
        stages, results = [], []

        def batch():
            results.append(vcpu.access_many(gpas, AccessFlags.WRITE))

        def setter():
            while vcpu.stats["pf_taken"] == 0 and not results:
                time.sleep(10e-6)
            vcpu.stage_hook = stages.append

        run_threads(batch, setter)
        if stages:
            break
    assert {"fault", "faultin", "map"} <= set(stages)
    assert len(stages) <= 3 * n
    result, = results
    assert result.count == n and result.exit is None
    np.testing.assert_array_equal(result.hpa, gpas + np.uint64(1 << 40))
    assert vcpu.stats["pf_taken"] == vcpu.stats["pf_fixed"] == n
    assert vm.check_invariants() == []


def test_fetches_and_reads_of_several_vcpus_under_the_nx_workaround(kv):
    """Two vCPUs fault in the same 2M regions at once with the NX huge page workaround
    on, one fetching a page of each region, the other reading the others (tdp_mmu_map
    marks each table it links nx_huge_page_disallowed before linking it; another vCPU's
    disallowed_hugepage_adjust reads the mark).  Every fetched page ends mapped 4K, a
    page read later in a fetched region too (the mark of its table), and the tables
    stay whole.  (The ThreadSanitizer build checks the marks' reads and writes.)"""
    vm = kv.VM(VMType.DEFAULT, nx_huge_pages=True)
    regions = scale(kv, 2048, 32)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=regions * 2 * MIB,
                              userspace_addr=GIB, host_level=2)
    fetcher, reader = vm.create_vcpu(), vm.create_vcpu()
    bases = np.arange(regions, dtype=np.uint64) * np.uint64(2 * MIB)

    def fetch():
        batch = fetcher.access_many(bases + np.uint64(0x5000), AccessFlags.FETCH)
        assert batch.exit is None and batch.level.tolist() == [1] * regions

    def read():
        for page in (0x1000, 0x2000, 0x7000):
            assert reader.access_many(bases + np.uint64(page)).exit is None

    run_threads(fetch, read)
    levels = fetcher.access_many(bases + np.uint64(0x5000), AccessFlags.FETCH).level
    assert levels.tolist() == [1] * regions
    assert reader.access_many(bases + np.uint64(0x9000)).level.tolist() == [1] * regions
    assert vm.check_invariants() == []
