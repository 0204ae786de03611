"""The KVM fault pipeline: handlers, faultin, hugepages, the TDP MMU map, VCPU.access.

Expected values come from docs/reference.md (§2 intake, §5 the fast path, §6
faultin, memory-fault exits and the noslot path, §8 hugepage rules, §9.3 the
target level, §10 SPTE masks and worked SPTE values) and from the kernel
selftests private_mem_kvm_exits and private_mem_conversions.
"""

import errno

import pytest

from kvmemu import (PT_BASE_HPA, ExitReason, KvmError, MemFlag, MemoryFaultExit, MmioExit,
                    RetPF, Translation, VMType)
from kvmemu.testing import writable

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
GMEM = MemFlag.GUEST_MEMFD
PRIVATE = 8
EPT_NONLEAF = 0x8000000000000907            # reference §10.3, A/D on, without the child address
NPT_NONLEAF = 0x827
ADDR = ((1 << 48) - 1) & ~0xFFF
FIXED, SPURIOUS, RETRY, EMULATE = RetPF.FIXED, RetPF.SPURIOUS, RetPF.RETRY, RetPF.EMULATE


def vm_with_slot(kv, vm_type=VMType.DEFAULT, gpa=0, size=GIB, uaddr=0x7F0000000000,
                 flags=0, gmem=False, host_level=1, slot=0, **vm_kwargs):
    vm = kv.VM(vm_type, **vm_kwargs)
    kwargs = {}
    if gmem:
        kwargs = {"guest_memfd": vm.create_guest_memfd(size), "flags": flags | GMEM}
    else:
        kwargs = {"flags": flags}
    vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                              userspace_addr=uaddr, host_level=host_level, **kwargs)
    return vm, vm.create_vcpu()


@pytest.fixture(autouse=True)
def invariants_hold_after_each_test(kv, request):
    """Every VM a test builds must satisfy VM.check_invariants() when the test ends."""
    made = []
    original = kv.VM.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    kv.VM.__init__ = tracking_init
    yield
    kv.VM.__init__ = original
    for vm in made:
        assert vm.check_invariants() == []


def leaf(tables, gpa):
    level, entry = tables.walk(gpa)[-1]
    return level, entry


# --- reference §10.2 worked SPTE values ----------------------------------------------------------

@pytest.mark.parametrize("vm_type, expected", [
    (VMType.DEFAULT, 0x86000000ABCDEB77),      # WB + IPAT
    (VMType.SW_PROTECTED, 0x86000000ABCDEB77),
    (VMType.TDX, 0x86000000ABCDEB37),          # WB without IPAT (quirk disabled for TDs)
])
def test_ept_4k_spte_worked_value(kv, vm_type, expected):
    gpa = 0xABCDE000
    vm, vcpu = vm_with_slot(kv, vm_type, gpa=gpa, size=4096, uaddr=gpa)
    shared = vm.shared_bit
    assert vcpu.access(gpa | shared, write=True) == Translation(gpa, 1)
    assert leaf(vm.page_tables, gpa | shared) == (1, expected)
    assert vm.stats["pf_fixed"] == 1 and vm.stats["pf_taken"] == 1


@pytest.mark.parametrize("vm_type", [VMType.SEV, VMType.SEV_ES, VMType.SNP])
def test_npt_4k_spte_worked_value(kv, vm_type):
    gpa = 0xABCDE000
    vm, vcpu = vm_with_slot(kv, vm_type, gpa=gpa, size=4096, uaddr=gpa)
    assert vcpu.access(gpa + 0x123) == Translation(gpa + 0x123, 1)
    assert leaf(vm.page_tables, gpa) == (1, 0xABCDEE67)


def test_nonleaf_sptes(kv):
    vm, vcpu = vm_with_slot(kv, gpa=0xABCDE000, size=4096, uaddr=0xABCDE000)
    vcpu.access(0xABCDE000)
    path = vm.page_tables.walk(0xABCDE000)
    assert [lvl for lvl, _ in path] == [4, 3, 2, 1]
    for _, entry in path[:-1]:
        assert entry & ~ADDR == EPT_NONLEAF
        assert (entry & ADDR) >= PT_BASE_HPA
    svm, svcpu = vm_with_slot(kv, VMType.SEV, gpa=0xABCDE000, size=4096, uaddr=0xABCDE000)
    svcpu.access(0xABCDE000)
    for _, entry in svm.page_tables.walk(0xABCDE000)[:-1]:
        assert entry & ~ADDR == NPT_NONLEAF


