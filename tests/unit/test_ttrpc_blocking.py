"""runm.ttrpc.blocking.call_unix against the real asyncio server and hand-driven peers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runm.proto.codec import Message, pfield
from runm.records import record
from runm.ttrpc import CallContext, Code, Server, TtrpcError, serve_unix
from runm.ttrpc.blocking import call_unix
from runm.ttrpc.framing import Frame, FrameDecoder, MessageType, encode_frame
from runm.ttrpc.messages import Request, Response, Status

SVC = "runm.test.v1.Echo"


@record
class Echo(Message):
    text: str = pfield(1, "string")
    count: int = pfield(2, "int64")


@contextmanager
def serving(tmp_path: Path) -> Iterator[str]:
    """The asyncio ttrpc server on a unix socket, in a thread of its own."""
    server = Server()

    async def echo(req: Echo, ctx: CallContext) -> Echo:
        return Echo(req.text, req.count + 1)

    async def fail(req: Echo, ctx: CallContext) -> Echo:
        raise TtrpcError(Code.NOT_FOUND, f"no {req.text}")

    server.register_unary(SVC, "Echo", Echo, echo)
    server.register_unary(SVC, "Fail", Echo, fail)
    path = str(tmp_path / "s.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        listener = await serve_unix(server, path)
        ready.set()
        await stop.wait()
        listener.close()
        await server.aclose()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    try:
        assert ready.wait(5)
        yield path
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


@contextmanager
def raw_peer(tmp_path: Path, answer: Callable[[socket.socket, int], None],
             requests: list[Frame] | None = None) -> Iterator[str]:
    """A server that reads one request frame (kept in `requests`), then does
    `answer(conn, stream_id)`."""
    path = str(tmp_path / "raw.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            decoder = FrameDecoder()
            while (event := decoder.next_event()) is None:
                decoder.feed(conn.recv(4096))
            if requests is not None and isinstance(event, Frame):
                requests.append(event)
            answer(conn, event.stream_id)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield path
    finally:
        thread.join(5)
        listener.close()


def test_reply_is_decoded(tmp_path: Path) -> None:
    with serving(tmp_path) as path:
        assert call_unix(path, SVC, "Echo", Echo("hi", 41), Echo) == Echo("hi", 42)
        # each call is its own connection: a second one works the same
        assert call_unix(path, SVC, "Echo", Echo("", 0), Echo, timeout=5) == Echo("", 1)


def test_error_status_raises_ttrpc_error(tmp_path: Path) -> None:
    with serving(tmp_path) as path:
        with pytest.raises(TtrpcError) as err:
            call_unix(path, SVC, "Fail", Echo("c1"), Echo)
        assert err.value.code == Code.NOT_FOUND and err.value.message == "no c1"
        with pytest.raises(TtrpcError) as err:
            call_unix(path, SVC, "Nope", Echo(), Echo)
        assert err.value.code == Code.UNIMPLEMENTED


def test_nothing_listening_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        call_unix(str(tmp_path / "none.sock"), SVC, "Echo", Echo(), Echo)


def test_other_streams_and_data_frames_are_skipped(tmp_path: Path) -> None:
    def answer(conn: socket.socket, stream_id: int) -> None:
        good = Response(payload=Echo("ok").encode()).encode()
        conn.sendall(encode_frame(stream_id + 2, MessageType.RESPONSE, 0, b"")
                     + encode_frame(stream_id, MessageType.DATA, 0, b"junk")
                     + encode_frame(stream_id, MessageType.RESPONSE, 0, good)[:5])
        conn.sendall(encode_frame(stream_id, MessageType.RESPONSE, 0, good)[5:])

    with raw_peer(tmp_path, answer) as path:
        assert call_unix(path, SVC, "Echo", Echo(), Echo) == Echo("ok")


def test_connection_closed_before_the_reply(tmp_path: Path) -> None:
    with (raw_peer(tmp_path, lambda conn, sid: None) as path,
          pytest.raises(ConnectionResetError, match="connection closed")):
        call_unix(path, SVC, "Echo", Echo(), Echo)


def test_garbage_reply_is_a_closed_connection(tmp_path: Path) -> None:
    def answer(conn: socket.socket, stream_id: int) -> None:
        conn.sendall(b"\xff" * 10 + b"\x00" * 64)  # a frame length over the limit, then junk

    with raw_peer(tmp_path, answer) as path, pytest.raises((ConnectionResetError, TtrpcError)):
        call_unix(path, SVC, "Echo", Echo(), Echo)


def test_bad_envelope_and_payload_are_internal_errors(tmp_path: Path) -> None:
    for data in (b"\x07", Response(payload=b"\x0a\x05ab").encode()):
        def answer(conn: socket.socket, stream_id: int, data: bytes = data) -> None:
            conn.sendall(encode_frame(stream_id, MessageType.RESPONSE, 0, data))

        with raw_peer(tmp_path, answer) as path:
            with pytest.raises(TtrpcError) as err:
                call_unix(path, SVC, "Echo", Echo(), Echo)
            assert err.value.code == Code.INTERNAL
        Path(path).unlink()


def test_status_with_ok_code_returns_the_payload(tmp_path: Path) -> None:
    def answer(conn: socket.socket, stream_id: int) -> None:
        reply = Response(status=Status(code=int(Code.OK)), payload=Echo("x").encode())
        conn.sendall(encode_frame(stream_id, MessageType.RESPONSE, 0, reply.encode()))

    with raw_peer(tmp_path, answer) as path:
        assert call_unix(path, SVC, "Echo", Echo(), Echo) == Echo("x")


def test_timeout_raises_timeout_error(tmp_path: Path) -> None:
    done = threading.Event()

    def answer(conn: socket.socket, stream_id: int) -> None:
        done.wait(5)  # never answers while the caller waits

    with raw_peer(tmp_path, answer) as path:
        try:
            with pytest.raises(TimeoutError, match=f"{SVC}/Echo: timed out"):
                call_unix(path, SVC, "Echo", Echo(), Echo, timeout=0.2)
        finally:
            done.set()


def test_request_carries_service_method_and_metadata(tmp_path: Path) -> None:
    def answer(conn: socket.socket, stream_id: int) -> None:
        conn.sendall(encode_frame(stream_id, MessageType.RESPONSE, 0, Response().encode()))

    requests: list[Frame] = []
    with raw_peer(tmp_path, answer, requests) as path:
        assert call_unix(path, SVC, "Echo", Echo("a"), Echo, timeout=3,
                         metadata={"X-Key": "v"}) == Echo()
    (frame,) = requests
    assert frame.stream_id == 1 and frame.type == MessageType.REQUEST
    request = Request.decode(frame.data)
    assert (request.service, request.method, Echo.decode(request.payload)) == (
        SVC, "Echo", Echo("a"))
    assert [(kv.key, kv.value) for kv in request.metadata] == [("x-key", "v")]
    assert 0 < request.timeout_nano <= 3_000_000_000


def test_importing_it_does_not_load_asyncio() -> None:
    code = ("import sys, runm.ttrpc.blocking, runm.sandbox.detached; "
            "assert 'asyncio' not in sys.modules, 'asyncio loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_spent_timeout_fails_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match=f"{SVC}/Echo: timed out"):
        call_unix(str(tmp_path / "none.sock"), SVC, "Echo", Echo(), Echo, timeout=0)
