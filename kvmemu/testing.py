"""Differential execution of kvmemu call sequences on both cores (the test harness).

A call sequence is a list of operations, plain tuples such as
``("slot", slot, gpa, size, uaddr, flags, gmem, offset, host_level)``.
``Twin`` applies each operation to the compiled core and to the pure-Python
twin and raises ``Divergence`` when they differ in anything observable: the
result or the exception (type, errno, message), then the VM state (stats,
every vCPU's ``run``, memslots, attributes, lpage_info, invalidation and
generation counters, the page-table storage), and when
``vm.check_invariants()`` reports a problem on either side.

``decode(data)`` turns arbitrary bytes into such a list, so a byte fuzzer
(``fuzz/fuzz_api.py``, atheris), the corpus replay test and the determinism
test share one decoder; the Hypothesis state machine
(``tests/test_state_machine.py``) builds the same operations from strategies.
``main`` replays inputs or runs random ones without atheris
(``python -m kvmemu.testing``).  Nothing here needs atheris or pytest.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from functools import partial
from typing import Any, Callable

import numpy as np

from kvmemu import _select
from kvmemu import _invariants
from kvmemu._host import Host
from kvmemu._vm import VM, GuestMemfd, MemSlot, Snapshot
from kvmemu.constants import PG_LEVEL_1G, PG_LEVEL_2M
from kvmemu.errors import KvmError
from kvmemu.results import AccessBatch

CORES = (_select.load("cython"), _select.load("python"))
MIB, GIB = 1 << 20, 1 << 30
U64_MAX = (1 << 64) - 1


class Divergence(AssertionError):
    """The two cores disagreed, or an invariant failed."""


# --- observing ----------------------------------------------------------------------------

def norm(value: Any) -> Any:
    """A comparable, printable form of what a call returned (no object identities)."""
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, value.tolist())
    if isinstance(value, AccessBatch):
        return ("batch", value.count, norm(value.hpa), norm(value.level), norm(value.exit))
    if isinstance(value, MemSlot):
        return tuple(norm(v) for v in value)
    if isinstance(value, (GuestMemfd, Snapshot)) or type(value).__name__ in ("VCPU", "VM",
                                                                            "PageTables"):
        return (type(value).__name__, repr(value))
    if isinstance(value, Enum):
        return (type(value).__name__, value.value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [norm(v) for v in value])
    if isinstance(value, dict):
        return sorted((k, norm(v)) for k, v in value.items())
    return (type(value).__name__, repr(value))


def outcome(call: Callable[[], Any]) -> Any:
    """What a call gives: its normalized result, or the exception's type, errno and message."""
    try:
        return norm(call())
    except Exception as exc:   # noqa: BLE001 - both cores must fail alike
        return ("raised", type(exc).__name__, getattr(exc, "errno", None), str(exc))


def vm_state(side: "Side") -> Any:
    """Everything observable about a side's VM, in comparable form."""
    vm = side.vm
    if vm is None:
        return None
    slots = vm.memslots
    lpage = [outcome(partial(vm.lpage_info, s.slot, lv))
             for s in slots for lv in range(PG_LEVEL_2M, PG_LEVEL_1G + 1)]
    private = vm.private_page_tables
    return {
        "vm": repr(vm),
        "stats": vm.stats,
        "vcpus": [outcome(partial(_vcpu_state, v)) for v in side.vcpus],
        "memslots": [norm(s) for s in slots],
        "attributes": vm.memory_attribute_ranges(),
        "lpage_info": lpage,
        "invalidate": (vm.mmu_invalidate_seq, vm.mmu_invalidate_in_progress,
                       vm.mmu_invalidate_range),
        "generations": [vm.memslots_generation(a) for a in range(vm.nr_memslot_as_ids)],
        "disabled_quirks": int(vm.disabled_quirks),
        "dirty_logs": (int(vm.manual_dirty_log_protect), _dirty_bitmaps(vm)),
        "tables": _tables(vm.page_tables),
        "private_tables": None if private is None else _tables(private),
        "launch": (vm.launched, vm.pre_fault_allowed, vm.dead),
        "frames": [vm._memory.memslots.frame_items(g.index) for g in side.gmems],
    }


