"""KVM's SPTEs: the per-vendor masks, the SPTE makers and predicates.

The twin of ``_cy/spte.pyx``.  Models, from Linux 6.18: ``kvm_mmu_set_ept_masks``
and ``kvm_mmu_reset_all_pte_masks`` (arch/x86/kvm/mmu/spte.c), ``make_spte``,
``make_nonleaf_spte``, ``make_small_spte``, ``make_mmio_spte`` (spte.c) and the
predicates of spte.h.
"""

from __future__ import annotations

from .cnames import *  # noqa: F403  (the constants under their C names)
from .levels import pages_per_hpage

GEN_LOW_MASK = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
GEN_HIGH_MASK = (MMIO_SPTE_GEN_MASK >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_START


class SpteFormat:
    """The per-vendor SPTE masks (struct SpteFormat): shadow_present_mask,
    shadow_user_mask, shadow_x_mask / shadow_nx_mask, shadow_accessed_mask /
    shadow_dirty_mask, shadow_host_writable_mask / shadow_mmu_writable_mask,
    shadow_memtype_mask's value for WB, and the MMIO value, mask and access mask."""

    __slots__ = ("ept", "present", "user", "x", "nx", "accessed", "dirty", "host_writable",
                 "mmu_writable", "memtype", "mmio_value", "mmio_mask", "mmio_access_mask",
                 "ad_disabled", "acc_track", "mmio_caching")
    ept: bool
    present: int
    user: int
    x: int
    nx: int
    accessed: int
    dirty: int
    host_writable: int
    mmu_writable: int
    memtype: int
    mmio_value: int
    mmio_mask: int
    mmio_access_mask: int
    ad_disabled: int        # SPTE_TDP_AD_DISABLED in every SPTE without A/D bits, else 0
    acc_track: int          # shadow_acc_track_mask: RWX for EPT, 0 for NPT
    mmio_caching: bool      # enable_mmio_caching


def spte_format(ept: bool, tdx: bool, ad_enabled: bool = True,
                npt_mmio_value: int = NPT_MMIO_VALUE) -> SpteFormat:
    """The SPTE masks KVM sets for the vendor.

    EPT (kvm_mmu_set_ept_masks with A/D bits and execute-only support): present =
    SUPPRESS_VE, user = R, X for exec, A/D bits 8/9, host/MMU-writable bits 57/58,
    memtype WB with IPAT (WB without IPAT for TDX, whose IGNORE_GUEST_PAT quirk is off),
    MMIO value W|X (0 for TDX) under mask RWX|SVE.  NPT (kvm_mmu_reset_all_pte_masks):
    present = P, user = U, NX for no exec, A/D bits 5/6, host/MMU-writable bits 9/10,
    no memtype, MMIO value = mask = ``npt_mmio_value`` (BIT(51)|P on the default host; 0
    turns MMIO caching off) with access bits W|U.  Without EPT A/D bits
    (``ad_enabled`` false) every SPTE carries SPTE_TDP_AD_DISABLED (root role
    ad_disabled); the accessed and dirty masks stay bits 8 and 9.
    """
    f = SpteFormat()
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
        f.memtype = MEM_TYPE_WB << EPT_MEMTYPE_SHIFT
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


def make_spte(f: SpteFormat, level: int, pfn: int, host_writable: bool, nx_huge_pages: bool,
              prefetch: bool = False) -> int:
    """Models make_spte (spte.c, 6.18) for a TDP fault: ACC_ALL, never write-protected; the
    A/D type, the accessed bit unless a prefetch, and a prefetch's SPTE access-tracked
    (mark_spte_for_access_track)."""
    spte = SPTE_MMU_PRESENT | f.ad_disabled | f.present | (0 if prefetch else f.accessed)
    access = ACC_ALL
    if level > PG_LEVEL_4K and nx_huge_pages:        # huge leaves are never executable
        access &= ~ACC_EXEC
    spte |= f.x if access & ACC_EXEC else f.nx
    spte |= f.user                                   # ACC_USER
    if level > PG_LEVEL_4K:
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


def spte_ad_enabled(spte: int) -> bool:
    """spte_ad_enabled (spte.h, 6.18): the A/D type is not AD_DISABLED."""
    return spte & SPTE_TDP_AD_MASK != SPTE_AD_DISABLED


def is_access_track_spte(f: SpteFormat, spte: int) -> bool:
    """is_access_track_spte (spte.h, 6.18)."""
    return not spte_ad_enabled(spte) and not spte & f.acc_track


def mark_spte_for_access_track(f: SpteFormat, spte: int) -> int:
    """Models mark_spte_for_access_track (spte.c, 6.18): with A/D bits only A goes; without,
    R and X are kept at bits 54 and 56 and RWX and A cleared (W is not kept)."""
    if spte_ad_enabled(spte):
        return spte & ~f.accessed
    if is_access_track_spte(f, spte):
        return spte
    spte |= (spte & ACC_TRACK_SAVED_BITS_MASK) << ACC_TRACK_SAVED_BITS_SHIFT
    return spte & ~(f.acc_track | f.accessed)


def restore_acc_track_spte(f: SpteFormat, spte: int) -> int:
    """Models restore_acc_track_spte (spte.h, 6.18): the saved R and X back in place."""
    saved = (spte >> ACC_TRACK_SAVED_BITS_SHIFT) & ACC_TRACK_SAVED_BITS_MASK
    spte &= ~f.acc_track
    spte &= ~(ACC_TRACK_SAVED_BITS_MASK << ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved


def make_nonleaf_spte(f: SpteFormat, child_hpa: int) -> int:
    """Models make_nonleaf_spte (spte.c, 6.18): full access; A set, or AD_DISABLED."""
    return (SPTE_MMU_PRESENT | child_hpa | f.present | PTE_WRITABLE | f.user | f.x
            | (f.ad_disabled if f.ad_disabled else f.accessed))


def make_small_spte(f: SpteFormat, huge_spte: int, child_level: int, index: int,
                    nx_huge_pages: bool) -> int:
    """Models make_small_spte (spte.c, 6.18): entry ``index`` of the table that replaces
    a huge leaf."""
    spte = huge_spte | ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PTE_LARGE
        if nx_huge_pages:                            # make_spte_executable
            spte = modify_spte_protections(f, spte, f.x, f.nx)
    return spte


def modify_spte_protections(f: SpteFormat, spte: int, set_bits: int, clear_bits: int) -> int:
    """Models modify_spte_protections (spte.c, 6.18): an access-tracked SPTE is restored,
    changed and tracked again, so that its saved R/X bits change, not its RWX."""
    tracked = is_access_track_spte(f, spte)
    if tracked:
        spte = restore_acc_track_spte(f, spte)
    spte = (spte | set_bits) & ~clear_bits
    if tracked:
        spte = mark_spte_for_access_track(f, spte)
    return spte


def make_huge_spte(f: SpteFormat, small_spte: int, level: int, nx_huge_pages: bool) -> int:
    """Models make_huge_spte (spte.c, 6.18): the small SPTE with the page-size bit, its
    address cut to the huge page, non-executable under the NX huge page workaround."""
    spte = (small_spte | PTE_LARGE) & (~((pages_per_hpage(level) << PAGE_SHIFT) - 1)
                                       | (PAGE_SIZE - 1))
    if nx_huge_pages:                                # make_spte_nonexecutable
        spte = modify_spte_protections(f, spte, f.nx, f.x)
    return spte


def make_mmio_spte(f: SpteFormat, gfn: int, generation: int) -> int:
    """Models make_mmio_spte(vcpu, gfn, ACC_ALL) (spte.c, 6.18): generation bits, the
    MMIO value, the GPA."""
    gen = generation & MMIO_SPTE_GEN_MASK
    spte = ((gen << MMIO_SPTE_GEN_LOW_START) & GEN_LOW_MASK) | (
        (gen << GEN_HIGH_SHIFT) & GEN_HIGH_MASK)
    return spte | f.mmio_value | (ACC_ALL & f.mmio_access_mask) | (gfn << PAGE_SHIFT)


def is_mmio_spte(f: SpteFormat, spte: int) -> bool:
    """is_mmio_spte (spte.h, 6.18): never without MMIO caching."""
    return f.mmio_caching and (spte & f.mmio_mask) == f.mmio_value


def is_executable_pte(f: SpteFormat, spte: int) -> bool:
    """is_executable_pte (spte.h, 6.18)."""
    return (spte & (f.x | f.nx)) == f.x


def is_access_allowed(f: SpteFormat, exec_: bool, write: bool, spte: int) -> bool:
    """is_access_allowed (spte.h, 6.18)."""
    if exec_:
        return is_executable_pte(f, spte)
    if write:
        return bool(spte & PTE_WRITABLE)
    return bool(spte & PTE_PRESENT)      # PT_PRESENT_MASK (the R bit for EPT)


def is_frozen_spte(spte: int) -> bool:
    """is_frozen_spte (spte.h, 6.18)."""
    return spte == FROZEN_SPTE


def is_shadow_present_pte(spte: int) -> bool:
    """is_shadow_present_pte (spte.h, 6.18)."""
    return bool(spte & SPTE_MMU_PRESENT)


def is_last_spte(spte: int, level: int) -> bool:
    """is_last_spte (spte.h, 6.18)."""
    return level == PG_LEVEL_4K or bool(spte & PTE_LARGE)


def spte_to_pfn(spte: int) -> int:
    """spte_to_pfn (spte.h, 6.18)."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def get_mmio_spte_generation(spte: int) -> int:
    """get_mmio_spte_generation (spte.h, 6.18)."""
    return ((spte & GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START) | (
        (spte & GEN_HIGH_MASK) >> GEN_HIGH_SHIFT)


def spte_index(gfn: int, level: int) -> int:
    """SPTE_INDEX(gfn << 12, level) (spte.h, 6.18)."""
    return (gfn >> (PT_LEVEL_BITS * (level - 1))) & (PT_ENTRIES - 1)
