"""VM types, guest_memfd and KVM_SET_USER_MEMORY_REGION2 (Linux 6.18).

Errnos and check order from docs/reference.md §12.1 (which follows
kvm_set_memory_region and the kernel selftest set_memory_region_test);
lpage_info from docs/reference.md §8.3.
"""

import errno

import pytest

from kvmemu import GuestMemfdFlag, KvmError, MemFlag, VMType

GIB, MIB = 1 << 30, 1 << 20
UADDR = 0x7F0000000000  # 1 GiB-aligned host address
RO, LOG, GMEM = MemFlag.READONLY, MemFlag.LOG_DIRTY_PAGES, MemFlag.GUEST_MEMFD
ALL_TYPES = list(VMType)


def region(vm, slot=0, gpa=0, size=2 * MIB, uaddr=UADDR, **kw):
    vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                              userspace_addr=uaddr, **kw)


def kvm_errno(call, *args, **kw):
    with pytest.raises(KvmError) as info:
        call(*args, **kw)
    return info.value.errno


# --- VM types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vm_type, vendor, private, protected, as_ids", [
    (VMType.DEFAULT, "vmx", False, False, 2),
    (VMType.SW_PROTECTED, "vmx", True, False, 1),
    (VMType.SEV, "svm", False, False, 2),
    (VMType.SEV_ES, "svm", False, True, 2),
    (VMType.SNP, "svm", True, True, 1),
    (VMType.TDX, "vmx", True, True, 1),
])
def test_vm_types(kv, vm_type, vendor, private, protected, as_ids):
    vm = kv.VM(vm_type)
    assert (vm.vendor, vm.has_private_mem, vm.has_protected_state) == (vendor, private, protected)
    assert vm.nr_memslot_as_ids == as_ids
    assert vm.supported_memory_attributes == (8 if private else 0)
    assert vm.readonly_mem == (not protected)
    assert vm.shared_bit == (1 << 47 if vm_type == VMType.TDX else 0)


def test_vendor_rules(kv):
    assert kv.VM(VMType.DEFAULT, vendor="svm").vendor == "svm"
    assert kv.VM(VMType.SW_PROTECTED, vendor="svm").vendor == "svm"
    assert kv.VM(VMType.TDX, gpaw=52).shared_bit == 1 << 51
    assert kv.VM(2).vm_type is VMType.SEV
    for vm_type, vendor in [(VMType.SNP, "vmx"), (VMType.SEV, "vmx"), (VMType.TDX, "svm")]:
        with pytest.raises(ValueError):
            kv.VM(vm_type, vendor=vendor)


@pytest.mark.parametrize("kwargs, exc", [
    ({"vm_type": 6}, ValueError), ({"vm_type": -1}, ValueError), ({"vm_type": "TDX"}, TypeError),
    ({"vendor": "arm"}, ValueError), ({"vendor": 1}, TypeError), ({"gpaw": 47}, ValueError),
    ({"gpaw": "48"}, TypeError), ({"nx_huge_pages": 2}, ValueError),
])
def test_vm_rejects_bad_arguments(kv, kwargs, exc):
    with pytest.raises(exc):
        kv.VM(**kwargs)


# --- KVM_CREATE_GUEST_MEMFD --------------------------------------------------------------------

def test_guest_memfd_create(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 * MIB, GuestMemfdFlag.MMAP)
    assert (gmem.size, gmem.flags) == (4 * MIB, 1)
    assert kv.VM().create_guest_memfd(4096, GuestMemfdFlag.INIT_SHARED | GuestMemfdFlag.MMAP)
    assert vm.create_guest_memfd((1 << 63) - 4096).size == (1 << 63) - 4096


@pytest.mark.parametrize("vm_type, size, flags", [
    (VMType.SW_PROTECTED, 4096, GuestMemfdFlag.INIT_SHARED),  # only without private memory
    (VMType.TDX, 4096, 4), (VMType.DEFAULT, 4096, 1 << 63),
    (VMType.DEFAULT, 0, 0), (VMType.DEFAULT, 4095, 0), (VMType.DEFAULT, 1 << 63, 0),
    (VMType.DEFAULT, (1 << 64) - 4096, 0),
])
def test_guest_memfd_create_einval(kv, vm_type, size, flags):
    assert kvm_errno(kv.VM(vm_type).create_guest_memfd, size, flags) == errno.EINVAL


def test_guest_memfd_create_rejects_non_u64(kv):
    with pytest.raises(OverflowError):
        kv.VM().create_guest_memfd(-4096)
    with pytest.raises(TypeError):
        kv.VM().create_guest_memfd(4096.0)


