"""The compiled fault pipeline and its pure-Python twin agree on every operation.

Each example creates the same VM on both cores (type, GPA width, NX huge page
workaround) with two vCPUs, then runs one random sequence of operations on
both: memslot changes (with and without guest_memfd, READONLY, dirty logging,
host levels 1-3), memory attribute changes, accesses with every flag
combination, direct calls of the exit handlers with arbitrary exit values, and
one-shot stage hooks that change the VM in the middle of a fault.  After every
step the results (or the exceptions), ``vm.stats``, every vCPU's ``run`` and
the whole page-table storage must be identical.  This is a two-core test by
nature, so it names both cores instead of taking ``kv``.
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvmemu import GuestMemfdFlag, MemAttr, MemFlag, VMType, _select
from kvmemu.constants import MMIO_SPTE_GEN_MASK

CORES = (_select.load("cython"), _select.load("python"))
MIB, GIB = 1 << 20, 1 << 30

# Slots, attributes and accesses share a few regions so that they meet each other.
BASES = (0, 2 * MIB, GIB, GIB + 0x1000, 2 * GIB)
SIZES = (0x1000, 0x3000, 2 * MIB, 4 * MIB, 4 * MIB, GIB, GIB, GIB + 2 * MIB)
OFFSETS = (0, 0x1000, 0x1FF000, 2 * MIB, 0x3FF000, GIB - 0x1000)
# Host addresses congruent with the GPA (huge pages possible) or off by 4K (never).
UADDR_DELTAS = (0, 0, 0x1000)
FLAGS = (0, MemFlag.LOG_DIRTY_PAGES, MemFlag.READONLY,
         MemFlag.LOG_DIRTY_PAGES | MemFlag.READONLY)

SLOT_OP = st.tuples(st.just("slot"), st.integers(0, 3), st.sampled_from(BASES),
                    st.sampled_from(SIZES), st.sampled_from(UADDR_DELTAS),
                    st.sampled_from(FLAGS), st.sampled_from([None, 0, GuestMemfdFlag.MMAP]),
                    st.integers(1, 3), st.sampled_from([0, 0, 1]))
DELETE_OP = st.tuples(st.just("delete"), st.integers(0, 3), st.sampled_from([0, 0, 1]))
DIRTY_OP = st.tuples(st.just("dirty"), st.integers(0, 3))
ATTR_OP = st.tuples(st.just("attributes"), st.sampled_from(BASES), st.sampled_from(OFFSETS),
                    st.sampled_from([0x1000, 0x2000, 2 * MIB, 2 * MIB + 0x1000, GIB]),
                    st.sampled_from([0, MemAttr.PRIVATE]))
# A GPA near the regions, maybe with the TDX shared bit, or far beyond memory.
GPA = st.tuples(st.sampled_from(BASES), st.sampled_from(OFFSETS + (0, 0x1000, 0x123000)),
                st.booleans(), st.sampled_from([0] * 8 + [1 << 40, 1 << 47, 1 << 50]))
ACCESS = st.fixed_dictionaries({}, optional={
    "write": st.booleans(), "fetch": st.booleans(), "user": st.booleans(),
    "encrypted": st.booleans(), "stage": st.sampled_from(["final", "walk", "nogva"])})
ACCESS_OP = st.tuples(st.just("access"), st.integers(0, 1), GPA, ACCESS)
# Exit values: the bits that matter, or anything.
QUALIFICATION = st.integers(0, 0x1FF) | st.integers(0, (1 << 64) - 1)
EXIT_INFO_1 = (st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 9, 0x10, 0x11, 0x14, 1 << 32, 1 << 33,
                                1 << 34]).flatmap(lambda b: st.integers(0, 0x1F).map(
                                    lambda low: b | low | (b and 1 << 32)))
               | st.integers(0, (1 << 64) - 1))
# The VM's vendor picks the handler: EPT violation (or misconfig) on VMX, #NPF on SVM;
# now and then the other vendor's, which must fail alike.
HANDLER_OP = st.tuples(st.just("exit"), st.integers(0, 1), GPA, QUALIFICATION, EXIT_INFO_1,
                       st.sampled_from(["violation"] * 4 + ["misconfig", "wrong vendor"]))
HOOK_OP = st.tuples(st.just("hook"), st.integers(0, 1),
                    st.sampled_from(["fault", "faultin", "map"]), st.one_of(ATTR_OP, DIRTY_OP))
# Every example starts with a few memslots in address space 0, then mixes operations.
LAYOUT = st.lists(SLOT_OP.map(lambda op: op[:-1] + (0,)), min_size=1, max_size=3)
# Weighted: accesses and handler calls most, memory changes between them.
BRANCHES = (SLOT_OP, DELETE_OP, DIRTY_OP, ATTR_OP, ATTR_OP, ACCESS_OP, ACCESS_OP, ACCESS_OP,
            ACCESS_OP, ACCESS_OP, HANDLER_OP, HANDLER_OP, HANDLER_OP, HOOK_OP)
OPERATIONS = st.lists(st.integers(0, len(BRANCHES) - 1).flatmap(BRANCHES.__getitem__),
                      min_size=15, max_size=40)
VM_CONFIG = st.tuples(st.sampled_from([VMType.DEFAULT, VMType.SW_PROTECTED, VMType.SEV,
                                       VMType.SNP, VMType.TDX]),
                      st.sampled_from([48, 52]), st.booleans())


def outcome(call):
    """What a call gives: its result, or the exception's type and message."""
    try:
        return call()
    except Exception as exc:   # noqa: BLE001 - both cores must fail alike
        return ("raised", type(exc).__name__, str(exc))


