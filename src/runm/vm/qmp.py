"""A small QMP client: QEMU's JSON machine protocol on a unix socket.

QMP sends one JSON object per line: a greeting (``{"QMP": ...}``), then answers to commands
(``{"return": ...}`` or ``{"error": {"class", "desc"}}``, carrying the command's ``id``) and
events (``{"event": NAME, "data": ...}``) at any time. runm needs commands and one kind of event
(MIGRATION), so this is that and no more: `QmpFrames` splits the byte stream into messages
(no I/O, fed by the caller), `QmpClient` runs it on an asyncio connection. It replaced the
qemu.qmp package: one dependency fewer, and a failed command is a VMError naming the command
(`QMP device_add: ...`), which the layers above already turn into runm's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from runm.vm.base import VMError

MAX_LINE = 16 << 20  # QMP answers are small; `query-*` output stays well below this


class QmpFrames:
    """Bytes in, JSON messages out (sans I/O)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[:end + 1]
            if line:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError(f"QMP sent a non-object: {line[:80]!r}")
                messages.append(message)
        if len(self._buffer) > MAX_LINE:
            raise ValueError("QMP message too long")
        return messages


class QmpClient:
    """One QMP session: connect(), execute() commands, listen() for events, disconnect()."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listeners: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._closed: str = ""

    async def connect(self, path: str) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(path)
        except OSError as err:
            raise VMError(f"connecting to QMP at {path}: {err}") from None
        frames = QmpFrames()
        greeting: list[dict[str, Any]] = []
        try:
            while not greeting:
                data = await self._reader.read(65536)
                if not data:
                    raise VMError("QMP closed before its greeting")
                greeting = frames.feed(data)
        except (OSError, ValueError) as err:
            await self.disconnect()
            raise VMError(f"reading the QMP greeting: {err}") from None
        if "QMP" not in greeting[0]:
            await self.disconnect()
            raise VMError(f"QMP greeting expected, got {str(greeting[0])[:80]}")
        self._reading = asyncio.ensure_future(self._read(frames, greeting[1:]))
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      fds: Sequence[int] = ()) -> Any:
        """Run a command and return its "return" value; a QMP error raises VMError. `fds`
        go along with the command (SCM_RIGHTS), as `getfd` wants them."""
        if self._writer is None or self._closed:
            raise VMError(f"QMP {command}: {self._closed or 'not connected'}")
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            data = json.dumps(request).encode() + b"\n"
            if fds:
                await self._writer.drain()  # nothing may be queued before this sendmsg
                transport = self._writer.get_extra_info("socket")
                with socket.socket(fileno=os.dup(transport.fileno())) as sock:
                    socket.send_fds(sock, [data], list(fds))
            else:
                self._writer.write(data)
                await self._writer.drain()
            response = await answer
        except (OSError, VMError) as err:
            raise VMError(f"QMP {command}: {err}") from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in response:
            error = response["error"]
            raise VMError(f"QMP {command}: {error.get('desc', error)}")
        return response.get("return")

    @contextlib.contextmanager
    def listen(self, event: str) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue that receives every `event` message while the with-block runs."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.setdefault(event, []).append(queue)
        try:
            yield queue
        finally:
            self._listeners[event].remove(queue)

    async def disconnect(self) -> None:
        self._fail_pending("QMP connection closed")
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
            self._reading = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None

    async def _read(self, frames: QmpFrames, early: list[dict[str, Any]]) -> None:
        assert self._reader is not None
        try:
            for message in early:
                self._dispatch(message)
            while data := await self._reader.read(65536):
                for message in frames.feed(data):
                    self._dispatch(message)
            self._fail_pending("QMP connection closed (QEMU exited?)")
        except (OSError, ValueError) as err:
            self._fail_pending(f"QMP connection failed: {err}")

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            for queue in self._listeners.get(str(message["event"]), []):
                queue.put_nowait(message)
            return
        answer = self._pending.get(message.get("id", -1))
        if answer is not None and not answer.done():
            answer.set_result(message)

    def _fail_pending(self, why: str) -> None:
        self._closed = self._closed or why
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(VMError(why))