def test_npt_huge_leaves(kv):
    vm, vcpu = vm_with_slot(kv, VMType.SEV, gpa=0xABC00000, size=2 * MIB, uaddr=0xABC00000,
                            host_level=2)
    vcpu.access(0xABC12345)
    assert leaf(vm.page_tables, 0xABC12345) == (2, 0xABC00EE7)          # + PS (bit 7)
    nx, nx_vcpu = vm_with_slot(kv, VMType.SEV, gpa=0xABC00000, size=2 * MIB, uaddr=0xABC00000,
                               host_level=2, nx_huge_pages=True)
    nx_vcpu.access(0xABC12345)
    assert leaf(nx.page_tables, 0xABC12345) == (2, 0x80000000ABC00EE7)  # huge leaves are NX


# --- hugepage adjust (reference §8) --------------------------------------------------------------

@pytest.mark.parametrize("host_level, uaddr, flags, level", [
    (3, 0x7F0000000000, 0, 3),                   # 1G host mapping, congruent, aligned slot
    (2, 0x7F0000000000, 0, 2),                   # host maps 2M
    (1, 0x7F0000000000, 0, 1),
    (3, 0x7F0000200000, 0, 2),                   # congruent for 2M only
    (3, 0x7F0000001000, 0, 1),                   # incongruent at every size
    (3, 0x7F0000000000, MemFlag.LOG_DIRTY_PAGES, 1),
])
def test_mapping_level(kv, host_level, uaddr, flags, level):
    vm, vcpu = vm_with_slot(kv, gpa=GIB, size=GIB, uaddr=uaddr, flags=flags,
                            host_level=host_level)
    gpa = GIB + 0x12345678
    result = vcpu.access(gpa)
    assert result == Translation(uaddr + 0x12345678, level)
    assert leaf(vm.page_tables, gpa)[0] == level
    assert vm.stats[{1: "pages_4k", 2: "pages_2m", 3: "pages_1g"}[level]] == 1


def test_slot_edges_limit_the_level(kv):
    vm, vcpu = vm_with_slot(kv, gpa=GIB + 4096, size=GIB - 4096, uaddr=0x7F0000001000,
                            host_level=3)
    assert vcpu.access(GIB + 4096).level == 1          # head 2M page is partial
    assert vcpu.access(GIB + 2 * MIB).level == 2       # 1G is partial: 2M is the most


def test_nx_huge_page_workaround(kv):
    vm, vcpu = vm_with_slot(kv, gpa=GIB, size=GIB, uaddr=0x7F0000000000, host_level=3,
                            nx_huge_pages=True)
    assert vcpu.access(GIB + 0x5000) == Translation(0x7F0000005000, 3)
    level, spte = leaf(vm.page_tables, GIB)
    assert level == 3 and not spte & 0x4                  # huge leaves are not executable
    # A fetch faults (present, not executable), is mapped 4K: the 1G leaf is split.
    assert vcpu.access(GIB + 0x5000, fetch=True) == Translation(0x7F0000005000, 1)
    level, spte = leaf(vm.page_tables, GIB + 0x5000)
    assert level == 1 and spte & 0x4
    assert leaf(vm.page_tables, GIB + 0x200000)[0] == 2  # split into 2M, still not X
    assert not leaf(vm.page_tables, GIB + 0x200000)[1] & 0x4


def test_a_new_table_is_marked_nx_huge_page_disallowed_before_it_is_linked(monkeypatch):
    """tdp_mmu_map (tdp_mmu.c, 6.18) sets sp->nx_huge_page_disallowed before
    tdp_mmu_link_sp or tdp_mmu_split_huge_page makes the table visible: a fault of
    another vCPU that meets it (disallowed_hugepage_adjust) reads the flag at once.
    Watched in the twin, whose compare-and-exchange can be wrapped: at each link of the
    fetch's tables (PDPT, PD, PT, the NX workaround), then of the split of a 2M leaf, the
    new table is already marked."""
    from kvmemu import _select
    from kvmemu._pure import spte, tdp_mmu
    at_link = []
    original = tdp_mmu.TdpMmu.set_spte_atomic

    def watching(self, root, table, index, level, old, new, gfn, aug):
        if spte.is_shadow_present_pte(new) and not spte.is_last_spte(new, level):
            at_link.append((level, root.nx_huge_page_disallowed(root.child(new))))
        return original(self, root, table, index, level, old, new, gfn, aug)
    monkeypatch.setattr(tdp_mmu.TdpMmu, "set_spte_atomic", watching)
    core = _select.load("python")
    vm, vcpu = vm_with_slot(core, gpa=GIB, size=GIB, host_level=2, nx_huge_pages=True)
    assert vcpu.access(GIB + 0x5000, fetch=True).level == 1
    assert at_link == [(4, True), (3, True), (2, True)]
    at_link.clear()
    assert vcpu.access(GIB + 0x200000).level == 2          # a read: a 2M leaf
    assert vcpu.access(GIB + 0x201000, fetch=True).level == 1  # split under the NX rule
    assert at_link == [(2, True)]


