"""``kvmemu demo``: a built-in guest workload on every VM type, and a report.

Per VM: three memslots (1 GiB backed by host 1G pages, 64 MiB by 2M pages, 16
MiB by 4K pages; guest_memfd-bound on VMs with private memory), then

1. random shared reads and writes over all of it (``VCPU.access_many``);
2. 4 MiB turned private: a TD or SNP guest simply accesses it as private, KVM
   exits with KVM_EXIT_MEMORY_FAULT and the VMM converts the page, as a VMM
   does; a SW_PROTECTED VM's VMM converts the range itself;
3. the same 4 MiB back to shared: a TD accesses it as shared and the VMM
   converts on the exits; an SNP or SW_PROTECTED guest asks first (SNP's page
   state change, a hypercall) and the VMM converts the range;
4. MMIO: pages without a memslot, each accessed twice (the second time KVM
   finds its MMIO SPTE).

Everything but the throughput column is deterministic.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from .constants import (MEMORY_EXIT_FLAG_PRIVATE, PAGE_SIZE, PG_LEVEL_1G, PG_LEVEL_2M,
                        PG_LEVEL_4K, AccessFlags, ExitReason, MemAttr, MemFlag, VMType)

MIB, GIB = 1 << 20, 1 << 30
#: (gpa, size, host level) of the demo's memslots.
SLOTS = ((0, GIB, PG_LEVEL_1G), (GIB, 64 * MIB, PG_LEVEL_2M), (2 * GIB, 16 * MIB, PG_LEVEL_4K))
#: The last 4 MiB of the 2M-backed slot, which phase 1 leaves alone: without an RMP
#: model, an SNP guest's encrypted access to a page already mapped shared would not
#: exit (docs/semantics.md).
PRIVATE_GPA, PRIVATE_SIZE = GIB + 60 * MIB, 4 * MIB
SHARED_RANGES = ((0, GIB), (GIB, 60 * MIB), (2 * GIB, 16 * MIB))
MMIO_GPA, MMIO_PAGES = 3 * GIB, 64
SEED = 2018


class _Guest:
    """One VM and vCPU, and the VMM loop that runs a stream of accesses."""

    def __init__(self, vm_type: VMType) -> None:
        import kvmemu

        self.vm = vm = kvmemu.VM(vm_type)
        uaddr = 0x7F0000000000
        for slot, (gpa, size, host_level) in enumerate(SLOTS):
            kwargs: dict[str, Any] = {}
            if vm.has_private_mem:
                kwargs = {"flags": MemFlag.GUEST_MEMFD,
                          "guest_memfd": vm.create_guest_memfd(size)}
            vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                                      userspace_addr=uaddr, host_level=host_level, **kwargs)
            uaddr += GIB
        self.vcpu = vm.create_vcpu()
        self.exits: Counter[str] = Counter()
        self.accesses = 0
        self.conversions = 0

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
            else:
                self.exits["mmio"] += 1
                done += 1
        self.accesses += len(gpas)

    def convert(self, gpa: int, size: int, private: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES, as a VMM does for a guest's conversion request."""
        self.vm.set_memory_attributes(gpa, size, MemAttr.PRIVATE if private else 0)
        self.conversions += 1


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
    # 1. Shared memory, at volume.
    gpas = _stream(rng, accesses, SHARED_RANGES) | shared
    flags = rng.integers(0, 2, accesses, dtype=np.uint8) * write
    start = time.perf_counter()
    guest.run(gpas, flags)
    seconds = time.perf_counter() - start
    # 2. and 3. To private and back: every page once in order, then at random.
    if vm.has_private_mem:
        region = [(PRIVATE_GPA, PRIVATE_SIZE)]
        pages = np.arange(PRIVATE_GPA, PRIVATE_GPA + PRIVATE_SIZE, PAGE_SIZE, dtype=np.uint64)
        for private in (True, False):
            if vm_type == VMType.SW_PROTECTED or (vm_type == VMType.SNP and not private):
                guest.convert(PRIVATE_GPA, PRIVATE_SIZE, private)   # asked for explicitly
            sequence = np.concatenate([pages, _stream(rng, accesses // 8, region)])
            if vm_type == VMType.TDX and not private:
                sequence |= shared
            encrypted = AccessFlags.ENCRYPTED if vm_type == VMType.SNP and private else 0
            guest.run(sequence, encrypted | AccessFlags.WRITE)
    # 4. MMIO, each page twice, reads then writes.
    mmio = (np.arange(MMIO_PAGES, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(MMIO_GPA)) | shared
    guest.run(mmio, 0)
    guest.run(mmio, int(AccessFlags.WRITE))
    stats = vm.stats
    return {"type": vm_type.name, "accesses": guest.accesses,
            "memory fault": guest.exits["memory fault"], "mmio": guest.exits["mmio"],
            "faults": stats["pf_taken"], "fixed": stats["pf_fixed"],
            "spurious": stats["pf_spurious"], "conversions": guest.conversions,
            "4K": stats["pages_4k"], "2M": stats["pages_2m"], "1G": stats["pages_1g"],
            "rate": accesses / seconds / 1e6}


def run_demo(accesses: int | None = None) -> int:
    """Print the report; returns the exit status."""
    import kvmemu

    if accesses is None:     # the twin runs ~25x slower on mapped accesses
        accesses = 400_000 if kvmemu.IMPLEMENTATION == "cython" else 20_000
    core = "compiled core" if kvmemu.IMPLEMENTATION == "cython" else "pure-Python twin"
    print(f"kvmemu {kvmemu.__version__} demo: the Linux 6.18 KVM TDP MMU fault path ({core})")
    print("guest memory: 1 GiB on host 1G pages, 64 MiB on 2M, 16 MiB on 4K; "
          f"MMIO at {MMIO_GPA:#x}")
    print(f"per VM: {accesses} random shared accesses; private VMs take {PRIVATE_SIZE // MIB} "
          "MiB private and back (memory-fault exits converted like a VMM); "
          f"{MMIO_PAGES} MMIO pages read and written")
    print()
    columns = [("VM type", "type", 12), ("accesses", "accesses", 9),
               ("mem-fault exits", "memory fault", 15), ("MMIO exits", "mmio", 10),
               ("faults", "faults", 7), ("fixed", "fixed", 6), ("spurious", "spurious", 8),
               ("conversions", "conversions", 11), ("4K", "4K", 5), ("2M", "2M", 4),
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
    print(f"exits: to userspace (KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO); faults: pf_taken; "
          f"4K/2M/1G: leaf SPTEs at the end; {time.perf_counter() - start:.2f} s in all")
    return 0