@contextmanager
def writable(tables: Any) -> Any:
    """Let ``set_entry`` write a VM's tables inside the block, which KVM alone writes
    otherwise: for tests of ``check_invariants``, which must see what KVM never would."""
    tables._set_kvm_owned(False)
    try:
        yield tables
    finally:
        tables._set_kvm_owned(True)


def _dirty_bitmaps(vm: Any) -> list[Any]:
    """Each memslot's dirty bitmap, read in place (KVM_GET_DIRTY_LOG would clear it)."""
    memory = vm._memory
    return [None if (bitmap := memory.slot_by_id(s.slot >> 16, s.slot & 0xFFFF).dirty_bitmap)
            is None else bitmap.tolist() for s in vm.memslots]


def _vcpu_state(vcpu: Any) -> Any:
    return (vcpu.run.exit_reason, vcpu.run.memory_fault, vcpu.run.mmio, vcpu.run.hypercall,
            vcpu.stats, vcpu.interrupt_pending)


def _tables(pt: Any) -> tuple[Any, bytes]:
    t = pt.tables
    return t.shape, t.tobytes()


# --- running ------------------------------------------------------------------------------

class InvariantChecker:
    """``vm.check_invariants()``, incrementally: the first ``check()`` judges every table
    of ``vm``; each later one re-judges only the tables whose entries changed since, or
    that lie where another input of the judgements changed (memslots, attribute ranges,
    lpage_info, dirty bitmaps, guest_memfd frame states).  Same violations as
    ``vm.check_invariants()``; ``judged`` is how many tables the last check judged."""

    def __init__(self, vm: Any) -> None:
        if not isinstance(vm, VM):
            raise TypeError(f"InvariantChecker needs a kvmemu VM, not {type(vm).__name__}")
        self.vm = vm
        self._checker = _invariants.Checker()

    @property
    def judged(self) -> int:
        return self._checker.judged

    def check(self) -> list[str]:
        with self.vm._lock:
            problems: list[str] = self.vm._check_with(self._checker)
        return problems


class Side:
    """One core's objects: the current VM, its vCPUs and guest_memfds, snapshots (of any
    VM made so far), standalone PageTables."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.vm: Any = None
        #: The current VM's invariant checker (made on first use).
        self.checker: InvariantChecker | None = None
        self.vcpus: list[Any] = []
        self.gmems: list[Any] = []
        self.snapshots: list[Any] = []
        self.tables: list[Any] = []
        #: What the current VM's on_zap reported during the current step.
        self.zaps: list[tuple[Any, ...]] = []

    def watch(self, vm: Any, on: bool) -> None:
        """Record ``vm``'s on_zap calls (or stop)."""
        vm.on_zap = (lambda *args: self.zaps.append(args)) if on else None


def _pick(items: list[Any], ref: Any) -> Any:
    """``items[ref % len]`` for an int ref; any other ref is passed through as is (a wrong
    type the API must reject)."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        return items[ref % len(items)] if items else None
    return ref


def _fresh(value: Any) -> Any:
    """Each side gets its own copy of array arguments (a call may write to ``out``)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value


def _memory_op(side: Side, op: tuple) -> Any:
    """The ioctls (memslots, guest_memfd, attributes); also run from stage hooks."""
    vm, kind = side.vm, op[0]
    if kind == "gmem":
        gmem = vm.create_guest_memfd(op[1], op[2])
        side.gmems.append(gmem)
        return gmem
    if kind == "slot":
        _, slot, gpa, size, uaddr, flags, gmem, offset, host_level = op
        return vm.set_user_memory_region(
            slot=slot, guest_phys_addr=gpa, memory_size=size, userspace_addr=uaddr,
            flags=flags, guest_memfd=_pick(side.gmems, gmem), guest_memfd_offset=offset,
            host_level=host_level)
    if kind == "dirty":     # toggle a flag of an existing slot, keeping the rest
        slots = vm.memslots
        if not slots:
            return None
        s = slots[op[1] % len(slots)]
        return vm.set_user_memory_region(
            slot=s.slot, guest_phys_addr=op[2] if op[2] is not None else s.guest_phys_addr,
            memory_size=s.memory_size, userspace_addr=s.userspace_addr,
            flags=s.flags ^ op[3], guest_memfd=s.guest_memfd,
            guest_memfd_offset=s.guest_memfd_offset, host_level=s.host_level)
    if kind == "attrs":
        return vm.set_memory_attributes(*op[1:])
    if kind == "host_inval":    # an MMU-notifier invalidation, begun and ended
        handle = vm.invalidate_host_range(op[1], op[2])
        handle.end()
        return handle
    if kind == "host_level":
        return vm.set_host_level(op[1], op[2])
    if kind == "punch":
        gmem = _pick(side.gmems, op[1])
        return None if gmem is None else gmem.punch_hole(op[2], op[3])
    if kind == "gmem_close":
        gmem = _pick(side.gmems, op[1])
        return None if gmem is None else gmem.close()
    raise ValueError(f"not a memory operation: {kind!r}")


