"""Packaging facts: implementation selection, exported names, type information."""

from pathlib import Path

import pytest

import kvmemu
from kvmemu import _select


def test_both_cores_export_the_same_names():
    for name in ("cython", "python"):
        core = _select.load(name)
        for attr in _select.CORE_NAMES:
            assert callable(getattr(core, attr)), (name, attr)


def test_public_api_uses_the_selected_core():
    core = _select.load(kvmemu.IMPLEMENTATION)
    assert kvmemu.vmx_error_code is core.vmx_error_code
    assert kvmemu.__version__ == "0.1.0"
    assert set(kvmemu.__all__) >= {"PFERR", "EPT_VIOLATION", "VMType", "RetPF", "ExitReason",
                                   "MemAttr", "MemFlag", "KvmError", "MEMORY_EXIT_FLAG_PRIVATE",
                                   "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G",
                                   "vmx_error_code", "svm_error_code", "tdx_shared_bit"}


@pytest.mark.parametrize("env, expected", [("1", "python"), ("0", "cython"), ("", "cython")])
def test_environment_selects_implementation(env, expected, run_python):
    out = run_python("-c", "import kvmemu; print(kvmemu.IMPLEMENTATION)",
                     env={"KVMEMU_PURE_PYTHON": env})
    assert out.stdout.strip() == expected


def test_unknown_implementation_name():
    with pytest.raises(ValueError):
        _select.load("rust")


@pytest.mark.thread_unsafe      # CPython 3.11's ast module is not safe on two threads at once
def test_the_stub_lists_the_runtime_exports_exactly():
    import ast
    stub = Path(kvmemu.__file__).parent / "__init__.pyi"
    tree = ast.parse(stub.read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "__all__" for t in n.targets)]
    assert ast.literal_eval(assign.value) == list(kvmemu.__all__)
    for name in ("VCPU", "KvmRun", "Snapshot", "AccessBatch", "TraceSink", "U64Array"):
        assert hasattr(kvmemu, name), name


def test_type_information_is_shipped():
    package = Path(kvmemu.__file__).parent
    assert (package / "py.typed").exists()
    stub = (package / "__init__.pyi").read_text()
    for name in kvmemu.__all__:
        assert name in stub, name
