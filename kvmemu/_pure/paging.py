"""Second-stage page tables and the hardware walk (EPT on Intel, NPT on AMD).

The twin of ``_cy/paging.pyx`` and the readable specification of what the CPU
does when a guest-physical access goes through the second stage: which entries
it reads, when it stops, whether the result is a translation, an EPT
violation, an EPT misconfiguration or a nested page fault, every bit of the
exit, and the accessed/dirty bits it sets on success (Intel SDM vol. 3C
29.3.2-29.3.5 and 28.2.1, AMD APM vol. 2 15.25; docs/reference.md, "The
hardware walk").

Storage: the paging-structure memory is one 2-D ``numpy.uint64`` array of
512-entry tables over a mapping reserved once (never moved, committed as
tables are used), as in the compiled core; table k lives at host-physical address
``PT_BASE_HPA + k * PAGE_SIZE`` and table 0 is the root.  A non-leaf entry
holds its child's address; an address that holds no table reads as zeros.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any

import numpy as np

from .. import _args, _tables
from ..results import EptMisconfig, EptViolation, NestedPageFault, Translation
from .cnames import *  # noqa: F403  (the constants under their C names)
from .locking import RwLock, atomic_or64

#: Tables of address space each PageTables reserves (16 GiB; memory is committed only
#: as tables are used).  MAXPHYADDR may allow more: new_table raises MemoryError here.
RESERVED_TABLES = 1 << 22
#: mmap's MAP_NORESERVE (the mmap module names it from Python 3.12 on).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)

# Why a hardware walk stopped at the last entry it read (enum WalkStop).
STOP_NOT_PRESENT = 0
STOP_RESERVED = 1   # EPT misconfiguration / NPT reserved bit
STOP_LEAF = 2
# What one access came to (enum OutcomeKind).
OUT_TRANSLATED = 0
OUT_EPT_VIOLATION = 1
OUT_EPT_MISCONFIG = 2
OUT_NPF = 3
OUT_PML_FULL = 4    # the VMX exit "page-modification log full" (reason 62)
OUT_TDX_PENDING = 5  # an EPT violation on a PENDING private page (extended type 6)
OUT_GUEST_VC = 6    # #VC in the guest: no VM exit


class WalkPath:
    """The entries a walk read, root first, and why it stopped (struct WalkPath)."""

    __slots__ = ("n", "stop", "level", "entry", "slot")

    def __init__(self) -> None:
        self.n = 0
        self.stop = STOP_NOT_PRESENT
        self.level: list[int] = []
        self.entry: list[int] = []
        self.slot: list[tuple[int, int]] = []   # (table, index); table -1: no table there


class Outcome:
    """What one access came to (struct Outcome): kind, the leaf's level, and the hpa,
    exit qualification or EXITINFO1."""

    __slots__ = ("kind", "level", "value")

    def __init__(self, kind: int = OUT_TRANSLATED, level: int = 0, value: int = 0) -> None:
        self.kind = kind
        self.level = level
        self.value = value


def bits_from(lo: int, hi: int) -> int:
    """Mask of bits hi:lo."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def gpa_index(gpa: int, level: int) -> int:
    """SPTE_INDEX: the 9 GPA bits that index the level-``level`` table."""
    return (gpa >> (PAGE_SHIFT + PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)


def level_page_mask(level: int) -> int:
    """The GPA bits a level-``level`` leaf passes through (4K: 11:0, 2M: 20:0, 1G: 29:0)."""
    return (1 << (PAGE_SHIFT + PT_LEVEL_BITS * (level - 1))) - 1


def table_hpa(table: int) -> int:
    """The host-physical address of table ``table``."""
    return PT_BASE_HPA + (table << PAGE_SHIFT)


def table_at(hpa: int, ntables: int) -> int:
    """Index of the table at page-aligned ``hpa``, or -1 if none is there."""
    k = (hpa - PT_BASE_HPA) >> PAGE_SHIFT
    return k if hpa >= PT_BASE_HPA and k < ntables else -1


def is_large(c: Any, level: int, e: int) -> bool:
    """Bit 7 at the PDPTE or PDE: the entry maps a page instead of a table."""
    return level in (PG_LEVEL_2M, PG_LEVEL_1G) and e & c.large_bit != 0


def ept_misconfigured(c: Any, level: int, e: int) -> bool:
    """A present EPT entry that causes an EPT misconfiguration (SDM 29.3.3.1)."""
    if e & EPTE_WRITE and not e & EPTE_READ:          # write-only, write+execute
        return True
    x_any = EPTE_EXEC | (EPTE_USER_EXEC if c.mbec else 0)
    if not e & (EPTE_READ | EPTE_WRITE) and e & x_any and not c.exec_only:
        return True
    if e & c.rsvd_high:
        return True
    if level > PG_LEVEL_1G:
        return e & EPT_RSVD_ROOT != 0
    if level == PG_LEVEL_1G and e & EPTE_LARGE and not c.huge_1g:
        return True
    if not (level == PG_LEVEL_4K or is_large(c, level, e)):
        return e & EPT_RSVD_NONLEAF != 0
    if level == PG_LEVEL_1G and e & EPT_RSVD_1G or level == PG_LEVEL_2M and e & EPT_RSVD_2M:
        return True
    return (EPT_BAD_MEMTYPES >> ((e & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT)) & 1 == 1


def npt_reserved(c: Any, level: int, e: int) -> bool:
    """A present NPT entry with a reserved bit set (RSVD #NPF)."""
    if e & c.rsvd_high or (not c.host_nx and e & PTE_NX):
        return True
    if level > PG_LEVEL_1G:
        return e & NPT_RSVD_ROOT != 0
    if level == PG_LEVEL_1G and e & PTE_LARGE:
        return not c.huge_1g or e & NPT_RSVD_1G != 0
    return level == PG_LEVEL_2M and e & PTE_LARGE != 0 and e & NPT_RSVD_2M != 0


def hw_walk(c: Any, mem: np.ndarray, ntables: int, gpa: int, path: WalkPath) -> None:
    """The entries the CPU reads for ``gpa``, root first, and why it stopped."""
    table = 0
    for level in range(c.levels, 0, -1):
        index = gpa_index(gpa, level)
        e = int(mem[table, index]) if table >= 0 else 0
        path.level.append(level)
        path.entry.append(e)
        path.slot.append((table, index))
        path.n += 1
        if not e & c.present_mask:
            path.stop = STOP_NOT_PRESENT
            return
        if ept_misconfigured(c, level, e) if c.ept else npt_reserved(c, level, e):
            path.stop = STOP_RESERVED
            return
        if level == PG_LEVEL_4K or is_large(c, level, e):
            path.stop = STOP_LEAF
            return
        table = table_at(e & c.addr_mask, ntables)


class PmlLog:
    """A vCPU's page-modification log (Intel SDM vol. 3C, "Page-Modification Logging"):
    the 512-entry buffer at the VMCS's PML address and the PML index, which counts down
    from 511 (PML_HEAD_INDEX) as GPAs are logged; after entry 0 it wraps to 0xFFFF."""

    __slots__ = ("gpa", "index")

    def __init__(self) -> None:
        self.gpa = [0] * PML_LOG_NR_ENTRIES
        self.index = PML_LOG_NR_ENTRIES - 1


def pml_log(pml: Any, gpa: int) -> bool:
    """The CPU about to set an EPT dirty flag with PML on: with the index in 0..511, log
    the GPA (bits 11:0 cleared) and decrement the index; False when the log is full (a
    page-modification log-full VM exit instead of the access)."""
    if pml.index >= PML_LOG_NR_ENTRIES:
        return False
    pml.gpa[pml.index] = gpa & ~(PAGE_SIZE - 1)
    pml.index = (pml.index - 1) & 0xFFFF
    return True


def translated(path: WalkPath, c: Any, gpa: int, mem: np.ndarray, accessed: int, dirty: int,
               write: bool, pml: Any = None) -> Outcome:
    """The leaf's address, after setting accessed in every entry used and dirty in the
    leaf for a write (a store only where the bit is not yet set), with a locked OR as
    the CPU does (a fault may be changing the same entry).  With a PML log, setting a
    dirty flag logs the GPA first (or exits when the log is full)."""
    last = path.n - 1
    if write and pml is not None and not path.entry[last] & dirty and not pml_log(pml, gpa):
        return Outcome(OUT_PML_FULL)
    for i in range(path.n):
        if not path.entry[i] & accessed:
            atomic_or64(mem, path.slot[i], accessed)
    if write and not path.entry[last] & dirty:
        atomic_or64(mem, path.slot[last], dirty)
    level = path.level[last]
    mask = level_page_mask(level)
    return Outcome(OUT_TRANSLATED, level, (path.entry[last] & c.addr_mask & ~mask) | (gpa & mask))


def ept_access_bits(c: Any, flags: int) -> int:
    """The access bits (2:0) of an EPT-violation exit qualification (Intel SDM vol. 3C,
    Table 29-7): a guest paging-structure access is a read, and a write too when EPT A/D
    bits are on (the CPU sets the entry's A/D bits)."""
    if flags & ACCESS_FLAGS_WALK:
        return EPT_VIOLATION_ACC_READ | (
            EPT_VIOLATION_ACC_WRITE if c.ad_bits or flags & ACCESS_FLAGS_WRITE else 0)
    if flags & ACCESS_FLAGS_FETCH:
        return EPT_VIOLATION_ACC_INSTR
    if flags & ACCESS_FLAGS_WRITE:
        return EPT_VIOLATION_ACC_WRITE
    return EPT_VIOLATION_ACC_READ


def ept_gva_bits(q: int, flags: int) -> int:
    """``q`` with bits 7 and 8 of an EPT-violation exit qualification (SDM Table 29-7):
    a guest-linear address is valid unless NOGVA, and it was translated unless the access
    was to a guest paging-structure entry."""
    if not flags & ACCESS_FLAGS_NOGVA:
        q |= EPT_VIOLATION_GVA_IS_VALID
        if not flags & ACCESS_FLAGS_WALK:
            q |= EPT_VIOLATION_GVA_TRANSLATED
    return q


def npf_error_bits(c: Any, flags: int) -> int:
    """The bits of a #NPF EXITINFO1 that come from the access, not from the entries (AMD
    APM vol. 2, "Nested versus Guest Page Faults"): USER (the nested walk is a user
    access), WRITE (guest page-table accesses count as writes), FETCH (with NX or SMEP on),
    GUEST_PAGE or GUEST_FINAL (unless no guest address), and GUEST_ENC for the C-bit."""
    code = PFERR_USER
    if flags & (ACCESS_FLAGS_WRITE | ACCESS_FLAGS_WALK):
        code |= PFERR_WRITE
    if flags & ACCESS_FLAGS_FETCH and (c.host_nx or c.host_smep):
        code |= PFERR_FETCH
    if flags & ACCESS_FLAGS_WALK:
        code |= PFERR_GUEST_PAGE
    elif not flags & ACCESS_FLAGS_NOGVA:
        code |= PFERR_GUEST_FINAL
    if flags & ACCESS_FLAGS_ENCRYPTED:
        code |= PFERR_GUEST_ENC
    return code


def ept_translate(c: Any, mem: np.ndarray, gpa: int, flags: int, path: WalkPath,
                  pml: Any = None) -> Outcome:
    """EPT: misconfiguration first, then violation, then the translation."""
    if path.stop == STOP_RESERVED:
        return Outcome(OUT_EPT_MISCONFIG)
    acc = ept_access_bits(c, flags)
    rwx, xu = EPTE_READ | EPTE_WRITE | EPTE_EXEC, EPTE_USER_EXEC
    for e in path.entry:   # AND over every entry used, the last one included
        rwx &= e
        xu &= e
    user_fetch = c.mbec and flags & ACCESS_FLAGS_USER
    allowed = ((not acc & EPT_VIOLATION_ACC_READ or rwx & EPTE_READ)
               and (not acc & EPT_VIOLATION_ACC_WRITE or rwx & EPTE_WRITE)
               and (not acc & EPT_VIOLATION_ACC_INSTR or (xu if user_fetch else rwx & EPTE_EXEC)))
    if path.stop == STOP_LEAF and allowed:
        if c.ad_bits:
            return translated(path, c, gpa, mem, EPTE_ACCESSED, EPTE_DIRTY,
                              acc & EPT_VIOLATION_ACC_WRITE != 0, pml)
        return translated(path, c, gpa, mem, 0, 0, False)
    # The qualification's bits 5:3 are the R/W/X bits 2:0 of the entries, moved up.
    q = ept_gva_bits(acc, flags) | rwx * (EPT_VIOLATION_PROT_READ // EPTE_READ)
    if c.mbec and xu:
        q |= EPT_VIOLATION_PROT_USER_EXEC
    return Outcome(OUT_EPT_VIOLATION, 0, q)


def npt_translate(c: Any, mem: np.ndarray, gpa: int, flags: int, path: WalkPath) -> Outcome:
    """NPT: a not-present or reserved entry, or a permission fault."""
    write = flags & (ACCESS_FLAGS_WRITE | ACCESS_FLAGS_WALK) != 0   # walks count as writes
    fetch = flags & ACCESS_FLAGS_FETCH != 0
    code = npf_error_bits(c, flags)
    if path.stop == STOP_RESERVED:
        code |= PFERR_PRESENT | PFERR_RSVD
    elif path.stop == STOP_LEAF:
        us, nx = PTE_USER | PTE_WRITABLE, 0
        for e in path.entry:
            us &= e
            nx |= e & PTE_NX
        if us & PTE_USER and (not write or us & PTE_WRITABLE) and not (fetch and c.host_nx
                                                                         and nx):
            return translated(path, c, gpa, mem, PTE_ACCESSED, PTE_DIRTY, write)
        code |= PFERR_PRESENT
    return Outcome(OUT_NPF, 0, code)


def ept_fast_translate(c: Any, mem: np.ndarray, ntables: int, gpa: int, flags: int,
                       out: Outcome, levels: int, pml: Any = None) -> bool:
    """The common EPT case in one pass: a final-stage read or write whose every entry is
    readable (and writable for a write), well-formed and present -- or that meets a
    not-present entry on the way, an EPT violation whose qualification holds only the
    access and linear-address bits (the AND of R/W/X over the entries used is 0 with
    that entry, SDM "Exit Qualification for EPT Violations"; a not-present entry's
    other bits are ignored, so it is never a misconfiguration; no accessed flag is set).
    Anything else returns False and goes through the general walk, which gives the same
    result for what this accepts: the translation, accessed bits on every entry, dirty
    on the leaf for a write.
    """
    if flags & ~(ACCESS_FLAGS_WRITE | ACCESS_FLAGS_USER | ACCESS_FLAGS_ENCRYPTED):
        return False
    need = EPTE_READ | (EPTE_WRITE if flags & ACCESS_FLAGS_WRITE else 0)
    used = []
    table, level = 0, levels
    while True:
        index = gpa_index(gpa, level)
        e = int(mem[table, index])
        used.append((table, index))
        if e & need != need or e & c.rsvd_high:
            if not e & c.present_mask:
                out.kind, out.level = OUT_EPT_VIOLATION, 0
                out.value = ept_gva_bits(ept_access_bits(c, flags), flags)
                return True
            return False
        if level > PG_LEVEL_1G:
            if e & EPT_RSVD_ROOT:
                return False
        elif level == PG_LEVEL_4K or e & EPTE_LARGE:
            break
        elif e & EPT_RSVD_NONLEAF:
            return False
        table = table_at(e & c.addr_mask, ntables)
        if table < 0:
            return False
        level -= 1
    if level == PG_LEVEL_1G and (not c.huge_1g or e & EPT_RSVD_1G):
        return False
    if level == PG_LEVEL_2M and e & EPT_RSVD_2M:
        return False
    if (EPT_BAD_MEMTYPES >> ((e & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT)) & 1:
        return False
    if c.ad_bits:
        if flags & ACCESS_FLAGS_WRITE and not e & EPTE_DIRTY and pml is not None:
            return False                     # the general walk logs it
        for where in used:
            if not int(mem[where]) & EPTE_ACCESSED:
                atomic_or64(mem, where, EPTE_ACCESSED)
        if flags & ACCESS_FLAGS_WRITE and not e & EPTE_DIRTY:
            atomic_or64(mem, used[-1], EPTE_DIRTY)
    page_mask = level_page_mask(level)
    out.kind, out.level = OUT_TRANSLATED, level
    out.value = (e & c.addr_mask & ~page_mask) | (gpa & page_mask)
    return True


def translate_one(c: Any, mem: np.ndarray, ntables: int, gpa: int, flags: int,
                  pml: Any = None) -> Outcome:
    """One guest-physical access: walk, then the vendor's verdict (and A/D on success).
    ``pml``: the vCPU's PmlLog while PML is enabled in its VMCS (EPT only), else None."""
    out = Outcome()
    if c.ept and ept_fast_translate(c, mem, ntables, gpa, flags, out, c.levels, pml):
        return out
    return translate_walked(c, mem, ntables, gpa, flags, pml)


def translate_walked(c: Any, mem: np.ndarray, ntables: int, gpa: int, flags: int,
                     pml: Any = None) -> Outcome:
    """translate_one after its one-pass EPT walk declined the access: the general walk
    and the vendor's verdict."""
    path = WalkPath()
    hw_walk(c, mem, ntables, gpa, path)
    if c.ept:
        return ept_translate(c, mem, gpa, flags, path, pml)
    return npt_translate(c, mem, gpa, flags, path)


def outcome_object(out: Outcome, gpa: int) -> Any:
    """The result object of an outcome: Translation or the exit."""
    if out.kind == OUT_TRANSLATED:
        return Translation(out.value, out.level)
    if out.kind == OUT_EPT_VIOLATION:
        return EptViolation(gpa, out.value)
    if out.kind == OUT_EPT_MISCONFIG:
        return EptMisconfig(gpa)
    return NestedPageFault(gpa, out.value)


class PageTables:
    """Second-stage paging structures and the CPU's walk of them.

    ``PageTables(kind, levels=4, *, ad_bits=True, exec_only=True, mbec=False,
    maxphyaddr=52, huge_1g=True, host_nx=True, host_smep=False)``

    ``kind`` "ept" (Intel) or "npt" (AMD, long-mode format); ``levels`` 4 or 5.
    EPT: ``ad_bits`` is EPTP bit 6, ``exec_only`` and ``huge_1g`` the
    IA32_VMX_EPT_VPID_CAP bits, ``mbec`` mode-based execute control.  NPT:
    ``host_nx`` / ``host_smep`` are host EFER.NX / CR4.SMEP at VMRUN (NPT
    always has A/D bits; ``ad_bits``, ``exec_only`` and ``mbec`` are EPT-only
    and ignored for NPT).  ``maxphyaddr`` (36..52): bits 51:maxphyaddr of an
    entry are reserved.

    Decisions where the hardware documentation is silent:

    * A GPA with bits above the walk's reach (bit 47 for 4 levels, bit 56 for
      5) is rejected with ValueError: no entry could translate it.
    * ``stage="nogva"`` on NPT reports neither GUEST_FINAL nor GUEST_PAGE and is
      an ordinary data access (RW only for ``write``); on EPT it clears bits 7
      and 8 and is never promoted to a write by ``ad_bits`` (a PDPTE load).
    * ``fetch=True`` needs ``stage="final"``: walk accesses and PDPTE loads are
      data accesses (ValueError otherwise).  ``encrypted`` only affects NPT.
    * NPT: a successful guest paging-structure access counts as a write, so it
      sets the dirty bit of the leaf as well as the accessed bits.
    """

    def __init__(self, kind: Any, levels: Any = 4, *, ad_bits: Any = True,
                 exec_only: Any = True, mbec: Any = False, maxphyaddr: Any = 52,
                 huge_1g: Any = True, host_nx: Any = True, host_smep: Any = False) -> None:
        (self.kind, self.levels, self.ad_bits, self.exec_only, self.mbec, self.maxphyaddr,
         self.huge_1g, self.host_nx, self.host_smep) = _args.paging_config(
            kind, levels, ad_bits, exec_only, mbec, maxphyaddr, huge_1g, host_nx, host_smep)
        self.ept = self.kind == "ept"
        self.addr_mask = bits_from(PAGE_SHIFT, self.maxphyaddr - 1)
        self.rsvd_high = bits_from(self.maxphyaddr, 51) if self.maxphyaddr < 52 else 0
        self.max_tables = ((1 << self.maxphyaddr) - PT_BASE_HPA) // PAGE_SIZE
        if self.ept:
            self.present_mask = (EPTE_READ | EPTE_WRITE | EPTE_EXEC
                                 | (EPTE_USER_EXEC if self.mbec else 0))
            self.large_bit = EPTE_LARGE
            self.nonleaf = self.present_mask | (EPTE_ACCESSED if self.ad_bits else 0)
        else:
            self.present_mask = PTE_PRESENT
            self.large_bit = PTE_LARGE
            self.nonleaf = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED
        self.init_storage()
        self.ntables = 1
        self.lock = RwLock()        # its own, or the VM's mmu_lock (TdpMmu shares it)
        self.free_list: list[int] = []
        self.kvm_owned = False      # the tables of a VM's TDP MMU: no writes from outside

    def init_storage(self) -> None:
        """Reserve the table memory: zeroed, never moved (numpy releases the GIL while
        it fills a table, so a growing array could move under another thread)."""
        reservation = mmap.mmap(-1, RESERVED_TABLES * PAGE_SIZE,
                                flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        self.mem = np.frombuffer(reservation, dtype=np.uint64).reshape(RESERVED_TABLES,
                                                                        PT_ENTRIES)

    def __reduce__(self) -> Any:
        raise TypeError("PageTables cannot be copied or pickled")

    def __repr__(self) -> str:
        return f"PageTables({self.kind!r}, levels={self.levels}, tables={self.ntables})"

    # --- storage ----------------------------------------------------------------------

    @property
    def root_hpa(self) -> int:
        """Host-physical address of the root table (the EPTP / nCR3 address)."""
        return PT_BASE_HPA

    @property
    def tables(self) -> np.ndarray:
        """A read-only copy of the tables, ``(ntables, 512)`` uint64; row k is at
        ``root_hpa + k * 4096``."""
        copy = self.mem[:self.ntables].copy()
        copy.flags.writeable = False
        return copy

    def new_table(self) -> int:
        """One more table at the end of the storage (zeroed)."""
        if self.ntables == self.max_tables:
            raise MemoryError(f"no host-physical room below MAXPHYADDR {self.maxphyaddr} "
                              "for another table")
        if self.ntables == RESERVED_TABLES:
            raise MemoryError(f"all {RESERVED_TABLES} tables of the reservation are in use")
        self.ntables += 1
        return self.ntables - 1

    def export_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the tables, (ntables, 512) uint64, and of the free list (int64, in
        stack order): what a snapshot's bytes hold of them."""
        return self.mem[:self.ntables].copy(), np.array(self.free_list, dtype=np.int64)

    def load_tables(self, tables: np.ndarray, free: np.ndarray) -> None:
        """Make the tables ``tables`` with free list ``free`` (from export_tables; checked:
        a shape the storage can hold, free tables that exist, none twice, not the root)."""
        n = _tables.check_table_export(tables, free, min(self.max_tables, RESERVED_TABLES))
        self.mem[:n] = tables
        self.mem[n:self.ntables] = 0
        self.ntables = n
        self.free_list = [int(t) for t in free]

    def clone(self) -> "PageTables":
        """A copy of the tables and their configuration (for VM snapshots)."""
        c = PageTables.__new__(PageTables)
        c.__dict__.update(self.__dict__)
        c.init_storage()
        c.mem[:self.ntables] = self.mem[:self.ntables]
        c.lock = RwLock()
        c.free_list = list(self.free_list)
        return c

    # --- KVM's use of the storage: the TDP MMU allocates, links and frees tables ----------
    # Unchecked: the MMU passes only tables it allocated.  entry() and store() are the
    # checked access that set_entry / get_entry use.

    def alloc(self, fill: int) -> int:
        """A table for the TDP MMU, every entry ``fill``; freed tables are reused last
        freed first, so table addresses are a pure function of the call sequence."""
        table = self.free_list.pop() if self.free_list else self.new_table()
        self.fill(table, fill)
        return table

    def free(self, table: int) -> None:
        self.free_list.append(table)

    def fill(self, table: int, value: int) -> None:
        self.mem[table, :] = value

    def read(self, table: int, index: int) -> int:
        return int(self.mem[table, index])

    def write(self, table: int, index: int, value: int) -> None:
        self.mem[table, index] = value

    def entry(self, table: int, index: int) -> int:
        """An entry, or 0 for table -1 (an address that holds no table); IndexError for
        a table or index that does not exist."""
        if table == -1:
            return 0
        if not (0 <= table < self.ntables and 0 <= index < PT_ENTRIES):
            raise IndexError(f"no entry {index} of table {table}")
        return self.read(table, index)

    def store(self, table: int, index: int, value: int) -> int:
        """Write an entry; IndexError for a table or index that does not exist,
        ValueError for a VM's tables (only KVM writes them)."""
        if self.kvm_owned:
            raise ValueError("these are the tables of a VM's TDP MMU: only KVM writes them")
        if not (0 <= table < self.ntables and 0 <= index < PT_ENTRIES):
            raise IndexError(f"no entry {index} of table {table}")
        self.write(table, index, value)
        return 0

    def hpa(self, table: int) -> int:
        return table_hpa(table)

    def table_at(self, hpa: int) -> int:
        return table_at(hpa, self.ntables)

    def is_large(self, level: int, e: int) -> bool:
        return is_large(self, level, e)

    def _set_kvm_owned(self, owned: bool) -> None:
        """For kvmemu.testing.writable only: tests of check_invariants write what KVM
        never would."""
        self.kvm_owned = owned

    # --- the public interface -----------------------------------------------------------

    def set_entry(self, gpa: Any, level: Any, value: Any) -> None:
        """Store ``value`` in the level-``level`` entry on the walk path of ``gpa``.

        Missing tables above it are created and linked with non-leaf entries that
        grant everything (EPT: R|W|X, +XU with MBEC, +A with A/D; NPT: P|RW|US|A).
        ValueError, changing nothing, if a present entry above ``level`` is a leaf
        or points at an address that holds no table.
        """
        _tables.set_entry(self, gpa, level, value)

    def get_entry(self, gpa: Any, level: Any) -> int:
        """The level-``level`` entry on the walk path of ``gpa``; 0 where that table
        does not exist."""
        return _tables.get_entry(self, gpa, level)

    def walk(self, gpa: Any) -> list[tuple[int, int]]:
        """``(level, entry)`` from the root down to the entry at which the hardware
        walk stops: not present, a leaf, or reserved / misconfigured."""
        path = WalkPath()
        g = _args.gpa(gpa, self.levels)
        self.lock.acquire_read()
        try:
            hw_walk(self, self.mem, self.ntables, g, path)
        finally:
            self.lock.release_read()
        return list(zip(path.level, path.entry))

    def translate(self, gpa: Any, *, write: Any = False, fetch: Any = False, user: Any = False,
                  stage: Any = "final", encrypted: Any = False) -> Any:
        """What the CPU does for one guest-physical access: ``Translation(hpa,
        level)``, or ``EptViolation`` / ``EptMisconfig`` (EPT) / ``NestedPageFault``
        (NPT).  A translation sets accessed bits in every entry used and dirty in
        the leaf for a write (EPT only with ``ad_bits``); an exit changes nothing."""
        g = _args.gpa(gpa, self.levels)
        flags = _args.access(write, fetch, user, stage, encrypted)
        self.lock.acquire_read()
        try:
            out = translate_one(self, self.mem, self.ntables, g, flags)
        finally:
            self.lock.release_read()
        return outcome_object(out, g)

    def translate_many(self, gpas: Any, flags: Any = 0) -> tuple[np.ndarray, np.ndarray]:
        """Translate each element of ``gpas`` (1-D uint64) in order, with ``flags``
        an ``AccessFlags`` int or a 1-D uint8 array of them.

        Returns ``(hpa, level)``: uint64 and uint8 arrays.  An element whose
        access exits gives hpa 0 and level 0 (and, like ``translate``, changes
        nothing); ``translate`` on it gives the exit.
        """
        g = _args.gpa_array(gpas, self.levels)
        f = _args.access_flags_array(flags, len(g))
        hpa = np.zeros(len(g), dtype=np.uint64)
        level = np.zeros(len(g), dtype=np.uint8)
        per_element = f.tolist() if isinstance(f, np.ndarray) else [f] * len(g)
        self.lock.acquire_read()
        try:
            for i, (gpa, fl) in enumerate(zip(g.tolist(), per_element)):
                out = translate_one(self, self.mem, self.ntables, gpa, fl)
                if out.kind == OUT_TRANSLATED:
                    hpa[i], level[i] = out.value, out.level
        finally:
            self.lock.release_read()
        return hpa, level
