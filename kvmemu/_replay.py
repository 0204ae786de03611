"""``kvmemu replay``: the page faults of a host's trace, through the model.

Input: the text of an ftrace buffer (``/sys/kernel/tracing/trace``), of
``trace-cmd report`` or of ``perf script`` (``kvm:kvm_page_fault: ...``), with
the kvm_page_fault format of Linux 6.18 (``vcpu N rip 0x.. address 0x..
error_code 0x..``, trace.h) or the older one (``address 1000 error_code 181``).
A binary ``trace.dat`` is refused with the command that converts it
(``trace-cmd report``): no maintained Python parser of it is installable here.

Each kvm_page_fault goes to the exit handler KVM ran for it (docs/reference.md
§2 and §14): on VMX ``handle_ept_violation(address, error_code)``, where the
traced error_code is the raw exit qualification (a TD's private faults are
traced with 0x2, which tdx_handle_ept_violation would substitute anyway); on SVM
``handle_npf(address, error_code)``, where the traced code already has
PRIVATE_ACCESS synthesized: npf_interception clears that synthetic bit and, on
SNP, derives it again from GUEST_ENC, so the decision is the same.

What a line before it says is used: ``kvm_exit`` (vcpu, reason, info1/info2)
gives the vendor (VMX reason names are upper case, SVM's are ``npf`` and
``.. excp``) and tells an EPT violation or #NPF from a #PF intercept of shadow
paging (``EXCEPTION_NMI``, ``PF excp``), which the TDP MMU does not handle; a
``kvm_nested_vmexit`` of the same vCPU since its last ``kvm_exit`` marks the
fault as L2's, handled by the nested MMU.  Both kinds are reported and not
replayed.  Without a kvm_exit, a VMX code with no access bit (0-2) or an SVM
code with neither GUEST_FINAL nor GUEST_PAGE is taken for a shadow-paging #PF
error code.

``--compare`` sets a trace sink on the model and compares, per fault, its
``kvm_mmu_set_spte`` and ``kvm_tdp_mmu_spte_changed`` events with the host's that
follow the host's kvm_page_fault, ignoring what is the host's own (frames,
SPTE addresses, table addresses): the gfns, the levels and the permissions.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from collections import Counter
from typing import Any, Iterator, TextIO

from .constants import (EPT_VIOLATION, PFERR, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K,
                        ExitReason, MemAttr, MemFlag, RetPF)

_EVENTS = ("kvm_page_fault", "kvm_exit", "kvm_nested_vmexit", "kvm_mmu_set_spte",
           "kvm_tdp_mmu_spte_changed")
#: An event of the three text formats: ftrace and trace-cmd report (``comm-pid [cpu]
#: ... event: fields``) and perf script (``comm pid [cpu] time: kvm:event: fields``).
_LINE = re.compile(r"^\s*(?P<comm>.*?)[-\s](?P<pid>\d+)\s+(?:\(\s*\d+\)\s+)?\[\d+\]"
                   r".*?\s(?:kvm(?:mmu)?:)?(?P<event>" + "|".join(_EVENTS) + r"):\s*(?P<text>.*)$")
_ANY_EVENT = re.compile(r"(?:^|\s)(?:kvm(?:mmu)?:)?(?P<event>" + "|".join(_EVENTS)
                        + r"):\s*(?P<text>.*)$")
_FAULT = re.compile(r"^vcpu (\d+) rip 0x([0-9a-f]+) address 0x([0-9a-f]+) "
                    r"error_code 0x([0-9a-f]+)\s*$")
_FAULT_OLD = re.compile(r"^address ([0-9a-f]+) error_code ([0-9a-f]+)\s*$")
_EXIT = re.compile(r"^(?:vcpu (\d+) )?reason (.+?) rip 0x([0-9a-f]+) "
                   r"info1 0x([0-9a-f]+) info2 0x([0-9a-f]+)")
_EXIT_OLD = re.compile(r"^reason (.+?) rip 0x([0-9a-f]+) info ([0-9a-f]+) ([0-9a-f]+)")
_SET_SPTE = re.compile(r"^gfn ([0-9a-f]+) spte [0-9a-f]+ \(r([w-])([x-])([u-])\) level (\d+)")
_SPTE_CHANGED = re.compile(r"^as id \d+ gfn ([0-9a-f]+) level (\d+) old_spte ([0-9a-f]+) "
                           r"new_spte ([0-9a-f]+)")
_TRACE_DAT_MAGIC = b"\x17\x08\x44tracing"
_USERSPACE_BASE = 0x7F0000000000
_HOST_LEVELS = {"4k": PG_LEVEL_4K, "2m": PG_LEVEL_2M, "1g": PG_LEVEL_1G}
_MAX_VCPUS = 4096
_SHARED_MASK = (1 << 63) | 0x7 | (1 << 10) | (1 << 11)   # what --compare keeps of an SPTE


def _build_vm(ns: argparse.Namespace, vendor: str | None) -> Any:
    import kvmemu

    vm = kvmemu.VM(ns.vm_type, vendor=vendor, gpaw=ns.gpaw, nx_huge_pages=ns.nx_huge_pages)
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


def _exit_vendor(reason: str) -> str:
    """VMX exit reasons print upper case (VMX_EXIT_REASONS), SVM's lower case."""
    return "svm" if reason.split()[0].islower() else "vmx"


