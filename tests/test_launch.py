"""A confidential VM's launch, the SEV-SNP RMP and TDX acceptance.

Sources (Linux 6.18 unless named): tdx_vcpu_init_mem_region, tdx_gmem_post_populate,
tdx_td_finalize, tdx_sept_set_private_spte (TDH.MEM.PAGE.AUG after finalize),
tdx_is_sept_violation_unexpected_pending and tdx_handle_ept_violation (vmx/tdx.c);
kvm_gmem_populate (virt/kvm/guest_memfd.c: -EEXIST for an up-to-date folio, -EINVAL for
memory not PRIVATE); snp_launch_update, sev_gmem_post_populate, snp_launch_finish,
sev_gmem_prepare, sev_gmem_invalidate, sev_handle_rmp_fault and the kvm_rmp_fault event
(svm/sev.c, trace.h); kvm_arch_vcpu_pre_fault_memory (mmu.c: -EOPNOTSUPP until
pre_fault_allowed); the AMD APM vol. 2 "RMP and VMPL Access Checks" and vol. 3
"PVALIDATE"; the Intel TDX Module ABI (TDG.MEM.PAGE.ACCEPT status codes).
"""

import errno

import pytest

from kvmemu import (EPT_VIOLATION, GuestException, KvmError, MemAttr, MemFlag,
                    MemoryFaultExit, PFERR, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, RmpEntry,
                    TdxModuleStatus, Translation, VMType)

MIB = 1 << 20
UADDR = 1 << 30
SHARED = 1 << 47                     # a TD's shared bit with GPAW 48


def confidential_vm(kv, vm_type, private=2 * MIB):
    """A VM with 4 MiB of guest_memfd memory at GPA 0, [0, private) PRIVATE, one vCPU."""
    vm = kv.VM(vm_type)
    gmem = vm.create_guest_memfd(4 * MIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR, flags=MemFlag.GUEST_MEMFD,
                              guest_memfd=gmem)
    if private:
        vm.set_memory_attributes(0, private, MemAttr.PRIVATE)
    return vm, vm.create_vcpu(), gmem


def raises(code, call, *args, **kwargs):
    with pytest.raises(KvmError) as info:
        call(*args, **kwargs)
    assert info.value.errno == code, info.value
    return info.value


def test_values_from_the_sources():
    assert TdxModuleStatus.PAGE_ALREADY_ACCEPTED == 0x00000B0A00000000
    assert TdxModuleStatus.PAGE_SIZE_MISMATCH == 0xC0000B0B00000000
    assert TdxModuleStatus.OPERAND_INVALID == 0xC000010000000000    # tdx_errno.h
    import kvmemu
    assert kvmemu.TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION == 6  # tdx_arch.h
    assert kvmemu.TDX_EXT_EXIT_QUAL_TYPE_MASK == 0xF
    assert (kvmemu.PVALIDATE_FAIL_SIZEMISMATCH, kvmemu.PVALIDATE_FAIL_NOUPDATE) == (6, 255)
    assert kvmemu.SVM_EXIT_PAGE_NOT_VALIDATED == 0x404 and kvmemu.X86_TRAP_VC == 29
    assert (kvmemu.KVM_SEV_SNP_PAGE_TYPE_NORMAL, kvmemu.KVM_SEV_SNP_PAGE_TYPE_ZERO,
            kvmemu.KVM_SEV_SNP_PAGE_TYPE_CPUID) == (1, 3, 6)


# --- TDX: KVM_TDX_INIT_MEM_REGION and KVM_TDX_FINALIZE_VM ----------------------------------