def test_no_nx_workaround_maps_fetches_huge(kv):
    vm, vcpu = vm_with_slot(kv, gpa=GIB, size=GIB, uaddr=0x7F0000000000, host_level=2)
    assert vcpu.access(GIB, fetch=True).level == 2
    assert leaf(vm.page_tables, GIB)[1] & 0x4


# --- the fast path, spurious faults and return values (reference §5, §9.3) -----------------------

def test_handler_return_values(kv):
    vm, vcpu = vm_with_slot(kv, gpa=0, size=2 * MIB)
    assert vcpu.handle_ept_violation(0x3000, 0x181) == FIXED         # first touch
    assert vcpu.handle_ept_violation(0x3000, 0x181) == SPURIOUS      # slow path, already mapped
    assert vcpu.handle_ept_violation(0x3000, 0x18A) == SPURIOUS      # present write: fast path
    stats = vcpu.stats
    assert (stats["pf_taken"], stats["pf_fixed"], stats["pf_spurious"], stats["pf_fast"]) == (
        3, 1, 2, 1)


def test_read_only_memslot(kv):
    vm, vcpu = vm_with_slot(kv, gpa=GIB, size=2 * MIB, uaddr=0x7F0000000000,
                            flags=MemFlag.READONLY)
    assert vcpu.access(GIB + 0x1000) == Translation(0x7F0000001000, 1)
    level, spte = leaf(vm.page_tables, GIB + 0x1000)
    assert spte & 0x2 == 0 and spte & (1 << 57) == 0 and spte & 0x200 == 0   # no W, host-W, D
    assert vcpu.access(GIB + 0x1000, write=True) == MmioExit(GIB + 0x1000, True)
    assert vcpu.run.exit_reason == ExitReason.MMIO
    assert vcpu.stats["pf_emulate"] == 1


# --- MMIO (reference §3, §6, §10.4) --------------------------------------------------------------

def test_ept_mmio_spte_and_cache(kv):
    vm, vcpu = vm_with_slot(kv, gpa=0, size=GIB)
    gen = vm.memslots_generation()
    assert gen == 2                                          # one swap, two address spaces
    assert vcpu.access(0xC0000000) == MmioExit(0xC0000000, False)
    # W|X (0x6): a misconfiguration; SVE clear; the generation's low bits at 10:3.
    assert vm.page_tables.get_entry(0xC0000000, 1) == 0xC0000000 | (gen << 3) | 0x6
    assert vcpu.stats == {"pf_taken": 1, "pf_fixed": 0, "pf_emulate": 1, "pf_spurious": 0,
                          "pf_mmio_spte_created": 1, "pf_fast": 0}
    assert vcpu.access(0xC0000000, write=True) == MmioExit(0xC0000000, True)   # cache hit
    assert vcpu.handle_ept_misconfig(0xC0000000) == EMULATE
    assert vcpu.stats["pf_taken"] == 1                       # the MMIO path is not a fault
    vcpu.access(0xC0001000)                                  # another gfn: cache moves on
    assert vcpu.handle_ept_misconfig(0xC0000000) == EMULATE  # SPTE generation matches
    assert vcpu.stats["pf_taken"] == 2
    vm.set_user_memory_region(slot=1, guest_phys_addr=2 * GIB, memory_size=4096,
                              userspace_addr=0x7F0040000000)   # the generation moves on
    assert vcpu.handle_ept_misconfig(0xC0000000) == EMULATE  # stale SPTE: a real fault
    assert vcpu.stats["pf_taken"] == 3 and vcpu.stats["pf_mmio_spte_created"] == 3
    assert vm.page_tables.get_entry(0xC0000000, 1) == 0xC0000000 | (4 << 3) | 0x6


