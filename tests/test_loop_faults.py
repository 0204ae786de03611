"""First touches that ``access_many`` faults in without leaving its GIL-free loop.

On every VM type the compiled core handles an EPT violation or #NPF that needs
nothing of Python inside the batch loop, under the loop's mmu_lock and
kvm->srcu section.  Both cores must give the same results, statistics and tables,
taken from KVM's rules (kvm_mmu_page_fault counts pf_taken and pf_fixed per fault,
kvm_update_page_stats one 4K page per new leaf, __kvm_faultin_pfn the frame behind the
memslot's host address); the compiled core's ``loop_faults`` says which faults the
loop handled.  Then the same with vCPU threads racing each other and memslot changes.
"""

from __future__ import annotations

import errno
import itertools
import threading

import numpy as np
import pytest

from kvmemu import (MEMORY_EXIT_FLAG_PRIVATE, PG_LEVEL_4K, AccessFlags, Host, KvmError,
                    MemAttr, MemFlag, MemoryFaultExit, MmioExit, RmpEntry, TdxModuleStatus,
                    VMType)

from test_threads import run_threads

MIB = 1 << 20
UADDR = 0x7F0000000000


def default_vm(kv, size=64 * MIB, **kwargs):
    vm = kv.VM(VMType.DEFAULT, **kwargs)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=size,
                              userspace_addr=UADDR)
    return vm


def pages(first, n):
    return (np.arange(n, dtype=np.uint64) + np.uint64(first)) << np.uint64(12)


def loop_faults(kv, vcpu):
    """Faults the GIL-free loop handled (the twin has no such loop: None)."""
    return vcpu._c.loop_faults if kv.IMPLEMENTATION == "cython" else None


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_a_run_of_first_touches_maps_every_page(kv, vendor):
    """1024 consecutive first-touch writes from GPA 0: one fault and one 4K leaf each,
    two leaf tables below one PDPT and one PD (root + 4 tables), each page at its
    host address."""
    vm = default_vm(kv, vendor=vendor)
    vcpu = vm.create_vcpu()
    result = vcpu.access_many(pages(0, 1024), AccessFlags.WRITE)
    assert result.count == 1024 and result.exit is None
    np.testing.assert_array_equal(result.hpa, pages(0, 1024) + np.uint64(UADDR))
    assert set(result.level.tolist()) == {1}
    stats = vcpu.stats
    assert (stats["pf_taken"], stats["pf_fixed"], stats["pf_spurious"]) == (1024, 1024, 0)
    assert vm.stats["pages_4k"] == 1024
    assert vm.page_tables.ntables == 5
    assert loop_faults(kv, vcpu) in (1024, None)
    assert vm.check_invariants() == []


def test_the_walks_around_a_loop_fault_keep_the_walk_rules(kv):
    """A first touch below a PDE whose accessed flag was cleared: the walk that meets the
    not-present leaf stores nothing (an EPT violation, SDM 29.3.5), the fault maps the
    page, and the walk after it sets the PDE's accessed flag; a mapped leaf without its
    accessed flag, and then a write to a leaf without its dirty flag, get them from the
    walk.  Every page at its host address, one fault in all."""
    from kvmemu import EPTE
    from kvmemu.testing import writable
    vm = default_vm(kv)
    vcpu = vm.create_vcpu()
    touched = np.delete(pages(0, 16), 5)
    assert vcpu.access_many(touched, AccessFlags.WRITE).count == 15
    pt, accessed, dirty = vm.page_tables, EPTE.ACCESSED.value, EPTE.DIRTY.value
    with writable(pt):
        pt.set_entry(0, 2, pt.get_entry(0, 2) & ~accessed)
        pt.set_entry(3 << 12, 1, pt.get_entry(3 << 12, 1) & ~accessed)
        pt.set_entry(4 << 12, 1, pt.get_entry(4 << 12, 1) & ~dirty)
    taken = vcpu.stats["pf_taken"]
    result = vcpu.access_many(np.array([5 << 12, 3 << 12, 0], dtype=np.uint64) | np.uint64(8))
    assert result.count == 3 and result.exit is None
    assert result.hpa.tolist() == [UADDR + (5 << 12) + 8, UADDR + (3 << 12) + 8, UADDR + 8]
    assert result.level.tolist() == [1, 1, 1]
    assert vcpu.stats["pf_taken"] == taken + 1
    assert pt.get_entry(0, 2) & accessed and pt.get_entry(3 << 12, 1) & accessed
    assert not pt.get_entry(4 << 12, 1) & dirty
    assert vcpu.access_many(pages(4, 1), AccessFlags.WRITE).count == 1
    assert pt.get_entry(4 << 12, 1) & dirty
    assert vm.check_invariants() == []


