"""The machine KVM runs on: ``Host``, and what its parameters make of a VM.

Written once for both cores.  ``Host`` holds what the user chooses; ``host_config``
works out, for one VM, the values Linux 6.18 derives from the host at module load
and VM creation, with the source of each:

* ``kvm_host.maxphyaddr`` is the raw CPUID 0x80000008 width (kvm_get_host_maxphyaddr,
  spte.c): kvm_mmu_max_gfn() (mmu.h), the memslot limit and the MMIO-SPTE limit.
* With AMD memory encryption enabled in SYSCFG, early_detect_mem_encrypt (amd.c)
  reduces ``x86_phys_bits`` by CPUID 0x8000001F EBX[11:6]; svm_adjust_mmio_mask
  (svm.c) then makes the NPT MMIO mask the reserved bits from the reduced width (one
  more if that is the C-bit) to 51, plus P; without it kvm_mmu_reset_all_pte_masks
  (spte.c) uses bit 51 | P while the raw width is below 52, and nothing (MMIO caching
  off: kvm_mmu_set_mmio_spte_mask) at 52.  EPT's MMIO SPTE is the W|X
  misconfiguration whatever the width (kvm_mmu_set_ept_masks).
* 5-level host paging: get_npt_level (svm.c) forces NPT roots to 5 levels;
  TASK_SIZE_MAX, hence USER_PTR_MAX and access_ok, reaches 2**56 - 4096.
* EPT without A/D bits: enable_ept_ad_bits off (vmx.c), kvm_ad_enabled false
  (spte.c): SPTEs carry SPTE_TDP_AD_DISABLED, prefetched ones are access-tracked,
  PML is off (vmx_hardware_setup), TDX refuses the host (tdx_bringup).
* Which VMs exist: SEV needs X86_FEATURE_SEV, cleared without SYSCFG memory
  encryption (amd.c); SEV-ES and SNP need MMIO caching (sev_hardware_setup); TDX
  needs EPT A/D bits and MMIO caching (tdx_bringup).

The model's own host-physical layout follows the (reduced) width: user memory at
hva maps to frame ``(hva >> 12) mod 2**(phys_bits - 13)`` (the lower half), the
guest_memfd files sit in the upper half.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _args
from .constants import (GMEM_FILE_PAGES, PAGE_SHIFT, SME_C_BIT, SME_PHYS_BITS_REDUCTION,
                        USER_PTR_MAX, USER_PTR_MAX_LA57, PTE, VMType)

_SVM_TYPES = (VMType.SEV, VMType.SEV_ES, VMType.SNP)
#: The narrowest physical address space the model's table storage fits in.
MIN_PHYS_BITS = 36


class Host:
    """The machine KVM runs on (immutable, hashable).

    ``Host(*, maxphyaddr=48, la57=False, ept_ad_bits=True, mem_encrypt=None, pml=None)``:

    * ``maxphyaddr`` (36..52): CPUID 0x80000008 EAX[7:0];
    * ``la57``: 5-level host paging (NPT roots are 5-level, user addresses reach
      2**56 - 4096);
    * ``ept_ad_bits``: the EPT A/D capability (off: KVM tracks accesses itself);
    * ``mem_encrypt``: AMD SME/SEV enabled in SYSCFG (the modelled part has its C-bit
      at 51 and loses 5 physical address bits); None means on for SEV, SEV_ES and
      SNP VMs and off for the others;
    * ``pml``: Intel Page-Modification Logging; None means present.  KVM uses it
      only with EPT A/D bits, never for a TD.
    """

    __slots__ = ("maxphyaddr", "la57", "ept_ad_bits", "mem_encrypt", "pml")

    maxphyaddr: int
    la57: bool
    ept_ad_bits: bool
    mem_encrypt: bool | None
    pml: bool | None

    def __init__(self, *, maxphyaddr: Any = 48, la57: Any = False, ept_ad_bits: Any = True,
                 mem_encrypt: Any = None, pml: Any = None) -> None:
        values = (_args.int_range("maxphyaddr", maxphyaddr, 36, 52),
                  _args.flag("la57", la57), _args.flag("ept_ad_bits", ept_ad_bits),
                  None if mem_encrypt is None else _args.flag("mem_encrypt", mem_encrypt),
                  None if pml is None else _args.flag("pml", pml))
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Host is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a Host is immutable")

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Host) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> Any:
        return (_make_host, self._key())

    def __repr__(self) -> str:
        return ("Host(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
                + ")")


def _make_host(maxphyaddr: int, la57: bool, ept_ad_bits: bool, mem_encrypt: bool | None,
               pml: bool | None) -> Host:
    return Host(maxphyaddr=maxphyaddr, la57=la57, ept_ad_bits=ept_ad_bits,
                mem_encrypt=mem_encrypt, pml=pml)


class HostConfig(NamedTuple):
    """What KVM derives from the host for one VM."""

    maxphyaddr: int            # kvm_host.maxphyaddr (raw)
    phys_bits: int             # boot_cpu_data.x86_phys_bits (reduced by memory encryption)
    mem_encrypt: bool          # SYSCFG MemEncryptionModEn
    max_gfn: int               # kvm_mmu_max_gfn()
    user_ptr_max: int          # USER_PTR_MAX (access_ok)
    npt_levels: int            # get_npt_level()
    ad_enabled: bool           # kvm_ad_enabled
    pml: bool                  # kvm->arch.cpu_dirty_log_size != 0
    npt_mmio_mask: int         # NPT shadow_mmio_value = shadow_mmio_mask (0: no caching)
    mmio_caching: bool         # enable_mmio_caching for the VM's vendor
    table_maxphyaddr: int      # the walk's MAXPHYADDR: reserved bits start there
    pfn_mask: int              # the model's user-memory frames: the lower half
    gmem_base: int             # the first guest_memfd frame: the upper half
    gmem_file_pages: int       # the frames of one guest_memfd file


def rsvd_bits(low: int, high: int) -> int:
    """rsvd_bits(s, e) (mmu.h): bits low..high set."""
    return ((1 << (high + 1)) - 1) & ~((1 << low) - 1)


def host_config(host: Host, vm_type: VMType, vendor: str) -> HostConfig:
    """The values KVM derives from ``host`` for a VM of ``vm_type`` on ``vendor``;
    ValueError for a VM the host cannot run."""
    vmx = vendor == "vmx"
    mem_encrypt = host.mem_encrypt if host.mem_encrypt is not None else vm_type in _SVM_TYPES
    if mem_encrypt and vmx:
        raise ValueError("SYSCFG memory encryption (mem_encrypt) is an AMD feature; this VM "
                         "runs on vmx")
    phys_bits = host.maxphyaddr - (SME_PHYS_BITS_REDUCTION if mem_encrypt else 0)
    if phys_bits < MIN_PHYS_BITS:
        raise ValueError(f"maxphyaddr {host.maxphyaddr} less the {SME_PHYS_BITS_REDUCTION} "
                         f"bits memory encryption takes is below {MIN_PHYS_BITS}")
    if mem_encrypt:                                    # svm_adjust_mmio_mask
        mask_bit = phys_bits + (1 if phys_bits == SME_C_BIT else 0)
        npt_mmio = rsvd_bits(mask_bit, 51) | PTE.PRESENT.value if mask_bit < 52 else 0
    else:                                              # kvm_mmu_reset_all_pte_masks
        npt_mmio = (1 << 51) | PTE.PRESENT.value if host.maxphyaddr < 52 else 0
    mmio_caching = vmx or npt_mmio != 0
    ad_enabled = host.ept_ad_bits or not vmx
    if vm_type in _SVM_TYPES and not mem_encrypt:
        raise ValueError(f"{vm_type.name} needs SEV, which the host lacks without memory "
                         "encryption enabled in SYSCFG (mem_encrypt)")
    if vm_type in (VMType.SEV_ES, VMType.SNP) and not mmio_caching:
        raise ValueError(f"{vm_type.name} needs MMIO caching, which this host cannot have")
    if vm_type == VMType.TDX and not ad_enabled:
        raise ValueError("TDX needs EPT A/D bits (tdx_bringup)")
    pml = (vmx and vm_type != VMType.TDX and ad_enabled
           and (host.pml is None or host.pml))
    half = 1 << (phys_bits - 1 - PAGE_SHIFT)
    return HostConfig(
        maxphyaddr=host.maxphyaddr, phys_bits=phys_bits, mem_encrypt=mem_encrypt,
        max_gfn=(1 << (host.maxphyaddr - PAGE_SHIFT)) - 1,
        user_ptr_max=USER_PTR_MAX_LA57 if host.la57 else USER_PTR_MAX,
        npt_levels=5 if host.la57 else 4, ad_enabled=ad_enabled, pml=pml,
        npt_mmio_mask=npt_mmio, mmio_caching=mmio_caching,
        table_maxphyaddr=host.maxphyaddr if vmx else phys_bits,
        pfn_mask=half - 1, gmem_base=half, gmem_file_pages=min(GMEM_FILE_PAGES, half >> 3))