@pytest.mark.parametrize("vm_type, mask", [
    # kvm_mmu_reset_all_pte_masks: MAXPHYADDR 48 < 52, so bit 51 | P.
    (VMType.DEFAULT, (1 << 51) | 1),
    # svm_adjust_mmio_mask on a host with SYSCFG memory encryption (SEV VMs need it): the
    # reserved bits from the reduced width 48 - 5 = 43 to 51, plus P.
    (VMType.SEV, 0x000FF80000000001)])
def test_npt_mmio_spte_uses_reserved_bits(kv, vm_type, mask):
    vm = kv.VM(vm_type, vendor="svm")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0x7F0000000)
    vcpu = vm.create_vcpu()
    assert vcpu.access(0xC0000000) == MmioExit(0xC0000000, False)
    assert vm.page_tables.get_entry(0xC0000000, 1) == mask | 0xC0000000 | (2 << 3) | 0x6
    exit_ = vm.page_tables.translate(0xC0000000)
    assert exit_.exit_info_1 == 0x10000000D                     # P|US|RSVD|GUEST_FINAL
    assert vcpu.handle_npf(0xC0000000, exit_.exit_info_1) == EMULATE


def test_tdx_mmio_spte_value_is_zero(kv):
    vm, vcpu = vm_with_slot(kv, VMType.TDX, gpa=0, size=GIB)
    shared = 0xC0000000 | vm.shared_bit
    assert vcpu.access(shared) == MmioExit(0xC0000000, False)   # shared bit stripped
    assert vm.page_tables.get_entry(shared, 1) == 0xC0000000 | (1 << 3)   # RWX 0, SVE clear
    assert vcpu.access(shared) == MmioExit(0xC0000000, False)   # #VE territory: each time
    assert vcpu.handle_ept_misconfig(shared) == -errno.EIO


# --- private memory: the selftests and the private/shared decision -------------------------------

def test_private_access_memslot_not_private(kv):
    """private_mem_kvm_exits: attribute private, memslot without guest_memfd."""
    vm, vcpu = vm_with_slot(kv, VMType.SW_PROTECTED, gpa=0xC0000000, size=4096, slot=10)
    vm.set_memory_attributes(0xC0000000, 4096, PRIVATE)
    assert vcpu.access(0xC0000000) == MemoryFaultExit(8, 0xC0000000, 0x1000)
    assert vcpu.run.exit_reason == ExitReason.MEMORY_FAULT == 39
    assert vcpu.run.memory_fault == (8, 0xC0000000, 0x1000)


def test_private_access_memslot_deleted(kv):
    """private_mem_kvm_exits: guest_memfd slot, private, the slot deleted under the vCPU."""
    vm, vcpu = vm_with_slot(kv, VMType.SW_PROTECTED, gpa=0xC0000000, size=4096, slot=10,
                            gmem=True)
    vm.set_memory_attributes(0xC0000000, 4096, PRIVATE)
    assert isinstance(vcpu.access(0xC0000000), Translation)
    vm.set_user_memory_region(slot=10, guest_phys_addr=0xC0000000, memory_size=0,
                              userspace_addr=0)
    assert vm.page_tables.walk(0xC0000000)[-1][1] == 1 << 63     # zapped with the slot
    assert vcpu.access(0xC0000000) == MemoryFaultExit(8, 0xC0000000, 0x1000)


def test_deleted_shared_slot_reads_as_mmio(kv):
    vm, vcpu = vm_with_slot(kv, gpa=0xC0000000, size=4096)
    vcpu.access(0xC0000000)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0xC0000000, memory_size=0,
                              userspace_addr=0)
    assert vcpu.access(0xC0000000) == MmioExit(0xC0000000, False)


def test_conversions_map_the_right_frames(kv):
    """private_mem_conversions: shared ↔ private, each conversion zaps the other kind."""
    base = 4 * GIB
    vm, vcpu = vm_with_slot(kv, VMType.SW_PROTECTED, gpa=base, size=2 * MIB + 4096,
                            uaddr=0x7F0000000000, gmem=True, host_level=2)
    gmem = vm.memslots[0].guest_memfd
    shared_hpa = 0x7F0000000000 + 0x1000
    assert vcpu.access(base + 0x1000, write=True) == Translation(shared_hpa, 2)
    vm.set_memory_attributes(base + 0x1000, 4096, PRIVATE)
    assert vm.page_tables.walk(base + 0x1000)[-1][1] == 1 << 63   # the shared 2M leaf zapped
    assert vcpu.access(base + 0x1000, write=True) == Translation(gmem.pfn(1) << 12, 1)
    assert vcpu.access(base) == Translation(0x7F0000000000, 1)     # mixed 2M page: 4K now
    vm.set_memory_attributes(base + 0x1000, 4096, 0)
    assert vm.page_tables.get_entry(base + 0x1000, 1) == 1 << 63  # the private leaf zapped
    assert vm.page_tables.get_entry(base, 1) & 0x800               # the shared leaf stays
    # Uniform again: the fault's goal is 2M, where a table now stands; the table is
    # replaced by a huge leaf, not a spurious fault (reference §9.3, step 1: only a leaf
    # at the target level can be spurious).
    assert vcpu.access(base + 0x1000) == Translation(shared_hpa, 2)
    assert leaf(vm.page_tables, base)[0] == 2


