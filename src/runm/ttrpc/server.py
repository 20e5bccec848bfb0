"""asyncio ttrpc server: serves registered unary and server-streaming methods on ByteStreams.

    server = Server()
    server.register_unary("containerd.task.v2.Task", "State", StateRequest, state)
    await server.serve(stream)                 # one connection, until EOF
    listener = await serve_unix(server, path)  # or every connection on a unix socket

Each Request runs in its own task, so a blocking handler (Wait) never holds up another (Kill).
Replies go through one writer task per connection, so frames never interleave. When a
connection ends its handler tasks are cancelled and awaited before `serve` returns.

Status mapping: a handler raising `TtrpcError` answers with that status; exceeding the client's
timeout_nano answers DEADLINE_EXCEEDED "context deadline exceeded"; any other exception answers
UNKNOWN with the exception text and is logged (logger "runm.ttrpc"). Protocol errors follow Go
ttrpc 1.2: oversized frame -> RESOURCE_EXHAUSTED; even stream id, re-used stream id or an
undecodable Request envelope -> INVALID_ARGUMENT; unknown service/method -> UNIMPLEMENTED. Frames
other than Request (Data, Response, unknown types) are ignored: client-streaming is not
supported. Bytes that cannot be framed end that connection (see framing.FramingError).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from runm.channel.stream import AsyncioByteStream, ByteStream
from runm.proto.codec import DecodeError, Message
from runm.records import record
from runm.ttrpc._writer import FrameWriter
from runm.ttrpc.framing import (
    Flags,
    Frame,
    FrameDecoder,
    FramingError,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    encode_frame,
)
from runm.ttrpc.messages import Request, Response, Status
from runm.ttrpc.status import Code, TtrpcError

__all__ = ["CallContext", "Server", "serve_unix"]

logger = logging.getLogger("runm.ttrpc")

Req = TypeVar("Req", bound=Message)

RECEIVE_SIZE = 1 << 18
NAMESPACE_KEY = "containerd-namespace-ttrpc"


@record
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    metadata: dict[str, list[str]]  # keys lower-cased; a key may carry several values
    deadline: float | None  # event loop time (loop.time()) the caller gives up, if it set one
    stream_id: int
    # Set by a handler: stop serving this connection once its reply is sent (the next bytes
    # on the stream belong to a new peer, e.g. a VM about to be snapshotted).
    end_connection: bool = False
    # Set by a handler: called once its reply is on the wire (e.g. to exit after answering).
    on_replied: Callable[[], None] | None = None

    def get(self, key: str) -> str | None:
        """The first metadata value for key (case-insensitive), or None."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace (metadata ``containerd-namespace-ttrpc``), if sent."""
        return self.get(NAMESPACE_KEY)


@record(frozen=True)
class _Method:
    streaming: bool
    request_type: type[Message]
    handler: Callable[[Any, CallContext], Any]