def test_init_mem_region_adds_accepted_pages_to_the_mirror_root(kv):
    """Each page is mapped in the mirror root (4K) and added: after finalize the TD uses
    it without accepting it, and ACCEPT says it already is."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.TDX)
    assert vm.tdx_init_mem_region(0x10000, 0x3000) == 0
    assert vm.stats["pages_4k"] == 3
    vm.tdx_finalize_vm()
    assert vcpu.access(0x11000, write=True) == Translation((gmem.pfn(0x11) << 12), 1)
    assert vcpu.tdx_accept(0x12000) == TdxModuleStatus.PAGE_ALREADY_ACCEPTED
    assert not vm.dead and vm.check_invariants() == []


def test_init_mem_region_checks(kv):
    vm, _, _ = confidential_vm(kv, VMType.TDX)
    for gpa, size in [(0x800, 0x1000), (0, 0), (SHARED, 0x1000), (SHARED - 0x1000, 0x2000),
                      ((1 << 64) - 0x1000, 0x2000)]:
        raises(errno.EINVAL, vm.tdx_init_mem_region, gpa, size)
    raises(errno.EINVAL, vm.tdx_init_mem_region, 0x200000, 0x1000)   # not PRIVATE
    raises(errno.EINVAL, vm.tdx_init_mem_region, 0x800000, 0x1000)   # no memslot
    vm.tdx_init_mem_region(0, 0x1000)
    raises(errno.EEXIST, vm.tdx_init_mem_region, 0, 0x1000)          # folio up to date
    vm.tdx_finalize_vm()
    raises(errno.EINVAL, vm.tdx_init_mem_region, 0x1000, 0x1000)     # finalized
    raises(errno.EINVAL, vm.tdx_finalize_vm)                         # twice
    raises(errno.EINVAL, kv.VM(VMType.TDX).tdx_init_mem_region, 0, 0x1000)   # no vCPU
    raises(errno.ENOTTY, kv.VM().tdx_finalize_vm)
    vmx, svm = kv.VM(), kv.VM(VMType.SNP)
    for vm_ in (vmx, svm):
        vm_.create_vcpu()
    raises(errno.EINVAL, vmx.tdx_init_mem_region, 0, 0x1000)   # not a TD vCPU
    raises(errno.ENOTTY, svm.tdx_init_mem_region, 0, 0x1000)   # no vcpu_mem_enc_ioctl


def test_init_mem_region_stops_at_a_page_already_added(kv):
    """The loop stops at the first page whose folio is up to date (EEXIST), after adding
    the pages before it; the error names where it stopped."""
    vm, vcpu, _ = confidential_vm(kv, VMType.TDX)
    vm.tdx_init_mem_region(0x2000, 0x1000)
    error = raises(errno.EEXIST, vm.tdx_init_mem_region, 0x1000, 0x3000)
    assert "GPA 0x2000 with 2 pages left" in str(error)
    raises(errno.EEXIST, vm.tdx_init_mem_region, 0x1000, 0x1000)     # 0x1000 was added
    closed_vm, _, closed = confidential_vm(kv, VMType.TDX)
    closed.close()
    raises(errno.EFAULT, closed_vm.tdx_init_mem_region, 0, 0x1000)


def test_pre_fault_needs_the_launch_to_end(kv):
    for vm_type, finish in [(VMType.TDX, "tdx_finalize_vm"), (VMType.SNP, "snp_launch_finish")]:
        vm, vcpu, _ = confidential_vm(kv, vm_type)
        assert not vm.pre_fault_allowed and not vm.launched
        raises(errno.EOPNOTSUPP, vcpu.pre_fault_memory, 0, 0x1000)
        getattr(vm, finish)()
        assert vm.pre_fault_allowed and vm.launched
        assert vcpu.pre_fault_memory(0, 0x1000) == 0


# --- TDX: PENDING pages and TDG.MEM.PAGE.ACCEPT --------------------------------------------

def test_a_page_augmented_after_finalize_is_pending_until_accepted(kv):
    """ACCEPT on a page not yet mapped: an EPT violation, KVM adds it (AUG), and the
    accept succeeds; a second ACCEPT is PAGE_ALREADY_ACCEPTED; the TD then uses it."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.TDX)
    vm.tdx_finalize_vm()
    assert vcpu.tdx_accept(0x5000) == TdxModuleStatus.SUCCESS
    assert vm.stats["pages_4k"] == 1
    assert vcpu.tdx_accept(0x5000) == TdxModuleStatus.PAGE_ALREADY_ACCEPTED
    assert vcpu.access(0x5000) == Translation(gmem.pfn(5) << 12, 1)
    assert vcpu.tdx_accept(0x200000 - 0x200000, PG_LEVEL_2M) == TdxModuleStatus.PAGE_SIZE_MISMATCH
    assert vcpu.tdx_accept(SHARED | 0x5000) == TdxModuleStatus.OPERAND_INVALID
    assert vcpu.tdx_accept(0x1000, PG_LEVEL_2M) == TdxModuleStatus.OPERAND_INVALID
    assert vcpu.tdx_accept(0, PG_LEVEL_1G) == TdxModuleStatus.PAGE_SIZE_MISMATCH
    assert vcpu.tdx_accept(0x300000) == MemoryFaultExit(8, 0x300000, 4096)   # shared GPA


