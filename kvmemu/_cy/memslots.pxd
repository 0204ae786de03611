# Declarations of the per-access lookups in a VM's memory state (memslots.pyx).

from libc.stdint cimport uint32_t, uint64_t

# A memslot of address space 0 as the fault path reads it (struct kvm_memory_slot):
# a copy of a kvmemu._memory.Slot's fields; lpage_2m / lpage_1g point into its
# lpage_info arrays, and owner is the Slot (kept alive by Memslots.slots).
cdef struct SlotRecord:
    uint64_t base_gfn
    uint64_t npages
    uint64_t userspace_addr
    uint64_t gmem_pgoff
    uint32_t id
    uint32_t flags
    int gmem_id
    int host_level
    uint32_t* lpage_2m
    uint32_t* lpage_1g
    uint64_t* dirty_bitmap  # memslot->dirty_bitmap, NULL without dirty logging
    void* owner

# One published set of address-space-0 memslots (struct kvm_memslots): never changed
# after publication, kept alive by whoever reads it.  ``readers`` counts the faults in
# flight that read it (their kvm->srcu read-side sections); a memslot change waits
# for it to drop to 0 before it zaps (synchronize_srcu).
# One guest_memfd file's frame states: ``chunks`` pointers, each NULL or FRAME_CHUNK
# uint64 words.
cdef struct FrameFile:
    uint64_t** chunk
    uint64_t nchunks
    uint64_t pages

# SLOT_CHUNK records at most, shared by the tables that hold them (``refs``, changed
# with the GIL held) and never changed once a table holds them; ``keep`` holds, per
# record, the Slot and the arrays its record points into (lpage_info, dirty bitmap).
cdef struct SlotChunk:
    long refs
    int n
    uint64_t bases[64]
    SlotRecord records[64]
    void* keep[256]

# At most ATTR_CHUNK attribute ranges, sorted: [start, end) has value.
cdef struct AttrChunk:
    int n
    uint64_t start[512]
    uint64_t end[512]
    uint64_t value[512]

cdef class SlotTable:
    cdef SlotChunk** chunks
    cdef uint64_t* firsts                   # each chunk's first base gfn
    cdef Py_ssize_t nchunks
    cdef readonly Py_ssize_t nslots
    cdef long readers
    cdef int set_chunks(self, SlotChunk** chunks, Py_ssize_t n) except -1
    cdef Py_ssize_t search_memslots(self, uint64_t gfn) noexcept nogil
    cdef const SlotRecord* gfn_to_memslot(self, uint64_t gfn) noexcept nogil

cdef class Memslots:
    cdef readonly uint64_t supported_attributes
    cdef readonly uint64_t pfn_mask             # the frames of user memory (lower half)
    cdef readonly uint64_t gmem_base, gmem_file_pages   # guest_memfd frames (upper half)
    cdef readonly object counters           # numpy uint64 indexed by VmCounter
    cdef uint64_t* c                        # counters' memory
    cdef readonly SlotTable table           # the current memslots
    cdef long publishes                     # tables published so far (read without the GIL)
    # The memory attributes: disjoint merged ranges in chunks, changed in place with the
    # GIL and mmu_lock for write held (a reader holds the GIL, or, in the GIL-free loop,
    # mmu_lock for read), so a change copies one window of chunks.
    cdef AttrChunk** attr_chunks
    cdef Py_ssize_t attr_nchunks, attr_cap
    # Per guest_memfd file: its frames' state (kvmemu.constants.FrameState), one uint64
    # per page in chunks of FRAME_CHUNK pages made on first write (a missing chunk reads
    # as zero), never moved or freed before the Memslots.
    cdef FrameFile* files
    cdef readonly Py_ssize_t max_files
    cdef int file_shift                     # log2(gmem_file_pages)
    cdef FrameFile* frame_file(self, uint64_t pfn, uint64_t* page) noexcept nogil
    cdef uint64_t* frame_state(self, uint64_t pfn) noexcept nogil
    cdef uint64_t* frame_state_alloc(self, uint64_t pfn) except? NULL nogil
    cdef SlotTable srcu_read_lock(self)
    cdef void srcu_read_unlock(self, SlotTable table) noexcept nogil
    cdef bint attribute_index(self, uint64_t gfn, Py_ssize_t* c, int* i) noexcept nogil
    cdef bint attribute_next(self, Py_ssize_t* c, int* i) noexcept nogil
    cdef int attr_replace(self, Py_ssize_t ca, Py_ssize_t cb, uint64_t* s, uint64_t* e,
                          uint64_t* v, Py_ssize_t m) except -1
    cpdef uint64_t get_memory_attributes(self, uint64_t gfn) noexcept nogil
    cpdef bint mem_is_private(self, uint64_t gfn) noexcept nogil
    cpdef bint mmu_invalidate_retry_gfn(self, uint64_t mmu_seq, uint64_t gfn) noexcept nogil

cpdef uint64_t gmem_frame(uint64_t base, uint64_t file_pages, uint64_t gmem_id,
                          uint64_t page) noexcept nogil
cdef void record_slot(object slot, SlotRecord* rec) except *
cdef void mark_page_dirty_in_slot(const SlotRecord* slot, uint64_t gfn) noexcept nogil
