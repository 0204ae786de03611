"""Vendor intake: VMX/TDX exit qualification and SVM EXITINFO1 → KVM error code.

Expected values are the worked examples of docs/reference.md §2.1, §2.3 and
§2.5 and an independent restatement of the rule of __vmx_handle_ept_violation
(vmx/common.h, Linux 6.18) written bit by bit below.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

U64 = st.integers(0, 2**64 - 1)
BIT47, BIT51 = 1 << 47, 1 << 51


def restated_vmx_rule(qual, gpa, shared_bit):
    """__vmx_handle_ept_violation, restated from docs/reference.md §2.1."""
    bit = lambda n: (qual >> n) & 1  # noqa: E731
    code = (bit(0) << 2) | (bit(1) << 1) | (bit(2) << 4)          # read→USER, write, fetch
    code |= bit(3) | bit(4) | bit(5)                               # PROT_* → PRESENT (bit 0)
    if bit(7):                                                     # GVA_IS_VALID
        code |= 1 << 32 if bit(8) else 1 << 33                     # FINAL / PAGE
    if shared_bit and not gpa & shared_bit:                        # TDX private GPA
        code |= 1 << 49
    return code


# docs/reference.md §2.1 worked values.
WORKED_VMX = [(0x182, 0x100000002), (0x181, 0x100000004), (0x18A, 0x100000003),
              (0x19C, 0x100000011)]


@pytest.mark.parametrize("qual, code", WORKED_VMX)
def test_vmx_worked_examples(kv, qual, code):
    assert kv.vmx_error_code(qual, 0xc0000000) == code


def test_vmx_tdx_private_write(kv):
    # Reference §2.3: a private TD fault is handled as qualification ACC_WRITE → WRITE|PRIVATE_ACCESS.
    assert kv.vmx_error_code(0x2, 0xc0000000, BIT47) == 0x2000000000002
    assert kv.vmx_error_code(0x2, 0xc0000000 | BIT47, BIT47) == 0x2
    assert kv.vmx_error_code(0x2, BIT47, BIT51) == 0x2000000000002
    assert kv.vmx_error_code(0x2, BIT51 | 0x1000, BIT51) == 0x2


def test_vmx_gva_invalid_sets_neither_final_nor_page(kv):
    # Bit 8 without bit 7 means nothing (PDPTE loads): no GUEST_FINAL, no GUEST_PAGE.
    assert kv.vmx_error_code(0x102, 0) == 0x2
    assert kv.vmx_error_code(0x082, 0) == 0x200000002


def test_vmx_user_exec_bit_is_not_a_prot_bit(kv):
    # EPT_VIOLATION_PROT_MASK is bits 3-5 in 6.18; bit 6 alone does not make the fault present.
    assert kv.vmx_error_code(0x1C4, 0) == 0x100000010
    assert kv.vmx_error_code(0x1E4, 0) == 0x100000011


def test_vmx_exhaustive_low_qualification_bits(kv):
    quals = np.arange(2**13, dtype=np.uint64)
    for gpa, shared_bit in [(0x1000, 0), (0x1000, BIT47), (BIT47 | 0x1000, BIT47),
                            (BIT51, BIT51), (0, BIT51)]:
        expected = np.array([restated_vmx_rule(q, gpa, shared_bit) for q in range(2**13)],
                            dtype=np.uint64)
        got = kv.vmx_error_code(quals, gpa, shared_bit)
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, expected)
        for q in range(0, 2**13, 97):
            assert kv.vmx_error_code(q, gpa, shared_bit) == expected[q]


@given(q=U64, gpa=U64, shared_bit=st.sampled_from([0, BIT47, BIT51]) | U64)
def test_vmx_any_u64(kv, q, gpa, shared_bit):
    assert kv.vmx_error_code(q, gpa, shared_bit) == restated_vmx_rule(q, gpa, shared_bit)


def test_vmx_arrays_broadcast_scalars(kv):
    quals = np.array([0x182, 0x181, 0x18A, 0x19C], dtype=np.uint64)
    gpas = np.array([0x1000, BIT47 | 0x1000, 0, BIT47], dtype=np.uint64)
    private = 1 << 49
    assert kv.vmx_error_code(quals, gpas, BIT47).tolist() == [
        0x100000002 | private, 0x100000004, 0x100000003 | private, 0x100000011]
    assert kv.vmx_error_code(quals, 0x1000, BIT47).tolist() == [c | private for _, c in WORKED_VMX]
    assert kv.vmx_error_code(0x182, gpas, BIT47).tolist() == [
        0x100000002 | private, 0x100000002, 0x100000002 | private, 0x100000002]
    shared_bits = np.array([0, BIT47, BIT51, BIT47], dtype=np.uint64)
    assert kv.vmx_error_code(0x182, gpas, shared_bits).tolist() == [
        0x100000002, 0x100000002, 0x100000002 | private, 0x100000002]
    assert kv.vmx_error_code(0x182, 0, np.array([BIT47], dtype=np.uint64)).tolist() == [
        0x100000002 | private]


def test_vmx_accepts_read_only_and_strided_arrays(kv):
    quals = np.array([0x182, 0, 0x181, 0, 0x18A, 0], dtype=np.uint64)
    quals.flags.writeable = False
    assert kv.vmx_error_code(quals[::2], 0).tolist() == [0x100000002, 0x100000004, 0x100000003]


def test_vmx_out_parameter(kv):
    quals = np.array([0x182, 0x181], dtype=np.uint64)
    out = np.zeros(2, dtype=np.uint64)
    assert kv.vmx_error_code(quals, 0, out=out) is out
    assert out.tolist() == [0x100000002, 0x100000004]
    in_place = quals.copy()
    kv.vmx_error_code(in_place, 0, out=in_place)
    assert in_place.tolist() == [0x100000002, 0x100000004]
    filled = np.zeros(3, dtype=np.uint64)
    kv.vmx_error_code(0x19C, 0, out=filled)
    assert filled.tolist() == [0x100000011] * 3


def test_empty_arrays(kv):
    empty = np.empty(0, dtype=np.uint64)
    assert kv.vmx_error_code(empty, 0).shape == (0,)
    assert kv.svm_error_code(empty).shape == (0,)


@pytest.mark.parametrize("args, exc", [
    ((-1, 0), OverflowError),
    ((2**64, 0), OverflowError),
    ((0, -5), OverflowError),
    ((0, 0, 2**64), OverflowError),
    ((1.5, 0), TypeError),
    (("0x182", 0), TypeError),
    (([0x182], 0), TypeError),
    ((None, 0), TypeError),
    ((np.array([1], dtype=np.int64), 0), TypeError),
    ((np.array([1.0]), 0), TypeError),
    ((np.ones((2, 2), dtype=np.uint64), 0), ValueError),
    ((np.ones(3, dtype=np.uint64), np.ones(2, dtype=np.uint64)), ValueError),
])
def test_vmx_rejects_bad_input(kv, args, exc):
    with pytest.raises(exc) as info:
        kv.vmx_error_code(*args)
    assert any(name in str(info.value) for name in ("exit_qualification", "gpa", "shared_bit"))


def test_out_parameter_is_checked(kv):
    quals = np.ones(3, dtype=np.uint64)
    with pytest.raises(ValueError):
        kv.vmx_error_code(quals, 0, out=np.empty(2, dtype=np.uint64))
    with pytest.raises(TypeError):
        kv.vmx_error_code(quals, 0, out=np.empty(3, dtype=np.int64))
    with pytest.raises(TypeError):
        kv.vmx_error_code(quals, 0, out=[0, 0, 0])
    read_only = np.empty(3, dtype=np.uint64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        kv.vmx_error_code(quals, 0, out=read_only)
    buf = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError):
        kv.vmx_error_code(buf[:3], 0, out=buf[1:])


# --- SVM #NPF -------------------------------------------------------------------------

def test_svm_hardware_bits_pass_through(kv):
    # kvm-unit-tests svm_npt expectations: final-stage write 0x100000006, guest-walk 0x200000007.
    for value in (0x100000006, 0x200000007, 0x100000015, 0x10000000F, 0x80000007):
        assert kv.svm_error_code(value) == value
        assert kv.svm_error_code(value, snp=True) == value


def test_svm_clears_synthetic_bits(kv):
    assert kv.svm_error_code(0x1000100000004) == 0x100000004
    assert kv.svm_error_code(0x2000100000004) == 0x100000004
    assert kv.svm_error_code(0x3000100000004, snp=True) == 0x100000004


def test_svm_enc_is_private_on_snp_only(kv):
    enc_read = 0x500000004  # GUEST_FINAL | GUEST_ENC | USER
    assert kv.svm_error_code(enc_read, snp=True) == 0x2000500000004
    assert kv.svm_error_code(enc_read, snp=False) == enc_read
    # A hardware PRIVATE bit never survives, even on SNP without ENC.
    assert kv.svm_error_code(0x2000100000004, snp=True) == 0x100000004


@given(e=U64, snp=st.booleans())
def test_svm_any_u64(kv, e, snp):
    expected = e & ~(0x3 << 48)
    if snp and e & (1 << 34):
        expected |= 1 << 49
    assert kv.svm_error_code(e, snp=snp) == expected


def test_svm_arrays(kv):
    values = np.array([0x500000004, 0x3000100000004, 0x100000006], dtype=np.uint64)
    assert kv.svm_error_code(values, snp=True).tolist() == [0x2000500000004, 0x100000004,
                                                            0x100000006]
    assert kv.svm_error_code(values).tolist() == [0x500000004, 0x100000004, 0x100000006]
    assert kv.svm_error_code(0x500000004, True, out=np.zeros(2, np.uint64)).tolist() == [
        0x2000500000004] * 2


@pytest.mark.parametrize("snp, exc", [(2, ValueError), ("yes", TypeError), (None, TypeError),
                                      (np.array([True]), TypeError)])
def test_svm_rejects_bad_snp(kv, snp, exc):
    with pytest.raises(exc, match="snp"):
        kv.svm_error_code(0x100000004, snp=snp)


def test_svm_accepts_bool_like_snp(kv):
    assert kv.svm_error_code(0x500000004, snp=np.bool_(True)) == 0x2000500000004
    assert kv.svm_error_code(0x500000004, snp=1) == 0x2000500000004
    assert kv.svm_error_code(0x500000004, snp=0) == 0x500000004


# --- TDX shared bit -------------------------------------------------------------------

def test_tdx_shared_bit(kv):
    assert kv.tdx_shared_bit(48) == 1 << 47
    assert kv.tdx_shared_bit(52) == 1 << 51
    widths = np.array([48, 52, 48], dtype=np.uint64)
    assert kv.tdx_shared_bit(widths).tolist() == [1 << 47, 1 << 51, 1 << 47]


@pytest.mark.parametrize("gpaw, exc", [(47, ValueError), (0, ValueError), (-48, ValueError),
                                       (2**70, ValueError), ("48", TypeError), (48.0, TypeError),
                                       (np.array([48, 50], dtype=np.uint64), ValueError),
                                       (np.array([48], dtype=np.int32), TypeError)])
def test_tdx_shared_bit_rejects(kv, gpaw, exc):
    with pytest.raises(exc, match="gpaw"):
        kv.tdx_shared_bit(gpaw)
