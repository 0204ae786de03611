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


@pytest.mark.parametrize("core", ["cython", "python"])
def test_the_fast_one_core_harness_runs_the_corpus(core):
    """fuzz/fuzz_fast.py's check: only the contract's exceptions, invariants at the end."""
    for seed in SEEDS:
        assert kvmfuzz.run_bytes_one_core(seed.read_bytes(), core) > 3


def test_the_fast_harness_reports_a_breach(monkeypatch):
    """A call raising outside the contract (here: an IndexError planted in the VM's
    attribute query) is a finding, with the call named."""
    from kvmemu import _select
    vm_class = _select.load("cython").VM

    def broken(self, gpa):
        raise IndexError("planted")
    monkeypatch.setattr(vm_class, "get_memory_attributes", broken)
    ops = [("vm", 0, None, 48, False), ("vcpu",), ("get_attrs", 0x1000)]
    data = next(s.read_bytes() for s in SEEDS)
    monkeypatch.setattr(kvmfuzz, "decode", lambda data, max_ops=64: ops)
    with pytest.raises(kvmfuzz.ContractBreach, match="get_attrs.*IndexError: planted"):
        kvmfuzz.run_bytes_one_core(data)


def test_decoding_is_total_and_deterministic():
    """Any bytes decode (empty, short, all ones), and the same bytes decode the same way."""
    for data in (b"", b"\0", b"\xff" * 64, bytes(range(256))):
        assert repr(kvmfuzz.decode(data)) == repr(kvmfuzz.decode(data))
        kvmfuzz.run_bytes(data)
