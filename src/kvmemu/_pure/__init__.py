"""The pure-Python twin of the compiled core.

The readable, executable specification of the model: the same public
functions and classes as ``kvmemu._core``, with the same results bit for bit.
Selected by ``KVMEMU_PURE_PYTHON=1`` before ``import kvmemu``; the test suite
runs every test against both.
"""

from .. import _vm
from ..results import (EptMisconfig, EptViolation, MemoryFaultExit, MmioExit, NestedPageFault,
                       Translation)
from .intake import svm_error_code, tdx_shared_bit, vmx_error_code
from .memory import VMState
from .paging import PageTables

__all__ = ["svm_error_code", "tdx_shared_bit", "vmx_error_code", "PageTables", "Translation",
           "EptViolation", "EptMisconfig", "NestedPageFault", "VM", "VMState", "MemoryFaultExit",
           "MmioExit"]


class VM(_vm.VM):
    __doc__ = _vm.VM.__doc__
    _State = VMState
