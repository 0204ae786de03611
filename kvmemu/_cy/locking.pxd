# Declarations of the locking primitives the model's KVM uses (locking.pyx).

from libc.stdint cimport uint8_t, uint64_t

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t* lock, const pthread_rwlockattr_t* attr)
    int pthread_rwlock_destroy(pthread_rwlock_t* lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t* lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t* lock)
    int pthread_rwlock_unlock(pthread_rwlock_t* lock)
    int pthread_rwlock_tryrdlock(pthread_rwlock_t* lock)
    int pthread_rwlock_trywrlock(pthread_rwlock_t* lock)
    int pthread_rwlockattr_init(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t* attr, int pref)
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

cdef extern from "stdlib.h" nogil:
    void* aligned_alloc(size_t alignment, size_t size)

cdef extern from "sched.h" nogil:
    int sched_yield()

cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident()

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_trylock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)

# Sequentially consistent atomics on a long (the reader counts of an SRCU-like grace
# period; see SlotTable in memslots.pxd).
cdef extern from *:
    """
    static inline long kvmemu_atomic_add(long *p, long v) {
        return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
    }
    static inline long kvmemu_atomic_load(long *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline void kvmemu_atomic_store(long *p, long v) {
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline void kvmemu_atomic_or64(uint64_t *p, uint64_t v) {
        __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t kvmemu_fetch_andnot64(uint64_t *p, uint64_t v) {
        return __atomic_fetch_and(p, ~v, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t *kvmemu_load_ptr(uint64_t **p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    /* The calling thread's shard, given on its first use in turn (the kernel keeps
     * these counts per CPU; a thread is what runs a vCPU here, and a thread-local
     * costs a load where sched_getcpu costs some 30 instructions per change).
     * Threads past the 16th share shards: changes are atomic. */
    static __thread int kvmemu_shard __attribute__((tls_model("initial-exec"))) = -1;
    static int kvmemu_shards_given;
    static inline int kvmemu_my_shard(void) {
        int s = kvmemu_shard;
        if (s < 0)
            s = kvmemu_shard = __atomic_fetch_add(&kvmemu_shards_given, 1, __ATOMIC_RELAXED) & 15;
        return s;
    }
    /* Table entries (and guest_memfd frame states), which vCPUs read while faults on
     * other threads write them:
     * READ_ONCE and WRITE_ONCE, volatile accesses as the kernel's (a plain load or
     * store on x86, as the hardware's walk sees them).  A walk reads a child table's
     * entries through the link it loaded (a dependency the CPU keeps in order); a new
     * table is filled before the compare-and-exchange that links it.  Table counts
     * the same: a count only bounds the indexes a walk may read, and the whole
     * reservation is mapped from the start.  Under ThreadSanitizer they are relaxed
     * atomics, which is what they are on x86, so that it checks everything else. */
    #if defined(__SANITIZE_THREAD__)
    #define KVMEMU_ONCE_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define KVMEMU_ONCE_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
    #else
    #define KVMEMU_ONCE_LOAD(p) (*(const volatile __typeof__(*(p)) *)(p))
    #define KVMEMU_ONCE_STORE(p, v) (*(volatile __typeof__(*(p)) *)(p) = (v))
    #endif
    static inline uint64_t kvmemu_load_entry(const uint64_t *p) {
        return KVMEMU_ONCE_LOAD(p);
    }
    static inline void kvmemu_store_entry(uint64_t *p, uint64_t v) {
        KVMEMU_ONCE_STORE(p, v);
    }
    static inline Py_ssize_t kvmemu_load_count(const Py_ssize_t *p) {
        return KVMEMU_ONCE_LOAD(p);
    }
    static inline void kvmemu_store_count(Py_ssize_t *p, Py_ssize_t v) {
        KVMEMU_ONCE_STORE(p, v);
    }
    /* A table's flag byte (sp->nx_huge_page_disallowed): set before the table is
     * linked, read by faults of other vCPUs that meet the table. */
    static inline int kvmemu_load_flag(const uint8_t *p) {
        return KVMEMU_ONCE_LOAD(p);
    }
    static inline void kvmemu_store_flag(uint8_t *p, int v) {
        KVMEMU_ONCE_STORE(p, (uint8_t)(v != 0));
    }
    /* A count that one thread changes (a vCPU's statistics, under its mutex) and
     * others read: read once, written once. */
    static inline void kvmemu_once_add(uint64_t *p, uint64_t v) {
        KVMEMU_ONCE_STORE(p, KVMEMU_ONCE_LOAD(p) + v);
    }
    /* Publish a pointer made on first use unless another thread published one first:
     * the pointer that stands. */
    static inline uint64_t *kvmemu_publish_ptr(uint64_t **p, uint64_t *v) {
        uint64_t *old = NULL;
        if (__atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return v;
        return old;
    }
    static inline uint64_t kvmemu_xchg64(uint64_t *p, uint64_t v) {
        return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int kvmemu_cmpxchg64(uint64_t *p, uint64_t old, uint64_t new_) {
        return __atomic_compare_exchange_n(p, &old, new_, 0, __ATOMIC_SEQ_CST,
                                           __ATOMIC_SEQ_CST);
    }
    """
    long atomic_add "kvmemu_atomic_add" (long* p, long v) nogil
    long atomic_load "kvmemu_atomic_load" (long* p) nogil
    void atomic_store "kvmemu_atomic_store" (long* p, long v) nogil
    # The hardware's locked OR of accessed/dirty bits, and KVM's try_cmpxchg64.
    void atomic_or64 "kvmemu_atomic_or64" (uint64_t* p, uint64_t v) nogil
    bint cmpxchg64 "kvmemu_cmpxchg64" (uint64_t* p, uint64_t old, uint64_t new) nogil
    # atomic_long_fetch_andnot: the old value.
    uint64_t fetch_andnot64 "kvmemu_fetch_andnot64" (uint64_t* p, uint64_t v) nogil
    uint64_t xchg64 "kvmemu_xchg64" (uint64_t* p, uint64_t v) nogil
    uint64_t load_entry "kvmemu_load_entry" (const uint64_t* p) nogil
    void store_entry "kvmemu_store_entry" (uint64_t* p, uint64_t v) nogil
    Py_ssize_t load_count "kvmemu_load_count" (const Py_ssize_t* p) nogil
    void once_add "kvmemu_once_add" (uint64_t* p, uint64_t v) nogil
    void store_count "kvmemu_store_count" (Py_ssize_t* p, Py_ssize_t v) nogil
    bint load_flag "kvmemu_load_flag" (const uint8_t* p) nogil
    void store_flag "kvmemu_store_flag" (uint8_t* p, bint v) nogil
    # The shard of a sharded count (CountShard) the calling thread changes.
    int my_shard "kvmemu_my_shard" () nogil
    # Publishing a pointer to memory made on first use (a frame-state chunk).
    uint64_t* load_ptr "kvmemu_load_ptr" (uint64_t** p) nogil
    uint64_t* publish_ptr "kvmemu_publish_ptr" (uint64_t** p, uint64_t* v) nogil

# The first non-zero word of words[i:n], or n (a dirty bitmap's scan).
cdef Py_ssize_t next_set_word(const uint64_t* words, Py_ssize_t i, Py_ssize_t n) noexcept nogil

# Counts that threads change often and read rarely: a cache line of counts per shard
# (so that vCPUs on different threads do not pass one line back and forth on every
# change), summed when read.
cdef enum:
    COUNT_SHARDS = 16
cdef struct CountShard:
    long n[8]

cdef class Mutex:
    cdef pthread_mutex_t mutex
    cdef unsigned long owner                # the thread that holds it, 0 if none
    cpdef int acquire(self) except -1
    cpdef void release(self) noexcept

cdef class RwLock:
    cdef pthread_rwlock_t lock
    cdef void read_lock(self) noexcept nogil
    cdef void read_unlock(self) noexcept nogil
    cdef void write_lock(self) noexcept nogil
    cdef void write_unlock(self) noexcept nogil
    cpdef void acquire_read(self) noexcept
    cpdef void release_read(self) noexcept
    cpdef void acquire_write(self) noexcept
    cpdef void release_write(self) noexcept
