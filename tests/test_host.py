"""The host as a parameter: what each Host field changes in Linux 6.18 KVM.

Sources: kvm_get_host_maxphyaddr and kvm_mmu_max_gfn (spte.c, mmu.h);
kvm_arch_prepare_memory_region (x86.c: a memslot's last gfn at most kvm_mmu_max_gfn);
kvm_handle_noslot_fault (mmu.c: no MMIO SPTE without MMIO caching or beyond the max gfn);
kvm_mmu_reset_all_pte_masks, kvm_mmu_set_mmio_spte_mask, kvm_mmu_set_ept_masks
(spte.c); svm_adjust_mmio_mask, get_npt_level (svm.c); early_detect_mem_encrypt (amd.c);
TASK_SIZE_MAX / USER_PTR_MAX (page_64_types.h, common.c); make_spte, make_nonleaf_spte,
mark_spte_for_access_track, restore_acc_track_spte (spte.c / spte.h); fast_page_fault
and page_fault_can_be_fast (mmu.c); vmx_hardware_setup (vmx.c: PML needs EPT A/D);
sev_hardware_setup (sev.c), tdx_bringup (tdx.c).
"""

import errno

import pytest

from kvmemu import Host, KvmError, MemFlag, MmioExit, Translation, VMType

GIB = 1 << 30
NONPRESENT = 0x8000000000000000
AD_DISABLED = 1 << 52


def test_host_is_a_value():
    host = Host(maxphyaddr=46, la57=True)
    assert host == Host(maxphyaddr=46, la57=True) and hash(host) == hash(Host(maxphyaddr=46,
                                                                             la57=True))
    assert host != Host()
    assert repr(Host()) == ("Host(maxphyaddr=48, la57=False, ept_ad_bits=True, "
                            "mem_encrypt=None, pml=None)")
    with pytest.raises(AttributeError):
        host.la57 = False
    for bad in (35, 53):
        with pytest.raises(ValueError):
            Host(maxphyaddr=bad)
    with pytest.raises(TypeError):
        Host(maxphyaddr="48")
    with pytest.raises(TypeError):
        Host(la57="yes")


def test_vm_reads_its_host_back(kv):
    host = Host(maxphyaddr=52)
    assert kv.VM(host=host).host is host
    assert kv.VM().host == Host()
    with pytest.raises(TypeError):
        kv.VM(host=48)


@pytest.mark.parametrize("vm_type, vendor, host", [
    (VMType.SEV, None, Host(mem_encrypt=False)),        # X86_FEATURE_SEV cleared
    (VMType.SNP, None, Host(mem_encrypt=False)),
    (VMType.DEFAULT, "vmx", Host(mem_encrypt=True)),     # SYSCFG is AMD's
    (VMType.TDX, None, Host(ept_ad_bits=False)),        # tdx_bringup
    (VMType.SEV, None, Host(maxphyaddr=40)),            # 40 - 5 bits is too narrow here
])
def test_vms_the_host_cannot_run(kv, vm_type, vendor, host):
    with pytest.raises(ValueError):
        kv.VM(vm_type, vendor=vendor, host=host)


def test_max_gfn_follows_maxphyaddr(kv):
    """kvm_mmu_max_gfn() = 2**(maxphyaddr - 12) - 1: the last gfn of a memslot, and the last
    gfn that gets an MMIO SPTE."""
    vm = kv.VM(host=Host(maxphyaddr=40))
    vm.set_user_memory_region(slot=0, guest_phys_addr=(1 << 40) - 0x1000, memory_size=0x1000,
                              userspace_addr=0x1000000)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 40, memory_size=0x1000,
                                  userspace_addr=0x1000000)
    assert info.value.errno == errno.EINVAL
    vcpu = vm.create_vcpu()
    assert vcpu.access(1 << 40) == MmioExit(1 << 40, False)
    assert vcpu.stats["pf_mmio_spte_created"] == 0
    assert vcpu.access((1 << 40) - 0x2000) == MmioExit((1 << 40) - 0x2000, False)
    assert vcpu.stats["pf_mmio_spte_created"] == 1


