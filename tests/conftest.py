"""One fixture, ``kv``, parametrized over both implementations of the core.

Every test that takes ``kv`` runs twice: against the compiled core
(``kvmemu._core``) and against its pure-Python twin (``kvmemu._pure``).
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# The tests judge the installed package, not the bare source tree: ``python -m pytest``
# puts the working directory (the repository root) first on sys.path, and its kvmemu/
# has no compiled core unless one was built in place (``setup.py build_ext --inplace``),
# so without one the root is taken off before kvmemu is imported.
_ROOT = Path(__file__).resolve().parent.parent
if not any((_ROOT / "kvmemu" / f"_core{suffix}").exists() for suffix in EXTENSION_SUFFIXES):
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import kvmemu  # noqa: E402
from kvmemu import _select  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, max_examples=20_000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KVMEMU_HYPOTHESIS_PROFILE", "default"))

IMPLEMENTATIONS = ("cython", "python")


@pytest.fixture(params=IMPLEMENTATIONS, scope="session")
def kv(request):
    """The core module under test: ``kvmemu._core`` or ``kvmemu._pure``."""
    return _select.load(request.param)


@pytest.fixture
def run_python(tmp_path):
    """``run_python(*args, env=None)``: run this interpreter on ``args`` in a fresh process
    that imports the kvmemu this process imported, not the source tree (it runs in an
    empty directory, with the package's parent first on its path)."""
    import subprocess

    def run(*args, env=None):
        base = {**os.environ, **(env or {})}
        parent = str(Path(kvmemu.__file__).resolve().parents[1])
        base["PYTHONPATH"] = os.pathsep.join([parent, base.get("PYTHONPATH", "")])
        return subprocess.run([sys.executable, *args], env=base, cwd=tmp_path,
                              capture_output=True, text=True, check=True, timeout=300)
    return run



def pytest_collection_modifyitems(config, items):
    """Under pytest-run-parallel (``--parallel-threads``), tests that Hypothesis drives
    run on one thread: Hypothesis itself is not thread-safe."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False) or \
                "hypothesis" in getattr(getattr(item, "obj", None), "__module__", ""):
            item.add_marker(pytest.mark.thread_unsafe)