MEMORY_OPS = ("gmem", "slot", "dirty", "attrs", "host_inval", "host_level", "punch",
              "gmem_close")


def _one_shot_hook(side: Side, stage: str, op: tuple) -> Callable[[str], None]:
    fired: list[Any] = []

    def hook(name: str) -> None:
        if name == stage and not fired:
            fired.append(outcome(lambda: _memory_op(side, op)))
    return hook


def _run(side: Side, op: tuple) -> Any:
    core, kind, args = side.core, op[0], op[1:]
    if kind == "vm":
        vm_type, vendor, gpaw, nx = args[:4]
        host = args[5] if len(args) > 5 else None
        vm = core.VM(vm_type, vendor=vendor, gpaw=gpaw, nx_huge_pages=nx,
                     eager_page_split=args[4] if len(args) > 4 else True,
                     host=None if host is None else Host(**host))
        side.vm, side.vcpus, side.gmems = vm, [], []
        side.watch(vm, True)
        return vm
    if kind == "vmx_ec":
        return core.vmx_error_code(*args[:3], out=args[3])
    if kind == "svm_ec":
        return core.svm_error_code(*args[:2], out=args[2])
    if kind == "tdx_bit":
        return core.tdx_shared_bit(args[0])
    if kind == "pt":
        pt = core.PageTables(args[0], args[1], **args[2])
        side.tables.append(pt)
        return pt
    if kind.startswith("pt_"):
        pt = _pick(side.tables, args[0])
        if pt is None:
            return None
        return getattr(pt, kind[3:])(*args[1:-1], **args[-1])
    if side.vm is None:
        return None
    vm = side.vm
    if kind in MEMORY_OPS:
        return _memory_op(side, op)
    if kind == "get_attrs":
        return vm.get_memory_attributes(args[0])
    if kind == "find":
        return vm.find_memslot(args[0])
    if kind == "find_many":
        return vm.find_memslots(args[0])
    if kind == "lpage":
        return vm.lpage_info(*args)
    if kind == "disable_quirks":
        return vm.disable_quirks(args[0])
    if kind == "exit_hypercall":
        return vm.enable_exit_hypercall(args[0])
    if kind == "manual_protect":
        return vm.enable_manual_dirty_log_protect(args[0])
    if kind == "get_dirty_log":
        return vm.get_dirty_log(args[0])
    if kind == "clear_dirty_log":
        return vm.clear_dirty_log(*args)
    if kind == "on_zap":
        side.watch(vm, args[0])
        return None
    if kind == "vcpu":
        vcpu = vm.create_vcpu()
        side.vcpus.append(vcpu)
        return vcpu
    if kind == "tdx_init":
        return vm.tdx_init_mem_region(*args)
    if kind == "tdx_finalize":
        return vm.tdx_finalize_vm()
    if kind == "snp_update":
        return vm.snp_launch_update(*args)
    if kind == "snp_finish":
        return vm.snp_launch_finish()
    if kind == "rmp":
        return vm.rmp_entry(args[0])
    if kind == "snapshot":
        snap = vm.snapshot()
        side.snapshots.append(snap)
        return snap
    if kind == "restore":
        return vm.restore(_pick(side.snapshots, args[0]))
    if kind == "restore_bytes":      # the snapshot travels: bytes, then a VM made from it
        snap = _pick(side.snapshots, args[0])
        if not isinstance(snap, Snapshot):
            return vm.restore(snap)             # the TypeError restore gives
        travelled = type(snap).from_bytes(snap.to_bytes())
        if args[1]:
            side.vm = vm = type(vm).from_snapshot(travelled)
            side.vcpus = list(vm._vcpus)
            side.watch(vm, True)
            return None
        return vm.restore(travelled)
    vcpu = _pick(side.vcpus, args[0])
    if vcpu is None:
        return None
    if kind == "hook":
        vcpu.stage_hook = _one_shot_hook(side, args[1], args[2])
        return None
    if kind == "access":
        return vcpu.access(args[1], **args[2])
    if kind == "access_many":
        return vcpu.access_many(args[1], args[2])
    if kind == "pre_fault":
        return vcpu.pre_fault_memory(*args[1:])
    if kind == "hypercall":
        return vcpu.hypercall(*args[1:])
    if kind == "complete_hypercall":
        return vcpu.complete_hypercall(args[1])
    if kind == "map_gpa":
        return vcpu.tdvmcall_map_gpa(args[1], args[2])
    if kind == "psc":
        return vcpu.snp_page_state_change(args[1])
    if kind == "psc_msr":
        return vcpu.snp_psc_msr(args[1], args[2])
    if kind == "ept_violation":
        return vcpu.handle_ept_violation(*args[1:])
    if kind == "irq":
        vcpu.interrupt_pending = args[1]
        return None
    if kind == "pvalidate":
        return vcpu.pvalidate(*args[1:])
    if kind == "accept":
        return vcpu.tdx_accept(*args[1:])
    if kind == "ept_misconfig":
        return vcpu.handle_ept_misconfig(args[1])
    if kind == "npf":
        return vcpu.handle_npf(args[1], args[2])
    raise ValueError(f"unknown operation {kind!r}")


