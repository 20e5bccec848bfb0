"""The sans-I/O core of the stdio stream multiplexer: framing, flow control, stream lifecycle.

No sockets, no asyncio: `MuxProtocol` turns received bytes into events and local intents into
bytes to send, in the style of h11. `runm.channel.mux` drives it over a ByteStream.

Wire format
-----------
Every frame is a 9-byte header, ``struct ">IBI"`` = (stream_id: uint32, nonzero; type: uint8;
length: uint32), followed by ``length`` payload bytes.

========  =====  =====================================================================
type      value  payload
========  =====  =====================================================================
DATA      0      1..MAX_FRAME (65536) bytes of stream data
EOF       1      none (length 0): the sender sends no more DATA on this stream
CREDIT    2      4-byte big-endian increment (>= 1): the receiver consumed that many bytes,
                 the sender may send that many more
RESET     3      none (length 0): abort the stream in both directions
========  =====  =====================================================================

Flow control: each stream starts with a send window of INITIAL_WINDOW (4 MiB) bytes in each
direction; both sides know it, there is no handshake. DATA consumes window, CREDIT restores it;
so a peer never has more than INITIAL_WINDOW unconsumed bytes of one stream in flight or
buffered, however slowly the application reads. CREDIT is batched: it is sent once at least
`credit_threshold` (1 MiB) bytes are owed (or on an explicit flush), and not at all once the
peer has sent EOF (it cannot use it).

Streams: ids are chosen by the host and passed out of band; either side may send on any id it
has been told about, and DATA/EOF for an id not seen before creates the stream (the receiver
buffers it, bounded by the window, until the application opens it). A stream is *finished*
once it is reset (by either side) or both sides have sent EOF; its state is then dropped and
its id remembered (the last `max_closed` ids) so that frames still in flight for it (DATA sent
before the peer saw our RESET, a late CREDIT or RESET) are silently discarded instead of
re-creating it. Stream ids must therefore not be reused on one connection.

Protocol errors (raise `MuxProtocolError`; the connection must be torn down): stream id 0,
unknown type, DATA that is empty, longer than MAX_FRAME or beyond the receive window, DATA or
EOF after EOF, EOF/RESET with a payload, CREDIT whose payload is not 4 bytes, whose increment is
0, or which would raise the send window above INITIAL_WINDOW (more credit than data sent).
"""

from __future__ import annotations

import struct

from runm.records import record

HEADER = struct.Struct(">IBI")
HEADER_SIZE = HEADER.size  # 9
_U32 = struct.Struct(">I")

DATA = 0
EOF = 1
CREDIT = 2
RESET = 3

MAX_FRAME = 65536
# Under TCG a credit's round trip through the guest takes tens of ms: the window must cover
# that at tens of MB/s. 256 KiB / 16 KiB carried 23 MB/s out, 4 MiB / 1 MiB 55 (dd bs=64k).
INITIAL_WINDOW = 4 << 20
CREDIT_THRESHOLD = 1 << 20
MAX_STREAM_ID = 0xFFFFFFFF
MAX_CLOSED = 4096

_TYPE_NAMES = {DATA: "DATA", EOF: "EOF", CREDIT: "CREDIT", RESET: "RESET"}


class MuxProtocolError(Exception):
    """The peer violated the mux protocol; the connection is unusable."""


