#!/usr/bin/env python3
"""atheris harness, fast: arbitrary bytes -> a kvmemu call sequence -> one core.

    pip install atheris
    python fuzz/fuzz_fast.py /tmp/corpus fuzz/corpus -max_total_time=600
    python fuzz/fuzz_fast.py /tmp/corpus fuzz/corpus -fork=2          # one job per core
    KVMEMU_FUZZ_CORE=python python fuzz/fuzz_fast.py ...              # the twin instead

``kvmemu.testing.run_bytes_one_core`` runs the decoded calls on the compiled core:
each call may raise only what the contract allows (KvmError, ValueError,
TypeError, OverflowError, RuntimeError, MemoryError) and the VM's invariants
must hold at the end; anything else is a finding, saved as ``crash-*``.  It
runs thousands of inputs a second; ``fuzz_api.py`` is the slow, deep harness
that also compares both cores after every call.

Coverage: atheris sees the Python code it instruments (set
``KVMEMU_FUZZ_INSTRUMENT=1``: slower, but it steers the byte decoder too) and
the compiled core only when the core was built with ``-fsanitize=fuzzer-no-link``
(``fuzz/build_fuzz_core.sh`` does that with clang and runs this harness on it).
"""

import os
import sys

import atheris

if os.environ.get("KVMEMU_FUZZ_INSTRUMENT", "") not in ("", "0"):
    with atheris.instrument_imports():
        from kvmemu import testing
else:
    from kvmemu import testing

CORE = os.environ.get("KVMEMU_FUZZ_CORE", "cython")


def test_one_input(data: bytes) -> None:
    testing.run_bytes_one_core(data, CORE)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