def test_what_the_loop_cannot_handle_goes_to_the_exit_handler(kv):
    """First touches, then a write to a READONLY memslot (KVM_PFN_ERR_RO_FAULT: emulated,
    an MMIO exit), then a read of a gfn without a memslot (an MMIO SPTE, an MMIO exit):
    the batch stops at each, with the statistics of each."""
    vm = default_vm(kv)
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MIB, memory_size=4 * MIB,
                              userspace_addr=UADDR + 64 * MIB, flags=MemFlag.READONLY)
    vcpu = vm.create_vcpu()
    gpas = np.concatenate([pages(0, 10), pages((64 * MIB) >> 12, 1)])
    result = vcpu.access_many(gpas, AccessFlags.WRITE)
    assert result.count == 10 and result.exit == MmioExit(64 * MIB, True, 0, b"")
    assert vcpu.stats["pf_taken"] == 11 and vcpu.stats["pf_emulate"] == 1
    assert loop_faults(kv, vcpu) in (10, None)
    result = vcpu.access_many(np.concatenate([pages(10, 5), pages(1 << 18, 1)]))
    assert result.count == 5 and result.exit == MmioExit(1 << 30, False, 0, b"")
    assert vcpu.stats["pf_mmio_spte_created"] == 1
    assert loop_faults(kv, vcpu) in (15, None)
    assert vm.check_invariants() == []


def test_faults_of_a_vm_without_ept_ad_bits_are_handled_outside_the_loop(kv):
    """Without EPT A/D bits a not-present fault may be an access-tracked SPTE that
    fast_page_fault fixes (page_fault_can_be_fast): those faults are not taken in the
    loop, with the same results."""
    vm = kv.VM(VMType.DEFAULT, host=Host(ept_ad_bits=False))
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 * MIB,
                              userspace_addr=UADDR)
    vcpu = vm.create_vcpu()
    result = vcpu.access_many(pages(0, 600))
    assert result.count == 600 and vcpu.stats["pf_fixed"] == 600
    assert loop_faults(kv, vcpu) in (0, None)
    assert vm.check_invariants() == []


# A host address within an SNP or TDX host's frames (its C-bit or shared bit takes
# physical address bits).
CVM_UADDR = 1 << 30


def gmem_vm(kv, vm_type, size, private, uaddr):
    """A ``vm_type`` VM with ``size`` of guest_memfd-backed memory at GPA 0 (host address
    ``uaddr``), its first ``private`` bytes private, and its guest_memfd.  The launch of
    an SNP VM or TD never ended, so the modelled guest validates or accepts each
    private page before its first touch (as a Linux guest does)."""
    vm = kv.VM(vm_type)
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=size,
                              userspace_addr=uaddr, flags=MemFlag.GUEST_MEMFD, guest_memfd=gmem)
    vm.set_memory_attributes(0, private, MemAttr.PRIVATE)
    return vm, gmem


