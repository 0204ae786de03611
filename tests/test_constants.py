"""The constants equal the kernel's values (docs/reference.md and docs/api.md §1)."""

import errno
from pathlib import Path

import pytest

import kvmemu
from kvmemu import (EPT_VIOLATION, PFERR, ExitReason, KvmError, MemAttr, MemFlag, RetPF,
                    VMType)
from kvmemu.constants import c_constants

PFERR_VALUES = {
    "PRESENT": 0x1, "WRITE": 0x2, "USER": 0x4, "RSVD": 0x8, "FETCH": 0x10, "PK": 0x20,
    "SS": 0x40, "SGX": 0x8000, "GUEST_RMP": 0x80000000, "GUEST_FINAL": 0x100000000,
    "GUEST_PAGE": 0x200000000, "GUEST_ENC": 0x400000000, "GUEST_SIZEM": 0x800000000,
    "GUEST_VMPL": 0x1000000000, "IMPLICIT_ACCESS": 0x1000000000000,
    "PRIVATE_ACCESS": 0x2000000000000,
}
EPT_VIOLATION_VALUES = {
    "ACC_READ": 0x1, "ACC_WRITE": 0x2, "ACC_INSTR": 0x4, "PROT_READ": 0x8, "PROT_WRITE": 0x10,
    "PROT_EXEC": 0x20, "PROT_USER_EXEC": 0x40, "GVA_IS_VALID": 0x80, "GVA_TRANSLATED": 0x100,
    # SDM vol. 3C, "Exit Qualification for EPT Violations" (kvm-unit-tests' EPT_VLT_GUEST_*
    # for 9-11; Bochs for 13 and 14).
    "GUEST_USER": 0x200, "GUEST_RW": 0x400, "GUEST_NX": 0x800, "NMI_UNBLOCKING": 0x1000,
    "SHADOW_STACK": 0x2000, "SUPERVISOR_SHADOW_STACK": 0x4000, "PAGING_VERIFICATION": 0x8000,
    "ASYNC_TO_INSTRUCTION": 0x10000,
}
VMTYPE_VALUES = {"DEFAULT": 0, "SW_PROTECTED": 1, "SEV": 2, "SEV_ES": 3, "SNP": 4, "TDX": 5}
RETPF_VALUES = {"CONTINUE": 0, "RETRY": 1, "EMULATE": 2, "WRITE_PROTECTED": 3, "INVALID": 4,
                "FIXED": 5, "SPURIOUS": 6}


@pytest.mark.parametrize("cls, table", [(PFERR, PFERR_VALUES), (EPT_VIOLATION, EPT_VIOLATION_VALUES),
                                        (VMType, VMTYPE_VALUES), (RetPF, RETPF_VALUES)])
def test_enum_values(cls, table):
    for name, value in table.items():
        assert cls[name] == value
    canonical = {n for n, m in cls.__members__.items() if m.name == n}
    assert canonical == set(table)


def test_other_constants():
    assert (ExitReason.MMIO, ExitReason.INTERNAL_ERROR, ExitReason.MEMORY_FAULT) == (6, 17, 39)
    assert MemAttr.PRIVATE == 8
    assert (MemFlag.LOG_DIRTY_PAGES, MemFlag.READONLY, MemFlag.GUEST_MEMFD) == (1, 2, 4)
    assert kvmemu.MEMORY_EXIT_FLAG_PRIVATE == 8
    assert (kvmemu.PG_LEVEL_4K, kvmemu.PG_LEVEL_2M, kvmemu.PG_LEVEL_1G) == (1, 2, 3)
    assert kvmemu.PFERR_SYNTHETIC_MASK == 0x3000000000000
    assert kvmemu.EPT_VIOLATION_PROT_MASK == 0x38
    assert kvmemu.KVM_USER_MEM_SLOTS == 32764
    assert kvmemu.KVM_LPAGE_MIXED_FLAG == 1 << 31
    assert EPT_VIOLATION.EXEC_FOR_RING3_LIN is EPT_VIOLATION.PROT_USER_EXEC
    # spte.h, 6.18: SHADOW_NONPRESENT_VALUE is BIT_ULL(63), FROZEN_SPTE that | 0x5a0.
    assert kvmemu.constants.FROZEN_SPTE == 0x80000000000005A0