def test_touching_a_pending_page_kills_the_vm(kv):
    """A private access to a page AUGmented but not accepted: EPT violation with extended
    type 6 and no permission bits -> "Guest access before accepting", kvm_vm_dead,
    KVM_RUN -EIO; every later ioctl is EIO too."""
    vm, vcpu, _ = confidential_vm(kv, VMType.TDX)
    vm.tdx_finalize_vm()
    assert vcpu.pre_fault_memory(0x7000, 0x1000) == 0      # AUG: pending
    raises(errno.EIO, vcpu.access, 0x7000)
    assert vm.dead
    raises(errno.EIO, vcpu.access, 0x8000)
    raises(errno.EIO, vm.set_memory_attributes, 0, 0x1000, 0)
    raises(errno.EIO, vcpu.pre_fault_memory, 0x9000, 0x1000)


@pytest.mark.parametrize("ext, qual, dead", [
    (6, EPT_VIOLATION.ACC_READ, True),
    (6 | 0x30, EPT_VIOLATION.ACC_WRITE, True),            # only bits 3:0 are the type
    (6, EPT_VIOLATION.ACC_READ | EPT_VIOLATION.PROT_READ, False),
    (6, EPT_VIOLATION.ACC_INSTR | EPT_VIOLATION.EXEC_FOR_RING3_LIN, False),
    (5, EPT_VIOLATION.ACC_READ, False),
])
def test_the_pending_check_reads_the_extended_exit_qualification(kv, ext, qual, dead):
    vm, vcpu, _ = confidential_vm(kv, VMType.TDX)
    vm.tdx_finalize_vm()
    r = vcpu.handle_ept_violation(0x5000, qual, ext)
    assert (r == -errno.EIO) == dead and vm.dead == dead
    # A shared GPA is never checked.
    vm2, vcpu2, _ = confidential_vm(kv, VMType.TDX)
    assert vcpu2.handle_ept_violation(SHARED | 0x300000, EPT_VIOLATION.ACC_READ, 6) > 0


