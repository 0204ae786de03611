"""Snapshots as bytes: a versioned format that travels between processes and machines.

A snapshot's bytes are ``MAGIC``, the format version (u32, little-endian) and a
numpy ``.npz`` archive (zip, compressed) holding:

* ``meta``: UTF-8 JSON, every scalar of the state: the VM's creation arguments
  (``vm``), the VM counters, the memslots (their fields), the guest_memfd files and
  their bindings, the closed and invalid sets, the quirks, the MMU's leaf counts and
  nx_huge_page_disallowed tables, and each vCPU's state (kvm_run, the MMIO cache,
  the PML log, the statistics, run.hypercall);
* arrays: each memslot's lpage_info (``slot<i>_lpage<k>``, uint32) and dirty bitmap
  (``slot<i>_dirty``, uint64), the attribute ranges (``attributes``, (n, 3) uint64:
  start gfn, end gfn, attributes), each guest_memfd file's non-zero frame states
  (``frames<i>``, (n, 2) uint64: page, FrameState), and each root's tables and free
  list (``root<r>_tables``, (n, 512) uint64; ``root<r>_free``, int64).

Nothing in it is unpickled or executed: ``np.load`` runs with ``allow_pickle=False``
and ``meta`` is JSON.  A blob that is not one (another magic, a version this code
does not read, a broken archive, a missing or ill-typed field, values out of range,
or a state whose tables break ``VM.check_invariants``) raises ValueError.  Both
cores read and write the same bytes, so a snapshot of the compiled core restores
into the twin and back.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import zipfile
from typing import Any

import numpy as np

from ._memory import GmemBindings, Slot, VMMemory

MAGIC = b"KVMEMU-SNAPSHOT\n"
#: numpy parses an .npy header with ast.literal_eval, and CPython 3.11's ast module
#: fails when two threads use it at once (SystemError: AST constructor recursion depth
#: mismatch): snapshots are read one at a time.
_NPY_LOCK = threading.Lock()
VERSION = 1
_HEADER = struct.Struct("<I")

_SLOT_FIELDS = ("as_id", "id", "base_gfn", "npages", "flags", "userspace_addr", "gmem_id",
                "gmem_pgoff", "host_level", "gmem_closed")
_HYPERCALL_FIELDS = ("nr", "args", "ret", "flags", "pending", "map_gpa_next", "map_gpa_end",
                     "psc")


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples the state holds (run.hypercall's fields)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def export_memory(memory: VMMemory) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The memory state as JSON-able scalars and named arrays."""
    arrays: dict[str, np.ndarray] = {}
    slots: list[dict[str, Any]] = []
    for as_id in range(memory.nr_as_ids):
        for slot in memory.slots(as_id):
            i = len(slots)
            slots.append({name: getattr(slot, name) for name in _SLOT_FIELDS}
                         | {"lpage": len(slot.lpage), "dirty": slot.dirty_bitmap is not None})
            for k, linfo in enumerate(slot.lpage):
                arrays[f"slot{i}_lpage{k}"] = np.asarray(linfo, dtype=np.uint32)
            if slot.dirty_bitmap is not None:
                arrays[f"slot{i}_dirty"] = np.asarray(slot.dirty_bitmap, dtype=np.uint64)
    arrays["attributes"] = np.array(memory.attribute_ranges(), dtype=np.uint64).reshape(-1, 3)
    roots = []
    for r, root in enumerate(memory.mmu.roots()):
        arrays[f"root{r}_tables"], arrays[f"root{r}_free"] = root.pt.export_tables()
        roots.append({"disallowed": [int(t) for t in root.disallowed_tables()]})
    meta = {"counters": [int(c) for c in memory.counters], "slots": slots,
            "invalid": sorted([list(k) for k in memory._invalid]),
            "disabled_quirks": int(memory.disabled_quirks),
            "manual_dirty_log_protect": int(memory.manual_dirty_log_protect),
            "gmem_closed_files": sorted(memory.gmem_closed_files),
            "mmu": {"pages": [int(p) for p in memory.mmu.pages], "roots": roots,
                    "skip_stale_check": bool(memory.mmu.skip_stale_check)}}
    return meta, arrays


def export_frames(memory: VMMemory, files: int) -> dict[str, np.ndarray]:
    """Each guest_memfd file's non-zero frame states."""
    return {f"frames{i}": np.array(memory.memslots.frame_items(i), dtype=np.uint64).reshape(-1, 2)
            for i in range(files)}


