"""A confidential guest's whole life, per VM type, with the test as the VMM.

Populate at launch, run, convert a buffer to shared with an explicit request (TDX MapGPA,
SNP page state change, KVM_HC_MAP_GPA_RANGE), convert a page implicitly (an access whose
private/shared kind disagrees with the attributes: KVM_EXIT_MEMORY_FAULT, and the VMM
flips the attributes), convert back, punch the hole of the shared range.  Every exit is
checked against what KVM 6.18 gives (tdx_map_gpa, snp_begin_psc, kvm_emulate_hypercall,
kvm_mmu_faultin_pfn's mismatch exit, npf_interception with GUEST_ENC / GUEST_RMP), and
the final mappings against the attributes and, for SNP, the RMP.
"""

from kvmemu import (KVM_HC_MAP_GPA_RANGE, PVALIDATE_FAIL_NOUPDATE, PVALIDATE_SUCCESS, GuestException, HypercallExit, MapGpaFlag,
                    MemAttr, MemFlag, MemoryFaultExit, PscResult, RmpEntry, TdvmcallResult,
                    TdxModuleStatus, Translation, VMType, PG_LEVEL_4K)

MIB = 1 << 20
UADDR = 1 << 30
SHARED = 1 << 47
BUF = 0x100000                  # the buffer the guest shares: 16 pages at 1 MiB
PAGES = 16


def build(kv, vm_type):
    vm = kv.VM(vm_type)
    vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
    gmem = vm.create_guest_memfd(4 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem)
    vm.set_memory_attributes(0, 4 * MIB, MemAttr.PRIVATE)
    return vm, vm.create_vcpu(), gmem


def serve(vm, vcpu, result, done_type):
    """The VMM's loop for a guest request: each KVM_HC_MAP_GPA_RANGE exit sets the
    attributes it names and answers 0.  Returns the exits seen and the final result."""
    exits = []
    while not isinstance(result, done_type):
        assert isinstance(result, HypercallExit) and result.nr == KVM_HC_MAP_GPA_RANGE
        gpa, npages, attrs = result.args[:3]
        exits.append((gpa, npages, attrs))
        vm.set_memory_attributes(gpa, npages << 12,
                                 MemAttr.PRIVATE if attrs & MapGpaFlag.ENCRYPTED else 0)
        result = vcpu.complete_hypercall(0)
    return exits, result


def check_mappings(vm, vcpu, gmem, shared_alias=0, encrypted=False, accept=None):
    """Every page of the first 2 MiB maps what the attributes say: a guest_memfd frame
    when private (``accept``ed first, as the guest would), the host's frame when
    shared."""
    for page in range(0, 512, 7):
        gpa = page << 12
        private = vm.get_memory_attributes(page) & MemAttr.PRIVATE
        if private:
            if accept is not None:
                accept(gpa)
            result = vcpu.access(gpa, encrypted=encrypted)
            assert result == Translation(gmem.pfn(page) << 12, PG_LEVEL_4K), hex(gpa)
        else:
            result = vcpu.access(gpa | shared_alias)
            assert result.hpa == UADDR + gpa, hex(gpa)
    assert vm.check_invariants() == []


def test_a_td_life(kv):
    vm, vcpu, gmem = build(kv, VMType.TDX)
    assert vm.tdx_init_mem_region(0, 0x10000) == 0          # 16 pages of boot image
    vm.tdx_finalize_vm()
    assert vcpu.access(0x3000).hpa == gmem.pfn(3) << 12      # added: already accepted
    for page in range(PAGES):                                 # the guest accepts its buffer
        assert vcpu.tdx_accept(BUF + (page << 12)) == TdxModuleStatus.SUCCESS
    # Explicit: MapGPA of the buffer to shared, one 2 MiB chunk at most per exit.
    exits, result = serve(vm, vcpu, vcpu.tdvmcall_map_gpa(SHARED | BUF, PAGES << 12),
                          TdvmcallResult)
    assert exits == [(BUF, PAGES, 0)] and result == TdvmcallResult(0, 0)
    assert vcpu.access(SHARED | BUF, write=True).hpa == UADDR + BUF
    assert vcpu.access(BUF) == MemoryFaultExit(8, BUF, 4096)  # private alias: mismatch
    # Implicit: the guest writes the shared alias of a private page; the VMM converts it.
    assert vcpu.access(SHARED | 0x200000, write=True) == MemoryFaultExit(0, 0x200000, 4096)
    vm.set_memory_attributes(0x200000, 0x1000, 0)
    assert vcpu.access(SHARED | 0x200000, write=True).hpa == UADDR + 0x200000
    # Back to private, explicitly, and the page is accepted again (a fresh AUG).
    exits, result = serve(vm, vcpu, vcpu.tdvmcall_map_gpa(BUF, 0x1000), TdvmcallResult)
    assert exits == [(BUF, 1, MapGpaFlag.ENCRYPTED)]
    assert vcpu.tdx_accept(BUF) == TdxModuleStatus.SUCCESS
    # The VMM discards the shared buffer's private backing.
    gmem.punch_hole(BUF + 0x1000, (PAGES - 1) << 12)
    def accept(gpa):
        assert vcpu.tdx_accept(gpa) in (TdxModuleStatus.SUCCESS,
                                        TdxModuleStatus.PAGE_ALREADY_ACCEPTED)
    check_mappings(vm, vcpu, gmem, shared_alias=SHARED, accept=accept)
    assert not vm.dead


