"""Benchmarks: pytest-benchmark, one ``group=`` per capability.

Run: ``python -m pytest benchmarks`` (``--benchmark-json=out.json`` to keep the
figures).  Each benchmark records the element count in ``extra_info`` and, when
timing is on, the median nanoseconds per element.
"""

import numpy as np
import pytest

from kvmemu import _select


@pytest.fixture(params=("cython", "python"), scope="session")
def kv(request):
    return _select.load(request.param)


@pytest.fixture
def per_element(benchmark):
    """Call ``per_element(n)`` after ``benchmark(...)`` to record ns/element."""
    def record(n):
        benchmark.extra_info["elements"] = n
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            benchmark.extra_info["ns_per_element"] = round(stats.stats.median / n * 1e9, 3)
    return record


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(20261125)
