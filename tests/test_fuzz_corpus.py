"""Replay the fuzzer's seed corpus (``fuzz/corpus``) on both cores, so it cannot rot.

Each file is decoded by ``kvmemu.testing.decode`` into a call sequence and run
by ``testing.Twin``: results, exceptions and the whole VM state must agree
after every step, and ``check_invariants()`` must find nothing.  The decoder
needs no atheris; ``fuzz/fuzz_api.py`` feeds it from atheris for long runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmemu import testing as kvmfuzz

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"

SEEDS = sorted((FUZZ / "corpus").iterdir())


def test_the_corpus_has_seeds():
    assert len(SEEDS) >= 5


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_seed_runs_alike_on_both_cores(seed):
    data = seed.read_bytes()
    ops = kvmfuzz.decode(data)
    assert ops[0][0] == "vm" and len(ops) > 3
    twin = kvmfuzz.run_ops(ops)
    assert twin.steps == len(ops)


def test_decoding_is_total_and_deterministic():
    """Any bytes decode (empty, short, all ones), and the same bytes decode the same way."""
    for data in (b"", b"\0", b"\xff" * 64, bytes(range(256))):
        assert repr(kvmfuzz.decode(data)) == repr(kvmfuzz.decode(data))
        kvmfuzz.run_bytes(data)
