"""runm's QMP client against a scripted QMP server on a real unix socket (the protocol logic;
every VM test drives it against QEMU itself)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from runm.vm.base import VMError
from runm.vm.qmp import QmpClient, QmpFrames

GREETING = {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\r\n")


async def serve(tmp_path: Path, handler: Handler) -> tuple[asyncio.AbstractServer, str]:
    path = str(tmp_path / "qmp.sock")
    return await asyncio.start_unix_server(handler, path), path


async def qemu_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers like QEMU: `cont` returns {}, `fail` an error, `migrate` emits events first."""
    send(writer, GREETING)
    while line := await reader.readline():
        request = json.loads(line)
        cmd, rid = request["execute"], request["id"]
        if cmd == "fail":
            send(writer, {"error": {"class": "GenericError", "desc": "no such device"},
                          "id": rid})
        elif cmd == "migrate":
            send(writer, {"event": "MIGRATION", "data": {"status": "setup"}})
            send(writer, {"event": "STOP", "data": {}})
            send(writer, {"return": {}, "id": rid})
            send(writer, {"event": "MIGRATION", "data": {"status": "completed"}})
        elif cmd == "echo":
            send(writer, {"return": request.get("arguments"), "id": rid})
        elif cmd == "hang-up":
            writer.close()
            return
        else:
            send(writer, {"return": {}, "id": rid})
        await writer.drain()


def test_frames_split_lines_and_keep_partial_ones() -> None:
    frames = QmpFrames()
    assert frames.feed(b'{"a": 1}\r\n{"b"') == [{"a": 1}]
    assert frames.feed(b': 2}\r\n\r\n') == [{"b": 2}]
    with pytest.raises(ValueError, match="non-object"):
        frames.feed(b"[1]\n")


def test_commands_errors_and_events(tmp_path: Path) -> None:
    async def body() -> None:
        server, path = await serve(tmp_path, qemu_like)
        client = QmpClient()
        await client.connect(path)
        assert await client.execute("cont") == {}
        assert await client.execute("echo", {"id": "fs0", "n": 3}) == {"id": "fs0", "n": 3}
        with pytest.raises(VMError, match="QMP fail: no such device"):
            await client.execute("fail")
        with client.listen("MIGRATION") as events:
            assert await client.execute("migrate") == {}
            statuses = [(await events.get())["data"]["status"] for _ in range(2)]
        assert statuses == ["setup", "completed"]
        await client.disconnect()
        with pytest.raises(VMError, match="QMP cont: QMP connection closed"):
            await client.execute("cont")
        server.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_qemu_going_away_fails_the_waiting_command(tmp_path: Path) -> None:
    async def body() -> None:
        server, path = await serve(tmp_path, qemu_like)
        client = QmpClient()
        await client.connect(path)
        with pytest.raises(VMError, match=r"QMP hang-up: QMP connection closed \(QEMU exited\?\)"):
            await client.execute("hang-up")
        with pytest.raises(VMError, match="QMP cont: QMP connection closed"):
            await client.execute("cont")
        await client.disconnect()
        server.close()

    asyncio.run(asyncio.wait_for(body(), 10))


@pytest.mark.parametrize("greeting,message", [
    (b"", "QMP closed before its greeting"),
    (b'{"return": {}}\n', "QMP greeting expected"),
    (b"not json\n", "reading the QMP greeting"),
])
def test_a_bad_greeting_is_an_error(tmp_path: Path, greeting: bytes, message: str) -> None:
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(greeting)
            await writer.drain()
            writer.close()

        server, path = await serve(tmp_path, handler)
        with pytest.raises(VMError, match=message):
            await QmpClient().connect(path)
        server.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_garbage_after_the_greeting_fails_pending_commands(tmp_path: Path) -> None:
    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            send(writer, GREETING)
            await reader.readline()
            writer.write(b"garbage\n")
            await writer.drain()
            await reader.read()

        server, path = await serve(tmp_path, handler)
        with pytest.raises(VMError, match="QMP qmp_capabilities: QMP connection failed"):
            await QmpClient().connect(path)
        server.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_no_socket_is_an_error(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(VMError, match="connecting to QMP at"):
            await QmpClient().connect(str(tmp_path / "none.sock"))

    asyncio.run(asyncio.wait_for(body(), 10))
