"""One unary ttrpc call over a blocking socket, for short-lived commands.

`runm state`, `kill`, `start` and the like make a single call to their container's monitor and
exit: the asyncio client would cost them its import (~50 ms, a fifth of `runm state`) for
nothing. Same wire behaviour and errors as `Client.call`: a non-OK status raises `TtrpcError`,
the connection ending first raises `ConnectionResetError`, the timeout `TimeoutError`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import TypeVar

from runm.proto.codec import Message
from runm.ttrpc.calls import reply_of, request_bytes, response_of
from runm.ttrpc.framing import Frame, FrameDecoder, FramingError, MessageType, encode_frame

__all__ = ["call_unix"]

M = TypeVar("M", bound=Message)

RECEIVE_SIZE = 1 << 16
STREAM_ID = 1  # a client's first stream


def call_unix(
    path: str,
    service: str,
    method: str,
    request: Message,
    response_type: type[M],
    *,
    timeout: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> M:
    """Connect to the ttrpc server at unix socket `path`, make one call, return its reply."""
    data = request_bytes(service, method, request, timeout, metadata)
    label = f"ttrpc: {service}/{method}"
    if timeout is not None and timeout <= 0:  # as Client.call (settimeout(0): non-blocking)
        raise TimeoutError(f"{label}: timed out")
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(encode_frame(STREAM_ID, MessageType.REQUEST, 0, data))
            decoder = FrameDecoder()
            while True:
                while (event := decoder.next_event()) is not None:
                    if event.stream_id != STREAM_ID:
                        continue
                    if isinstance(event, Frame) and event.type != MessageType.RESPONSE:
                        continue  # Data frames mean nothing to a unary call
                    return reply_of(response_of(event), response_type)
                if deadline is not None:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = sock.recv(RECEIVE_SIZE)
                if not chunk:
                    raise ConnectionResetError("ttrpc: connection closed")
                decoder.feed(chunk)
        except TimeoutError:
            raise TimeoutError(f"{label}: timed out") from None
        except FramingError as err:
            raise ConnectionResetError(f"ttrpc: connection closed: {err}") from None
