"""The ``kvmemu decode`` command line."""

import subprocess
import sys

import pytest

from kvmemu.cli import main


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_decode_ept_worked_example(capsys):
    out = run(capsys, "decode", "ept", "0x182")
    assert "ACC_WRITE|GVA_IS_VALID|GVA_TRANSLATED" in out
    assert "0x100000002  PFERR.WRITE|GUEST_FINAL" in out
    assert out.rstrip().endswith("private             no")


def test_decode_ept_tdx_private(capsys):
    out = run(capsys, "decode", "ept", "386", "--gpa", "0xc0000000", "--tdx-gpaw", "48")
    assert "0x2000100000002  PFERR.WRITE|GUEST_FINAL|PRIVATE_ACCESS" in out
    assert "shared bit 47 clear: private" in out
    out = run(capsys, "decode", "ept", "0x182", "--gpa", hex((1 << 51) | 0x1000),
              "--tdx-gpaw", "52")
    assert "private             no" in out


def test_decode_npf(capsys):
    out = run(capsys, "decode", "npf", "0x500000004", "--snp")
    assert "0x2000500000004  PFERR.USER|GUEST_FINAL|GUEST_ENC|PRIVATE_ACCESS" in out
    out = run(capsys, "decode", "npf", "0x500000004")
    assert "private      no" in out


def test_decode_pferr(capsys):
    out = run(capsys, "decode", "pferr", "0x2000000000002")
    assert "PFERR.WRITE|PRIVATE_ACCESS" in out and "private     yes" in out


@pytest.mark.parametrize("argv", [["decode", "ept", "0x1" + "0" * 16], ["decode", "ept", "zz"],
                                  ["decode", "pferr", "-1"], ["decode", "ept", "1", "--tdx-gpaw", "50"],
                                  ["decode"], []])
def test_bad_values_exit_non_zero(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "kvmemu", "decode", "pferr", "0x8"],
                         capture_output=True, text=True, check=True)
    assert "PFERR.RSVD" in out.stdout