def _decode(vm: Any, address: int, code: int) -> tuple[str, int, bool]:
    """The traced code by name, the error code KVM derives, and the private decision."""
    import kvmemu

    if vm.vendor == "vmx":
        qual = code
        if vm.vm_type == kvmemu.VMType.TDX and not address & vm.shared_bit:
            qual = EPT_VIOLATION.ACC_WRITE.value
        ec = kvmemu.vmx_error_code(qual, address, vm.shared_bit)
        text = f"{EPT_VIOLATION(code)!r}"
    else:
        ec = kvmemu.svm_error_code(code, snp=vm.vm_type == kvmemu.VMType.SNP)
        text = f"{PFERR(code)!r}"
    return text, ec, bool(ec & PFERR.PRIVATE_ACCESS.value)


def _lines(stream: TextIO, name: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, 1):
        if "\0" in line:
            raise ValueError(f"{name}:{number}: binary data: a trace.dat? Convert it with "
                             f"'trace-cmd report {name} > trace.txt'")
        yield number, line


class _Replay:
    """One replay: the VM, its vCPUs, what each host vCPU last did, the results."""

    def __init__(self, ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        self.ns, self.parser = ns, parser
        self.vm: Any = None
        self.vcpus: list[Any] = []
        self.outcomes: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.flagged: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.last_exit: dict[str, dict[str, Any]] = {}    # per host vCPU: its last exit
        self.vendor: str | None = ns.vendor
        self.differences = 0
        self.pending: dict[str, Any] | None = None        # the fault --compare collects for
        self.model_events: list[tuple[str, str]] = []

    # --- output ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        if not self.ns.summary and not self.ns.json:
            print(text)

    # --- the events -----------------------------------------------------------------------

    def ensure_vm(self, number: int) -> None:
        import kvmemu

        if self.vm is not None:
            return
        try:
            self.vm = _build_vm(self.ns, self.vendor)
        except (kvmemu.KvmError, ValueError) as exc:
            self.parser.error(f"the VM described cannot be built: {exc}")
        if self.ns.compare:
            self.vm.trace = lambda event, text: self.model_events.append((event, text))
        elif self.ns.trace:
            self.vm.trace = lambda event, text: self.say(f"    {event}: {text}")
        if not self.ns.memslot:
            self.say("note: no --memslot given: every gfn is MMIO to the model (EMULATE); "
                     "describe the guest's memory with --memslot GPA:SIZE[:gmem]")

    def malformed(self, number: int, line: str, why: str) -> None:
        self.skipped[why] += 1
        if self.ns.strict:
            self.parser.exit(2, f"{self.ns.file}:{number}: {why}: {line.strip()!r}\n")

    def on_exit(self, key: str, event: str, text: str, number: int, line: str) -> None:
        match = _EXIT.match(text)
        if match is not None:
            vcpu, reason, rip, info1, info2 = match.groups()
        else:
            old = _EXIT_OLD.match(text)
            if old is None:
                return self.malformed(number, line, f"malformed {event}")
            vcpu, (reason, rip, info1, info2) = None, old.groups()
        vendor = _exit_vendor(reason)
        if event == "kvm_exit":
            if self.vendor is None:
                self.vendor = vendor
            elif self.vendor != vendor and self.vm is None:
                self.parser.error(f"{self.ns.file}:{number}: a {vendor} exit, but --vendor "
                                  f"{self.vendor}")
        exit_key = vcpu if vcpu is not None else key
        self.last_exit[exit_key] = {"event": event, "reason": reason.split()[0],
                                    "info1": int(info1, 16), "info2": int(info2, 16)}

    def on_fault(self, key: str, text: str, number: int, line: str) -> None:
        match = _FAULT.match(text)
        if match is not None:
            vcpu_id, rip = int(match.group(1)), int(match.group(2), 16)
            address, code = int(match.group(3), 16), int(match.group(4), 16)
            exit_key = str(vcpu_id)
        else:
            old = _FAULT_OLD.match(text)
            if old is None:
                return self.malformed(number, line, "malformed kvm_page_fault")
            vcpu_id, rip = 0, 0
            address, code = int(old.group(1), 16), int(old.group(2), 16)
            exit_key = key
        if vcpu_id >= _MAX_VCPUS or address >> 64 or code >> 64 or rip >> 64:
            return self.malformed(number, line, "value out of range")
        self.ensure_vm(number)
        vm = self.vm
        record: dict[str, Any] = {"line": number, "vcpu": vcpu_id, "address": address,
                                  "error_code": code}
        last = self.last_exit.get(exit_key)
        flag = None
        if last is not None and last["event"] == "kvm_nested_vmexit":
            flag = "nested"
            why = (f"L2's fault (kvm_nested_vmexit {last['reason']} before it): handled by "
                   "the nested MMU, not replayed")
        elif last is not None and last["reason"] in ("EXCEPTION_NMI", "PF"):
            flag = "shadow"
            why = f"a #PF intercept ({last['reason']}): shadow paging, not replayed"
        elif last is None and vm.vendor == "vmx" and not code & 0x7:
            flag = "shadow"
            why = "no EPT access bit (0-2): a shadow-paging #PF error code, not replayed"
        elif last is None and vm.vendor == "svm" and not code & (
                PFERR.GUEST_FINAL.value | PFERR.GUEST_PAGE.value):
            flag = "shadow"
            why = "neither GUEST_FINAL nor GUEST_PAGE: a shadow-paging #PF, not replayed"
        self.say(f"{number}: vcpu {vcpu_id} address {address:#x} error_code {code:#x}")
        if flag is not None:
            self.flagged[flag] += 1
            record["flagged"] = flag
            self.say(f"  !! {why}")
            self.events.append(record)
            return
        decoded, ec, private = _decode(vm, address, code)
        record.update(decoded=decoded, kvm_error_code=ec, private=private)
        self.say(f"  {decoded} -> error code {ec:#x} {PFERR(ec)!r}, "
                 f"{'private' if private else 'shared'}")
        while len(self.vcpus) <= vcpu_id:
            self.vcpus.append(vm.create_vcpu())
        vcpu = self.vcpus[vcpu_id]
        vcpu.rip = rip
        self.model_events = []
        if vm.vendor == "vmx":
            r = vcpu.handle_ept_violation(address, code)
        else:
            r = vcpu.handle_npf(address, code)
        outcome = _describe(vcpu, r)
        record["outcome"] = outcome
        self.outcomes[outcome.split(",")[0]] += 1
        self.say(f"  -> {outcome}")
        if self.ns.compare:
            self.finish_compare()
            record["model"] = [list(e) for e in self.model_events]
            record["host"] = []
            self.pending = record
        self.events.append(record)

    def on_host_spte(self, event: str, text: str) -> None:
        if self.pending is not None:
            self.pending["host"].append([event, text])

    # --- --compare ------------------------------------------------------------------------

    @staticmethod
    def _essence(event: str, text: str, ept: bool) -> tuple[Any, ...] | None:
        """What the host and the model must agree on in an event."""
        if event == "kvm_mmu_set_spte":
            m = _SET_SPTE.match(text)
            return None if m is None else ("set_spte", int(m.group(1), 16), int(m.group(5)),
                                           "r" + "".join(m.group(2, 3, 4)))
        m = _SPTE_CHANGED.match(text)
        if m is None:
            return None
        new = int(m.group(4), 16)
        present = bool(new & (1 << 11))                     # SPTE_MMU_PRESENT_MASK
        perms = new & (0x7 | (1 << 10) if ept else 0x7 | (1 << 63))
        leaf = bool(new & (1 << 7)) or int(m.group(2)) == 1
        return ("spte_changed", int(m.group(1), 16), int(m.group(2)), present,
                leaf if present else None, perms if present and leaf else None)

    def finish_compare(self) -> None:
        record, self.pending = self.pending, None
        if record is None:
            return
        ept = self.vm.vendor == "vmx"
        model = [e for e in (self._essence(ev, tx, ept) for ev, tx in record["model"]
                             if ev in ("kvm_mmu_set_spte", "kvm_tdp_mmu_spte_changed")) if e]
        host = [e for e in (self._essence(ev, tx, ept) for ev, tx in record["host"]) if e]
        if model == host:
            record["compare"] = "same"
            return
        self.differences += 1
        record["compare"] = {"model": [list(e) for e in model], "host": [list(e) for e in host]}
        self.say(f"  differs from the host (line {record['line']}):")
        for label, events in (("host ", host), ("model", model)):
            for e in events or [("none",)]:
                self.say(f"    {label}: {' '.join(str(x) for x in e)}")

    # --- the run --------------------------------------------------------------------------

    def run(self, stream: TextIO) -> int:
        try:
            for number, line in _lines(stream, self.ns.file):
                match = _LINE.match(line) or _ANY_EVENT.search(line)
                if match is None:
                    self.skipped["not a kvm event this replay reads"] += 1
                    continue
                groups = match.groupdict()
                key = groups.get("pid") or "0"
                event, text = groups["event"], groups["text"].strip()
                if event == "kvm_page_fault":
                    if self.ns.compare:
                        self.finish_compare()
                    self.on_fault(key, text, number, line)
                elif event in ("kvm_exit", "kvm_nested_vmexit"):
                    if self.ns.compare:
                        self.finish_compare()
                    self.on_exit(key, event, text, number, line)
                elif self.ns.compare:
                    self.on_host_spte(event, text)
        except UnicodeDecodeError:
            self.parser.exit(2, f"{self.ns.file}: not text: a binary trace.dat? Convert it "
                                f"with 'trace-cmd report {self.ns.file} > trace.txt'\n")
        except ValueError as exc:
            self.parser.exit(2, f"{exc}\n")
        if self.ns.compare:
            self.finish_compare()
        return self.report()

    def report(self) -> int:
        vm = self.vm
        stats = vm.stats if vm is not None else {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}
        summary = {"replayed": sum(self.outcomes.values()), "outcomes": dict(self.outcomes),
                   "flagged": dict(self.flagged), "skipped": dict(self.skipped),
                   "vendor": vm.vendor if vm is not None else self.vendor,
                   "mappings": {"4K": stats["pages_4k"], "2M": stats["pages_2m"],
                                "1G": stats["pages_1g"]}}
        if self.ns.compare:
            summary["differences"] = self.differences
        if self.ns.json:
            print(json.dumps({"summary": summary,
                              "events": [] if self.ns.summary else self.events}))
            return 0
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        print(f"{summary['replayed']} events replayed: {outcomes or 'none'}")
        if self.flagged:
            print("not replayed: " + ", ".join(
                f"{v} {'nested (L2)' if k == 'nested' else 'shadow-paging #PF'}"
                for k, v in sorted(self.flagged.items())))
        if self.skipped:
            print("lines skipped: " + ", ".join(f"{v} {k}" for k, v in
                                                sorted(self.skipped.items())))
        if self.ns.compare:
            print(f"faults whose SPTE changes differ from the host's: {self.differences}")
        print(f"mappings: 4K {stats['pages_4k']}, 2M {stats['pages_2m']}, 1G {stats['pages_1g']}")
        return 0


def replay(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """Run the events of ``ns.file`` against the VM the options describe."""
    if ns.file != "-":
        try:
            with open(ns.file, "rb") as probe:
                head = probe.read(4096)
        except OSError as exc:
            parser.error(f"cannot read {ns.file}: {exc.strerror}")
        if head.startswith(_TRACE_DAT_MAGIC) or b"\0" in head:
            parser.exit(2, f"{ns.file} is a binary trace (trace.dat): convert it with "
                           f"'trace-cmd report {ns.file} > trace.txt' and replay that\n")
    stream: TextIO = sys.stdin if ns.file == "-" else open(ns.file, encoding="utf-8")
    with stream:
        return _Replay(ns, parser).run(stream)