def gpa_of(vm, gpa):
    base, offset, shared, high = gpa
    return base + offset + (vm.shared_bit if shared else 0) + high


def memory_op(vm, op):
    """A memslot or attribute change, as ioctls (the same on both VMs)."""
    kind = op[0]
    if kind == "slot":
        _, slot_id, base, size, delta, flags, gmem_flags, host_level, as_id = op
        gmem, offset = None, 0
        if gmem_flags is not None:   # READONLY and dirty logging are invalid here
            gmem = vm.create_guest_memfd(size + 0x1000, gmem_flags)
            flags = MemFlag.GUEST_MEMFD
            offset = 0x1000
        return vm.set_user_memory_region(
            slot=(as_id << 16) | slot_id, guest_phys_addr=base, memory_size=size,
            userspace_addr=(1 << 40) + base + delta, flags=flags, guest_memfd=gmem,
            guest_memfd_offset=offset, host_level=host_level)
    if kind == "delete":
        _, slot_id, as_id = op
        return vm.set_user_memory_region(slot=(as_id << 16) | slot_id, guest_phys_addr=0,
                                         memory_size=0, userspace_addr=0)
    if kind == "dirty":    # toggle dirty logging on an existing slot (KVM_MR_FLAGS_ONLY)
        for s in vm.memslots:
            if s.slot == op[1] and not s.flags & MemFlag.GUEST_MEMFD:
                return vm.set_user_memory_region(
                    slot=s.slot, guest_phys_addr=s.guest_phys_addr, memory_size=s.memory_size,
                    userspace_addr=s.userspace_addr, host_level=s.host_level,
                    flags=s.flags ^ MemFlag.LOG_DIRTY_PAGES)
        return None
    _, base, offset, size, attrs = op
    return vm.set_memory_attributes(base + offset, size, attrs)


def one_shot_hook(vm, stage, op):
    """A stage hook that runs ``op`` the first time the pipeline reaches ``stage``."""
    fired = []

    def hook(name):
        if name == stage and not fired:
            fired.append(outcome(lambda: memory_op(vm, op)))
    return hook


def step(vm, vcpus, op):
    kind = op[0]
    if kind in ("slot", "delete", "dirty", "attributes"):
        return outcome(lambda: memory_op(vm, op))
    vcpu = vcpus[op[1]]
    if kind == "hook":
        vcpu.stage_hook = one_shot_hook(vm, op[2], op[3])
        return None
    gpa = gpa_of(vm, op[2])
    if kind == "access":
        return outcome(lambda: vcpu.access(gpa, **op[3]))
    _, _, _, qualification, exit_info_1, which = op
    if (vm.vendor == "vmx") == (which == "wrong vendor"):
        return outcome(lambda: vcpu.handle_npf(gpa, exit_info_1))
    if which == "misconfig":
        return outcome(lambda: vcpu.handle_ept_misconfig(gpa))
    return outcome(lambda: vcpu.handle_ept_violation(gpa, qualification))


