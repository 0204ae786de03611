"""Argument checks shared by both implementations.

Every public entry point checks its arguments here, once, at the boundary, so
the compiled core and its pure-Python twin reject exactly the same inputs with
exactly the same exception and message.  Errors name the argument:

* not an integer (or not a 1-D ``numpy.uint64`` array where arrays are allowed)
  → ``TypeError``;
* an integer outside ``0 .. 2**64 - 1`` → ``OverflowError``;
* arrays of the wrong shape or of unequal length → ``ValueError``.
"""

from __future__ import annotations

import enum
import operator
from typing import Any

import numpy as np

from .constants import (MAXPHYADDR_MAX, MAXPHYADDR_MIN, PAGE_SHIFT, PT_ENTRIES, PT_LEVEL_BITS,
                        AccessFlags)

U64_MAX = (1 << 64) - 1


def _index(name: str, value: Any, what: str) -> int:
    """``operator.index(value)``; a TypeError naming ``name`` and ``what`` it must be
    for an array or a value that is not an integer."""
    if isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be {what}, not an array")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}") from None


def u64(name: str, value: Any) -> int:
    """``value`` as a Python int in u64 range, or a clear error naming ``name``."""
    v = _index(name, value, "an integer")
    if v < 0 or v > U64_MAX:
        raise OverflowError(f"{name} = {v:#x} is outside the u64 range 0..2**64-1")
    return v


def flag(name: str, value: Any) -> bool:
    """A boolean switch: bool, numpy bool, or the integers 0 and 1."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    v = _index(name, value, "a bool")
    if v not in (0, 1):
        raise ValueError(f"{name} must be True or False, not {v}")
    return bool(v)


def _u64_array(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, not {value.ndim}-D")
    if value.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64, not {value.dtype}")
    # A misaligned view (np.frombuffer at an odd offset) is copied: the cores load
    # whole uint64 words.
    flags = value.flags
    if flags.c_contiguous and flags.aligned:
        return value
    return np.require(value, requirements=("C", "A"))


def operands(out: Any, *named: tuple[str, Any]) -> tuple[int, list[Any], Any]:
    """Check element-wise operands that are ints or 1-D uint64 arrays.

    Returns ``(n, values, out)``.  ``n`` is -1 when every operand is a scalar
    and ``out`` is None (the result is an int); otherwise ``n`` is the common
    length, scalars broadcast, array values are C-contiguous, and ``out`` is a
    writable contiguous uint64 array of length ``n`` (newly made when None).
    """
    values: list[Any] = []
    n = -1
    n_from = ""
    for name, value in named:
        if isinstance(value, np.ndarray):
            arr = _u64_array(name, value)
            if n >= 0 and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} elements but {n_from} has {n}")
            n, n_from = len(arr), name
            values.append(arr)
        else:
            try:
                values.append(u64(name, value))
            except TypeError:
                raise TypeError(f"{name} must be an integer or a 1-D numpy.uint64 array, "
                                f"not {type(value).__name__}") from None
    if out is None:
        if n >= 0:
            out = np.empty(n, dtype=np.uint64)
        return n, values, out
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a 1-D numpy.uint64 array, not {type(out).__name__}")
    if out.ndim != 1 or out.dtype != np.uint64:
        raise TypeError(f"out must be a 1-D numpy.uint64 array, not {out.ndim}-D {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable or not out.flags.aligned:
        raise ValueError("out must be C-contiguous, aligned and writable")
    if n >= 0 and len(out) != n:
        raise ValueError(f"out has {len(out)} elements but {n_from} has {n}")
    start = out.ctypes.data
    for value in values:
        if (isinstance(value, np.ndarray) and np.may_share_memory(value, out)
                and value.ctypes.data != start):
            raise ValueError("out overlaps an input other than element for element")
    return len(out), values, out


def gpaw(value: Any) -> int:
    """A TDX guest physical-address width: 48 or 52."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"gpaw must be an integer, not {type(value).__name__}") from None
    if v not in (48, 52):
        raise ValueError(f"gpaw must be 48 or 52, not {v}")
    return v


def u32(name: str, value: Any) -> int:
    """``value`` as a Python int in u32 range (a __u32 ioctl field)."""
    v = u64(name, value)
    if v >> 32:
        raise OverflowError(f"{name} = {v:#x} is outside the u32 range 0..2**32-1")
    return v


def level(name: str, value: Any, lowest: int, highest: int) -> int:
    """A page level (1 = 4K PTE, 2 = 2M, 3 = 1G, 4, 5 = the root) in ``lowest .. highest``."""
    return int_range(name, value, lowest, highest)


