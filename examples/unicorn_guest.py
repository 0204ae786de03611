"""A real x86-64 guest in Unicorn whose memory is second-stage translated by kvmemu.

Unicorn runs the guest's instructions; kvmemu plays the hypervisor's MMU. Unicorn
starts with no memory at all: when the guest touches an unmapped page, Unicorn's
unmapped-memory hook asks kvmemu (``vcpu.access``): the hardware walk of KVM's
tables, the EPT violation, KVM's fault handler, the retried walk. Only when that
translates is the host page behind it mapped into Unicorn at the GPA. A
KVM_EXIT_MEMORY_FAULT is handled the way a VMM does: convert the memory
attributes, then run again.

The guest sums an array of 8192 u64 and stores the sum in a page the VMM had
marked private on this SW_PROTECTED VM, without a guest_memfd to back it: the
store exits with KVM_EXIT_MEMORY_FAULT (flags PRIVATE), and the VMM converts
the page back to shared.

Run: ``python examples/unicorn_guest.py [--trace]`` (needs ``pip install unicorn``).
"""

from __future__ import annotations

import ctypes
import struct
import sys

from unicorn import (UC_ARCH_X86, UC_HOOK_MEM_UNMAPPED, UC_MEM_FETCH_UNMAPPED,
                     UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_PROT_ALL, Uc)
from unicorn.x86_const import UC_X86_REG_RIP

import kvmemu
from kvmemu import ExitReason, MemAttr, Translation, VMType

PAGE = 4096
UADDR = 0x7F0000000000             # the VMM's userspace mapping of guest memory
CODE, DATA, RESULT = 0x1000, 0x200000, 0x300000
N = 8192                           # u64 elements: 16 pages

# The guest: rax = sum of DATA[0..N); [RESULT] = rax.
PROGRAM = (b"\x48\xbe" + struct.pack("<Q", DATA)       # mov rsi, DATA
           + b"\x48\xb9" + struct.pack("<Q", N)        # mov rcx, N
           + b"\x31\xc0"                               # xor eax, eax
           + b"\x48\x03\x06"                           # loop: add rax, [rsi]
           + b"\x48\x83\xc6\x08"                       #       add rsi, 8
           + b"\x48\xff\xc9"                           #       dec rcx
           + b"\x75\xf4"                               #       jnz loop
           + b"\x48\xbf" + struct.pack("<Q", RESULT)   # mov rdi, RESULT
           + b"\x48\x89\x07")                          # mov [rdi], rax
END = CODE + len(PROGRAM)


class HostMemory:
    """Host RAM, one ctypes page per host frame, created on first use."""

    def __init__(self) -> None:
        self.pages: dict[int, ctypes.Array[ctypes.c_char]] = {}

    def page(self, hpa: int) -> ctypes.Array[ctypes.c_char]:
        return self.pages.setdefault(hpa & ~(PAGE - 1), (ctypes.c_char * PAGE)())

    def write(self, hpa: int, data: bytes) -> None:
        """Write ``data`` (within one page) at host-physical ``hpa``."""
        offset = hpa & (PAGE - 1)
        ctypes.memmove(ctypes.addressof(self.page(hpa)) + offset, data, len(data))


def run_guest(trace: bool = False) -> dict[str, object]:
    """Run the guest to its end; returns its result and what the VMM saw."""
    # The VM: one 16 MiB memslot at GPA 0, 4K host pages (so a conversion never zaps a
    # huge mapping that Unicorn still has), and the result page marked private.
    vm = kvmemu.VM(VMType.SW_PROTECTED)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20,
                              userspace_addr=UADDR)
    vm.set_memory_attributes(RESULT, PAGE, MemAttr.PRIVATE)
    vcpu = vm.create_vcpu()
    if trace:
        vm.trace = sys.stdout

    # The VMM loads the guest through its userspace mapping: in the model a shared page's
    # host frame is the slot's userspace address plus the offset (README, "Frames").
    ram = HostMemory()
    ram.write(UADDR + CODE, PROGRAM)
    for i in range(N):
        ram.write(UADDR + DATA + 8 * i, struct.pack("<Q", 3 * i + 1))

    exits: list[object] = []
    mapped: list[int] = []

    def on_unmapped(uc: Uc, access: int, address: int, size: int, value: int,
                    user_data: object) -> bool:
        """The second-stage fault: KVM handles it; map the page if it translates."""
        vcpu.rip = uc.reg_read(UC_X86_REG_RIP)
        while True:
            result = vcpu.access(address, write=access == UC_MEM_WRITE_UNMAPPED,
                                 fetch=access == UC_MEM_FETCH_UNMAPPED)
            if isinstance(result, Translation):
                break
            exits.append(result)
            if result.exit_reason != ExitReason.MEMORY_FAULT:
                return False                       # MMIO: not in this guest
            # The VMM's answer to KVM_EXIT_MEMORY_FAULT: give the page the attributes of
            # the access (here: shared, since nothing can back it privately), run again.
            private = result.flags & kvmemu.MEMORY_EXIT_FLAG_PRIVATE
            vm.set_memory_attributes(result.gpa, result.size, 0 if private else MemAttr.PRIVATE)
        gpa = address & ~(PAGE - 1)
        host_page = ram.page(result.hpa)
        uc.mem_map_ptr(gpa, PAGE, UC_PROT_ALL, ctypes.addressof(host_page))
        mapped.append(gpa)
        return True                                # Unicorn retries the access

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.hook_add(UC_HOOK_MEM_UNMAPPED, on_unmapped)
    uc.emu_start(CODE, END)

    result_hpa = vcpu.access(RESULT).hpa
    total = struct.unpack("<Q", bytes(ram.page(result_hpa)[:8]))[0]
    return {"result": total, "exits": exits, "mapped": mapped, "stats": vm.stats}


if __name__ == "__main__":
    outcome = run_guest(trace="--trace" in sys.argv)
    print(f"guest result: {outcome['result']} (expected {3 * N * (N - 1) // 2 + N})")
    print(f"pages mapped into Unicorn by KVM's fault path: {len(outcome['mapped'])}")
    for exit_ in outcome["exits"]:                 # type: ignore[attr-defined]
        print(f"exit to the VMM: {exit_}")
    print(f"KVM stats: {outcome['stats']}")
