"""Waiting for a raw file descriptor in asyncio (pipes, ptys, virtio-serial ports)."""

from __future__ import annotations

import asyncio


async def wait_fd(fd: int, *, writable: bool = False, timeout: float | None = None) -> None:
    """Return once fd is readable (or writable); also on timeout, if one is given."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        if timeout is None:
            await fut
        else:
            await asyncio.wait({fut}, timeout=timeout)
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
