"""examples/unicorn_guest.py: a real guest in Unicorn, memory translated by kvmemu."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("unicorn")

from kvmemu import MemoryFaultExit  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "unicorn_guest.py"


def load_example():
    spec = importlib.util.spec_from_file_location("unicorn_guest", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unicorn_guest_sums_its_array_through_kvms_fault_path():
    example = load_example()
    outcome = example.run_guest()
    n = 8192
    assert outcome["result"] == sum(3 * i + 1 for i in range(n))
    # The store to the page marked private without guest_memfd: KVM_EXIT_MEMORY_FAULT
    # with KVM_MEMORY_EXIT_FLAG_PRIVATE (8), the page's GPA, 4096 bytes (reference §6).
    assert outcome["exits"] == [MemoryFaultExit(8, 0x300000, 4096)]
    # One code page, 16 data pages, the result page; each mapped once, at 4K.
    assert outcome["mapped"] == [0x1000, *range(0x200000, 0x210000, 4096), 0x300000]
    assert outcome["stats"]["pages_4k"] == 18 and outcome["stats"]["pf_fixed"] == 18