def enum_member(name: str, value: Any, enum: Any) -> Any:
    """A member of an IntEnum, given as the member or its integer value."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a {enum.__name__}, not {type(value).__name__}") from None
    try:
        return enum(v)
    except ValueError:
        raise ValueError(f"{name} {v} is not a valid {enum.__name__}") from None


def u64_array(name: str, value: Any) -> np.ndarray:
    """A 1-D ``numpy.uint64`` array, C-contiguous."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a 1-D numpy.uint64 array, not {type(value).__name__}")
    return _u64_array(name, value)


def integer(name: str, value: Any) -> int:
    """A Python int (bools are not integers here)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def int_range(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in ``lo .. hi`` inclusive."""
    v = integer(name, value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, not {v}")
    return v


def table(value: Any, ntables: int) -> int:
    """The number of an existing table of a ``PageTables`` (``0 .. ntables - 1``)."""
    v = integer("table", value)
    if not 0 <= v < ntables:
        raise IndexError(f"table {v} is not in 0..{ntables - 1}")
    return v


def entry_index(value: Any) -> int:
    """An entry's index in a table, ``0 .. 511``."""
    v = integer("index", value)
    if not 0 <= v < PT_ENTRIES:
        raise IndexError(f"index {v} is not in 0..{PT_ENTRIES - 1}")
    return v


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
    return value


def paging_config(kind: Any, levels: Any, ad_bits: Any, exec_only: Any, mbec: Any,
                  maxphyaddr: Any, huge_1g: Any, host_nx: Any,
                  host_smep: Any) -> tuple[str, int, bool, bool, bool, int, bool, bool, bool]:
    """The checked arguments of ``PageTables(...)``, in signature order."""
    return (choice("kind", kind, ("ept", "npt")), int_range("levels", levels, 4, 5),
            flag("ad_bits", ad_bits), flag("exec_only", exec_only), flag("mbec", mbec),
            int_range("maxphyaddr", maxphyaddr, MAXPHYADDR_MIN, MAXPHYADDR_MAX),
            flag("huge_1g", huge_1g), flag("host_nx", host_nx), flag("host_smep", host_smep))


def gpa_reach(levels: int) -> int:
    """How many GPA bits a ``levels``-level walk translates: 48 or 57."""
    return PAGE_SHIFT + PT_LEVEL_BITS * levels


def gpa(value: Any, levels: int) -> int:
    """A guest-physical address within the reach of a ``levels``-level walk."""
    v = u64("gpa", value)
    if v >> gpa_reach(levels):
        raise ValueError(f"gpa = {v:#x} has bits above bit {gpa_reach(levels) - 1}, beyond "
                         f"the reach of a {levels}-level walk")
    return v


def gpa_array(value: Any, levels: int) -> np.ndarray:
    """``gpas`` as a 1-D uint64 array, every element within the walk's reach."""
    arr = u64_array("gpas", value)
    reach = gpa_reach(levels)
    if len(arr) and int(arr.max()) >> reach:
        i = int(((arr >> np.uint64(reach)) != 0).argmax())
        raise ValueError(f"gpas[{i}] = {int(arr[i]):#x} has bits above bit "
                         f"{gpa_reach(levels) - 1}, beyond the reach of a {levels}-level walk")
    return arr


def batch_out(value: Any, gpas: np.ndarray, flags: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``out`` of ``access_many``: None, or ``(hpa, level)``, a writable C-contiguous 1-D
    uint64 array and uint8 array as long as ``gpas``, overlapping neither each other nor
    the inputs (the loop writes element i after reading it, but not in lockstep)."""
    if value is None:
        return None
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError("out must be None or a tuple (hpa, level) of two numpy arrays")
    arrays = []
    for name, arr, dtype in (("hpa", value[0], np.uint64), ("level", value[1], np.uint8)):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"out {name} must be a numpy array, not {type(arr).__name__}")
        if arr.dtype != dtype:
            raise TypeError(f"out {name} must have dtype {np.dtype(dtype)}, not {arr.dtype}")
        if arr.ndim != 1 or len(arr) != len(gpas):
            raise ValueError(f"out {name} must be 1-D with {len(gpas)} elements (as gpas), "
                             f"not shape {arr.shape}")
        if not arr.flags.c_contiguous or not arr.flags.writeable or not arr.flags.aligned:
            raise ValueError(f"out {name} must be a writable, aligned, C-contiguous array")
        arrays.append(arr)
    hpa, level = arrays
    inputs = [gpas] + ([flags] if isinstance(flags, np.ndarray) else [])
    if np.may_share_memory(hpa, level) or any(np.may_share_memory(o, i) for o in arrays
                                                for i in inputs):
        raise ValueError("out arrays must not overlap each other, gpas or flags")
    return hpa, level


_STAGE_FLAGS = {"final": 0, "walk": AccessFlags.WALK.value, "nogva": AccessFlags.NOGVA.value}
_ALL_ACCESS_FLAGS = sum(f.value for f in AccessFlags)
_WALK, _NOGVA, _FETCH = (AccessFlags.WALK.value, AccessFlags.NOGVA.value,
                         AccessFlags.FETCH.value)
_WRITE, _USER, _ENCRYPTED = (AccessFlags.WRITE.value, AccessFlags.USER.value,
                             AccessFlags.ENCRYPTED.value)


def access_flags(value: Any, name: str = "flags") -> int:
    """One ``AccessFlags`` value: known bits only, at most one stage, and FETCH only
    for a final-stage access (guest paging-structure accesses and PDPTE loads are
    data accesses).  A flag of another class (``PFERR.WRITE`` and
    ``EPT_VIOLATION.ACC_WRITE`` are both 2, which is ``AccessFlags.FETCH``) is a
    TypeError, not a silent reinterpretation."""
    if isinstance(value, enum.Flag) and not isinstance(value, AccessFlags):
        raise TypeError(f"{name} must be AccessFlags or an int, not {type(value).__name__} "
                        f"({value!r} means something else as AccessFlags)")
    v = u64(name, value)
    if v & ~_ALL_ACCESS_FLAGS:
        raise ValueError(f"{name} = {v:#x} has bits that are not AccessFlags")
    stage_bits = v & (_WALK | _NOGVA)
    if stage_bits == _WALK | _NOGVA:
        raise ValueError(f"{name} = {v:#x} has both WALK and NOGVA")
    if stage_bits and v & _FETCH:
        raise ValueError(f"{name} = {v:#x}: an instruction fetch is a final-stage access "
                         "(WALK and NOGVA accesses are data accesses)")
    return v


def mmio_payload(size: Any, data: Any, write: Any) -> tuple[int, bytes] | None:
    """``size`` and ``data`` of an access as kvm_run.mmio's len and data: None when no
    size is given; data only for a write (an int that fits in ``size`` bytes, stored
    little-endian, or exactly ``size`` bytes)."""
    if size is None:
        if data is not None:
            raise ValueError("data needs size (1, 2, 4 or 8 bytes)")
        return None
    width = integer("size", size)
    if width not in (1, 2, 4, 8):
        raise ValueError(f"size must be 1, 2, 4 or 8 bytes, not {width}")
    if not flag("write", write):
        if data is not None:
            raise ValueError("data is for a write (a read's data comes from userspace)")
        return width, b""
    if data is None:
        raise ValueError("a write of a size needs data")
    if isinstance(data, (bytes, bytearray)):
        if len(data) != width:
            raise ValueError(f"data holds {len(data)} bytes, not {width}")
        return width, bytes(data)
    value = integer("data", data)
    if not 0 <= value < 1 << (8 * width):
        raise OverflowError(f"data {value:#x} does not fit in {width} bytes")
    return width, value.to_bytes(width, "little")


def access(write: Any, fetch: Any, user: Any, stage: Any, encrypted: Any) -> int:
    """The keyword arguments of ``translate`` as one ``AccessFlags`` value."""
    if (stage == "final" and type(write) is bool and type(fetch) is bool
            and type(user) is bool and type(encrypted) is bool):
        return write * _WRITE | fetch * _FETCH | user * _USER | encrypted * _ENCRYPTED
    stage_bits = _STAGE_FLAGS[choice("stage", stage, tuple(_STAGE_FLAGS))]
    v = (flag("write", write) * _WRITE | flag("fetch", fetch) * _FETCH
         | flag("user", user) * _USER | flag("encrypted", encrypted) * _ENCRYPTED | stage_bits)
    if stage_bits and v & _FETCH:
        raise ValueError(f"fetch=True needs stage='final', not {stage!r}: guest paging-structure "
                         "accesses and PDPTE loads are data accesses")
    return v


def access_flags_array(value: Any, n: int) -> np.ndarray | int:
    """``flags`` of a batch: one ``AccessFlags`` int, or a 1-D uint8 array of length ``n``."""
    if not isinstance(value, np.ndarray):
        return access_flags(value)
    if value.ndim != 1:
        raise ValueError(f"flags must be a 1-D array, not {value.ndim}-D")
    if value.dtype != np.uint8:
        raise TypeError(f"flags must have dtype uint8, not {value.dtype}")
    if len(value) != n:
        raise ValueError(f"flags has {len(value)} elements but gpas has {n}")
    for v in np.unique(value).tolist():
        try:
            access_flags(v)
        except ValueError as exc:
            i = int((value == v).argmax())
            raise ValueError(f"flags[{i}]: {exc}") from None
    return np.ascontiguousarray(value)