def state(vm, vcpus):
    private = vm.private_page_tables
    return (vm.stats, [(v.run.exit_reason, v.run.memory_fault, v.run.mmio, v.stats)
                       for v in vcpus],
            vm.page_tables.tables.copy(), None if private is None else private.tables.copy(),
            vm.mmu_invalidate_seq, [vm.memslots_generation(a) for a in range(vm.nr_memslot_as_ids)])


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    if a[3] is None or b[3] is None:
        assert a[3] is None and b[3] is None
    else:
        np.testing.assert_array_equal(a[3], b[3])
    assert a[4:] == b[4:]


@given(VM_CONFIG, LAYOUT, OPERATIONS)
def test_fault_pipeline_twins_agree(config, layout, operations):
    vm_type, gpaw, nx = config
    vms = [core.VM(vm_type, gpaw=gpaw, nx_huge_pages=nx) for core in CORES]
    vcpus = [[vm.create_vcpu(), vm.create_vcpu()] for vm in vms]
    for i, op in enumerate(layout + operations):
        results = [step(vm, cpus, op) for vm, cpus in zip(vms, vcpus)]
        assert results[0] == results[1], (i, op)
        assert_same_state(state(vms[0], vcpus[0]), state(vms[1], vcpus[1]))


def test_tables_are_reused_last_freed_first_on_both_cores():
    """2M leaves replacing 4K tables free them; later tables reuse them last freed first."""
    tables = []
    for core in CORES:
        vm = core.VM(VMType.DEFAULT)
        vcpu = vm.create_vcpu()

        def remap(host_level, gpas):
            if vm.memslots:
                vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0,
                                          userspace_addr=0)
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                                      userspace_addr=GIB, host_level=host_level)
            for gpa in gpas:
                vcpu.access(gpa, write=True)

        pt = vm.page_tables
        remap(1, (0, 2 * MIB, 4 * MIB))                 # three 4K tables
        first = [pt.get_entry(gpa, 2) & ~0xFFF for gpa in (0, 2 * MIB, 4 * MIB)]
        remap(2, (0, 2 * MIB, 4 * MIB))                 # freed in that order
        remap(1, (16 * MIB, 18 * MIB, 20 * MIB))        # reused in the reverse order
        again = [pt.get_entry(gpa, 2) & ~0xFFF for gpa in (16 * MIB, 18 * MIB, 20 * MIB)]
        assert again == first[::-1]
        tables.append((pt.tables.copy(), vm.stats))
    np.testing.assert_array_equal(tables[0][0], tables[1][0])
    assert tables[0][1] == tables[1][1]


def test_mmio_generation_wrap_zaps_on_both_cores_and_both_address_spaces():
    """kvm_mmu_invalidate_mmio_sptes: a wrap of either address space's generation zaps
    every SPTE (address space 1 is SMM's, generations 1, 3, 5, ...)."""
    for as_id in (0, 1):
        seen = []
        for core in CORES:
            vm = core.VM(VMType.DEFAULT)
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                                      userspace_addr=GIB, host_level=2)
            vcpu = vm.create_vcpu()
            vcpu.access(0, write=True)
            vcpu.access(8 * MIB)                    # an MMIO SPTE
            state = vm._memory
            before = None
            while True:
                state.swap_active_memslots(as_id)
                gen = vm.memslots_generation(as_id)
                if not gen & MMIO_SPTE_GEN_MASK & ~1:
                    break
                if before is None:
                    before = vm.page_tables.tables.copy()
            assert vm.stats["pages_2m"] == 0
            seen.append((before, vm.page_tables.tables.copy()))
        np.testing.assert_array_equal(seen[0][0], seen[1][0])
        np.testing.assert_array_equal(seen[0][1], seen[1][1])
        assert not np.array_equal(seen[0][0], seen[0][1])
