"""The byte-stream abstraction every protocol in runm runs on (ttrpc, the stdio mux).

A ByteStream is a reliable, ordered, bidirectional byte pipe: a unix socket on the host, a
virtio-serial port in the guest, a socketpair in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Protocol


class ByteStream(Protocol):
    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Return 1..max_bytes bytes, or b"" once the peer has closed its side."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Write all of data; raises ConnectionError once the peer is gone."""
        ...

    async def aclose(self) -> None:
        """Close both directions; idempotent."""
        ...


class AsyncioByteStream:
    """A ByteStream over an asyncio (StreamReader, StreamWriter) pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect_unix(cls, path: str) -> AsyncioByteStream:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
        return cls(reader, writer)

    @classmethod
    async def from_fd(cls, fd: int) -> AsyncioByteStream:
        """Adopt an already connected unix socket (e.g. received with SCM_RIGHTS)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 22)
        return cls(reader, writer)

    def dup_fd(self) -> int:
        """A duplicate of the underlying socket's fd: the connection outlives aclose()."""
        sock = self._writer.get_extra_info("socket")
        return os.dup(sock.fileno())

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except ConnectionError:
            return b""

    async def send_all(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("stream is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def aclose(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