def sw_protected_vm(kv, size=4 * MIB):
    """SW_PROTECTED, ``size`` at GPA 0, its first half private."""
    return gmem_vm(kv, VMType.SW_PROTECTED, size, size // 2, UADDR)[0]


def test_a_sw_protected_vm_faults_private_and_shared_pages_in_the_loop(kv):
    """First touches of 512 private and 512 shared pages: one fault and one 4K leaf
    each (guest_memfd is mapped at 4K: kvm_max_level_for_order(0)); a private page maps
    its guest_memfd frame, prepared, a shared one its host frame (check_invariants
    judges both)."""
    vm = sw_protected_vm(kv)
    vcpu = vm.create_vcpu()
    result = vcpu.access_many(pages(0, 1024), AccessFlags.WRITE)
    assert result.count == 1024 and result.exit is None
    np.testing.assert_array_equal(result.hpa[512:], pages(512, 512) + np.uint64(UADDR))
    assert (result.hpa[:512] >> np.uint64(12)).min() >= vm._memory.memslots.gmem_base
    assert (vcpu.stats["pf_taken"], vcpu.stats["pf_fixed"]) == (1024, 1024)
    assert vm.stats["pages_4k"] == 1024
    assert loop_faults(kv, vcpu) in (1024, None)
    assert vm.check_invariants() == []


def snp_vm(kv, size=4 * MIB):
    """SNP, ``size`` at GPA 0, its first half private; and the guest_memfd."""
    return gmem_vm(kv, VMType.SNP, size, size // 2, CVM_UADDR)


ENCRYPTED_WRITE = AccessFlags.WRITE | AccessFlags.ENCRYPTED


def test_an_snp_vm_faults_private_and_shared_pages_in_the_loop(kv):
    """C-bit writes to 512 private pages and plain writes to 512 shared ones, all first
    touches: a #NPF with GUEST_ENC is private (npf_interception), and its guest_memfd
    frame is prepared with its RMP entry assigned to the GPA, 4K, ASID 1, not yet
    validated (sev_gmem_prepare: rmp_make_private), which the guest's PVALIDATE then
    sets; a shared page maps its host frame and leaves its guest_memfd frame alone."""
    vm, gmem = snp_vm(kv)
    vcpu = vm.create_vcpu()
    private = vcpu.access_many(pages(0, 512), ENCRYPTED_WRITE)
    shared = vcpu.access_many(pages(512, 512), AccessFlags.WRITE)
    assert private.count == shared.count == 512 and private.exit is shared.exit is None
    assert private.hpa.tolist() == [gmem.pfn(i) << 12 for i in range(512)]
    np.testing.assert_array_equal(shared.hpa, pages(512, 512) + np.uint64(CVM_UADDR))
    for i in (0, 1, 511):
        assert vm.rmp_entry(gmem.pfn(i)) == RmpEntry(True, 1, i << 12, PG_LEVEL_4K, True, False)
    assert vm.rmp_entry(gmem.pfn(512)) == RmpEntry(False, 0, 0, PG_LEVEL_4K, False, False)
    assert (vcpu.stats["pf_taken"], vcpu.stats["pf_fixed"]) == (1024, 1024)
    assert vm.stats["pages_4k"] == 1024
    assert loop_faults(kv, vcpu) in (1024, None)
    assert vm.check_invariants() == []


def test_an_rmp_violation_leaves_the_loop_for_the_exit_handler(kv):
    """A C-bit-clear write to a page mapped private (an assigned frame) fails the RMP
    check: #NPF PRESENT|WRITE|USER|GUEST_FINAL|GUEST_RMP without GUEST_ENC, so the
    fault is shared while the attributes say private, and KVM exits with
    KVM_EXIT_MEMORY_FAULT (flags 0: shared); the batch stops there, after the ten
    private first touches the loop faulted in."""
    vm, gmem = snp_vm(kv)
    vcpu = vm.create_vcpu()
    flags = np.array([ENCRYPTED_WRITE] * 10 + [AccessFlags.WRITE], dtype=np.uint8)
    result = vcpu.access_many(np.concatenate([pages(0, 10), pages(5, 1)]), flags)
    assert result.count == 10 and result.exit == MemoryFaultExit(0, 0x5000, 4096)
    assert vcpu.stats["pf_taken"] == 11 and vcpu.stats["pf_fixed"] == 10
    assert loop_faults(kv, vcpu) in (10, None)
    assert vm.check_invariants() == []


TD_SHARED = 1 << 47     # a TD's shared bit with a 48-bit GPA width (GPAW 0)


def td(kv, size=4 * MIB):
    """A TD with ``size`` at GPA 0, all of it private; and the guest_memfd."""
    return gmem_vm(kv, VMType.TDX, size, size, CVM_UADDR)


def test_a_td_faults_private_and_shared_pages_in_the_loop(kv):
    """Reads of 512 private GPAs and, after the attributes of the upper half became shared,
    of 512 GPAs with the shared bit, all first touches: a private one is handled as a
    write (tdx_handle_ept_violation), maps its guest_memfd frame in the mirror root,
    added with TDH.MEM.PAGE.AUG and accepted by the guest; a shared one maps its host
    frame in the direct root."""
    vm, gmem = td(kv)
    vm.set_memory_attributes(2 * MIB, 2 * MIB, 0)
    vcpu = vm.create_vcpu()
    private = vcpu.access_many(pages(0, 512))
    shared = vcpu.access_many(pages(512, 512) | np.uint64(TD_SHARED))
    assert private.count == shared.count == 512 and private.exit is shared.exit is None
    assert private.hpa.tolist() == [gmem.pfn(i) << 12 for i in range(512)]
    np.testing.assert_array_equal(shared.hpa, pages(512, 512) + np.uint64(CVM_UADDR))
    for gpa in (0, 0x1000, 0x1FF000):
        assert vcpu.tdx_accept(gpa) == TdxModuleStatus.PAGE_ALREADY_ACCEPTED
    assert (vcpu.stats["pf_taken"], vcpu.stats["pf_fixed"]) == (1024, 1024)
    assert vm.stats["pages_4k"] == 1024
    assert loop_faults(kv, vcpu) in (1024, None)
    assert vm.check_invariants() == []


def test_a_td_fetch_from_shared_memory_fails_in_the_exit_handler(kv):
    """A TD's instruction fetch from a shared GPA is a KVM bug to tdx_handle_ept_violation:
    KVM_RUN fails with EIO, after the three shared first touches before it."""
    vm, _ = td(kv)
    vm.set_memory_attributes(0, 4 * MIB, 0)
    vcpu = vm.create_vcpu()
    gpas = pages(0, 4) | np.uint64(TD_SHARED)
    flags = np.array([0, 0, 0, AccessFlags.FETCH], dtype=np.uint8)
    with pytest.raises(KvmError, match="element 3") as info:
        vcpu.access_many(gpas, flags)
    assert info.value.errno == errno.EIO
    assert vcpu.stats["pf_taken"] == 3 and loop_faults(kv, vcpu) in (3, None)


def test_a_private_access_without_guest_memfd_is_a_memory_fault_from_the_loop(kv):
    """A private gfn in a memslot without guest_memfd: kvm_mmu_faultin_pfn exits to
    userspace with KVM_EXIT_MEMORY_FAULT (PRIVATE, the page), after the pages before
    it were faulted in."""
    vm = kv.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 * MIB,
                              userspace_addr=UADDR)
    vm.set_memory_attributes(2 * MIB, 2 * MIB, MemAttr.PRIVATE)
    vcpu = vm.create_vcpu()
    result = vcpu.access_many(pages(510, 4))
    assert result.count == 2
    assert result.exit == MemoryFaultExit(MEMORY_EXIT_FLAG_PRIVATE, 2 * MIB, 4096)
    assert vcpu.stats["pf_taken"] == 3 and loop_faults(kv, vcpu) in (2, None)


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_the_exit_limit_counts_the_faults_the_loop_took(kv, limit):
    """An access that does not settle within ``limit`` exits is a RuntimeError, also when
    the loop took its faults: a first touch needs one exit and one walk after it, which
    the limit of one does not allow (vcpu_run walks at most ``limit`` times)."""
    vm = default_vm(kv)
    vcpu = vm.create_vcpu()
    state = vcpu._c
    if limit == 2:
        result = state.access_many(pages(0, 3), 0, limit, None)
        assert result.count == 3 and vcpu.stats["pf_taken"] == 3
        return
    with pytest.raises(RuntimeError, match=f"element 0.* did not settle after {limit} exits"):
        state.access_many(pages(0, 3), 0, limit, None)
    assert vcpu.stats["pf_taken"] == limit and vcpu.stats["pf_fixed"] == limit


def test_vcpus_first_touching_the_same_pages_map_each_once(kv):
    """Two vCPU threads fault the same pages at once: every page is mapped exactly once
    (one pf_fixed per leaf installed; a fault that loses the race is spurious or
    retries), and both see the same translations."""
    n = 16_000 if kv.IMPLEMENTATION == "cython" else 600
    for _ in range(3):
        vm = default_vm(kv)
        vcpus = [vm.create_vcpu() for _ in range(2)]
        results = [None, None]

        def touch(k):
            results[k] = vcpus[k].access_many(pages(0, n), AccessFlags.WRITE)

        run_threads(lambda: touch(0), lambda: touch(1))
        for result in results:
            assert result.count == n and result.exit is None
            np.testing.assert_array_equal(result.hpa, pages(0, n) + np.uint64(UADDR))
        assert sum(v.stats["pf_fixed"] for v in vcpus) == n == vm.stats["pages_4k"]
        assert vm.check_invariants() == []


def test_vcpus_first_touching_guest_memfd_chunks_prepare_every_frame(kv):
    """Two vCPU threads fault the private pages of 32 MiB at once, one the even pages and
    one the odd, so that they meet in each chunk of 512 frame states: a chunk is made by
    the first fault that needs it (the other's stands aside), and every page is
    prepared and mapped once."""
    n = 4096 if kv.IMPLEMENTATION == "cython" else 256
    for _ in range(5 if kv.IMPLEMENTATION == "cython" else 1):
        vm = sw_protected_vm(kv, 64 * MIB)
        vcpus = [vm.create_vcpu() for _ in range(2)]
        ready = threading.Barrier(2)

        def touch(k):
            gpas = (np.arange(n, dtype=np.uint64) * np.uint64(2) + np.uint64(k)) << np.uint64(12)
            ready.wait()
            assert vcpus[k].access_many(gpas).exit is None

        run_threads(lambda: touch(0), lambda: touch(1))
        assert sum(v.stats["pf_fixed"] for v in vcpus) == 2 * n == vm.stats["pages_4k"]
        assert vm.check_invariants() == []


def race_on_private_pages(kv, make_vm, flags, check):
    """Two vCPU threads of a VM from ``make_vm(kv, size)`` (and its guest_memfd) access the
    same private pages at once with ``flags``, three times over on new VMs: both see
    every page's guest_memfd frame, every page is mapped once, and ``check(vm, vcpu,
    gmem, n)`` holds."""
    n = 2048 if kv.IMPLEMENTATION == "cython" else 128
    for _ in range(3 if kv.IMPLEMENTATION == "cython" else 1):
        vm, gmem = make_vm(kv, 4 * n * 4096)
        vcpus = [vm.create_vcpu() for _ in range(2)]
        results = [None, None]
        ready = threading.Barrier(2)

        def touch(k):
            ready.wait()
            results[k] = vcpus[k].access_many(pages(0, n), flags)

        run_threads(lambda: touch(0), lambda: touch(1))
        expected = [gmem.pfn(i) << 12 for i in range(n)]
        for result in results:
            assert result.count == n and result.exit is None
            assert result.hpa.tolist() == expected
        check(vm, vcpus[0], gmem, n)
        assert sum(v.stats["pf_fixed"] for v in vcpus) == n == vm.stats["pages_4k"]
        assert vm.check_invariants() == []


def test_snp_vcpus_first_touching_the_same_private_pages_assign_each_frame_once(kv):
    """Two vCPU threads make C-bit writes to the same private pages at once: each frame
    ends prepared, its RMP entry assigned for its GPA and validated."""
    def check(vm, vcpu, gmem, n):
        assert all(vm.rmp_entry(gmem.pfn(i)) == RmpEntry(True, 1, i << 12, PG_LEVEL_4K,
                                                         True, False) for i in range(n))
    race_on_private_pages(kv, snp_vm, ENCRYPTED_WRITE, check)


def test_td_vcpus_first_touching_the_same_private_pages_map_each_once(kv):
    """Two vCPU threads of a TD read the same private pages at once: a mirror SPTE is
    frozen while the S-EPT takes the page (set_external_spte_present), so a fault of
    the other vCPU that meets it retries; every page is added and accepted."""
    def check(vm, vcpu, gmem, n):
        assert all(vcpu.tdx_accept(i << 12) == TdxModuleStatus.PAGE_ALREADY_ACCEPTED
                   for i in range(0, n, 97))
    race_on_private_pages(kv, td, 0, check)


@pytest.mark.parametrize("vm_type", [VMType.SW_PROTECTED, VMType.TDX, VMType.SNP],
                         ids=["SW_PROTECTED", "TDX", "SNP"])
def test_conversions_racing_batches_leave_every_mapping_right(kv, vm_type):
    """Two vCPU threads fault 4 MiB in batches while a third converts 2 MiB halves
    between private and shared: after every conversion, and at the end, every mapping
    agrees with the attributes (a TD's mirror leaf only on a private gfn; the store
    changes under mmu_lock for write, and a fault takes the attributes and maps under it
    for read).  A fault that meets a conversion between its private decision and
    faultin's check exits with KVM_EXIT_MEMORY_FAULT for its page (the mismatch the
    error code carries), and the thread goes on after it:
    - on a TD (reads of private GPAs) and on SNP (C-bit writes) the access says
      private, so the exit is PRIVATE;
    - on SW_PROTECTED (writes) the attributes decide, either way.  The compiled core
      takes no such exit there: its loop holds mmu_lock from the decision to the map,
      and its exit handler runs both without letting another thread in; the twin's
      Python may let the conversion in between."""
    rounds = 40 if kv.IMPLEMENTATION == "cython" else 4
    if vm_type == VMType.SW_PROTECTED:
        vm, flags = sw_protected_vm(kv), AccessFlags.WRITE
        kinds = (MEMORY_EXIT_FLAG_PRIVATE, 0) if kv.IMPLEMENTATION == "python" else ()
    else:
        vm = (td if vm_type == VMType.TDX else snp_vm)(kv)[0]
        flags = AccessFlags(0) if vm_type == VMType.TDX else ENCRYPTED_WRITE
        kinds = (MEMORY_EXIT_FLAG_PRIVATE,)
    stop = threading.Event()

    def fault(seed):
        vcpu, rng = vm.create_vcpu(), np.random.default_rng(seed)
        while not stop.is_set():
            gpas = rng.integers(0, 1024, 2048, dtype=np.uint64) << np.uint64(12)
            while len(gpas):
                result = vcpu.access_many(gpas, flags)
                if result.exit is None:
                    break
                assert result.exit in [MemoryFaultExit(kind, int(gpas[result.count]), 4096)
                                       for kind in kinds]
                gpas = gpas[result.count + 1:]

    def convert():
        try:
            for k in range(rounds):
                vm.set_memory_attributes((k % 2) * 2 * MIB, 2 * MIB,
                                         MemAttr.PRIVATE if k % 4 >= 2 else 0)
                assert vm.check_invariants() == []
        finally:
            stop.set()

    run_threads(lambda: fault(1), lambda: fault(2), convert)
    assert vm.check_invariants() == []


def test_a_memslot_deleted_during_a_batch_leaves_no_mapping(kv):
    """A vCPU thread first-touches a memslot while another deletes it, before the batch
    starts or after it has taken some faults: the deletion waits for the batch's
    kvm->srcu section (synchronize_srcu), then zaps, so no leaf maps the deleted memslot
    once the deletion has returned; the batch ends at an MMIO exit (the gfn has no
    memslot any more) or completes before the deletion."""
    n = 1 << 18 if kv.IMPLEMENTATION == "cython" else 2048
    for faults in (0, n // 64, n // 4):
        vm = default_vm(kv)
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=1 << 30,
                                  userspace_addr=UADDR + (1 << 30))
        vcpu = vm.create_vcpu()
        started, done = threading.Event(), threading.Event()
        results = []

        def touch():
            started.set()
            try:
                results.append(vcpu.access_many(pages(1 << 18, n)))
            finally:
                done.set()

        def delete(faults=faults):
            started.wait()
            while vcpu.stats["pf_taken"] < faults and not done.is_set():
                pass                        # until the batch has taken that many faults
            vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=0,
                                      userspace_addr=UADDR + (1 << 30))
            assert vm.check_invariants() == []

        run_threads(touch, delete)
        result, = results
        assert result.exit is None or isinstance(result.exit, MmioExit)
        assert vm.check_invariants() == []


