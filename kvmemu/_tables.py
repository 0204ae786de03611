"""Writing and reading page-table entries by GPA, written once for both cores.

``PageTables.set_entry`` / ``get_entry`` are not something the hardware or KVM
does: they are how a test or an embedder builds second-stage tables by hand.
Both cores' ``PageTables`` call these functions, which use only the checked
table methods each core provides (``entry``, ``store``, ``new_table``,
``table_at``, ``is_large``) and its ``present_mask`` / ``addr_mask`` /
``nonleaf`` values (and the twin's ``gpa_index``, the one pure rule it needs).
The tables of a VM's TDP MMU (``kvm_owned``) take no writes from outside: KVM
alone decides what they hold, so ``set_entry`` refuses them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _args
from ._pure import paging as _paging


def descend(pt: Any, gpa: int, level: int) -> tuple[int, int]:
    """Follow present non-leaf entries from the root towards the level-``level`` table:
    ``(table, at)`` where table holds the level-``at`` entry of ``gpa`` and ``at ==
    level`` if the path exists; otherwise that entry is not present, a large leaf, or
    points at an address with no table."""
    table = 0
    for at in range(pt.levels, level, -1):
        e = pt.entry(table, _paging.gpa_index(gpa, at))
        if not e & pt.present_mask or pt.is_large(at, e):
            return table, at
        child = pt.table_at(e & pt.addr_mask)
        if child < 0:
            return table, at
        table = child
    return table, level


def set_entry(pt: Any, gpa: Any, level: Any, value: Any) -> None:
    """Store ``value`` in the level-``level`` entry on the walk path of ``gpa``, linking
    new tables above it with ``pt.nonleaf`` entries; ValueError, changing nothing, if a
    present entry above is a leaf or points at an address that holds no table."""
    g = _args.gpa(gpa, pt.levels)
    lvl = _args.level("level", level, 1, pt.levels)
    v = _args.u64("value", value)
    if pt.kvm_owned:
        raise ValueError("these are the tables of a VM's TDP MMU: only KVM writes them "
                         "(read them with get_entry, walk or translate)")
    pt.lock.acquire_write()
    try:
        _set_entry(pt, g, lvl, v)
    finally:
        pt.lock.release_write()


def _set_entry(pt: Any, g: int, lvl: int, v: int) -> None:
    table, at = descend(pt, g, lvl)
    if at != lvl:
        e = pt.entry(table, _paging.gpa_index(g, at))
        if e & pt.present_mask:
            what = ("is a present leaf" if pt.is_large(at, e) else
                    f"points at {e & pt.addr_mask:#x}, which holds no table")
            raise ValueError(f"cannot set the level-{lvl} entry of gpa {g:#x}: its "
                             f"level-{at} entry {e:#x} {what}")
        while at != lvl:
            child = pt.new_table()
            pt.store(table, _paging.gpa_index(g, at), pt.hpa(child) | pt.nonleaf)
            table, at = child, at - 1
    pt.store(table, _paging.gpa_index(g, lvl), v)


def get_entry(pt: Any, gpa: Any, level: Any) -> int:
    """The level-``level`` entry on the walk path of ``gpa``; 0 where that table does not
    exist."""
    g = _args.gpa(gpa, pt.levels)
    lvl = _args.level("level", level, 1, pt.levels)
    pt.lock.acquire_read()
    try:
        table, at = descend(pt, g, lvl)
        return pt.entry(table, _paging.gpa_index(g, lvl)) if at == lvl else 0
    finally:
        pt.lock.release_read()


def check_table_export(tables: Any, free: Any, capacity: int) -> int:
    """The number of tables in an export (PageTables.load_tables), after checking it:
    ValueError for anything export_tables cannot have made."""
    if (not isinstance(tables, np.ndarray) or tables.dtype != np.uint64 or tables.ndim != 2
            or tables.shape[1] != _paging.PT_ENTRIES or not 1 <= tables.shape[0] <= capacity):
        raise ValueError("tables must be a (n, 512) uint64 array with 1 <= n <= the capacity")
    n = tables.shape[0]
    if not isinstance(free, np.ndarray) or free.dtype != np.int64 or free.ndim != 1:
        raise ValueError("the free list must be a 1-D int64 array")
    if len(free) and (int(free.min()) < 1 or int(free.max()) >= n
                      or len(np.unique(free)) != len(free)):
        raise ValueError("the free list names a table that does not exist, the root, or "
                         "one table twice")
    return int(n)
