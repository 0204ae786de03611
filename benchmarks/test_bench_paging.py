"""Second-stage translation: scalar translate, and the internally looped batch."""

import numpy as np
import pytest

from kvmemu import _select

N = 1024 * 1024              # random accesses in the compiled-core batch
N_TWIN = 16 * 1024           # the pure-Python twin does Python work per element
NPAGES = 64 * 1024           # mapped 4K pages (256 MiB of guest memory, 128 page tables)
LEAF = 0x7 | 6 << 3          # EPT R|W|X, WB


def mapped_tables(core):
    pt = core.PageTables("ept")
    for i in range(NPAGES):
        pt.set_entry(i << 12, 1, (0x100000 + i) << 12 | LEAF)
    return pt


@pytest.fixture(scope="module")
def gpas(rng):
    pages = rng.integers(0, NPAGES, N, dtype=np.uint64)
    return (pages << np.uint64(12)) | rng.integers(0, 4096, N, dtype=np.uint64)


@pytest.mark.benchmark(group="paging-translate-scalar")
def test_translate_scalar(scalar, kv):
    pt = kv.PageTables("ept")
    pt.set_entry(0x123456789000, 1, 0xABCDE000 | LEAF)
    result = scalar(pt.translate, 0x123456789ABC, write=True)
    assert result == kv.Translation(0xABCDEABC, 1)


@pytest.mark.benchmark(group="paging-translate-batch")
def test_translate_many_cython(benchmark, gpas, per_element):
    pt = mapped_tables(_select.load("cython"))
    hpa, level = benchmark(pt.translate_many, gpas)
    assert (level == 1).all() and (hpa == gpas + np.uint64(0x100000 << 12)).all()
    per_element(N)


@pytest.mark.benchmark(group="paging-translate-batch")
def test_translate_many_cython_writes(benchmark, gpas, per_element):
    pt = mapped_tables(_select.load("cython"))
    benchmark(pt.translate_many, gpas, 1)
    per_element(N)


@pytest.mark.benchmark(group="paging-translate-batch-both-cores")
def test_translate_many_both_cores(benchmark, kv, gpas, per_element):
    """The first N_TWIN GPAs on both cores (equal work)."""
    pt = mapped_tables(kv)
    benchmark.pedantic(pt.translate_many, (gpas[:N_TWIN],), rounds=3, iterations=1)
    per_element(N_TWIN)