@record(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@record(frozen=True, slots=True)
class EndReceived:
    """The peer sent EOF: no more data will arrive on this stream."""

    stream_id: int


@record(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream (both directions)."""

    stream_id: int


@record(frozen=True, slots=True)
class CreditAvailable:
    """The peer granted credit: `window(stream_id)` grew."""

    stream_id: int


Event = DataReceived | EndReceived | StreamReset | CreditAvailable


def _unpack_header(buf: bytes | bytearray | memoryview, offset: int) -> tuple[int, int, int]:
    stream_id, ftype, length = HEADER.unpack_from(buf, offset)
    return int(stream_id), int(ftype), int(length)


def check_stream_id(stream_id: int) -> None:
    if not 0 < stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id must be in 1..{MAX_STREAM_ID}, not {stream_id}")


class _StreamState:
    __slots__ = ("eof_received", "eof_sent", "owed", "recv_window", "send_window", "unconsumed")

    def __init__(self) -> None:
        self.send_window = INITIAL_WINDOW  # bytes we may still send
        self.recv_window = INITIAL_WINDOW  # bytes the peer may still send
        self.unconsumed = 0  # received, not yet consumed by the application
        self.owed = 0  # consumed, not yet credited to the peer
        self.eof_sent = False
        self.eof_received = False


class MuxProtocol:
    """State of one mux connection (one side). Not thread-safe; no I/O."""

    def __init__(
        self, *, credit_threshold: int = CREDIT_THRESHOLD, max_closed: int = MAX_CLOSED
    ) -> None:
        if not 0 < credit_threshold <= INITIAL_WINDOW:
            raise ValueError(f"credit_threshold must be in 1..{INITIAL_WINDOW}")
        if max_closed < 0:
            raise ValueError("max_closed must be >= 0")
        self._credit_threshold = credit_threshold
        self._max_closed = max_closed
        self._streams: dict[int, _StreamState] = {}
        self._closed: dict[int, None] = {}  # insertion-ordered set of finished ids
        self._partial = bytearray()  # an incomplete frame carried over between chunks
        self._error: MuxProtocolError | None = None

    # --- introspection -------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for the rest of it."""
        return len(self._partial)

    def is_active(self, stream_id: int) -> bool:
        """The stream has state (something was sent or received and it is not finished)."""
        return stream_id in self._streams

    def is_closed(self, stream_id: int) -> bool:
        """The stream finished (reset, or EOF both ways) and its id is still remembered."""
        return stream_id in self._closed

    def window(self, stream_id: int) -> int:
        """How many bytes `send_data` may send on the stream right now."""
        st = self._streams.get(stream_id)
        if st is None:
            return 0 if stream_id in self._closed else INITIAL_WINDOW
        return 0 if st.eof_sent else st.send_window

    # --- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse received bytes (any chunking) into events. Raises MuxProtocolError."""
        if self._error is not None:
            raise self._error
        events: list[Event] = []
        try:
            with memoryview(data) as view:
                pos = self._finish_partial(view, events)
                pos = self._parse(view, pos, events)
                if pos < len(view):
                    self._partial += view[pos:]
        except MuxProtocolError as err:
            self._error = err
            self._partial.clear()
            raise
        return events

    def _finish_partial(self, view: memoryview, events: list[Event]) -> int:
        """Complete a frame left over from the previous chunk; return how much of view it took."""
        partial = self._partial
        if not partial:
            return 0
        pos = 0
        if len(partial) < HEADER_SIZE:
            pos = min(HEADER_SIZE - len(partial), len(view))
            partial += view[:pos]
            if len(partial) < HEADER_SIZE:
                return pos
        stream_id, ftype, length = _unpack_header(partial, 0)
        self._check_header(stream_id, ftype, length)
        take = min(HEADER_SIZE + length - len(partial), len(view) - pos)
        partial += view[pos : pos + take]
        pos += take
        if len(partial) == HEADER_SIZE + length:
            payload = bytes(partial[HEADER_SIZE:])
            partial.clear()
            self._handle(stream_id, ftype, payload, events)
        return pos

    def _parse(self, view: memoryview, pos: int, events: list[Event]) -> int:
        end = len(view)
        while end - pos >= HEADER_SIZE:
            stream_id, ftype, length = _unpack_header(view, pos)
            self._check_header(stream_id, ftype, length)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            self._handle(stream_id, ftype, view[pos + HEADER_SIZE : stop], events)
            pos = stop
        return pos

    @staticmethod
    def _check_header(stream_id: int, ftype: int, length: int) -> None:
        """Checks that need only the header, so a bogus length is caught before buffering."""
        if stream_id == 0:
            raise MuxProtocolError("frame for stream id 0")
        if ftype == DATA:
            if not 0 < length <= MAX_FRAME:
                raise MuxProtocolError(
                    f"stream {stream_id}: DATA length {length} not in 1..{MAX_FRAME}"
                )
        elif ftype == CREDIT:
            if length != _U32.size:
                raise MuxProtocolError(f"stream {stream_id}: CREDIT length {length} != 4")
        elif ftype in (EOF, RESET):
            if length != 0:
                raise MuxProtocolError(
                    f"stream {stream_id}: {_TYPE_NAMES[ftype]} with {length} payload bytes"
                )
        else:
            raise MuxProtocolError(f"stream {stream_id}: unknown frame type {ftype}")

    def _handle(
        self, stream_id: int, ftype: int, payload: bytes | memoryview, events: list[Event]
    ) -> None:
        if ftype == CREDIT:
            increment = int(_U32.unpack(payload)[0])
            if increment == 0:
                raise MuxProtocolError(f"stream {stream_id}: CREDIT of 0")
            st = self._streams.get(stream_id)
            if st is None:
                return  # finished (or never used) stream: nothing to credit
            st.send_window += increment
            if st.send_window > INITIAL_WINDOW:
                raise MuxProtocolError(f"stream {stream_id}: CREDIT beyond the data sent")
            events.append(CreditAvailable(stream_id))
            return
        if ftype == RESET:
            if stream_id in self._closed:
                return
            self._streams.pop(stream_id, None)
            self._remember_closed(stream_id)
            events.append(StreamReset(stream_id))
            return
        # DATA or EOF
        st = self._streams.get(stream_id)
        if st is None:
            if stream_id in self._closed:
                return  # in flight when we reset or finished it
            st = self._streams[stream_id] = _StreamState()
        if st.eof_received:
            raise MuxProtocolError(f"stream {stream_id}: {_TYPE_NAMES[ftype]} after EOF")
        if ftype == EOF:
            st.eof_received = True
            events.append(EndReceived(stream_id))
            self._maybe_finish(stream_id, st)
            return
        n = len(payload)
        if n > st.recv_window:
            raise MuxProtocolError(
                f"stream {stream_id}: {n} DATA bytes exceed the window of {st.recv_window}"
            )
        st.recv_window -= n
        st.unconsumed += n
        events.append(DataReceived(stream_id, bytes(payload)))

    # --- sending -------------------------------------------------------------------------

    def _sendable(self, stream_id: int) -> _StreamState:
        check_stream_id(stream_id)
        st = self._streams.get(stream_id)
        if st is None:
            if stream_id in self._closed:
                raise ValueError(f"stream {stream_id} is finished")
            st = self._streams[stream_id] = _StreamState()
        elif st.eof_sent:
            raise ValueError(f"stream {stream_id}: EOF already sent")
        return st

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, int]:
        """Frame as much of data as the window allows: (wire bytes, data bytes consumed)."""
        st = self._sendable(stream_id)
        n = min(len(data), st.send_window)
        if n <= 0:
            return b"", 0
        parts: list[bytes | memoryview] = []
        with memoryview(data) as view:
            for start in range(0, n, MAX_FRAME):
                size = min(MAX_FRAME, n - start)
                parts.append(HEADER.pack(stream_id, DATA, size))
                parts.append(view[start : start + size])
            wire = b"".join(parts)
            parts.clear()  # drop the sub-views before view is released
        st.send_window -= n
        return wire, n

    def send_eof(self, stream_id: int) -> bytes:
        st = self._sendable(stream_id)
        st.eof_sent = True
        self._maybe_finish(stream_id, st)
        return HEADER.pack(stream_id, EOF, 0)

    def send_reset(self, stream_id: int) -> bytes:
        """RESET frame; b"" if the stream is already finished (nothing left to abort)."""
        check_stream_id(stream_id)
        if stream_id in self._closed:
            return b""
        self._streams.pop(stream_id, None)
        self._remember_closed(stream_id)
        return HEADER.pack(stream_id, RESET, 0)

    def consumed(self, stream_id: int, n: int, *, flush: bool = False) -> bytes:
        """The application consumed n received bytes: a CREDIT frame, or b"" while batching.

        Owed credit is sent once it reaches the threshold, or whenever flush is true; never
        after the peer's EOF (it will not send again) or for a finished stream.
        """
        if n < 0:
            raise ValueError("consumed() needs n >= 0")
        st = self._streams.get(stream_id)
        if st is None:
            return b""  # finished: nobody needs the credit
        if n > st.unconsumed:
            raise ValueError(
                f"stream {stream_id}: consumed {n} bytes but only {st.unconsumed} unconsumed"
            )
        st.unconsumed -= n
        if st.eof_received:
            st.owed = 0
            return b""
        st.owed += n
        if st.owed == 0 or (st.owed < self._credit_threshold and not flush):
            return b""
        increment, st.owed = st.owed, 0
        st.recv_window += increment
        return HEADER.pack(stream_id, CREDIT, _U32.size) + _U32.pack(increment)

    # --- lifecycle -----------------------------------------------------------------------

    def _maybe_finish(self, stream_id: int, st: _StreamState) -> None:
        if st.eof_sent and st.eof_received:
            del self._streams[stream_id]
            self._remember_closed(stream_id)

    def _remember_closed(self, stream_id: int) -> None:
        self._closed[stream_id] = None
        while len(self._closed) > self._max_closed:
            del self._closed[next(iter(self._closed))]
