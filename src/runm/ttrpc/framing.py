"""ttrpc framing, sans I/O: bytes in -> frames out, frames in -> bytes out.

Every ttrpc message is a 10-byte big-endian header ``>IIBB`` (data length, stream id, message
type, flags) followed by the data. Data longer than `MAX_DATA` (4 MiB) is not allowed: a sender
refuses it (`encode_frame` raises `OversizedMessageError`), a receiver skips the payload and
answers the stream with RESOURCE_EXHAUSTED. `FrameDecoder` reports such frames as
`OversizedFrame` without ever buffering their payload.

One deviation from Go ttrpc: a header whose length has its top byte set (>= 16 MiB) cannot come
from any conforming sender (they all refuse > 4 MiB), so it means the byte stream is out of step
(garbage, or a peer that is not speaking ttrpc). Go would quietly discard up to 4 GiB; we raise
`FramingError` so the connection is dropped at once.
"""

from __future__ import annotations

import struct
from collections import deque
from enum import IntEnum, IntFlag
from typing import Any

from runm.records import record
from runm.ttrpc.status import Code, TtrpcError

__all__ = [
    "HEADER_SIZE",
    "MAX_DATA",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FramingError",
    "MessageType",
    "OversizedFrame",
    "OversizedMessageError",
    "encode_frame",
]

MAX_DATA = 4 << 20
HEADER_SIZE = 10
_HEADER = struct.Struct(">IIBB")
# Lengths at or above this have the reserved top byte set: never sent by a conforming peer.
_DESYNC_LENGTH = 1 << 24
_MAX_STREAM_ID = 0xFFFFFFFF


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(IntFlag):
    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


class OversizedMessageError(TtrpcError):
    """A message longer than the ttrpc limit (status RESOURCE_EXHAUSTED).

    Raised instead of sending one; the text matches Go ttrpc's OversizedMessageErr:
    ``message length N exceed maximum message size of 4194304``.
    """

    def __init__(self, length: int, max_data: int = MAX_DATA) -> None:
        self.length = length
        self.max_data = max_data
        super().__init__(
            Code.RESOURCE_EXHAUSTED,
            f"message length {length} exceed maximum message size of {max_data}",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (OversizedMessageError, (self.length, self.max_data))


class FramingError(ValueError):
    """The byte stream cannot be split into frames any more; drop the connection."""


@record(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


@record(frozen=True)
class OversizedFrame:
    """A frame whose data exceeded the limit; its payload was discarded."""

    stream_id: int
    type: int
    length: int


def encode_frame(
    stream_id: int, type: int, flags: int, data: bytes, *, max_data: int = MAX_DATA
) -> bytes:
    """The wire bytes of one frame. Raises OversizedMessageError if data is over the limit."""
    if len(data) > max_data:
        raise OversizedMessageError(len(data), max_data)
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    return _HEADER.pack(len(data), stream_id, type, flags) + data


class FrameDecoder:
    """Incremental frame parser: `feed` bytes in any chunking, then drain `next_event`.

    Complete frames are parsed as soon as they are fed; only the bytes of an incomplete frame
    stay buffered (`pending`). The payload of an oversized frame is counted down and dropped as
    it arrives (`skipping` bytes still to drop).

    Garbage that breaks framing (see the module docstring) is reported in order: `next_event`
    first returns the frames that preceded it, then raises FramingError; from then on `feed` and
    `next_event` raise FramingError and no bytes are kept.
    """

    def __init__(self, *, max_data: int = MAX_DATA) -> None:
        self._max_data = max_data
        self._buf = bytearray()
        self._events: deque[Frame | OversizedFrame] = deque()
        self._skip = 0
        self._error: str | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered towards a frame not yet complete."""
        return len(self._buf)

    @property
    def skipping(self) -> int:
        """Payload bytes of an oversized frame still to be discarded."""
        return self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise FramingError(self._error)
        view = memoryview(data).cast("B")
        if self._skip and not self._buf:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        self._buf += view
        self._parse()

    def next_event(self) -> Frame | OversizedFrame | None:
        """The next complete frame, or None until more bytes are fed."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise FramingError(self._error)
        return None

    def _parse(self) -> None:
        buf = self._buf
        pos, end = 0, len(buf)
        try:
            while self._error is None:
                if self._skip:
                    n = min(self._skip, end - pos)
                    pos += n
                    self._skip -= n
                    if self._skip:
                        return
                if end - pos < HEADER_SIZE:
                    return
                length, stream_id, mtype, flags = _HEADER.unpack_from(buf, pos)
                if length >= _DESYNC_LENGTH:
                    self._error = (
                        f"ttrpc: bad frame header {bytes(buf[pos : pos + HEADER_SIZE]).hex()}"
                        f" (length {length}): stream out of sync"
                    )
                    pos = end
                    return
                if length > self._max_data:
                    self._events.append(OversizedFrame(stream_id, mtype, length))
                    pos += HEADER_SIZE
                    self._skip = length
                    continue
                frame_end = pos + HEADER_SIZE + length
                if frame_end > end:
                    return
                self._events.append(
                    Frame(stream_id, mtype, flags, bytes(buf[pos + HEADER_SIZE : frame_end]))
                )
                pos = frame_end
        finally:
            del buf[:pos]
