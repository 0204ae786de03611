# KVM's SPTEs: the per-vendor masks, the SPTE makers and predicates.
#
# The compiled twin of kvmemu/_pure/spte.py, which names the Linux 6.18 functions
# each rule follows (arch/x86/kvm/mmu/spte.c and spte.h): C over a struct of masks.

from libc.stdint cimport uint64_t

cdef uint64_t GEN_LOW_MASK = ((<uint64_t>1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
cdef uint64_t GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
cdef uint64_t GEN_HIGH_MASK = (MMIO_SPTE_GEN_MASK >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_START


cdef SpteFormat spte_format(bint ept, bint tdx, bint ad_enabled,
                            uint64_t npt_mmio_value) noexcept:
    """The SPTE masks KVM sets for the vendor and host (kvm_mmu_set_ept_masks /
    kvm_mmu_reset_all_pte_masks, spte.c, 6.18; the twin's docstring lists them)."""
    cdef SpteFormat f
    f.ept = ept
    f.ad_disabled = 0 if ad_enabled else SPTE_AD_DISABLED
    f.acc_track = EPTE_READ | EPTE_WRITE | EPTE_EXEC if ept else 0
    f.mmio_caching = ept or npt_mmio_value != 0
    if ept:
        f.present = EPTE_SUPPRESS_VE
        f.user = EPTE_READ
        f.x, f.nx = EPTE_EXEC, 0
        f.accessed, f.dirty = EPTE_ACCESSED, EPTE_DIRTY
        f.host_writable = SPTE_EPT_HOST_WRITABLE
        f.mmu_writable = SPTE_EPT_MMU_WRITABLE
        f.memtype = <uint64_t>MEM_TYPE_WB << EPT_MEMTYPE_SHIFT
        if not tdx:
            f.memtype |= EPTE_IPAT
        f.mmio_value = 0 if tdx else EPT_MISCONFIG_WX_VALUE
        f.mmio_mask, f.mmio_access_mask = EPT_MMIO_MASK, 0
    else:
        f.present = PTE_PRESENT
        f.user = PTE_USER
        f.x, f.nx = 0, PTE_NX
        f.accessed, f.dirty = PTE_ACCESSED, PTE_DIRTY
        f.host_writable = SPTE_HOST_WRITABLE
        f.mmu_writable = SPTE_MMU_WRITABLE
        f.memtype = 0
        f.mmio_value = f.mmio_mask = npt_mmio_value
        f.mmio_access_mask = NPT_MMIO_ACCESS_MASK
    return f


cdef inline uint64_t make_spte(const SpteFormat* f, int level, uint64_t pfn, bint host_writable,
                               bint nx_huge_pages, bint prefetch) noexcept nogil:
    """Models make_spte (spte.c, 6.18) for a TDP fault: ACC_ALL, never write-protected; the
    A/D type, the accessed bit unless a prefetch, a prefetch's SPTE access-tracked."""
    cdef uint64_t spte = (SPTE_MMU_PRESENT | f.ad_disabled | f.present
                          | (0 if prefetch else f.accessed))
    cdef uint64_t access = ACC_ALL
    if level > <int>PG_LEVEL_4K and nx_huge_pages:    # huge leaves are never executable
        access &= ~ACC_EXEC
    spte |= f.x if access & ACC_EXEC else f.nx
    spte |= f.user                                   # ACC_USER
    if level > <int>PG_LEVEL_4K:
        spte |= PTE_LARGE
    spte |= f.memtype
    if host_writable:
        spte |= f.host_writable
    else:
        access &= ~ACC_WRITE
    spte |= pfn << PAGE_SHIFT
    if access & ACC_WRITE:                           # D is set together with W
        spte |= PTE_WRITABLE | f.mmu_writable | f.dirty
    if prefetch:
        spte = mark_spte_for_access_track(f, spte)
    return spte


cdef inline bint spte_ad_enabled(uint64_t spte) noexcept nogil:
    """spte_ad_enabled (spte.h, 6.18)."""
    return (spte & SPTE_TDP_AD_MASK) != SPTE_AD_DISABLED


cdef inline bint is_access_track_spte(const SpteFormat* f, uint64_t spte) noexcept nogil:
    """is_access_track_spte (spte.h, 6.18)."""
    return not spte_ad_enabled(spte) and not (spte & f.acc_track)


cdef inline uint64_t mark_spte_for_access_track(const SpteFormat* f,
                                                uint64_t spte) noexcept nogil:
    """Models mark_spte_for_access_track (spte.c, 6.18)."""
    if spte_ad_enabled(spte):
        return spte & ~f.accessed
    if is_access_track_spte(f, spte):
        return spte
    spte |= (spte & ACC_TRACK_SAVED_BITS_MASK) << ACC_TRACK_SAVED_BITS_SHIFT
    return spte & ~(f.acc_track | f.accessed)


cdef inline uint64_t restore_acc_track_spte(const SpteFormat* f, uint64_t spte) noexcept nogil:
    """Models restore_acc_track_spte (spte.h, 6.18)."""
    cdef uint64_t saved = (spte >> ACC_TRACK_SAVED_BITS_SHIFT) & ACC_TRACK_SAVED_BITS_MASK
    spte &= ~f.acc_track
    spte &= ~(<uint64_t>ACC_TRACK_SAVED_BITS_MASK << ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved


cdef inline uint64_t make_nonleaf_spte(const SpteFormat* f, uint64_t child_hpa) noexcept nogil:
    """Models make_nonleaf_spte (spte.c, 6.18): full access; A set, or AD_DISABLED."""
    return (SPTE_MMU_PRESENT | child_hpa | f.present | PTE_WRITABLE | f.user | f.x
            | (f.ad_disabled if f.ad_disabled else f.accessed))


cdef inline uint64_t make_small_spte(const SpteFormat* f, uint64_t huge_spte, int child_level,
                                     uint64_t index, bint nx_huge_pages) noexcept nogil:
    """Models make_small_spte (spte.c, 6.18): entry ``index`` of the table that replaces a
    huge leaf."""
    cdef uint64_t spte = huge_spte | ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PTE_LARGE
        if nx_huge_pages:                            # make_spte_executable
            spte = modify_spte_protections(f, spte, f.x, f.nx)
    return spte


cdef inline uint64_t modify_spte_protections(const SpteFormat* f, uint64_t spte,
                                             uint64_t set_bits,
                                             uint64_t clear_bits) noexcept nogil:
    """Models modify_spte_protections (spte.c, 6.18): restore an access-tracked SPTE,
    change it, track it again."""
    cdef bint tracked = is_access_track_spte(f, spte)
    if tracked:
        spte = restore_acc_track_spte(f, spte)
    spte = (spte | set_bits) & ~clear_bits
    if tracked:
        spte = mark_spte_for_access_track(f, spte)
    return spte


cdef inline uint64_t make_huge_spte(const SpteFormat* f, uint64_t small_spte, int level,
                                    bint nx_huge_pages) noexcept nogil:
    """Models make_huge_spte (spte.c, 6.18): the small SPTE with the page-size bit, its
    address cut to the huge page, non-executable under the NX huge page workaround."""
    cdef uint64_t spte = (small_spte | PTE_LARGE) & (
        ~((pages_per_hpage(level) << PAGE_SHIFT) - 1) | (<uint64_t>PAGE_SIZE - 1))
    if nx_huge_pages:                                # make_spte_nonexecutable
        spte = modify_spte_protections(f, spte, f.nx, f.x)
    return spte


cdef inline uint64_t make_mmio_spte(const SpteFormat* f, uint64_t gfn,
                                    uint64_t generation) noexcept nogil:
    """Models make_mmio_spte(vcpu, gfn, ACC_ALL) (spte.c, 6.18): generation bits, the MMIO
    value, the GPA."""
    cdef uint64_t gen = generation & MMIO_SPTE_GEN_MASK
    cdef uint64_t spte = (((gen << MMIO_SPTE_GEN_LOW_START) & GEN_LOW_MASK)
                          | ((gen << GEN_HIGH_SHIFT) & GEN_HIGH_MASK))
    return spte | f.mmio_value | (ACC_ALL & f.mmio_access_mask) | (gfn << PAGE_SHIFT)


cdef inline bint is_mmio_spte(const SpteFormat* f, uint64_t spte) noexcept nogil:
    """is_mmio_spte (spte.h, 6.18): never without MMIO caching."""
    return f.mmio_caching and (spte & f.mmio_mask) == f.mmio_value


cdef inline bint is_executable_pte(const SpteFormat* f, uint64_t spte) noexcept nogil:
    """is_executable_pte (spte.h, 6.18)."""
    return (spte & (f.x | f.nx)) == f.x


cdef inline bint is_access_allowed(const SpteFormat* f, bint exec_, bint write,
                                   uint64_t spte) noexcept nogil:
    """is_access_allowed (spte.h, 6.18)."""
    if exec_:
        return is_executable_pte(f, spte)
    if write:
        return (spte & PTE_WRITABLE) != 0
    return (spte & PTE_PRESENT) != 0      # PT_PRESENT_MASK (the R bit for EPT)


cdef inline bint is_frozen_spte(uint64_t spte) noexcept nogil:
    """is_frozen_spte (spte.h, 6.18)."""
    return spte == FROZEN_SPTE


cdef inline bint is_shadow_present_pte(uint64_t spte) noexcept nogil:
    """is_shadow_present_pte (spte.h, 6.18)."""
    return (spte & SPTE_MMU_PRESENT) != 0


cdef inline bint is_last_spte(uint64_t spte, int level) noexcept nogil:
    """is_last_spte (spte.h, 6.18)."""
    return level == PG_LEVEL_4K or (spte & PTE_LARGE) != 0


cdef inline uint64_t spte_to_pfn(uint64_t spte) noexcept nogil:
    """spte_to_pfn (spte.h, 6.18)."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


cdef inline uint64_t get_mmio_spte_generation(uint64_t spte) noexcept nogil:
    """get_mmio_spte_generation (spte.h, 6.18)."""
    return ((spte & GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START) | ((spte & GEN_HIGH_MASK) >> GEN_HIGH_SHIFT)


cdef inline Py_ssize_t spte_index(uint64_t gfn, int level) noexcept nogil:
    """SPTE_INDEX(gfn << 12, level) (spte.h, 6.18)."""
    return (gfn >> (PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)
