"""Mapped walks: VCPU.access_many and VCPU.access on mapped pages, next to a plain C walk.

The C baseline (benchmarks/c_baseline/walk.c) maps the same GPAs with the same
4-level EPT layout and walks the same random GPAs; its ns/walk (the best of its
repeats) is stored in the benchmark's extra_info together with our ns/element (the
median and the best round) and the ratio of the two bests.
"""

import numpy as np
import pytest

from conftest import run_c_baseline
from kvmemu import AccessFlags, Translation, VMType, _select

NPAGES = 1 << 16                 # 256 MiB of mapped 4K pages: 512 KiB of leaf tables
N = 1 << 20                      # random accesses per batch


@pytest.fixture(scope="module")
def gpas():
    rng = np.random.default_rng(20261125)
    pages = rng.integers(0, NPAGES, N, dtype=np.uint64)
    return (pages << np.uint64(12)) | np.uint64(0x123)


def mapped_vcpu(core, npages=NPAGES):
    vm = core.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=npages << 12,
                              userspace_addr=0x7F0000000000)
    vcpu = vm.create_vcpu()
    batch = vcpu.access_many(np.arange(npages, dtype=np.uint64) << np.uint64(12))
    assert batch.count == npages
    return vcpu


@pytest.mark.benchmark(group="walk-mapped-batch")
def test_mapped_batch_walk_vs_c(benchmark, gpas, per_element, tmp_path_factory):
    """1M random reads over 64K mapped 4K pages (512 KiB of leaf tables)."""
    result = walk_vs_c(benchmark, per_element, tmp_path_factory.mktemp("c_baseline"), gpas,
                       NPAGES, 15)
    np.testing.assert_array_equal(result.hpa, gpas + np.uint64(0x7F0000000000))


@pytest.mark.benchmark(group="walk-mapped-batch-both-cores")
def test_mapped_batch_walk_both_cores(benchmark, kv, gpas, per_element):
    """Both cores over the same 4096 GPAs of 4096 mapped pages (equal work: the
    ratio column compares the cores)."""
    vcpu = mapped_vcpu(kv, npages=4096)
    few = gpas[:4096] & np.uint64((4096 << 12) - 1)
    benchmark.pedantic(vcpu.access_many, (few, AccessFlags(0)), rounds=3, iterations=1)
    per_element(len(few))


@pytest.mark.benchmark(group="walk-mapped-scalar")
def test_mapped_scalar_access(scalar, kv):
    vcpu = mapped_vcpu(kv, npages=16)
    assert scalar(vcpu.access, 0x5123) == Translation(0x7F0000005123, 1)


@pytest.mark.benchmark(group="walk-access-many-one-gpa")
@pytest.mark.parametrize("into", ["new-arrays", "out-arrays"])
def test_access_many_fixed_cost(scalar, kv, into):
    """``access_many`` of one mapped GPA: the fixed cost of a call (argument checks, the
    result arrays, the batch result), into new arrays or into ``out=`` arrays."""
    vcpu = mapped_vcpu(kv, npages=16)
    one = np.array([0x5123], dtype=np.uint64)
    out = (np.empty(1, np.uint64), np.empty(1, np.uint8)) if into == "out-arrays" else None
    batch = scalar(vcpu.access_many, one, AccessFlags(0), out=out)
    assert batch.count == 1 and batch.exit is None and int(batch.hpa[0]) == 0x7F0000005123


def walk_vs_c(benchmark, per_element, tmp, gpas, npages, rounds, out=None):
    """access_many over ``gpas`` of ``npages`` mapped pages, each round right after a run
    of the C walk over them: plain (results summed), with software prefetching of the
    leaf entry 16 walks ahead, and storing each result's hpa and level into arrays as
    access_many does (the same work per element).  The runs are interleaved, so that
    both see the same moments of a noisy machine; the best of each, their ratios and
    our median go to extra_info.  Returns the last round's AccessBatch."""
    variants = {"c_baseline": (), "c_prefetch": (16,), "c_store": (0, 1)}
    c_best = dict.fromkeys(variants, float("inf"))
    vcpu = mapped_vcpu(_select.load("cython"), npages=npages)

    def setup():
        for name, extra in variants.items():
            ns = float(run_c_baseline("walk", tmp, gpas, npages, 1, *extra)[1])
            c_best[name] = min(c_best[name], ns)
        return (gpas,), {"out": out}

    result = benchmark.pedantic(vcpu.access_many, setup=setup, rounds=rounds, iterations=1)
    assert result.count == N and result.exit is None
    per_element(N)
    info = benchmark.extra_info
    for name, ns in c_best.items():
        info[f"{name}_ns_per_walk"] = ns
        if "best_ns_per_element" in info:      # best round against the C walk's best run
            info["ratio_to_" + name.replace("c_baseline", "c")] = round(
                info["best_ns_per_element"] / ns, 2)
    return result


SPAN_4G = 1 << 20                # 4 GiB of mapped 4K pages: 8 MiB of leaf tables
LARGE = 1 << 24                  # 64 GiB of mapped 4K pages: 128 MiB of leaf tables


@pytest.mark.benchmark(group="walk-mapped-batch-8m-tables")
def test_mapped_batch_walk_8m_tables_vs_c(benchmark, per_element, tmp_path_factory):
    """1M random reads over 1M mapped 4K pages (a 4 GiB span, 8 MiB of leaf tables: more
    than the L2 cache holds), into reused ``out=`` arrays.  (test_mapped_batch_walk_vs_c's
    64K pages have 512 KiB of tables.)"""
    rng = np.random.default_rng(20261129)
    gpas = (rng.integers(0, SPAN_4G, N, dtype=np.uint64) << np.uint64(12)) | np.uint64(0x123)
    walk_vs_c(benchmark, per_element, tmp_path_factory.mktemp("c_baseline_8m"), gpas,
              SPAN_4G, 9, out=(np.empty(N, np.uint64), np.empty(N, np.uint8)))


@pytest.mark.benchmark(group="walk-mapped-batch-128m-tables")
def test_mapped_batch_walk_large_tables_vs_c(benchmark, per_element, tmp_path_factory):
    """1M random reads over 16M mapped 4K pages (128 MiB of tables, far beyond the
    caches and the TLB's reach)."""
    rng = np.random.default_rng(20261128)
    gpas = (rng.integers(0, LARGE, N, dtype=np.uint64) << np.uint64(12)) | np.uint64(0x123)
    walk_vs_c(benchmark, per_element, tmp_path_factory.mktemp("c_baseline_large"), gpas,
              LARGE, 3)