def test_a_memslot_change_waits_for_one_run_of_a_batch_not_all_of_it(kv):
    """A memslot change waits for the faults that read the old memslots
    (synchronize_srcu), not for a long batch of mapped accesses on another thread to
    end: the batch's GIL-free loop ends its srcu section at the next run boundary
    (LOCKED_RUN accesses) when memslots were published meanwhile.  The change is made
    once the batch has translated its first 1000 accesses (seen in its ``out=`` array),
    and must return while the batch still runs."""
    n = 1 << 23 if kv.IMPLEMENTATION == "cython" else 20_000
    vm = default_vm(kv)
    vcpu = vm.create_vcpu()
    vcpu.access_many(pages(0, 1 << 14))
    gpas = np.random.default_rng(1).integers(0, 1 << 14, n, dtype=np.uint64) << np.uint64(12)
    hpa, level = np.zeros(n, np.uint64), np.zeros(n, np.uint8)
    walked, added_while_walking = threading.Event(), []

    def walk():
        result = vcpu.access_many(gpas, out=(hpa, level))
        walked.set()
        assert result.count == n

    def add_memslot():
        while not level[1000] and not walked.is_set():
            pass                            # until the batch is well into its loop
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=2 * MIB,
                                  userspace_addr=UADDR + (1 << 30))
        added_while_walking.append(not walked.is_set())

    run_threads(walk, add_memslot)
    assert added_while_walking == [True]


