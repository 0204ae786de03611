"""Batch vendor intake: exit qualifications / EXITINFO1 → error codes."""

import numpy as np
import pytest

from kvmemu import _select

N = 4 * 1024 * 1024          # elements in the compiled-core and numpy runs
N_TWIN = 64 * 1024            # the pure-Python twin does Python work per element
SHARED_BIT = 1 << 47


@pytest.fixture(scope="module")
def exits(rng):
    quals = rng.integers(0, 2**13, N, dtype=np.uint64)
    gpas = rng.integers(0, 2**48, N, dtype=np.uint64) & ~np.uint64(0xFFF)
    return quals, gpas


def numpy_vmx_rule(q, gpa, shared_bit):
    """The rule of __vmx_handle_ept_violation as a plain numpy expression (the baseline)."""
    valid = (q >> 7) & 1
    translated = (q >> 8) & 1
    ec = ((q & 1) << 2) | (q & 2) | ((q & 4) << 2) | ((q & 0x38) != 0).astype(np.uint64)
    ec |= ((valid & translated) << 32) | ((valid & (translated ^ 1)) << 33)
    ec |= (((gpa & np.uint64(shared_bit)) == 0) & (shared_bit != 0)).astype(np.uint64) << 49
    return ec


@pytest.mark.benchmark(group="intake-vmx-batch")
def test_vmx_batch_cython(benchmark, exits, per_element):
    core = _select.load("cython")
    quals, gpas = exits
    out = np.empty(N, dtype=np.uint64)
    benchmark(core.vmx_error_code, quals, gpas, SHARED_BIT, out=out)
    np.testing.assert_array_equal(out, numpy_vmx_rule(quals, gpas, SHARED_BIT))
    per_element(N)


@pytest.mark.benchmark(group="intake-vmx-batch")
def test_vmx_batch_cython_new_array(benchmark, exits, per_element):
    core = _select.load("cython")
    quals, gpas = exits
    benchmark(core.vmx_error_code, quals, gpas, SHARED_BIT)
    per_element(N)


@pytest.mark.benchmark(group="intake-vmx-batch")
def test_vmx_batch_numpy_expression(benchmark, exits, per_element):
    quals, gpas = exits
    benchmark(numpy_vmx_rule, quals, gpas, SHARED_BIT)
    per_element(N)


@pytest.mark.benchmark(group="intake-vmx-batch-both-cores")
def test_vmx_batch_both_cores(benchmark, kv, exits, per_element):
    """The first N_TWIN exits on both cores (equal work)."""
    quals, gpas = exits[0][:N_TWIN], exits[1][:N_TWIN]
    benchmark.pedantic(kv.vmx_error_code, (quals, gpas, SHARED_BIT), rounds=3, iterations=1)
    per_element(N_TWIN)


@pytest.mark.benchmark(group="intake-svm-batch")
def test_svm_batch_cython(benchmark, rng, per_element):
    core = _select.load("cython")
    values = rng.integers(0, 2**63, N, dtype=np.uint64)
    out = np.empty(N, dtype=np.uint64)
    benchmark(core.svm_error_code, values, True, out=out)
    per_element(N)


@pytest.mark.benchmark(group="intake-scalar")
def test_vmx_scalar(scalar, kv):
    assert scalar(kv.vmx_error_code, 0x182, 0xc0000000, SHARED_BIT) == 0x2000100000002
