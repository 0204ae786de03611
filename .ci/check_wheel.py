"""Check a built kvmemu wheel: what it ships and how (CI runs it on a fresh build).

The wheel holds the stripped extension, the Python code, the stubs and py.typed,
the LICENSE and SPDX metadata; not the Cython sources, the generated C or headers.
"""

import sys
import zipfile

ELF_SECTIONS_NOT_SHIPPED = (b".symtab", b".debug_info", b".debug_line")


def elf_section_names(data: bytes) -> set[bytes]:
    """Section names of a 64-bit little-endian ELF image."""
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize = int.from_bytes(data[0x3A:0x3C], "little")
    shnum = int.from_bytes(data[0x3C:0x3E], "little")
    shstrndx = int.from_bytes(data[0x3E:0x40], "little")
    strtab = shoff + shstrndx * shentsize
    names_at = int.from_bytes(data[strtab + 0x18:strtab + 0x20], "little")
    names = set()
    for i in range(shnum):
        name = int.from_bytes(data[shoff + i * shentsize:shoff + i * shentsize + 4], "little")
        names.add(data[names_at + name:data.index(b"\0", names_at + name)])
    return names


def main(path: str) -> int:
    problems = []
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        for name in names:
            if name.endswith((".c", ".h", ".pyx", ".pxd", ".html")):
                problems.append(f"ships a source or build file: {name}")
        sos = [n for n in names if n.startswith("kvmemu/_core.") and n.endswith(".so")]
        if len(sos) != 1:
            problems.append(f"expected one compiled core, found {sos}")
        else:
            data = wheel.read(sos[0])
            found = elf_section_names(data) & set(ELF_SECTIONS_NOT_SHIPPED)
            if found:
                problems.append(f"{sos[0]} is not stripped: {sorted(found)}")
            if len(data) > 2 << 20:
                problems.append(f"{sos[0]} is {len(data)} bytes")
        for needed in ("kvmemu/py.typed", "kvmemu/__init__.pyi", "kvmemu/_pure/cnames.pyi"):
            if needed not in names:
                problems.append(f"missing {needed}")
        if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
            problems.append("no LICENSE in the dist-info")
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        for line in (b"License-Expression: MIT", b"Operating System :: POSIX :: Linux"):
            if line not in metadata:
                problems.append(f"METADATA lacks {line.decode()!r}")
    for problem in problems:
        print(f"wheel: {problem}", file=sys.stderr)
    print(f"{path}: {len(names)} files, {'ok' if not problems else 'PROBLEMS'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
