"""What a second-stage translation gives: the host-physical address, or the exit.

Shared by both cores (``PageTables.translate`` returns one of these).  The
objects are immutable values: equal when their type and fields are equal,
hashable, and printed with every field in hex and the exit bits by name, so a
failing comparison in a test reads like the SDM table.
"""

from __future__ import annotations

import builtins
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar

from . import _args
from .constants import EPT_VIOLATION, PFERR, SVM_EXIT_NPF, ExitReason, VmxExitReason

__all__ = ["Translation", "EptViolation", "EptMisconfig", "NestedPageFault", "MemoryFaultExit",
           "MmioExit", "AccessBatch", "HypercallExit", "GuestException", "RmpEntry"]


def _bit_names(flag: Any) -> str:
    text = repr(flag)
    return text.split(".", 1)[1] if "." in text else ""


class _Result(tuple):
    """Immutable value with named int fields, compared and printed field by field.

    A tuple underneath (cheap to build from the compiled core), but equal only to a
    value of the same type: Translation(1, 1) != EptMisconfig(...) whatever the fields.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _flags: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for i, name in enumerate(cls._fields):
            setattr(cls, name, property(itemgetter(i), doc=f"Field {i}: {name}."))

    def __new__(cls, *values: int, **named: int) -> Any:
        if named:
            values = values + tuple(named.pop(name) for name in cls._fields[len(values):]
                                    if name in named)
            if named:
                raise TypeError(f"{cls.__name__} has no field {next(iter(named))!r}")
        if len(values) != len(cls._fields):
            raise TypeError(f"{cls.__name__} takes {len(cls._fields)} fields "
                            f"({', '.join(cls._fields)}), not {len(values)}")
        return tuple.__new__(cls, [_args.u64(name, v) for name, v in zip(cls._fields, values)])

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self)))

    def __repr__(self) -> str:
        parts = []
        for name, value in zip(self._fields, self):
            text = f"{name}={value:#x}"
            flag = self._flags.get(name)
            if flag is not None and value:
                text += " " + _bit_names(flag(value))
            parts.append(text)
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[type, tuple[int, ...]]:
        return type(self), tuple(self)


class Translation(_Result):
    """The access translated: ``hpa`` is the host-physical address, ``level`` the
    level of the leaf that mapped it (1 = 4K, 2 = 2M, 3 = 1G)."""

    __slots__ = ()
    _fields = ("hpa", "level")
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def hpa(self) -> int: ...
        @property
        def level(self) -> int: ...

    def __repr__(self) -> str:
        return f"Translation(hpa={self.hpa:#x}, level={self.level})"


class EptViolation(_Result):
    """VM exit "EPT violation" (basic exit reason 48): the guest-physical address
    and the exit qualification (bits as ``EPT_VIOLATION``)."""

    __slots__ = ()
    _fields = ("gpa", "exit_qualification")
    _flags = {"exit_qualification": EPT_VIOLATION}
    reason: ClassVar[VmxExitReason] = VmxExitReason.EPT_VIOLATION
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def gpa(self) -> int: ...
        @property
        def exit_qualification(self) -> int: ...


class EptMisconfig(_Result):
    """VM exit "EPT misconfiguration" (basic exit reason 49): only the
    guest-physical address is stored; the qualification is cleared."""

    __slots__ = ()
    _fields = ("gpa",)
    reason: ClassVar[VmxExitReason] = VmxExitReason.EPT_MISCONFIG
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def gpa(self) -> int: ...


class NestedPageFault(_Result):
    """#VMEXIT(NPF) (exit code 0x400): EXITINFO2 is ``gpa``, EXITINFO1 is
    ``exit_info_1`` (bits as ``PFERR``)."""

    __slots__ = ()
    _fields = ("gpa", "exit_info_1")
    _flags = {"exit_info_1": PFERR}
    reason: ClassVar[int] = SVM_EXIT_NPF
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def gpa(self) -> int: ...
        @property
        def exit_info_1(self) -> int: ...


class MemoryFaultExit(_Result):
    """KVM_RUN failed with EFAULT and ``run.exit_reason`` KVM_EXIT_MEMORY_FAULT:
    ``flags`` (MEMORY_EXIT_FLAG_PRIVATE or 0), ``gpa`` (gfn << 12, the TDX shared bit
    stripped) and ``size`` (4096), as kvm_prepare_memory_fault_exit fills them."""

    __slots__ = ()
    _fields = ("flags", "gpa", "size")
    exit_reason: ClassVar[ExitReason] = ExitReason.MEMORY_FAULT
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def flags(self) -> int: ...
        @property
        def gpa(self) -> int: ...
        @property
        def size(self) -> int: ...


class MmioExit(_Result):
    """The access needs emulation as MMIO (RET_PF_EMULATE on a GPA without memory,
    or a write to a read-only memslot): KVM_EXIT_MMIO for ``gpa`` (the TDX shared bit
    stripped, as tdx_emulate_mmio does), with kvm_run.mmio's ``len`` and, for a
    write, ``data`` (``len`` bytes, little-endian).  KVM learns the width by emulating
    the instruction; the model from ``VCPU.access(..., size=, data=)``: an access that
    gave no size has ``len`` 0 and no data."""

    __slots__ = ()
    _fields = ("gpa", "is_write", "len", "data")
    exit_reason: ClassVar[ExitReason] = ExitReason.MMIO
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def gpa(self) -> int: ...
        @property
        def is_write(self) -> bool: ...
        @property
        def len(self) -> int: ...
        @property
        def data(self) -> bytes: ...

    def __new__(cls, gpa: int, is_write: bool, len: int = 0, data: bytes = b"") -> Any:
        width = _args.int_range("len", len, 0, 8)
        if width not in (0, 1, 2, 4, 8):
            raise ValueError(f"len must be 0, 1, 2, 4 or 8, not {width}")
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        write = _args.flag("is_write", is_write)
        if builtins.len(data) != (width if write else 0):
            raise ValueError(f"a{' write' if write else ' read'} of {width} bytes carries "
                             f"{width if write else 0} bytes of data, not {builtins.len(data)}")
        return tuple.__new__(cls, (_args.u64("gpa", gpa), write, width, data))

    def __repr__(self) -> str:
        text = f"MmioExit(gpa={self.gpa:#x}, is_write={self.is_write}"
        if self.len:
            text += f", len={self.len}" + (f", data={self.data.hex()}" if self.is_write else "")
        return text + ")"



class GuestException(_Result):
    """The access raised an exception inside the guest, with no VM exit: on SEV-SNP, #VC
    (vector 29) with error code 0x404 (PAGE_NOT_VALIDATED) for a private access to a page
    the guest has not validated with PVALIDATE (AMD APM vol. 2, "RMP and VMPL Access
    Checks").  ``gpa`` is the page accessed."""

    __slots__ = ()
    _fields = ("vector", "error_code", "gpa")
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def vector(self) -> int: ...
        @property
        def error_code(self) -> int: ...
        @property
        def gpa(self) -> int: ...


class RmpEntry(_Result):
    """A frame's SEV-SNP RMP entry (struct rmpentry, arch/x86/virt/svm/sev.c, with the
    Validated bit the hardware keeps): ``page_size`` as a level (PG_LEVEL_4K 1,
    PG_LEVEL_2M 2, as snp_lookup_rmpentry reports it), ``gpa`` the guest-physical
    address it is assigned for, ``asid`` the guest's."""

    __slots__ = ()
    _fields = ("assigned", "asid", "gpa", "page_size", "validated", "immutable")
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def assigned(self) -> bool: ...
        @property
        def asid(self) -> int: ...
        @property
        def gpa(self) -> int: ...
        @property
        def page_size(self) -> int: ...
        @property
        def validated(self) -> bool: ...
        @property
        def immutable(self) -> bool: ...

    def __repr__(self) -> str:
        return (f"RmpEntry(assigned={self.assigned}, asid={self.asid}, gpa={self.gpa:#x}, "
                f"page_size={self.page_size}, validated={self.validated}, "
                f"immutable={self.immutable})")


class AccessBatch:
    """What ``VCPU.access_many`` did: ``hpa`` and ``level`` (uint64 / uint8 arrays, one
    element per GPA, filled for the first ``count``), ``count`` (how many translated)
    and ``exit`` (the MemoryFaultExit or MmioExit that stopped the batch, or None when
    every access translated).  Call ``access_many`` again on ``gpas[count:]`` after
    handling the exit to resume."""

    __slots__ = ("hpa", "level", "count", "exit")

    def __init__(self, hpa: Any, level: Any, count: int, exit: Any) -> None:
        self.hpa = hpa
        self.level = level
        self.count = count
        self.exit = exit

    def __repr__(self) -> str:
        return f"AccessBatch(count={self.count}, of={len(self.hpa)}, exit={self.exit!r})"


class HypercallExit(_Result):
    """KVM_RUN returned to userspace with KVM_EXIT_HYPERCALL: ``nr`` (the hypercall),
    ``args`` (six u64, as kvm_run.hypercall.args) and ``flags``
    (KVM_EXIT_HYPERCALL_LONG_MODE for a 64-bit guest).  Userspace answers with
    ``VCPU.complete_hypercall(ret)``."""

    __slots__ = ()
    _fields = ("nr", "args", "flags")
    exit_reason: ClassVar[ExitReason] = ExitReason.HYPERCALL
    if TYPE_CHECKING:            # fields: read-only properties (_Result)
        @property
        def nr(self) -> int: ...
        @property
        def args(self) -> tuple[int, ...]: ...
        @property
        def flags(self) -> int: ...

    def __new__(cls, nr: Any, args: Any, flags: Any) -> Any:
        values = tuple(args)
        if len(values) != 6:
            raise TypeError(f"args must hold 6 values, not {len(values)}")
        return tuple.__new__(cls, (_args.u64("nr", nr),
                                   tuple(_args.u64("args", a) for a in values),
                                   _args.u64("flags", flags)))

    def __repr__(self) -> str:
        args = ", ".join(f"{a:#x}" for a in self.args)
        return f"HypercallExit(nr={self.nr}, args=({args}), flags={self.flags:#x})"
