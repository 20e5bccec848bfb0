"""asyncio ttrpc client over any ByteStream.

    async with Client(stream) as client:
        reply = await client.call("containerd.task.v2.Task", "State", req, StateResponse)
        async for event in client.stream("runm.agent.v1.Agent", "Events", req, Event):
            ...

One reader task (dispatching frames to calls by stream id) and one writer task per connection,
both started on first use (or by ``async with``) and stopped by `aclose`. Any number of calls
may run concurrently; replies are matched by stream id, in whatever order they arrive.

Errors: a non-OK status raises `TtrpcError`; the connection ending before the reply raises
`ConnectionResetError` (a ConnectionError); a local timeout raises `TimeoutError` (a reply that
arrives later is dropped); a request over 4 MiB raises `OversizedMessageError` before anything
is sent and leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Generic, Self, TypeVar

from runm.channel.stream import ByteStream
from runm.proto.codec import Message
from runm.ttrpc._writer import FrameWriter
from runm.ttrpc.calls import decode_payload, reply_of, request_bytes, response_of
from runm.ttrpc.framing import (
    Flags,
    Frame,
    FrameDecoder,
    FramingError,
    MessageType,
    OversizedFrame,
    encode_frame,
)
from runm.ttrpc.messages import Response
from runm.ttrpc.status import Code, TtrpcError

__all__ = ["Client", "ClientStream"]

logger = logging.getLogger("runm.ttrpc")

M = TypeVar("M", bound=Message)

RECEIVE_SIZE = 1 << 18
_MAX_STREAM_ID = 0xFFFFFFFF


class _Closed:
    """Queued to every open call when the connection ends."""


_CLOSED = _Closed()
_Item = Frame | OversizedFrame | _Closed


class Client:
    """A ttrpc client on one connection. Owns the stream: `aclose` closes it."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()
        self._writer = FrameWriter(stream)
        self._next_id = 1
        self._calls: dict[int, asyncio.Queue[_Item]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed: str | None = None  # why no new calls can be made

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once the connection has ended or `aclose` was called."""
        return self._closed is not None

    async def aclose(self) -> None:
        """Stop the background tasks, fail calls in flight, close the stream. Idempotent."""
        self._shutdown("ttrpc: closed")
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await self._writer.aclose()
        await self._stream.aclose()

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        """Make a unary call and return the decoded reply."""
        data = request_bytes(service, method, request, timeout, metadata)
        if timeout is not None and timeout <= 0:
            raise TimeoutError(f"ttrpc: {service}/{method}: timed out")
        stream_id, queue, sent = self._open(data, 0)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await sent
                while True:
                    item = await queue.get()
                    if isinstance(item, Frame) and item.type != MessageType.RESPONSE:
                        continue  # Data frames mean nothing to a unary call
                    return reply_of(self._response(item), response_type)
        except TimeoutError:
            if deadline.expired():
                raise TimeoutError(f"ttrpc: {service}/{method}: timed out") from None
            raise
        finally:
            self._calls.pop(stream_id, None)

    def stream(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ClientStream[M]:
        """Start a server-streaming call; iterate the result for the replies.

        The request is sent on the first iteration. The timeout covers the whole stream.
        Raises OversizedMessageError here if the request is too large.
        """
        data = request_bytes(service, method, request, timeout, metadata)
        return ClientStream(self, f"{service}/{method}", data, response_type, timeout)

    # internals shared with ClientStream

    def _start(self) -> None:
        if self._reader is None and self._closed is None:
            self._writer.start()
            self._reader = asyncio.get_running_loop().create_task(
                self._read_loop(), name="ttrpc-client-reader"
            )

    def _open(
        self, data: bytes, flags: int
    ) -> tuple[int, asyncio.Queue[_Item], asyncio.Future[None]]:
        """Allocate a stream id and queue its Request frame, in one synchronous step."""
        self._start()
        if self._closed is not None:
            raise ConnectionResetError(self._closed)
        stream_id = self._next_id
        if stream_id > _MAX_STREAM_ID:
            raise ConnectionResetError("ttrpc: stream ids exhausted on this connection")
        frame = encode_frame(stream_id, MessageType.REQUEST, flags, data)
        sent = self._writer.submit(frame)
        self._next_id += 2
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._calls[stream_id] = queue
        return stream_id, queue, sent

    def _response(self, item: _Item) -> Response:
        """The Response envelope in item, or raise what item means."""
        if isinstance(item, _Closed):
            raise ConnectionResetError(self._closed or "ttrpc: connection closed")
        return response_of(item)

    async def _read_loop(self) -> None:
        reason = "ttrpc: connection closed"
        try:
            while True:
                data = await self._stream.receive(RECEIVE_SIZE)
                if not data:
                    break
                self._decoder.feed(data)
                while (event := self._decoder.next_event()) is not None:
                    queue = self._calls.get(event.stream_id)
                    if queue is not None:
                        queue.put_nowait(event)
                    else:
                        logger.debug("ttrpc: dropping frame for stream %d", event.stream_id)
        except FramingError as err:
            logger.warning("%s", err)
            reason = f"ttrpc: connection closed: {err}"
        except OSError as err:
            reason = f"ttrpc: connection closed: {err}"
        finally:
            self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        for queue in self._calls.values():
            queue.put_nowait(_CLOSED)


class ClientStream(Generic[M]):
    """The replies of a server-streaming call: an async iterator of messages.

    Ends when the server closes the stream; raises TtrpcError if it ends it with an error
    status. Leaving the loop early is fine (`aclose`, ``async with`` or just dropping it);
    later frames for the stream are then discarded.
    """

    def __init__(
        self,
        client: Client,
        label: str,
        data: bytes,
        response_type: type[M],
        timeout: float | None,
    ) -> None:
        self._client = client
        self._label = label
        self._data = data
        self._type = response_type
        self._timeout = timeout
        self._deadline: float | None = None
        self._stream_id: int | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._sent: asyncio.Future[None] | None = None
        self._done = False

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._finish()

    def __del__(self) -> None:
        self._finish()

    def _finish(self) -> None:
        self._done = True
        if self._stream_id is not None:
            self._client._calls.pop(self._stream_id, None)

    async def __anext__(self) -> M:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            if self._timeout is not None and self._timeout <= 0:
                self._finish()
                raise TimeoutError(f"ttrpc: {self._label}: timed out")
            if self._timeout is not None:
                self._deadline = asyncio.get_running_loop().time() + self._timeout
            self._stream_id, self._queue, self._sent = self._client._open(
                self._data, Flags.REMOTE_CLOSED
            )
        deadline = asyncio.timeout_at(self._deadline)
        try:
            async with deadline:
                if self._sent is not None:
                    await self._sent
                    self._sent = None
                return await self._next(self._queue)
        except TimeoutError:
            if deadline.expired():
                self._finish()
                raise TimeoutError(f"ttrpc: {self._label}: timed out") from None
            raise

    async def _next(self, queue: asyncio.Queue[_Item]) -> M:
        while True:
            item = await queue.get()
            if isinstance(item, Frame) and item.type == MessageType.DATA:
                if item.flags & Flags.REMOTE_CLOSED:
                    self._finish()
                    if item.flags & Flags.NO_DATA:
                        raise StopAsyncIteration
                return decode_payload(self._type, item.data)
            if isinstance(item, Frame) and item.type != MessageType.RESPONSE:
                continue
            self._finish()
            response = self._client._response(item)
            if response.status is not None and response.status.code != Code.OK:
                raise TtrpcError.from_status(response.status)
            if not response.payload:
                raise StopAsyncIteration
            return decode_payload(self._type, response.payload)

