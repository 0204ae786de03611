"""A Hypothesis state machine drives a compiled-core VM and a pure-Python VM side by side.

Rules cover every VM type (GPA width 48/52, NX huge pages, eager page splitting, hosts
of every width, 5-level paging, EPT without A/D bits or PML, memory encryption),
memslots with and without guest_memfd (create, move, flag changes, delete; valid and
invalid), attribute changes, quirks, dirty logging (get, clear, manual protection),
host invalidations, THP level changes and guest_memfd punch-hole (also from stage
hooks) and close, pre-fault, runs of first touches,
hypercalls, TDX MapGPA and SNP page state changes (KVM_HC_MAP_GPA_RANGE exits and
their completion), accesses with every flag combination, batches with uint8
flag arrays, the exit handlers with arbitrary exit values (including the other
vendor's), stage hooks, snapshots and restores, and arguments of the wrong
kind.  ``kvmemu.testing.Twin`` applies each operation to both cores and compares
the result or exception (type, errno, message), then stats, every vCPU's
``run``, memslots, attribute ranges, lpage_info, counters, dirty bitmaps and the
page-table storage, and requires ``vm.check_invariants() == []`` on both.

The ``default`` Hypothesis profile runs a few seconds; ``KVMEMU_HYPOTHESIS_PROFILE=long``
runs 50 times as many programs.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmemu import testing as kvmfuzz
from kvmemu.constants import PfStat
from kvmemu.testing import GIB, MIB, U64_MAX, WEIRD

LONG = os.environ.get("KVMEMU_HYPOTHESIS_PROFILE") == "long"

# Regions that slots, attributes and accesses share, so that they meet each other.
BASES = st.sampled_from((0, 2 * MIB, GIB, GIB + 0x1000, 2 * GIB))
SIZES = st.sampled_from((0x1000, 0x3000, 2 * MIB, 4 * MIB, GIB, GIB + 2 * MIB))
U64 = st.integers(0, U64_MAX)
BAD = st.sampled_from(WEIRD)
GPA = st.one_of(
    st.tuples(BASES, st.sampled_from((0, 0x10, 0x1000, 0x1FF000, 0x123456, 2 * MIB)),
              st.sampled_from((0,) * 6 + (1 << 47, 1 << 51, 1 << 36, 1 << 48)))
    .map(sum), U64)
BOOL = st.booleans() | st.sampled_from((0, 1, np.bool_(True)))
ACCESS = st.fixed_dictionaries({}, optional={
    "write": BOOL, "fetch": BOOL, "user": BOOL, "encrypted": BOOL,
    "stage": st.sampled_from(("final", "walk", "nogva"))})
QUALIFICATION = st.integers(0, 0x1FF) | st.sampled_from(kvmfuzz.QUALS) | U64
EXIT_INFO_1 = st.sampled_from(kvmfuzz.INFOS) | st.integers(0, 0x1F).map(
    lambda low: low | 1 << 32) | U64
VM_TYPES = st.sampled_from((0, 1, 2, 3, 4, 5))
HOSTS = st.sampled_from((None, None, {}, {"maxphyaddr": 52}, {"maxphyaddr": 40},
                         {"la57": True}, {"ept_ad_bits": False}, {"pml": False},
                         {"mem_encrypt": True}, {"maxphyaddr": 52, "mem_encrypt": True},
                         {"maxphyaddr": 46, "la57": True, "ept_ad_bits": False}))


class TwinVMs(RuleBasedStateMachine):
    """Both cores, one VM each; every rule is applied to both and compared."""

    def __init__(self) -> None:
        super().__init__()
        self.twin = kvmfuzz.Twin()

    def apply(self, *op):
        return self.twin.apply(op)

    @initialize(vm_type=VM_TYPES, gpaw=st.sampled_from((48, 52)), nx=st.booleans(),
                vcpus=st.integers(1, 2), eager=st.booleans(), host=HOSTS)
    def create_vm(self, vm_type, gpaw, nx, vcpus, eager, host):
        if self.apply("vm", vm_type, None, gpaw, nx, eager, host)[0] == "raised":
            self.apply("vm", vm_type, None, gpaw, nx, eager, None)   # a host it can run on
        for _ in range(vcpus):
            self.apply("vcpu")

    @rule(vm_type=VM_TYPES | st.integers(-2, 8), vendor=st.sampled_from((None, "vmx", "svm")),
          gpaw=st.sampled_from((48, 52, 47)), nx=BOOL, host=HOSTS)
    def recreate_vm(self, vm_type, vendor, gpaw, nx, host):
        self.apply("vm", vm_type, vendor, gpaw, nx, True, host)
        self.apply("vcpu")

    @rule()
    def create_vcpu(self):
        self.apply("vcpu")

    @rule(size=SIZES.map(lambda s: s + 0x1000) | SIZES | st.sampled_from((0, 0x800, 1 << 63)),
          flags=st.sampled_from((0, 0, 1, 2, 4)))
    def create_guest_memfd(self, size, flags):
        self.apply("gmem", size, flags)

    @rule(slot=st.integers(0, 3) | st.sampled_from((1 << 16, (1 << 16) | 1, 32767, 1 << 32)),
          base=BASES, size=SIZES, uaddr_delta=st.sampled_from((0, 0, 0x1000)),
          flags=st.sampled_from((0, 0, 1, 2, 3, 4, 4, 8)),
          gmem=st.sampled_from((None, 0, 1, -1)),
          offset=st.sampled_from((0, 0, 0x1000, 2 * MIB, 0x800)), host_level=st.integers(1, 3))
    def set_memslot(self, slot, base, size, uaddr_delta, flags, gmem, offset, host_level):
        self.apply("slot", slot, base, size, (1 << 40) + base + uaddr_delta, flags, gmem,
                   offset, host_level)

    @rule(slot=st.integers(0, 3) | st.just(1 << 16))
    def delete_memslot(self, slot):
        self.apply("slot", slot, 0, 0, 0, 0, None, 0, 1)

    @rule(which=st.integers(0, 7), gpa=st.sampled_from((None, 0, 4 * MIB, 3 * GIB)),
          flip=st.sampled_from((1, 1, 2, 4)))
    def move_or_flag_memslot(self, which, gpa, flip):
        self.apply("dirty", which, gpa, flip)

    @rule(mask=st.sampled_from((0x80, 0x200, 0x280, 0, 1 << 11, -1, 1 << 64, "0x80")))
    def disable_quirks(self, mask):
        self.apply("disable_quirks", mask)

    @rule(mask=st.sampled_from((1 << 12, 0, 1, 1 << 64, -1)))
    def enable_exit_hypercall(self, mask):
        self.apply("exit_hypercall", mask)

    @rule(vcpu=st.integers(0, 3), nr=st.sampled_from((12, 12, 12, 1, 5, 9, 99)),
          a0=st.sampled_from((0, 0x1000, 0x200000, 0x1001, U64_MAX - 0xFFF)),
          a1=st.sampled_from((1, 512, 0, U64_MAX)), a2=st.sampled_from((0, 0x10, 0x11)))
    def hypercall(self, vcpu, nr, a0, a1, a2):
        self.apply("hypercall", vcpu, nr, a0, a1, a2)

    @rule(vcpu=st.integers(0, 3),
          gpa=st.sampled_from((0, 0x1000, 0x200000, 0x1800, (1 << 47) | 0x400000, 1 << 48,
                               (1 << 47) - 0x1000, (1 << 51) | 0x1000)),
          size=st.sampled_from((0x1000, 5 << 20, 0, 0x800, 0x2000, U64_MAX)))
    def tdvmcall_map_gpa(self, vcpu, gpa, size):
        self.apply("map_gpa", vcpu, gpa, size)

    @rule(vcpu=st.integers(0, 3),
          entries=st.lists(st.tuples(st.sampled_from((0, 1, 2, 512, 1024, 1 << 40)),
                                     st.sampled_from((1, 2, 3, 16)), st.booleans()),
                           max_size=5))
    def snp_page_state_change(self, vcpu, entries):
        self.apply("psc", vcpu, entries)

    @rule(vcpu=st.integers(0, 3), gfn=st.sampled_from((0, 5, 512, 1 << 40)),
          op=st.sampled_from((1, 2, 0, 3)))
    def snp_psc_msr(self, vcpu, gfn, op):
        self.apply("psc_msr", vcpu, gfn, op)

    @rule(vcpu=st.integers(0, 3), ret=st.sampled_from((0, -22, 1, 1 << 64, -(1 << 63))))
    def complete_hypercall(self, vcpu, ret):
        self.apply("complete_hypercall", vcpu, ret)

    @rule(initially_set=BOOL | st.sampled_from((2, None)))
    def enable_manual_dirty_log_protect(self, initially_set):
        self.apply("manual_protect", initially_set)

    @rule(slot=st.integers(0, 3) | st.sampled_from((1 << 16, 32764, 1 << 32, -1)))
    def get_dirty_log(self, slot):
        self.apply("get_dirty_log", slot)

    @rule(slot=st.integers(0, 3) | st.sampled_from((1 << 16, 32764)),
          first=st.sampled_from((0, 0, 64, 512, 1, 1 << 64)),
          count=st.sampled_from((64, 128, 512, 3, 0, 1 << 32, 262144)),
          words=st.lists(st.sampled_from((0, 1, 0xFF, U64_MAX, 1 << 63)), max_size=4))
    def clear_dirty_log(self, slot, first, count, words):
        self.apply("clear_dirty_log", slot, first, count, np.array(words, dtype=np.uint64))

    @rule(base=BASES, offset=st.sampled_from((0, 0x1000, 0x1FF000, 2 * MIB)),
          size=st.sampled_from((0x1000, 2 * MIB, GIB, 0, 0x800, U64_MAX)))
    def invalidate_host_range(self, base, offset, size):
        self.apply("host_inval", (1 << 40) + base + offset, size)

    @rule(gmem=st.integers(0, 3), offset=st.sampled_from((0, 0x1000, 2 * MIB, 0x800, 1 << 63)),
          size=st.sampled_from((0x1000, 2 * MIB, GIB, 0)))
    def punch_hole(self, gmem, offset, size):
        self.apply("punch", gmem, offset, size)

    @rule(gmem=st.integers(0, 3))
    def close_guest_memfd(self, gmem):
        self.apply("gmem_close", gmem)

    @rule(slot=st.integers(0, 3) | st.just(1 << 16), level=st.integers(0, 4))
    def set_host_level(self, slot, level):
        self.apply("host_level", slot, level)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, size=st.sampled_from((0x1000, 0x3000, 2 * MIB, 0,
                                                                 GIB, 0x800)),
          flags=st.sampled_from((0, 0, 0, 1)))
    def pre_fault_memory(self, vcpu, gpa, size, flags):
        self.apply("pre_fault", vcpu, gpa, size, flags)

    @rule(address=BASES, offset=st.sampled_from((0, 0x1000, 0x1FF000, 2 * MIB)),
          size=st.sampled_from((0x1000, 0x2000, 2 * MIB, 2 * MIB + 0x1000, GIB, 0, 0x800)),
          attributes=st.sampled_from((0, 8, 8, 1)), flags=st.sampled_from((0, 0, 0, 1)))
    def set_attributes(self, address, offset, size, attributes, flags):
        self.apply("attrs", address + offset, size, attributes, flags)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, kwargs=ACCESS)
    def access(self, vcpu, gpa, kwargs):
        self.apply("access", vcpu, gpa, kwargs)

    @rule(vcpu=st.integers(0, 3), gpas=st.lists(GPA, max_size=8),
          flags=st.integers(0, 63) | st.lists(st.integers(0, 63), min_size=8, max_size=8))
    def access_many(self, vcpu, gpas, flags):
        if isinstance(flags, list):
            flags = np.array(flags[:len(gpas)], dtype=np.uint8)
        self.apply("access_many", vcpu, np.array(gpas, dtype=np.uint64), flags)

    @rule(vcpu=st.integers(0, 3), base=BASES, count=st.integers(1, 520),
          flags=st.integers(0, 15))
    def access_run(self, vcpu, base, count, flags):
        """Consecutive pages from one of the regions: a run of first touches that the
        compiled core's batch loop faults in itself, across a leaf table's end (with
        the C-bit, flag 8, an SNP VM's private ones)."""
        gpas = (np.arange(count, dtype=np.uint64) << np.uint64(12)) + np.uint64(base)
        self.apply("access_many", vcpu, gpas, flags)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, qualification=QUALIFICATION)
    def ept_violation(self, vcpu, gpa, qualification):
        self.apply("ept_violation", vcpu, gpa, qualification)

    @rule(vcpu=st.integers(0, 3), gpa=GPA)
    def ept_misconfig(self, vcpu, gpa):
        self.apply("ept_misconfig", vcpu, gpa)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, exit_info_1=EXIT_INFO_1)
    def npf(self, vcpu, gpa, exit_info_1):
        self.apply("npf", vcpu, gpa, exit_info_1)

    @rule(vcpu=st.integers(0, 3), stage=st.sampled_from(("fault", "faultin", "map")),
          address=BASES, size=st.sampled_from((0x1000, 2 * MIB)),
          attributes=st.sampled_from((0, 8)),
          what=st.sampled_from(("attrs", "attrs", "delete", "host", "host_level", "punch")))
    def stage_hook(self, vcpu, stage, address, size, attributes, what):
        change = {"delete": ("slot", 0, 0, 0, 0, 0, None, 0, 1),
                  "attrs": ("attrs", address, size, attributes, 0),
                  "host": ("host_inval", (1 << 40) + address, size),
                  "host_level": ("host_level", 0, 1 + (attributes >> 3)),
                  "punch": ("punch", 0, address, size)}[what]
        self.apply("hook", vcpu, stage, change)

    @rule(gpa=st.sampled_from((0, 0x1000, 2 * MIB, GIB, 1 << 47, 0x800)),
          size=st.sampled_from((0x1000, 0x3000, 0, 0x800)),
          measure=BOOL)
    def tdx_init_mem_region(self, gpa, size, measure):
        self.apply("tdx_init", gpa, size, measure)

    @rule()
    def tdx_finalize_vm(self):
        self.apply("tdx_finalize")

    @rule(gpa=st.sampled_from((0, 0x1000, 2 * MIB, GIB, 0x800)),
          size=st.sampled_from((0x1000, 0x3000, 0, 0x800)),
          page_type=st.sampled_from((1, 1, 3, 2, 7)))
    def snp_launch_update(self, gpa, size, page_type):
        self.apply("snp_update", gpa, size, page_type)

    @rule()
    def snp_launch_finish(self):
        self.apply("snp_finish")

    @rule(pfn=st.sampled_from((0, 1 << 35, (1 << 35) + 1, (1 << 35) + 512, 1 << 28)))
    def rmp_entry(self, pfn):
        self.apply("rmp", pfn)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, page_size=st.sampled_from((1, 1, 2, 3)),
          validate=BOOL)
    def pvalidate(self, vcpu, gpa, page_size, validate):
        self.apply("pvalidate", vcpu, gpa, page_size, validate)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, level=st.sampled_from((1, 1, 2, 3, 0)))
    def tdx_accept(self, vcpu, gpa, level):
        self.apply("accept", vcpu, gpa, level)

    @rule(vcpu=st.integers(0, 3), pending=BOOL)
    def interrupt_pending(self, vcpu, pending):
        self.apply("irq", vcpu, pending)

    @rule(vcpu=st.integers(0, 3), gpa=GPA, qualification=QUALIFICATION,
          ext=st.sampled_from((6, 6, 0, 0x16)))
    def ept_violation_ext(self, vcpu, gpa, qualification, ext):
        self.apply("ept_violation", vcpu, gpa, qualification, ext)

    @rule(on=st.booleans())
    def watch_zaps(self, on):
        """VM.on_zap set or cleared: both cores report the same zaps at every step."""
        self.apply("on_zap", on)

    @rule()
    def snapshot(self):
        self.apply("snapshot")

    @rule(which=st.integers(-2, 3))
    def restore(self, which):
        self.apply("restore", which)

    @rule(which=st.integers(-1, 3), new_vm=st.booleans())
    def restore_travelled(self, which, new_vm):
        """The snapshot as bytes and back (built on the default core: the other side
        restores it across cores), into this VM or a new one made from it."""
        self.apply("restore_bytes", which, new_vm)

    @rule(gfn=U64 | st.integers(0, 1 << 20))
    def inspect(self, gfn):
        self.apply("get_attrs", gfn)
        self.apply("find", gfn)

    @rule(which=st.sampled_from(("access", "ept_violation", "npf", "attrs", "slot", "gmem",
                                 "get_attrs", "lpage")),
          position=st.integers(0, 7), bad=BAD)
    def wrong_argument(self, which, position, bad):
        """One argument of the wrong kind or out of range: both reject it alike, and the
        state compared after it shows that nothing changed."""
        ops = {"access": ("access", 0, 0x1000, {}), "ept_violation": ("ept_violation", 0, 0, 0x181),
               "npf": ("npf", 0, 0, 0x100000004), "attrs": ("attrs", 0, 0x1000, 8, 0),
               "slot": ("slot", 5, 8 * GIB, 0x1000, 1 << 41, 0, None, 0, 1),
               "gmem": ("gmem", 0x1000, 0), "get_attrs": ("get_attrs", 0), "lpage": ("lpage", 0, 2)}
        op = list(ops[which])
        i = 1 + position % (len(op) - 1)
        if isinstance(op[i], dict):
            op[i] = {"write": bad} if position & 1 else {"stage": bad}
        elif not (op[0] in ("access", "ept_violation", "npf") and i == 1):
            op[i] = bad
        self.twin.apply(tuple(op))

    @invariant()
    def same_state(self):
        self.twin.check()


TwinVMs.TestCase.settings = settings(
    max_examples=2000 if LONG else 40, stateful_step_count=50 if LONG else 30,
    deadline=None)
test_twin_vms = TwinVMs.TestCase


def test_the_invariant_checker_sees_inconsistent_fault_counters():
    """check_invariants compares each vCPU's counters with kvm_mmu_page_fault's accounting
    (tampered here in the twin, whose counters are a plain list)."""
    vm = kvmfuzz.CORES[1].VM(0)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=2 * MIB,
                              userspace_addr=1 << 40)
    vcpu = vm.create_vcpu()
    vcpu.access(0x1000, write=True)
    assert vm.check_invariants() == []
    vcpu._c.counters[PfStat.PF_FAST] += 2
    vcpu._c.counters[PfStat.PF_MMIO_SPTE_CREATED] += 1
    problems = vm.check_invariants()
    assert any("fast fixes" in p for p in problems)
    assert any("MMIO SPTEs" in p for p in problems)