class Twin:
    """The same operations on both cores, compared after every one."""

    def __init__(self, check_state: bool = True) -> None:
        self.sides = [Side(core) for core in CORES]
        self.check_state = check_state
        self.steps = 0

    def apply(self, op: tuple) -> Any:
        results = []
        for side in self.sides:
            fresh = tuple(_fresh(a) for a in op)
            side.zaps = []
            results.append((outcome(lambda: _run(side, fresh)), side.zaps))
        self.steps += 1
        if results[0] != results[1]:
            raise Divergence(f"step {self.steps} {op!r}:\n  cython: {results[0]!r}\n"
                             f"  python: {results[1]!r}")
        if self.check_state:
            self.check()
        return results[0][0]

    def check(self) -> None:
        """Same state on both sides, and no invariant broken on either (judged by an
        InvariantChecker per VM; every 8th step also from scratch, which must agree)."""
        states = [vm_state(side) for side in self.sides]
        if states[0] != states[1]:
            a, b = states
            keys = [k for k in a if a[k] != b[k]] if a and b else ["vm"]
            raise Divergence(f"after step {self.steps}: state differs in {keys}")
        for side in self.sides:
            if side.vm is not None:
                if side.checker is None or side.checker.vm is not side.vm:
                    side.checker = InvariantChecker(side.vm)
                problems = side.checker.check()
                if self.steps % 8 == 0 and problems != side.vm.check_invariants():
                    raise Divergence(f"after step {self.steps}, {side.core.__name__}: the "
                                     "incremental invariant check differs from the full one")
                if problems:
                    raise Divergence(f"after step {self.steps}, {side.core.__name__}: "
                                     f"invariants broken: {problems[:5]}")


def run_ops(ops: list[tuple], check_state: bool = True) -> Twin:
    twin = Twin(check_state)
    for op in ops:
        twin.apply(op)
    return twin


# --- decoding bytes -------------------------------------------------------------------------

GPAS = (0, 0x1000, 0x2000, 0x1FF000, 2 * MIB, 2 * MIB + 0x1000, 4 * MIB, 0x123456,
        GIB, GIB + 0x1000, GIB + 0x123000, 2 * GIB, 2 * GIB + 0x5000, 3 * GIB,
        1 << 36, (1 << 36) - 0x1000, 1 << 47, (1 << 47) | 0x1000, (1 << 47) | GIB,
        1 << 51, (1 << 51) | 0x2000, 1 << 48, 1 << 52, 1 << 56, 1 << 57, U64_MAX)
SIZES = (0, 0x1000, 0x2000, 0x3000, 2 * MIB, 4 * MIB, GIB, GIB + 2 * MIB, 2 * GIB,
         0x1001, 0x800, 1 << 40, 1 << 63, U64_MAX & ~0xFFF, (1 << 64) - 0x1000)
