"""The confidential-VM lifecycle: a MapGPA round trip, a page state change, and what
the SNP RMP check costs a mapped batch walk.

The RMP-checked walk (an SNP guest's private, validated pages, C-bit set) runs next to
the same walk on an SEV VM (the same 4-level NPT with 4K leaves, no RMP) and the plain
C walk of benchmarks/c_baseline/walk.c over the same GPAs, in the same session; the
ratios go in extra_info.  Equal work per compared case: NPAGES mapped pages, N
accesses.
"""

import numpy as np
import pytest

from conftest import run_c_baseline
from kvmemu import (KVM_HC_MAP_GPA_RANGE, AccessFlags, HypercallExit, MemAttr, MemFlag,
                    PscResult, TdvmcallResult, VMType, _select)

NPAGES = 1 << 16                 # 256 MiB of mapped 4K pages
N = 1 << 20                      # random accesses per batch
UADDR = 1 << 40
MIB = 1 << 20


@pytest.fixture(scope="module")
def gpas():
    rng = np.random.default_rng(20261128)
    pages = rng.integers(0, NPAGES, N, dtype=np.uint64)
    return (pages << np.uint64(12)) | np.uint64(0x123)


@pytest.fixture(scope="module")
def c_walk_ns(gpas, tmp_path_factory):
    out = run_c_baseline("walk", tmp_path_factory.mktemp("c_baseline"), gpas, NPAGES, 5)
    return float(out[1])


def mapped(vm_type, private):
    """A VM whose NPAGES are mapped 4K; SNP: private guest_memfd pages, validated (the
    guest of an implicit launch validates on first touch)."""
    vm = _select.load("cython").VM(vm_type)
    kwargs = {}
    if private:
        kwargs = {"flags": MemFlag.GUEST_MEMFD,
                  "guest_memfd": vm.create_guest_memfd(NPAGES << 12)}
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=NPAGES << 12,
                              userspace_addr=UADDR, host_level=1, **kwargs)
    if private:
        vm.set_memory_attributes(0, NPAGES << 12, MemAttr.PRIVATE)
    vcpu = vm.create_vcpu()
    pages = np.arange(NPAGES, dtype=np.uint64) << np.uint64(12)
    flags = AccessFlags.ENCRYPTED if vm_type != VMType.SNP or private else AccessFlags(0)
    assert vcpu.access_many(pages, flags).count == NPAGES
    return vm, vcpu


WALKS = {}


def record(benchmark, name, per_element, c_walk_ns):
    per_element(N)
    benchmark.extra_info["c_baseline_ns_per_walk"] = c_walk_ns
    ns = benchmark.extra_info.get("ns_per_element")
    if ns is not None:
        WALKS[name] = ns
        benchmark.extra_info["ratio_to_c"] = round(ns / c_walk_ns, 2)
        if "sev" in WALKS and name != "sev":
            benchmark.extra_info["ratio_to_sev"] = round(ns / WALKS["sev"], 2)


@pytest.mark.benchmark(group="walk-rmp")
def test_sev_walk_no_rmp(benchmark, gpas, per_element, c_walk_ns):
    """SEV: the C-bit passes through, no RMP check."""
    _, vcpu = mapped(VMType.SEV, False)
    result = benchmark(vcpu.access_many, gpas, AccessFlags.ENCRYPTED)
    assert result.count == N
    record(benchmark, "sev", per_element, c_walk_ns)


@pytest.mark.benchmark(group="walk-rmp")
def test_snp_walk_rmp_checked(benchmark, gpas, per_element, c_walk_ns):
    """SNP, private and validated pages, C-bit set: every access reads its frame's
    RMP entry (assigned, GPA, mutable, 4K, validated)."""
    vm, vcpu = mapped(VMType.SNP, True)
    result = benchmark(vcpu.access_many, gpas, AccessFlags.ENCRYPTED)
    assert result.count == N and result.exit is None
    record(benchmark, "snp_private", per_element, c_walk_ns)


@pytest.mark.benchmark(group="walk-rmp")
def test_snp_walk_shared_writes(benchmark, gpas, per_element, c_walk_ns):
    """SNP, shared pages written without the C-bit: the hypervisor-owned check."""
    _, vcpu = mapped(VMType.SNP, False)
    result = benchmark(vcpu.access_many, gpas, AccessFlags.WRITE)
    assert result.count == N
    record(benchmark, "snp_shared", per_element, c_walk_ns)


def requesting_vm(impl, vm_type):
    """A VM whose KVM_HC_MAP_GPA_RANGE exits, 4 MiB of guest_memfd memory, a vCPU."""
    vm = _select.load(impl).VM(vm_type)
    vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=vm.create_guest_memfd(4 * MIB))
    return vm, vm.create_vcpu()


def answer(vm, vcpu, result):
    """The VMM: each KVM_HC_MAP_GPA_RANGE exit converts its range and is answered 0."""
    while isinstance(result, HypercallExit):
        gpa, pages, attrs = result.args[:3]
        vm.set_memory_attributes(gpa, pages << 12, MemAttr.PRIVATE if attrs & 16 else 0)
        result = vcpu.complete_hypercall(0)
    return result


@pytest.mark.benchmark(group="map-gpa-2m")
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_map_gpa_round_trip_2mib(benchmark, impl):
    """A TD's MapGPA of 2 MiB to shared and back: one exit each, the VMM converts and
    answers (tdx_map_gpa, KVM_SET_MEMORY_ATTRIBUTES, tdx_complete_vmcall_map_gpa)."""
    vm, vcpu = requesting_vm(impl, VMType.TDX)
    vm.set_memory_attributes(0, 4 * MIB, MemAttr.PRIVATE)

    def serve(result):
        return answer(vm, vcpu, result)

    def round_trip():
        a = serve(vcpu.tdvmcall_map_gpa(vm.shared_bit | 2 * MIB, 2 * MIB))
        b = serve(vcpu.tdvmcall_map_gpa(2 * MIB, 2 * MIB))
        return a, b

    a, b = benchmark(round_trip)
    assert a == b == TdvmcallResult(0, 0)


@pytest.mark.benchmark(group="psc-512")
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_page_state_change_512_entries(benchmark, impl):
    """An SNP guest's page state change of 512 4K entries (two GHCB requests: 253 at
    most each, so 253 + 253 + 6), shared then private; adjacent entries merge, so each
    request is one exit that the VMM answers."""
    vm, vcpu = requesting_vm(impl, VMType.SNP)

    def request(op):
        done = 0
        for first in range(0, 512, 253):
            entries = [(512 + page, op, False) for page in range(first, min(first + 253, 512))]
            result = answer(vm, vcpu, vcpu.snp_page_state_change(entries))
            assert isinstance(result, PscResult) and result.ret == 0
            done += len(entries)
        return done

    assert benchmark(lambda: request(1) + request(2)) == 1024
