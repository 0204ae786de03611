"""Every public entry point rejects bad arguments cleanly, alike on both cores.

One table: (entry point, argument, bad value, exception, words the message must
contain).  Each row runs against a small VM (a guest_memfd memslot, a vCPU, a
snapshot) and a standalone PageTables, and the VM's whole state, including its
tables, must be unchanged after the rejected call.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from kvmemu import KvmError

U64_OVER = 1 << 64
ARRAY = np.array([0x1000], dtype=np.uint64)


def world(kv):
    vm = kv.VM(1)
    gmem = vm.create_guest_memfd(2 << 20)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=2 << 20,
                              userspace_addr=1 << 40, flags=4, guest_memfd=gmem)
    vcpu = vm.create_vcpu()
    vcpu.access(0x1000, write=True)
    pt = kv.PageTables("ept")
    pt.set_entry(0x1000, 1, 0x7)
    return {"kv": kv, "vm": vm, "gmem": gmem, "vcpu": vcpu, "pt": pt}


def fingerprint(w):
    vm, vcpu, pt = w["vm"], w["vcpu"], w["pt"]
    return (repr(vm), vm.stats, [tuple(s) for s in vm.memslots], vm.memory_attribute_ranges(),
            vm.lpage_info(0, 2), vm.mmu_invalidate_seq, vm.memslots_generation(0),
            vm.page_tables.tables.tobytes(), vcpu.run.exit_reason, vcpu.run.memory_fault,
            pt.tables.tobytes(), repr(pt), len(w["vm"]._gmem))


def region(**bad):
    args = dict(slot=3, guest_phys_addr=1 << 30, memory_size=0x1000, userspace_addr=1 << 41)
    return lambda w: w["vm"].set_user_memory_region(**{**args, **bad})


CASES = [
    # The module's functions
    ("vmx_error_code", lambda w: w["kv"].vmx_error_code(-1, 0), OverflowError, "exit_qualification"),
    ("vmx_error_code", lambda w: w["kv"].vmx_error_code(0, 1.5), TypeError, "gpa"),
    ("vmx_error_code", lambda w: w["kv"].vmx_error_code(0, 0, U64_OVER), OverflowError, "shared_bit"),
    ("vmx_error_code", lambda w: w["kv"].vmx_error_code(ARRAY.astype(np.int64), 0), TypeError, "exit_qualification"),
    ("vmx_error_code", lambda w: w["kv"].vmx_error_code(ARRAY.reshape(1, 1), 0), ValueError, "exit_qualification"),
    ("vmx_error_code", lambda w: w["kv"].vmx_error_code(ARRAY, 0, out=np.zeros(2, np.uint64)), ValueError, "out"),
    ("svm_error_code", lambda w: w["kv"].svm_error_code("0x4"), TypeError, "exit_info_1"),
    ("svm_error_code", lambda w: w["kv"].svm_error_code(4, snp=2), ValueError, "snp"),
    ("tdx_shared_bit", lambda w: w["kv"].tdx_shared_bit(47), ValueError, "gpaw"),
    ("tdx_shared_bit", lambda w: w["kv"].tdx_shared_bit(None), TypeError, "gpaw"),
    ("Translation", lambda w: w["kv"].Translation(-1, 1), OverflowError, "hpa"),
    ("Translation", lambda w: w["kv"].Translation(1.5, 1), TypeError, "hpa"),
    ("EptViolation", lambda w: w["kv"].EptViolation(0, U64_OVER), OverflowError, "exit_qualification"),
    ("NestedPageFault", lambda w: w["kv"].NestedPageFault("0", 4), TypeError, "gpa"),
    ("MemoryFaultExit", lambda w: w["kv"].MemoryFaultExit(8, np.int64(-1), 4096), OverflowError, "gpa"),
    ("MmioExit", lambda w: w["kv"].MmioExit(0, 2), ValueError, "is_write"),
    # VM(...)
    ("VM", lambda w: w["kv"].VM(6), ValueError, "vm_type"),
    ("VM", lambda w: w["kv"].VM(1.0), TypeError, "vm_type"),
    ("VM", lambda w: w["kv"].VM(0, vendor="arm"), ValueError, "vendor"),
    ("VM", lambda w: w["kv"].VM(2, vendor="vmx"), ValueError, "vendor"),
    ("VM", lambda w: w["kv"].VM(5, gpaw=47), ValueError, "gpaw"),
    ("VM", lambda w: w["kv"].VM(0, nx_huge_pages=None), TypeError, "nx_huge_pages"),
    # VM methods: KVM's errnos where the ioctl would fail
    ("create_guest_memfd", lambda w: w["vm"].create_guest_memfd(-4096), OverflowError, "size"),
    ("create_guest_memfd", lambda w: w["vm"].create_guest_memfd(0x800), (KvmError, errno.EINVAL), "size"),
    ("create_guest_memfd", lambda w: w["vm"].create_guest_memfd(4096, 1.0), TypeError, "flags"),
    ("set_user_memory_region", region(slot=1 << 32), OverflowError, "slot"),
    ("set_user_memory_region", region(guest_phys_addr=-4096), OverflowError, "guest_phys_addr"),
    ("set_user_memory_region", region(memory_size=np.float64(4096)), TypeError, "memory_size"),
    ("set_user_memory_region", region(userspace_addr=None), TypeError, "userspace_addr"),
    ("set_user_memory_region", region(flags=1 << 32), OverflowError, "flags"),
    ("set_user_memory_region", region(flags=4, guest_memfd="fd"), (KvmError, errno.EINVAL), "guest_memfd"),
    ("set_user_memory_region", region(flags=4), (KvmError, errno.EBADF), "guest_memfd"),
    ("set_user_memory_region", region(guest_memfd_offset=U64_OVER), OverflowError, "guest_memfd_offset"),
    ("set_user_memory_region", region(host_level=4), ValueError, "host_level"),
    ("set_user_memory_region", region(guest_phys_addr=0), (KvmError, errno.EEXIST), "overlaps"),
    ("set_memory_attributes", lambda w: w["vm"].set_memory_attributes(-4096, 4096, 8), OverflowError, "address"),
    ("set_memory_attributes", lambda w: w["vm"].set_memory_attributes(0, "4096", 8), TypeError, "size"),
    ("set_memory_attributes", lambda w: w["vm"].set_memory_attributes(0, 4096, 1), (KvmError, errno.EINVAL), "attributes"),
    ("set_memory_attributes", lambda w: w["vm"].set_memory_attributes(0, 4096, 8, 1), (KvmError, errno.EINVAL), "flags"),
    ("get_memory_attributes", lambda w: w["vm"].get_memory_attributes(U64_OVER), OverflowError, "gfn"),
    ("find_memslot", lambda w: w["vm"].find_memslot(ARRAY), TypeError, "gfn"),
    ("find_memslots", lambda w: w["vm"].find_memslots([1]), TypeError, "gfns"),
    ("lpage_info", lambda w: w["vm"].lpage_info(0, 1), ValueError, "level"),
    ("lpage_info", lambda w: w["vm"].lpage_info(7, 2), ValueError, "slot"),
    ("memslots_generation", lambda w: w["vm"].memslots_generation(1), ValueError, "as_id"),
    ("restore", lambda w: w["vm"].restore(None), TypeError, "snapshot"),
    ("restore", lambda w: w["vm"].restore(w["kv"].VM(1, gpaw=52).snapshot()), ValueError,
     "snapshot"),
    ("GuestMemfd.pfn", lambda w: w["gmem"].pfn(-1), OverflowError, "page"),
    ("GuestMemfd.pfn", lambda w: w["gmem"].pfn(512), ValueError, "page"),
    ("GuestMemfd.pfn", lambda w: w["gmem"].pfn(1.0), TypeError, "page"),
    # VCPU
    ("access", lambda w: w["vcpu"].access(-1), OverflowError, "gpa"),
    ("access", lambda w: w["vcpu"].access(1 << 48), ValueError, "gpa"),
    ("access", lambda w: w["vcpu"].access(0, write=2), ValueError, "write"),
    ("access", lambda w: w["vcpu"].access(0, stage="guest"), ValueError, "stage"),
    ("access", lambda w: w["vcpu"].access(0, fetch=True, stage="walk"), ValueError, "fetch"),
    ("access_many", lambda w: w["vcpu"].access_many(ARRAY.astype(np.float64)), TypeError, "gpas"),
    ("access_many", lambda w: w["vcpu"].access_many(ARRAY, np.zeros(2, np.uint8)), ValueError, "flags"),
    ("access_many", lambda w: w["vcpu"].access_many(ARRAY, np.zeros(1, np.int8)), TypeError, "flags"),
    ("access_many", lambda w: w["vcpu"].access_many(ARRAY, np.full(1, 0x40, np.uint8)), ValueError, "flags[0]"),
    ("access_many", lambda w: w["vcpu"].access_many(ARRAY, 64), ValueError, "flags"),
    ("handle_ept_violation", lambda w: w["vcpu"].handle_ept_violation(0, U64_OVER), OverflowError, "exit_qualification"),
    ("handle_ept_misconfig", lambda w: w["vcpu"].handle_ept_misconfig(None), TypeError, "gpa"),
    ("handle_npf", lambda w: w["vcpu"].handle_npf(0, 4), ValueError, "handle_npf"),
    ("stage_hook", lambda w: setattr(w["vcpu"], "stage_hook", 1), TypeError, "stage_hook"),
    # PageTables
    ("PageTables", lambda w: w["kv"].PageTables("nested"), ValueError, "kind"),
    ("PageTables", lambda w: w["kv"].PageTables("ept", 3), ValueError, "levels"),
    ("PageTables", lambda w: w["kv"].PageTables("ept", maxphyaddr=53), ValueError, "maxphyaddr"),
    ("PageTables", lambda w: w["kv"].PageTables("npt", host_nx="yes"), TypeError, "host_nx"),
    ("set_entry", lambda w: w["pt"].set_entry(0, 0, 7), ValueError, "level"),
    ("set_entry", lambda w: w["pt"].set_entry(0, 1, -7), OverflowError, "value"),
    ("set_entry", lambda w: w["pt"].set_entry(0x1000, 1, np.float64(7)), TypeError, "value"),
    ("get_entry", lambda w: w["pt"].get_entry(U64_OVER, 1), OverflowError, "gpa"),
    ("walk", lambda w: w["pt"].walk(1 << 48), ValueError, "gpa"),
    ("translate", lambda w: w["pt"].translate(0, user=None), TypeError, "user"),
    ("translate_many", lambda w: w["pt"].translate_many(ARRAY, 0x80), ValueError, "flags"),
    ("set_entry", lambda w: w["vm"].page_tables.set_entry(0, 1, 7), ValueError, "only KVM"),
]


@pytest.mark.parametrize("name, call, error, words", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_is_rejected_and_changes_nothing(kv, name, call, error, words):
    w = world(kv)
    before = fingerprint(w)
    err, code = error if isinstance(error, tuple) else (error, None)
    with pytest.raises(err) as info:
        call(w)
    assert type(info.value) is err
    assert words in str(info.value)
    if code is not None:
        assert info.value.errno == code
    assert fingerprint(w) == before


def test_kvms_tables_take_no_writes_from_outside(kv):
    """A VM's tables hold what KVM wrote and nothing else: set_entry refuses them (a
    non-leaf entry pointing at no table, then a fault over it and a snapshot, once made
    the next table allocation write past the storage), and the PageTables offers no
    unchecked storage mutators."""
    vm = kv.VM()
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 21,
                              userspace_addr=1 << 40)
    vm.create_vcpu().access(0x1000, write=True)
    before = vm.page_tables.tables
    for level in (1, 2, 3, 4):
        with pytest.raises(ValueError, match="only KVM writes them"):
            vm.page_tables.set_entry(0x1000, level, 0x7)
    assert (vm.page_tables.tables == before).all()
    assert vm.page_tables.get_entry(0x1000, 1) == before[3, 1]
    with pytest.raises(ValueError, match="only KVM writes them"):
        vm.page_tables.store(3, 1, 0x7)
    for name in ("kvm_alloc", "kvm_free", "kvm_fill", "kvm_set"):
        assert not hasattr(kv.PageTables, name)
    assert vm.check_invariants() == []


def test_checked_table_access(kv):
    pt = kv.PageTables("npt")
    assert pt.hpa(0) == pt.root_hpa
    assert pt.table_at(pt.root_hpa) == 0
    assert pt.table_at(pt.root_hpa + 4096) == -1
    assert pt.entry(-1, 3) == 0
    pt.store(0, 511, 0x1234)
    assert pt.entry(0, 511) == 0x1234 == pt.tables[0, 511]
    for table, index in ((1, 0), (0, 512), (-2, 0)):
        with pytest.raises(IndexError):
            pt.entry(table, index)
        with pytest.raises(IndexError):
            pt.store(table, index, 0)
