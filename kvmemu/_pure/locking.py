"""The locking primitives the model's KVM uses, as the kernel names them.

The twin of ``_cy/locking.pyx``.  ``RwLock`` is kvm->mmu_lock (an rwlock_t on
x86, include/linux/rwlock.h): the TDP MMU's faults take it for read, zaps for
write.  It prefers writers, so a stream of faults cannot starve a conversion; a
thread must therefore never take it for read twice.  The twin's threads hold the
GIL, but they interleave between bytecodes, so the twin follows the same
discipline as the compiled core.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

#: The twin's stand-in for the CPU's atomic read-modify-write of table memory.
_ATOMIC = threading.Lock()


def atomic_or64(mem: Any, where: Any, value: int) -> None:
    """The CPU's locked OR of accessed/dirty bits into ``mem[where]``."""
    with _ATOMIC:
        mem[where] |= np.uint64(value)


def fetch_andnot_words(bitmap: np.ndarray, first: int, masks: np.ndarray) -> np.ndarray:
    """atomic_long_fetch_andnot on ``bitmap[first + k]`` with ``masks[k]``, for each k (the
    kernel's xchg(&word, 0) is the all-ones mask): the bits cleared, ``old & mask``."""
    out = np.zeros(len(masks), dtype=np.uint64)
    with _ATOMIC:
        for k, mask in enumerate(masks.tolist()):
            old = int(bitmap[first + k])
            bitmap[first + k] = old & ~mask
            out[k] = old & mask
    return out


def xchg_words(bitmap: np.ndarray) -> np.ndarray:
    """xchg(&bitmap[i], 0) for each non-zero word (kvm_get_dirty_log_protect's loop): the
    words taken."""
    out = np.zeros(len(bitmap), dtype=np.uint64)
    with _ATOMIC:
        for i in np.flatnonzero(bitmap).tolist():
            out[i] = bitmap[i]
            bitmap[i] = 0
    return out


def cmpxchg64(mem: Any, where: Any, old: int, new: int) -> bool:
    """try_cmpxchg64: store ``new`` in ``mem[where]`` if it still holds ``old``."""
    with _ATOMIC:
        if int(mem[where]) != old:
            return False
        mem[where] = new
        return True


class Mutex:
    """vcpu->mutex: calls on one vCPU run one at a time, as KVM_RUN on one vCPU fd does.
    A second thread waits; the thread that holds it and calls again, from a callback of
    its own call, gets a RuntimeError instead of a deadlock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0

    def acquire(self) -> int:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                raise RuntimeError("this vCPU is already running on this thread (a callback "
                                   "of its own call cannot enter it again)")
            self._lock.acquire()
        self._owner = me
        return 0

    def release(self) -> None:
        self._owner = 0
        self._lock.release()


class RwLock:
    """A reader-writer lock that prefers writers (kvm->mmu_lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        """read_lock(&kvm->mmu_lock)."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """write_lock(&kvm->mmu_lock)."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
