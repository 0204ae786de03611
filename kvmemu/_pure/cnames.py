"""Every constant of ``kvmemu.constants`` under its C name, as plain ints.

The compiled parts cimport these names from the declarations ``setup.py``
generates (``kvmemu_constants.pxd``); the twin's parts import them from here
(``from .cnames import *``), so both spell ``PFERR_WRITE``, ``EPTE_READ`` or
``RET_PF_RETRY`` alike and neither keeps a list of names.
"""

from ..constants import c_constants as _c_constants

globals().update({_name: _value for _name, (_, _value) in _c_constants().items()})
__all__ = list(_c_constants())
