"""``vm.trace``: the model's decisions as the kernel's tracepoints.

Formats and event order from docs/reference.md §14 (TP_printk of
kvm_page_fault, kvm_mmu_spte_requested, kvm_tdp_mmu_spte_changed,
kvm_mmu_set_spte; the order for a first-touch 4K fault); SPTE values from
docs/reference.md §10.2 and §10.3 (leaf 0x86000000ABCDEB77 / 0xABCDEE67, non-leaf 0x8000000000000907 / 0x827
plus the child table), table addresses from PT_BASE_HPA (table k at
0x800000000 + k * 4096; a 4K leaf sits in the table the level-2 SPTE links); exit qualification 0x182 / EXITINFO1 0x100000006 for a
not-present write (kvm-unit-tests; docs/reference.md §1.3).
"""

import io

import pytest

from kvmemu import MemFlag, VMType, _select

GIB = 1 << 30
NONPRESENT = "8000000000000000"


def traced_vm(kv, vm_type=VMType.DEFAULT, vendor=None, flags=0, gmem=False):
    vm = kv.VM(vm_type, vendor=vendor)
    lines = []
    vm.trace = lambda event, text: lines.append(f"{event}: {text}")
    kwargs = {"flags": flags}
    if gmem:
        kwargs = {"flags": flags | MemFlag.GUEST_MEMFD, "guest_memfd": vm.create_guest_memfd(GIB)}
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0xABCDE000, **kwargs)
    return vm, vm.create_vcpu(), lines


def test_first_touch_4k_ept_fault_in_kernel_order(kv):
    vm, vcpu, lines = traced_vm(kv)
    vcpu.rip = 0xFFFFFFFF81000123
    vcpu.access(0, write=True)
    assert lines == [
        "kvm_page_fault: vcpu 0 rip 0xffffffff81000123 address 0x0000000000000000 "
        "error_code 0x182",
        "kvm_mmu_spte_requested: gfn 0 pfn abcde level 1",
        f"kvm_tdp_mmu_spte_changed: as id 0 gfn 0 level 4 old_spte {NONPRESENT} "
        "new_spte 8000000800001907",
        f"kvm_tdp_mmu_spte_changed: as id 0 gfn 0 level 3 old_spte {NONPRESENT} "
        "new_spte 8000000800002907",
        f"kvm_tdp_mmu_spte_changed: as id 0 gfn 0 level 2 old_spte {NONPRESENT} "
        "new_spte 8000000800003907",
        f"kvm_tdp_mmu_spte_changed: as id 0 gfn 0 level 1 old_spte {NONPRESENT} "
        "new_spte 86000000abcdeb77",
        "kvm_mmu_set_spte: gfn 0 spte 86000000abcdeb77 (rwxu) level 1 at 800003000",
    ]


def test_npt_fault_and_read_only_flags(kv):
    vm, vcpu, lines = traced_vm(kv, vendor="svm")
    vcpu.access(0, write=True)
    assert lines[0] == ("kvm_page_fault: vcpu 0 rip 0x0 address 0x0000000000000000 "
                        "error_code 0x100000006")
    assert lines[2].endswith("new_spte 800001827")
    assert lines[-1] == "kvm_mmu_set_spte: gfn 0 spte abcdee67 (rwxu) level 1 at 800003000"

    vm, vcpu, lines = traced_vm(kv, vendor="svm", flags=MemFlag.READONLY)
    vcpu.access(0x1000)            # not host-writable: no W, no D, no MMU-writable
    assert lines[-1] == "kvm_mmu_set_spte: gfn 1 spte abcdf825 (r-xu) level 1 at 800003008"


