"""The ``kvmemu decode`` command line."""


import pytest

import kvmemu
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
    """tdx_handle_ept_violation (vmx/tdx.c, 6.18) replaces a private GPA's qualification
    with EPT_VIOLATION_ACC_WRITE (0x2) before __vmx_handle_ept_violation: the error code
    is PFERR_WRITE_MASK | PFERR_PRIVATE_ACCESS whatever the TDX module reported."""
    for qual in ("386", "0x683", "0x1"):
        out = run(capsys, "decode", "ept", qual, "--gpa", "0xc0000000", "--tdx-gpaw", "48")
        assert "0x2000000000002  PFERR.WRITE|PRIVATE_ACCESS" in out
        assert "shared bit 47 clear: private" in out
        assert "replaced by 0x2 (ACC_WRITE)" in out
    out = run(capsys, "decode", "ept", "0x182", "--gpa", hex((1 << 51) | 0x1000),
              "--tdx-gpaw", "52")
    assert "0x100000002  PFERR.WRITE|GUEST_FINAL" in out        # shared: the VMX rule
    assert "private             no" in out and "replaced" not in out


def test_decode_ept_tdx_shared_fetch_is_eio(capsys):
    """tdx_handle_ept_violation: a shared GPA whose qualification has ACC_INSTR is
    KVM_BUG_ON, -EIO, before any error code is derived."""
    out = run(capsys, "decode", "ept", "0x184", "--gpa", hex((1 << 47) | 0x1000),
              "--tdx-gpaw", "48")
    assert "-EIO" in out and "error code" not in out


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


def test_decode_ept_names_every_sdm_bit_and_warns(capsys):
    """Bits 9-11 (advanced VM-exit information: the linear address is user-mode,
    writable, execute-disable; kvm-unit-tests' EPT_VLT_GUEST_USER / _RW / _NX), 12 (NMI
    unblocking), 13-16 are named; a qualification with no access bit (0-2) and bits
    above 16 are flagged."""
    out = run(capsys, "decode", "ept", "0x683")
    assert "ACC_READ|ACC_WRITE|GVA_IS_VALID|GUEST_USER|GUEST_RW" in out
    assert "0x" not in out.split("EPT_VIOLATION.")[1].split()[0]
    out = run(capsys, "decode", "ept", "0x1f981")
    assert ("GUEST_NX|NMI_UNBLOCKING|SHADOW_STACK|SUPERVISOR_SHADOW_STACK|PAGING_VERIFICATION"
            "|ASYNC_TO_INSTRUCTION") in out and "warning" not in out
    out = run(capsys, "decode", "ept", "0x10")
    assert "warning             no access bit (0-2)" in out
    out = run(capsys, "decode", "ept", "0x20001")
    assert "bits 0x20000 are reserved" in out


def test_decode_json(capsys):
    import json
    out = json.loads(run(capsys, "decode", "ept", "0x182", "--json"))
    assert (out["value"], out["exit_qualification"], out["error_code"], out["private"]) == (
        0x182, 0x182, 0x100000002, False)
    out = json.loads(run(capsys, "decode", "npf", "0x500000004", "--snp", "--json"))
    assert out["error_code"] == 0x2000500000004 and out["private"] is True


@pytest.mark.parametrize("argv", [["decode", "ept", "0x181", "--gpa", "0x1000"],
                                  ["demo", "--accesses", "-5"], ["demo", "--accesses", "x"]])