def test_a_52_bit_amd_host_has_no_mmio_caching(kv):
    """kvm_mmu_reset_all_pte_masks gives NPT no MMIO mask at MAXPHYADDR 52, so
    kvm_mmu_set_mmio_spte_mask turns MMIO caching off: an MMIO access installs nothing
    and faults again every time.  EPT's W|X misconfiguration needs no reserved bit."""
    vm = kv.VM(vendor="svm", host=Host(maxphyaddr=52))
    vcpu = vm.create_vcpu()
    for taken in (1, 2):
        assert vcpu.access(0x5000) == MmioExit(0x5000, False)
        assert vcpu.stats["pf_taken"] == taken and vcpu.stats["pf_emulate"] == taken
    assert vcpu.stats["pf_mmio_spte_created"] == 0
    assert vm.page_tables.get_entry(0x5000, 4) == NONPRESENT       # not even a table
    ept = kv.VM(host=Host(maxphyaddr=52))
    ept.create_vcpu().access(0x5000)
    assert ept.page_tables.get_entry(0x5000, 1) == 0x5000 | 0x6     # generation 0, W|X


@pytest.mark.parametrize("maxphyaddr, mask", [
    (48, 0x000FF80000000001),      # reduced to 43: bits 43..51 | P
    (52, 0x000F800000000001)])     # reduced to 47: bits 47..51 | P
def test_memory_encryption_moves_the_npt_mmio_mask(kv, maxphyaddr, mask):
    """svm_adjust_mmio_mask: rsvd_bits(x86_phys_bits, 51) | P with x86_phys_bits reduced by
    CPUID 0x8000001F EBX[11:6] (5 on the modelled part)."""
    vm = kv.VM(VMType.SEV, host=Host(maxphyaddr=maxphyaddr))
    vm.create_vcpu().access(0x5000)
    assert vm.page_tables.get_entry(0x5000, 1) == mask | 0x5000 | 0x6


def test_la57_makes_npt_five_level_and_widens_user_addresses(kv):
    """get_npt_level: NPT follows the host's paging; TASK_SIZE_MAX on a 5-level host is
    2**56 - 4096, which access_ok checks userspace_addr + memory_size against."""
    vm = kv.VM(vendor="svm", host=Host(la57=True))
    assert vm.tdp_levels == 5 and vm.page_tables.levels == 5
    assert kv.VM(host=Host(la57=True)).tdp_levels == 4             # EPT: not the host's
    top = (1 << 56) - 0x2000
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0x1000,
                              userspace_addr=top)
    with pytest.raises(KvmError):
        vm.set_user_memory_region(slot=1, guest_phys_addr=0x1000, memory_size=0x2000,
                                  userspace_addr=top)
    with pytest.raises(KvmError):
        kv.VM(vendor="svm").set_user_memory_region(slot=0, guest_phys_addr=0,
                                                   memory_size=0x1000, userspace_addr=top)
    assert vm.create_vcpu().access(0x123).level == 1


def test_ept_without_ad_bits(kv):
    """kvm_ad_enabled off: SPTE_TDP_AD_DISABLED (bit 52) in every SPTE, non-leaf ones
    without A; the EPTP has no A/D bit, so the CPU sets none; no PML."""
    host = Host(ept_ad_bits=False)
    vm = kv.VM(host=host)
    assert not vm.pml and not vm.page_tables.ad_bits
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0xABCDE000)
    vcpu = vm.create_vcpu()
    assert vcpu.access(0, write=True) == Translation(0xABCDE000, 1)
    assert vm.page_tables.get_entry(0, 1) == 0x86000000ABCDEB77 | AD_DISABLED
    assert vm.page_tables.get_entry(0, 4) == 0x8010000800001807


