"""The guest end of a virtio-serial port as a ByteStream that survives host reconnects.

Facts this relies on (reference/snapshot-facts.md): the port can be opened once; while the
host side is not connected, read() returns 0 and poll() reports POLLHUP; virtio_console sends
SIGIO to the owner (F_SETOWN + O_ASYNC) when the host connects or data arrives. A host that
goes away (VM restored from a snapshot, shim restarted) is therefore an end of *connection*,
not of the port: `wait_connected()` waits for the next host and the same fd is reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
from pathlib import Path

from runm.channel.fdio import wait_fd

VIRTIO_PORTS = Path("/sys/class/virtio-ports")


def find_port(name: str, sys_dir: Path = VIRTIO_PORTS) -> Path | None:
    """/dev/vportNpM for the port QEMU named `name` (no udev in the guest: read sysfs)."""
    if not sys_dir.is_dir():
        return None
    for entry in sorted(sys_dir.iterdir()):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    return None


class VirtioPort:
    """ByteStream over a virtio-serial port fd; one host connection at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pushback = b""
        self._wakeup = asyncio.Event()
        os.set_blocking(fd, False)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)

    @classmethod
    def open(cls, path: Path) -> VirtioPort:
        return cls(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))

    def notify(self) -> None:
        """SIGIO arrived: the host may have connected."""
        self._wakeup.set()

    def _host_gone(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLOUT)
        events = poller.poll(0)
        return bool(events and events[0][1] & select.POLLHUP and not events[0][1] & select.POLLIN)

    async def wait_connected(self) -> None:
        """Return once a host is connected (data may already be waiting)."""
        while not self._pushback:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return  # connected, nothing to read yet
            if data:
                self._pushback = data
                return
            self._wakeup.clear()
            # SIGIO wakes us; the timeout only covers a lost signal.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), 1.0)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback[:max_bytes], self._pushback[max_bytes:]
            return data
        while True:
            try:
                data = os.read(self.fd, max_bytes)  # b"" = host disconnected
            except BlockingIOError:
                await wait_fd(self.fd)
                continue
            # A read returns one of the driver's page-sized buffers: take what else is
            # queued now, so the caller's (costly, under TCG) turn handles more than 4 KiB.
            chunks = [data]
            total = len(data)
            while data and total < max_bytes:
                try:
                    data = os.read(self.fd, max_bytes - total)
                except OSError:
                    break  # nothing more queued; an error shows again on the next call
                chunks.append(data)
                total += len(data)
            return b"".join(chunks)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno in (errno.EPIPE, errno.ENODEV):
                    raise ConnectionResetError("host disconnected") from err
                raise
            if self._host_gone():
                raise ConnectionResetError("host disconnected")
            # POLLHUP would wake a plain writer wait forever; re-check the host each second.
            await wait_fd(self.fd, writable=True, timeout=1.0)

    async def aclose(self) -> None:
        """The port stays open for the next host; nothing to do per connection."""
