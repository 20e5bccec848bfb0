"""The caller's terminal: its size, and raw mode while a container's pty is attached."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import tty
from typing import Any


def window_size(*fds: int) -> tuple[int, int] | None:
    """(rows, cols) of the first fd that is a terminal with a size set."""
    for fd in fds:
        try:
            rows, cols, _, _ = struct.unpack("HHHH",
                                             fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            continue
        if rows and cols:
            return rows, cols
    return None


class RawTerminal:
    """Raw mode on fd for the duration (the guest's pty does the line discipline)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
