"""The ``kvmemu`` command line (also ``python -m kvmemu``).

* ``kvmemu decode ept|npf|pferr|spte VALUE``: name the bits of an exit value, an
  error code or an SPTE;
* ``kvmemu demo``: a built-in workload on every VM type, with a report;
* ``kvmemu replay FILE``: kvm_page_fault lines of a host's ftrace, replayed
  against a VM described by options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from . import _args
from ._version import __version__
from .constants import (EPT_MEMTYPE_MASK, EPT_MEMTYPE_SHIFT, EPT_MISCONFIG_WX_VALUE,
                        EPT_MMIO_MASK, EPT_VIOLATION, EPTE, NPT_MMIO_VALUE, PFERR, PTE,
                        PAGE_SHIFT, SHADOW_NONPRESENT_VALUE, SPTE, SPTE_BASE_ADDR_MASK, MemType,
                        VMType)


def _u64(text: str) -> int:
    """A u64 written in decimal or with a 0x / 0o / 0b prefix."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return _args.u64("value", value)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 64 bits") from None


def _private(ec: int) -> str:
    return "yes" if ec & PFERR.PRIVATE_ACCESS.value else "no"


def _decode_ept(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """The VMX rule (__vmx_handle_ept_violation, vmx/common.h, 6.18); with ``--tdx-gpaw``
    first what tdx_handle_ept_violation (vmx/tdx.c) does: a private GPA's qualification
    is replaced by EPT_VIOLATION_ACC_WRITE, a shared fetch is -EIO (KVM_BUG_ON)."""
    import kvmemu

    shared_bit = kvmemu.tdx_shared_bit(ns.tdx_gpaw) if ns.tdx_gpaw else 0
    qual = ns.value
    rows = [("exit qualification", f"{qual:#x}  {EPT_VIOLATION(qual)!r}")]
    if not qual & _EPT_ACCESS:
        rows.append(("warning", "no access bit (0-2) is set: the CPU reports none like this; "
                                "KVM takes it as a read"))
    unknown = qual & ~_EPT_KNOWN
    if unknown:
        rows.append(("warning", f"bits {unknown:#x} are reserved in the exit qualification"))
    if ns.tdx_gpaw:
        private = not ns.gpa & shared_bit
        state = "clear: private" if private else "set: shared"
        rows.append(("gpa", f"{ns.gpa:#x}  (TDX shared bit {shared_bit.bit_length() - 1} {state})"))
        if private:
            qual = EPT_VIOLATION.ACC_WRITE.value
            rows.append(("TDX handler", f"qualification replaced by {qual:#x} (ACC_WRITE)"))
        elif qual & EPT_VIOLATION.ACC_INSTR:
            return rows + [("TDX handler", "-EIO: a fetch from shared memory is a KVM bug "
                                           "(KVM_BUG_ON)")]
    ec = kvmemu.vmx_error_code(qual, ns.gpa, shared_bit)
    rows += [("error code", f"{ec:#x}  {PFERR(ec)!r}"), ("private", _private(ec))]
    return rows


_EPT_ACCESS = (EPT_VIOLATION.ACC_READ | EPT_VIOLATION.ACC_WRITE | EPT_VIOLATION.ACC_INSTR).value
_EPT_KNOWN = sum(m.value for m in EPT_VIOLATION)


def _decode_npf(ns: argparse.Namespace) -> list[tuple[str, str]]:
    import kvmemu

    ec = kvmemu.svm_error_code(ns.value, snp=ns.snp)
    return [("exit_info_1", f"{ns.value:#x}  {PFERR(ns.value)!r}"),
            ("error code", f"{ec:#x}  {PFERR(ec)!r}"), ("private", _private(ec))]


def _decode_pferr(ns: argparse.Namespace) -> list[tuple[str, str]]:
    return [("error code", f"{ns.value:#x}  {PFERR(ns.value)!r}"), ("private", _private(ns.value))]


#: The SPTE bits KVM keeps in ignored bits, per format (spte.h): EPT uses 57/58 for
#: host/MMU-writable, since 9/10 are EPT's dirty and user-execute bits.
_SPTE_SOFT = {"ept": SPTE.MMU_PRESENT | SPTE.AD_DISABLED | SPTE.AD_WRPROT_ONLY
                     | SPTE.EPT_HOST_WRITABLE | SPTE.EPT_MMU_WRITABLE,
              "npt": SPTE.MMU_PRESENT | SPTE.AD_DISABLED | SPTE.AD_WRPROT_ONLY
                     | SPTE.HOST_WRITABLE | SPTE.MMU_WRITABLE}


def _yes(value: int) -> str:
    return "yes" if value else "no"


def _decode_spte(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """A KVM SPTE of either format: hardware bits, KVM's software bits, frame, meaning."""
    from ._pure.spte import get_mmio_spte_generation

    spte, kind = ns.value, "ept" if ns.ept else "npt"
    hw_flag: Any = EPTE if ns.ept else PTE
    hw = hw_flag(spte & sum(m.value for m in hw_flag))
    present = spte & SPTE.MMU_PRESENT
    if ns.ept:
        mmio = (spte & EPT_MMIO_MASK) == EPT_MISCONFIG_WX_VALUE
    else:
        mmio = (spte & NPT_MMIO_VALUE) == NPT_MMIO_VALUE
    mmio = mmio and not present and spte != SHADOW_NONPRESENT_VALUE
    # An MMIO SPTE keeps the memslot generation where a present SPTE keeps KVM's flags
    # (bits 3-10 and 52-62, spte.h): none of those flags apply to it.
    soft = "none (bits 3-10 and 52-62 hold the MMIO generation)" if mmio else \
        repr(SPTE(spte & _SPTE_SOFT[kind].value))
    rows = [("spte", f"{spte:#x}  ({kind.upper()})"), ("hardware bits", repr(hw)),
            ("KVM bits", soft)]
    if ns.ept and spte & SPTE.MMU_PRESENT:
        memtype = (spte & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT
        name = MemType(memtype).name if memtype in MemType._value2member_map_ else "reserved"
        rows.append(("memory type", f"{memtype} ({name})"))
    frame = spte & SPTE_BASE_ADDR_MASK
    rows.append(("frame", f"pfn {frame >> PAGE_SHIFT:#x}  (address {frame:#x})"))
    if ns.ept:
        readable, executable = spte & EPTE.READ, spte & EPTE.EXEC
    else:
        readable, executable = spte & PTE.PRESENT, not spte & PTE.NX
    rows.append(("present to KVM", f"{_yes(present)}  (is_shadow_present_pte: bit 11)"))
    if spte == SHADOW_NONPRESENT_VALUE:
        rows.append(("meaning", "SHADOW_NONPRESENT_VALUE: an empty or zapped entry"))
    elif mmio:
        gfn = (frame & ~NPT_MMIO_VALUE if ns.npt else frame) >> PAGE_SHIFT    # not NPT's bit 51
        rows.append(("MMIO SPTE", f"yes: gfn {gfn:#x}, memslot generation "
                                  f"{get_mmio_spte_generation(spte):#x}"))
    else:
        rows.append(("MMIO SPTE", "no"))
    if present:
        rows += [("readable", _yes(readable)), ("writable", _yes(spte & PTE.WRITABLE)),
                 ("executable", _yes(executable)),
                 ("huge leaf", _yes(spte & PTE.LARGE) + "  (PT_PAGE_SIZE_MASK, bit 7)")]
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmemu",
        description="Bit-exact model of x86 second-stage page faults and the Linux 6.18 KVM "
                    "fault path. Values may be decimal or 0x-prefixed hex.")
    parser.add_argument("--version", action="version", version=f"kvmemu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    decode = commands.add_parser("decode", help="name the bits of an exit value or error code",
                                 description="Name every set bit and show the error code KVM "
                                             "derives and whether the fault is private.")
    kinds = decode.add_subparsers(dest="kind", required=True, metavar="KIND")
    json_help = "print one JSON object (each row's text, and the values as integers)"

    ept = kinds.add_parser("ept", help="VMX EPT-violation exit qualification",
                           description="Decode an EPT-violation exit qualification the way "
                                       "__vmx_handle_ept_violation does.")
    ept.add_argument("value", metavar="QUAL", type=_u64)
    ept.add_argument("--gpa", type=_u64, default=None,
                     help="faulting GPA, which only a TD's shared bit reads (needs --tdx-gpaw)")
    ept.add_argument("--tdx-gpaw", type=int, choices=(48, 52),
                     help="the VM is a TD with this guest physical-address width: "
                          "decode as tdx_handle_ept_violation does")
    ept.add_argument("--json", action="store_true", help=json_help)
    ept.set_defaults(decode=_decode_ept)

    npf = kinds.add_parser("npf", help="AMD #NPF EXITINFO1",
                           description="Decode #NPF EXITINFO1 the way npf_interception does.")
    npf.add_argument("value", metavar="EXITINFO1", type=_u64)
    npf.add_argument("--snp", action="store_true", help="the VM is an SEV-SNP guest")
    npf.add_argument("--json", action="store_true", help=json_help)
    npf.set_defaults(decode=_decode_npf)

    pferr = kinds.add_parser("pferr", help="KVM page-fault error code",
                             description="Name the PFERR bits of a KVM error code.")
    pferr.add_argument("value", metavar="CODE", type=_u64)
    pferr.add_argument("--json", action="store_true", help=json_help)
    pferr.set_defaults(decode=_decode_pferr)

    spte = kinds.add_parser(
        "spte", help="KVM SPTE (second-stage entry as KVM writes it)",
        description="Name every set bit of an SPTE (hardware bits and KVM's software bits), "
                    "its frame, and what it means to KVM: present (bit 11), an MMIO SPTE "
                    "(with its gfn and memslot generation), readable / writable / executable.")
    spte.add_argument("value", metavar="VALUE", type=_u64)
    fmt = spte.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--ept", action="store_true", help="an EPT SPTE (Intel, TDX)")
    fmt.add_argument("--npt", action="store_true", help="an NPT SPTE (AMD, SEV, SNP)")
    spte.add_argument("--json", action="store_true", help=json_help)
    spte.set_defaults(decode=_decode_spte)

    demo = commands.add_parser(
        "demo", help="run a built-in workload on every VM type and report",
        description="Run a built-in guest workload (shared and private accesses, conversions "
                    "both ways, hugepages, MMIO, memory-fault exits handled like a VMM) on "
                    "every VM type, and print exits, faults, mappings and throughput.")
    demo.add_argument("--accesses", type=_count, default=None,
                      help="random shared accesses per VM (default 400000; 20000 on the "
                           "pure-Python twin)")
    demo.add_argument("--json", action="store_true",
                      help="print the report as one JSON object (a row per VM type)")

    commands.add_parser(
        "fuzz", help="replay fuzz inputs, or run random ones, on both cores compared",
        description="kvmemu.testing's runner: FILE... replays inputs (atheris crash files, "
                    "fuzz/corpus); --seconds N runs random inputs; --one-core runs the fast "
                    "one-core check instead of the differential one.",
        add_help=False)

    replay = commands.add_parser(
        "replay", help="replay the page faults of a host's trace against the model",
        description="Read trace text -- ftrace (/sys/kernel/tracing/trace), 'trace-cmd report' "
                    "or 'perf script' output -- and hand each kvm_page_fault event to the "
                    "model's exit handler: for VMX the traced error_code is the exit "
                    "qualification (TDX: 0x2 for a private GPA), for SVM the error code. "
                    "kvm_exit lines give the vendor and tell EPT violations and #NPFs from "
                    "shadow-paging #PF intercepts; a kvm_nested_vmexit marks L2's faults. "
                    "Those two kinds are reported, not replayed. Prints per event the "
                    "decoded code, the private/shared decision and the handler's result.",
        epilog="example: kvmemu replay trace.txt --vm-type tdx --memslot 0:1G:gmem "
               "--private 0:512M.  A binary trace.dat: 'trace-cmd report trace.dat > "
               "trace.txt' first.")
    replay.add_argument("file", metavar="FILE", help="ftrace text, '-' for stdin")
    replay.add_argument("--vm-type", type=_vm_type, default=VMType.DEFAULT,
                        help="default, sw_protected, sev, sev_es, snp or tdx (default: default)")
    replay.add_argument("--vendor", choices=("vmx", "svm"),
                        help="for DEFAULT and SW_PROTECTED VMs (default vmx)")
    replay.add_argument("--gpaw", type=int, choices=(48, 52), default=48,
                        help="guest physical-address width (default 48)")
    replay.add_argument("--memslot", metavar="GPA:SIZE[:gmem]", type=_memslot, action="append",
                        default=[], help="add a memslot (sizes take K/M/G suffixes; 'gmem' "
                                         "binds a guest_memfd); repeatable")
    replay.add_argument("--private", metavar="GPA:SIZE", type=_range, action="append",
                        default=[], help="mark a range private; repeatable")
    replay.add_argument("--host-level", choices=("4k", "2m", "1g"), default="4k",
                        help="host mapping level of every memslot (default 4k)")
    replay.add_argument("--nx-huge-pages", action="store_true",
                        help="the NX huge page workaround is on")
    replay.add_argument("--trace", action="store_true",
                        help="also print the model's own trace events, as the kernel's")
    replay.add_argument("--compare", action="store_true",
                        help="compare the model's kvm_mmu_set_spte and kvm_tdp_mmu_spte_changed "
                             "events per fault with the host's in the same file (gfns, levels, "
                             "permissions; not frames or table addresses)")
    replay.add_argument("--strict", action="store_true",
                        help="stop at the first kvm line that cannot be read (default: skip "
                             "and count it)")
    replay.add_argument("--summary", action="store_true",
                        help="print only the totals")
    replay.add_argument("--json", action="store_true",
                        help="print one JSON object: a record per event and the totals")
    return parser


def _count(text: str) -> int:
    """A count: a non-negative integer below 2**31."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 1 << 31:
        raise argparse.ArgumentTypeError(f"must be between 0 and {(1 << 31) - 1}, not {value}")
    return value


def _size(text: str) -> int:
    """An integer with an optional K/M/G suffix (powers of 1024)."""
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    return _u64(text[:-1] if scale > 1 else text) * scale


def _range(text: str) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected GPA:SIZE, not {text!r}")
    return _size(parts[0]), _size(parts[1])


def _memslot(text: str) -> tuple[int, int, bool]:
    parts = text.split(":")
    if len(parts) == 3 and parts[2] == "gmem":
        return (*_range(":".join(parts[:2])), True)
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected GPA:SIZE or GPA:SIZE:gmem, not {text!r}")
    return (*_range(text), False)


def _vm_type(text: str) -> VMType:
    try:
        return VMType[text.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown VM type {text!r} (one of {', '.join(t.name.lower() for t in VMType)})"
        ) from None


def _decode(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    if ns.kind == "ept":
        if ns.gpa is not None and not ns.tdx_gpaw:
            parser.error("--gpa needs --tdx-gpaw: only a TD's shared bit reads the GPA")
        ns.gpa = ns.gpa or 0
    rows = ns.decode(ns)
    if ns.json:
        out: dict[str, Any] = {"kind": ns.kind, "value": ns.value, "rows": []}
        for label, text in rows:
            out["rows"].append({"label": label, "text": text})
            if label in ("error code", "exit qualification", "exit_info_1", "spte"):
                out[label.replace(" ", "_")] = int(text.split()[0], 16)
            if label == "private":
                out["private"] = text == "yes"
        print(json.dumps(out))
        return 0
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fuzz"]:
        from .testing import main as fuzz_main
        return fuzz_main(args[1:], prog="kvmemu fuzz")
    ns = parser.parse_args(args)
    try:
        if ns.command == "demo":
            from ._demo import run_demo
            return run_demo(ns.accesses, as_json=ns.json)
        if ns.command == "replay":
            from ._replay import replay
            return replay(parser, ns)
        return _decode(parser, ns)
    except BrokenPipeError:
        # The reader went away (``kvmemu demo | head``): no traceback, and no second
        # error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