def test_sw_protected_private_synthesis_is_skipped_for_rsvd(kv):
    vm, vcpu = vm_with_slot(kv, VMType.SW_PROTECTED, gpa=0, size=2 * MIB)
    vm.set_memory_attributes(0xC0000000, 4096, PRIVATE)       # no memslot there
    assert vcpu.access(0xC0000000) == MemoryFaultExit(8, 0xC0000000, 4096)
    assert vcpu.handle_ept_misconfig(0xC0000000) == RETRY     # RSVD: no synthesis, no SPTE


def test_snp_enc_is_the_private_signal(kv):
    vm, vcpu = vm_with_slot(kv, VMType.SNP, gpa=0, size=2 * MIB, gmem=True)
    gmem = vm.memslots[0].guest_memfd
    assert vcpu.handle_npf(0x5000, 0x500000004) == -errno.EFAULT     # ENC, attribute shared
    assert vcpu.run.memory_fault == (8, 0x5000, 4096)
    assert vcpu.handle_npf(0x6000, 0x100000004) == FIXED             # shared, gmem slot
    vm.set_memory_attributes(0x5000, 4096, PRIVATE)
    assert vcpu.access(0x5000, encrypted=True) == Translation(gmem.pfn(5) << 12, 1)
    sev, sev_vcpu = vm_with_slot(kv, VMType.SEV, gpa=0, size=2 * MIB)
    assert sev_vcpu.handle_npf(0x5000, 0x500000004) == FIXED          # ENC means nothing


def test_private_emulation_is_a_memory_fault(kv):
    """RET_PF_EMULATE on a private fault becomes KVM_EXIT_MEMORY_FAULT (reference §4)."""
    vm, vcpu = vm_with_slot(kv, VMType.SNP, gpa=0, size=2 * MIB, gmem=True)
    vm.set_memory_attributes(0x8000000, 4096, PRIVATE)          # no memslot: noslot + private
    assert vcpu.handle_npf(0x8000000, 0x500000004) == -errno.EFAULT
    assert vcpu.run.memory_fault == (8, 0x8000000, 4096)


# --- TDX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpaw, levels", [(48, 4), (52, 5)])
def test_tdx_private_and_shared_roots(kv, gpaw, levels):
    vm, vcpu = vm_with_slot(kv, VMType.TDX, gpa=0, size=2 * MIB, gmem=True, gpaw=gpaw)
    gmem = vm.memslots[0].guest_memfd
    shared = vm.shared_bit
    assert vm.page_tables.levels == vm.private_page_tables.levels == levels
    vm.set_memory_attributes(0x1000, 4096, PRIVATE)
    # A private fault is handled as a write whatever the qualification says.
    assert vcpu.handle_ept_violation(0x1000, 0x181) == FIXED
    level, spte = leaf(vm.private_page_tables, 0x1000)
    assert (level, spte) == (1, 0x8600000000000B37 | (gmem.pfn(1) << 12))
    assert vcpu.access(0x1000) == Translation(gmem.pfn(1) << 12, 1)
    assert vm.page_tables.walk(0x1000) == [(levels, 1 << 63)]        # nothing shared
    # Shared: the direct root is indexed with the shared bit.
    assert vcpu.access(0x2000 | shared, write=True) == Translation(0x7F0000002000, 1)
    level, spte = leaf(vm.page_tables, 0x2000 | shared)
    assert level == 1 and spte & 0xFFF == 0xB37
    top_index = 256 if levels == 4 else 8      # GPA bit 47 / 51 in the root's index
    assert int(vm.page_tables.tables[0][top_index]) & ~ADDR == EPT_NONLEAF
    assert vm.page_tables.tables[0][0] == 1 << 63
    # The same gfn accessed through the other alias: a mismatch, a memory-fault exit
    # with the shared bit stripped.
    assert vcpu.access(0x1000 | shared) == MemoryFaultExit(0, 0x1000, 4096)
    assert vcpu.access(0x2000) == MemoryFaultExit(8, 0x2000, 4096)


