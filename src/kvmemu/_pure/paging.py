"""Second-stage page tables and the hardware walk (EPT on Intel, NPT on AMD).

The twin of ``_paging.pxi`` and the readable specification of what the CPU
does when a guest-physical access goes through the second stage: which entries
it reads, when it stops, whether the result is a translation, an EPT
violation, an EPT misconfiguration or a nested page fault, every bit of the
exit, and the accessed/dirty bits it sets on success.  The rules and their
sources are in docs/hardware-exits.md, parts A1-A3.

Storage: the paging-structure memory is one 2-D ``numpy.uint64`` array of
512-entry tables; table k lives at host-physical address
``PT_BASE_HPA + k * PAGE_SIZE`` and table 0 is the root.  A non-leaf entry
holds its child's address; an address that holds no table reads as zeros.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import _args
from ..constants import (EPT_BAD_MEMTYPES, EPT_MEMTYPE_MASK, EPT_MEMTYPE_SHIFT, EPT_RSVD_1G,
                         EPT_RSVD_2M, EPT_RSVD_NONLEAF, EPT_RSVD_ROOT, EPT_VIOLATION, EPTE,
                         NPT_RSVD_1G, NPT_RSVD_2M, NPT_RSVD_ROOT, PAGE_SHIFT, PAGE_SIZE, PFERR,
                         PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, PT_BASE_HPA, PT_ENTRIES,
                         PT_LEVEL_BITS, PTE, AccessFlags)
from ..results import EptMisconfig, EptViolation, NestedPageFault, Translation

# Plain ints: arithmetic on IntFlag members builds flag objects per operation.
_R, _W, _X = EPTE.READ.value, EPTE.WRITE.value, EPTE.EXEC.value
_XU = EPTE.USER_EXEC.value
_EPT_LARGE, _EPT_A, _EPT_D = EPTE.LARGE.value, EPTE.ACCESSED.value, EPTE.DIRTY.value
_P, _RW, _US = PTE.PRESENT.value, PTE.WRITABLE.value, PTE.USER.value
_NX, _NPT_LARGE, _NPT_A, _NPT_D = PTE.NX.value, PTE.LARGE.value, PTE.ACCESSED.value, PTE.DIRTY.value
_WRITE, _FETCH, _USER = AccessFlags.WRITE.value, AccessFlags.FETCH.value, AccessFlags.USER.value
_ENCRYPTED, _WALK, _NOGVA = (AccessFlags.ENCRYPTED.value, AccessFlags.WALK.value,
                             AccessFlags.NOGVA.value)
_ACC_READ, _ACC_WRITE, _ACC_INSTR = (EPT_VIOLATION.ACC_READ.value, EPT_VIOLATION.ACC_WRITE.value,
                                     EPT_VIOLATION.ACC_INSTR.value)
#: The qualification's bits 5:3 are the R/W/X bits 2:0 of the entries, moved up.
_PROT_PER_RWX = EPT_VIOLATION.PROT_READ.value // _R
_PROT_USER_EXEC = EPT_VIOLATION.PROT_USER_EXEC.value
_GVA_IS_VALID, _GVA_TRANSLATED = (EPT_VIOLATION.GVA_IS_VALID.value,
                                  EPT_VIOLATION.GVA_TRANSLATED.value)
_PF_PRESENT, _PF_WRITE, _PF_USER, _PF_RSVD, _PF_FETCH = (
    PFERR.PRESENT.value, PFERR.WRITE.value, PFERR.USER.value, PFERR.RSVD.value, PFERR.FETCH.value)
_PF_FINAL, _PF_PAGE, _PF_ENC = (PFERR.GUEST_FINAL.value, PFERR.GUEST_PAGE.value,
                                PFERR.GUEST_ENC.value)
_INITIAL_TABLES = 4
_GROWTH_TABLES = 256

# Why a hardware walk stopped at the last entry it read.
STOP_NOT_PRESENT = 0
STOP_RESERVED = 1   # EPT misconfiguration / NPT reserved bit
STOP_LEAF = 2


def _bits(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def gpa_index(gpa: int, level: int) -> int:
    """SPTE_INDEX: the 9 GPA bits that index the level-``level`` table."""
    return (gpa >> (PAGE_SHIFT + PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)


def level_page_mask(level: int) -> int:
    """The GPA bits a level-``level`` leaf passes through (4K: 11:0, 2M: 20:0, 1G: 29:0)."""
    return (1 << (PAGE_SHIFT + PT_LEVEL_BITS * (level - 1))) - 1


class WalkStep(NamedTuple):
    level: int
    entry: int
    table: int   # -1: the address read holds no table (the entry read as 0)
    position: int   # the entry's index in its table


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
        self._ept = self.kind == "ept"
        self._addr_mask = _bits(self.maxphyaddr - 1, PAGE_SHIFT)
        self._rsvd_high = _bits(51, self.maxphyaddr) if self.maxphyaddr < 52 else 0
        self._max_tables = ((1 << self.maxphyaddr) - PT_BASE_HPA) // PAGE_SIZE
        if self._ept:
            self._present_mask = _R | _W | _X | (_XU if self.mbec else 0)
            self._nonleaf = (_R | _W | _X | (_XU if self.mbec else 0)
                             | (_EPT_A if self.ad_bits else 0))
        else:
            self._present_mask = _P
            self._nonleaf = _P | _RW | _US | _NPT_A
        self._large_bit = _EPT_LARGE if self._ept else _NPT_LARGE
        self._mem = np.zeros((_INITIAL_TABLES, PT_ENTRIES), dtype=np.uint64)
        self._ntables = 1
        self._free: list[int] = []

    def __repr__(self) -> str:
        return f"PageTables({self.kind!r}, levels={self.levels}, tables={self._ntables})"

    # --- storage ----------------------------------------------------------------------

    @property
    def root_hpa(self) -> int:
        """Host-physical address of the root table (the EPTP / nCR3 address)."""
        return PT_BASE_HPA

    @property
    def tables(self) -> np.ndarray:
        """A read-only copy of the tables, ``(ntables, 512)`` uint64; row k is at
        ``root_hpa + k * 4096``.  (A copy: the storage is resized in place as it grows.)"""
        copy = self._mem[:self._ntables].copy()
        copy.flags.writeable = False
        return copy

    def _table_at(self, hpa: int) -> int:
        """Index of the table at ``hpa`` (page aligned), or -1 if none is there."""
        k = (hpa - PT_BASE_HPA) >> PAGE_SHIFT
        return k if hpa >= PT_BASE_HPA and k < self._ntables else -1

    def _new_table(self) -> int:
        if self._ntables == self._max_tables:
            raise MemoryError(f"no host-physical room below MAXPHYADDR {self.maxphyaddr} "
                              "for another table")
        if self._ntables == len(self._mem):
            # Double while small, then _GROWTH_TABLES (1 MiB of tables) at a time, resized
            # in place: the spare capacity stays below a constant whatever the size.
            capacity = min(self._ntables + min(self._ntables, _GROWTH_TABLES), self._max_tables)
            self._mem.resize((capacity, PT_ENTRIES), refcheck=False)
        self._ntables += 1
        return self._ntables - 1

    # --- KVM's use of the storage: the TDP MMU allocates, links and frees tables ----------
    # The MMU calls the unchecked _kvm_* methods; the public kvm_* ones check their
    # arguments through _args first, as the compiled core's do.

    def _kvm_alloc(self, fill: int) -> int:
        """A table for the TDP MMU, every entry ``fill``; freed tables are reused last
        freed first, so table addresses are a pure function of the call sequence."""
        table = self._free.pop() if self._free else self._new_table()
        self._mem[table, :] = fill
        return table

    def _kvm_free(self, table: int) -> None:
        self._free.append(table)

    def _kvm_fill(self, table: int, value: int) -> None:
        self._mem[table, :] = value

    def _kvm_get(self, table: int, index: int) -> int:
        return int(self._mem[table, index])

    def _kvm_set(self, table: int, index: int, value: int) -> None:
        self._mem[table, index] = value

    def _kvm_hpa(self, table: int) -> int:
        return PT_BASE_HPA + (table << PAGE_SHIFT)

    def _kvm_table_at(self, hpa: int) -> int:
        return self._table_at(hpa)

    def kvm_alloc(self, fill: Any) -> int:
        """A table for the TDP MMU, every entry ``fill`` (u64); freed tables first, last
        freed first."""
        return self._kvm_alloc(_args.u64("fill", fill))

    def kvm_free(self, table: Any) -> None:
        """Give table ``table`` back.  IndexError for no such table; ValueError for the
        root or a table already free (a second free would hand it out twice)."""
        t = _args.table(table, self._ntables)
        if t == 0 or t in self._free:
            raise ValueError(f"table {t} is {'the root' if t == 0 else 'already free'}")
        self._kvm_free(t)

    def kvm_fill(self, table: Any, value: Any) -> None:
        self._kvm_fill(_args.table(table, self._ntables), _args.u64("value", value))

    def kvm_get(self, table: Any, index: Any) -> int:
        t, i = _args.table(table, self._ntables), _args.entry_index(index)
        return self._kvm_get(t, i)

    def kvm_set(self, table: Any, index: Any, value: Any) -> None:
        t, i = _args.table(table, self._ntables), _args.entry_index(index)
        self._kvm_set(t, i, _args.u64("value", value))

    def kvm_hpa(self, table: Any) -> int:
        return self._kvm_hpa(_args.table(table, self._ntables))

    def kvm_table_at(self, hpa: Any) -> int:
        """The table at host-physical ``hpa`` (page aligned), or -1 if none is there."""
        return self._kvm_table_at(_args.u64("hpa", hpa))

    def _entry(self, table: int, index: int) -> int:
        return int(self._mem[table, index]) if table >= 0 else 0

    # --- entry predicates -------------------------------------------------------------

    def _present(self, e: int) -> bool:
        """EPT: any of R/W/X (and XU with MBEC); NPT: P."""
        return e & self._present_mask != 0

    def _large(self, level: int, e: int) -> bool:
        """Bit 7 at the PDPTE or PDE: the entry maps a page instead of a table."""
        return level in (PG_LEVEL_2M, PG_LEVEL_1G) and e & self._large_bit != 0

    def _ept_misconfigured(self, level: int, e: int) -> bool:
        """A present EPT entry that causes an EPT misconfiguration (SDM 29.3.3.1)."""
        if e & _W and not e & _R:                     # write-only, write+execute
            return True
        execute_only = not e & (_R | _W) and e & (_X | (_XU if self.mbec else 0))
        if execute_only and not self.exec_only:
            return True
        if e & self._rsvd_high:
            return True
        leaf = level == PG_LEVEL_4K or self._large(level, e)
        if level > PG_LEVEL_1G:
            return e & EPT_RSVD_ROOT != 0
        if level == PG_LEVEL_1G and e & _EPT_LARGE and not self.huge_1g:
            return True
        if not leaf:
            return e & EPT_RSVD_NONLEAF != 0
        if level == PG_LEVEL_1G and e & EPT_RSVD_1G or level == PG_LEVEL_2M and e & EPT_RSVD_2M:
            return True
        memtype = (e & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT
        return EPT_BAD_MEMTYPES >> memtype & 1 == 1

    def _npt_reserved(self, level: int, e: int) -> bool:
        """A present NPT entry with a reserved bit set (RSVD #NPF)."""
        if e & self._rsvd_high or (not self.host_nx and e & _NX):
            return True
        if level > PG_LEVEL_1G:
            return e & NPT_RSVD_ROOT != 0
        if level == PG_LEVEL_1G and e & _NPT_LARGE:
            return not self.huge_1g or e & NPT_RSVD_1G != 0
        return level == PG_LEVEL_2M and e & _NPT_LARGE != 0 and e & NPT_RSVD_2M != 0

    def _reserved(self, level: int, e: int) -> bool:
        return self._ept_misconfigured(level, e) if self._ept else self._npt_reserved(level, e)

    # --- the hardware walk ------------------------------------------------------------

    def _hw_walk(self, gpa: int) -> tuple[list[WalkStep], int]:
        """The entries the CPU reads for ``gpa``, root first, and why it stopped."""
        steps = []
        table = 0
        for level in range(self.levels, 0, -1):
            index = gpa_index(gpa, level)
            e = self._entry(table, index)
            steps.append(WalkStep(level, e, table, index))
            if not self._present(e):
                return steps, STOP_NOT_PRESENT
            if self._reserved(level, e):
                return steps, STOP_RESERVED
            if level == PG_LEVEL_4K or self._large(level, e):
                return steps, STOP_LEAF
            table = self._table_at(e & self._addr_mask)
        raise AssertionError("unreachable: level 1 is always a leaf")

    def _leaf_hpa(self, gpa: int, level: int, e: int) -> int:
        mask = level_page_mask(level)
        return (e & self._addr_mask & ~mask) | (gpa & mask)

    def _set_ad(self, steps: list[WalkStep], accessed: int, dirty: int, write: bool) -> None:
        """Accessed in every entry used, dirty in the leaf for a write."""
        for step in steps:
            self._mem[step.table, step.position] |= np.uint64(accessed)
        if write:
            self._mem[steps[-1].table, steps[-1].position] |= np.uint64(dirty)

    def _translate(self, gpa: int, flags: int) -> Any:
        steps, stop = self._hw_walk(gpa)
        if self._ept:
            return self._ept_translate(gpa, flags, steps, stop)
        return self._npt_translate(gpa, flags, steps, stop)

    def _ept_translate(self, gpa: int, flags: int, steps: list[WalkStep], stop: int) -> Any:
        """EPT: misconfiguration first, then violation, then the translation (A1, A2)."""
        if stop == STOP_RESERVED:
            return EptMisconfig(gpa)
        if flags & _WALK:
            # Reading a guest paging-structure entry; setting its A/D bits is a
            # read+write, and with EPT A/D on every such access is a write.
            acc = _ACC_READ | (_ACC_WRITE if self.ad_bits or flags & _WRITE else 0)
        elif flags & _FETCH:
            acc = _ACC_INSTR
        elif flags & _WRITE:
            acc = _ACC_WRITE
        else:
            acc = _ACC_READ
        rwx, xu = _R | _W | _X, _XU
        for step in steps:   # AND over every entry used, the last one included
            rwx &= step.entry
            xu &= step.entry
        user_fetch = self.mbec and flags & _USER
        allowed = ((not acc & _ACC_READ or rwx & _R) and (not acc & _ACC_WRITE or rwx & _W)
                   and (not acc & _ACC_INSTR or (xu if user_fetch else rwx & _X)))
        if stop == STOP_LEAF and allowed:
            leaf = steps[-1]
            if self.ad_bits:
                self._set_ad(steps, _EPT_A, _EPT_D, acc & _ACC_WRITE != 0)
            return Translation(self._leaf_hpa(gpa, leaf.level, leaf.entry), leaf.level)
        q = acc | rwx * _PROT_PER_RWX
        if self.mbec and xu:
            q |= _PROT_USER_EXEC
        if not flags & _NOGVA:
            q |= _GVA_IS_VALID
            if not flags & _WALK:
                q |= _GVA_TRANSLATED
        return EptViolation(gpa, q)

    def _npt_translate(self, gpa: int, flags: int, steps: list[WalkStep], stop: int) -> Any:
        """NPT: a not-present or reserved entry, or a permission fault (A3)."""
        write = flags & (_WRITE | _WALK) != 0   # guest page-table accesses are writes
        fetch = flags & _FETCH != 0
        code = _PF_USER                       # NPT walks are user-mode accesses
        if stop == STOP_RESERVED:
            code |= _PF_PRESENT | _PF_RSVD
        elif stop == STOP_LEAF:
            us = rw = _US | _RW
            nx = 0
            for step in steps:
                us &= step.entry
                rw &= step.entry
                nx |= step.entry & _NX
            if (us & _US and (not write or rw & _RW) and not (fetch and self.host_nx and nx)):
                leaf = steps[-1]
                self._set_ad(steps, _NPT_A, _NPT_D, write)
                return Translation(self._leaf_hpa(gpa, leaf.level, leaf.entry), leaf.level)
            code |= _PF_PRESENT
        if write:
            code |= _PF_WRITE
        if fetch and (self.host_nx or self.host_smep):
            code |= _PF_FETCH
        if flags & _WALK:
            code |= _PF_PAGE
        elif not flags & _NOGVA:
            code |= _PF_FINAL
        if flags & _ENCRYPTED:
            code |= _PF_ENC
        return NestedPageFault(gpa, code)

    # --- the public interface -----------------------------------------------------------

    def _descend(self, gpa: int, level: int) -> tuple[int, int]:
        """Follow present non-leaf entries from the root towards the level-``level``
        table: ``(table, at)`` where table holds the level-``at`` entry of ``gpa`` and
        ``at == level`` if the path exists; otherwise that entry is not present, a
        large leaf, or points at an address with no table."""
        table = 0
        for at in range(self.levels, level, -1):
            e = self._entry(table, gpa_index(gpa, at))
            if not self._present(e) or self._large(at, e):
                return table, at
            child = self._table_at(e & self._addr_mask)
            if child < 0:
                return table, at
            table = child
        return table, level

    def set_entry(self, gpa: Any, level: Any, value: Any) -> None:
        """Store ``value`` in the level-``level`` entry on the walk path of ``gpa``.

        Missing tables above it are created and linked with non-leaf entries that
        grant everything (EPT: R|W|X, +XU with MBEC, +A with A/D; NPT: P|RW|US|A).
        ValueError, changing nothing, if a present entry above ``level`` is a leaf
        or points at an address that holds no table.
        """
        g = _args.gpa(gpa, self.levels)
        lvl = _args.level("level", level, 1, self.levels)
        v = _args.u64("value", value)
        table, at = self._descend(g, lvl)
        if at != lvl:
            e = self._entry(table, gpa_index(g, at))
            if self._present(e):
                what = ("is a present leaf" if self._large(at, e) else
                        f"points at {e & self._addr_mask:#x}, which holds no table")
                raise ValueError(f"cannot set the level-{lvl} entry of gpa {g:#x}: its "
                                 f"level-{at} entry {e:#x} {what}")
            while at != lvl:
                child = self._new_table()
                self._mem[table, gpa_index(g, at)] = (PT_BASE_HPA + child * PAGE_SIZE
                                                      | self._nonleaf)
                table, at = child, at - 1
        self._mem[table, gpa_index(g, lvl)] = v

    def get_entry(self, gpa: Any, level: Any) -> int:
        """The level-``level`` entry on the walk path of ``gpa``; 0 where that table
        does not exist."""
        g = _args.gpa(gpa, self.levels)
        lvl = _args.level("level", level, 1, self.levels)
        table, at = self._descend(g, lvl)
        return self._entry(table, gpa_index(g, lvl)) if at == lvl else 0

    def walk(self, gpa: Any) -> list[tuple[int, int]]:
        """``(level, entry)`` from the root down to the entry at which the hardware
        walk stops: not present, a leaf, or reserved / misconfigured."""
        steps, _ = self._hw_walk(_args.gpa(gpa, self.levels))
        return [(step.level, step.entry) for step in steps]

    def translate(self, gpa: Any, *, write: Any = False, fetch: Any = False, user: Any = False,
                  stage: Any = "final", encrypted: Any = False) -> Any:
        """What the CPU does for one guest-physical access: ``Translation(hpa,
        level)``, or ``EptViolation`` / ``EptMisconfig`` (EPT) / ``NestedPageFault``
        (NPT).  A translation sets accessed bits in every entry used and dirty in
        the leaf for a write (EPT only with ``ad_bits``); an exit changes nothing."""
        g = _args.gpa(gpa, self.levels)
        return self._translate(g, _args.access(write, fetch, user, stage, encrypted))

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
        for i, (gpa, fl) in enumerate(zip(g.tolist(), per_element)):
            result = self._translate(gpa, fl)
            if isinstance(result, Translation):
                hpa[i], level[i] = result.hpa, result.level
        return hpa, level