def test_an_implicit_finalize_makes_a_guest_that_accepts_before_use(kv):
    """A program that never finalizes: the first KVM_RUN ends the launch, and the guest
    accepts each page as it first touches it (no VM death)."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.TDX)
    assert vcpu.access(0x5000, write=True) == Translation(gmem.pfn(5) << 12, 1)
    assert vm.launched and vm.pre_fault_allowed
    assert vcpu.tdx_accept(0x5000) == TdxModuleStatus.PAGE_ALREADY_ACCEPTED
    vcpu.pre_fault_memory(0x6000, 0x1000)
    assert vcpu.tdx_accept(0x6000) == TdxModuleStatus.SUCCESS
    raises(errno.EINVAL, vm.tdx_finalize_vm)


# --- SEV-SNP: launch update, the RMP, PVALIDATE ----------------------------------------------

def test_launch_update_assigns_and_validates(kv):
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    assert vm.snp_launch_update(0x4000, 0x2000) == 0
    assert vm.rmp_entry(gmem.pfn(4)) == RmpEntry(True, 1, 0x4000, PG_LEVEL_4K, True, False)
    assert vm.rmp_entry(gmem.pfn(6)) == RmpEntry(False, 0, 0, PG_LEVEL_4K, False, False)
    assert vm.rmp_entry(UADDR >> 12) == RmpEntry(False, 0, 0, PG_LEVEL_4K, False, False)
    assert vm.stats["pages_4k"] == 0                        # nothing mapped yet
    vm.snp_launch_finish()
    assert vcpu.access(0x5000, encrypted=True) == Translation(gmem.pfn(5) << 12, 1)


def test_launch_update_checks(kv):
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    for size, page_type in [(0, 1), (0x800, 1), (0x1000, 2), (0x1000, 7)]:
        raises(errno.EINVAL, vm.snp_launch_update, 0, size, page_type)
    raises(errno.EINVAL, vm.snp_launch_update, 0x800000, 0x1000)        # no memslot
    raises(errno.EIO, vm.snp_launch_update, 0x200000, 0x1000)           # not PRIVATE
    vm.snp_launch_update(0, 0x1000)
    raises(errno.EIO, vm.snp_launch_update, 0, 0x1000)                  # EEXIST inside
    # Progress, then the error: the bytes left; the next call reports it.
    assert vm.snp_launch_update(0x1ff000, 0x3000) == 0x2000
    raises(errno.EIO, vm.snp_launch_update, 0x200000, 0x2000)
    raises(errno.EINVAL, kv.VM(VMType.SEV).snp_launch_update, 0, 0x1000)
    raises(errno.ENOTTY, kv.VM().snp_launch_update, 0, 0x1000)
    vm.snp_launch_finish()
    raises(errno.EIO, vm.snp_launch_update, 0x8000, 0x1000)             # firmware refuses
    raises(errno.EINVAL, vm.snp_launch_finish)                          # VMSA protected
    kv.VM(VMType.SNP).snp_launch_finish()                               # no vCPU: again fine
    raises(errno.ENOTTY, kv.VM(VMType.SEV).snp_launch_finish)


def test_a_page_faulted_in_must_be_validated(kv):
    """sev_gmem_prepare: assigned for the GPA, 4K, not validated -> #VC 0x404 in the
    guest; PVALIDATE sets Validated; rescinding it brings the #VC back."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    vm.snp_launch_finish()
    assert vcpu.access(0x5000, encrypted=True) == GuestException(29, 0x404, 0x5000)
    assert vm.rmp_entry(gmem.pfn(5)) == RmpEntry(True, 1, 0x5000, PG_LEVEL_4K, False, False)
    assert vcpu.pvalidate(0x5000) == 0
    assert vcpu.pvalidate(0x5000) == 255                     # CF=1: no update
    assert vcpu.access(0x5000, encrypted=True, write=True) == Translation(gmem.pfn(5) << 12, 1)
    assert vcpu.pvalidate(0x5000, validate=False) == 0
    assert vcpu.access(0x5000, encrypted=True) == GuestException(29, 0x404, 0x5000)
    assert vcpu.pvalidate(0x1000, PG_LEVEL_2M) == 1          # not 2M-aligned
    assert vcpu.pvalidate(0, PG_LEVEL_2M) == 6               # the RMP entry is 4K
    assert vcpu.pvalidate(0x300000) == MemoryFaultExit(8, 0x300000, 4096)   # shared GPA


def test_rmp_check_failures_are_npf_with_guest_rmp(kv):
    """A C-bit access to a page the NPT maps shared (a host frame, never assigned): #NPF
    PRESENT|USER|GUEST_FINAL|GUEST_ENC|GUEST_RMP; KVM makes it private, the attributes
    say shared: KVM_EXIT_MEMORY_FAULT (private).  A C-bit-clear write to a private
    mapping (an assigned frame): #NPF without ENC, the shared fault exits.  A read
    without the C-bit is not checked."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    vm.snp_launch_finish()
    events = []
    vm.trace = lambda event, text: events.append((event, text))
    assert vcpu.access(0x300000).hpa == UADDR + 0x300000
    assert vcpu.access(0x300000, encrypted=True) == MemoryFaultExit(8, 0x300000, 4096)
    rmp = PFERR.PRESENT | PFERR.USER | PFERR.GUEST_FINAL | PFERR.GUEST_ENC | PFERR.GUEST_RMP
    assert rmp == 0x580000005
    assert ("kvm_page_fault", "vcpu 0 rip 0x0 address 0x0000000000300000 error_code "
            f"0x{rmp | PFERR.PRIVATE_ACCESS:x}") in events
    vcpu.pvalidate(0x5000)
    assert vcpu.access(0x5000) == Translation(gmem.pfn(5) << 12, 1)   # C=0 read
    assert vcpu.access(0x5000, write=True) == MemoryFaultExit(0, 0x5000, 4096)
    wr = PFERR.PRESENT | PFERR.WRITE | PFERR.USER | PFERR.GUEST_FINAL | PFERR.GUEST_RMP
    assert wr == 0x180000007
    assert ("kvm_page_fault", f"vcpu 0 rip 0x0 address 0x0000000000005000 error_code "
            f"0x{wr:x}") in events
    assert not any(event == "kvm_rmp_fault" for event, _ in events)    # rc < 0: not run


def test_sev_handle_rmp_fault_runs_when_the_fault_resumes_the_guest(kv):
    """rc > 0 and GUEST_RMP: sev_handle_rmp_fault finds the 4K assigned entry (spurious)
    and only traces kvm_rmp_fault; a shared gfn gets nothing."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    vm.snp_launch_finish()
    vcpu.pvalidate(0x5000)
    events = []
    vm.trace = lambda event, text: events.append((event, text))
    code = PFERR.PRESENT | PFERR.USER | PFERR.GUEST_FINAL | PFERR.GUEST_ENC | PFERR.GUEST_RMP
    assert vcpu.handle_npf(0x5000, code) > 0
    assert ("kvm_rmp_fault", f"vcpu 0 gpa 0000000000005000 pfn 0x{gmem.pfn(5):x} "
            f"error_code 0x{code | PFERR.PRIVATE_ACCESS:x} rmp_level 1 psmash_ret 0") in events
    events.clear()
    vcpu.access(0x300000)
    assert vcpu.handle_npf(0x300000, code ^ PFERR.GUEST_ENC) > 0
    assert not any(event == "kvm_rmp_fault" for event, _ in events)