def test_tdx_shared_fetch_is_a_kvm_bug(kv):
    vm, vcpu = vm_with_slot(kv, VMType.TDX, gpa=0, size=2 * MIB)
    assert vcpu.handle_ept_violation(0x1000 | vm.shared_bit, 0x184) == -errno.EIO
    with pytest.raises(KvmError) as info:
        vcpu.access(0x1000 | vm.shared_bit, fetch=True)
    assert info.value.errno == errno.EIO


def test_tdx_conversion_zaps_only_the_other_root(kv):
    vm, vcpu = vm_with_slot(kv, VMType.TDX, gpa=0, size=2 * MIB, gmem=True)
    shared = vm.shared_bit
    vm.set_memory_attributes(0x1000, 4096, PRIVATE)
    vcpu.access(0x1000)
    vcpu.access(0x2000 | shared)
    vm.set_memory_attributes(0x3000, 4096, PRIVATE)        # shared → private for 0x3000 only
    assert leaf(vm.private_page_tables, 0x1000)[1] & 0x800
    assert leaf(vm.page_tables, 0x2000 | shared)[1] & 0x800
    vm.set_memory_attributes(0x1000, 4096, 0)              # private → shared: mirror zapped
    assert leaf(vm.private_page_tables, 0x1000)[1] == 1 << 63
    assert leaf(vm.page_tables, 0x2000 | shared)[1] & 0x800


# --- stage hooks: the race between the private decision and faultin ------------------------------

def snp_private_vm(kv):
    vm, vcpu = vm_with_slot(kv, VMType.SNP, gpa=0, size=2 * MIB, gmem=True)
    vm.set_memory_attributes(0x5000, 4096, PRIVATE)
    return vm, vcpu


def once(vm, stage, address, attributes):
    done = []

    def hook(at):
        if at == stage and not done:
            done.append(at)
            vm.set_memory_attributes(address, 4096, attributes)
    return hook


def test_attributes_change_after_the_decision_gives_a_memory_fault(kv):
    vm, vcpu = snp_private_vm(kv)
    vcpu.stage_hook = once(vm, "fault", 0x5000, 0)
    assert vcpu.handle_npf(0x5000, 0x500000004) == -errno.EFAULT   # a spurious exit
    assert vcpu.run.memory_fault == (8, 0x5000, 4096)


@pytest.mark.parametrize("stage", ["faultin", "map"])
def test_attributes_change_during_faultin_retries(kv, stage):
    vm, vcpu = snp_private_vm(kv)
    vcpu.stage_hook = once(vm, stage, 0x7000, PRIVATE)       # any change moves the sequence
    assert vcpu.handle_npf(0x5000, 0x500000004) == RETRY
    assert vm.page_tables.walk(0x5000)[-1][1] in (0, 1 << 63)
    vcpu.stage_hook = None
    assert vcpu.handle_npf(0x5000, 0x500000004) == FIXED


@pytest.mark.parametrize("stage", ["faultin", "map"])
@pytest.mark.parametrize("new_gpa", [None, 2 << 20])          # delete, or move up by 2M
def test_memslot_deleted_or_moved_during_a_fault_retries(kv, stage, new_gpa):
    """Found by the fuzzer: a DELETE or MOVE of the fault's memslot in the stage hook left
    a 2M leaf outside every memslot, and a fault below the moved slot's new base read
    lpage_info[-1] (outside the array in the compiled core).  In KVM the change waits for
    the fault's SRCU section and its flush zaps what the fault mapped: the fault retries."""
    vm = kv.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20,
                              userspace_addr=1 << 40, host_level=3)
    vcpu = vm.create_vcpu()
    done = []

    def hook(at):
        if at == stage and not done:
            done.append(at)
            if new_gpa is None:
                vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0,
                                          userspace_addr=0)
            else:
                vm.set_user_memory_region(slot=0, guest_phys_addr=new_gpa,
                                          memory_size=4 << 20, userspace_addr=1 << 40,
                                          host_level=3)
    vcpu.stage_hook = hook
    assert vcpu.handle_ept_violation(0x1FF010, 0x184) == RETRY
    assert vm.stats["pages_2m"] == vm.stats["pages_4k"] == 0
    assert vm.check_invariants() == []
    assert vcpu.access(0x1FF010, fetch=True) == MmioExit(0x1FF010, False)
    if new_gpa is not None:                 # gfn 0x300 is in the moved slot: its new frame
        assert vcpu.access(0x300010) == Translation((1 << 40) + 0x100010, 2)
    assert vm.check_invariants() == []