def test_prefetched_sptes_are_access_tracked_and_the_fast_path_restores_them(kv):
    """make_spte with prefetch: mark_spte_for_access_track keeps R and X at bits 54 and 56
    and clears RWX and A (W is not kept): 0x86100000abcdea77 -> 0x87500000abcdea70.  A
    read then is a not-present EPT violation that fast_page_fault fixes with R|X back and
    A set; a write then gets W back there too."""
    vm = kv.VM(host=Host(ept_ad_bits=False))
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0xABCDE000)
    vcpu = vm.create_vcpu()
    assert vcpu.pre_fault_memory(0, 0x1000) == 0
    pt = vm.page_tables
    assert pt.get_entry(0, 1) == 0x87500000ABCDEA70
    assert vcpu.access(0x10) == Translation(0xABCDE010, 1)
    assert pt.get_entry(0, 1) == 0x86100000ABCDEB75
    assert (vcpu.stats["pf_fast"], vcpu.stats["pf_fixed"]) == (1, 1)
    vcpu.access(0x10, write=True)
    assert pt.get_entry(0, 1) == 0x86100000ABCDEB77
    assert vcpu.stats["pf_fast"] == 2


def test_prefault_without_ad_bits_takes_the_fast_path_over_an_access_tracked_spte(kv):
    """page_fault_can_be_fast: a not-present fault is fast without A/D bits, so a second
    pre-fault over an access-tracked SPTE makes it young again (pf_fast, no pf_fixed:
    kvm_tdp_map_page counts nothing else)."""
    vm = kv.VM(host=Host(ept_ad_bits=False))
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0xABCDE000)
    vcpu = vm.create_vcpu()
    vcpu.pre_fault_memory(0, 0x1000)
    vcpu.pre_fault_memory(0, 0x1000)
    assert vm.page_tables.get_entry(0, 1) == 0x86100000ABCDEB75
    assert (vcpu.stats["pf_fast"], vcpu.stats["pf_fixed"]) == (1, 0)


def test_dirty_logging_without_ad_bits_or_pml_write_protects(kv):
    """No PML (no A/D bits, or a host without it): enabling logging clears W;
    tdp_mmu_need_write_protect makes the re-protection clear W as well."""
    for host in (Host(ept_ad_bits=False), Host(pml=False)):
        vm = kv.VM(host=host)
        assert not vm.pml
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 21,
                                  userspace_addr=0xABC00000)
        vcpu = vm.create_vcpu()
        vcpu.access(0x3000, write=True)
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 21,
                                  userspace_addr=0xABC00000, flags=MemFlag.LOG_DIRTY_PAGES)
        entry = vm.page_tables.get_entry(0x3000, 1)
        assert not entry & 0x2 and entry & (1 << 58)           # W gone, MMU-writable kept
        vcpu.access(0x3000, write=True)
        assert vm.get_dirty_log(0)[0] == 1 << 3
        assert not vm.page_tables.get_entry(0x3000, 1) & 0x2


def test_frames_follow_the_reduced_width(kv):
    """The model's host frames: user memory at hva maps to frame (hva >> 12) modulo the
    lower half of the host's (reduced) physical space: 2**42 bytes with 43 bits."""
    vm = kv.VM(VMType.SEV)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 21,
                              userspace_addr=(1 << 42) + 0x5000000)
    assert vm.create_vcpu().access(0x1000).hpa == 0x5001000


def test_splitting_and_recovering_access_tracked_leaves_keeps_them_tracked(kv):
    """make_small_spte / make_huge_spte change X through modify_spte_protections (spte.c),
    which restores an access-tracked SPTE, changes it and tracks it again.  NX huge pages
    without EPT A/D bits: the prefetched 2M leaf (no X) 0x8650000040000af0 splits into
    4K children with R and X saved (0x8750000040000a70, RWX clear), and recovering the 2M
    page from that child saves R only again (0x8650000040000af0)."""
    vm = kv.VM(host=Host(ept_ad_bits=False), nx_huge_pages=True)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20,
                              userspace_addr=1 << 30, host_level=2)
    vcpu = vm.create_vcpu()
    vcpu.pre_fault_memory(0, 0x1000)
    pt = vm.page_tables
    assert pt.get_entry(0, 2) == 0x8650000040000AF0
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20,
                              userspace_addr=1 << 30, host_level=2,
                              flags=MemFlag.LOG_DIRTY_PAGES)
    assert pt.get_entry(0, 1) == 0x8750000040000A70
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20,
                              userspace_addr=1 << 30, host_level=2)
    assert pt.get_entry(0, 2) == 0x8650000040000AF0
