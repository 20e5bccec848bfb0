"""Exclusive file locks (flock) for work that one runm at a time must do: building the guest
image, making a VM snapshot."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def open_lock(path: Path) -> int:
    """The lock file's fd (the file is created if missing); raises OSError."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


@contextlib.contextmanager
def hold(fd: int, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on fd for the with-block, then close fd. on_wait is called
    once if another process holds the lock (to say why nothing happens)."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
