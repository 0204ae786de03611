"""Identical call sequences give identical results and reprs in fresh processes.

A script replays the fuzz corpus and a scripted session through the public API
on each core, printing the repr of every result or exception, of the VM, its
vCPUs' ``run`` and the page tables; two subprocesses with different hash seeds
must print the same text, and no repr may contain an object address.
"""

from __future__ import annotations

import re
from pathlib import Path

import kvmemu

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys
from pathlib import Path
import numpy as np
import kvmemu
from kvmemu import testing as kvmfuzz
from kvmemu import MemFlag, VMType

for side_core in kvmfuzz.CORES:
    for seed in sorted((Path(sys.argv[1]) / "fuzz" / "corpus").iterdir()):
        side = kvmfuzz.Side(side_core)
        for op in kvmfuzz.decode(seed.read_bytes()):
            try:
                print(repr(kvmfuzz._run(side, op)))
            except Exception as exc:
                print(type(exc).__name__, repr(exc))
        if side.vm is not None:
            print(repr(side.vm), side.vm.stats, side.vm.memslots)
            print([repr(v.run) for v in side.vcpus if not isinstance(v._c, kvmemu._vm._DetachedVCPU)])
            print(side.vm.page_tables.tables.sum(dtype=np.uint64), repr(side.vm.page_tables))
    vm = side_core.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 << 20)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20,
                              userspace_addr=1 << 40, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem, host_level=2)
    vcpu = vm.create_vcpu()
    snap = vm.snapshot()
    print(repr(gmem), repr(snap), repr(vcpu), repr(vcpu.run), vcpu.access(0x1234, write=True))
    vm.set_memory_attributes(0x1000, 0x1000, 8)
    batch = vcpu.access_many(np.arange(0, 4 << 20, 0x1000, dtype=np.uint64), 1)
    print(repr(batch), batch.hpa.tolist()[:4], vm.stats, vm.memory_attribute_ranges())
    vm.restore(snap)
    print(repr(vm), vm.stats, vm.page_tables.tables.tolist()[:2])
"""


def test_the_child_imports_the_same_package(run_python):
    done = run_python("-c", "import kvmemu; print(kvmemu.__file__)")
    assert Path(done.stdout.strip()) == Path(kvmemu.__file__)


def test_two_fresh_processes_print_the_same(run_python):
    first, second = [run_python("-c", SCRIPT, str(ROOT), env={"PYTHONHASHSEED": seed}).stdout
                     for seed in ("1", "2")]
    assert first == second
    assert len(first.splitlines()) > 100
    assert not re.search(r" at 0x[0-9a-f]+|object at", first)
