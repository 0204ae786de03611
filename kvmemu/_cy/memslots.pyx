# The lookups the fault path makes in a VM's memory state, per access.
#
# The compiled twin of kvmemu/_pure/memslots.py (which names the Linux 6.18
# functions).  kvmemu._memory keeps the state and hands it over after every change:
# publish_slots / publish_changes make a SlotTable (SlotRecords by base gfn, in
# chunks that tables share), never changed afterwards, so a reader that holds one
# reads valid memory whatever other threads publish.  The memory attributes are
# kept here, in chunks of ranges changed in place with the GIL and mmu_lock for
# write held (access_many's GIL-free loop reads them holding mmu_lock for read;
# every other reader holds the GIL); the counters array is read in place.

cimport cython
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove
from cpython.ref cimport PyObject, Py_XDECREF, Py_XINCREF


import numpy as np

from kvmemu import _args


cpdef uint64_t gmem_frame(uint64_t base, uint64_t file_pages, uint64_t gmem_id,
                          uint64_t page) noexcept nogil:
    """The host frame of page ``page`` of guest_memfd number ``gmem_id`` of a VM: the
    upper half of the host physical space (from frame ``base``), a window of
    ``file_pages`` frames per file."""
    return base + (gmem_id * file_pages + page) % base


cdef void mark_page_dirty_in_slot(const SlotRecord* slot, uint64_t gfn) noexcept nogil:
    """Models mark_page_dirty_in_slot (virt/kvm/kvm_main.c, 6.18): with dirty logging on
    the slot, set the gfn's bit in its dirty bitmap (set_bit_le: atomic)."""
    cdef uint64_t rel
    if slot != NULL and slot.flags & MEM_FLAG_LOG_DIRTY_PAGES and slot.dirty_bitmap != NULL:
        rel = gfn - slot.base_gfn
        atomic_or64(&slot.dirty_bitmap[rel >> 6], <uint64_t>1 << (rel & 63))


cdef void record_slot(object slot, SlotRecord* rec) except *:
    """A kvmemu._memory.Slot as the fault path reads it (the caller keeps its arrays
    alive: lpage_info and the dirty bitmap)."""
    cdef uint32_t[::1] lpage_2m = slot.lpage[0]
    cdef uint32_t[::1] lpage_1g = slot.lpage[1]
    cdef uint64_t[::1] bitmap
    rec.base_gfn = slot.base_gfn
    rec.npages = slot.npages
    rec.userspace_addr = slot.userspace_addr
    rec.gmem_pgoff = slot.gmem_pgoff
    rec.id = slot.id
    rec.flags = slot.flags
    rec.gmem_id = -1 if slot.gmem_closed else slot.gmem_id   # a closed file fails like none
    rec.host_level = slot.host_level
    rec.lpage_2m = &lpage_2m[0]
    rec.lpage_1g = &lpage_1g[0]
    rec.dirty_bitmap = NULL
    if slot.dirty_bitmap is not None:
        bitmap = slot.dirty_bitmap
        rec.dirty_bitmap = &bitmap[0]
    rec.owner = <void*>slot


cdef enum:
    SLOT_CHUNK = 64         # records per chunk (SlotChunk's arrays)


cdef SlotChunk* new_chunk() except NULL:
    cdef SlotChunk* c = <SlotChunk*>calloc(1, sizeof(SlotChunk))
    if c == NULL:
        raise MemoryError()
    c.refs = 1
    return c


cdef void chunk_put(SlotChunk* c) noexcept:
    """Drop a table's hold on ``c``; the last one frees it (the GIL is held)."""
    cdef int i
    c.refs -= 1
    if c.refs:
        return
    for i in range(4 * c.n):
        Py_XDECREF(<PyObject*>c.keep[i])
    free(c)


cdef void chunk_set(SlotChunk* c, int i, object slot) except *:
    """Record ``slot`` at position ``i`` of ``c`` (a chunk no table holds yet)."""
    cdef object bitmap = slot.dirty_bitmap
    cdef object arrays = (slot, slot.lpage[0], slot.lpage[1], bitmap)
    cdef int k
    record_slot(slot, &c.records[i])
    c.bases[i] = c.records[i].base_gfn
    for k in range(4):
        Py_XINCREF(<PyObject*>arrays[k] if arrays[k] is not None else NULL)
        c.keep[4 * i + k] = <void*>arrays[k] if arrays[k] is not None else NULL


