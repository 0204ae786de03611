"""``kvmemu demo``: a built-in guest workload on every VM type, and a report.

Per VM: three memslots (1 GiB backed by host 1G pages, 64 MiB by 2M pages, 16
MiB by 4K pages; guest_memfd-bound on VMs with private memory), then

0. on VMs with private memory, the launch: a 1 MiB boot image made private and
   populated (a TD: KVM_TDX_INIT_MEM_REGION, then KVM_TDX_FINALIZE_VM; SNP:
   KVM_SEV_SNP_LAUNCH_UPDATE, then KVM_SEV_SNP_LAUNCH_FINISH; SW_PROTECTED:
   KVM_PRE_FAULT_MEMORY), and the guest reads it;
1. random shared reads and writes over all of the shared memory
   (``VCPU.access_many``);
2. 4 MiB turned private implicitly: a TD or SNP guest simply accesses it as
   private, KVM exits with KVM_EXIT_MEMORY_FAULT (on SNP through the RMP check for
   pages that phase 1 mapped shared), the VMM converts the page, and the guest
   accepts it (TDG.MEM.PAGE.ACCEPT) or validates it (PVALIDATE) before it uses
   it; a SW_PROTECTED VM's VMM converts the range itself;
3. the same 4 MiB back to shared with an explicit request: MapGPA (TD), a page
   state change after rescinding validation (SNP), KVM_HC_MAP_GPA_RANGE
   (SW_PROTECTED); the VMM answers each KVM_EXIT_HYPERCALL by converting the range;
   then the guest uses it shared, and the VMM punches the hole of its private
   backing (fallocate PUNCH_HOLE on the guest_memfd);
4. MMIO: pages without a memslot, each accessed twice (the second time KVM
   finds its MMIO SPTE).

Everything but the throughput column is deterministic.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from .constants import (KVM_HC_MAP_GPA_RANGE, MEMORY_EXIT_FLAG_PRIVATE, PAGE_SIZE,
                        PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, PVALIDATE_SUCCESS, AccessFlags,
                        ExitReason, MapGpaFlag, MemAttr, MemFlag, TdxModuleStatus, VMType)
from .results import HypercallExit

MIB, GIB = 1 << 20, 1 << 30
#: (gpa, size, host level) of the demo's memslots.
SLOTS = ((0, GIB, PG_LEVEL_1G), (GIB, 64 * MIB, PG_LEVEL_2M), (2 * GIB, 16 * MIB, PG_LEVEL_4K))
#: The 4 MiB that go private and back: in the 2M-backed slot, where phase 1's
#: shared accesses also go (so SNP's RMP check meets pages mapped shared).
PRIVATE_GPA, PRIVATE_SIZE = GIB + 60 * MIB, 4 * MIB
#: The boot image a confidential VM's launch populates: the start of the 4K slot.
BOOT_GPA, BOOT_SIZE = 2 * GIB, 1 * MIB
SHARED_RANGES = ((0, GIB), (GIB, 64 * MIB), (BOOT_GPA + BOOT_SIZE, 15 * MIB))
MMIO_GPA, MMIO_PAGES = 3 * GIB, 64
SEED = 2018


class _Guest:
    """One VM and vCPU, and the VMM loop that runs a stream of accesses."""

    def __init__(self, vm_type: VMType) -> None:
        import kvmemu

        self.vm = vm = kvmemu.VM(vm_type)
        vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
        uaddr = 0x7F0000000000
        self.gmem: list[Any] = []
        for slot, (gpa, size, host_level) in enumerate(SLOTS):
            kwargs: dict[str, Any] = {}
            if vm.has_private_mem:
                self.gmem.append(vm.create_guest_memfd(size))
                kwargs = {"flags": MemFlag.GUEST_MEMFD, "guest_memfd": self.gmem[-1]}
            vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                                      userspace_addr=uaddr, host_level=host_level, **kwargs)
            uaddr += GIB
        self.vcpu = vm.create_vcpu()
        self.exits: Counter[str] = Counter()
        self.accesses = 0
        self.conversions = 0
        self.accepted = 0

    def run(self, gpas: Any, flags: Any) -> None:
        """Run ``gpas`` to the end like a VMM: convert on a memory-fault exit (what the
        guest asked for: private if the exit says so, else shared) and resume; on an
        MMIO exit, emulate (here: nothing) and go on with the next access."""
        done = 0
        while done < len(gpas):
            batch = self.vcpu.access_many(gpas[done:], flags if isinstance(flags, int)
                                          else flags[done:])
            done += batch.count
            exit_ = batch.exit
            if exit_ is None:
                break
            if exit_.exit_reason == ExitReason.MEMORY_FAULT:
                self.exits["memory fault"] += 1
                private = exit_.flags & MEMORY_EXIT_FLAG_PRIVATE
                self.convert(exit_.gpa, exit_.size, private)
                if private:
                    self.accept(exit_.gpa)
            else:
                self.exits["mmio"] += 1
                done += 1
        self.accesses += len(gpas)

    def convert(self, gpa: int, size: int, private: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES, as a VMM does for a guest's conversion request."""
        self.vm.set_memory_attributes(gpa, size, MemAttr.PRIVATE if private else 0)
        self.conversions += 1

    def accept(self, gpa: int) -> None:
        """The guest takes a page it made private: TDG.MEM.PAGE.ACCEPT (TD), PVALIDATE
        (SNP); a page its launch populated is already accepted / validated."""
        vm_type = self.vm.vm_type
        if vm_type == VMType.TDX:
            status = self.vcpu.tdx_accept(gpa)
            assert status in (TdxModuleStatus.SUCCESS, TdxModuleStatus.PAGE_ALREADY_ACCEPTED)
            self.accepted += status == TdxModuleStatus.SUCCESS
        elif vm_type == VMType.SNP:
            self.accepted += self.vcpu.pvalidate(gpa) == PVALIDATE_SUCCESS

    def request(self, result: Any) -> None:
        """The VMM's side of the guest's explicit request: each KVM_EXIT_HYPERCALL
        (KVM_HC_MAP_GPA_RANGE) converts the range it names, then is answered with 0."""
        while isinstance(result, HypercallExit):
            self.exits["hypercall"] += 1
            gpa, npages, attrs = result.args[:3]
            self.convert(gpa, npages * PAGE_SIZE, attrs & MapGpaFlag.ENCRYPTED)
            result = self.vcpu.complete_hypercall(0)

    def launch(self) -> None:
        """Populate the boot image and end the launch; the guest reads it."""
        vm = self.vm
        self.convert(BOOT_GPA, BOOT_SIZE, True)
        if vm.vm_type == VMType.TDX:
            vm.tdx_init_mem_region(BOOT_GPA, BOOT_SIZE)
            vm.tdx_finalize_vm()
        elif vm.vm_type == VMType.SNP:
            vm.snp_launch_update(BOOT_GPA, BOOT_SIZE)
            vm.snp_launch_finish()
        else:
            self.vcpu.pre_fault_memory(BOOT_GPA, BOOT_SIZE)
        encrypted = AccessFlags.ENCRYPTED if vm.vm_type == VMType.SNP else 0
        self.run(np.arange(BOOT_GPA, BOOT_GPA + BOOT_SIZE, PAGE_SIZE, dtype=np.uint64),
                 int(encrypted))

    def share(self, gpa: int, size: int) -> None:
        """The guest's explicit request to make [gpa, gpa + size) shared."""
        vm, vcpu = self.vm, self.vcpu
        if vm.vm_type == VMType.TDX:
            self.request(vcpu.tdvmcall_map_gpa(gpa | vm.shared_bit, size))
        elif vm.vm_type == VMType.SNP:
            for page in range(gpa, gpa + size, PAGE_SIZE):       # rescind first
                vcpu.pvalidate(page, validate=False)
            entries = [((gpa + offset) >> 12, 2, True) for offset in range(0, size, 2 * MIB)]
            self.request(vcpu.snp_page_state_change(entries))
        else:
            self.request(vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, size // PAGE_SIZE, 0))

    def discard(self, gpa: int, size: int) -> None:
        """The VMM frees the private backing of a range now shared (PUNCH_HOLE)."""
        gmem_offset = gpa - SLOTS[1][0]
        self.gmem[1].punch_hole(gmem_offset, size)


def _stream(rng: Any, count: int, ranges: Any) -> Any:
    """``count`` random page-offset GPAs, spread over ``ranges`` by size."""
    sizes = np.array([size for _, size in ranges], dtype=np.float64)
    which = rng.choice(len(ranges), size=count, p=sizes / sizes.sum())
    starts = np.array([gpa for gpa, _ in ranges], dtype=np.uint64)[which]
    pages = (rng.random(count) * (sizes[which] // PAGE_SIZE)).astype(np.uint64)
    return starts + pages * np.uint64(PAGE_SIZE) + rng.integers(0, PAGE_SIZE, count, dtype=np.uint64)


def run_vm(vm_type: VMType, accesses: int) -> dict[str, Any]:
    """The demo workload on one VM type; its figures."""
    rng = np.random.default_rng(SEED)
    guest = _Guest(vm_type)
    vm = guest.vm
    shared = np.uint64(vm.shared_bit)
    write = np.uint8(AccessFlags.WRITE)
    if vm.has_private_mem:
        guest.launch()
    # 1. Shared memory, at volume.
    gpas = _stream(rng, accesses, SHARED_RANGES) | shared
    flags = rng.integers(0, 2, accesses, dtype=np.uint8) * write
    start = time.perf_counter()
    guest.run(gpas, flags)
    seconds = time.perf_counter() - start
    # 2. To private, implicitly (the guest's accesses), and 3. back, explicitly.
    if vm.has_private_mem:
        region = [(PRIVATE_GPA, PRIVATE_SIZE)]
        pages = np.arange(PRIVATE_GPA, PRIVATE_GPA + PRIVATE_SIZE, PAGE_SIZE, dtype=np.uint64)
        if vm_type == VMType.SW_PROTECTED:
            guest.convert(PRIVATE_GPA, PRIVATE_SIZE, True)
        encrypted = AccessFlags.ENCRYPTED if vm_type == VMType.SNP else 0
        guest.run(np.concatenate([pages, _stream(rng, accesses // 8, region)]),
                  int(encrypted | AccessFlags.WRITE))
        guest.share(PRIVATE_GPA, PRIVATE_SIZE)
        guest.run(np.concatenate([pages, _stream(rng, accesses // 8, region)]) | shared,
                  int(AccessFlags.WRITE))
        guest.discard(PRIVATE_GPA, PRIVATE_SIZE)
    # 4. MMIO, each page twice, reads then writes.
    mmio = (np.arange(MMIO_PAGES, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(MMIO_GPA)) | shared
    guest.run(mmio, 0)
    guest.run(mmio, int(AccessFlags.WRITE))
    stats = vm.stats
    return {"type": vm_type.name, "accesses": guest.accesses,
            "memory fault": guest.exits["memory fault"], "mmio": guest.exits["mmio"],
            "hypercall": guest.exits["hypercall"], "accepted": guest.accepted,
            "faults": stats["pf_taken"], "fixed": stats["pf_fixed"],
            "spurious": stats["pf_spurious"], "conversions": guest.conversions,
            "4K": stats["pages_4k"], "2M": stats["pages_2m"], "1G": stats["pages_1g"],
            "rate": accesses / seconds / 1e6}


def run_demo(accesses: int | None = None, as_json: bool = False) -> int:
    """Print the report (or, ``as_json``, one JSON object with a row per VM type);
    returns the exit status."""
    import json

    import kvmemu

    if accesses is None:     # the twin runs ~25x slower on mapped accesses
        accesses = 400_000 if kvmemu.IMPLEMENTATION == "cython" else 20_000
    if as_json:
        start = time.perf_counter()
        rows = [run_vm(vm_type, accesses) for vm_type in VMType]
        print(json.dumps({"version": kvmemu.__version__, "implementation":
                          kvmemu.IMPLEMENTATION, "accesses_per_vm": accesses,
                          "seconds": round(time.perf_counter() - start, 3),
                          "vms": [dict(row, rate_maccess_per_s=round(row.pop("rate"), 2))
                                  for row in rows]}))
        return 0
    core = "compiled core" if kvmemu.IMPLEMENTATION == "cython" else "pure-Python twin"
    print(f"kvmemu {kvmemu.__version__} demo: the Linux 6.18 KVM TDP MMU fault path ({core})")
    print("guest memory: 1 GiB on host 1G pages, 64 MiB on 2M, 16 MiB on 4K; "
          f"MMIO at {MMIO_GPA:#x}")
    print(f"per VM: {accesses} random shared accesses; VMs with private memory populate a "
          f"{BOOT_SIZE // MIB} MiB boot image at launch, take {PRIVATE_SIZE // MIB} MiB private "
          "(memory-fault exits converted like a VMM) and give it back with an explicit "
          f"request; {MMIO_PAGES} MMIO pages read and written")
    print()
    columns = [("VM type", "type", 12), ("accesses", "accesses", 9),
               ("mem-fault exits", "memory fault", 15), ("hypercall exits", "hypercall", 15),
               ("MMIO exits", "mmio", 10),
               ("faults", "faults", 7), ("fixed", "fixed", 6), ("spurious", "spurious", 8),
               ("conversions", "conversions", 11), ("accepted", "accepted", 8),
               ("4K", "4K", 5), ("2M", "2M", 4),
               ("1G", "1G", 3)]
    header = "  ".join(f"{title:<{w}}" if key == "type" else f"{title:>{w}}"
                       for title, key, w in columns)
    print(f"{header}  shared Maccess/s")
    start = time.perf_counter()
    for vm_type in VMType:
        row = run_vm(vm_type, accesses)
        cells = "  ".join(f"{row[key]:<{w}}" if key == "type" else f"{row[key]:>{w}}"
                          for _, key, w in columns)
        print(f"{cells}  {row['rate']:>16.1f}")
    print()
    print("exits: to userspace (KVM_EXIT_MEMORY_FAULT, KVM_EXIT_HYPERCALL, KVM_EXIT_MMIO); "
          "faults: pf_taken; fixed / spurious: pf_fixed / pf_spurious; conversions: "
          "KVM_SET_MEMORY_ATTRIBUTES calls; accepted: pages the guest accepted (TDX) or "
          "validated (SNP); 4K/2M/1G: leaf SPTEs at the end; shared Maccess/s: phase 1's "
          f"rate; {time.perf_counter() - start:.2f} s in all")
    return 0
