"""Bridging the caller's own stdio fds to mux streams.

The caller's fds are shared with other processes (a shell, conmon), so we never switch them to
non-blocking mode. Each direction gets a daemon thread doing plain blocking I/O and handing
data to the event loop; a thread stuck in read(0) never delays runm's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from runm.channel.mux import MuxStream

CHUNK = 1 << 20
T = TypeVar("T")


def _in_thread(loop: asyncio.AbstractEventLoop, body: Any) -> asyncio.Future[None]:
    """Run body() in a daemon thread; the returned future completes when it returns."""
    done: asyncio.Future[None] = loop.create_future()

    def finish(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def target() -> None:
        try:
            body()
        except BaseException as exc:  # handed to the loop, raised where it is awaited
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finish, exc)
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
            loop.call_soon_threadsafe(finish, None)

    threading.Thread(target=target, daemon=True, name="runm-stdio").start()
    return done


def _call(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


def copy_fd_to_stream(fd: int, stream: MuxStream) -> asyncio.Future[None]:
    """Caller's input (e.g. stdin) -> stream, then EOF."""
    loop = asyncio.get_running_loop()

    def body() -> None:
        try:
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except OSError as err:
                    if err.errno == errno.EIO:  # terminal hung up
                        break
                    raise
                if not data:
                    break
                _call(loop, stream.write(data))
            _call(loop, stream.aclose())  # EOF for the process
        except (ConnectionError, OSError):
            pass

    return _in_thread(loop, body)


def copy_stream_to_fd(stream: MuxStream, fd: int) -> asyncio.Future[None]:
    """Stream -> caller's output fd (stdout/stderr) until the stream's EOF."""
    loop = asyncio.get_running_loop()

    def body() -> None:
        broken = False
        while True:
            try:
                data = _call(loop, stream.read(CHUNK))
            except ConnectionError:
                return
            if not data:
                with contextlib.suppress(Exception):
                    _call(loop, stream.aclose())
                return
            if broken:
                continue
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                # The reader went away: stop the guest writer like a closed pipe would.
                broken = True
                with contextlib.suppress(Exception):
                    _call(loop, stream.reset())
                return

    return _in_thread(loop, body)


class FdIO:
    """The ProcessIO (see pod.py) of a process whose stdio is the caller's own fds: `wanted`
    says which of stdin, stdout, stderr it has, `fds` holds those, in that order."""

    def __init__(self, fds: list[int], wanted: list[bool]) -> None:
        if sum(wanted) != len(fds):
            raise ValueError("fd count does not match the streams wanted")
        self.stdin, self.stdout, self.stderr = wanted
        self._fds = dict(zip([i for i, w in enumerate(wanted) if w], fds, strict=True))

    def connect(self, stdin: MuxStream | None, stdout: MuxStream | None,
                stderr: MuxStream | None) -> list[asyncio.Future[None]]:
        outputs = []
        if stdin is not None:
            copy_fd_to_stream(self._fds[0], stdin)
        for index, stream in ((1, stdout), (2, stderr)):
            if stream is not None:
                outputs.append(copy_stream_to_fd(stream, self._fds[index]))
        return outputs

    def close(self) -> None:
        """The caller sees EOF once we let go of its pipes."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
