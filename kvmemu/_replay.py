"""``kvmemu replay``: kvm_page_fault events of a host's ftrace, through the model.

Each event goes to the exit handler KVM ran for it (docs/reference.md §2 and
§14): on VMX ``handle_ept_violation(address, error_code)``, where the traced
error_code is the raw exit qualification (a TD's private faults are traced
with 0x2, which tdx_handle_ept_violation would substitute anyway); on SVM
``handle_npf(address, error_code)``, where the traced code already has
PRIVATE_ACCESS synthesized: npf_interception clears that synthetic bit and,
on SNP, derives it again from GUEST_ENC, so the decision is the same.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
from collections import Counter
from typing import Any, TextIO

from .constants import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, ExitReason, MemAttr, MemFlag, RetPF

#: The TP_printk of kvm:kvm_page_fault, after the usual ftrace prefix
#: ``task-pid [cpu] flags timestamp: kvm_page_fault: ``.
EVENT = re.compile(r"(?:^|\s)kvm_page_fault:\s+vcpu (\d+) rip 0x([0-9a-f]+) "
                   r"address 0x([0-9a-f]+) error_code 0x([0-9a-f]+)\s*$")
_USERSPACE_BASE = 0x7F0000000000
_HOST_LEVELS = {"4k": PG_LEVEL_4K, "2m": PG_LEVEL_2M, "1g": PG_LEVEL_1G}
_MAX_VCPUS = 4096


def _build_vm(ns: argparse.Namespace) -> Any:
    import kvmemu

    vm = kvmemu.VM(ns.vm_type, vendor=ns.vendor, gpaw=ns.gpaw, nx_huge_pages=ns.nx_huge_pages)
    uaddr = _USERSPACE_BASE
    for slot, (gpa, size, gmem) in enumerate(ns.memslot):
        kwargs: dict[str, Any] = {}
        if gmem:
            kwargs = {"flags": MemFlag.GUEST_MEMFD, "guest_memfd": vm.create_guest_memfd(size)}
        vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                                  userspace_addr=uaddr, host_level=_HOST_LEVELS[ns.host_level],
                                  **kwargs)
        uaddr += (size + (1 << 30) - 1) & ~((1 << 30) - 1)     # 1 GiB aligned: hugepages
    for gpa, size in ns.private:
        vm.set_memory_attributes(gpa, size, MemAttr.PRIVATE)
    return vm


def _describe(vcpu: Any, r: int) -> str:
    if r >= 0:
        return RetPF(r).name
    name = errno.errorcode.get(-r, str(-r))
    if r == -errno.EFAULT and vcpu.run.exit_reason == ExitReason.MEMORY_FAULT:
        flags, gpa, size = vcpu.run.memory_fault
        return f"-{name}, KVM_EXIT_MEMORY_FAULT flags {flags:#x} gpa {gpa:#x} size {size:#x}"
    return f"-{name}"


def replay(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """Run the events of ``ns.file`` against the VM the options describe."""
    import kvmemu

    try:
        vm = _build_vm(ns)
    except (kvmemu.KvmError, ValueError) as exc:
        parser.error(f"the VM described cannot be built: {exc}")
    if ns.trace:
        vm.trace = lambda event, text: print(f"    {event}: {text}")
    try:
        stream: TextIO = sys.stdin if ns.file == "-" else open(ns.file, encoding="utf-8")
    except OSError as exc:
        parser.error(f"cannot read {ns.file}: {exc.strerror}")
    vcpus: list[Any] = []
    results: Counter[str] = Counter()
    with stream:
        for number, line in enumerate(stream, 1):
            if "kvm_page_fault:" not in line:
                continue
            match = EVENT.search(line)
            if match is None:
                parser.exit(2, f"{ns.file}:{number}: malformed kvm_page_fault event: "
                               f"{line.strip()!r}\n")
            vcpu_id, rip, address, code = (int(g, 16) if i else int(g)
                                           for i, g in enumerate(match.groups()))
            if vcpu_id >= _MAX_VCPUS or address >> 64 or code >> 64 or rip >> 64:
                parser.exit(2, f"{ns.file}:{number}: value out of range: {line.strip()!r}\n")
            while len(vcpus) <= vcpu_id:
                vcpus.append(vm.create_vcpu())
            vcpu = vcpus[vcpu_id]
            vcpu.rip = rip
            print(f"{number}: vcpu {vcpu_id} address {address:#x} error_code {code:#x}")
            if vm.vendor == "vmx":
                r = vcpu.handle_ept_violation(address, code)
            else:
                r = vcpu.handle_npf(address, code)
            outcome = _describe(vcpu, r)
            results[outcome.split(",")[0]] += 1
            print(f"  -> {outcome}")
    summary = ", ".join(f"{name} {count}" for name, count in sorted(results.items()))
    print(f"{sum(results.values())} events replayed: {summary or 'none'}")
    stats = vm.stats
    print(f"mappings: 4K {stats['pages_4k']}, 2M {stats['pages_2m']}, 1G {stats['pages_1g']}")
    return 0
