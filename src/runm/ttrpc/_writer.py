"""The single writer of a ttrpc connection.

Frames are queued synchronously (so the order of `submit` calls is the order on the wire, which
the client relies on for increasing stream ids) and written by one task, so frames from
concurrent tasks never interleave and a caller cancelled while waiting cannot leave half a frame
on the wire: the write goes ahead, only the wait is abandoned.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from runm.channel.stream import ByteStream

logger = logging.getLogger("runm.ttrpc")


class FrameWriter:
    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._queue: deque[tuple[bytes, asyncio.Future[None]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None

    def start(self) -> None:
        if self._task is None and self._error is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ttrpc-writer")

    def submit(self, frame: bytes) -> asyncio.Future[None]:
        """Queue frame bytes; the future resolves once they are written.

        Raises ConnectionResetError if the connection can no longer be written to.
        """
        if self._error is not None:
            raise ConnectionResetError(self._error)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((frame, fut))
        self._wakeup.set()
        return fut

    async def write(self, frame: bytes) -> None:
        await self.submit(frame)

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    batch = list(self._queue)
                    self._queue.clear()
                    try:
                        await self._stream.send_all(b"".join(frame for frame, _ in batch))
                    except BaseException:
                        self._queue.extendleft(reversed(batch))
                        raise
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
        except asyncio.CancelledError:
            self._fail("ttrpc: closed")
            raise
        except Exception as err:
            logger.debug("ttrpc: write failed: %s", err)
            self._fail(f"ttrpc: connection closed: {err}")

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(ConnectionResetError(self._error))

    async def aclose(self) -> None:
        """Stop the writer task; frames not yet written fail with ConnectionResetError."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail("ttrpc: closed")