def test_zap_is_traced_and_the_refault_reuses_the_tables(kv):
    vm, vcpu, lines = traced_vm(kv, VMType.SW_PROTECTED, gmem=True)
    vcpu.access(0)
    del lines[:]
    vm.set_memory_attributes(0, 4096, 8)
    assert lines == [f"kvm_tdp_mmu_spte_changed: as id 0 gfn 0 level 1 "
                     f"old_spte 86000000abcdeb77 new_spte {NONPRESENT}"]
    del lines[:]
    vcpu.access(0)                 # now private: the SW_PROTECTED synthesis, a gmem frame
    assert lines[0].endswith("error_code 0x181")
    assert lines[1] == "kvm_mmu_spte_requested: gfn 0 pfn 800000000 level 1"
    assert len(lines) == 4 and lines[3].endswith("(rwxu) level 1 at 800003000")


def test_private_faults_trace_what_the_vendor_passes(kv):
    # TDX: a private GPA is traced with error_code 0x2 (reference §2.3); SNP: with bit 49 (§2.5).
    vm, vcpu, lines = traced_vm(kv, VMType.TDX, gmem=True)
    vm.set_memory_attributes(0, GIB, 8)
    vcpu.access(0x5000)
    assert lines[0] == "kvm_page_fault: vcpu 0 rip 0x0 address 0x0000000000005000 error_code 0x2"
    vm, vcpu, lines = traced_vm(kv, VMType.SNP, gmem=True)
    vm.set_memory_attributes(0, GIB, 8)
    vcpu.access(0x5000, encrypted=True)
    assert lines[0].endswith("address 0x0000000000005000 error_code 0x2000500000004")


def test_mmio_requests_the_noslot_pfn_and_sets_no_spte_event(kv):
    vm, vcpu, lines = traced_vm(kv)
    vcpu.access(0x80000000)
    assert lines[1] == "kvm_mmu_spte_requested: gfn 80000 pfn 8000000000000000 level 1"
    assert not any(line.startswith("kvm_mmu_set_spte") for line in lines)


def test_file_sink_off_by_default_and_kept_by_restore(kv):
    vm, vcpu, _ = traced_vm(kv)
    snap = vm.snapshot()
    out = io.StringIO()
    vm.trace = out
    assert vm.trace is out
    vm.restore(snap)
    vcpu.access(0x2000)
    assert out.getvalue().splitlines()[-1] == (
        "kvm_mmu_set_spte: gfn 2 spte 86000000abce0b77 (rwxu) level 1 at 800003010")
    vm.trace = None
    vcpu.access(0x3000)
    assert len(out.getvalue().splitlines()) == 7
    assert kv.VM().trace is None
    with pytest.raises(TypeError):
        vm.trace = 42


def test_both_cores_trace_the_same_lines():
    outputs = []
    for name in ("cython", "python"):
        kv = _select.load(name)
        text = io.StringIO()
        for vm_type in VMType:
            vm = kv.VM(vm_type, nx_huge_pages=vm_type == VMType.DEFAULT)
            vm.trace = text
            kwargs = {}
            if vm.has_private_mem:
                kwargs = {"flags": MemFlag.GUEST_MEMFD,
                          "guest_memfd": vm.create_guest_memfd(GIB)}
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                                      userspace_addr=0x7F0000000000, host_level=3, **kwargs)
            vcpu = vm.create_vcpu()
            shared = vm.shared_bit
            for gpa in (0x1000, 0x201000, 0x40000000, 0x3000):
                vcpu.access(gpa | shared, write=True)
            if vm_type != VMType.TDX:
                vcpu.access(0x5000, fetch=True)
            if vm.has_private_mem:
                vm.set_memory_attributes(0x200000, 0x200000, 8)
                vcpu.access(0x201000, encrypted=vm_type == VMType.SNP)
        outputs.append(text.getvalue())
    assert outputs[0] == outputs[1]
    assert outputs[0].count("kvm_page_fault: ") >= 12