def never_settling(vm):
    """A stage hook that changes some attribute at every "map": every fault goes stale."""
    flip = iter(range(10**6))

    def always(at):
        if at == "map":
            vm.set_memory_attributes(0x100000, 4096, 0 if next(flip) % 2 else PRIVATE)
    return always


def test_a_loop_that_never_settles_raises(kv):
    vm, vcpu = snp_private_vm(kv)
    vcpu.stage_hook = never_settling(vm)
    with pytest.raises(RuntimeError, match="0x5000"):
        vcpu.access(0x5000, encrypted=True)


# --- boundaries ----------------------------------------------------------------------------------

def test_wrong_vendor_handlers(kv):
    _, vmx = vm_with_slot(kv)
    _, svm = vm_with_slot(kv, VMType.SNP)
    with pytest.raises(ValueError):
        vmx.handle_npf(0, 0)
    with pytest.raises(ValueError):
        svm.handle_ept_violation(0, 0)
    with pytest.raises(ValueError):
        svm.handle_ept_misconfig(0)


@pytest.mark.parametrize("call, exc", [
    (lambda v: v.access(-1), OverflowError),
    (lambda v: v.access(1 << 48), ValueError),
    (lambda v: v.access(0, stage="bogus"), ValueError),
    (lambda v: v.access(0, stage="walk", fetch=True), ValueError),
    (lambda v: v.access("0"), TypeError),
    (lambda v: v.handle_ept_violation(0, 1 << 64), OverflowError),
    (lambda v: v.handle_ept_misconfig(None), TypeError),
])
def test_access_rejects_bad_arguments(kv, call, exc):
    vm, vcpu = vm_with_slot(kv, size=2 * MIB)
    before = vcpu.stats
    with pytest.raises(exc):
        call(vcpu)
    assert vcpu.stats == before and vm.page_tables.walk(0) == [(4, 1 << 63)]


def test_stage_hook_must_be_callable(kv):
    _, vcpu = vm_with_slot(kv, size=2 * MIB)
    with pytest.raises(TypeError):
        vcpu.stage_hook = 5


def test_exit_objects_read_well(kv):
    vm, vcpu = vm_with_slot(kv, VMType.SW_PROTECTED, gpa=0xC0000000, size=4096)
    mmio = vcpu.access(0xD0000000, write=True)
    assert mmio.exit_reason == ExitReason.MMIO and mmio.is_write is True
    assert repr(mmio) == "MmioExit(gpa=0xd0000000, is_write=True)"
    vm.set_memory_attributes(0xC0000000, 4096, PRIVATE)
    fault = vcpu.access(0xC0000000)
    assert fault.exit_reason == ExitReason.MEMORY_FAULT
    assert repr(fault) == "MemoryFaultExit(flags=0x8, gpa=0xc0000000, size=0x1000)"
    assert repr(vcpu.access(0xC0000000 - 4096 * 0 + 0)) == repr(fault)


def test_check_invariants_reports_a_bad_leaf(kv):
    vm, vcpu = vm_with_slot(kv, size=MIB)
    vcpu.access(0x1000)
    good = vm.page_tables.get_entry(0x1000, 1)
    with writable(vm.page_tables) as tables:
        tables.set_entry(0x1000, 1, good + (1 << 12))                   # wrong frame
        tables.set_entry(0x100000, 1, good)                             # outside the slot
    problems = vm.check_invariants()
    assert any("maps frame" in p for p in problems)
    assert any("outside every memslot" in p for p in problems)
    assert any("leaf counts" in p for p in problems)
    with writable(vm.page_tables) as tables:
        tables.set_entry(0x1000, 1, good)
        tables.set_entry(0x100000, 1, 1 << 63)
    assert vm.check_invariants() == []


from hypothesis import given, settings, strategies as st  # noqa: E402

OPS = st.lists(st.tuples(st.sampled_from(["read", "write", "fetch", "enc", "private", "shared",
                                          "delete", "create", "dirty"]),
                         st.integers(0, 1023)), max_size=25)


