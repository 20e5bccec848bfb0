"""The stdio stream multiplexer: many byte streams over one ByteStream, with flow control.

Container stdio (stdin/stdout/stderr of every process in a VM) travels over one virtio-serial
port. Each stdio pipe is a *stream* with its own credit-based flow control, so a process whose
output nobody reads stops at its window without blocking any other stream (no head-of-line
blocking), memory stays bounded, and stdio bytes never travel as one RPC per chunk.

Wire format (implemented by the sans-I/O core in `runm.channel.muxframe`)
-------------------------------------------------------------------------
Every frame is a 9-byte header ``struct ">IBI"`` = (stream_id: uint32, nonzero; type: uint8;
length: uint32) followed by ``length`` payload bytes:

- DATA=0: payload is 1..MAX_FRAME (65536) stream bytes;
- EOF=1: length 0; the sender sends no more DATA on the stream;
- CREDIT=2: payload is a 4-byte big-endian increment >= 1: the receiver consumed that many
  bytes, the sender may send that many more;
- RESET=3: length 0; abort the stream in both directions.

Each stream starts with a send window of INITIAL_WINDOW (4 MiB) bytes in each direction; both
sides know it (no handshake). Stream ids are chosen by the host and passed out of band (in
ttrpc requests) and must not be reused on one connection; either side may send on any id it has
been told about. Data arriving for a stream nobody has opened yet is buffered (bounded by the
window; at most `max_pending_streams` such streams, further ones are reset) until it is opened.
A stream is finished once reset by either side or once both sides have sent EOF. A frame that
violates the protocol tears the whole connection down: every stream sees an error.

Driver
------
`Mux` owns the ByteStream and two tasks: a reader that feeds `MuxProtocol` and dispatches
events to the streams (it never blocks on an application, so control frames always get
through), and a writer that sends the queued frames in large batches (frames are only ever
appended whole, so writes from many tasks never interleave). Both are cancelled and awaited by
`aclose()`. Writers wait while more than OUT_HIGH_WATER bytes are queued, so the queue is
bounded too. `MuxStream` is the per-stream handle: `read()` grants credit back as it consumes,
`write()` waits for credit. Both sides must end every stream (EOF both ways, `aclose()` or
`reset()`), otherwise its state stays in the Mux until the connection ends.

`pump_fd_to_stream` / `pump_stream_to_fd` move bytes between a non-blocking fd (pipe, pty
master, socket) and a stream, for runc's pipes in the guest and the caller's stdio on the host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
from types import TracebackType

from runm.channel.fdio import wait_fd
from runm.channel.muxframe import (
    CREDIT,
    CREDIT_THRESHOLD,
    DATA,
    EOF,
    HEADER,
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_FRAME,
    MAX_STREAM_ID,
    RESET,
    CreditAvailable,
    DataReceived,
    EndReceived,
    Event,
    MuxProtocol,
    MuxProtocolError,
    StreamReset,
    check_stream_id,
)
from runm.channel.stream import ByteStream

__all__ = [
    "CREDIT",
    "DATA",
    "EOF",
    "HEADER",
    "INITIAL_WINDOW",
    "MAX_FRAME",
    "MAX_STREAM_ID",
    "RESET",
    "CreditAvailable",
    "DataReceived",
    "EndReceived",
    "Event",
    "Mux",
    "MuxProtocol",
    "MuxProtocolError",
    "MuxStream",
    "StreamReset",
    "pump_fd_to_stream",
    "pump_stream_to_fd",
]

log = logging.getLogger("runm.mux")

READ_SIZE = 4 * (HEADER_SIZE + MAX_FRAME)
OUT_HIGH_WATER = 4 * MAX_FRAME  # queued-but-unsent bytes above which writers wait
MAX_PENDING_STREAMS = 64


class MuxStream:
    """One stream of a Mux. Obtain it with `Mux.open(stream_id)`."""

    def __init__(self, mux: Mux, stream_id: int) -> None:
        self._mux = mux
        self._id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._head = 0  # bytes of chunks[0] already read
        self._buffered = 0
        self._eof_received = False
        self._eof_sent = False
        self._reset = False
        self._closed = False  # aclose() was called: incoming data is discarded
        self._lost: BaseException | None = None  # the connection went away
        self._opened = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    def __repr__(self) -> str:
        return f"<MuxStream {self._id}{' closed' if self.closed else ''}>"

    # --- state ---------------------------------------------------------------------------

    @property
    def stream_id(self) -> int:
        return self._id

    @property
    def eof_received(self) -> bool:
        """The peer sent EOF (buffered data may still be waiting to be read)."""
        return self._eof_received

    @property
    def eof_sent(self) -> bool:
        return self._eof_sent

    @property
    def is_reset(self) -> bool:
        """Reset by either side."""
        return self._reset

    @property
    def connection_lost(self) -> bool:
        return self._lost is not None

    @property
    def closed(self) -> bool:
        """No more I/O is possible: reset, connection lost, aclose()d, or EOF both ways."""
        return (
            self._reset
            or self._closed
            or self._lost is not None
            or (self._eof_sent and self._eof_received and not self._chunks)
        )

    @property
    def buffered(self) -> int:
        """Received bytes waiting for read()."""
        return self._buffered

    @property
    def send_window(self) -> int:
        """Bytes write() could hand over right now without waiting for credit."""
        if not self._registered or self._lost is not None:
            return 0
        return self._mux._proto.window(self._id)

    @property
    def _registered(self) -> bool:
        return self._mux._streams.get(self._id) is self

    # --- I/O -----------------------------------------------------------------------------

    async def read(self, max_bytes: int = MAX_FRAME) -> bytes:
        """Up to max_bytes bytes; b"" after the peer's EOF.

        Raises ConnectionResetError once the stream is reset, closed with aclose(), or the
        connection is lost (data received before a connection loss is still returned).
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while not self._chunks:
            self._check_readable()
            if self._eof_received:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunks = self._chunks
        parts: list[bytes] = []
        size = 0
        while chunks and size < max_bytes:
            first, head = chunks[0], self._head
            take = min(len(first) - head, max_bytes - size)
            if head == 0 and take == len(first):
                parts.append(chunks.popleft())  # the common case: no copy
            else:
                parts.append(first[head : head + take])
                head += take
                if head == len(first):
                    chunks.popleft()
                    head = 0
                self._head = head
            size += take
        self._buffered -= size
        self._mux._consumed(self, size)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _check_readable(self) -> None:
        if self._reset:
            raise ConnectionResetError(f"mux stream {self._id} was reset")
        if self._closed:
            raise ConnectionResetError(f"mux stream {self._id} is closed")
        if self._lost is not None and not self._chunks and not self._eof_received:
            raise ConnectionResetError(
                f"mux stream {self._id}: connection lost ({self._lost})"
            ) from self._lost

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of data, waiting for credit as needed.

        Returns once the data is queued for the connection. Raises BrokenPipeError if the
        stream is reset, was closed for writing (write_eof/aclose) or the connection is gone;
        some of the data may have been sent by then.
        """
        mux = self._mux
        view = memoryview(data).cast("B")
        pos, total = 0, len(view)
        while pos < total:
            self._check_writable()
            window = mux._proto.window(self._id)
            if window <= 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            if mux._out_len >= OUT_HIGH_WATER:
                await mux._wait_for_space()
                continue
            frames, n = mux._proto.send_data(self._id, view[pos : pos + window])
            mux._enqueue(frames)
            pos += n

    def _check_writable(self) -> None:
        if self._lost is not None:
            raise BrokenPipeError(
                f"mux stream {self._id}: connection lost ({self._lost})"
            ) from self._lost
        if self._reset:
            raise BrokenPipeError(f"mux stream {self._id} was reset")
        if self._eof_sent or self._closed:
            raise BrokenPipeError(f"mux stream {self._id} is closed for writing")

    async def write_eof(self) -> None:
        """Tell the peer no more data follows. Idempotent; BrokenPipeError if reset/lost."""
        if self._eof_sent:
            return
        self._check_writable()
        self._mux._send_eof(self)

    async def reset(self) -> None:
        """Abort the stream both ways: the peer's reads raise, its writes fail. Idempotent."""
        if self._reset or self._lost is not None:
            return
        self._on_reset()
        if self._registered:
            self._mux._send_reset(self)

    async def aclose(self) -> None:
        """Done with the stream: send EOF if not sent yet, discard (and credit) what arrives.

        Unlike reset() this never loses data we sent: the peer reads it all, then EOF. The
        stream is finished (and forgotten by the Mux) once the peer's EOF arrives too.
        """
        if self._closed:
            return
        self._closed = True
        discarded = self._buffered
        self._chunks.clear()
        self._head = self._buffered = 0
        self._readable.set()
        self._writable.set()
        if self._registered and not self._reset and self._lost is None:
            mux = self._mux
            if discarded:
                mux._consumed(self, discarded)
            if not self._eof_sent:
                mux._send_eof(self)

    # --- called by the Mux ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._closed:
            self._mux._consumed(self, len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._eof_received = True
        self._readable.set()

    def _on_reset(self) -> None:
        self._reset = True
        self._chunks.clear()
        self._head = self._buffered = 0
        self._readable.set()
        self._writable.set()

    def _connection_lost(self, exc: BaseException) -> None:
        self._lost = exc
        self._readable.set()
        self._writable.set()


class Mux:
    """Stream multiplexer over a ByteStream (which it owns and closes).

    Use ``async with Mux(stream) as mux:`` or ``await mux.start()`` ... ``await mux.aclose()``.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        max_pending_streams: int = MAX_PENDING_STREAMS,
        linger: float = 5.0,
        read_size: int = READ_SIZE,
        credit_threshold: int = CREDIT_THRESHOLD,
    ) -> None:
        self._stream = stream
        self._proto = MuxProtocol(credit_threshold=credit_threshold)
        self._streams: dict[int, MuxStream] = {}
        self._pending = 0  # streams created by the peer that nobody has opened yet
        self._max_pending = max_pending_streams
        self._linger = linger
        self._read_size = read_size
        self._out: list[bytes] = []
        self._out_len = 0
        self._out_wakeup = asyncio.Event()  # frames queued: the writer has work
        self._out_space = asyncio.Event()  # the queue dropped below OUT_HIGH_WATER
        self._out_idle = asyncio.Event()  # queue empty and nothing being sent
        self._out_idle.set()
        self._lost: BaseException | None = None
        self._error: BaseException | None = None
        self._closed_event = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Mux:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the reader and writer tasks (idempotent)."""
        if self._closing:
            raise RuntimeError("Mux is closed")
        if self._reader_task is not None:
            return
        self._reader_task = asyncio.create_task(self._read_loop(), name="runm-mux-reader")
        self._writer_task = asyncio.create_task(self._write_loop(), name="runm-mux-writer")

    async def aclose(self) -> None:
        """Flush queued frames (for at most `linger` seconds), then stop and close. Idempotent."""
        first = not self._closing
        self._closing = True
        try:
            if first and self._writer_task is not None and self._lost is None:
                with contextlib.suppress(TimeoutError, ConnectionError):
                    async with asyncio.timeout(self._linger):
                        await self.drain()
        finally:
            self._teardown(ConnectionResetError("mux closed"), None)
            tasks = [t for t in (self._reader_task, self._writer_task) if t is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            with contextlib.suppress(Exception):
                await self._stream.aclose()

    async def wait_closed(self) -> None:
        """Return once the connection is gone (peer EOF, I/O or protocol error, or aclose)."""
        await self._closed_event.wait()

    async def drain(self) -> None:
        """Wait until every queued frame was handed to the ByteStream.

        Raises ConnectionResetError if the connection is lost first.
        """
        while True:
            if self._lost is not None:
                raise ConnectionResetError(f"mux connection lost ({self._lost})")
            if self._out_idle.is_set():
                return
            await self._out_idle.wait()

    @property
    def closed(self) -> bool:
        """The connection is gone; no stream can do I/O any more."""
        return self._lost is not None

    @property
    def error(self) -> BaseException | None:
        """Why the connection ended: None for peer EOF or aclose(), else the exception."""
        return self._error

    # --- streams -------------------------------------------------------------------------

    def open(self, stream_id: int) -> MuxStream:
        """The stream with this id (the same object while it is not finished).

        Opening a finished id, or any id after the connection is gone, returns a stream whose
        I/O fails (reset / connection lost).
        """
        check_stream_id(stream_id)
        s = self._streams.get(stream_id)
        if s is not None:
            if not s._opened:
                s._opened = True
                self._pending -= 1
            return s
        s = MuxStream(self, stream_id)
        s._opened = True
        if self._lost is not None:
            s._connection_lost(self._lost)
        elif self._proto.is_closed(stream_id):
            s._on_reset()
        else:
            self._streams[stream_id] = s
        return s

    def _incoming(self, stream_id: int) -> MuxStream | None:
        """A stream the peer started before we opened it; None if over the pending limit."""
        if self._pending >= self._max_pending:
            self._enqueue(self._proto.send_reset(stream_id))
            return None
        s = MuxStream(self, stream_id)
        self._streams[stream_id] = s
        self._pending += 1
        return s

    def _forget(self, s: MuxStream) -> None:
        if self._streams.get(s._id) is s:
            del self._streams[s._id]
            if not s._opened:
                self._pending -= 1

    def _consumed(self, s: MuxStream, n: int) -> None:
        if self._lost is None and self._streams.get(s._id) is s:
            self._enqueue(self._proto.consumed(s._id, n))

    def _send_eof(self, s: MuxStream) -> None:
        self._enqueue(self._proto.send_eof(s._id))
        s._eof_sent = True
        if self._proto.is_closed(s._id):
            self._forget(s)

    def _send_reset(self, s: MuxStream) -> None:
        self._enqueue(self._proto.send_reset(s._id))
        self._forget(s)

    # --- output --------------------------------------------------------------------------

    def _enqueue(self, frames: bytes) -> None:
        if not frames or self._lost is not None:
            return
        self._out.append(frames)
        self._out_len += len(frames)
        self._out_idle.clear()
        self._out_wakeup.set()
        if self._out_len >= OUT_HIGH_WATER:
            self._out_space.clear()

    async def _wait_for_space(self) -> None:
        if self._out_len >= OUT_HIGH_WATER and self._lost is None:
            self._out_space.clear()
            await self._out_space.wait()

    async def _write_loop(self) -> None:
        try:
            while self._lost is None:
                if not self._out:
                    self._out_idle.set()
                    self._out_wakeup.clear()
                    await self._out_wakeup.wait()
                    continue
                chunk = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                self._out.clear()
                self._out_len = 0
                self._out_space.set()
                await self._stream.send_all(chunk)
        except Exception as exc:
            await self._abort(exc)

    # --- input ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive(self._read_size)
                if self._lost is not None:
                    return  # torn down meanwhile (writer failure): streams were already failed
                if not data:
                    break
                self._dispatch(self._proto.receive_data(data))
        except Exception as exc:
            await self._abort(exc)
            return
        partial = self._proto.buffered
        err = MuxProtocolError(f"connection closed inside a frame ({partial} bytes)")
        await self._abort(err if partial else None)

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            sid = ev.stream_id
            if isinstance(ev, CreditAvailable):
                s = self._streams.get(sid)
                if s is not None:
                    s._writable.set()
            elif isinstance(ev, DataReceived):
                s = self._streams.get(sid) or self._incoming(sid)
                if s is not None:
                    s._feed(ev.data)
            elif isinstance(ev, EndReceived):
                s = self._streams.get(sid) or self._incoming(sid)
                if s is not None:
                    s._feed_eof()
                    if self._proto.is_closed(sid):
                        self._forget(s)
            else:  # StreamReset
                s = self._streams.get(sid)
                if s is not None:
                    self._forget(s)
                    s._on_reset()

    # --- teardown ------------------------------------------------------------------------

    def _teardown(self, lost: BaseException, error: BaseException | None) -> None:
        if self._lost is not None:
            return
        self._lost = lost
        self._error = error
        self._out.clear()
        self._out_len = 0
        for s in self._streams.values():
            s._connection_lost(lost)
        self._out_wakeup.set()
        self._out_space.set()
        self._out_idle.set()
        self._closed_event.set()

    async def _abort(self, error: BaseException | None) -> None:
        """The connection is unusable: fail every stream and close the ByteStream."""
        if error is None:
            lost: BaseException = ConnectionResetError("mux connection closed by peer")
        elif isinstance(error, ConnectionError):
            lost = error
        else:
            lost = ConnectionResetError(f"mux connection failed: {error!r}")
        if error is not None and self._lost is None:
            log.warning("mux connection torn down: %r", error)
        self._teardown(lost, error)
        with contextlib.suppress(Exception):
            await self._stream.aclose()


# --- moving bytes between OS file descriptors and streams ------------------------------------


async def pump_fd_to_stream(fd: int, s: MuxStream, *, chunk_size: int = MAX_FRAME,
                            until_dry: asyncio.Event | None = None) -> int:
    """Copy a non-blocking fd (pipe, pty master, socket) into s until EOF, then write_eof().

    EIO (a pty master whose slave side is closed) counts as EOF. Once `until_dry` is set, the
    fd running dry counts as EOF too: a process that exited may leave a child holding its pipe,
    but its own last output is already in the pipe. Stops quietly if the stream is reset or the
    connection is lost. Returns the number of bytes copied; the fd is left open and its blocking
    mode untouched (the caller owns it and must make it non-blocking).
    """
    total = 0
    try:
        while True:
            try:
                data = os.read(fd, chunk_size)
            except BlockingIOError:
                if until_dry is None:
                    await wait_fd(fd)
                    continue
                if until_dry.is_set():
                    data = b""
                else:
                    await _wait_fd_or_event(fd, until_dry)
                    continue
            except OSError as err:
                if err.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                await s.write_eof()
                return total
            await s.write(data)
            total += len(data)
    except BrokenPipeError:
        return total  # the stream's reader is gone: nothing left to do


async def _wait_fd_or_event(fd: int, event: asyncio.Event) -> None:
    readable = asyncio.ensure_future(wait_fd(fd))
    is_set = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({readable, is_set}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        readable.cancel()
        is_set.cancel()


_WRITE_GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET)


async def pump_stream_to_fd(s: MuxStream, fd: int, *, chunk_size: int = MAX_FRAME) -> int:
    """Copy s into a non-blocking fd until the stream's EOF.

    If the fd's reader is gone (EPIPE; EIO from a pty; ECONNRESET) the stream is reset, which
    stops the peer's writer. Returns (also quietly when the stream was reset or the connection
    lost) the number of bytes written; the fd is left open for the caller to close.
    """
    total = 0
    while True:
        try:
            data = await s.read(chunk_size)
        except ConnectionResetError:
            return total
        if not data:
            return total
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await wait_fd(fd, writable=True)
                continue
            except OSError as err:
                if err.errno not in _WRITE_GONE:
                    raise
                await s.reset()
                return total
            view = view[n:]
            total += n
