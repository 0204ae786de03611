"""Type aliases of the public API, available at run time (and in the stub)."""

from __future__ import annotations

from typing import Callable, Protocol, Union

import numpy as np
import numpy.typing as npt

#: A 1-D ``numpy.uint64`` array (GPAs, exit values, host-physical addresses).
U64Array = npt.NDArray[np.uint64]


class TraceFile(Protocol):
    """A text file as ``VM.trace`` uses it: only ``write``."""

    def write(self, text: str, /) -> object: ...


#: Where ``VM.trace`` sends events: ``sink(event, text)``, or a text file.
TraceSink = Union[Callable[[str, str], object], TraceFile]