@settings(deadline=None)
@given(vm_type=st.sampled_from([VMType.DEFAULT, VMType.SW_PROTECTED, VMType.SNP, VMType.TDX]),
       nx=st.booleans(), host_level=st.integers(1, 3), ops=OPS)
def test_random_operations_keep_the_invariants(kv, vm_type, nx, host_level, ops):
    vm = kv.VM(vm_type, nx_huge_pages=nx)
    gmem = vm.create_guest_memfd(8 * MIB)
    region = dict(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                  userspace_addr=0x7F0000000000, host_level=host_level)
    vm.set_user_memory_region(flags=GMEM, guest_memfd=gmem, **region)
    vcpu = vm.create_vcpu()
    shared = vm.shared_bit
    for op, page in ops:
        gpa = page << 12
        if op in ("read", "write", "fetch", "enc"):
            alias = gpa if vm.get_memory_attributes(page) or not shared else gpa | shared
            if vm_type == VMType.TDX and op == "fetch":
                continue
            try:
                result = vcpu.access(alias, write=op == "write", fetch=op == "fetch",
                                     encrypted=op == "enc")
            except KvmError as exc:
                # An encrypted access that meets an NPT MMIO SPTE: RSVD with PRIVATE is a
                # WARN and -EFAULT in kvm_mmu_page_fault, without a memory-fault exit.
                assert exc.errno == errno.EFAULT and op == "enc"
                continue
            assert isinstance(result, (Translation, MmioExit, MemoryFaultExit))
        elif op in ("private", "shared") and vm.has_private_mem:
            vm.set_memory_attributes(gpa & ~0x1FFFFF if page % 3 == 0 else gpa,
                                     2 * MIB if page % 3 == 0 else 4096,
                                     PRIVATE if op == "private" else 0)
        elif op == "delete" and vm.memslots:
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0,
                                      userspace_addr=0)
        elif op == "create" and not vm.memslots:
            vm.set_user_memory_region(flags=GMEM, guest_memfd=gmem, **region)
        elif op == "dirty" and not vm.memslots:
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                                      userspace_addr=0x7F0000000000,
                                      flags=MemFlag.LOG_DIRTY_PAGES, host_level=host_level)
        assert vm.check_invariants() == [], (op, page)


def test_a_batch_that_never_settles_raises(kv):
    """access_many reports an access that does not settle the way access does (found by
    the fuzzer: the compiled core returned count 0 and no exit instead)."""
    import numpy as np
    vm, vcpu = snp_private_vm(kv)
    vcpu.stage_hook = never_settling(vm)
    with pytest.raises(RuntimeError, match="0x5000"):
        vcpu.access_many(np.array([0x5000], dtype=np.uint64), 8)


def test_an_mmio_exit_carries_kvm_run_mmio_len_and_data(kv):
    """KVM_EXIT_MMIO fills kvm_run.mmio: phys_addr, data[8] (a write's bytes, in the
    guest's byte order: little-endian), len, is_write (include/uapi/linux/kvm.h)."""
    vm = kv.VM(VMType.DEFAULT)
    vcpu = vm.create_vcpu()
    write = vcpu.access(0xFEE00030, write=True, size=4, data=0x11223344)
    assert write == kv.MmioExit(0xFEE00030, True, 4, bytes([0x44, 0x33, 0x22, 0x11]))
    assert (write.len, write.data) == (4, b"\x44\x33\x22\x11")
    assert vcpu.access(0xFEE00030, size=8) == kv.MmioExit(0xFEE00030, False, 8, b"")
    assert vcpu.access(0xFEE00030, write=True, size=2, data=b"\xAB\xCD").data == b"\xAB\xCD"
    bare = vcpu.access(0xFEE00030)
    assert bare == kv.MmioExit(0xFEE00030, False) and (bare.len, bare.data) == (0, b"")
    for kwargs, exc in [({"size": 3}, ValueError), ({"data": 1}, ValueError),
                        ({"size": 4, "data": 1}, ValueError),          # data on a read
                        ({"write": True, "size": 4}, ValueError),       # a write without data
                        ({"write": True, "size": 1, "data": 256}, OverflowError),
                        ({"write": True, "size": 2, "data": b"x"}, ValueError),
                        ({"write": True, "size": 2, "data": 1.0}, TypeError)]:
        with pytest.raises(exc):
            vcpu.access(0xFEE00030, **kwargs)
    with pytest.raises(ValueError):
        kv.MmioExit(0x1000, False, 4, b"\0\0\0\0")     # a read carries no data
