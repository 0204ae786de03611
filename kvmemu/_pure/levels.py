"""Page-level arithmetic (KVM_PAGES_PER_HPAGE and friends, arch/x86/kvm/mmu/mmu_internal.h,
include/linux/kvm_host.h); the compiled twin is ``_cy/levels.pxd``."""

from ..constants import PT_ENTRIES, PT_LEVEL_BITS


def pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE(level): 1, 512, 262144."""
    return 1 << ((level - 1) * PT_LEVEL_BITS)


def gfn_round_for_level(gfn: int, level: int) -> int:
    """gfn_round_for_level: the first gfn of the level-``level`` page holding ``gfn``."""
    return gfn & -pages_per_hpage(level)


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """gfn_to_index: the lpage_info index of ``gfn`` in a slot based at ``base_gfn``."""
    shift = (level - 1) * PT_LEVEL_BITS
    return (gfn >> shift) - (base_gfn >> shift)


def first_index(level: int, base: int, start: int) -> int:
    """The first entry of a level-``level`` table mapping gfns from ``base`` that maps a gfn
    at or above ``start`` (for_each_tdp_pte's start)."""
    return max(start - base, 0) // pages_per_hpage(level)


def end_index(level: int, base: int, end: int) -> int:
    """One past the last entry of that table that maps a gfn below ``end``."""
    span = pages_per_hpage(level)
    return min((end - base + span - 1) // span, PT_ENTRIES) if end > base else 0