def test_faults_and_memslot_moves_from_many_threads(kv):
    """Four vCPU threads fault random pages of two memslots while a fifth moves one
    memslot back and forth and changes the other's host mapping level: every mapping
    is right after each change and at the end (check_invariants)."""
    rounds, size = (6, 20_000) if kv.IMPLEMENTATION == "cython" else (2, 200)
    vm = default_vm(kv)
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MIB, memory_size=64 * MIB,
                              userspace_addr=UADDR + 64 * MIB)
    stop = threading.Event()

    def fault(seed):
        vcpu, rng = vm.create_vcpu(), np.random.default_rng(seed)
        for _ in range(rounds):
            gpas = rng.integers(0, (128 * MIB) >> 12, size, dtype=np.uint64) << np.uint64(12)
            result = vcpu.access_many(gpas, AccessFlags.WRITE)
            assert result.exit is None or isinstance(result.exit, MmioExit)
        stop.set()

    def change():
        for base, level in itertools.cycle([(192 * MIB, 1), (64 * MIB, 2)]):
            if stop.is_set():
                break
            vm.set_user_memory_region(slot=1, guest_phys_addr=base, memory_size=64 * MIB,
                                      userspace_addr=UADDR + 64 * MIB)
            vm.set_host_level(0, level)
            assert vm.check_invariants() == []

    run_threads(*[lambda s=s: fault(s) for s in range(4)], change)
    assert vm.check_invariants() == []
