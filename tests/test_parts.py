"""The shape of the house: both cores have the same parts and the same function names,
and the layers point one way (the API layer above the cores, imported by none).

The compiled parts are read as text (``kvmemu/_cy/<part>.pyx`` and ``.pxd``: module
functions, classes, structs, enums, and the methods of each class), the twin's
(``kvmemu/_pure/<part>.py``) through ``ast``.  A function or method that exists in one
core and not in the other fails here, with the few compiled-only helpers below named
and explained.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import kvmemu

#: ast.parse is not thread-safe in CPython 3.11 (its recursion counter is shared): these
#: tests run on one thread under pytest-run-parallel.
pytestmark = pytest.mark.thread_unsafe

# The sources in the repository (or sdist): the wheel does not ship the Cython parts.
PACKAGE = Path(__file__).resolve().parents[1] / "kvmemu"
COMPILED = PACKAGE / "_cy"
TWIN = PACKAGE / "_pure"
#: Twin modules that are not parts: the package and the constants under their C names
#: (which the compiled parts get from the generated kvmemu_constants.pxd).
NOT_PARTS = {"__init__", "cnames"}
#: Compiled-only names, each with the reason the twin has no counterpart.
COMPILED_ONLY = {
    ("memslots", "record_slot"): "copies a Slot into a C SlotRecord; the twin reads Slots",
    ("memslots", "chunk_after"): "finds a chunk of the compiled attribute store; the twin's "
                                 "ranges are flat arrays",
    ("memslots", "Memslots.attribute_next"): "walks the compiled attribute store's chunks",
    ("memslots", "Memslots.attr_replace"): "rewrites chunks of the compiled attribute store",
    ("memslots", "new_chunk"): "SlotTable's chunks of C records, shared between tables; the twin's "
                          "table is a list of Slots",
    ("memslots", "chunk_put"): "SlotTable's chunks of C records, shared between tables; the twin's "
                          "table is a list of Slots",
    ("memslots", "chunk_set"): "SlotTable's chunks of C records, shared between tables; the twin's "
                          "table is a list of Slots",
    ("memslots", "chunk_copy"): "SlotTable's chunks of C records, shared between tables; the twin's "
                          "table is a list of Slots",
    ("memslots", "chunk_index"): "SlotTable's chunks of C records, shared between tables; the twin's "
                          "table is a list of Slots",
    ("memslots", "SlotTable.set_chunks"): "SlotTable's chunks of C records, shared between tables; the twin's "
                          "table is a list of Slots",
    ("mmu", "fault_without_gil"): "access_many's GIL-free loop handles a fault itself; the "
                                  "twin has no GIL-free loop",
    ("paging", "table_bias"): "turns an entry's address bits into a pointer into the compiled "
                              "table memory; the twin indexes a list of tables",
    ("paging", "has_table"): "table_at's bound as one compare, for the compiled walks that "
                             "follow address bits as pointers; the twin's walks call table_at",
    ("tdp_mmu", "Root.child_entries"): "a pointer to Root.child's entries in the compiled "
                                       "table memory; the twin indexes tables",
    ("locking", "my_shard"): "the calling thread's shard of a sharded C count; the twin's "
                             "counts are Python ints under the GIL",
    ("locking", "load_entry"): "READ_ONCE of a table entry that faults on other threads "
                               "write; the twin's walks hold the GIL",
    ("locking", "store_entry"): "WRITE_ONCE of a table entry that walks on other threads "
                                "read; the twin's writes hold the GIL",
    ("locking", "load_count"): "an acquire load of a table count that faults on other threads "
                               "grow; the twin's walks hold the GIL",
    ("locking", "store_count"): "a release store of a table count that walks on other threads "
                                "read; the twin's writes hold the GIL",
    ("locking", "next_set_word"): "the scan of a dirty bitmap in C, four zero words at a time; "
                                  "the twin takes np.flatnonzero",
    ("locking", "load_flag"): "READ_ONCE of a table's nx_huge_page_disallowed byte that faults "
                              "on other threads set; the twin's flags are a dict under the GIL",
    ("locking", "store_flag"): "WRITE_ONCE of a table's nx_huge_page_disallowed byte; the "
                               "twin's flags are a dict under the GIL",
    ("locking", "once_add"): "a vCPU statistic changed in the GIL-free loop and read by "
                             "other threads; the twin's change holding the GIL",
    ("locking", "atomic_add"): "the SRCU reader count; the twin counts under a Condition",
    ("locking", "atomic_load"): "the SRCU reader count; the twin counts under a Condition",
    ("locking", "atomic_store"): "whether a vCPU's stage hook is set, read by the GIL-free "
                                 "loop; the twin has no such loop",
    ("locking", "fetch_andnot64"): "one word of fetch_andnot_words; the twin holds its atomic "
                                   "lock around the whole loop",
    ("locking", "load_ptr"): "publishes a frame-state chunk; the twin's states are a dict",
    ("locking", "publish_ptr"): "publishes a frame-state chunk; the twin's states are a dict",
    ("locking", "xchg64"): "one word of xchg_words; the twin holds its atomic lock around "
                           "the whole loop",
    ("levels", "with_room"): "grows a C array; the twin's arrays are lists and numpy arrays",
    ("levels", "debug_assert"): "C assert of the debug build; the twin's reads are checked",
    ("paging", "ept4_mapped_run"): "access_many's tight loop over 4-level EPT accesses that "
                                   "store nothing; the twin takes each through "
                                   "ept_fast_translate, by the same rules",
    ("paging", "ept4_step"): "one step of ept4_leaf's walk",
    ("paging", "ept4_leaf"): "the walk of ept4_mapped_run and ept4_walk",
    ("paging", "ept4_walk"): "access_many's walk of one 4-level EPT access that stores "
                             "nothing, or its EPT violation on a not-present entry; the twin "
                             "takes each through ept_fast_translate, by the same rules",
    ("paging", "ept4_walk_init"): "ept4_walk's masks for a batch's access flags",
    ("paging", "use_result_dealloc"): "installs a C deallocator on Translation; the twin's "
                                      "results are freed by CPython's own",
    ("paging", "result_pair_reused"): "a Translation from the C deallocator's free list; the "
                                      "twin's results are made by CPython",
    ("paging", "PageTables.grow"): "new_table without zeroing, for alloc, which fills the "
                                   "table itself; the twin's fill is one numpy store",
    ("paging", "plain_access"): "the compiled core's check of plain access arguments; the "
                                "twin checks every call through kvmemu._args",
    ("vcpu", "within_reach"): "access_many's fast-path check of the GPAs, without the GIL; "
                              "the twin checks every call through kvmemu._args",
    ("vcpu", "VCPUState.batch_into"): "access_many's fast path into out= arrays; the twin checks "
                                      "every call through kvmemu._args",
    ("vcpu", "VCPUState.batch"): "access_many's result arrays from numpy's C API, held as raw "
                                 "pointers for the loop; the twin fills numpy arrays",
    ("trace", "put"): "appends to a C line buffer; the twin formats with f-strings",
    ("trace", "put_hex"): "appends to a C line buffer; the twin formats with f-strings",
    ("trace", "put_dec"): "appends to a C line buffer; the twin formats with f-strings",
    ("paging", "result"): "fills a result tuple in C; the twin calls the result class",
    ("paging", "result2"): "a two-field result without the tuple of fields; the twin calls the "
                           "result class",
    ("vcpu", "VCPUState.loop_faults"): "counts the faults of the compiled core's GIL-free "
                                       "loop, which the twin does not have",
    ("vcpu", "VCPUState.stage_hook"): "a property that keeps whether a hook is set where the "
                                      "GIL-free loop reads it; the twin's is an attribute",
    ("vcpu", "VCPUState.hypercall"): "a property that keeps whether a completion is pending in C "
                                     "for quiet(); the twin's is an attribute",
    ("paging", "take_reservation"): "the pool of table mappings; the twin's are Python mmaps",
    ("paging", "give_back_reservation"): "the pool of table mappings; the twin's are Python mmaps",
    ("locking", "RwLock.read_lock"): "entry points for callers without the GIL",
    ("locking", "RwLock.read_unlock"): "entry points for callers without the GIL",
    ("locking", "RwLock.write_lock"): "entry points for callers without the GIL",
    ("locking", "RwLock.write_unlock"): "entry points for callers without the GIL",
}
#: C memory management of extension types: no Python class needs it.
C_LIFECYCLE = {"__cinit__", "__dealloc__"}

_TOP = re.compile(r"^(?:cdef|cpdef|def)\b(?!\s+(?:class|struct|enum|extern)\b)[^=(]*?"
                  r"\b(\w+)\s*\(")
_METHOD = re.compile(r"^    (?:cdef|cpdef|def)\b[^=(]*?\b(\w+)\s*\(")
_TYPE = re.compile(r"^(?:cdef|ctypedef)\s+(class|struct|enum)\s+(\w+)\s*(:)?")
#: A C function declared in a ``cdef extern`` block under a Cython name: ``void f "c_f" (``.
_EXTERN = re.compile(r"^\s+[\w\s*]+?\b(\w+)\s+\"[^\"]+\"\s*\(")


def compiled_part(part: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(module functions, {class: methods}, struct and enum names) of a compiled part."""
    functions: set[str] = set()
    classes: dict[str, set[str]] = {}
    records: set[str] = set()
    for path in (COMPILED / f"{part}.pyx", COMPILED / f"{part}.pxd"):
        if not path.exists():
            continue
        current = None
        extern = False
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].rstrip()
            if extern and (function := _EXTERN.match(line)) is not None:
                functions.add(function.group(1))
            if line and not line[0].isspace():
                extern = line.startswith("cdef extern")
                current = None
                match = _TYPE.match(line)
                if match and match.group(1) == "class":
                    if match.group(3):           # a definition, not a forward declaration
                        current = classes.setdefault(match.group(2), set())
                elif match:
                    records.add(match.group(2))
                elif (function := _TOP.match(line)) is not None:
                    functions.add(function.group(1))
            elif current is not None and (method := _METHOD.match(line)) is not None:
                current.add(method.group(1))
    return functions, classes, records