def test_an_snp_guest_life(kv):
    vm, vcpu, gmem = build(kv, VMType.SNP)
    assert vm.snp_launch_update(0, 0x10000) == 0
    vm.snp_launch_finish()
    assert vcpu.access(0x3000, encrypted=True).hpa == gmem.pfn(3) << 12
    for page in range(PAGES):                                 # fault in, then PVALIDATE
        gpa = BUF + (page << 12)
        assert vcpu.access(gpa, encrypted=True) == GuestException(29, 0x404, gpa)
        assert vcpu.pvalidate(gpa) == 0
    # Explicit: rescind, then a page state change of the buffer to shared (one entry
    # per page, merged into one exit).
    for page in range(PAGES):
        assert vcpu.pvalidate(BUF + (page << 12), validate=False) == 0
    entries = [((BUF >> 12) + page, 2, False) for page in range(PAGES)]
    exits, result = serve(vm, vcpu, vcpu.snp_page_state_change(entries), PscResult)
    assert exits == [(BUF, PAGES, 0)] and result.ret == 0
    assert vcpu.access(BUF, write=True).hpa == UADDR + BUF    # a host frame
    # The RMP still holds the old private frames until the hole is punched.
    assert vm.rmp_entry(gmem.pfn(BUF >> 12)) == RmpEntry(True, 1, BUF, 1, False, False)
    # Implicit: a C-bit access to the shared buffer: #NPF with GUEST_RMP, private fault,
    # attributes shared -> KVM_EXIT_MEMORY_FAULT (private); the VMM converts the page.
    assert vcpu.access(BUF, encrypted=True) == MemoryFaultExit(8, BUF, 4096)
    vm.set_memory_attributes(BUF, 0x1000, MemAttr.PRIVATE)
    assert vcpu.access(BUF, encrypted=True) == GuestException(29, 0x404, BUF)
    assert vcpu.pvalidate(BUF) == 0
    # And one the other way: a C-bit-clear write to a private page exits shared.
    assert vcpu.access(0x5000, write=True) == MemoryFaultExit(0, 0x5000, 4096)
    # The VMM discards the private backing of what stayed shared.
    gmem.punch_hole(BUF + 0x1000, (PAGES - 1) << 12)
    for page in range(1, PAGES):
        assert not vm.rmp_entry(gmem.pfn((BUF >> 12) + page)).assigned
        assert not vm.rmp_entry((UADDR + BUF >> 12) + page).assigned
    assert vm.rmp_entry(gmem.pfn(BUF >> 12)).validated
    def validate(gpa):
        assert vcpu.pvalidate(gpa) in (PVALIDATE_SUCCESS, PVALIDATE_FAIL_NOUPDATE)
    check_mappings(vm, vcpu, gmem, encrypted=True, accept=validate)


def test_a_sw_protected_guest_life(kv):
    """SW_PROTECTED: the attributes alone make a fault private, so every conversion is
    the guest's KVM_HC_MAP_GPA_RANGE (no implicit exit: an access follows the
    attributes); pre-fault populates it."""
    vm, vcpu, gmem = build(kv, VMType.SW_PROTECTED)
    assert vcpu.pre_fault_memory(0, 0x10000) == 0
    assert vm.stats["pages_4k"] == 16
    result = vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, BUF, PAGES, 0)
    exits, ret = serve(vm, vcpu, result, int)
    assert exits == [(BUF, PAGES, 0)] and ret == 0
    assert vcpu.access(BUF, write=True).hpa == UADDR + BUF
    result = vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, BUF, 1, MapGpaFlag.ENCRYPTED)
    exits, ret = serve(vm, vcpu, result, int)
    assert exits == [(BUF, 1, MapGpaFlag.ENCRYPTED)] and ret == 0
    assert vcpu.access(BUF) == Translation(gmem.pfn(BUF >> 12) << 12, PG_LEVEL_4K)
    gmem.punch_hole(BUF + 0x1000, (PAGES - 1) << 12)
    check_mappings(vm, vcpu, gmem)
