"""A real x86-64 guest in Unicorn whose memory is second-stage translated by kvmemu.

Unicorn runs the guest's instructions; kvmemu plays the hypervisor's MMU. Each vCPU
is a thread with its own Unicorn instance, which starts with no memory at all: when
the guest touches an unmapped page, Unicorn's unmapped-memory hook asks kvmemu
(``vcpu.access``): the hardware walk of KVM's tables, the EPT violation, KVM's
fault handler, the retried walk. Only when that translates is the host page behind
it mapped into that Unicorn at the GPA. A KVM_EXIT_MEMORY_FAULT is handled the way
a VMM does: convert the memory attributes, then run again.

Unicorn's mappings are a cache of KVM's, so they must go when KVM's go: ``vm.on_zap``
reports every mapping KVM removes or reduces, and each vCPU drops the pages it was
told about before it runs guest code again (as a KVM vCPU flushes its TLB on the
request a zap makes, before it re-enters the guest).

The guest, on two vCPUs: each sums half of an array of 8192 u64 and stores its sum
in a page the VMM had marked private on this SW_PROTECTED VM, without a guest_memfd
to back it: the first store exits with KVM_EXIT_MEMORY_FAULT (flags PRIVATE), and
the VMM converts the page to shared. Then the VMM makes the page private again
(both vCPUs have it mapped by then: KVM zaps it, ``on_zap`` says so), and each vCPU
stores once more: without ``on_zap`` those stores would land in the stale Unicorn
mapping; with it they exit to the VMM, which converts the page back.

Run: ``python examples/unicorn_guest.py [--trace]`` (needs ``pip install unicorn``).
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading

from unicorn import (UC_ARCH_X86, UC_HOOK_MEM_UNMAPPED, UC_MEM_FETCH_UNMAPPED,
                     UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_PROT_ALL, Uc)
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RIP

import kvmemu
from kvmemu import ExitReason, MemAttr, Translation, VMType

PAGE = 4096
UADDR = 0x7F0000000000             # the VMM's userspace mapping of guest memory
CODE, DATA, RESULT = 0x1000, 0x200000, 0x300000
N = 8192                           # u64 elements: 16 pages, half per vCPU
SLICE = 4096                       # instructions a vCPU runs between two looks at its zaps


def sum_program(first: int, count: int, out: int) -> bytes:
    """rax = sum of the ``count`` u64 at ``first``; [out] = rax."""
    return (b"\x48\xbe" + struct.pack("<Q", first)      # mov rsi, first
            + b"\x48\xb9" + struct.pack("<Q", count)    # mov rcx, count
            + b"\x31\xc0"                               # xor eax, eax
            + b"\x48\x03\x06"                           # loop: add rax, [rsi]
            + b"\x48\x83\xc6\x08"                       #       add rsi, 8
            + b"\x48\xff\xc9"                           #       dec rcx
            + b"\x75\xf4"                               #       jnz loop
            + b"\x48\xbf" + struct.pack("<Q", out)      # mov rdi, out
            + b"\x48\x89\x07")                          # mov [rdi], rax


def store_program(out: int) -> bytes:
    """[out] = rax (rax set by the caller)."""
    return b"\x48\xbf" + struct.pack("<Q", out) + b"\x48\x89\x07"


class HostMemory:
    """Host RAM, one ctypes page per host frame, created on first use (shared by the
    vCPU threads: a lock guards the table of pages, not their bytes)."""

    def __init__(self) -> None:
        self.pages: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.lock = threading.Lock()

    def page(self, hpa: int) -> ctypes.Array[ctypes.c_char]:
        with self.lock:
            return self.pages.setdefault(hpa & ~(PAGE - 1), (ctypes.c_char * PAGE)())

    def write(self, hpa: int, data: bytes) -> None:
        """Write ``data`` (within one page) at host-physical ``hpa``."""
        offset = hpa & (PAGE - 1)
        ctypes.memmove(ctypes.addressof(self.page(hpa)) + offset, data, len(data))

    def read_u64(self, hpa: int) -> int:
        offset = hpa & (PAGE - 1)
        return struct.unpack("<Q", bytes(self.page(hpa)[offset:offset + 8]))[0]


class GuestCpu:
    """One vCPU: a kvmemu VCPU, a Unicorn instance and the pages mapped into it."""

    def __init__(self, vm: kvmemu.VM, ram: HostMemory, log: list[tuple[str, object]]) -> None:
        self.vm, self.ram, self.log = vm, ram, log
        self.vcpu = vm.create_vcpu()
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED, self.on_unmapped)
        self.mapped: set[int] = set()
        self.zapped: set[int] = set()          # pages on_zap named, to drop before running
        self.lock = threading.Lock()

    def zap(self, first_gpa: int, size: int) -> None:
        """on_zap, from whichever thread made the zap: note the pages; the vCPU drops
        them itself before it runs guest code again (Unicorn is not thread-safe)."""
        with self.lock:
            self.zapped.update(gpa for gpa in self.mapped if first_gpa <= gpa < first_gpa + size)

    def drop_zapped(self) -> None:
        with self.lock:
            pages, self.zapped = self.zapped, set()
        for gpa in sorted(pages):
            self.uc.mem_unmap(gpa, PAGE)
            self.mapped.discard(gpa)
            self.log.append(("unmapped", (self.vcpu.vcpu_id, hex(gpa))))

    def on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int,
                    user_data: object) -> bool:
        """The second-stage fault: KVM handles it; map the page if it translates."""
        self.vcpu.rip = uc.reg_read(UC_X86_REG_RIP)
        while True:
            result = self.vcpu.access(address, write=access == UC_MEM_WRITE_UNMAPPED,
                                      fetch=access == UC_MEM_FETCH_UNMAPPED)
            if isinstance(result, Translation):
                break
            self.log.append(("exit", (self.vcpu.vcpu_id, result)))
            if result.exit_reason != ExitReason.MEMORY_FAULT:
                return False                       # MMIO: not in this guest
            # The VMM's answer to KVM_EXIT_MEMORY_FAULT: give the page the attributes of
            # the access (here: shared, since nothing can back it privately), run again.
            private = result.flags & kvmemu.MEMORY_EXIT_FLAG_PRIVATE
            self.vm.set_memory_attributes(result.gpa, result.size,
                                          0 if private else MemAttr.PRIVATE)
        gpa = address & ~(PAGE - 1)
        uc.mem_map_ptr(gpa, PAGE, UC_PROT_ALL, ctypes.addressof(self.ram.page(result.hpa)))
        self.mapped.add(gpa)
        self.log.append(("mapped", (self.vcpu.vcpu_id, hex(gpa))))
        return True                                # Unicorn retries the access

    def run(self, begin: int, end: int) -> None:
        """Run guest code from ``begin`` to ``end`` in slices, dropping zapped pages
        before each."""
        while True:
            self.drop_zapped()
            self.uc.emu_start(begin, end, count=SLICE)
            begin = self.uc.reg_read(UC_X86_REG_RIP)
            if begin == end:
                return


def run_guest(trace: bool = False) -> dict[str, object]:
    """Run the guest on two vCPU threads; returns the sums and what the VMM saw."""
    # The VM: one 16 MiB memslot at GPA 0, 4K host pages, the result page private.
    vm = kvmemu.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20,
                              userspace_addr=UADDR)
    vm.set_memory_attributes(RESULT, PAGE, MemAttr.PRIVATE)
    if trace:
        vm.trace = sys.stdout
    ram = HostMemory()
    log: list[tuple[str, object]] = []
    cpus = [GuestCpu(vm, ram, log) for _ in range(2)]
    zaps: list[tuple[int, int, int, str]] = []

    def on_zap(gfn: int, npages: int, level: int, reason: str) -> None:
        zaps.append((gfn, npages, level, reason))
        for cpu in cpus:
            cpu.zap(gfn * PAGE, npages * PAGE)

    vm.on_zap = on_zap

    # The VMM loads the guest through its userspace mapping: in the model a shared page's
    # host frame is the slot's userspace address plus the offset (README, "Frames").
    half = N // 2
    programs = [sum_program(DATA + 8 * half * i, half, RESULT + 8 * i) for i in range(2)]
    stores = [store_program(RESULT + 16 + 8 * i) for i in range(2)]
    starts = [CODE, CODE + 0x100]
    for start, program, store in zip(starts, programs, stores):
        ram.write(UADDR + start, program)
        ram.write(UADDR + start + 0x80, store)
    for i in range(N):
        ram.write(UADDR + DATA + 8 * i, struct.pack("<Q", 3 * i + 1))

    def in_parallel(job: object) -> None:
        threads = [threading.Thread(target=job, args=(cpu, start))  # type: ignore[arg-type]
                   for cpu, start in zip(cpus, starts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # Both vCPUs sum their half and store it: the first store exits (private page).
    in_parallel(lambda cpu, start: cpu.run(start, start + len(programs[0])))
    # The VMM makes the result page private again: KVM zaps it, both vCPUs drop it.
    vm.set_memory_attributes(RESULT, PAGE, MemAttr.PRIVATE)
    # Each vCPU stores its sum once more: the stores must reach KVM and exit.
    in_parallel(lambda cpu, start: cpu.run(start + 0x80, start + 0x80 + len(stores[0])))

    result_hpa = cpus[0].vcpu.access(RESULT).hpa
    sums = [ram.read_u64(result_hpa + 8 * i) for i in range(2)]
    again = [ram.read_u64(result_hpa + 16 + 8 * i) for i in range(2)]
    return {"sums": sums, "stored_again": again, "log": log, "zaps": zaps,
            "rax": [cpu.uc.reg_read(UC_X86_REG_RAX) for cpu in cpus], "stats": vm.stats}


if __name__ == "__main__":
    outcome = run_guest(trace="--trace" in sys.argv)
    expected = [sum(3 * i + 1 for i in range(k * N // 2, (k + 1) * N // 2)) for k in range(2)]
    print(f"guest sums: {outcome['sums']} (expected {expected})")
    print(f"stored again after the zap: {outcome['stored_again']}")
    for kind, what in outcome["log"]:                 # type: ignore[attr-defined]
        if kind != "mapped":
            print(f"{kind}: {what}")
    print(f"on_zap: {outcome['zaps']}")
    print(f"KVM stats: {outcome['stats']}")
