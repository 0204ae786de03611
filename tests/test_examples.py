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


def test_unicorn_guest_on_two_vcpu_threads_follows_kvms_zaps():
    example = load_example()
    outcome = example.run_guest()
    half = 4096
    sums = [sum(3 * i + 1 for i in range(k * half, (k + 1) * half)) for k in range(2)]
    assert outcome["sums"] == sums and outcome["rax"] == sums
    assert outcome["stored_again"] == sums
    log = outcome["log"]
    # A store to the page marked private without guest_memfd: KVM_EXIT_MEMORY_FAULT with
    # KVM_MEMORY_EXIT_FLAG_PRIVATE (8), the page's GPA, 4096 bytes (reference §6); before
    # the VMM's first conversion and after it made the page private again.  Each time
    # the other vCPU may fault on the page before the conversion too, and exit as well.
    exits = [what[1] for kind, what in log if kind == "exit"]
    assert set(exits) == {MemoryFaultExit(8, 0x300000, 4096)} and 2 <= len(exits) <= 4
    # Making the mapped page private zapped its 4K leaf (kvm_unmap_gfn_range for
    # KVM_SET_MEMORY_ATTRIBUTES): one on_zap, and each vCPU dropped the page.
    assert outcome["zaps"] == [(0x300, 1, 1, "attributes")]
    assert sorted(what for kind, what in log if kind == "unmapped") == [(0, "0x300000"),
                                                                         (1, "0x300000")]
    for vcpu_id in range(2):
        mapped = [gpa for kind, (cpu, gpa) in log if kind == "mapped" and cpu == vcpu_id]
        data = [hex(0x200000 + 4096 * (8 * vcpu_id + i)) for i in range(8)]
        assert mapped == ["0x1000", *data, "0x300000", "0x300000"]
    # Code, 16 data pages and the result page mapped 4K; the result page twice; the
    # exits were faults taken too, and so were faults that raced with the other vCPU's
    # conversion (SPURIOUS, or RETRY when they saw its invalidation in progress).
    stats = outcome["stats"]
    assert (stats["pages_4k"], stats["pf_fixed"]) == (18, 19)
    assert stats["pf_taken"] >= 19 + len(exits) + stats["pf_spurious"]
