"""The host's libc, for the calls Python's os module lacks (setns, fallocate, mount syscalls).

Importing this loads ctypes (~10 ms): import it only on the paths that make such calls. The
guest agent has its own (runm.agent.sysapi), since only some runm modules ship in the guest.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def check(ret: int, what: str) -> int:
    """ret, unless it is negative (a failed libc call): then errno's OSError, as
    "WHAT: strerror"."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret
