"""A task process's stdio as containerd names it: FIFO paths, `file://` and `binary://` URIs.

* A plain path (or `fifo://`) is a FIFO the client made and holds the other end of.
  stdout/stderr are opened read-write, so output never fails with EPIPE while the client
  re-attaches (containerd's runc shim keeps an extra read handle for the same reason).
  stdin is opened non-blocking for reading: the kernel reports nothing until a writer has
  come and gone, so "no writer yet" is never mistaken for EOF.
* `file:///path` appends output to a file.
* `binary:///path?k=v` starts a logging binary, as containerd's runc shim does: its fd 3
  and fd 4 read stdout and stderr; it closes fd 5 once it is ready; environment
  CONTAINER_ID and CONTAINER_NAMESPACE.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import urllib.parse
from pathlib import Path

from runm.channel.mux import MuxStream
from runm.errors import RunmError
from runm.sandbox import hoststdio

CHUNK = 1 << 16
BINARY_READY_TIMEOUT = 10.0


class StdioError(RunmError):
    """The stdio URI is malformed or cannot be opened."""


class ShimIO:
    """The ProcessIO (see runm.sandbox.pod) of one task process."""

    def __init__(self) -> None:
        self.stdin = self.stdout = self.stderr = False
        self._stdin_fd = -1
        self._out_fds: list[int] = []  # stdout, stderr (when present)
        self._logger: subprocess.Popen[bytes] | None = None
        self._stdin_closing = False
        self._stdin_wake: asyncio.Future[None] | None = None
        self._stdin_pump: asyncio.Future[None] | None = None
        self._outputs: list[asyncio.Future[None]] = []
        self._closed = False

    @classmethod
    async def open(cls, stdin: str, stdout: str, stderr: str, *, container_id: str,
                   namespace: str) -> ShimIO:
        io = cls()
        try:
            if stdin:
                io._stdin_fd = _open_fifo(stdin, os.O_RDONLY | os.O_NONBLOCK)
                io.stdin = True
            scheme = urllib.parse.urlsplit(stdout).scheme if stdout else ""
            if scheme == "binary":
                await io._start_logger(stdout, container_id, namespace)
            else:
                for name, uri in (("stdout", stdout), ("stderr", stderr)):
                    if uri:
                        io._out_fds.append(_open_output(uri))
                        setattr(io, name, True)
        except BaseException:
            io.close()
            raise
        return io

    async def _start_logger(self, uri: str, container_id: str, namespace: str) -> None:
        parts = urllib.parse.urlsplit(uri)
        args: list[str] = []
        for key, values in urllib.parse.parse_qs(parts.query).items():
            args += [key, values[0]] if values and values[0] else [key]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        self._out_fds = [out_w, err_w]
        self.stdout = self.stderr = True
        env = dict(os.environ, CONTAINER_ID=container_id, CONTAINER_NAMESPACE=namespace)
        try:
            try:
                self._logger = subprocess.Popen(
                    [parts.path, *args], env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    # our fds are all close-on-exec; only the three moved to 3..5 are not
                    close_fds=False,
                    preexec_fn=lambda: _as_fds_3_4_5(out_r, err_r, ready_w))
            except OSError as err:
                raise StdioError(f"starting logging binary {parts.path}: "
                                 f"{err.strerror or err}") from None
        finally:
            for fd in (out_r, err_r, ready_w):
                os.close(fd)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, os.read, ready_r, 1),
                                   BINARY_READY_TIMEOUT)
        except TimeoutError:
            raise StdioError(f"logging binary {parts.path} not ready within "
                             f"{BINARY_READY_TIMEOUT:.0f}s") from None
        finally:
            os.close(ready_r)

    # -- ProcessIO ---------------------------------------------------------------------

    def connect(self, stdin: MuxStream | None, stdout: MuxStream | None,
                stderr: MuxStream | None) -> list[asyncio.Future[None]]:
        if stdin is not None:
            self._stdin_pump = asyncio.ensure_future(self._pump_stdin(stdin))
        for stream, fd in zip((stdout, stderr), self._out_fds, strict=False):
            if stream is not None:
                self._outputs.append(hoststdio.copy_stream_to_fd(stream, fd))
        return list(self._outputs)

    def close_stdin(self) -> None:
        """CloseIO: what the client wrote is passed on, then the process sees EOF."""
        self._stdin_closing = True
        if self._stdin_wake is not None and not self._stdin_wake.done():
            self._stdin_wake.set_result(None)
        if self._stdin_pump is None:
            self._close_stdin_fd()

    def close(self) -> None:
        """Let go of everything; output fds once their copies are done (a copy thread may
        still be writing to them)."""
        if self._closed:
            return
        self._closed = True
        self.close_stdin()
        pending = [f for f in self._outputs if not f.done()]
        if pending:
            gathered = asyncio.gather(*pending, return_exceptions=True)
            gathered.add_done_callback(lambda _: self._close_outputs())
        else:
            self._close_outputs()

    def _close_outputs(self) -> None:
        for fd in self._out_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out_fds = []
        if self._logger is not None:  # it sees EOF on fds 3 and 4 and exits
            logger = self._logger
            self._logger = None
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().run_in_executor(None, logger.wait)

    def _close_stdin_fd(self) -> None:
        if self._stdin_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._stdin_fd)
            self._stdin_fd = -1

    # -- stdin -------------------------------------------------------------------------

    async def _pump_stdin(self, stream: MuxStream) -> None:
        try:
            while data := await self._read_stdin():
                await stream.write(data)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # EOF for the process
            self._close_stdin_fd()

    async def _read_stdin(self) -> bytes:
        """The next chunk, or b"" at EOF (the writer went away, or CloseIO and nothing is
        left). read() itself says EOF while no writer has come yet, so it is only called
        once poll says the FIFO is readable, or on CloseIO."""
        loop = asyncio.get_running_loop()
        fd = self._stdin_fd
        while True:
            if not self._stdin_closing:
                wake: asyncio.Future[None] = loop.create_future()
                self._stdin_wake = wake
                loop.add_reader(fd, _wake, wake)
                try:
                    await wake
                finally:
                    loop.remove_reader(fd)
            try:
                return os.read(fd, CHUNK)
            except BlockingIOError:
                if self._stdin_closing:
                    return b""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _as_fds_3_4_5(*fds: int) -> None:
    """In the logging binary's child, before exec: its pipes become fds 3, 4 and 5."""
    moved = [os.dup(fd) for fd in fds]  # out of the way of 3..5 first
    for target, fd in enumerate(moved, start=3):
        os.dup2(fd, target)  # dup2 clears O_CLOEXEC on the target
        os.close(fd)


def _path_of(uri: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("", "fifo"):
        return "fifo", uri if not parts.scheme else parts.path
    if parts.scheme == "file":
        return "file", parts.path
    raise StdioError(f"unknown STDIO scheme {parts.scheme}")


def _open_fifo(uri: str, flags: int) -> int:
    kind, path = _path_of(uri)
    if kind != "fifo":
        raise StdioError(f"stdin cannot be a {kind} URI: {uri}")
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as err:
        raise StdioError(f"open {path}: {err.strerror}") from None


def _open_output(uri: str) -> int:
    kind, path = _path_of(uri)
    try:
        if kind == "file":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise StdioError(f"open {path}: {err.strerror}") from None