def test_flag_repr_names_every_bit():
    assert repr(PFERR(0x100000002)) == "PFERR.WRITE|GUEST_FINAL"
    assert repr(PFERR(0x2000000000002)) == "PFERR.WRITE|PRIVATE_ACCESS"
    assert repr(PFERR(0)) == "PFERR(0)"
    assert repr(PFERR(0x2 | 1 << 60)) == "PFERR.WRITE|0x1000000000000000"
    assert repr(EPT_VIOLATION(0x182)) == "EPT_VIOLATION.ACC_WRITE|GVA_IS_VALID|GVA_TRANSLATED"
    assert repr(EPT_VIOLATION(0x40)) == "EPT_VIOLATION.PROT_USER_EXEC"
    assert str(MemFlag(6)) == "MemFlag.READONLY|GUEST_MEMFD"


def test_flags_built_from_arbitrary_values_are_not_cached():
    before = len(PFERR._value2member_map_)
    for i in range(1000):
        value = PFERR((i << 40) | 2)
        assert value & PFERR.WRITE
        _ = (i << 40) | PFERR.USER
    assert len(PFERR._value2member_map_) == before


@pytest.mark.parametrize("value", [-1, 1 << 64, "2", 2.5])
def test_flags_reject_non_u64(value):
    with pytest.raises((ValueError, TypeError)):
        PFERR(value)


def test_kvm_error_carries_errno():
    err = KvmError(errno.EEXIST, "slot overlaps slot 3")
    assert isinstance(err, OSError)
    assert err.errno == errno.EEXIST
    assert "slot overlaps slot 3" in str(err)
    assert repr(err) == "KvmError(EEXIST, 'slot overlaps slot 3')"


def test_c_names_follow_the_rule():
    """Flag members are <CLASS>_<MEMBER> in upper snake case, uint64_t; enum members int;
    module-level ints keep their name (what the generated C header and pxd declare)."""
    names = c_constants()
    assert names["PFERR_PRIVATE_ACCESS"] == ("uint64_t", 1 << 49)
    assert names["ACCESS_FLAGS_WRITE"] == ("uint64_t", 1)
    assert names["MEM_ATTR_PRIVATE"] == ("uint64_t", 8)
    assert names["RET_PF_SPURIOUS"] == ("int", 6)
    assert names["EXIT_REASON_MEMORY_FAULT"] == ("int", 39)
    assert names["SPTE_BASE_ADDR_MASK"] == ("uint64_t", 0x000F_FFFF_FFFF_F000)
    assert names["KVM_MMU_MAX_GFN"] == ("uint64_t", (1 << 36) - 1)
    # The compiled core's exception signal is neither a RetPF nor a negative errno.
    signal = names["CORE_RETURN_PY_EXCEPTION"][1]
    assert signal > max(RetPF) and signal > 0


def test_the_twins_c_names_stub_is_current():
    from kvmemu._pure import cnames
    stub = Path(cnames.__file__).with_suffix(".pyi")
    assert stub.read_text() == cnames.stub(), (
        "regenerate it: python -m kvmemu._pure.cnames > kvmemu/_pure/cnames.pyi")


def test_flag_complement_stays_within_64_bits():
    """``~flag`` clears the flag's bits of a 64-bit register, as in C (it raised
    ValueError: the complement of a Python int is negative)."""
    from kvmemu import PFERR
    assert ~PFERR.GUEST_ENC == (1 << 64) - 1 - (1 << 34)
    code = PFERR.PRESENT | PFERR.GUEST_ENC
    assert code & ~PFERR.GUEST_ENC == PFERR.PRESENT
