"""The ``kvmemu`` command line (also ``python -m kvmemu``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import _args
from .constants import EPT_VIOLATION, PFERR


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
    import kvmemu

    shared_bit = kvmemu.tdx_shared_bit(ns.tdx_gpaw) if ns.tdx_gpaw else 0
    ec = kvmemu.vmx_error_code(ns.value, ns.gpa, shared_bit)
    rows = [("exit qualification", f"{ns.value:#x}  {EPT_VIOLATION(ns.value)!r}")]
    if ns.tdx_gpaw:
        state = "set: shared" if ns.gpa & shared_bit else "clear: private"
        rows.append(("gpa", f"{ns.gpa:#x}  (TDX shared bit {shared_bit.bit_length() - 1} {state})"))
    rows += [("error code", f"{ec:#x}  {PFERR(ec)!r}"), ("private", _private(ec))]
    return rows


def _decode_npf(ns: argparse.Namespace) -> list[tuple[str, str]]:
    import kvmemu

    ec = kvmemu.svm_error_code(ns.value, snp=ns.snp)
    return [("exit_info_1", f"{ns.value:#x}  {PFERR(ns.value)!r}"),
            ("error code", f"{ec:#x}  {PFERR(ec)!r}"), ("private", _private(ec))]


def _decode_pferr(ns: argparse.Namespace) -> list[tuple[str, str]]:
    return [("error code", f"{ns.value:#x}  {PFERR(ns.value)!r}"), ("private", _private(ns.value))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmemu",
        description="Bit-exact model of x86 second-stage page faults and the Linux 6.18 KVM "
                    "fault path. Values may be decimal or 0x-prefixed hex.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    decode = commands.add_parser("decode", help="name the bits of an exit value or error code",
                                 description="Name every set bit and show the error code KVM "
                                             "derives and whether the fault is private.")
    kinds = decode.add_subparsers(dest="kind", required=True, metavar="KIND")

    ept = kinds.add_parser("ept", help="VMX EPT-violation exit qualification",
                           description="Decode an EPT-violation exit qualification the way "
                                       "__vmx_handle_ept_violation does.")
    ept.add_argument("value", metavar="QUAL", type=_u64)
    ept.add_argument("--gpa", type=_u64, default=0, help="faulting GPA (default 0)")
    ept.add_argument("--tdx-gpaw", type=int, choices=(48, 52),
                     help="the VM is a TD with this guest physical-address width")
    ept.set_defaults(decode=_decode_ept)

    npf = kinds.add_parser("npf", help="AMD #NPF EXITINFO1",
                           description="Decode #NPF EXITINFO1 the way npf_interception does.")
    npf.add_argument("value", metavar="EXITINFO1", type=_u64)
    npf.add_argument("--snp", action="store_true", help="the VM is an SEV-SNP guest")
    npf.set_defaults(decode=_decode_npf)

    pferr = kinds.add_parser("pferr", help="KVM page-fault error code",
                             description="Name the PFERR bits of a KVM error code.")
    pferr.add_argument("value", metavar="CODE", type=_u64)
    pferr.set_defaults(decode=_decode_pferr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "decode":
        rows = ns.decode(ns)
        width = max(len(label) for label, _ in rows)
        for label, text in rows:
            print(f"{label:<{width}}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