def test_punching_the_hole_makes_the_rmp_entry_shared(kv):
    """sev_gmem_invalidate on the freed folio: rmp_make_shared; the next fault prepares
    the page again (assigned, not validated)."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    vm.snp_launch_finish()
    vcpu.pvalidate(0x5000)
    vm.set_memory_attributes(0x5000, 0x1000, 0)              # converted to shared
    assert vm.rmp_entry(gmem.pfn(5)).validated               # untouched by the conversion
    assert vcpu.access(0x5000, write=True).hpa == UADDR + 0x5000
    gmem.punch_hole(0x5000, 0x1000)
    assert vm.rmp_entry(gmem.pfn(5)) == RmpEntry(False, 0, 0, PG_LEVEL_4K, False, False)
    vm.set_memory_attributes(0x5000, 0x1000, MemAttr.PRIVATE)
    assert vcpu.access(0x5000, encrypted=True) == GuestException(29, 0x404, 0x5000)
    assert vm.rmp_entry(gmem.pfn(5)) == RmpEntry(True, 1, 0x5000, PG_LEVEL_4K, False, False)


def test_an_implicit_launch_finish_makes_a_guest_that_validates_before_use(kv):
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    assert vcpu.access(0x5000, encrypted=True) == Translation(gmem.pfn(5) << 12, 1)
    assert vm.rmp_entry(gmem.pfn(5)).validated and vm.launched


def test_guest_instructions_belong_to_their_vm_types(kv):
    with pytest.raises(ValueError):
        kv.VM(VMType.TDX).create_vcpu().pvalidate(0)
    with pytest.raises(ValueError):
        kv.VM(VMType.SNP).create_vcpu().tdx_accept(0)
    with pytest.raises(ValueError):
        kv.VM(VMType.TDX).rmp_entry(0)
    with pytest.raises(ValueError):
        kv.VM(VMType.SNP).create_vcpu().pvalidate(0, PG_LEVEL_1G)


def test_launch_state_travels_in_snapshots(kv):
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    vm.snp_launch_update(0, 0x1000)
    snap = vm.snapshot()
    vm.snp_launch_finish()
    vcpu.access(0x5000, encrypted=True)
    vm.restore(snap)
    assert not vm.launched
    assert vm.rmp_entry(gmem.pfn(0)).validated and not vm.rmp_entry(gmem.pfn(5)).assigned


def test_the_invariant_checker_sees_a_mapped_frame_the_rmp_lost(kv):
    """A mapped guest_memfd frame must be prepared and, on SNP, RMP-assigned."""
    vm, vcpu, gmem = confidential_vm(kv, VMType.SNP)
    vcpu.access(0x5000, encrypted=True)
    assert vm.check_invariants() == []
    vm._memory.memslots.set_frame(gmem.pfn(5), 1)            # prepared, not assigned
    assert vm.check_invariants() == [
        "direct leaf gfn 0x5 level 1 maps a guest_memfd frame the RMP does not assign"]
    vm._memory.memslots.set_frame(gmem.pfn(5), 0)
    assert len(vm.check_invariants()) == 2
