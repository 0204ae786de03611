# The compiled core exports exactly what kvmemu re-exports (see kvmemu/__init__.pyi).
from . import vmx_error_code as vmx_error_code, svm_error_code as svm_error_code, tdx_shared_bit as tdx_shared_bit, VM as VM
from . import (PageTables as PageTables, Translation as Translation, EptViolation as EptViolation,
               EptMisconfig as EptMisconfig, NestedPageFault as NestedPageFault)
