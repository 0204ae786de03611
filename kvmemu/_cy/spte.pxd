# Declarations of KVM's SPTE format (spte.pyx).

from libc.stdint cimport uint64_t

# The per-vendor SPTE masks (kvm_mmu_set_ept_masks / kvm_mmu_reset_all_pte_masks).
cdef struct SpteFormat:
    bint ept
    uint64_t present, user, x, nx, accessed, dirty
    uint64_t host_writable, mmu_writable, memtype
    uint64_t mmio_value, mmio_mask, mmio_access_mask
    uint64_t ad_disabled        # SPTE_TDP_AD_DISABLED without A/D bits, else 0
    uint64_t acc_track          # shadow_acc_track_mask: RWX for EPT, 0 for NPT
    bint mmio_caching           # enable_mmio_caching

cdef SpteFormat spte_format(bint ept, bint tdx, bint ad_enabled,
                            uint64_t npt_mmio_value) noexcept
cdef uint64_t make_spte(const SpteFormat* f, int level, uint64_t pfn, bint host_writable,
                        bint nx_huge_pages, bint prefetch) noexcept nogil
cdef bint spte_ad_enabled(uint64_t spte) noexcept nogil
cdef bint is_access_track_spte(const SpteFormat* f, uint64_t spte) noexcept nogil
cdef uint64_t mark_spte_for_access_track(const SpteFormat* f, uint64_t spte) noexcept nogil
cdef uint64_t restore_acc_track_spte(const SpteFormat* f, uint64_t spte) noexcept nogil
cdef uint64_t modify_spte_protections(const SpteFormat* f, uint64_t spte, uint64_t set_bits,
                                      uint64_t clear_bits) noexcept nogil
cdef uint64_t make_nonleaf_spte(const SpteFormat* f, uint64_t child_hpa) noexcept nogil
cdef uint64_t make_small_spte(const SpteFormat* f, uint64_t huge_spte, int child_level,
                              uint64_t index, bint nx_huge_pages) noexcept nogil
cdef uint64_t make_huge_spte(const SpteFormat* f, uint64_t small_spte, int level,
                             bint nx_huge_pages) noexcept nogil
cdef uint64_t make_mmio_spte(const SpteFormat* f, uint64_t gfn,
                             uint64_t generation) noexcept nogil
cdef bint is_mmio_spte(const SpteFormat* f, uint64_t spte) noexcept nogil
cdef bint is_executable_pte(const SpteFormat* f, uint64_t spte) noexcept nogil
cdef bint is_access_allowed(const SpteFormat* f, bint exec_, bint write,
                            uint64_t spte) noexcept nogil
cdef bint is_frozen_spte(uint64_t spte) noexcept nogil
cdef bint is_shadow_present_pte(uint64_t spte) noexcept nogil
cdef bint is_last_spte(uint64_t spte, int level) noexcept nogil
cdef uint64_t spte_to_pfn(uint64_t spte) noexcept nogil
cdef uint64_t get_mmio_spte_generation(uint64_t spte) noexcept nogil
cdef Py_ssize_t spte_index(uint64_t gfn, int level) noexcept nogil