cdef SlotChunk* chunk_copy(const SlotChunk* src, int skip, int insert_at,
                           object slot) except NULL:
    """A new chunk with ``src``'s records, less the one at ``skip`` (-1: none), and
    ``slot`` recorded at ``insert_at`` of the result (-1: none)."""
    cdef SlotChunk* c = new_chunk()
    cdef int i, j = 0, k
    for i in range(src.n):
        if i == skip:
            continue
        if j == insert_at:
            j += 1
        c.records[j] = src.records[i]
        c.bases[j] = src.bases[i]
        for k in range(4):
            c.keep[4 * j + k] = src.keep[4 * i + k]
            Py_XINCREF(<PyObject*>c.keep[4 * j + k])
        j += 1
    c.n = src.n - (1 if skip >= 0 else 0)
    if insert_at >= 0:
        c.n += 1
        try:
            chunk_set(c, insert_at, slot)
        except BaseException:
            chunk_put(c)                 # its keep entries are still NULL (calloc)
            raise
    return c


@cython.final
cdef class SlotTable:
    """One published set of address-space-0 memslots, by base gfn (struct kvm_memslots);
    never changed after it is made.  Its records sit in chunks of at most SLOT_CHUNK
    that tables share: a memslot change makes a table that copies only the chunk it
    changes (``with_changes``)."""

    def __cinit__(self):
        self.chunks = NULL
        self.firsts = NULL
        self.nchunks = 0
        self.nslots = 0
        self.readers = 0

    def __dealloc__(self):
        cdef Py_ssize_t k
        for k in range(self.nchunks):
            chunk_put(self.chunks[k])
        free(self.chunks)
        free(self.firsts)

    def __init__(self, slots):
        cdef Py_ssize_t i, n = len(slots), k = 0
        cdef Py_ssize_t nchunks = (n + SLOT_CHUNK // 2 - 1) // (SLOT_CHUNK // 2)
        cdef SlotChunk** chunks = <SlotChunk**>calloc(max(nchunks, 1), sizeof(SlotChunk*))
        if chunks == NULL:
            raise MemoryError()
        try:
            for i in range(n):          # half-full chunks: room to insert
                if i % (SLOT_CHUNK // 2) == 0:
                    chunks[k] = new_chunk()
                    k += 1
                chunks[k - 1].n += 1
                chunk_set(chunks[k - 1], chunks[k - 1].n - 1, slots[i])
        except BaseException:
            for i in range(k):
                chunk_put(chunks[i])
            free(chunks)
            raise
        self.set_chunks(chunks, k)

    cdef int set_chunks(self, SlotChunk** chunks, Py_ssize_t n) except -1:
        """Take ``chunks`` (this table's own holds, a malloc'd array it now owns)."""
        cdef Py_ssize_t k
        self.firsts = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        if self.firsts == NULL:
            for k in range(n):
                chunk_put(chunks[k])
            free(chunks)
            raise MemoryError()
        self.chunks, self.nchunks = chunks, n
        self.nslots = 0
        for k in range(n):
            self.firsts[k] = chunks[k].bases[0]
            self.nslots += chunks[k].n
        return 0

    @property
    def in_flight(self):
        """Faults in flight that read this table."""
        return atomic_load(&self.readers)

    def with_changes(self, removed, added):
        """A new table: this one without the slots ``removed`` ((base gfn when published,
        Slot) pairs) and with ``added`` (Slots, published at their base gfn).  Only the
        chunks touched are copied (a full chunk splits in two, an empty one goes)."""
        cdef Py_ssize_t n = self.nchunks, k, c
        cdef SlotChunk** chunks = <SlotChunk**>malloc((n + len(added) + 1) * sizeof(SlotChunk*))
        cdef SlotChunk* old
        cdef SlotChunk* made
        cdef SlotChunk* second
        cdef int i, at
        cdef uint64_t base
        if chunks == NULL:
            raise MemoryError()
        for k in range(n):
            chunks[k] = self.chunks[k]
            chunks[k].refs += 1
        try:
            for base, owner in removed:
                c = chunk_index(chunks, n, base)
                i = -1
                if c >= 0:
                    for at in range(chunks[c].n):
                        if chunks[c].bases[at] == base and chunks[c].keep[4 * at] == <void*>owner:
                            i = at
                if i < 0:
                    raise ValueError(f"no published memslot at gfn {base:#x} to remove")
                old = chunks[c]
                if old.n == 1:
                    chunk_put(old)
                    for k in range(c, n - 1):
                        chunks[k] = chunks[k + 1]
                    n -= 1
                else:
                    chunks[c] = chunk_copy(old, i, -1, None)
                    chunk_put(old)
            for slot in added:
                base = slot.base_gfn
                if n == 0:
                    chunks[0] = new_chunk()
                    chunks[0].n = 1
                    try:
                        chunk_set(chunks[0], 0, slot)
                    except BaseException:
                        chunks[0].n = 0
                        chunk_put(chunks[0])
                        raise
                    n = 1
                    continue
                c = max(chunk_index(chunks, n, base), 0)
                old = chunks[c]
                at = 0
                while at < old.n and old.bases[at] <= base:
                    at += 1
                made = chunk_copy(old, -1, at, slot)
                chunk_put(old)
                chunks[c] = made
                if made.n == SLOT_CHUNK:             # split: two half-full chunks
                    second = new_chunk()
                    second.n = SLOT_CHUNK // 2
                    for i in range(SLOT_CHUNK // 2):
                        second.records[i] = made.records[SLOT_CHUNK // 2 + i]
                        second.bases[i] = made.bases[SLOT_CHUNK // 2 + i]
                        for at in range(4):
                            second.keep[4 * i + at] = made.keep[4 * (SLOT_CHUNK // 2 + i) + at]
                    made.n = SLOT_CHUNK // 2
                    for k in range(n, c + 1, -1):
                        chunks[k] = chunks[k - 1]
                    chunks[c + 1] = second
                    n += 1
        except BaseException:
            for k in range(n):
                chunk_put(chunks[k])
            free(chunks)
            raise
        table = SlotTable.__new__(SlotTable)
        (<SlotTable>table).set_chunks(chunks, n)
        return table

    cdef Py_ssize_t search_memslots(self, uint64_t gfn) noexcept nogil:
        """Index of the slot containing gfn, or -1 (search_memslots): chunk * SLOT_CHUNK
        + position.  Binary searches over the chunks' first base gfns, then the chunk's."""
        cdef Py_ssize_t c = chunk_index(self.chunks, self.nchunks, gfn)
        cdef const SlotChunk* chunk
        cdef int lo = 0, n, half
        if c < 0:
            return -1
        chunk = self.chunks[c]
        n = chunk.n
        while n > 1:
            half = n >> 1
            lo = lo + half if chunk.bases[lo + half] <= gfn else lo
            n -= half
        if chunk.bases[lo] <= gfn and gfn - chunk.bases[lo] < chunk.records[lo].npages:
            return c * SLOT_CHUNK + lo
        return -1

    cdef const SlotRecord* gfn_to_memslot(self, uint64_t gfn) noexcept nogil:
        """Models __gfn_to_memslot (include/linux/kvm_host.h, 6.18): the memslot holding
        ``gfn``, or NULL."""
        cdef Py_ssize_t i = self.search_memslots(gfn)
        return &self.chunks[i // SLOT_CHUNK].records[i % SLOT_CHUNK] if i >= 0 else NULL


cdef Py_ssize_t chunk_index(SlotChunk** chunks, Py_ssize_t n, uint64_t gfn) noexcept nogil:
    """The last chunk whose first base gfn is at or below ``gfn``, or -1."""
    cdef Py_ssize_t lo = 0, half
    if n == 0 or chunks[0].bases[0] > gfn:
        return -1
    while n > 1:
        half = n >> 1
        lo = lo + half if chunks[lo + half].bases[0] <= gfn else lo
        n -= half
    return lo


cdef Py_ssize_t chunk_after(AttrChunk** chunks, Py_ssize_t n, uint64_t gfn,
                            bint by_end) noexcept nogil:
    """The first chunk whose last range ends after ``gfn`` (``by_end``) or starts at or
    after ``gfn``; ``n`` when none."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    cdef uint64_t key
    while lo < hi:
        mid = (lo + hi) >> 1
        key = (chunks[mid].end[chunks[mid].n - 1] if by_end
               else chunks[mid].start[chunks[mid].n - 1])
        if (key > gfn) if by_end else (key >= gfn):
            hi = mid
        else:
            lo = mid + 1
    return lo


@cython.final
cdef class Memslots:
    """What the fault path reads of a VM's memory: address space 0's memslots (one
    SlotTable at a time), the attribute ranges, and the counters (mmu_invalidate_seq and
    friends, the memslot generations)."""

    def __init__(self, config, counters):
        cdef uint64_t[::1] view = counters
        self.supported_attributes = MEM_ATTR_PRIVATE if config.has_private_mem else 0
        self.pfn_mask = config.pfn_mask
        self.gmem_base, self.gmem_file_pages = config.gmem_base, config.gmem_file_pages
        self.counters = counters
        self.c = &view[0]
        self.files = <FrameFile*>calloc(self.gmem_base // self.gmem_file_pages,
                                        sizeof(FrameFile))
        if self.files == NULL:
            raise MemoryError()
        self.max_files = self.gmem_base // self.gmem_file_pages
        if self.gmem_file_pages & (self.gmem_file_pages - 1):
            raise ValueError("gmem_file_pages must be a power of two")
        self.file_shift = (self.gmem_file_pages - 1).bit_length()
        self.table = SlotTable([])


    def publish_changes(self, removed, added, bint synchronize):
        """publish_slots of the current table with ``removed`` and ``added`` (see
        SlotTable.with_changes): what one memslot change publishes, without rebuilding
        the others' records."""
        cdef SlotTable old = self.table
        self.table = old.with_changes(removed, added)
        atomic_add(&self.publishes, 1)
        if synchronize:
            self.synchronize_srcu(old)

    def publish_slots(self, slots, bint synchronize):
        """Make ``slots`` (address space 0's, sorted by base gfn) the current memslots
        (rcu_assign_pointer in kvm_swap_active_memslots); with ``synchronize``, wait for
        the faults that read the old ones to finish (synchronize_srcu_expedited)."""
        cdef SlotTable old = self.table
        self.table = SlotTable(slots)
        atomic_add(&self.publishes, 1)
        if synchronize:
            self.synchronize_srcu(old)

    def synchronize_srcu(self, SlotTable old):
        """Wait, without the GIL, until no fault reads ``old`` any more."""
        with nogil:
            while atomic_load(&old.readers) != 0:
                sched_yield()

    def __cinit__(self):
        self.publishes = 0
        self.files = NULL
        self.max_files = 0
        self.attr_chunks = NULL
        self.attr_nchunks = self.attr_cap = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef uint64_t k
        for i in range(self.attr_nchunks):
            free(self.attr_chunks[i])
        free(self.attr_chunks)
        if self.files == NULL:
            return
        for i in range(self.max_files):
            if self.files[i].chunk != NULL:
                for k in range(self.files[i].nchunks):
                    free(self.files[i].chunk[k])
                free(self.files[i].chunk)
        free(self.files)

    def add_gmem_file(self, Py_ssize_t index, uint64_t pages):
        """Guest_memfd number ``index`` has ``pages`` pages: their frame states start at 0
        (no folio yet).  The file's frame window holds at most gmem_file_pages."""
        cdef FrameFile* f
        if not 0 <= index < self.max_files:
            raise ValueError(f"guest_memfd {index} is beyond the {self.max_files} files")
        f = &self.files[index]
        if f.chunk != NULL:
            raise ValueError(f"guest_memfd {index} already has its frames")
        f.pages = min(pages, self.gmem_file_pages)
        f.nchunks = (f.pages + FRAME_CHUNK - 1) // FRAME_CHUNK
        f.chunk = <uint64_t**>calloc(max(f.nchunks, 1), sizeof(uint64_t*))
        if f.chunk == NULL:
            raise MemoryError()

    cdef inline FrameFile* frame_file(self, uint64_t pfn, uint64_t* page) noexcept nogil:
        cdef uint64_t off, k
        if pfn < self.gmem_base:
            return NULL
        off = pfn - self.gmem_base
        k = off >> self.file_shift              # gmem_file_pages is a power of two
        if k >= <uint64_t>self.max_files or self.files[k].chunk == NULL:
            return NULL
        page[0] = off & (self.gmem_file_pages - 1)
        if page[0] >= self.files[k].pages:
            return NULL
        return &self.files[k]

    cdef uint64_t* frame_state(self, uint64_t pfn) noexcept nogil:
        """The state of guest_memfd frame ``pfn`` (kvmemu.constants.FrameState), or NULL
        when it is 0 and was never written, or for a frame of user memory (never assigned
        in the RMP, never in a Secure EPT)."""
        cdef uint64_t page = 0
        cdef FrameFile* f = self.frame_file(pfn, &page)
        cdef uint64_t* chunk
        if f == NULL:
            return NULL
        chunk = load_ptr(&f.chunk[page // FRAME_CHUNK])
        return NULL if chunk == NULL else &chunk[page % FRAME_CHUNK]

    cdef uint64_t* frame_state_alloc(self, uint64_t pfn) except? NULL nogil:
        """frame_state, making the frame's chunk if it has none yet: faults of several
        vCPUs may make it at once (access_many's GIL-free loop), and the first one
        published stands (a reader sees NULL or a zeroed chunk).  NULL only for a frame
        that is not a guest_memfd page."""
        cdef uint64_t page = 0
        cdef FrameFile* f = self.frame_file(pfn, &page)
        cdef uint64_t* chunk
        cdef uint64_t* made
        if f == NULL:
            return NULL
        chunk = load_ptr(&f.chunk[page // FRAME_CHUNK])
        if chunk == NULL:
            made = <uint64_t*>calloc(FRAME_CHUNK, sizeof(uint64_t))
            if made == NULL:
                with gil:
                    raise MemoryError()
            chunk = publish_ptr(&f.chunk[page // FRAME_CHUNK], made)
            if chunk != made:
                free(made)
        return &chunk[page % FRAME_CHUNK]

    def frame(self, uint64_t pfn):
        """The state of frame ``pfn`` (0 for a frame of user memory)."""
        cdef uint64_t* st = self.frame_state(pfn)
        return 0 if st == NULL else load_entry(st)

    def set_frame(self, uint64_t pfn, uint64_t value):
        """Store the state of guest_memfd frame ``pfn`` (ValueError for another frame)."""
        cdef uint64_t* st = self.frame_state_alloc(pfn)
        if st == NULL:
            raise ValueError(f"frame {pfn:#x} is not a guest_memfd page")
        xchg64(st, value)

    def clear_frames(self, Py_ssize_t index, uint64_t start, uint64_t end):
        """Pages [start, end) of guest_memfd ``index`` have no folio any more: state 0."""
        cdef FrameFile* f
        cdef uint64_t page
        cdef uint64_t* chunk
        if not 0 <= index < self.max_files or self.files[index].chunk == NULL:
            return
        f = &self.files[index]
        page = start
        while page < min(end, f.pages):
            chunk = f.chunk[page // FRAME_CHUNK]
            if chunk == NULL:
                page = (page // FRAME_CHUNK + 1) * FRAME_CHUNK
                continue
            xchg64(&chunk[page % FRAME_CHUNK], 0)
            page += 1

    def frame_items(self, Py_ssize_t index):
        """The non-zero frame states of guest_memfd ``index``: [(page, state), ...]."""
        cdef FrameFile* f
        cdef uint64_t k, i
        out = []
        if not 0 <= index < self.max_files or self.files[index].chunk == NULL:
            return out
        f = &self.files[index]
        for k in range(f.nchunks):
            if f.chunk[k] != NULL:
                for i in range(FRAME_CHUNK):
                    if f.chunk[k][i]:
                        out.append((k * FRAME_CHUNK + i, f.chunk[k][i]))
        return out

    def copy_frames(self, Memslots src):
        """Take a copy of every file's frame states from ``src`` (a snapshot's clone)."""
        cdef Py_ssize_t i
        cdef uint64_t k
        cdef FrameFile* f
        for i in range(src.max_files):
            if src.files[i].chunk == NULL:
                continue
            self.add_gmem_file(i, src.files[i].pages)
            f = &self.files[i]
            for k in range(f.nchunks):
                if src.files[i].chunk[k] != NULL:
                    f.chunk[k] = <uint64_t*>malloc(FRAME_CHUNK * sizeof(uint64_t))
                    if f.chunk[k] == NULL:
                        raise MemoryError()
                    memcpy(f.chunk[k], src.files[i].chunk[k], FRAME_CHUNK * sizeof(uint64_t))

    cdef SlotTable srcu_read_lock(self):
        """srcu_read_lock(&kvm->srcu): the current memslots, held until the unlock."""
        cdef SlotTable table = self.table
        atomic_add(&table.readers, 1)
        return table

    cdef void srcu_read_unlock(self, SlotTable table) noexcept nogil:
        atomic_add(&table.readers, -1)

    # --- memslots -----------------------------------------------------------------------

    def find_memslot(self, uint64_t gfn):
        """The id of the address-space-0 memslot holding ``gfn``, or -1."""
        cdef const SlotRecord* slot = self.table.gfn_to_memslot(gfn)
        return -1 if slot == NULL else slot.id

    def find_memslots(self, const uint64_t[::1] gfns):
        """Slot ids of address space 0 for an array of gfns, -1 where there is none (the
        loop holds the table it started with)."""
        cdef Py_ssize_t i, k, n = gfns.shape[0]
        cdef SlotTable table = self.table
        out = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] ids = out
        with nogil:
            for i in range(n):
                k = table.search_memslots(gfns[i])
                ids[i] = (-1 if k < 0 else
                          <int32_t>table.chunks[k // SLOT_CHUNK].records[k % SLOT_CHUNK].id)
        return out

    def gmem_get_pfn(self, slot, uint64_t gfn):
        """The frame kvm_gmem_get_pfn gives for ``gfn`` of a guest_memfd-backed slot."""
        return gmem_frame(self.gmem_base, self.gmem_file_pages, slot.gmem_id,
                          slot.gmem_pgoff + (gfn - slot.base_gfn))

    def hva_to_pfn(self, slot, uint64_t gfn):
        """The host frame behind ``gfn`` of a slot's user memory (the fault path computes
        it inline from its SlotRecord: the hva's page number within the lower half of
        the host physical space)."""
        cdef uint64_t uaddr = slot.userspace_addr, base = slot.base_gfn
        return ((uaddr >> PAGE_SHIFT) + (gfn - base)) & self.pfn_mask

    # --- memory attributes ----------------------------------------------------------------

    cdef bint attribute_index(self, uint64_t gfn, Py_ssize_t* c, int* i) noexcept nogil:
        """The last attribute range starting at or below ``gfn``, as (chunk, index); False
        when there is none."""
        cdef Py_ssize_t lo = 0, n = self.attr_nchunks, half
        cdef const AttrChunk* chunk
        cdef int a, b, mid
        if n == 0 or self.attr_chunks[0].start[0] > gfn:
            return False
        while n > 1:
            half = n >> 1
            lo = lo + half if self.attr_chunks[lo + half].start[0] <= gfn else lo
            n -= half
        chunk = self.attr_chunks[lo]
        a, b = 0, chunk.n
        while a < b:
            mid = (a + b) >> 1
            if chunk.start[mid] <= gfn:
                a = mid + 1
            else:
                b = mid
        c[0], i[0] = lo, a - 1
        return True

    cdef bint attribute_next(self, Py_ssize_t* c, int* i) noexcept nogil:
        """Move (chunk, index) to the next range; False past the last."""
        if i[0] + 1 < self.attr_chunks[c[0]].n:
            i[0] += 1
            return True
        if c[0] + 1 < self.attr_nchunks:
            c[0] += 1
            i[0] = 0
            return True
        return False

    cpdef uint64_t get_memory_attributes(self, uint64_t gfn) noexcept nogil:
        """Models kvm_get_memory_attributes (include/linux/kvm_host.h, 6.18)."""
        cdef Py_ssize_t c = 0
        cdef int i = 0
        if self.attribute_index(gfn, &c, &i) and gfn < self.attr_chunks[c].end[i]:
            return self.attr_chunks[c].value[i]
        return 0

    cpdef bint mem_is_private(self, uint64_t gfn) noexcept nogil:
        """Models kvm_mem_is_private (include/linux/kvm_host.h, 6.18)."""
        return (self.get_memory_attributes(gfn) & MEM_ATTR_PRIVATE) != 0

    def range_has_memory_attributes(self, uint64_t start, uint64_t end, mask, uint64_t attrs):
        """Models kvm_range_has_memory_attributes (virt/kvm/kvm_main.c, 6.18): every gfn of
        [start, end) has ``attrs`` under ``mask`` (masked by what the VM supports)."""
        cdef uint64_t m = <uint64_t>(mask & _args.U64_MAX) & self.supported_attributes
        cdef Py_ssize_t c = 0
        cdef int i = 0, k
        cdef uint64_t gfn
        cdef const AttrChunk* chunk
        if attrs & ~m:
            return False
        if end == start + 1:
            return (self.get_memory_attributes(start) & m) == attrs
        if self.attr_nchunks == 0:
            return not attrs
        if not self.attribute_index(start, &c, &i):
            c, i = 0, 0
        if not attrs:                   # the range at or before start, and the next
            for k in range(2):
                chunk = self.attr_chunks[c]
                if chunk.start[i] < end and chunk.end[i] > start:
                    return False
                if not self.attribute_next(&c, &i):
                    break
            return True
        gfn = start
        while True:
            chunk = self.attr_chunks[c]
            if chunk.end[i] > gfn:
                if chunk.start[i] > gfn or (chunk.value[i] & m) != attrs:
                    return False
                gfn = chunk.end[i]
                if gfn >= end:
                    return True
            if not self.attribute_next(&c, &i):
                return False

    def store_attributes(self, uint64_t start, uint64_t end, uint64_t attrs,
                         RwLock lock=None):
        """xa_store over [start, end) (attribute 0 erases), keeping ranges merged: the
        ranges that straddle it are cut, and a range merges with a neighbour that touches
        it and has the same value (the twin tells the rule).  Only the chunks around the
        change are rewritten, with ``lock`` held for write if given (mmu_lock: readers
        without the GIL hold it for read).  The new ranges are worked out before that,
        so writers must be serialised by the caller (the VM's ioctl lock, as
        kvm->slots_lock serialises kvm_vm_set_mem_attributes)."""
        cdef Py_ssize_t n = self.attr_nchunks, ca, cb, c, cl, ch, lo_c
        cdef Py_ssize_t total = 0, k, lo, hi, m = 0
        cdef int i
        cdef uint64_t* ws
        cdef uint64_t* we
        cdef uint64_t* wv
        cdef uint64_t ps[3]
        cdef uint64_t pe[3]
        cdef uint64_t pv[3]
        cdef int np_ = 0, q
        # The window: from the chunk of the range before the first one ending after
        # start, to the chunk of the first one starting at or after end.
        if n == 0:
            ca, cb = 0, -1
        else:
            cl = chunk_after(self.attr_chunks, n, start, True)
            ch = chunk_after(self.attr_chunks, n, end, False)
            ca = max(min(cl, n - 1) - 1, 0)
            cb = min(ch, n - 1)
        for c in range(ca, cb + 1):
            total += self.attr_chunks[c].n
        ws = <uint64_t*>malloc((total + 3) * 3 * sizeof(uint64_t))
        if ws == NULL:
            raise MemoryError()
        we, wv = ws + total + 3, ws + 2 * (total + 3)
        try:
            k = 0
            for c in range(ca, cb + 1):
                for i in range(self.attr_chunks[c].n):
                    ws[k], we[k], wv[k] = (self.attr_chunks[c].start[i],
                                           self.attr_chunks[c].end[i],
                                           self.attr_chunks[c].value[i])
                    k += 1
            lo = 0
            while lo < total and we[lo] <= start:
                lo += 1
            hi = lo
            while hi < total and ws[hi] < end:
                hi += 1
            if lo < hi and ws[lo] < start:
                ps[np_], pe[np_], pv[np_] = ws[lo], start, wv[lo]
                np_ += 1
            if attrs:
                ps[np_], pe[np_], pv[np_] = start, end, attrs
                np_ += 1
            if lo < hi and we[hi - 1] > end:
                ps[np_], pe[np_], pv[np_] = end, we[hi - 1], wv[hi - 1]
                np_ += 1
            if np_ and lo > 0 and we[lo - 1] == ps[0] and wv[lo - 1] == pv[0]:
                lo -= 1
                ps[0] = ws[lo]
            if np_ and hi < total and ws[hi] == pe[np_ - 1] and wv[hi] == pv[np_ - 1]:
                pe[np_ - 1] = we[hi]
                hi += 1
            m = 0                            # merge touching pieces of one value
            for q in range(np_):
                if m and pe[m - 1] == ps[q] and pv[m - 1] == pv[q]:
                    pe[m - 1] = pe[q]
                else:
                    ps[m], pe[m], pv[m] = ps[q], pe[q], pv[q]
                    m += 1
            # The window becomes [0, lo) + pieces + [hi, total): written in place.
            k = hi - lo - m                  # how far the tail moves left
            if k > 0:
                for q in range(lo + m, total - k):
                    ws[q], we[q], wv[q] = ws[q + k], we[q + k], wv[q + k]
            elif k < 0:
                for q in range(total - 1, hi - 1, -1):
                    ws[q - k], we[q - k], wv[q - k] = ws[q], we[q], wv[q]
            for q in range(m):
                ws[lo + q], we[lo + q], wv[lo + q] = ps[q], pe[q], pv[q]
            if lock is not None:
                lock.acquire_write()
            try:
                self.attr_replace(ca, cb, ws, we, wv, total - k)
            finally:
                if lock is not None:
                    lock.release_write()
        finally:
            free(ws)

    cdef int attr_replace(self, Py_ssize_t ca, Py_ssize_t cb, uint64_t* s, uint64_t* e,
                          uint64_t* v, Py_ssize_t m) except -1:
        """Chunks ca..cb become ``m`` ranges, in chunks of at most 384 (room to grow)."""
        cdef Py_ssize_t k = (m + 383) // 384, old = cb - ca + 1, c, q, first = 0, count
        cdef Py_ssize_t need = self.attr_nchunks - old + k
        cdef AttrChunk** made = <AttrChunk**>calloc(max(k, 1), sizeof(AttrChunk*))
        if made == NULL:
            raise MemoryError()
        for c in range(k):
            made[c] = <AttrChunk*>malloc(sizeof(AttrChunk))
            if made[c] == NULL:
                for q in range(c):
                    free(made[q])
                free(made)
                raise MemoryError()
            count = (m - first) // (k - c)
            made[c].n = <int>count
            for q in range(count):
                made[c].start[q], made[c].end[q], made[c].value[q] = (
                    s[first + q], e[first + q], v[first + q])
            first += count
        if not with_room(<void**>&self.attr_chunks, &self.attr_cap, need, sizeof(AttrChunk*),
                         4):
            for q in range(k):
                free(made[q])
            free(made)
            raise MemoryError()
        for c in range(ca, ca + old):
            free(self.attr_chunks[c])
        if self.attr_nchunks - ca - old > 0:     # (an empty store has no array to move in)
            memmove(&self.attr_chunks[ca + k], &self.attr_chunks[ca + old],
                    (self.attr_nchunks - ca - old) * sizeof(AttrChunk*))
        for c in range(k):
            self.attr_chunks[ca + c] = made[c]
        self.attr_nchunks = need
        free(made)
        return 0

    def attribute_ranges(self, uint64_t start=0, uint64_t end=0xFFFFFFFFFFFFFFFF):
        """The attribute ranges intersecting [start, end), as (start, end, value)."""
        cdef Py_ssize_t c = 0
        cdef int i = 0
        out = []
        if self.attr_nchunks == 0:
            return out
        if not self.attribute_index(start, &c, &i):
            c, i = 0, 0
        while True:
            if self.attr_chunks[c].start[i] >= end:
                break
            if self.attr_chunks[c].end[i] > start:
                out.append((self.attr_chunks[c].start[i], self.attr_chunks[c].end[i],
                            self.attr_chunks[c].value[i]))
            if not self.attribute_next(&c, &i):
                break
        return out

    def attributes_at(self, const uint64_t[::1] gfns):
        """kvm_get_memory_attributes for each element of ``gfns``."""
        out = np.empty(gfns.shape[0], dtype=np.uint64)
        cdef uint64_t[::1] o = out
        cdef Py_ssize_t k
        for k in range(gfns.shape[0]):
            o[k] = self.get_memory_attributes(gfns[k])
        return out

    def copy_attributes(self, Memslots src):
        """Take a copy of ``src``'s attribute ranges (a snapshot's clone, whose store is
        empty); MemoryError, keeping the chunks copied so far, if memory runs out."""
        cdef Py_ssize_t c
        cdef AttrChunk* chunk
        if not with_room(<void**>&self.attr_chunks, &self.attr_cap, src.attr_nchunks,
                         sizeof(AttrChunk*), 4):
            raise MemoryError()
        for c in range(src.attr_nchunks):
            chunk = <AttrChunk*>malloc(sizeof(AttrChunk))
            if chunk == NULL:
                raise MemoryError()
            memcpy(chunk, src.attr_chunks[c], sizeof(AttrChunk))
            self.attr_chunks[c] = chunk
            self.attr_nchunks = c + 1


    # --- the invalidation protocol ----------------------------------------------------------

    cpdef bint mmu_invalidate_retry_gfn(self, uint64_t mmu_seq, uint64_t gfn) noexcept nogil:
        """Models mmu_invalidate_retry_gfn (include/linux/kvm_host.h, 6.18): must a fault that
        snapshotted ``mmu_seq`` retry?"""
        if self.c[VM_COUNTER_MMU_INVALIDATE_IN_PROGRESS]:
            if self.c[VM_COUNTER_MMU_INVALIDATE_RANGE_START] == INVALID_GPA:
                return True
            if (self.c[VM_COUNTER_MMU_INVALIDATE_RANGE_START] <= gfn
                    < self.c[VM_COUNTER_MMU_INVALIDATE_RANGE_END]):
                return True
        return self.c[VM_COUNTER_MMU_INVALIDATE_SEQ] != mmu_seq