def test_arguments_that_would_be_ignored_or_crash_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_version_and_a_closed_pipe(run_python, tmp_path):
    out = run_python("-m", "kvmemu", "--version")
    assert out.stdout.strip() == f"kvmemu {kvmemu.__version__}"
    import os
    import subprocess
    import sys
    from pathlib import Path
    # The reader is gone before the first line is written (as with ``| head`` once it
    # has its lines): no traceback, status 1.  (Run as run_python runs: the kvmemu this
    # process imported, from an empty directory.)
    env = {**os.environ, "PYTHONPATH": str(Path(kvmemu.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "kvmemu", "demo", "--accesses", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_module_entry_point(run_python):
    out = run_python("-m", "kvmemu", "decode", "pferr", "0x8")
    assert "PFERR.RSVD" in out.stdout


# --- decode spte: the worked values of docs/reference.md §10.2 ----------------------------

def test_decode_spte_ept_worked_value(capsys):
    out = run(capsys, "decode", "spte", "0x86000000ABCDEB77", "--ept")
    assert "EPTE.READ|WRITE|EXEC|IPAT|ACCESSED|DIRTY|SUPPRESS_VE" in out
    assert "SPTE.MMU_PRESENT|EPT_HOST_WRITABLE|EPT_MMU_WRITABLE" in out
    assert "6 (WB)" in out and "pfn 0xabcde" in out
    for row in ("present to KVM  yes", "MMIO SPTE       no", "writable        yes",
                "executable      yes", "huge leaf       no"):
        assert row in out


def test_decode_spte_npt_huge_leaf_and_nx(capsys):
    out = run(capsys, "decode", "spte", str(0xABCDEEE7 | 1 << 63), "--npt")
    assert "PTE.PRESENT|WRITABLE|USER|ACCESSED|DIRTY|LARGE|NX" in out
    assert "SPTE.HOST_WRITABLE|MMU_WRITABLE|MMU_PRESENT" in out
    assert "executable      no" in out and "huge leaf       yes" in out


def test_decode_spte_mmio_and_nonpresent(capsys):
    # EPT MMIO SPTE: W|X (0x6), SVE clear, the GPA and generation bits (reference §10.4).
    out = run(capsys, "decode", "spte", "0xc0000006", "--ept")
    assert "present to KVM  no" in out and "MMIO SPTE       yes: gfn 0xc0000" in out
    out = run(capsys, "decode", "spte", str((1 << 51) | 0xc0000007), "--npt")
    assert "MMIO SPTE       yes: gfn 0xc0000" in out
    out = run(capsys, "decode", "spte", "0x8000000000000000", "--ept")
    assert "SHADOW_NONPRESENT_VALUE" in out


def test_decode_spte_mmio_generation_bits_are_not_kvm_flags(capsys):
    """An MMIO SPTE keeps the memslot generation in bits 3-10 and 52-62
    (MMIO_SPTE_GEN_LOW_START/END, MMIO_SPTE_GEN_HIGH_START/END, spte.h, 6.18), so bit 52
    there is generation bit 8, not SPTE_TDP_AD_DISABLED.  Generation 0x300 puts bits 52
    and 53 (AD_DISABLED and AD_WRPROT_ONLY in a present SPTE)."""
    out = run(capsys, "decode", "spte", hex(0x00300000C0000006), "--ept")
    assert "MMIO SPTE       yes: gfn 0xc0000, memslot generation 0x300\n" in out
    assert "AD_DISABLED" not in out and "AD_WRPROT_ONLY" not in out
    out = run(capsys, "decode", "spte", hex((1 << 52) | (1 << 51) | 0xc0000207), "--npt")
    assert "memslot generation 0x140\n" in out               # bit 9: generation bit 6
    assert "AD_DISABLED" not in out and "HOST_WRITABLE" not in out


@pytest.mark.parametrize("argv", [["decode", "spte", "0x1" + "0" * 16, "--ept"],
                                  ["decode", "spte", "0x12"], ["decode", "spte", "x", "--npt"],
                                  ["decode", "spte", "1", "--ept", "--npt"]])
def test_decode_spte_rejects(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0


# --- demo -------------------------------------------------------------------------------

def test_demo_reports_every_vm_type(capsys):
    out = run(capsys, "demo", "--accesses", "2000")
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in {t.name for t in kvmemu.VMType}}
    assert list(rows) == [t.name for t in kvmemu.VMType]
    header = [line for line in out.splitlines() if line.startswith("VM type")][0]
    assert "mem-fault exits" in header and "MMIO exits" in header and "2M" in header
    # 64 MMIO pages, read then written: 128 MMIO exits on every VM type.
    assert all(row[4] == "128" for row in rows.values())
    # A TD and an SNP guest take 4 MiB (1024 pages) private through memory-fault exits
    # (SNP's through the RMP check where phase 1 mapped pages shared) and accept or
    # validate each page; the others never exit for memory faults.
    assert rows["TDX"][2] == rows["SNP"][2] == "1024"
    assert rows["TDX"][9] == rows["SNP"][9] == "1024"
    assert rows["DEFAULT"][2] == rows["SW_PROTECTED"][2] == "0"
    # Back to shared explicitly: MapGPA goes out 2 MiB at a time (two exits), SNP's two
    # adjacent 2M entries merge into one, KVM_HC_MAP_GPA_RANGE is one.
    assert (rows["TDX"][3], rows["SNP"][3], rows["SW_PROTECTED"][3]) == ("2", "1", "1")
    assert all(row[-2] == "1" for row in rows.values())      # the 1 GiB slot: one 1G leaf


# --- replay -----------------------------------------------------------------------------

FTRACE = """\
# tracer: nop
 qemu-system-x86-4242 [001] d..1. 1234.567890: kvm_entry: vcpu 0, rip 0xfff0
 qemu-system-x86-4242 [001] d..1. 1234.567891: kvm_page_fault: vcpu 0 rip 0xfff0 address 0x0000000000001000 error_code 0x182
 qemu-system-x86-4242 [001] d..1. 1234.567893: kvm_page_fault: vcpu 0 rip 0xfff0 address 0x0000000000001000 error_code 0x182
 qemu-system-x86-4242 [001] d..1. 1234.567894: kvm_page_fault: vcpu 1 rip 0x10 address 0x00000000c0000000 error_code 0x181
"""


def test_replay_vmx(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text(FTRACE)
    out = run(capsys, "replay", str(trace), "--memslot", "0:1G")
    assert ("3: vcpu 0 address 0x1000 error_code 0x182\n"
            "  EPT_VIOLATION.ACC_WRITE|GVA_IS_VALID|GVA_TRANSLATED -> error code 0x100000002 "
            "PFERR.WRITE|GUEST_FINAL, shared\n  -> FIXED") in out
    assert "4: vcpu 0 address 0x1000 error_code 0x182\n" in out and "-> SPURIOUS" in out
    assert "5: vcpu 1 address 0xc0000000 error_code 0x181\n" in out and "-> EMULATE" in out
    assert "3 events replayed: EMULATE 1, FIXED 1, SPURIOUS 1" in out
    assert "lines skipped: 2 not a kvm event this replay reads" in out
    out = run(capsys, "replay", str(trace))
    assert "note: no --memslot given: every gfn is MMIO" in out


def replay(capsys, tmp_path, text, *argv):
    trace = tmp_path / "trace.txt"
    trace.write_text(text)
    return run(capsys, "replay", str(trace), *argv)


EXIT = ("qemu-4242 [001] d..1. 1.0: kvm_exit: vcpu 0 reason {reason} rip 0xfff0 "
        "info1 0x{info1:016x} info2 0x{info2:016x} intr_info 0x00000000 error_code 0x00000000 "
        "requests 0x0000000000000000\n")
FAULT = ("qemu-4242 [001] d..1. 1.1: kvm_page_fault: vcpu 0 rip 0xfff0 "
         "address 0x{address:016x} error_code 0x{code:x}\n")


def test_replay_reads_perf_script_trace_cmd_and_the_old_format(tmp_path, capsys):
    perf = ("qemu-system-x86  4242 [001]  1234.567891: kvm:kvm_page_fault: vcpu 0 rip 0xfff0 "
            "address 0x0000000000001000 error_code 0x182\n")
    trace_cmd = ("qemu-system-x86-4242  [001]  1234.567891: kvm_page_fault:       vcpu 0 rip "
                 "0xfff0 address 0x0000000000001000 error_code 0x182\n")
    old = " qemu-system-x86-4242 [001] .... 1234.5: kvm_page_fault: address 1000 error_code 182\n"
    for text in (perf, trace_cmd, old):
        out = replay(capsys, tmp_path, text, "--memslot", "0:1G")
        assert "1 events replayed: FIXED 1" in out, text


def test_replay_takes_the_vendor_from_kvm_exit_and_flags_nested_and_shadow(tmp_path, capsys):
    # SVM: reason "npf" (SVM_EXIT_REASONS), EXITINFO1 in info1, the GPA in info2.
    text = (EXIT.format(reason="npf", info1=0x100000006, info2=0x2000)
            + FAULT.format(address=0x2000, code=0x100000006))
    out = replay(capsys, tmp_path, text, "--memslot", "0:1G")
    assert "PFERR.WRITE|USER|GUEST_FINAL" in out and "-> FIXED" in out
    # An L2 exit: kvm_exit, then kvm_nested_vmexit, then the fault: the nested MMU's.
    text = (EXIT.format(reason="EPT_VIOLATION", info1=0x182, info2=0)
            + EXIT.format(reason="EPT_VIOLATION", info1=0x182, info2=0).replace(
                "kvm_exit", "kvm_nested_vmexit")
            + FAULT.format(address=0x1000, code=0x182))
    out = replay(capsys, tmp_path, text, "--memslot", "0:1G")
    assert "!! L2's fault" in out and "0 events replayed" in out and "1 nested (L2)" in out
    # Shadow paging: a #PF intercept (EXCEPTION_NMI), or a code with no EPT access bit.
    text = (EXIT.format(reason="EXCEPTION_NMI", info1=0x1000, info2=0)
            + FAULT.format(address=0x1000, code=0x10))
    out = replay(capsys, tmp_path, text, "--memslot", "0:1G")
    assert "!! a #PF intercept (EXCEPTION_NMI)" in out and "1 shadow-paging #PF" in out
    out = replay(capsys, tmp_path, FAULT.format(address=0x1000, code=0x10), "--memslot", "0:1G")
    assert "!! no EPT access bit (0-2)" in out


def test_replay_skips_counts_or_stops_and_refuses_binary(tmp_path, capsys):
    text = FTRACE + " x-1 [000] .... 1.0: kvm_page_fault: vcpu 0 address 12\n"
    out = replay(capsys, tmp_path, text, "--memslot", "0:1G")
    assert "1 malformed kvm_page_fault" in out and "3 events replayed" in out
    trace = tmp_path / "trace.txt"
    with pytest.raises(SystemExit) as info:
        main(["replay", str(trace), "--memslot", "0:1G", "--strict"])
    assert info.value.code == 2
    assert f"{trace}:6: malformed kvm_page_fault" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(trace), "--memslot", "0:1Z"])
    binary = tmp_path / "trace.dat"
    binary.write_bytes(b"\x17\x08\x44tracing6\0\0\0" + bytes(100))
    with pytest.raises(SystemExit) as info:
        main(["replay", str(binary)])
    assert info.value.code == 2 and "trace-cmd report" in capsys.readouterr().err


def test_replay_json_and_summary(tmp_path, capsys):
    import json
    out = json.loads(replay(capsys, tmp_path, FTRACE, "--memslot", "0:1G", "--json"))
    assert out["summary"]["outcomes"] == {"FIXED": 1, "SPURIOUS": 1, "EMULATE": 1}
    first = out["events"][0]
    assert (first["line"], first["address"], first["kvm_error_code"], first["private"],
            first["outcome"]) == (3, 0x1000, 0x100000002, False, "FIXED")
    out = replay(capsys, tmp_path, FTRACE, "--memslot", "0:1G", "--summary")
    assert out.splitlines()[0] == "3 events replayed: EMULATE 1, FIXED 1, SPURIOUS 1"


def test_replay_compares_spte_changes_with_the_hosts(tmp_path, capsys):
    """The host's lines after its fault: three links and a 4K leaf, written at other
    frames and table addresses than the model's: the same.  A host that mapped 2M: the
    difference is reported."""
    host = "".join(
        f"qemu-4242 [001] d..1. 1.2: kvm_tdp_mmu_spte_changed: as id 0 gfn {gfn} level "
        f"{level} old_spte 8000000000000000 new_spte {new}\n"
        for gfn, level, new in (("0", 4, "12345907"), ("0", 3, "22345907"),
                                ("0", 2, "32345907"), ("1", 1, "86000009999d1b77")))
    host += ("qemu-4242 [001] d..1. 1.3: kvm_mmu_set_spte: gfn 1 spte 86000009999d1b77 "
             "(rwxu) level 1 at 55550008\n")
    text = FAULT.format(address=0x1000, code=0x182) + host
    out = replay(capsys, tmp_path, text, "--memslot", "0:1G", "--compare")
    assert "faults whose SPTE changes differ from the host's: 0" in out
    huge = text.replace("level 1 at", "level 2 at")
    out = replay(capsys, tmp_path, huge, "--memslot", "0:1G", "--compare")
    assert "differs from the host (line 1)" in out
    assert "host : set_spte 1 2 rwxu" in out and "model: set_spte 1 1 rwxu" in out
    assert "faults whose SPTE changes differ from the host's: 1" in out


def test_replay_tdx_private_and_trace(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("x-1 [000] .... 1.0: kvm_page_fault: vcpu 0 rip 0x0 "
                     "address 0x0000000000002000 error_code 0x2\n")
    out = run(capsys, "replay", str(trace), "--vm-type", "tdx", "--memslot", "0:1G:gmem")
    assert "-EFAULT, KVM_EXIT_MEMORY_FAULT flags 0x8 gpa 0x2000 size 0x1000" in out
    out = run(capsys, "replay", str(trace), "--vm-type", "tdx", "--memslot", "0:1G:gmem",
              "--private", "0:2M", "--trace")
    assert "    kvm_page_fault: vcpu 0 rip 0x0 address 0x0000000000002000 error_code 0x2" in out
    assert "-> FIXED" in out


def test_replay_svm_snp_private(tmp_path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("x-1 [000] .... 1.0: kvm_page_fault: vcpu 0 rip 0x0 "
                     "address 0x0000000000002000 error_code 0x2000500000006\n")
    out = run(capsys, "replay", str(trace), "--vm-type", "snp", "--memslot", "0:1G:gmem",
              "--private", "0:1G")
    assert "-> FIXED" in out


def test_fuzz_runner_replays_inputs_on_both_cores_or_one(capsys):
    from pathlib import Path
    seeds = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "fuzz" / "corpus").iterdir())
    assert main(["fuzz", *seeds[:2]]) == 0
    assert capsys.readouterr().out.strip().endswith("no divergence")
    assert main(["fuzz", "--one-core", *seeds[:2]]) == 0
    assert capsys.readouterr().out.strip().endswith("no finding")