def import_memory(core: Any, config: Any, meta: dict[str, Any], arrays: Any,
                  gmem: list[tuple[int, int, bool]]) -> VMMemory:
    """A VMMemory of ``core`` and ``config`` holding the exported state (raises on a
    malformed one: the caller turns that into ValueError)."""
    memory = VMMemory(core, config)
    if len(meta["counters"]) != len(memory.counters):
        raise ValueError("the VM counters have another length")
    memory.counters[:] = np.array(meta["counters"], dtype=np.uint64)
    memory.disabled_quirks = int(meta["disabled_quirks"])
    memory.manual_dirty_log_protect = int(meta["manual_dirty_log_protect"])
    memory.gmem_closed_files = {int(i) for i in meta["gmem_closed_files"]}
    memory._invalid = {(int(a), int(b)) for a, b in meta["invalid"]}
    for index, (size, _flags, _closed) in enumerate(gmem):
        memory.memslots.add_gmem_file(index, size >> 12)
    for i, fields in enumerate(meta["slots"]):
        values = [int(fields[name]) for name in _SLOT_FIELDS[:-1]]
        slot = Slot(*values)
        if not 0 <= slot.as_id < memory.nr_as_ids or slot.id in memory._slots[slot.as_id]:
            raise ValueError("a memslot of no address space, or twice")
        slot.gmem_closed = bool(fields["gmem_closed"])
        memory._alloc_metadata(slot)
        for k in range(int(fields["lpage"])):
            linfo = arrays[f"slot{i}_lpage{k}"]
            if linfo.dtype != np.uint32 or linfo.shape != slot.lpage[k].shape:
                raise ValueError("an lpage_info array of another shape")
            slot.lpage[k][:] = linfo
        if fields["dirty"]:
            bitmap = arrays[f"slot{i}_dirty"]
            if bitmap.dtype != np.uint64 or bitmap.shape != ((slot.npages + 63) // 64,):
                raise ValueError("a dirty bitmap of another shape")
            slot.dirty_bitmap = bitmap.copy()
        memory._slots[slot.as_id][slot.id] = slot
    for as_id in range(memory.nr_as_ids):
        memory._reindex(as_id)
    memory._publish_slots(synchronize=False)
    attributes = arrays["attributes"]
    if attributes.dtype != np.uint64 or attributes.ndim != 2 or attributes.shape[1] != 3:
        raise ValueError("attribute ranges of another shape")
    for start, end, attrs in attributes.tolist():
        if not start < end or attrs & ~memory.supported_attributes:
            raise ValueError("an empty attribute range, or unsupported attributes")
        memory.memslots.store_attributes(start, end, attrs)
    for index in range(len(gmem)):
        frames = arrays[f"frames{index}"]
        if frames.dtype != np.uint64 or frames.ndim != 2 or frames.shape[1] != 2:
            raise ValueError("frame states of another shape")
        base, pages = memory.memslots.gmem_base, memory.memslots.gmem_file_pages
        for page, state in frames.tolist():
            if page >= gmem[index][0] >> 12:
                raise ValueError("a frame state beyond its file")
            memory.memslots.set_frame(core.gmem_frame(base, pages, index, page), state)
    mmu = memory.mmu
    roots = mmu.roots()
    if len(meta["mmu"]["roots"]) != len(roots):
        raise ValueError("another number of roots")
    for r, (root, fields) in enumerate(zip(roots, meta["mmu"]["roots"])):
        root.pt.load_tables(arrays[f"root{r}_tables"], arrays[f"root{r}_free"])
        root.load_disallowed([int(t) for t in fields["disallowed"]])
    pages = [int(p) for p in meta["mmu"]["pages"]]
    if len(pages) != 4 or min(pages) < 0:
        raise ValueError("leaf counts of another shape")
    mmu.load_pages(pages)
    mmu.skip_stale_check = bool(meta["mmu"]["skip_stale_check"])
    return memory


def export_vcpu(state: Any) -> dict[str, Any]:
    fields = state.export()
    fields["hypercall"] = [getattr(state.hypercall, name) for name in _HYPERCALL_FIELDS]
    return fields


def import_vcpu(state: Any, fields: dict[str, Any], hypercall_type: Any) -> None:
    state.load(fields)
    values = [_tuples(v) for v in fields["hypercall"]]
    if len(values) != len(_HYPERCALL_FIELDS):
        raise ValueError("run.hypercall of another shape")
    state.hypercall = hypercall_type(*values)


def encode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of a snapshot: the same state gives the same bytes (sorted JSON keys,
    the arrays in name order, fixed zip timestamps), whichever core wrote them."""
    buffer = io.BytesIO()
    blob = np.frombuffer(json.dumps(meta, separators=(",", ":"), sort_keys=True).encode(),
                         dtype=np.uint8)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in [("meta", blob), *sorted(arrays.items())]:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array),
                                          allow_pickle=False)
    return MAGIC + _HEADER.pack(VERSION) + buffer.getvalue()


def decode(data: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The meta and arrays of a snapshot's bytes; ValueError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise ValueError("not a kvmemu snapshot (no snapshot header)")
    if len(data) < len(MAGIC) + _HEADER.size:
        raise ValueError("a truncated kvmemu snapshot")
    (version,) = _HEADER.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise ValueError(f"a kvmemu snapshot of format {version}; this kvmemu reads "
                         f"format {VERSION}")
    try:
        with _NPY_LOCK, np.load(io.BytesIO(data[len(MAGIC) + _HEADER.size:]),
                                allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError,
            AttributeError, TypeError) as exc:
        raise ValueError(f"a corrupt kvmemu snapshot: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError("a corrupt kvmemu snapshot: its meta is not an object")
    return meta, arrays


def gmem_files(meta: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """(size, flags, closed) of each guest_memfd file."""
    return [(int(size), int(flags), bool(closed)) for size, flags, closed in meta["gmem"]]


def bindings(meta: dict[str, Any]) -> dict[int, GmemBindings]:
    out: dict[int, GmemBindings] = {}
    for index, entries in enumerate(meta["bindings"]):
        b = GmemBindings()
        for as_id, slot_id, first, stop in entries:
            b.add((int(as_id), int(slot_id)), int(first), int(stop))
        out[index] = b
    return out
