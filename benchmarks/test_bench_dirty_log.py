"""Dirty logging: KVM_GET_DIRTY_LOG on a 64 GiB slot, and writes to write-protected pages.

Both next to the same work in plain C (benchmarks/c_baseline/dirty_log.c), run in the
same session: its ns per get_dirty_log call and per write-protect fault are stored in
the benchmark's extra_info with the ratio.
"""

import numpy as np
import pytest

from conftest import run_c_baseline
from kvmemu import AccessFlags, MemFlag, _select

SLOT = 64 << 30                  # 64 GiB: 16M pages, a 2 MiB bitmap
DIRTY = 4096                     # pages dirtied between two get_dirty_log calls
UADDR = 1 << 40


@pytest.fixture(scope="module")
def gfns():
    rng = np.random.default_rng(20261128)
    return np.sort(rng.choice(SLOT >> 12, DIRTY, replace=False).astype(np.uint64))


@pytest.fixture(scope="module")
def c_ns(gfns, tmp_path_factory):
    out = run_c_baseline("dirty_log", tmp_path_factory.mktemp("c_baseline"), gfns,
                         SLOT >> 12, 20)
    return {"get_dirty_log": float(out[1]), "wp_fault": float(out[3])}


def logged_vm(core, gfns, vendor="svm"):
    """A VM with one 64 GiB dirty-logged slot whose listed pages are mapped 4K and
    write-protected (their bits taken by get_dirty_log)."""
    vm = core.VM(vendor=vendor)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=SLOT,
                              userspace_addr=UADDR, flags=MemFlag.LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu()
    assert vcpu.access_many(gfns << np.uint64(12), AccessFlags.WRITE).count == len(gfns)
    vm.get_dirty_log(0)
    return vm, vcpu


def record_ratio(benchmark, c_value, per_call_ns):
    benchmark.extra_info["c_baseline_ns"] = c_value
    if per_call_ns is not None:
        benchmark.extra_info["ratio_to_c"] = round(per_call_ns / c_value, 2)


@pytest.mark.benchmark(group="dirty-log-get-64g")
@pytest.mark.parametrize("vendor", ["svm", "vmx"])
def test_get_dirty_log_64g(benchmark, gfns, c_ns, vendor):
    """get_dirty_log with DIRTY pages dirty out of 16M (SVM: re-write-protect them; VMX:
    clear their D bits, the writes having been logged by PML)."""
    vm, vcpu = logged_vm(_select.load("cython"), gfns, vendor)
    writes = gfns << np.uint64(12)

    def dirty():
        vcpu.access_many(writes, AccessFlags.WRITE)
        return (), {}

    benchmark.pedantic(lambda: vm.get_dirty_log(0), setup=dirty, rounds=10, iterations=1)
    assert int(np.unpackbits(vm.get_dirty_log(0).view(np.uint8)).sum()) == 0
    stats = getattr(benchmark, "stats", None)
    record_ratio(benchmark, c_ns["get_dirty_log"],
                 None if stats is None else stats.stats.median * 1e9)


@pytest.mark.benchmark(group="dirty-log-get-64g")
def test_get_dirty_log_64g_clean(benchmark, gfns):
    """Nothing dirty: the scan of 256K bitmap words alone."""
    vm, _ = logged_vm(_select.load("cython"), gfns)
    assert not benchmark(vm.get_dirty_log, 0).any()


@pytest.mark.benchmark(group="dirty-log-wp-fault")
def test_write_protect_fault_fast_path(benchmark, gfns, c_ns, per_element):
    """A write to each of DIRTY write-protected 4K pages: walk, #NPF, fast_page_fault
    gives W back and marks the page, walk again (access_many, compiled core)."""
    vm, vcpu = logged_vm(_select.load("cython"), gfns)
    writes = gfns << np.uint64(12)

    def protect():
        vm.get_dirty_log(0)
        return (), {}

    before = vcpu.stats["pf_fast"]
    benchmark.pedantic(lambda: vcpu.access_many(writes, AccessFlags.WRITE), setup=protect,
                       rounds=10, iterations=1)
    assert vcpu.stats["pf_fast"] - before == 10 * DIRTY or benchmark.disabled
    per_element(DIRTY)
    stats = getattr(benchmark, "stats", None)
    record_ratio(benchmark, c_ns["wp_fault"],
                 None if stats is None else stats.stats.median * 1e9 / DIRTY)


@pytest.mark.benchmark(group="dirty-log-wp-fault-both-cores")
def test_write_protect_fault_fast_path_both_cores(benchmark, kv, gfns, per_element):
    """The same on 256 pages, on both cores (equal work)."""
    few = gfns[:256]
    vm, vcpu = logged_vm(kv, few)
    writes = few << np.uint64(12)
    benchmark.pedantic(lambda: vcpu.access_many(writes, AccessFlags.WRITE),
                       setup=lambda: (vm.get_dirty_log(0), ((), {}))[1], rounds=3,
                       iterations=1)
    per_element(len(few))
