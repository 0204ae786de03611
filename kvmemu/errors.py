"""KvmError: what a failing KVM ioctl raises in the model."""

from __future__ import annotations

import errno as _errno

__all__ = ["KvmError"]


class KvmError(OSError):
    """An ioctl of the model failed the way KVM's would.

    ``.errno`` is the errno the kernel returns (``errno.EINVAL``,
    ``errno.EEXIST``, ...); the message names the check that failed.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __repr__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"KvmError({name}, {self.strerror!r})"