def twin_part(part: str) -> tuple[set[str], dict[str, set[str]]]:
    """(module functions, {class: methods}) of a twin part."""
    tree = ast.parse((TWIN / f"{part}.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: {m.name for m in n.body if isinstance(m, ast.FunctionDef)}
               for n in tree.body if isinstance(n, ast.ClassDef)}
    return functions, classes


def parts(directory: Path, suffixes: tuple[str, ...]) -> set[str]:
    return {p.stem for p in directory.iterdir() if p.suffix in suffixes} - NOT_PARTS


def test_both_cores_have_the_same_parts():
    assert parts(COMPILED, (".pyx", ".pxd")) == parts(TWIN, (".py",))
    core = (PACKAGE / "_core.pyx").read_text() + (PACKAGE / "_core.pxd").read_text()
    for part in parts(COMPILED, (".pyx",)):
        assert f'include "_cy/{part}.pyx"' in core, part
    for part in parts(COMPILED, (".pxd",)):
        assert f'include "_cy/{part}.pxd"' in core, part


@pytest.mark.parametrize("part", sorted(parts(TWIN, (".py",))))
def test_a_part_has_the_same_functions_in_both_cores(part):
    c_functions, c_classes, c_records = compiled_part(part)
    py_functions, py_classes = twin_part(part)
    only_compiled = {f for f in c_functions - py_functions if (part, f) not in COMPILED_ONLY}
    assert not only_compiled, f"{part}: only in the compiled core: {sorted(only_compiled)}"
    assert not py_functions - c_functions, (
        f"{part}: only in the twin: {sorted(py_functions - c_functions)}")
    # Every extension type has a twin class; a twin class may stand for a C struct.
    assert set(c_classes) <= set(py_classes), part
    assert set(py_classes) <= set(c_classes) | c_records, (
        f"{part}: twin classes without a compiled class or struct: "
        f"{sorted(set(py_classes) - set(c_classes) - c_records)}")
    for name, methods in c_classes.items():
        twin_methods = py_classes[name]
        compiled = {m for m in methods - C_LIFECYCLE if (part, f"{name}.{m}") not in COMPILED_ONLY}
        if "__cinit__" in methods:          # the C constructor stands for __init__
            compiled.add("__init__")
        assert compiled == twin_methods, (
            f"{part}.{name}: only compiled {sorted(compiled - twin_methods)}, "
            f"only twin {sorted(twin_methods - compiled)}")


def test_the_compiled_only_helpers_exist():
    for part, name in COMPILED_ONLY:
        functions, classes, _ = compiled_part(part)
        if "." in name:
            cls, method = name.split(".")
            assert method in classes[cls], (part, name)
        else:
            assert name in functions, (part, name)


def test_the_checker_sees_cdef_cpdef_and_methods():
    functions, classes, records = compiled_part("tdp_mmu")
    assert {"tdp_mmu_map", "map_handle_target_level", "zap_all_fast",
            "handle_changed_spte"} <= classes["TdpMmu"]
    assert "LastSpte" in records
    functions, _, _ = compiled_part("memslots")
    assert {"gmem_frame", "record_slot"} <= functions


# --- layers ------------------------------------------------------------------------------------

_API_LAYER = ("_vm", "_select", "_invariants", "testing", "cli", "_demo", "_replay")


def _imports(text: str) -> set[str]:
    found = set()
    for match in re.finditer(r"^\s*(?:from\s+([\w.]+)\s+(?:c?import)|import\s+([\w.]+))",
                             text, re.MULTILINE):
        found.add(match.group(1) or match.group(2))
    for match in re.finditer(r"^\s*from\s+(\.+|kvmemu)\s+import\s+([\w, ]+)", text,
                             re.MULTILINE):
        found.update(f"{match.group(1)}.{name.strip()}" for name in match.group(2).split(","))
    return found


CORE_FILES = sorted(str(p.relative_to(PACKAGE)) for p in
                    [*COMPILED.iterdir(), *TWIN.iterdir(), PACKAGE / "_core.pyx",
                     PACKAGE / "_core.pxd", PACKAGE / "_memory.py", PACKAGE / "_tables.py"]
                    if p.suffix in (".py", ".pyx", ".pxd"))


@pytest.mark.parametrize("path", CORE_FILES)
def test_no_core_imports_the_api_layer(path):
    """The cores and the written-once bookkeeping sit below the API layer."""
    for module in _imports((PACKAGE / path).read_text()):
        assert module.rsplit(".", 1)[-1] not in _API_LAYER, f"{path} imports {module}"


def test_the_import_check_sees_an_api_import():
    assert "._vm" in _imports("from ._vm import VM\n") or "_vm" in {
        m.rsplit(".", 1)[-1] for m in _imports("from ._vm import VM\n")}
    assert {m.rsplit(".", 1)[-1] for m in _imports("from .. import _vm, _args\n")} >= {"_vm"}