# --- KVM_SET_USER_MEMORY_REGION2: checks in order ------------------------------------------------

def test_slot_id_limit(kv):
    vm = kv.VM()
    region(vm, slot=32763)
    assert kvm_errno(region, vm, slot=32764, gpa=GIB) == errno.EINVAL
    # The id is the low 16 bits: its check comes before the flags check.
    assert kvm_errno(region, vm, slot=(1 << 16) | 32764, gpa=GIB, flags=1 << 5) == errno.EINVAL


@pytest.mark.parametrize("vm_type", ALL_TYPES)
def test_flag_rules_per_vm_type(kv, vm_type):
    vm = kv.VM(vm_type)
    gmem = vm.create_guest_memfd(64 * MIB)
    for bad in (1 << 3, 1 << 16, 1 << 31, GMEM | LOG, GMEM | RO):
        assert kvm_errno(region, vm, flags=bad, guest_memfd=gmem) == errno.EINVAL
    # GUEST_MEMFD is valid for every VM type in 6.18.
    region(vm, slot=1, gpa=0, flags=GMEM, guest_memfd=gmem)
    region(vm, slot=2, gpa=GIB, flags=LOG)
    if vm.has_protected_state:
        assert kvm_errno(region, vm, slot=3, gpa=2 * GIB, flags=RO) == errno.EINVAL
    else:
        region(vm, slot=3, gpa=2 * GIB, flags=RO | LOG)


@pytest.mark.parametrize("kwargs", [
    {"size": 2 * MIB + 1}, {"gpa": 0x800}, {"uaddr": UADDR + 8},
    {"uaddr": (1 << 47) - 4096, "size": 4096},            # end beyond USER_PTR_MAX
    {"uaddr": (1 << 64) - 4096, "size": 8192},            # wraps
    {"gpa": (1 << 64) - 4096, "size": 8192},              # gpa + size wraps
    {"size": 1 << 43, "uaddr": 0},                        # more than KVM_MEM_MAX_NR_PAGES
    {"flags": GMEM, "guest_memfd_offset": 1},
    {"flags": GMEM, "guest_memfd_offset": 4095},
    {"flags": GMEM, "guest_memfd_offset": (1 << 64) - 4096},   # offset + size wraps
])
def test_sanity_checks_einval(kv, kwargs):
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(64 * MIB)
    assert kvm_errno(region, vm, guest_memfd=gmem, **kwargs) == errno.EINVAL
    assert vm.memslots == []


def test_user_range_up_to_user_ptr_max(kv):
    vm = kv.VM()
    region(vm, uaddr=(1 << 47) - 4096 - 2 * MIB)
    region(vm, slot=1, gpa=GIB, uaddr=0, size=2 * MIB)


def test_address_spaces(kv):
    vm = kv.VM()
    region(vm, slot=(1 << 16) | 3, gpa=0)       # SMM address space: same GPA, no overlap
    region(vm, slot=3, gpa=0)
    assert [s.slot for s in vm.memslots] == [3, (1 << 16) | 3]
    assert kvm_errno(region, vm, slot=2 << 16) == errno.EINVAL
    private = kv.VM(VMType.SNP)
    assert kvm_errno(region, private, slot=1 << 16) == errno.EINVAL
    with pytest.raises(OverflowError):
        region(vm, slot=1 << 32)


def test_delete(kv):
    vm = kv.VM()
    assert kvm_errno(region, vm, slot=5, size=0) == errno.EINVAL
    region(vm, slot=5)
    region(vm, slot=5, size=0, uaddr=0)
    assert vm.memslots == []
    assert kvm_errno(region, vm, slot=5, size=0) == errno.EINVAL


def test_modify_rules(kv):
    vm = kv.VM()
    region(vm, slot=1, gpa=GIB, size=4 * MIB)
    gen = vm.memslots_generation()
    region(vm, slot=1, gpa=GIB, size=4 * MIB)                         # nothing changes
    assert vm.memslots_generation() == gen
    for bad in ({"uaddr": UADDR + 4096}, {"size": 2 * MIB}, {"flags": RO}):
        kwargs = {"gpa": GIB, "size": 4 * MIB, **bad}
        assert kvm_errno(region, vm, slot=1, **kwargs) == errno.EINVAL
    region(vm, slot=1, gpa=GIB, size=4 * MIB, flags=LOG)               # FLAGS_ONLY
    region(vm, slot=1, gpa=2 * GIB, size=4 * MIB)                      # MOVE (and flags)
    (moved,) = vm.memslots
    assert (moved.guest_phys_addr, moved.flags) == (2 * GIB, 0)


