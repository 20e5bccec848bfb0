"""runm.ttrpc client and server talking over real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runm.channel.stream import AsyncioByteStream
from runm.proto.codec import Message, pfield
from runm.ttrpc import (
    MAX_DATA,
    CallContext,
    Client,
    Code,
    OversizedMessageError,
    Server,
    TtrpcError,
    serve_unix,
)
from runm.ttrpc.framing import Flags, Frame, FrameDecoder, MessageType, encode_frame
from runm.ttrpc.messages import KeyValue, Request, Response

SVC = "runm.test.v1.Echo"
T = TypeVar("T")


@dataclass
class Echo(Message):
    text: str = pfield(1, "string")
    count: int = pfield(2, "int64")


@dataclass
class Strict(Message):
    """Decoding an Echo-shaped payload with text in field 1 as this fails (wire type)."""

    number: int = pfield(1, "int64")


def run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(factory(), 5)

    return asyncio.run(guarded())


async def stream_pair() -> tuple[AsyncioByteStream, AsyncioByteStream]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return AsyncioByteStream(ra, wa), AsyncioByteStream(rb, wb)


@asynccontextmanager
async def connected(server: Server) -> AsyncIterator[Client]:
    client_side, server_side = await stream_pair()
    serving = asyncio.create_task(server.serve(server_side))
    try:
        async with Client(client_side) as client:
            yield client
    finally:
        await asyncio.wait_for(serving, 2)  # the server sees EOF and returns normally


class RawPeer:
    """A hand-driven end of a connection, for sending what a well-behaved client would not."""

    def __init__(self, stream: AsyncioByteStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, stream_id: int, mtype: int, data: bytes, flags: int = 0) -> None:
        await self.stream.send_all(encode_frame(stream_id, mtype, flags, data))

    async def request(self, stream_id: int, method: str, payload: bytes, **kw: Any) -> None:
        envelope = Request(service=SVC, method=method, payload=payload, **kw)
        await self.send(stream_id, MessageType.REQUEST, envelope.encode())

    async def frame(self) -> Frame:
        while (event := self.decoder.next_event()) is None:
            data = await self.stream.receive()
            assert data, "connection closed"
            self.decoder.feed(data)
        assert isinstance(event, Frame)
        return event

    async def response(self) -> tuple[int, Response]:
        frame = await self.frame()
        assert frame.type == MessageType.RESPONSE
        assert frame.flags == 0
        return frame.stream_id, Response.decode(frame.data)


@asynccontextmanager
async def raw_to(server: Server) -> AsyncIterator[tuple[RawPeer, asyncio.Task[None]]]:
    peer_side, server_side = await stream_pair()
    serving = asyncio.create_task(server.serve(server_side))
    try:
        yield RawPeer(peer_side), serving
    finally:
        await peer_side.aclose()
        await asyncio.wait_for(serving, 2)


def echo_server(**extra: Callable[[Echo, CallContext], Awaitable[Message]]) -> Server:
    server = Server()

    async def echo(req: Echo, ctx: CallContext) -> Echo:
        return Echo(text=req.text, count=req.count + 1)

    server.register_unary(SVC, "Echo", Echo, echo)
    for name, handler in extra.items():
        server.register_unary(SVC, name, Echo, handler)
    return server


def test_unary_call_returns_decoded_reply() -> None:
    async def main() -> Echo:
        async with connected(echo_server()) as client:
            return await client.call(SVC, "Echo", Echo("hi", 41), Echo)

    assert run(main) == Echo("hi", 42)


def test_empty_reply_decodes_to_defaults() -> None:
    async def main() -> Echo:
        async with connected(echo_server()) as client:
            return await client.call(SVC, "Echo", Echo(), Echo)

    assert run(main) == Echo("", 1)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (Code.NOT_FOUND, "container c1 does not exist"),
        (Code.ALREADY_EXISTS, "id c1 is already in use"),
        (Code.FAILED_PRECONDITION, "container not running"),
    ],
)
def test_error_status_arrives_as_ttrpc_error(code: Code, text: str) -> None:
    async def fail(req: Echo, ctx: CallContext) -> Echo:
        raise TtrpcError(code, text)

    async def main() -> None:
        async with connected(echo_server(Fail=fail)) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Fail", Echo(), Echo)
            assert info.value.code == code
            assert info.value.message == text
            assert str(info.value) == f"ttrpc: {code.name.lower().replace('_', ' ')}: {text}"

    run(main)


def test_unknown_service_and_method_are_unimplemented() -> None:
    async def main() -> None:
        async with connected(echo_server()) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call("no.such.Service", "Echo", Echo(), Echo)
            assert (info.value.code, info.value.message) == (
                Code.UNIMPLEMENTED,
                "service no.such.Service",
            )
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Nope", Echo(), Echo)
            assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")

    run(main)


def test_blocked_handler_does_not_block_other_calls() -> None:
    released = asyncio.Event()

    async def wait(req: Echo, ctx: CallContext) -> Echo:
        await released.wait()
        return Echo("waited")

    async def release(req: Echo, ctx: CallContext) -> Echo:
        released.set()
        return Echo("released")

    async def main() -> list[Echo]:
        async with connected(echo_server(Wait=wait, Release=release)) as client:
            waiting = asyncio.create_task(client.call(SVC, "Wait", Echo(), Echo))
            released_reply = await client.call(SVC, "Release", Echo(), Echo)
            return [released_reply, await waiting]

    assert run(main) == [Echo("released"), Echo("waited")]


def test_many_concurrent_calls_get_their_own_replies() -> None:
    async def main() -> list[Echo]:
        async with connected(echo_server()) as client:
            calls = [client.call(SVC, "Echo", Echo(str(i), i), Echo) for i in range(100)]
            return await asyncio.gather(*calls)

    assert run(main) == [Echo(str(i), i + 1) for i in range(100)]


def test_metadata_keys_arrive_lower_cased_and_multi_valued() -> None:
    seen: list[CallContext] = []

    async def look(req: Echo, ctx: CallContext) -> Echo:
        seen.append(ctx)
        return Echo()

    async def main() -> None:
        server = echo_server(Look=look)
        async with connected(server) as client:
            await client.call(
                SVC, "Look", Echo(), Echo, metadata={"Containerd-Namespace-TTRPC": "default"}
            )
        async with raw_to(server) as (peer, _):
            metadata = [KeyValue("X-Trace", "a"), KeyValue("x-trace", "b")]
            await peer.request(1, "Look", b"", metadata=metadata)
            await peer.response()

    run(main)
    first, second = seen
    assert first.metadata == {"containerd-namespace-ttrpc": ["default"]}
    assert first.namespace == "default"
    assert (first.service, first.method, first.stream_id, first.deadline) == (SVC, "Look", 1, None)
    assert second.metadata == {"x-trace": ["a", "b"]}
    assert second.get("X-TRACE") == "a"
    assert second.namespace is None


def streaming_server(fail_after: int | None = None) -> Server:
    server = echo_server()

    async def count(req: Echo, ctx: CallContext) -> AsyncIterator[Echo]:
        for i in range(req.count):
            if fail_after is not None and i == fail_after:
                raise TtrpcError(Code.ABORTED, "stopped")
            yield Echo(req.text, i)

    server.register_stream(SVC, "Count", Echo, count)
    return server


def test_server_streaming_delivers_all_messages_then_ends() -> None:
    async def main() -> list[Echo]:
        async with connected(streaming_server()) as client:
            return [m async for m in client.stream(SVC, "Count", Echo("n", 4), Echo)]

    # message 0 encodes to an empty Data frame: still a message, not the end
    assert run(main) == [Echo("n", 0), Echo("n", 1), Echo("n", 2), Echo("n", 3)]


def test_server_streaming_error_status_raises_after_earlier_messages() -> None:
    async def main() -> None:
        async with connected(streaming_server(fail_after=2)) as client:
            got: list[Echo] = []
            with pytest.raises(TtrpcError) as info:
                async for m in client.stream(SVC, "Count", Echo("x", 5), Echo):
                    got.append(m)
            assert [m.count for m in got] == [0, 1]
            assert (info.value.code, info.value.message) == (Code.ABORTED, "stopped")

    run(main)


def test_leaving_a_stream_early_keeps_the_connection_usable() -> None:
    async def main() -> None:
        async with connected(streaming_server()) as client:
            async with client.stream(SVC, "Count", Echo("x", 50), Echo) as replies:
                async for m in replies:
                    assert m.count == 0
                    break
            assert await client.call(SVC, "Echo", Echo("after"), Echo) == Echo("after", 1)
            stream = client.stream(SVC, "Count", Echo("y", 1), Echo)
            assert [m async for m in stream] == [Echo("y", 0)]
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()

    run(main)


def test_stream_over_a_unary_method_yields_its_reply() -> None:
    async def main() -> list[Echo]:
        async with connected(echo_server()) as client:
            return [m async for m in client.stream(SVC, "Echo", Echo("u", 1), Echo)]

    assert run(main) == [Echo("u", 2)]


def test_stream_of_unknown_method_raises() -> None:
    async def main() -> None:
        async with connected(echo_server()) as client:
            with pytest.raises(TtrpcError) as info:
                async for _ in client.stream(SVC, "Nope", Echo(), Echo):
                    pass
            assert info.value.code == Code.UNIMPLEMENTED

    run(main)


def test_client_timeout_raises_and_connection_survives() -> None:
    handler_done = asyncio.Event()
    deadlines: list[float | None] = []

    async def hang(req: Echo, ctx: CallContext) -> Echo:
        deadlines.append(ctx.deadline)
        try:
            await asyncio.Event().wait()
        finally:
            handler_done.set()
        raise AssertionError("unreachable")

    async def main() -> None:
        async with connected(echo_server(Hang=hang)) as client:
            with pytest.raises(TimeoutError, match="timed out"):
                await client.call(SVC, "Hang", Echo(), Echo, timeout=0.05)
            # the server cancels the handler at the deadline it was sent and replies
            # DEADLINE_EXCEEDED; that late reply is dropped by the client
            await handler_done.wait()
            assert await client.call(SVC, "Echo", Echo("ok"), Echo) == Echo("ok", 1)
            with pytest.raises(TimeoutError):
                await client.call(SVC, "Echo", Echo(), Echo, timeout=0)
        assert deadlines[0] is not None

    run(main)


def test_stream_timeout_covers_the_whole_stream() -> None:
    async def slow(req: Echo, ctx: CallContext) -> AsyncIterator[Echo]:
        yield Echo("first")
        await asyncio.Event().wait()
        yield Echo("never")

    async def main() -> None:
        server = echo_server()
        server.register_stream(SVC, "Slow", Echo, slow)
        async with connected(server) as client:
            got = []
            with pytest.raises(TimeoutError, match="timed out"):
                async for m in client.stream(SVC, "Slow", Echo(), Echo, timeout=0.05):
                    got.append(m)
            assert got == [Echo("first")]
            with pytest.raises(TimeoutError):
                await client.stream(SVC, "Slow", Echo(), Echo, timeout=0).__anext__()

    run(main)


def test_server_enforces_timeout_nano_with_deadline_exceeded() -> None:
    async def hang(req: Echo, ctx: CallContext) -> Echo:
        await asyncio.Event().wait()
        return Echo()

    async def main() -> tuple[int, Response]:
        async with raw_to(echo_server(Hang=hang)) as (peer, _):
            await peer.request(1, "Hang", b"", timeout_nano=20_000_000)
            return await peer.response()

    stream_id, response = run(main)
    assert stream_id == 1
    assert response.status is not None
    assert (response.status.code, response.status.message) == (
        Code.DEADLINE_EXCEEDED,
        "context deadline exceeded",
    )


def test_oversized_request_is_refused_by_the_client() -> None:
    async def main() -> None:
        async with connected(echo_server()) as client:
            with pytest.raises(OversizedMessageError) as info:
                await client.call(SVC, "Echo", Echo("x" * MAX_DATA), Echo)
            assert info.value.code == Code.RESOURCE_EXHAUSTED
            assert "exceed maximum message size of 4194304" in str(info.value)
            with pytest.raises(OversizedMessageError):
                client.stream(SVC, "Echo", Echo("x" * MAX_DATA), Echo)
            assert await client.call(SVC, "Echo", Echo("small"), Echo) == Echo("small", 1)

    run(main)


def test_oversized_reply_becomes_resource_exhausted() -> None:
    async def big(req: Echo, ctx: CallContext) -> Echo:
        return Echo("x" * MAX_DATA)

    async def main() -> None:
        async with connected(echo_server(Big=big)) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Big", Echo(), Echo)
            assert info.value.code == Code.RESOURCE_EXHAUSTED
            assert await client.call(SVC, "Echo", Echo(), Echo) == Echo("", 1)

    run(main)


def test_raw_oversized_frame_gets_resource_exhausted_and_connection_keeps_working() -> None:
    async def main() -> list[tuple[int, Response]]:
        async with raw_to(echo_server()) as (peer, _):
            length = MAX_DATA + 1
            header = struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0)
            await peer.stream.send_all(header + bytes(length))
            first = await peer.response()
            await peer.request(3, "Echo", Echo("after").encode())
            return [first, await peer.response()]

    (sid1, r1), (sid3, r3) = run(main)
    assert sid1 == 1
    assert r1.status is not None
    assert r1.status.code == Code.RESOURCE_EXHAUSTED
    assert r1.status.message == "message length 4194305 exceed maximum message size of 4194304"
    assert sid3 == 3
    assert r3.status is not None and r3.status.code == Code.OK
    assert Echo.decode(r3.payload) == Echo("after", 1)


def test_client_reports_oversized_reply_frame_from_a_raw_server() -> None:
    async def main() -> None:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        async with Client(client_side) as client:
            call = asyncio.create_task(client.call(SVC, "Echo", Echo(), Echo))
            request = await peer.frame()
            header = struct.pack(">IIBB", MAX_DATA + 1, request.stream_id, 2, 0)
            await peer_side.send_all(header + bytes(MAX_DATA + 1))
            with pytest.raises(OversizedMessageError):
                await call
        await peer_side.aclose()

    run(main)


@pytest.mark.parametrize(
    ("stream_id", "data", "message"),
    [
        (1, b"\xff\xff", "unmarshal request error"),
        (2, Request(service=SVC, method="Echo").encode(), "StreamID must be odd"),
    ],
)
def test_bad_requests_get_invalid_argument(stream_id: int, data: bytes, message: str) -> None:
    async def main() -> tuple[int, Response]:
        async with raw_to(echo_server()) as (peer, _):
            await peer.send(stream_id, MessageType.REQUEST, data)
            return await peer.response()

    sid, response = run(main)
    assert sid == stream_id
    assert response.status is not None
    assert response.status.code == Code.INVALID_ARGUMENT
    assert message in response.status.message


def test_reused_stream_id_is_rejected_and_others_still_served() -> None:
    async def main() -> list[tuple[int, Response]]:
        async with raw_to(echo_server()) as (peer, _):
            await peer.request(5, "Echo", b"")
            first = await peer.response()
            await peer.request(5, "Echo", b"")
            await peer.request(3, "Echo", b"")
            second, third = await peer.response(), await peer.response()
            await peer.request(7, "Echo", b"")
            return [first, second, third, await peer.response()]

    results = run(main)
    assert [sid for sid, _ in results] == [5, 5, 3, 7]
    codes = [r.status.code if r.status else None for _, r in results]
    assert codes == [Code.OK, Code.INVALID_ARGUMENT, Code.INVALID_ARGUMENT, Code.OK]
    assert results[1][1].status is not None
    assert results[1][1].status.message == "StreamID cannot be re-used and must increment"


def test_undecodable_payload_is_invalid_argument() -> None:
    async def main() -> None:
        server = Server()

        async def strict(req: Strict, ctx: CallContext) -> Strict:
            return req

        server.register_unary(SVC, "Strict", Strict, strict)
        async with connected(server) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Strict", Echo("not a number"), Strict)
            assert info.value.code == Code.INVALID_ARGUMENT
            assert "Strict" in info.value.message

    run(main)


def test_unknown_frame_types_and_stray_data_are_ignored() -> None:
    async def main() -> tuple[int, Response]:
        async with raw_to(echo_server()) as (peer, _):
            await peer.send(1, 9, b"whatever")
            await peer.send(1, MessageType.DATA, b"data")
            await peer.send(1, MessageType.RESPONSE, b"")
            await peer.request(1, "Echo", Echo("x").encode())
            return await peer.response()

    sid, response = run(main)
    assert sid == 1
    assert Echo.decode(response.payload) == Echo("x", 1)


def test_garbage_closes_only_that_connection() -> None:
    async def main() -> None:
        server = echo_server()
        async with raw_to(server) as (peer, serving):
            await peer.stream.send_all(b"\xff" * 64)
            assert await peer.stream.receive() == b""  # server hung up
            await asyncio.wait_for(serving, 2)
            assert serving.result() is None
        async with connected(server) as client:
            assert await client.call(SVC, "Echo", Echo(), Echo) == Echo("", 1)

    run(main)


def test_handler_exception_is_unknown_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(req: Echo, ctx: CallContext) -> Echo:
        raise RuntimeError("disk on fire")

    async def empty(req: Echo, ctx: CallContext) -> Echo:
        raise KeyError()

    async def main() -> None:
        async with connected(echo_server(Broken=broken, Empty=empty)) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Broken", Echo(), Echo)
            assert (info.value.code, info.value.message) == (Code.UNKNOWN, "disk on fire")
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Empty", Echo(), Echo)
            assert (info.value.code, info.value.message) == (Code.UNKNOWN, "KeyError")
            assert await client.call(SVC, "Echo", Echo(), Echo) == Echo("", 1)

    with caplog.at_level(logging.ERROR, logger="runm.ttrpc"):
        run(main)
    assert "disk on fire" in caplog.text


def test_handler_raising_timeout_or_cancelled_itself() -> None:
    async def times_out(req: Echo, ctx: CallContext) -> Echo:
        raise TimeoutError("backend timed out")

    async def cancels(req: Echo, ctx: CallContext) -> Echo:
        raise asyncio.CancelledError()

    async def main() -> None:
        async with connected(echo_server(TimesOut=times_out, Cancels=cancels)) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "TimesOut", Echo(), Echo)
            assert (info.value.code, info.value.message) == (Code.UNKNOWN, "backend timed out")
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Cancels", Echo(), Echo)
            assert info.value.code == Code.CANCELLED

    run(main)


def test_connection_closing_mid_call_raises_connection_error() -> None:
    async def main() -> None:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        async with Client(client_side) as client:
            call = asyncio.create_task(client.call(SVC, "Echo", Echo(), Echo))
            await peer.frame()  # the request arrived; now hang up
            await peer_side.aclose()
            with pytest.raises(ConnectionError, match="connection closed"):
                await call
            assert client.closed
            with pytest.raises(ConnectionError):
                await client.call(SVC, "Echo", Echo(), Echo)
            with pytest.raises(ConnectionError):
                async for _ in client.stream(SVC, "Count", Echo(), Echo):
                    pass

    run(main)


def test_server_side_connection_end_mid_stream_raises_in_client() -> None:
    async def main() -> None:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        async with Client(client_side) as client:
            stream = client.stream(SVC, "Count", Echo(), Echo)
            first = asyncio.create_task(stream.__anext__())
            request = await peer.frame()
            assert request.flags == Flags.REMOTE_CLOSED
            await peer.send(request.stream_id, MessageType.DATA, Echo("a").encode())
            assert await first == Echo("a")
            await peer_side.aclose()
            with pytest.raises(ConnectionError):
                await stream.__anext__()

    run(main)


def test_garbage_from_server_fails_client_calls() -> None:
    async def main() -> None:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        async with Client(client_side) as client:
            call = asyncio.create_task(client.call(SVC, "Echo", Echo(), Echo))
            await peer.frame()
            await peer_side.send_all(b"\xff" * 16)
            with pytest.raises(ConnectionError, match="out of sync"):
                await call
        await peer_side.aclose()

    run(main)


def test_client_decode_failures_are_internal() -> None:
    async def main() -> None:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        async with Client(client_side) as client:
            bad_envelope = asyncio.create_task(client.call(SVC, "Echo", Echo(), Echo))
            sid = (await peer.frame()).stream_id
            await peer.send(sid, MessageType.DATA, b"ignored by unary calls")
            await peer.send(sid, MessageType.RESPONSE, b"\xff")
            with pytest.raises(TtrpcError) as info:
                await bad_envelope
            assert info.value.code == Code.INTERNAL

            bad_payload = asyncio.create_task(client.call(SVC, "Echo", Echo(), Strict))
            sid = (await peer.frame()).stream_id
            reply = Response(payload=Echo("text").encode())  # no status at all means OK
            await peer.send(sid, MessageType.RESPONSE, reply.encode())
            with pytest.raises(TtrpcError) as info:
                await bad_payload
            assert info.value.code == Code.INTERNAL
            assert "Strict" in info.value.message

            # a Response frame ending a stream with OK and no payload just ends it
            stream = client.stream(SVC, "Count", Echo(), Echo)
            nxt = asyncio.create_task(stream.__anext__())
            sid = (await peer.frame()).stream_id
            await peer.send(sid, 9, b"unknown type is skipped")
            await peer.send(sid, MessageType.DATA, Echo("last").encode(), Flags.REMOTE_CLOSED)
            assert await nxt == Echo("last")
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            stream = client.stream(SVC, "Count", Echo(), Echo)
            nxt = asyncio.create_task(stream.__anext__())
            sid = (await peer.frame()).stream_id
            await peer.send(sid, MessageType.RESPONSE, Response().encode())
            with pytest.raises(StopAsyncIteration):
                await nxt
        await peer_side.aclose()

    run(main)


def test_client_stream_ids_are_odd_and_increasing() -> None:
    async def main() -> list[int]:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        client = Client(client_side)  # no async with: started lazily, closed explicitly
        calls = [asyncio.create_task(client.call(SVC, "Echo", Echo(), Echo)) for _ in range(3)]
        ids = [(await peer.frame()).stream_id for _ in calls]
        await client.aclose()
        for call in calls:
            with pytest.raises(ConnectionError, match="closed"):
                await call
        await client.aclose()  # idempotent
        await peer_side.aclose()
        return ids

    assert run(main) == [1, 3, 5]


def test_connection_end_cancels_in_flight_handlers() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(req: Echo, ctx: CallContext) -> Echo:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Echo()

    async def main() -> None:
        async with raw_to(echo_server(Hang=hang)) as (peer, serving):
            await peer.request(1, "Hang", b"")
            await started.wait()
            await peer.stream.aclose()
            await asyncio.wait_for(serving, 2)
            assert cancelled.is_set()

    run(main)


def test_server_aclose_ends_connections_and_serve_returns() -> None:
    started = asyncio.Event()

    async def hang(req: Echo, ctx: CallContext) -> Echo:
        started.set()
        await asyncio.Event().wait()
        return Echo()

    async def main() -> None:
        server = echo_server(Hang=hang)
        client_side, server_side = await stream_pair()
        serving = asyncio.create_task(server.serve(server_side))
        async with Client(client_side) as client:
            call = asyncio.create_task(client.call(SVC, "Hang", Echo(), Echo))
            await started.wait()
            await server.aclose()
            await serving  # returns normally
            with pytest.raises(ConnectionError):
                await call
        # a closed server refuses new connections by closing them
        a, b = await stream_pair()
        await server.serve(b)
        assert await a.receive() == b""
        await a.aclose()

    run(main)


def test_cancelling_serve_propagates() -> None:
    async def main() -> None:
        client_side, server_side = await stream_pair()
        serving = asyncio.create_task(echo_server().serve(server_side))
        async with Client(client_side) as client:
            assert await client.call(SVC, "Echo", Echo(), Echo) == Echo("", 1)
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
            with pytest.raises(ConnectionError):
                await client.call(SVC, "Echo", Echo(), Echo)

    run(main)


def test_duplicate_registration_is_refused() -> None:
    server = echo_server()
    with pytest.raises(ValueError, match="already registered"):
        server.register_unary(SVC, "Echo", Echo, lambda req, ctx: asyncio.sleep(0, Echo()))


def test_serve_unix_serves_each_connection() -> None:
    async def main() -> list[Echo]:
        server = echo_server()
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            path = str(Path(tmp) / "t.sock")
            listener = await serve_unix(server, path)
            try:
                c1 = Client(await AsyncioByteStream.connect_unix(path))
                c2 = Client(await AsyncioByteStream.connect_unix(path))
                async with c1, c2:
                    replies = [
                        await c1.call(SVC, "Echo", Echo("one"), Echo),
                        await c2.call(SVC, "Echo", Echo("two"), Echo),
                    ]
            finally:
                listener.close()
                await server.aclose()
            return replies

    assert run(main) == [Echo("one", 1), Echo("two", 1)]


class TrickleStream:
    """An in-memory ByteStream that hands out one byte per receive (or fails on demand)."""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.buffer = b""
        self.closed = False
        self.fail_receive = False

    @classmethod
    def pair(cls) -> tuple[TrickleStream, TrickleStream]:
        a: asyncio.Queue[bytes] = asyncio.Queue()
        b: asyncio.Queue[bytes] = asyncio.Queue()
        return cls(a, b), cls(b, a)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.buffer:
            self.buffer = await self.inbox.get()
        if self.fail_receive:
            raise OSError("device error")
        data, self.buffer = self.buffer[:1], self.buffer[1:]
        return data

    async def send_all(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("closed")
        self.outbox.put_nowait(data)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(b"")


def test_any_byte_stream_works_even_one_byte_at_a_time() -> None:
    async def main() -> tuple[Echo, list[Echo]]:
        client_side, server_side = TrickleStream.pair()
        serving = asyncio.create_task(streaming_server().serve(server_side))
        async with Client(client_side) as client:
            reply = await client.call(SVC, "Echo", Echo("slow"), Echo)
            replies = [m async for m in client.stream(SVC, "Count", Echo("s", 3), Echo)]
        await serving
        return reply, replies

    reply, replies = run(main)
    assert reply == Echo("slow", 1)
    assert replies == [Echo("s", 0), Echo("s", 1), Echo("s", 2)]


def test_receive_errors_end_the_connection_cleanly() -> None:
    async def main() -> None:
        client_side, server_side = TrickleStream.pair()
        server_side.fail_receive = True
        serving = asyncio.create_task(echo_server().serve(server_side))
        client_side.fail_receive = True
        async with Client(client_side) as client:
            with pytest.raises(ConnectionError, match="device error"):
                await client.call(SVC, "Echo", Echo(), Echo)
        await serving  # returns normally

    run(main)


def test_stream_ids_run_out_after_the_largest_odd_id() -> None:
    async def main() -> None:
        client_side, peer_side = await stream_pair()
        peer = RawPeer(peer_side)
        async with Client(client_side) as client:
            client._next_id = 0xFFFFFFFF
            last = asyncio.create_task(client.call(SVC, "Echo", Echo(), Echo))
            assert (await peer.frame()).stream_id == 0xFFFFFFFF
            with pytest.raises(ConnectionError, match="exhausted"):
                await client.call(SVC, "Echo", Echo(), Echo)
            last.cancel()
            with pytest.raises(asyncio.CancelledError):
                await last
        await peer_side.aclose()

    run(main)


def test_handler_can_end_its_connection_after_the_reply() -> None:
    """What the agent's Quiesce does before a snapshot: the reply arrives, serve() returns,
    and a new serve() on the same stream accepts stream ids from 1 again (a new peer)."""

    async def last(req: Echo, ctx: CallContext) -> Echo:
        ctx.end_connection = True
        return Echo(text="bye")

    async def main() -> tuple[Response, Response, bool]:
        server = echo_server(Last=last)
        peer_side, server_side = await stream_pair()
        peer = RawPeer(peer_side)
        serving = asyncio.create_task(server.serve(server_side))
        await peer.request(5, "Last", Echo(text="x").encode())
        _, reply = await peer.response()
        await asyncio.wait_for(serving, 2)  # returned although the peer is still there
        ended = serving.done()
        # The stream was closed by the first session; a real port is reopened by the agent.
        peer_side2, server_side2 = await stream_pair()
        serving = asyncio.create_task(server.serve(server_side2))
        peer2 = RawPeer(peer_side2)
        await peer2.request(1, "Echo", Echo(text="again").encode())
        _, again = await peer2.response()
        await peer_side2.aclose()
        await asyncio.wait_for(serving, 2)
        await peer_side.aclose()
        return reply, again, ended

    reply, again, ended = run(main)
    assert ended
    assert Echo.decode(reply.payload).text == "bye"
    assert again.status is None or again.status.code == Code.OK
    assert Echo.decode(again.payload).count == 1
