"""How soon Ctrl-C stops a long batch: the time from SIGINT to KeyboardInterrupt.

The compiled core's GIL-free access_many loop looks for a pending signal about every
millisecond (SIGNAL_RUNS runs of LOCKED_RUN accesses); the figure is recorded in
extra_info as ``ms_to_interrupt`` (median of the rounds).
"""

import statistics

import numpy as np
import pytest

from kvmemu import VMType, _select
from kvmemu.testing import interrupted_batch


@pytest.mark.benchmark(group="hostile-ctrl-c")
def test_ctrl_c_latency_of_a_batch(benchmark):
    vm = _select.load("cython").VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 30,
                              userspace_addr=1 << 40)
    vcpu = vm.create_vcpu()
    vcpu.access_many(np.arange(2048, dtype=np.uint64) << np.uint64(12))
    gpas = np.full(40_000_000, 0x1000, dtype=np.uint64)
    latencies = []

    def run():
        message, latency = interrupted_batch(vcpu, gpas, 1)
        assert "access_many stopped at element" in message
        latencies.append(latency)

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["ms_to_interrupt"] = round(statistics.median(latencies) * 1e3, 3)
