"""Page-level arithmetic (KVM_PAGES_PER_HPAGE and friends, arch/x86/kvm/mmu/mmu_internal.h,
include/linux/kvm_host.h); the compiled twin is ``_cy/levels.pxd``."""

from ..constants import PT_LEVEL_BITS


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
