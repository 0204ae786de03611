"""Page-level arithmetic (KVM_PAGES_PER_HPAGE and friends, arch/x86/include/asm/kvm_host.h)."""


def pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE(level): 1, 512, 262144."""
    return 1 << ((level - 1) * 9)


def gfn_round_for_level(gfn: int, level: int) -> int:
    return gfn & -pages_per_hpage(level)


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """The lpage_info index of gfn in a slot based at base_gfn."""
    shift = (level - 1) * 9
    return (gfn >> shift) - (base_gfn >> shift)
