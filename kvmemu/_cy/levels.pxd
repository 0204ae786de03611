# Page-level arithmetic shared by the compiled parts (KVM_PAGES_PER_HPAGE and friends,
# arch/x86/kvm/mmu/mmu_internal.h, include/linux/kvm_host.h); the twin is
# kvmemu/_pure/levels.py.  Defined here, in the declarations, so every part inlines them;
# so are two C helpers every part may use (with_room, debug_assert).

from libc.stdint cimport uint64_t
from libc.stdlib cimport realloc
from libc.string cimport memset
from kvmemu_constants cimport *


cdef inline uint64_t pages_per_hpage(int level) noexcept nogil:
    """KVM_PAGES_PER_HPAGE(level): 1, 512, 262144."""
    return (<uint64_t>1) << ((level - 1) * PT_LEVEL_BITS)


cdef inline uint64_t gfn_round_for_level(uint64_t gfn, int level) noexcept nogil:
    """gfn_round_for_level: the first gfn of the level-``level`` page holding ``gfn``."""
    return gfn & ~(pages_per_hpage(level) - 1)


cdef inline uint64_t gfn_to_index(uint64_t gfn, uint64_t base_gfn, int level) noexcept nogil:
    """gfn_to_index: the lpage_info index of ``gfn`` in a slot based at ``base_gfn``."""
    cdef int shift = (level - 1) * PT_LEVEL_BITS
    return (gfn >> shift) - (base_gfn >> shift)


cdef inline uint64_t first_index(int level, uint64_t base, uint64_t start) noexcept nogil:
    """The first entry of a level-``level`` table mapping gfns from ``base`` that maps a gfn
    at or above ``start`` (for_each_tdp_pte's start)."""
    return (start - base) // pages_per_hpage(level) if start > base else 0


cdef inline uint64_t end_index(int level, uint64_t base, uint64_t end) noexcept nogil:
    """One past the last entry of that table that maps a gfn below ``end``."""
    cdef uint64_t span = pages_per_hpage(level)
    if end <= base:
        return 0
    return min((end - base) // span + ((end - base) % span != 0), <uint64_t>PT_ENTRIES)


# Room for ``need`` elements of ``size`` bytes in the C array ``items[0]`` of ``cap[0]``
# elements: if it is short, it is reallocated to twice ``cap[0]`` (at least ``need`` and
# ``least``), the new elements zeroed, ``items[0]`` and ``cap[0]`` updated.  False, with
# both as they were, if memory runs out (the caller raises MemoryError).
cdef inline bint with_room(void** items, Py_ssize_t* cap, Py_ssize_t need, size_t size,
                           Py_ssize_t least) noexcept nogil:
    cdef Py_ssize_t n = cap[0]
    cdef void* more
    if need <= n:
        return True
    n = max(2 * n, need, least)
    more = realloc(items[0], <size_t>n * size)
    if more == NULL:
        return False
    memset(<char*>more + <size_t>cap[0] * size, 0, <size_t>(n - cap[0]) * size)
    items[0], cap[0] = more, n
    return True


# C assert: checked in the debug build (KVMEMU_DEBUG_BUILD=1 undefines NDEBUG), where a
# failed check aborts the process loudly; compiled out otherwise.  The parts use it where
# a noexcept function reads memory through a raw pointer.
cdef extern from "assert.h" nogil:
    void debug_assert "assert" (bint condition)