def test_tdx_shared_root_traces_gfns_without_the_shared_bit(kv):
    """tdp_iter (tdp_iter.c, 6.18) keeps iter->gfn canonical and ORs gfn_bits in only to
    index the table (tdp_iter_refresh_sptep); trace_kvm_tdp_mmu_spte_changed
    (handle_changed_spte) and trace_kvm_mmu_set_spte (tdp_mmu_map_handle_target_level)
    print iter->gfn.  A shared fault at GPA 1 << 47 | 0x5000 on a TD with GPAW 48 is
    traced at gfn 5, and so is the zap of that shared leaf."""
    vm, vcpu, lines = traced_vm(kv, VMType.TDX, gmem=True)
    vcpu.access((1 << 47) | 0x5000, write=True)
    gfns = [line.split(" gfn ")[1].split()[0] for line in lines[1:]]
    assert gfns == ["5", "0", "0", "0", "5", "5"]    # requested, levels 4..1, set_spte
    assert [line.split(":")[0] for line in lines[2:6]] == ["kvm_tdp_mmu_spte_changed"] * 4
    assert lines[-1].startswith("kvm_mmu_set_spte: gfn 5 ")
    del lines[:]
    vm.set_memory_attributes(0x5000, 4096, 8)             # private: the shared leaf goes
    assert len(lines) == 1
    assert lines[0].startswith("kvm_tdp_mmu_spte_changed: as id 0 gfn 5 level 1 ")
    assert lines[0].endswith(f"new_spte {NONPRESENT}")


def test_tdx_memslot_zap_goes_through_the_roots_in_list_order(kv):
    """kvm_tdp_mmu_unmap_gfn_range walks kvm->arch.tdp_mmu_roots, where
    kvm_tdp_mmu_alloc_root adds each root at the head (list_add_rcu) and
    mmu_alloc_direct_roots makes the mirror root first (mmu.c, tdp_mmu.c, 6.18): deleting
    a TD's memslot zaps the shared leaf (direct root) before the private one (mirror)."""
    vm, vcpu, lines = traced_vm(kv, VMType.TDX, gmem=True)
    vm.set_memory_attributes(0x3000, 4096, 8)
    vcpu.access(0x3000, write=True)                       # private, mirror root
    vcpu.access((1 << 47) | 0x5000, write=True)           # shared, direct root
    del lines[:]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0, userspace_addr=0)
    leaf_zaps = [line.split(" gfn ")[1].split()[0] for line in lines
                 if " level 1 " in line and line.endswith(f"new_spte {NONPRESENT}")]
    assert leaf_zaps == ["5", "3"]


def test_events_are_formatted_at_the_end_of_the_call(kv):
    """The sink sees the events only when the call that made them returns, in the
    kernel's order; a sink that calls back into the VM sees that call's events when it
    returns; a sink's exception is raised after every event was offered."""
    vm = kv.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB,
                              userspace_addr=0xABCDE000)
    vcpus = [vm.create_vcpu() for _ in range(12)]
    seen = []

    def sink(event, text):
        seen.append((event, text, vm.stats["pf_fixed"]))
        if len(seen) == 1:
            vcpus[3].access(0x2000)             # a fault made while the sink runs
        if event == "kvm_mmu_set_spte":
            raise RuntimeError(f"sink failed on {text}")

    vm.trace = sink
    with pytest.raises(RuntimeError, match="sink failed on gfn 2 "):
        vcpus[11].access(0x3FFFF000, write=True)
    changed = "kvm_tdp_mmu_spte_changed"
    assert [e for e, _, _ in seen] == (
        ["kvm_page_fault"]
        + ["kvm_page_fault", "kvm_mmu_spte_requested", changed, changed, "kvm_mmu_set_spte"]
        + ["kvm_mmu_spte_requested", changed, changed, changed, changed, "kvm_mmu_set_spte"])
    assert seen[0] == ("kvm_page_fault",
                       "vcpu 11 rip 0x0 address 0x000000003ffff000 error_code 0x182", 1)
    assert seen[1][1] == "vcpu 3 rip 0x0 address 0x0000000000002000 error_code 0x181"
    assert seen[5][1] == "gfn 2 spte 86000000abce0b77 (rwxu) level 1 at 800004010"
    assert seen[-1][1] == "gfn 3ffff spte 86000000ebcddb77 (rwxu) level 1 at 800003ff8"
    assert vm.stats["pf_fixed"] == 2
