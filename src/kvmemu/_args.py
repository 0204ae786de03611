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

import operator
from typing import Any

import numpy as np

U64_MAX = (1 << 64) - 1


def u64(name: str, value: Any) -> int:
    """``value`` as a Python int in u64 range, or a clear error naming ``name``."""
    if isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be an integer, not an array")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if v < 0 or v > U64_MAX:
        raise OverflowError(f"{name} = {v:#x} is outside the u64 range 0..2**64-1")
    return v


def flag(name: str, value: Any) -> bool:
    """A boolean switch: bool, numpy bool, or the integers 0 and 1."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a bool, not an array")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}") from None
    if v not in (0, 1):
        raise ValueError(f"{name} must be True or False, not {v}")
    return bool(v)


def _u64_array(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, not {value.ndim}-D")
    if value.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64, not {value.dtype}")
    return np.ascontiguousarray(value)


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
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writable")
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
    """A page level (1 = 4K, 2 = 2M, 3 = 1G, ...) between ``lowest`` and ``highest``."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer level, not {type(value).__name__}") from None
    if not lowest <= v <= highest:
        raise ValueError(f"{name} must be a level from {lowest} to {highest}, not {v}")
    return v


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
