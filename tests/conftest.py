"""One fixture, ``kv``, parametrized over both implementations of the core.

Every test that takes ``kv`` runs twice: against the compiled core
(``kvmemu._core``) and against its pure-Python twin (``kvmemu._pure``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from kvmemu import _select

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
