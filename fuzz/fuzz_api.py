#!/usr/bin/env python3
"""atheris harness: arbitrary bytes -> a kvmemu call sequence -> both cores, compared.

    pip install atheris
    mkdir -p /tmp/corpus
    python fuzz/fuzz_api.py /tmp/corpus fuzz/corpus -max_total_time=3600

``kvmemu.testing.decode`` turns the bytes into operations (VM creation, memslots,
guest_memfd, attributes, accesses, batches, exit handlers, stage hooks,
snapshots, the intake functions with scalars and arrays, standalone
PageTables); ``kvmemu.testing.Twin`` runs them on the compiled core and on the
pure-Python twin and raises ``Divergence`` at the first difference or broken
invariant, which atheris reports as a crash with the input saved.  New inputs
that reach new code go into the corpus directory given first; ``fuzz/corpus``
stays as it is.
"""

import sys

import atheris

with atheris.instrument_imports():
    import kvmemu  # noqa: F401  (instrument the package's Python code)
    from kvmemu import testing


def test_one_input(data: bytes) -> None:
    testing.run_bytes(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