UADDRS = (1 << 40, (1 << 40) + 0x1000, (1 << 40) + 2 * MIB, 0x7F0000000000, 0, 0x1234,
          (1 << 47) - 0x1000, 1 << 47, U64_MAX & ~0xFFF)
SLOTS = (0, 1, 2, 3, 0, 1, 1 << 16, (1 << 16) | 1, 2 << 16, 32764, 32767, 0xFFFF,
         (1 << 32) - 1, 1 << 32)
SLOT_FLAGS = (0, 0, 1, 2, 3, 4, 4, 5, 6, 8, 1 << 31, 1 << 32)
GMEM_FLAGS = (0, 1, 2, 3, 4, 1 << 63)
OFFSETS = (0, 0x1000, 2 * MIB, GIB, 0x800, 1 << 63, U64_MAX & ~0xFFF)
QUALS = (0x181, 0x182, 0x184, 0x189, 0x18A, 0x19C, 0x1BC, 0x83, 0x1, 0x2, 0x4, 0x0, 0x3F,
         0x1181, 0x40, 0x7FF)
INFOS = (0x100000004, 0x100000005, 0x100000006, 0x100000007, 0x200000007, 0x500000004,
         0x500000006, 0x10, 0x11, 0x14, 0x9, 0x100000008, 1 << 31, 1 << 35, 1 << 48, 0)
SNAPSHOT_REFS = (0, 1, 2, -1, 5)
# Values of the wrong kind: every entry point must reject them the same way, cleanly.
WEIRD = (-1, 1 << 64, -(1 << 63), 1.0, 2.5, "0x1000", None, True, b"\0", [0],
         np.int64(-1), np.int64(0x1000), np.uint32(0x1000), np.float64(4096.0), np.bool_(True),
         np.array([0x1000], dtype=np.uint64), np.uint64(U64_MAX), object())


