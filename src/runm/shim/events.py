"""Task events to containerd: `containerd.services.events.ttrpc.v1.Events/Forward` over ttrpc
on $TTRPC_ADDRESS, one at a time from one queue, so they arrive in the order they happened.

As containerd's shim library does: a 5 s timeout per call, a new connection after a failure,
and up to 5 attempts per event with a growing pause; an event that still fails is logged and
dropped (the next ones must not wait for a containerd that is gone for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from runm.channel.stream import AsyncioByteStream
from runm.proto import task as api
from runm.proto.codec import Message
from runm.ttrpc import Client
from runm.ttrpc.server import NAMESPACE_KEY

log = logging.getLogger("runm.shim.events")

FORWARD_TIMEOUT = 5.0
ATTEMPTS = 5
RETRY_PAUSE = 0.1  # times the attempt number


def topic_of(event: Message) -> str:
    return str(getattr(event, "TOPIC"))  # noqa: B009


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[api.Envelope] = asyncio.Queue()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        """Queue the event (stamped now) for sending."""
        envelope = api.Envelope(timestamp=api.Timestamp.now(), namespace=self.namespace,
                                topic=topic_of(event), event=api.Any.of(event))
        log.debug("event %s %s", envelope.topic, event)
        self._queue.put_nowait(envelope)
        if self._task is None and self.address:
            self._task = asyncio.ensure_future(self._run())

    async def flush(self, timeout: float) -> None:
        """Wait (at most timeout) until every queued event has been sent or given up on."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            envelope = await self._queue.get()
            try:
                await self._send(envelope)
            finally:
                self._queue.task_done()

    async def _send(self, envelope: api.Envelope) -> None:
        request = api.ForwardRequest(envelope)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                client = await self._connect()
                await client.call(api.EVENTS_SERVICE, "Forward", request, api.Empty,
                                  timeout=FORWARD_TIMEOUT,
                                  metadata={NAMESPACE_KEY: self.namespace})
                return
            except Exception as err:  # any failure: reconnect and retry
                log.debug("forwarding %s (attempt %d): %s", envelope.topic, attempt, err)
                await self._disconnect()
                if attempt < ATTEMPTS:
                    await asyncio.sleep(RETRY_PAUSE * attempt)
        log.warning("dropped event %s: containerd at %s did not take it", envelope.topic,
                    self.address)

    async def _connect(self) -> Client:
        if self._client is None or self._client.closed:
            stream = await AsyncioByteStream.connect_unix(self.address)
            self._client = Client(stream)
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
