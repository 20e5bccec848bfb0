"""Connecting a guest process's stdio (pipes or pty master) to mux streams."""

from __future__ import annotations

import asyncio
import contextlib
import os

from runm.channel.mux import MuxStream, pump_fd_to_stream, pump_stream_to_fd

# Python under TCG costs milliseconds per loop turn: move up to a pipe's worth per read
READ_SIZE = 1 << 20


async def copy_output(fd: int, stream: MuxStream, exited: asyncio.Event) -> None:
    """The process's output fd -> stream, until EOF or (after exit) until the fd runs dry.

    Then the fd is closed, so a writer still holding the pipe gets SIGPIPE like with a closed
    terminal, and the stream is closed (EOF sent, anything the peer sends is discarded).
    """
    try:
        os.set_blocking(fd, False)
        await pump_fd_to_stream(fd, stream, until_dry=exited, chunk_size=READ_SIZE)
    except OSError:
        with contextlib.suppress(ConnectionError, OSError):
            await stream.reset()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(ConnectionError, OSError):
            await stream.aclose()


async def copy_input(stream: MuxStream, fd: int) -> None:
    """stream -> the process's input fd until the stream's EOF; then close fd (EOF for it)."""
    try:
        os.set_blocking(fd, False)
        await pump_stream_to_fd(stream, fd)
    except OSError:
        with contextlib.suppress(ConnectionError, OSError):
            await stream.reset()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(ConnectionError, OSError):
            await stream.aclose()
