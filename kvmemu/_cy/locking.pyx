# The locking primitives the model's KVM uses, as the kernel names them.
#
# The compiled twin of kvmemu/_pure/locking.py.  RwLock is kvm->mmu_lock (an
# rwlock_t on x86, include/linux/rwlock.h): the TDP MMU's faults take it for read
# and install SPTEs with a compare-and-exchange; zaps take it for write.  It
# prefers writers, so a stream of faults cannot starve a conversion; a thread must
# therefore never take it for read twice.  The C entry points (read_lock, ...)
# block without the GIL and are for callers that released it; the Python entry
# points (acquire_read, ...) release the GIL while they wait, so a thread that
# holds the lock and needs the GIL can always finish.

cimport cython
from libc.stdint cimport uint64_t

import numpy as np


def fetch_andnot_words(uint64_t[::1] bitmap, Py_ssize_t first, const uint64_t[::1] masks):
    """atomic_long_fetch_andnot on ``bitmap[first + k]`` with ``masks[k]``, for each k (the
    kernel's xchg(&word, 0) is the all-ones mask): the bits cleared, ``old & mask``."""
    cdef Py_ssize_t k, n = masks.shape[0]
    if first < 0 or first + n > bitmap.shape[0]:
        raise IndexError("words beyond the bitmap")
    out = np.zeros(n, dtype=np.uint64)
    cdef uint64_t[::1] o = out
    for k in range(n):
        o[k] = fetch_andnot64(&bitmap[first + k], masks[k]) & masks[k]
    return out


cdef inline Py_ssize_t next_set_word(const uint64_t* words, Py_ssize_t i,
                                     Py_ssize_t n) noexcept nogil:
    """The index of the first non-zero word of words[i:n], or ``n``: the scan of a dirty
    bitmap.  Most words of a large bitmap are zero, and they are passed four at a time:
    with a taken branch per word the scan ran at 0.27 or 0.55 ns a word on this AMD
    machine, depending only on where the compiler happened to place the loop."""
    while i + 4 <= n and (words[i] | words[i + 1] | words[i + 2] | words[i + 3]) == 0:
        i += 4
    while i < n and words[i] == 0:
        i += 1
    return i


def xchg_words(uint64_t[::1] bitmap):
    """xchg(&bitmap[i], 0) for each non-zero word (kvm_get_dirty_log_protect's loop): the
    words taken."""
    cdef Py_ssize_t i = 0, n = bitmap.shape[0]
    out = np.zeros(n, dtype=np.uint64)
    cdef uint64_t[::1] o = out
    with nogil:
        while n:
            i = next_set_word(&bitmap[0], i, n)
            if i == n:
                break
            o[i] = xchg64(&bitmap[i], 0)
            i += 1
    return out


@cython.final
cdef class Mutex:
    """vcpu->mutex: calls on one vCPU run one at a time, as KVM_RUN on one vCPU fd does.
    A second thread waits (without the GIL); the thread that holds it and calls again,
    from a callback of its own call, gets a RuntimeError instead of a deadlock."""

    def __cinit__(self):
        if pthread_mutex_init(&self.mutex, NULL) != 0:
            raise MemoryError("cannot initialise a mutex")
        self.owner = 0

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mutex)

    cpdef int acquire(self) except -1:
        cdef unsigned long me = PyThread_get_thread_ident()
        if pthread_mutex_trylock(&self.mutex) != 0:
            if self.owner == me:
                raise RuntimeError("this vCPU is already running on this thread (a callback "
                                   "of its own call cannot enter it again)")
            with nogil:
                pthread_mutex_lock(&self.mutex)
        self.owner = me
        return 0

    cpdef void release(self) noexcept:
        self.owner = 0
        pthread_mutex_unlock(&self.mutex)


@cython.final
cdef class RwLock:
    """A reader-writer lock that prefers writers (kvm->mmu_lock)."""

    def __cinit__(self):
        cdef pthread_rwlockattr_t attr
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        if pthread_rwlock_init(&self.lock, &attr) != 0:
            raise MemoryError("cannot initialise a reader-writer lock")

    def __dealloc__(self):
        pthread_rwlock_destroy(&self.lock)

    cdef void read_lock(self) noexcept nogil:
        pthread_rwlock_rdlock(&self.lock)

    cdef void read_unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.lock)

    cdef void write_lock(self) noexcept nogil:
        pthread_rwlock_wrlock(&self.lock)

    cdef void write_unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.lock)

    cpdef void acquire_read(self) noexcept:
        """read_lock(&kvm->mmu_lock) for a caller that holds the GIL: it is released
        only if the lock is not free at once."""
        if pthread_rwlock_tryrdlock(&self.lock) != 0:
            with nogil:
                pthread_rwlock_rdlock(&self.lock)

    cpdef void release_read(self) noexcept:
        pthread_rwlock_unlock(&self.lock)

    cpdef void acquire_write(self) noexcept:
        """write_lock(&kvm->mmu_lock) for a caller that holds the GIL: it is released
        only if the lock is not free at once."""
        if pthread_rwlock_trywrlock(&self.lock) != 0:
            with nogil:
                pthread_rwlock_wrlock(&self.lock)

    cpdef void release_write(self) noexcept:
        pthread_rwlock_unlock(&self.lock)