class Reader:
    """Bytes as a stream of choices; zeros once the bytes run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def pick(self, options: tuple) -> Any:
        return options[self.byte() % len(options)]

    def raw64(self) -> int:
        chunk = self.data[self.pos:self.pos + 8]
        self.pos += 8
        return int.from_bytes(chunk.ljust(8, b"\0"), "little")

    def value(self, pool: tuple) -> Any:
        """Mostly a pool value; now and then raw bits or a value of the wrong kind."""
        b = self.byte()
        if b < 0xF0:
            return pool[b % len(pool)]
        if b < 0xF8:
            return self.raw64()
        return self.pick(WEIRD)

    def boolean(self) -> Any:
        b = self.byte()
        return bool(b & 1) if b < 0xF8 else self.pick(WEIRD)


def _access_kwargs(r: Reader) -> dict:
    bits = r.byte()
    kwargs: dict = {}
    for i, name in enumerate(("write", "fetch", "user", "encrypted")):
        if bits >> i & 1:
            kwargs[name] = r.boolean() if bits >> 7 else True
    if bits >> 4 & 3:
        kwargs["stage"] = ("final", "walk", "nogva")[(bits >> 4 & 3) - 1] if bits >> 6 & 1 == 0 \
            else r.pick(("final", "walk", "nogva", "bogus", None, 1))
    return kwargs


def _gpa_array(r: Reader) -> Any:
    n = r.byte() % 9
    values = [r.pick(GPAS) + r.pick((0, 0, 0x10, 0xFFF)) for _ in range(n)]
    values = [v & U64_MAX for v in values]
    shape = r.byte()
    if shape < 0xF0:
        return np.array(values, dtype=np.uint64)
    return r.pick((np.array(values, dtype=np.int64) if all(v < 1 << 63 for v in values)
                   else np.array(values, dtype=np.float64),
                   np.array(values, dtype=np.uint64).reshape(1, -1), values,
                   np.array(values + values, dtype=np.uint64)[::2], None))


def _flags_for(r: Reader, n: int) -> Any:
    b = r.byte()
    if b < 0x80:
        return b & 0x3F
    if b < 0xF0:
        return np.array([r.byte() & 0x3F for _ in range(n)], dtype=np.uint8)
    return r.pick((np.zeros(n, dtype=np.int64), np.zeros(n + 1, dtype=np.uint8),
                   np.zeros((1, n), dtype=np.uint8), 64, -1, 1.0, np.full(n, 0x43, np.uint8)))


def _out_for(r: Reader, n: int) -> Any:
    b = r.byte() % 8
    return (None, None, None, np.zeros(n, dtype=np.uint64), np.zeros(n + 1, dtype=np.uint64),
            np.zeros(n, dtype=np.int64), np.zeros((n, 1), dtype=np.uint64),
            np.zeros(2 * n, dtype=np.uint64)[::2])[b]


def _scalar_or_array(r: Reader, pool: tuple, n: int) -> Any:
    if r.byte() & 1:
        return r.value(pool)
    return np.array([r.pick(pool) for _ in range(n)], dtype=np.uint64)


def _memory(r: Reader, kind: str) -> tuple:
    if kind == "gmem":
        return ("gmem", r.value(SIZES), r.value(GMEM_FLAGS))
    if kind == "slot":
        gpa = r.value(GPAS)
        return ("slot", r.value(SLOTS), gpa, r.value(SIZES),
                r.value(UADDRS) if r.byte() & 3 else (1 << 40) + (gpa if isinstance(gpa, int)
                                                                  and gpa < 1 << 46 else 0),
                r.value(SLOT_FLAGS), r.pick((None, 0, 1, 2, -1, "gmem")), r.value(OFFSETS),
                r.value((1, 2, 3, 1, 0, 4)))
    if kind == "dirty":
        return ("dirty", r.byte(), r.pick((None, None, 0, 2 * MIB, GIB, 3 * GIB)),
                r.pick((1, 1, 2, 4)))
    return ("attrs", r.value(GPAS), r.value(SIZES), r.value((0, 8, 8, 1, 9, 16)),
            r.value((0, 0, 0, 1)))


def _valid_slot(r: Reader, gmem_count: int) -> list[tuple]:
    """A memslot KVM accepts (mostly): a guest_memfd for it first when it wants one."""
    b = r.byte()
    gpa = (0, 2 * MIB, GIB, 2 * GIB)[b & 3]
    size = (2 * MIB, 4 * MIB, GIB, 0x3000)[b >> 2 & 3]
    host_level = 1 + (b >> 4 & 3) % 3
    ops: list[tuple] = []
    flags = (0, 0, 1, 2)[b >> 6]
    if r.byte() & 1:
        ops.append(("gmem", size + 2 * MIB, r.pick((0, 0, 1))))
        flags, gmem_count = 4, gmem_count + 1
    slot = r.byte() % 4
    ops.append(("slot", slot, gpa, size, (1 << 40) + gpa + r.pick((0, 0, 0x1000)), flags,
                gmem_count - 1, r.pick((0, 2 * MIB, 0x1000)), host_level))
    return ops


def _vm_op(r: Reader) -> tuple:
    return ("vm", r.value((0, 1, 2, 3, 4, 5, 0, 1, 4, 5, 6)),
            r.value((None, None, None, "vmx", "svm", "arm")), r.value((48, 52, 48, 47)),
            r.boolean())


def _op(r: Reader) -> tuple:
    code = r.byte() % 27
    if code == 0:
        return _vm_op(r)
    if code in (1, 2, 3):
        return _memory(r, ("gmem", "slot", "slot")[code - 1])
    if code == 4:
        return _memory(r, "dirty")
    if code in (5, 6):
        return _memory(r, "attrs")
    if code == 7:
        return ("vcpu",)
    if code in (8, 9, 10, 11):
        gpa = r.value(GPAS) if r.byte() & 3 else r.pick(GPAS) + r.pick((0x10, 0xFFF, 0x234))
        return ("access", r.byte(), gpa, _access_kwargs(r))
    if code == 12:
        gpas = _gpa_array(r)
        return ("access_many", r.byte(), gpas, _flags_for(r, len(gpas) if hasattr(gpas, "__len__")
                                                          else 1))
    if code in (13, 14):
        return ("ept_violation", r.byte(), r.value(GPAS), r.value(QUALS))
    if code == 15:
        return ("ept_misconfig", r.byte(), r.value(GPAS))
    if code == 16:
        return ("npf", r.byte(), r.value(GPAS), r.value(INFOS))
    if code == 17:
        return ("snapshot",)
    if code == 18:
        if r.byte() & 3 == 0:
            return ("restore_bytes", r.value(SNAPSHOT_REFS), r.boolean())
        return ("restore", r.value(SNAPSHOT_REFS))
    if code == 19:
        stage = r.pick(("fault", "faultin", "map"))
        return ("hook", r.byte(), stage, _memory(r, r.pick(("attrs", "attrs", "slot", "dirty"))))
    if code == 20:
        return r.pick((("get_attrs", r.value(GPAS)), ("find", r.value(GPAS)),
                       ("find_many", _gpa_array(r)), ("lpage", r.value(SLOTS),
                                                      r.value((2, 3, 1, 4)))))
    if code == 21:
        n = r.byte() % 5
        return ("vmx_ec", _scalar_or_array(r, QUALS, n), _scalar_or_array(r, GPAS, n),
                r.value((0, 1 << 47, 1 << 51, 0)), _out_for(r, n))
    if code == 22:
        n = r.byte() % 5
        return r.pick((("svm_ec", _scalar_or_array(r, INFOS, n), r.boolean(), _out_for(r, n)),
                       ("tdx_bit", r.value((48, 52, 47, 53, 0)))))
    if code == 23:
        options = {}
        for name in ("ad_bits", "exec_only", "mbec", "huge_1g", "host_nx", "host_smep"):
            if r.byte() & 1:
                options[name] = r.boolean()
        if r.byte() & 1:
            options["maxphyaddr"] = r.value((52, 48, 46, 39, 36, 35, 53))
        return ("pt", r.value(("ept", "npt", "ept", "npt", "nested")), r.value((4, 5, 4, 3)),
                options)
    if code == 24:
        return ("pt_set_entry", r.byte(), r.value(GPAS), r.value((1, 2, 3, 4, 5, 0, 6)),
                r.value((0x7, 0x87, 0xABC000 | 0x37, 0x3, 0x2, 0x4, 0xE7, 0x1 | 0x80,
                         1 << 51 | 0x7, 0x8000000000000007)), {})
    if code == 26:                      # the confidential lifecycle
        gpa, size = r.value(GPAS), r.value((0x1000, 0x3000, 2 * MIB, 0, 0x800))
        return r.pick((("tdx_init", gpa, size, r.boolean()), ("tdx_finalize",),
                       ("snp_update", gpa, size, r.value((1, 3, 2))), ("snp_finish",),
                       ("pvalidate", r.byte(), gpa, r.value((1, 2, 1)), r.boolean()),
                       ("accept", r.byte(), gpa, r.value((1, 2, 3))),
                       ("irq", r.byte(), r.boolean()), ("on_zap", r.boolean()),
                       ("ept_violation", r.byte(), gpa, r.value(QUALS), r.value((6, 0, 6)))))
    return r.pick((("pt_get_entry", r.byte(), r.value(GPAS), r.value((1, 2, 3, 4)), {}),
                   ("pt_walk", r.byte(), r.value(GPAS), {}),
                   ("pt_translate", r.byte(), r.value(GPAS), _access_kwargs(r)),
                   ("pt_translate_many", r.byte(), _gpa_array(r), r.byte() & 0x3F, {})))


def decode(data: bytes, max_ops: int = 64) -> list[tuple]:
    """Arbitrary bytes as a call sequence: a VM and a vCPU first, a memslot, then operations
    (now and then another memslot KVM accepts)."""
    r = Reader(data)
    ops = [_vm_op(r), ("vcpu",), *_valid_slot(r, 0)]
    while r.more() and len(ops) < max_ops:
        if r.byte() < 0x20:
            ops.extend(_valid_slot(r, sum(op[0] == "gmem" for op in ops)))
        else:
            ops.append(_op(r))
            if ops[-1][0] == "vm":
                ops.append(("vcpu",))
    return ops


def run_bytes(data: bytes, check_state: bool = True) -> Twin:
    """Decode ``data`` and run it on both cores; Divergence on any difference."""
    return run_ops(decode(data), check_state)


#: What a public call may raise for hostile input (anything else is a finding).
CONTRACT_ERRORS = (KvmError, ValueError, TypeError, OverflowError, RuntimeError, MemoryError)


class ContractBreach(Exception):
    """A call raised outside the contract, or the VM broke an invariant afterwards."""


def run_bytes_one_core(data: bytes, core: str = "cython", max_ops: int = 64) -> int:
    """Decode ``data`` and run it on one core, fast: each call may only raise one of
    CONTRACT_ERRORS; the VM's invariants are checked once, at the end (the differential
    ``run_bytes`` checks both cores and the whole state after every call).  Returns the
    number of operations; ContractBreach for a finding."""
    side = Side(_select.load(core))
    ops = decode(data, max_ops)
    for op in ops:
        try:
            _run(side, tuple(_fresh(a) for a in op))
        except CONTRACT_ERRORS:
            pass
        except Exception as exc:
            raise ContractBreach(f"{op!r} raised {type(exc).__name__}: {exc}") from exc
    if side.vm is not None:
        problems = side.vm.check_invariants()
        if problems:
            raise ContractBreach(f"invariants broken after {len(ops)} calls: {problems[:3]}")
    return len(ops)


def encode_ops(ops: list[tuple]) -> str:
    """A readable rendering of a call sequence (for reports of a divergence)."""
    return "\n".join(repr(op) for op in ops)


__all__ = ["CORES", "CONTRACT_ERRORS", "ContractBreach", "Divergence", "InvariantChecker",
           "Reader", "Side",
           "Twin", "decode", "norm", "outcome", "run_bytes", "run_bytes_one_core", "run_ops",
           "vm_state"]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Without atheris: replay files, or run random inputs for a while, on both cores
    compared (or, with ``--one-core``, the fast one-core check).

    ``kvmemu fuzz FILE...`` (or ``python -m kvmemu.testing``) replays inputs (e.g. one
    atheris saved); ``kvmemu fuzz --seconds 60 [--seed N]`` runs random byte strings.
    """
    import argparse
    import random
    import time

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("files", nargs="*")
    parser.add_argument("--seconds", type=float, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-core", action="store_true",
                        help="the fast check on the compiled core (fuzz/fuzz_fast.py's)")
    args = parser.parse_args(argv)
    runs = steps = 0

    def one(data: bytes, label: str) -> int:
        try:
            if args.one_core:
                return run_bytes_one_core(data)
            return run_bytes(data).steps
        except (Divergence, ContractBreach):
            print(f"{label}:\n{encode_ops(decode(data))}")
            raise

    for name in args.files:
        with open(name, "rb") as f:
            steps += one(f.read(), name)
        runs += 1
    rng = random.Random(args.seed)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(8, 400)))
        steps += one(data, f"input {data.hex()}")
        runs += 1
    print(f"{runs} inputs, {steps} steps, "
          f"{'no finding' if args.one_core else 'no divergence'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def interrupted_batch(vcpu: Any, gpas: np.ndarray, flags: int = 0,
                      delay: float = 0.02) -> tuple[str, float]:
    """Run ``vcpu.access_many(gpas, flags)`` on this (the main) thread and send SIGINT
    ``delay`` seconds after the call has entered the core; returns the KeyboardInterrupt's
    message and the seconds from the signal to the exception (AssertionError if the batch
    was not interrupted)."""
    import os
    import signal
    import sys
    import threading
    import time

    main, sent = threading.get_ident(), []

    def in_the_core() -> bool:
        # The main thread's innermost Python frame is this function, at the batch's call
        # line: it is inside the compiled call (VCPU.access_many has no Python frame of
        # its own when it goes straight to the core).
        frame = sys._current_frames().get(main)
        return (frame is not None and frame.f_code is interrupted_batch.__code__
                and frame.f_lineno == call_line)

    def interrupt_once_running() -> None:
        deadline = time.perf_counter() + 10
        while not in_the_core() and time.perf_counter() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    # A process started in the background by a shell inherits SIGINT ignored, and then
    # Python installs no KeyboardInterrupt handler: install it for the call.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        helper = threading.Thread(target=interrupt_once_running)
        call_line = sys._getframe().f_lineno + 3
        helper.start()
        try:
            vcpu.access_many(gpas, flags)
        except KeyboardInterrupt as exc:
            stopped, message = time.perf_counter(), str(exc)
        else:
            helper.join()
            raise AssertionError("the batch was not interrupted")
        helper.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    return message, stopped - sent[0]
