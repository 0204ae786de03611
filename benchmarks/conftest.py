"""Benchmarks: pytest-benchmark, one ``group=`` per capability.

Run: ``python -m pytest benchmarks`` (``--benchmark-json=out.json`` to keep the
figures).  Each benchmark records the element count in ``extra_info`` and, when
timing is on, the median nanoseconds per element.
"""

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES

# kvmemu makes no BLAS call; OpenBLAS's thread pool, started when numpy is imported,
# would still spin on the machine's cores during the threaded benchmarks.  A plugin
# (pytest-run-parallel) may have imported numpy before this file, so the pool is also
# limited where it already runs (threadpoolctl, below).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from pathlib import Path

# The tests judge the installed package, not the bare source tree: ``python -m pytest``
# puts the working directory (the repository root) first on sys.path, and its kvmemu/
# has no compiled core unless one was built in place (``setup.py build_ext --inplace``),
# so without one the root is taken off before kvmemu is imported.
_ROOT = Path(__file__).resolve().parent.parent
if not any((_ROOT / "kvmemu" / f"_core{suffix}").exists() for suffix in EXTENSION_SUFFIXES):
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

import shutil  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(limits=1, user_api="blas")

from kvmemu import _select  # noqa: E402


@pytest.fixture(params=("cython", "python"), scope="session")
def kv(request):
    return _select.load(request.param)


@pytest.fixture
def per_element(benchmark):
    """Call ``per_element(n)`` after ``benchmark(...)`` to record ns/element (the median
    round's, and the best round's)."""
    def record(n):
        benchmark.extra_info["elements"] = n
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            benchmark.extra_info["ns_per_element"] = round(stats.stats.median / n * 1e9, 3)
            # The best round: what the C baselines report of their repeats.
            benchmark.extra_info["best_ns_per_element"] = round(stats.stats.min / n * 1e9, 3)
    return record


@pytest.fixture
def scalar(benchmark):
    """``scalar(fn, *args, **kwargs)``: time one call of well under a microsecond, 200
    calls a round.  pytest-benchmark's own calibration sometimes settles on one call a
    round for such calls, and then mostly times its timer (150-250 ns here); what is
    left in the figure is the call as Python makes it with ``*args, **kwargs``."""
    def run(fn, *args, **kwargs):
        return benchmark.pedantic(fn, args=args, kwargs=kwargs, iterations=200, rounds=100,
                                  warmup_rounds=3)
    return run


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(20261125)


def run_c_baseline(name, tmp_dir, data, *args):
    """Compile benchmarks/c_baseline/NAME.c (-O2), write ``data`` (a numpy array) to a file,
    run the program on ``args`` with that file inserted after the first argument, and
    return its output words; skip the benchmark without a C compiler.  The program and
    the file are made once per ``tmp_dir`` (one ``data`` each)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the baseline")
    exe, path = tmp_dir / name, tmp_dir / f"{name}.bin"
    if not exe.exists():
        subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).parent / "c_baseline"
                                                     / f"{name}.c")], check=True)
    if not path.exists():
        data.tofile(path)
    return subprocess.run([str(exe), str(args[0]), str(path), *map(str, args[1:])],
                          check=True, capture_output=True, text=True).stdout.split()