class Server:
    """A registry of methods; `serve` runs it on connections."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, _Method]] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    def register_unary(
        self,
        service: str,
        method: str,
        request_type: type[Req],
        handler: Callable[[Req, CallContext], Awaitable[Message]],
    ) -> None:
        self._register(service, method, _Method(False, request_type, handler))

    def register_stream(
        self,
        service: str,
        method: str,
        request_type: type[Req],
        handler: Callable[[Req, CallContext], AsyncIterator[Message]],
    ) -> None:
        """Register a server-streaming method; handler is typically an async generator."""
        self._register(service, method, _Method(True, request_type, handler))

    def _register(self, service: str, method: str, entry: _Method) -> None:
        methods = self._services.setdefault(service, {})
        if method in methods:
            raise ValueError(f"ttrpc: {service}/{method} is already registered")
        methods[method] = entry

    def _lookup(self, service: str, method: str) -> _Method:
        methods = self._services.get(service)
        if methods is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")
        entry = methods.get(method)
        if entry is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        return entry

    async def serve(self, stream: ByteStream) -> None:
        """Serve one connection until the peer closes it (or `aclose`); then close the stream.

        Returns normally however the connection ends; re-raises only its own cancellation.
        """
        if self._closing:
            await stream.aclose()
            return
        conn = _Connection(self, stream)
        task = asyncio.get_running_loop().create_task(conn.run(), name="ttrpc-connection")
        self._connections.add(task)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we were cancelled, not just the connection by aclose()
        finally:
            self._connections.discard(task)

    async def aclose(self) -> None:
        """End every connection being served (their `serve` calls return) and refuse new ones."""
        self._closing = True
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_unix(server: Server, path: str) -> asyncio.base_events.Server:
    """Listen on a unix socket at path and serve each connection in its own task.

    Close with ``listener.close()`` (stop accepting) and ``await server.aclose()`` (end the
    connections being served). The socket file is left for the caller to remove.
    """

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.serve(AsyncioByteStream(reader, writer))

    return await asyncio.start_unix_server(on_connect, path)


class _Connection:
    def __init__(self, server: Server, stream: ByteStream) -> None:
        self._server = server
        self._stream = stream
        self._writer = FrameWriter(stream)
        self._decoder = FrameDecoder()
        self._last_stream_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()

    async def run(self) -> None:
        self._writer.start()
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            while True:
                receive = asyncio.ensure_future(self._stream.receive(RECEIVE_SIZE))
                try:
                    await asyncio.wait({receive, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    receive.cancel()
                if ended.done() or receive.cancelled():
                    return  # a handler ended the connection: later bytes are not for us
                data = receive.result()
                if not data:
                    return
                self._decoder.feed(data)
                while (event := self._decoder.next_event()) is not None:
                    await self._dispatch(event)
        except FramingError as err:
            logger.warning("%s; closing the connection", err)
        except OSError as err:  # includes ConnectionError from the writer
            logger.debug("ttrpc: connection ended: %s", err)
        except Exception:
            logger.exception("ttrpc: internal error; closing the connection")
        finally:
            ended.cancel()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._writer.aclose()
            with contextlib.suppress(OSError):
                await self._stream.aclose()

    async def _dispatch(self, event: Frame | OversizedFrame) -> None:
        if isinstance(event, OversizedFrame):
            await self._send_error(event.stream_id, OversizedMessageError(event.length))
            return
        if event.type != MessageType.REQUEST:
            return
        stream_id = event.stream_id
        if stream_id % 2 != 1:
            await self._send_error(
                stream_id,
                TtrpcError(
                    Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
                ),
            )
            return
        try:
            request = Request.decode(event.data)
        except DecodeError as err:
            await self._send_error(
                stream_id, TtrpcError(Code.INVALID_ARGUMENT, f"unmarshal request error: {err}")
            )
            return
        if stream_id <= self._last_stream_id:
            await self._send_error(
                stream_id,
                TtrpcError(Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"),
            )
            return
        self._last_stream_id = stream_id
        try:
            method = self._server._lookup(request.service, request.method)
        except TtrpcError as err:
            await self._send_error(stream_id, err)
            return
        task = asyncio.get_running_loop().create_task(
            self._run_call(method, request, stream_id),
            name=f"ttrpc {request.service}/{request.method} #{stream_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_error(self, stream_id: int, error: TtrpcError) -> None:
        response = Response(status=error.to_status())
        await self._writer.write(
            encode_frame(stream_id, MessageType.RESPONSE, 0, response.encode())
        )

    async def _run_call(self, method: _Method, request: Request, stream_id: int) -> None:
        loop = asyncio.get_running_loop()
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        ctx = CallContext(request.service, request.method, metadata, deadline, stream_id)
        label = f"{request.service}/{request.method}"
        try:
            error = await self._invoke(method, request.payload, ctx, label)
            if error is not None:
                await self._send_error(stream_id, error)
        except (ConnectionError, _ConnectionLost) as err:
            logger.debug("ttrpc: %s: reply not sent: %s", label, err)

    async def _invoke(
        self, method: _Method, payload: bytes, ctx: CallContext, label: str
    ) -> TtrpcError | None:
        """Run the handler and send its replies; return the error status to send, if any."""
        timeout = asyncio.timeout_at(ctx.deadline)
        final: bytes
        try:
            try:
                request = method.request_type.decode(payload)
            except DecodeError as err:
                raise TtrpcError(
                    Code.INVALID_ARGUMENT,
                    f"cannot decode {method.request_type.__name__}: {err}",
                ) from None
            async with timeout:
                if method.streaming:
                    await self._stream_replies(method, request, ctx)
                    final = encode_frame(
                        ctx.stream_id, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b""
                    )
                else:
                    reply: Message = await method.handler(request, ctx)
                    response = Response(status=Status(), payload=reply.encode())
                    final = encode_frame(ctx.stream_id, MessageType.RESPONSE, 0, response.encode())
        except TtrpcError as err:
            return err
        except TimeoutError as err:
            if timeout.expired():
                return TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            return _unknown(label, err)
        except _ConnectionLost:
            raise
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return TtrpcError(Code.CANCELLED, "context canceled")  # handler's own cancellation
        except Exception as err:
            return _unknown(label, err)
        await self._writer.write(final)
        if ctx.on_replied is not None:
            ctx.on_replied()
        if ctx.end_connection:
            self._ended.set()  # write() returned: the reply is on the wire
        return None

    async def _stream_replies(self, method: _Method, request: Message, ctx: CallContext) -> None:
        replies: AsyncIterator[Message] = method.handler(request, ctx)
        try:
            async for reply in replies:
                frame = encode_frame(ctx.stream_id, MessageType.DATA, 0, reply.encode())
                try:
                    await self._writer.write(frame)
                except ConnectionError as err:
                    raise _ConnectionLost(str(err)) from err
        finally:
            aclose = getattr(replies, "aclose", None)
            if aclose is not None:
                await aclose()


class _ConnectionLost(Exception):
    """A reply could not be written: the connection is gone (not the handler's fault)."""


def _unknown(label: str, err: BaseException) -> TtrpcError:
    logger.error("ttrpc: %s failed: %r", label, err, exc_info=err)
    return TtrpcError(Code.UNKNOWN, str(err) or type(err).__name__)
