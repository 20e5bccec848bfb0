"""Moving a guest process's stdio between its pipes (or pty master) and mux streams."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from typing import Protocol

from runm.channel.fdio import wait_fd

CHUNK = 65536


class Stream(Protocol):
    async def read(self, max_bytes: int = CHUNK) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    async def reset(self) -> None: ...


def _read_nonblocking(fd: int) -> bytes | None:
    """Bytes read, b"" at EOF (EIO from a pty master whose slave is gone counts), None if empty."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno == errno.EIO:
            return b""
        raise


async def copy_fd_to_stream(fd: int, stream: Stream, exited: asyncio.Event) -> None:
    """Forward fd's output until EOF, or, once `exited` is set, until it runs dry.

    A process that exits may leave a child holding the pipe open; its parent's last words
    are already in the pipe, so after exit we take what is there and send EOF.
    """
    os.set_blocking(fd, False)
    try:
        while True:
            data = _read_nonblocking(fd)
            if data is None:
                if exited.is_set():
                    break
                readable = asyncio.ensure_future(wait_fd(fd))
                exit_wait = asyncio.ensure_future(exited.wait())
                try:
                    await asyncio.wait({readable, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    readable.cancel()
                    exit_wait.cancel()
                continue
            if not data:
                break
            await stream.write(data)
        await stream.write_eof()
    except (ConnectionError, OSError):
        with contextlib.suppress(ConnectionError, OSError):
            await stream.reset()


async def copy_stream_to_fd(stream: Stream, fd: int, *, close: bool = True) -> None:
    """Forward a stream into fd until the stream's EOF; then close fd (the process sees EOF)."""
    os.set_blocking(fd, False)
    try:
        while data := await stream.read(CHUNK):
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await wait_fd(fd, writable=True)
                    continue
                view = view[n:]
    except (ConnectionError, OSError):
        with contextlib.suppress(ConnectionError, OSError):
            await stream.reset()
    finally:
        if close:
            with contextlib.suppress(OSError):
                os.close(fd)