def test_guest_memfd_slots_are_immutable(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(4 * MIB)
    region(vm, slot=1, flags=GMEM, guest_memfd=gmem)
    assert kvm_errno(region, vm, slot=1, flags=GMEM, guest_memfd=gmem) == errno.EINVAL
    assert kvm_errno(region, vm, slot=1, gpa=GIB) == errno.EINVAL      # GUEST_MEMFD "changed"


def test_overlap_is_eexist_and_comes_before_the_binding(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    region(vm, slot=1, gpa=GIB, size=4 * MIB)
    for gpa, size in [(GIB, 4096), (GIB - 4096, 8192), (GIB + 4 * MIB - 4096, 4096),
                      (GIB - MIB, 8 * MIB)]:
        assert kvm_errno(region, vm, slot=2, gpa=gpa, size=size,
                         flags=GMEM, guest_memfd=None) == errno.EEXIST
    region(vm, slot=2, gpa=GIB + 4 * MIB, size=4096)                   # adjacent is fine
    assert kvm_errno(region, vm, slot=2, gpa=GIB + MIB, size=4096) == errno.EEXIST  # move onto 1


def test_guest_memfd_binding(kv):
    vm, other = kv.VM(VMType.SW_PROTECTED), kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(8 * MIB)
    bind = dict(flags=GMEM, size=4 * MIB)
    assert kvm_errno(region, vm, slot=1, guest_memfd=None, **bind) == errno.EBADF
    for not_mine in (other.create_guest_memfd(8 * MIB), other, vm, 3, "fd"):
        assert kvm_errno(region, vm, slot=1, guest_memfd=not_mine, **bind) == errno.EINVAL
    assert kvm_errno(region, vm, slot=1, guest_memfd=gmem, guest_memfd_offset=6 * MIB,
                     **bind) == errno.EINVAL                            # beyond the file
    region(vm, slot=1, gpa=0, guest_memfd=gmem, guest_memfd_offset=2 * MIB, **bind)
    for offset in (0, 4 * MIB - 4096):                                 # overlaps the binding
        assert kvm_errno(region, vm, slot=2, gpa=GIB, guest_memfd=gmem,
                         guest_memfd_offset=offset, **bind) == errno.EINVAL
    region(vm, slot=2, gpa=GIB, guest_memfd=gmem, guest_memfd_offset=6 * MIB,
           flags=GMEM, size=2 * MIB)
    region(vm, slot=1, size=0)                                         # delete releases it
    region(vm, slot=3, gpa=2 * GIB, guest_memfd=gmem, guest_memfd_offset=0, **bind)
    got = {s.slot: (s.guest_memfd_offset, s.guest_memfd is gmem) for s in vm.memslots}
    assert got == {2: (6 * MIB, True), 3: (0, True)}


def test_guest_memfd_flag_ignores_the_file_without_the_flag(kv):
    vm = kv.VM()
    region(vm, slot=1, guest_memfd="not a file", guest_memfd_offset=123)
    assert vm.memslots[0].guest_memfd is None


def test_max_gfn_and_tdx_alias(kv):
    vm = kv.VM()                              # host MAXPHYADDR 48: kvm_mmu_max_gfn() = 2**36 - 1
    region(vm, slot=1, gpa=(1 << 48) - 2 * MIB)
    assert kvm_errno(region, vm, slot=2, gpa=(1 << 48)) == errno.EINVAL
    assert kvm_errno(region, vm, slot=2, gpa=(1 << 48) - MIB) == errno.EEXIST
    td = kv.VM(VMType.TDX)
    region(td, slot=1, gpa=(1 << 47) - 4 * MIB)
    assert kvm_errno(region, td, slot=2, gpa=(1 << 47)) == errno.EINVAL
    assert kvm_errno(region, td, slot=3, gpa=(1 << 47) - MIB, size=2 * MIB) == errno.EINVAL
    td52 = kv.VM(VMType.TDX, gpaw=52)
    region(td52, slot=1, gpa=1 << 47)
    assert kvm_errno(region, td52, slot=2, gpa=1 << 51) == errno.EINVAL


def test_failed_move_is_undone_but_bumps_the_generation(kv):
    vm = kv.VM()
    region(vm, slot=1, gpa=GIB)
    gen = vm.memslots_generation()
    assert kvm_errno(region, vm, slot=1, gpa=1 << 48) == errno.EINVAL
    assert vm.memslots[0].guest_phys_addr == GIB
    assert vm.memslots_generation() == gen + 2 * 2     # invalidate swap + reactivate swap


def _mapped(vm, gpa):
    """Whether the TDP MMU holds a present leaf for ``gpa`` (bits 2:0 of an EPT entry,
    bit 0 of an NPT one)."""
    level, entry = vm.page_tables.walk(gpa)[-1]
    return bool(entry & (0x7 if vm.vendor == "vmx" else 0x1))


@pytest.mark.parametrize("vm_type, zap_all", [
    (VMType.DEFAULT, True), (VMType.SW_PROTECTED, False), (VMType.SEV, False)])
@pytest.mark.parametrize("change", ["delete", "move", "failed move"])
def test_slot_delete_or_move_zaps_every_mapping_on_default_vms(kv, vm_type, zap_all, change):
    """kvm_invalidate_memslot (kvm_main.c, 6.18) calls kvm_arch_flush_shadow_memslot after
    the INVALID swap and before the prepare step; that calls kvm_mmu_zap_all_fast when
    kvm_memslot_flush_zap_all() holds (mmu.c: a KVM_X86_DEFAULT_VM with
    KVM_X86_QUIRK_SLOT_ZAP_ALL, a default quirk) and kvm_mmu_zap_memslot otherwise.  So on
    a DEFAULT VM a page of *another* slot loses its SPTE, even when the MOVE then fails."""
    vm = kv.VM(vm_type)
    region(vm, slot=1, gpa=0)
    region(vm, slot=2, gpa=GIB, uaddr=UADDR + GIB)
    cpu = vm.create_vcpu()
    cpu.access(0x1000, write=True)
    cpu.access(GIB + 0x1000, write=True)
    assert _mapped(vm, 0x1000) and _mapped(vm, GIB + 0x1000)
    if change == "delete":
        region(vm, slot=2, gpa=GIB, size=0, uaddr=0)
    elif change == "move":
        region(vm, slot=2, gpa=2 * GIB, uaddr=UADDR + GIB)
    else:                                   # beyond kvm_mmu_max_gfn: EINVAL from prepare
        assert kvm_errno(region, vm, slot=2, gpa=1 << 48, uaddr=UADDR + GIB) == errno.EINVAL
    assert _mapped(vm, 0x1000) is not zap_all
    assert not _mapped(vm, GIB + 0x1000)     # the changed slot goes either way
    assert vm.check_invariants() == []


@pytest.mark.parametrize("vm_type, step", [(VMType.DEFAULT, 2), (VMType.SNP, 1)])
def test_memslot_generation(kv, vm_type, step):
    vm = kv.VM(vm_type)
    assert vm.memslots_generation(0) == 0
    if step == 2:
        assert vm.memslots_generation(1) == 1
    region(vm, slot=1)                                 # create: one swap
    assert vm.memslots_generation() == step
    region(vm, slot=1, flags=LOG)                      # flags only: one swap
    assert vm.memslots_generation() == 2 * step
    region(vm, slot=1, gpa=GIB, flags=LOG)             # move: two swaps
    assert vm.memslots_generation() == 4 * step
    region(vm, slot=1, size=0)                         # delete: two swaps
    assert vm.memslots_generation() == 6 * step


def test_find_memslot(kv):
    vm = kv.VM()
    region(vm, slot=7, gpa=GIB, size=4 * MIB)
    region(vm, slot=3, gpa=0, size=4096)
    region(vm, slot=9, gpa=4 * GIB, size=2 * MIB)
    expect = {0: 3, 1: None, 0x40000: 7, 0x403FF: 7, 0x40400: None, 0x100000: 9, 0x1001FF: 9,
              0x100200: None, 2**64 - 1: None}
    assert {gfn: vm.find_memslot(gfn) for gfn in expect} == expect


def test_rejected_calls_change_nothing(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    region(vm, slot=1, gpa=GIB)
    before = (vm.memslots, vm.memslots_generation(), vm.lpage_info(1, 2))
    for kwargs in ({"slot": 1, "gpa": GIB, "uaddr": 0}, {"slot": 2, "gpa": GIB},
                   {"slot": 2, "flags": GMEM, "guest_memfd": None}, {"slot": 2, "gpa": -1}):
        with pytest.raises((KvmError, OverflowError)):
            region(vm, **kwargs)
    assert (vm.memslots, vm.memslots_generation(), vm.lpage_info(1, 2)) == before


# --- lpage_info (x86.c kvm_alloc_memslot_metadata) -------------------------------------------------

@pytest.mark.parametrize("base_gfn, npages, ugfn, lpage_2m, lpage_1g", [
    (0x0, 0x400, 0x0, [0, 0], [1]),                    # 2M-aligned, 1G tail partial
    (0x100, 0x400, 0x100, [1, 0, 1], [1]),             # unaligned head and tail
    (0x40000, 0x40000, 0x40000, [0] * 512, [0]),       # a whole aligned 1G
    (0x40000, 0x40000, 0x40001, [1] * 512, [1]),       # host address incongruent at 4K
    (0x40000, 0x40000, 0x40200, [0] * 512, [1]),       # congruent for 2M only
    (0x1FF, 0x2, 0x1FF, [1, 1], [1]),                  # two pages straddling a 2M boundary
])
def test_lpage_info_edges_and_congruence(kv, base_gfn, npages, ugfn, lpage_2m, lpage_1g):
    vm = kv.VM()
    region(vm, slot=1, gpa=base_gfn << 12, size=npages << 12, uaddr=ugfn << 12)
    assert vm.lpage_info(1, 2) == lpage_2m
    assert vm.lpage_info(1, 3) == lpage_1g


def test_lpage_info_rejects(kv):
    vm = kv.VM()
    with pytest.raises(ValueError):
        vm.lpage_info(1, 2)
    region(vm, slot=1)
    for level in (1, 4):
        with pytest.raises(ValueError):
            vm.lpage_info(1, level)


def test_find_memslots_batch(kv):
    import numpy as np
    vm = kv.VM()
    region(vm, slot=7, gpa=GIB, size=4 * MIB)
    region(vm, slot=3, gpa=0, size=4096)
    gfns = np.array([0, 1, 0x40000, 0x403FF, 0x40400, 2**64 - 1], dtype=np.uint64)
    assert vm.find_memslots(gfns).tolist() == [3, -1, 7, 7, -1, -1]
    assert vm.find_memslots(np.empty(0, np.uint64)).tolist() == []
    with pytest.raises(TypeError):
        vm.find_memslots(5)
    with pytest.raises(TypeError):
        vm.find_memslots(gfns.astype(np.int64))


def test_many_memslots_stay_findable_through_changes(kv):
    """Hundreds of memslots created, moved, flag-changed and deleted in random order (the
    compiled core keeps them in chunks of 64 that split and empty): every gfn finds
    exactly the memslot a brute-force search over the current slots finds."""
    import random

    import numpy as np
    rng = random.Random(7)
    vm = kv.VM()
    where = {}                              # slot id -> base gfn (each 2 MiB, 512 pages)
    uaddr = {}
    flags = {}
    free_bases = list(range(0, 2000 * 512, 512))
    rng.shuffle(free_bases)
    for step in range(900):
        op = rng.random()
        if op < 0.6 or not where:
            slot = rng.randrange(1000)
            if slot in where:
                continue
            base = free_bases.pop()
            uaddr[slot] = (1 << 40) + (base << 12)
            region(vm, slot=slot, gpa=base << 12, size=2 * MIB, uaddr=uaddr[slot])
            where[slot] = base
        elif op < 0.8:
            slot = rng.choice(sorted(where))
            vm.set_user_memory_region(slot=slot, guest_phys_addr=0, memory_size=0,
                                      userspace_addr=0)
            free_bases.append(where.pop(slot))
            flags.pop(slot, None)
        elif op < 0.9:
            slot = rng.choice(sorted(where))
            base = free_bases.pop()
            vm.set_user_memory_region(slot=slot, guest_phys_addr=base << 12,
                                      memory_size=2 * MIB, userspace_addr=uaddr[slot],
                                      flags=flags.get(slot, 0))
            free_bases.append(where[slot])
            where[slot] = base
        else:
            slot = rng.choice(sorted(where))
            vm.set_user_memory_region(slot=slot, guest_phys_addr=where[slot] << 12,
                                      memory_size=2 * MIB,
                                      userspace_addr=uaddr[slot],
                                      flags=MemFlag.LOG_DIRTY_PAGES ^ flags.get(slot, 0))
            flags[slot] = MemFlag.LOG_DIRTY_PAGES ^ flags.get(slot, 0)
    gfns = np.array(sorted(rng.randrange(0, 2000 * 512) for _ in range(3000)), dtype=np.uint64)
    by_base = {base: slot for slot, base in where.items()}
    expect = [by_base.get(int(g) & ~511, -1) for g in gfns]
    assert vm.find_memslots(gfns).tolist() == expect
    assert [vm.find_memslot(int(g)) for g in gfns[:300]] == [
        None if e < 0 else e for e in expect[:300]]
    assert len(vm.memslots) == len(where) > 2 * 64        # several chunks, split and emptied
