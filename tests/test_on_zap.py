"""``VM.on_zap`` (docs/api.md §10): every mapping KVM removes or reduces, with its reason.

What each operation zaps follows the kernel: KVM_SET_MEMORY_ATTRIBUTES unmaps the
converted range (kvm_vm_set_mem_attributes -> kvm_unmap_gfn_range); deleting a memslot
zaps its gfns (kvm_arch_flush_shadow_memslot, kvm_mmu_zap_memslot, for a VM without the
SLOT_ZAP_ALL quirk); an MMU-notifier invalidation unmaps the shared mappings of the
range (kvm_mmu_notifier_invalidate_range_start), a huge leaf as a whole (tdp_mmu_zap_leafs
zaps a leaf that maps any gfn of the range); a guest_memfd punch-hole unmaps the private
mappings of the hole (kvm_gmem_invalidate_begin); enabling dirty logging without PML
write-protects every leaf (kvm_mmu_slot_apply_flags -> kvm_tdp_mmu_wrprot_slot), after
splitting huge pages (eager_page_split), and the split itself keeps the translation.
"""

import errno

import numpy as np
import pytest

from kvmemu import KvmError, MemAttr, MemFlag, VMType

GIB, MIB = 1 << 30, 1 << 20
UADDR = 0x7F0000000000


def pages(n, first=0):
    return (np.arange(n, dtype=np.uint64) + np.uint64(first)) << np.uint64(12)


def watched(vm):
    zaps = []
    vm.on_zap = lambda *args: zaps.append(args)
    return zaps


def test_conversions_and_memslot_deletion(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    gmem = vm.create_guest_memfd(GIB)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR,
                              flags=MemFlag.GUEST_MEMFD, guest_memfd=gmem)
    vcpu = vm.create_vcpu()
    zaps = watched(vm)
    assert vcpu.access_many(pages(8), 1).count == 8
    assert zaps == []                                        # faults reduce nothing
    vm.set_memory_attributes(0x2000, 0x4000, MemAttr.PRIVATE)
    assert zaps == [(2, 4, 1, "attributes")]                 # one run of four 4K leaves
    vcpu.access(0x3000)                                      # private now, from guest_memfd
    gmem.punch_hole(3 << 12, 4096)                           # file page 3 = gfn 3
    assert zaps[1:] == [(3, 1, 1, "gmem")]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0, userspace_addr=0)
    assert zaps[2:] == [(0, 2, 1, "memslot"), (6, 2, 1, "memslot")]


def test_a_host_invalidation_zaps_the_whole_huge_leaf(kv):
    vm = kv.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR,
                              host_level=2)
    vcpu = vm.create_vcpu()
    zaps = watched(vm)
    assert vcpu.access(0x201000).level == 2
    vm.invalidate_host_range(UADDR + 0x203000, 4096).end()
    assert zaps == [(0x200, 512, 2, "host")]


def test_dirty_logging_reports_write_protection_not_the_split(kv):
    vm = kv.VM(vendor="svm")                   # no PML: dirty logging write-protects
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR,
                              host_level=2)
    vcpu = vm.create_vcpu()
    zaps = watched(vm)
    vcpu.access(0x1000, write=True)                          # one 2M leaf, writable
    vcpu.access(0x400000)                                    # one 2M leaf (gfn 0x400), read
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR,
                              host_level=2, flags=MemFlag.LOG_DIRTY_PAGES)
    # eager split to 4K leaves (not reported), then every 4K leaf write-protected (a
    # read fault maps a writable slot writable too): one run per former 2M leaf.
    assert zaps == [(0, 512, 1, "dirty_log"), (0x400, 512, 1, "dirty_log")]
    assert vm.stats["pages_4k"] == 1024 and vm.stats["pages_2m"] == 0


def test_a_restore_drops_everything_and_the_callback_is_checked(kv):
    vm = kv.VM(VMType.DEFAULT)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR)
    vcpu = vm.create_vcpu()
    snap = vm.snapshot()
    zaps = watched(vm)
    vcpu.access(0x1000)
    vm.restore(snap)
    assert zaps == [(0, 1 << 36, 4, "zap_all")]              # 4-level: 2^36 gfns
    vm.restore(snap)                                         # nothing mapped: nothing to say
    assert len(zaps) == 1
    with pytest.raises(TypeError):
        vm.on_zap = 5
    assert vm.on_zap is not None
    vm.on_zap = None
    vcpu.access(0x1000)
    vm.restore(snap)
    assert len(zaps) == 1


def test_a_callback_that_raises_or_calls_back(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR)
    vcpu = vm.create_vcpu()
    vcpu.access_many(pages(4), 1)
    seen = []

    def on_zap(gfn, npages, level, reason):
        seen.append((gfn, reason, vm.memory_attribute_ranges()))
        if gfn == 0:
            vm.set_memory_attributes(0x3000, 0x1000, MemAttr.PRIVATE)   # calls back in
        raise RuntimeError("embedder failed")

    vm.on_zap = on_zap
    with pytest.raises(RuntimeError, match="embedder failed"):
        vm.set_memory_attributes(0, 0x1000, MemAttr.PRIVATE)
    # The conversion happened before the callback ran; the nested one was reported by
    # its own call (which raised inside the callback, and was counted as its error).
    assert [(g, r) for g, r, _ in seen] == [(0, "attributes"), (3, "attributes")]
    assert seen[0][2] == [(0, 1, MemAttr.PRIVATE)]           # (first gfn, end gfn, attrs)
    assert vm.memory_attribute_ranges() == [(0, 1, 8), (3, 4, 8)]
    assert vm.stats["pages_4k"] == 2 and vm.check_invariants() == []


def test_a_dead_vm_still_delivers_nothing_twice(kv):
    vm = kv.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=GIB, userspace_addr=UADDR)
    vcpu = vm.create_vcpu()
    zaps = watched(vm)
    vcpu.access(0x1000)
    vm.set_memory_attributes(0x1000, 0x1000, MemAttr.PRIVATE)
    vm.set_memory_attributes(0x1000, 0x1000, MemAttr.PRIVATE)   # no change: no zap
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(0x1001, 0x1000, MemAttr.PRIVATE)
    assert info.value.errno == errno.EINVAL
    assert zaps == [(1, 1, 1, "attributes")]
