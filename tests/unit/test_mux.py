"""Tests of the stdio multiplexer: the sans-I/O core, the asyncio driver and the fd pumps.

No test sleeps for time. Ordering is established with `barrier()` (the transport is ordered:
once a later frame has been read, every earlier one has been dispatched) or, where a state is
reached by background tasks, with `until()`, which only yields to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runm.channel.mux import Mux, MuxStream, pump_fd_to_stream, pump_stream_to_fd
from runm.channel.muxframe import (
    CREDIT_THRESHOLD,
    HEADER,
    INITIAL_WINDOW,
    MAX_FRAME,
    CreditAvailable,
    DataReceived,
    EndReceived,
    MuxProtocol,
    MuxProtocolError,
    StreamReset,
)
from runm.channel.stream import AsyncioByteStream

U32 = struct.Struct(">I")


def frame(stream_id: int, ftype: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(stream_id, ftype, len(payload)) + payload


def credit(stream_id: int, n: int) -> bytes:
    return frame(stream_id, 2, U32.pack(n))


def parse_frames(wire: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(wire):
        sid, ftype, length = HEADER.unpack_from(wire, pos)
        out.append((sid, ftype, wire[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


# --- the pure core ----------------------------------------------------------------------------


def test_frame_encoding() -> None:
    p = MuxProtocol()
    wire, n = p.send_data(7, b"abc")
    assert (wire, n) == (struct.pack(">IBI", 7, 0, 3) + b"abc", 3)
    assert p.send_eof(7) == struct.pack(">IBI", 7, 1, 0)
    assert p.send_reset(8) == struct.pack(">IBI", 8, 3, 0)
    assert p.send_reset(8) == b""  # idempotent
    data = os.urandom(2 * MAX_FRAME + 5)
    wire, n = p.send_data(0xFFFFFFFF, bytearray(data))
    assert n == len(data)
    frames = parse_frames(wire)
    assert [len(f[2]) for f in frames] == [MAX_FRAME, MAX_FRAME, 5]
    assert b"".join(f[2] for f in frames) == data
    assert {(f[0], f[1]) for f in frames} == {(0xFFFFFFFF, 0)}


def test_window_and_credit_batching() -> None:
    a, b = MuxProtocol(), MuxProtocol()
    assert a.window(1) == INITIAL_WINDOW
    wire, n = a.send_data(1, memoryview(bytes(INITIAL_WINDOW + 100)))
    assert n == INITIAL_WINDOW and a.window(1) == 0
    assert a.send_data(1, b"more") == (b"", 0)
    events = b.receive_data(wire)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == INITIAL_WINDOW
    assert b.consumed(1, 100) == b""  # batched
    grant = b.consumed(1, CREDIT_THRESHOLD)
    assert grant == credit(1, CREDIT_THRESHOLD + 100)
    assert a.receive_data(grant) == [CreditAvailable(1)]
    assert a.window(1) == CREDIT_THRESHOLD + 100
    assert b.consumed(1, 1, flush=True) == credit(1, 1)
    assert b.consumed(1, 0, flush=True) == b""  # nothing owed
    with pytest.raises(ValueError):
        b.consumed(1, INITIAL_WINDOW)  # more than was received
    with pytest.raises(ValueError):
        b.consumed(1, -1)
    assert b.consumed(99, 5) == b""  # unknown stream: nobody needs credit
    # after the peer's EOF no credit is sent (it could not be used)
    b.receive_data(frame(1, 1))
    assert b.consumed(1, 50_000, flush=True) == b""
    assert a.send_eof(1) == frame(1, 1)
    assert a.window(1) == 0


def test_partial_frames_any_chunking() -> None:
    a, b = MuxProtocol(), MuxProtocol()
    wire = a.send_data(3, b"hello")[0] + a.send_eof(3) + a.send_data(4, b"x" * 5000)[0]
    events = []
    for i in range(len(wire)):
        events += b.receive_data(wire[i : i + 1])
        assert b.buffered < HEADER.size + MAX_FRAME
    assert events[:2] == [DataReceived(3, b"hello"), EndReceived(3)]
    assert events[2:] == [DataReceived(4, b"x" * 5000)]
    assert b.buffered == 0


def test_stream_lifecycle_and_late_frames() -> None:
    a, b = MuxProtocol(), MuxProtocol()
    # EOF both ways finishes the stream on both sides
    b.receive_data(a.send_data(1, b"ab")[0] + a.send_eof(1))
    assert b.is_active(1) and not b.is_closed(1)
    a.receive_data(b.send_eof(1))
    assert a.is_closed(1) and b.is_closed(1) and not a.is_active(1)
    assert a.window(1) == 0
    # late CREDIT / RESET for a finished stream are ignored
    assert a.receive_data(credit(1, 2) + frame(1, 3)) == []
    with pytest.raises(ValueError):
        a.send_data(1, b"again")  # ids are not reused
    assert a.send_reset(1) == b""

    # RESET: both directions end at once; data already in flight is dropped
    in_flight = b.send_data(2, b"late")[0]
    assert b.receive_data(a.send_reset(2)) == [StreamReset(2)]
    assert b.is_closed(2)
    assert a.receive_data(in_flight + frame(2, 1) + frame(2, 3)) == []
    # a RESET for a stream never seen is reported (it may be opened later) once
    assert a.receive_data(frame(9, 3) + frame(9, 3)) == [StreamReset(9)]
    assert a.is_closed(9)
    # credit for a stream never used is ignored
    assert a.receive_data(credit(10, 5)) == []


def test_closed_ids_are_bounded() -> None:
    p = MuxProtocol(max_closed=2)
    for sid in (1, 2, 3):
        p.send_reset(sid)
    assert not p.is_closed(1) and p.is_closed(2) and p.is_closed(3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MuxProtocol(credit_threshold=0)
    with pytest.raises(ValueError):
        MuxProtocol(max_closed=-1)
    p = MuxProtocol()
    for bad in (0, -1, 1 << 32):
        with pytest.raises(ValueError):
            p.send_data(bad, b"x")
    p.send_eof(1)
    with pytest.raises(ValueError):
        p.send_eof(1)


def _over_window() -> bytes:
    full = INITIAL_WINDOW // MAX_FRAME
    return b"".join(frame(1, 0, bytes(MAX_FRAME)) for _ in range(full)) + frame(1, 0, b"!")


VIOLATIONS: dict[str, tuple[bytes, bytes]] = {
    # name: (setup sent by the local side first, received wire bytes)
    "unknown type": (b"", frame(1, 9)),
    "stream id 0": (b"", frame(0, 0, b"x")),
    "DATA > MAX_FRAME": (b"", HEADER.pack(1, 0, MAX_FRAME + 1)),
    "empty DATA": (b"", frame(1, 0)),
    "DATA over window": (b"", _over_window()),
    "CREDIT wrong length": (b"", frame(1, 2, b"abc")),
    "CREDIT of zero": (b"", credit(1, 0)),
    "CREDIT beyond data sent": (b"x", credit(1, 2)),
    "EOF with payload": (b"", frame(1, 1, b"x")),
    "RESET with payload": (b"", frame(1, 3, b"x")),
    "DATA after EOF": (b"", frame(1, 1) + frame(1, 0, b"x")),
    "EOF after EOF": (b"", frame(1, 1) + frame(1, 1)),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
@pytest.mark.parametrize("chunked", [False, True])
def test_protocol_violations(name: str, chunked: bool) -> None:
    setup, wire = VIOLATIONS[name]
    p = MuxProtocol()
    if setup:
        p.send_data(1, setup)
    with pytest.raises(MuxProtocolError):
        if chunked:
            for i in range(0, len(wire), 7):
                p.receive_data(wire[i : i + 7])
        else:
            p.receive_data(wire)
    with pytest.raises(MuxProtocolError):  # the connection stays broken
        p.receive_data(frame(5, 0, b"fine"))


class _End:
    """One side of a simulated connection in the property test."""

    def __init__(self) -> None:
        self.p = MuxProtocol()
        self.out = bytearray()
        self.sent: defaultdict[int, bytearray] = defaultdict(bytearray)
        self.received: defaultdict[int, bytearray] = defaultdict(bytearray)
        self.consumed: defaultdict[int, int] = defaultdict(int)
        self.eof_sent: set[int] = set()
        self.eof_received: set[int] = set()

    def unconsumed(self, sid: int) -> int:
        return len(self.received[sid]) - self.consumed[sid]


def _deliver(src: _End, dst: _End, amount: int, rng: random.Random) -> None:
    chunk = rng.choice([1, 2, 9, 10, 1000, 65545, 1 << 20])
    amount = min(amount, len(src.out), 300 if chunk < 100 else 1 << 30)
    data, src.out[:amount] = bytes(src.out[:amount]), b""
    for i in range(0, len(data), chunk):
        for ev in dst.p.receive_data(data[i : i + chunk]):
            if isinstance(ev, DataReceived):
                assert ev.stream_id not in dst.eof_received
                dst.received[ev.stream_id] += ev.data
            elif isinstance(ev, EndReceived):
                dst.eof_received.add(ev.stream_id)
            elif isinstance(ev, StreamReset):
                assert dst.p.is_closed(ev.stream_id)
            else:
                assert isinstance(ev, CreditAvailable)


Op = tuple[str, int, int, int]  # (kind, side, stream id, size/amount)
SIDS = [1, 2, 0xFFFFFFFF]
_side = st.integers(0, 1)
_sid = st.sampled_from(SIDS)
_size = st.sampled_from([INITIAL_WINDOW + 7, INITIAL_WINDOW, MAX_FRAME + 1, MAX_FRAME, 5000, 10, 1])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), _side, _sid, _size),
        st.tuples(st.just("deliver"), _side, st.just(0), st.integers(1, 600_000)),
        st.tuples(st.just("consume"), _side, _sid, st.integers(0, 2 * MAX_FRAME)),
        st.tuples(st.just("eof"), _side, _sid, st.just(0)),
        st.tuples(st.just("reset"), _side, _sid, st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=100, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**32))
def test_core_property_in_order_and_windowed(ops: list[Op], seed: int) -> None:
    """Random sends/EOFs/RESETs/consumption on both sides, delivered in random chunks."""
    rng = random.Random(seed)
    ends = [_End(), _End()]
    reset: set[int] = set()

    def check_invariants() -> None:
        for me, peer in ((ends[0], ends[1]), (ends[1], ends[0])):
            for sid in SIDS:
                sent, got = me.sent[sid], peer.received[sid]
                assert sent[: len(got)] == got  # in order, nothing lost or duplicated
                # sent but not yet consumed by the peer (in transit or buffered): <= window
                assert len(sent) - peer.consumed[sid] <= INITIAL_WINDOW
                assert 0 <= me.p.window(sid) <= INITIAL_WINDOW - (len(sent) - peer.consumed[sid])

    for kind, side, sid, arg in ops:
        me, peer = ends[side], ends[1 - side]
        if kind == "send":
            size = arg
            if sid in me.eof_sent or me.p.is_closed(sid):
                continue
            data = rng.randbytes(size)
            wire, n = me.p.send_data(sid, data)
            assert n == min(size, me.p.window(sid) + n)
            me.sent[sid] += data[:n]
            me.out += wire
        elif kind == "deliver":
            _deliver(me, peer, arg, rng)
        elif kind == "consume":
            n = min(arg, me.unconsumed(sid))
            me.consumed[sid] += n
            me.out += me.p.consumed(sid, n)
        elif kind == "reset":
            wire = me.p.send_reset(sid)
            assert me.p.is_closed(sid) and me.p.window(sid) == 0
            if wire:
                reset.add(sid)
                me.out += wire
        elif sid not in me.eof_sent and not me.p.is_closed(sid):
            me.eof_sent.add(sid)
            me.out += me.p.send_eof(sid)
        check_invariants()

    # Drain: deliver everything, consume everything (flushing credit), until quiet.
    while True:
        for me, peer in ((ends[0], ends[1]), (ends[1], ends[0])):
            _deliver(me, peer, 1 << 30, rng)
            for sid in SIDS:
                n = me.unconsumed(sid)
                me.consumed[sid] += n
                me.out += me.p.consumed(sid, n, flush=True)  # also flushes batched credit
        check_invariants()
        if not (ends[0].out or ends[1].out or any(e.unconsumed(s) for e in ends for s in SIDS)):
            break
    for me, peer in ((ends[0], ends[1]), (ends[1], ends[0])):
        for sid in SIDS:
            if sid in reset:  # both sides finished it; what arrived is a prefix (checked above)
                assert me.p.is_closed(sid) and me.p.window(sid) == 0
                continue
            assert peer.received[sid] == me.sent[sid]
            assert (sid in peer.eof_received) == (sid in me.eof_sent)
            if sid in me.eof_sent:
                assert me.p.window(sid) == 0
                assert me.p.is_closed(sid) == (sid in peer.eof_sent)
            else:  # every byte was credited back
                assert me.p.window(sid) == INITIAL_WINDOW


# --- driver test plumbing ---------------------------------------------------------------------


class _Pipe:
    def __init__(self, capacity: int) -> None:
        self.buf = bytearray()
        self.capacity = capacity
        self.closed = False
        self.changed = asyncio.Event()


class MemStream:
    """An in-memory ByteStream with a bounded buffer per direction (so backpressure is real)."""

    def __init__(self, inbox: _Pipe, outbox: _Pipe) -> None:
        self.inbox, self.outbox = inbox, outbox

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self.inbox.buf:
            if self.inbox.closed:
                return b""
            self.inbox.changed.clear()
            await self.inbox.changed.wait()
        data = bytes(self.inbox.buf[:max_bytes])
        del self.inbox.buf[:max_bytes]
        self.inbox.changed.set()
        return data

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.outbox.closed:
                raise ConnectionResetError("peer closed")
            space = self.outbox.capacity - len(self.outbox.buf)
            if space <= 0:
                self.outbox.changed.clear()
                await self.outbox.changed.wait()
                continue
            self.outbox.buf += view[:space]
            view = view[space:]
            self.outbox.changed.set()

    async def aclose(self) -> None:
        for pipe in (self.inbox, self.outbox):
            pipe.closed = True
            pipe.changed.set()


def mem_pair(capacity: int = 1 << 16) -> tuple[MemStream, MemStream]:
    ab, ba = _Pipe(capacity), _Pipe(capacity)
    return MemStream(ba, ab), MemStream(ab, ba)


@contextlib.asynccontextmanager
async def mux_pair(capacity: int = 1 << 16, **kwargs: int) -> AsyncIterator[tuple[Mux, Mux]]:
    a, b = mem_pair(capacity)
    async with Mux(a, **kwargs) as ma, Mux(b, **kwargs) as mb:
        yield ma, mb


def run(test: Callable[[], Awaitable[None]]) -> None:
    """asyncio.run with a safety timeout; fails if the test left any task running."""

    async def main() -> None:
        async with asyncio.timeout(20):
            await test()
        me = asyncio.current_task()
        leftover = [t for t in asyncio.all_tasks() if t is not me]
        assert not leftover, leftover

    asyncio.run(main())


async def until(predicate: Callable[[], bool], limit: int = 200_000) -> None:
    """Yield to the event loop (no timed sleep) until predicate() holds."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


_barrier_ids = iter(range(1_000_000, 2_000_000))


async def barrier(src: Mux, dst: Mux) -> None:
    """Return once everything src queued so far has been dispatched by dst."""
    sid = next(_barrier_ids)
    out, inp = src.open(sid), dst.open(sid)
    await out.write(b".")
    await out.write_eof()
    assert await inp.read() == b"."
    await inp.aclose()


async def read_all(s: MuxStream) -> bytes:
    parts = []
    while data := await s.read():
        parts.append(data)
    return b"".join(parts)


async def read_exactly(s: MuxStream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = await s.read(n - got)
        assert data
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _no_tasks_of(mux: Mux) -> bool:
    return all(t is None or t.done() for t in (mux._reader_task, mux._writer_task))


# --- driver -----------------------------------------------------------------------------------


def test_roundtrip_eof_and_finish() -> None:
    async def body() -> None:
        async with mux_pair() as (ma, mb):
            a, b = ma.open(1), mb.open(1)
            assert ma.open(1) is a  # idempotent
            await a.write(b"hello ")
            await a.write(bytearray(b"world"))
            await a.write(b"")
            await a.write_eof()
            await a.write_eof()  # idempotent
            with pytest.raises(BrokenPipeError):
                await a.write(b"late")
            assert await read_all(b) == b"hello world"
            assert await b.read() == b""  # EOF is sticky
            assert b.eof_received and not b.closed
            await b.write(b"back")
            await b.write_eof()
            assert b.closed and 1 not in mb._streams  # finished: forgotten
            assert await read_all(a) == b"back"
            assert a.closed and a.eof_sent and 1 not in ma._streams
            assert repr(a) == "<MuxStream 1 closed>"
            assert ma.open(1).is_reset  # a finished id is dead
            with pytest.raises(ValueError):
                ma.open(0)
            with pytest.raises(ValueError):
                await a.read(0)
            assert not ma.closed and ma.error is None

    run(body)


def test_reads_split_and_coalesce() -> None:
    async def body() -> None:
        async with mux_pair() as (ma, mb):
            a, b = ma.open(1), mb.open(1)
            for part in (b"abc", b"de", b"f", b"x" * 10):
                await a.write(part)
            await a.write_eof()
            await until(lambda: b.eof_received)
            assert b.buffered == 16
            assert await b.read(2) == b"ab"  # part of a chunk
            assert await b.read(4) == b"cdef"  # its rest and whole chunks
            assert await b.read(1) == b"x"
            assert await b.read(4) == b"xxxx"
            assert b.buffered == 5
            assert await b.read(100) == b"x" * 5
            assert await b.read() == b""

    run(body)


def test_no_head_of_line_blocking() -> None:
    """A stream whose reader is idle stops its writer at the window; others keep flowing."""

    async def body() -> None:
        async with mux_pair(capacity=32768) as (ma, mb):
            slow_w, slow_r = ma.open(1), mb.open(1)
            fast_w, fast_r = ma.open(2), mb.open(2)
            stuck = os.urandom(INITIAL_WINDOW + 1000)
            blocked = asyncio.create_task(slow_w.write(stuck))
            payload = os.urandom(4 * INITIAL_WINDOW)

            async def send_fast() -> None:
                await fast_w.write(payload)
                await fast_w.write_eof()

            sender = asyncio.create_task(send_fast())
            assert await read_all(fast_r) == payload
            await sender
            # the slow stream is exactly at its window and its writer is waiting for credit
            await until(lambda: slow_r.buffered == INITIAL_WINDOW)
            await barrier(ma, mb)
            assert slow_r.buffered == INITIAL_WINDOW
            assert slow_w.send_window == 0 and not blocked.done()
            # reading grants credit: the writer finishes
            assert await read_exactly(slow_r, len(stuck)) == stuck
            await blocked

    run(body)


def test_many_concurrent_streams_both_ways() -> None:
    """Frames from many writer tasks never interleave; every stream arrives intact."""

    async def body() -> None:
        rng = random.Random(1)
        async with mux_pair(capacity=4096) as (ma, mb):
            jobs = []
            for sid in range(1, 17):
                src, dst = (ma, mb) if sid % 2 else (mb, ma)
                payload = rng.randbytes(rng.choice([1, 1000, MAX_FRAME + 3, 600_000]))
                jobs.append((src.open(sid), dst.open(sid), payload))

            async def send(s: MuxStream, payload: bytes) -> None:
                for i in range(0, len(payload), 100_000):
                    await s.write(payload[i : i + 100_000])
                await s.write_eof()

            async with asyncio.TaskGroup() as tg:
                for src_s, _, payload in jobs:
                    tg.create_task(send(src_s, payload))
                results = [tg.create_task(read_all(dst_s)) for _, dst_s, _ in jobs]
            for (_, _, payload), got in zip(jobs, results, strict=True):
                assert got.result() == payload

    run(body)


def test_reset_wakes_reader_and_writer() -> None:
    async def body() -> None:
        async with mux_pair() as (ma, mb):
            a, b = ma.open(1), mb.open(1)
            reader = asyncio.create_task(b.read())
            writer = asyncio.create_task(b.write(bytes(INITIAL_WINDOW + 10)))
            await until(lambda: b.send_window == 0)
            await a.reset()
            with pytest.raises(ConnectionResetError):
                await reader
            with pytest.raises(BrokenPipeError):
                await writer
            assert b.is_reset and b.closed and 1 not in mb._streams
            with pytest.raises(ConnectionResetError):
                await a.read()
            with pytest.raises(BrokenPipeError):
                await a.write(b"x")
            with pytest.raises(BrokenPipeError):
                await a.write_eof()
            await a.reset()  # idempotent
            assert ma.open(1).is_reset and mb.open(1).is_reset
            # the DATA b had in flight was dropped without a protocol error
            await barrier(mb, ma)
            await barrier(ma, mb)
            assert ma.error is None and mb.error is None and not ma.closed
            # resetting a cleanly finished stream is a local no-op
            c, d = ma.open(2), mb.open(2)
            await c.write_eof()
            await d.write_eof()
            assert await c.read() == b""
            await c.reset()
            assert await d.read() == b""

    run(body)


def test_protocol_violation_tears_down() -> None:
    async def body() -> None:
        local, raw = mem_pair()
        mux = Mux(local)
        await mux.start()
        await mux.start()  # idempotent
        s = mux.open(1)
        reader = asyncio.create_task(s.read())
        w = mux.open(2)
        writer = asyncio.create_task(w.write(bytes(2 * INITIAL_WINDOW)))
        await raw.send_all(frame(1, 9))  # unknown frame type
        await mux.wait_closed()
        assert isinstance(mux.error, MuxProtocolError) and mux.closed
        with pytest.raises(ConnectionResetError):
            await reader
        with pytest.raises(BrokenPipeError):
            await writer
        with pytest.raises(ConnectionResetError):
            await s.read()
        assert s.connection_lost and s.closed
        with pytest.raises(ConnectionResetError):
            await mux.drain()
        # the connection itself was closed: the peer sees EOF
        while await raw.receive():
            pass
        await until(lambda: _no_tasks_of(mux))  # both tasks ended on their own
        late = mux.open(3)
        assert late.connection_lost and late.send_window == 0 and w.send_window == 0
        with pytest.raises(BrokenPipeError):
            await late.write(b"x")
        await late.reset()  # no-op
        await mux.aclose()
        await mux.aclose()  # idempotent
        with pytest.raises(RuntimeError):
            await mux.start()

    run(body)


def test_truncated_frame_at_eof_is_an_error() -> None:
    async def body() -> None:
        local, raw = mem_pair()
        async with Mux(local) as mux:
            await raw.send_all(frame(1, 0, b"abc")[:5])
            await raw.aclose()
            await mux.wait_closed()
            assert isinstance(mux.error, MuxProtocolError)

    run(body)


def test_connection_loss_wakes_blocked_readers_and_writers() -> None:
    async def body() -> None:
        local, raw = mem_pair(capacity=2 * INITIAL_WINDOW)  # the writer is never stuck in send_all
        async with Mux(local) as mux:
            r, w = mux.open(1), mux.open(2)
            reader = asyncio.create_task(r.read())
            writer = asyncio.create_task(w.write(bytes(INITIAL_WINDOW + 1)))
            await until(lambda: w.send_window == 0)
            await mux.drain()  # nothing left to send when the peer goes
            # the peer sends data for a stream we have not opened yet, then goes away
            await raw.send_all(frame(3, 0, b"abc") + frame(4, 0, b"xyz") + frame(4, 1))
            await raw.aclose()
            await mux.wait_closed()
            assert mux.error is None  # a clean EOF
            with pytest.raises(ConnectionResetError):
                await reader
            with pytest.raises(BrokenPipeError):
                await writer
            # data received before the loss is still delivered
            s3 = mux.open(3)
            assert await s3.read() == b"abc"
            with pytest.raises(ConnectionResetError):
                await s3.read()
            s4 = mux.open(4)  # ... and a completed stream reads to a clean EOF
            assert await read_all(s4) == b"xyz"
            await s4.aclose()

    run(body)


class _FailingStream:
    def __init__(self, *, fail_receive: bool) -> None:
        self.fail_receive = fail_receive
        self.gate = asyncio.Event()
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.fail_receive:
            raise OSError(5, "Input/output error")
        await self.gate.wait()
        return b""

    async def send_all(self, data: bytes) -> None:
        raise BrokenPipeError("gone")

    async def aclose(self) -> None:
        self.closed = True
        self.gate.set()


@pytest.mark.parametrize("fail_receive", [True, False])
def test_transport_errors_tear_down(fail_receive: bool) -> None:
    async def body() -> None:
        stream = _FailingStream(fail_receive=fail_receive)
        async with Mux(stream) as mux:
            s = mux.open(1)
            if not fail_receive:
                await s.write(b"x")  # queued; the writer's send fails
            await mux.wait_closed()
            await until(lambda: _no_tasks_of(mux))  # both tasks end by themselves
            assert isinstance(mux.error, OSError) and stream.closed
            with pytest.raises(ConnectionResetError):
                await s.read()

    run(body)


def test_data_for_unopened_stream_is_delivered_on_open() -> None:
    async def body() -> None:
        async with mux_pair() as (ma, mb):
            a = ma.open(5)
            await a.write(b"early")
            await a.write_eof()
            c = ma.open(6)
            await c.write(b"doomed")
            await c.reset()
            await ma.open(7).reset()  # reset without any data
            await barrier(ma, mb)
            b = mb.open(5)
            assert b.buffered == 5 and b.eof_received
            assert await read_all(b) == b"early"
            for sid in (6, 7):
                d = mb.open(sid)
                assert d.is_reset
                with pytest.raises(ConnectionResetError):
                    await d.read()
            assert mb._pending == 0

    run(body)


def test_pending_streams_are_bounded() -> None:
    async def body() -> None:
        async with mux_pair(max_pending_streams=2) as (ma, mb):
            senders = [ma.open(sid) for sid in (1, 2, 3)]
            for s in senders:
                await s.write(b"data %d" % s.stream_id)
            await barrier(ma, mb)  # mb had to reset stream 3 (third unopened stream)
            await barrier(mb, ma)  # ... and ma has seen that RESET
            assert senders[2].is_reset and not senders[0].is_reset
            with pytest.raises(BrokenPipeError):
                await senders[2].write(b"more")
            assert mb.open(3).is_reset
            assert await mb.open(1).read() == b"data 1"
            assert await mb.open(2).read() == b"data 2"

    run(body)


def test_stream_aclose_discards_and_finishes() -> None:
    async def body() -> None:
        async with mux_pair() as (ma, mb):
            a, b = ma.open(1), mb.open(1)
            await a.write(b"x" * 1000)
            await until(lambda: b.buffered == 1000)
            await b.aclose()
            await b.aclose()  # idempotent
            with pytest.raises(ConnectionResetError):
                await b.read()
            with pytest.raises(BrokenPipeError):
                await b.write(b"x")
            # b discards and credits everything, so a never blocks
            await a.write(bytes(3 * INITIAL_WINDOW))
            assert await a.read() == b""  # b's EOF
            await a.aclose()
            await barrier(ma, mb)
            assert 1 not in ma._streams and 1 not in mb._streams
            assert a.closed and b.closed

    run(body)


def test_aclose_flushes_and_drain() -> None:
    async def body() -> None:
        a, b = mem_pair()
        payload = os.urandom(200_000)  # within the window: no reader needed
        mb = Mux(b)
        await mb.start()
        async with Mux(a) as ma:
            s = ma.open(1)
            await s.write(payload)
            await s.write_eof()
            await ma.drain()
            await s.write_eof()
        # ma is closed; what it queued still arrived
        assert await read_all(mb.open(1)) == payload
        await mb.wait_closed()
        assert mb.error is None
        await mb.aclose()

    run(body)


def test_unix_socket_asyncio_byte_stream(tmp_path: object) -> None:
    async def body() -> None:
        path = os.path.join(str(tmp_path), "mux.sock")
        accepted: asyncio.Queue[AsyncioByteStream] = asyncio.Queue()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put(AsyncioByteStream(r, w))

        server = await asyncio.start_unix_server(on_conn, path)
        async with server:
            client = await AsyncioByteStream.connect_unix(path)
            async with Mux(client) as mc, Mux(await accepted.get()) as ms:
                c, s = mc.open(1), ms.open(1)
                await c.write(b"ping")
                assert await s.read() == b"ping"
                await s.write(b"pong")
                assert await c.read() == b"pong"
            with pytest.raises(ConnectionResetError):
                await client.send_all(b"x")
            await client.aclose()  # idempotent

    run(body)


def test_64mib_over_socketpair() -> None:
    total = 64 << 20
    block = os.urandom(1 << 20)

    async def body() -> None:
        s1, s2 = socket.socketpair()
        r1, w1 = await asyncio.open_unix_connection(sock=s1, limit=1 << 22)
        r2, w2 = await asyncio.open_unix_connection(sock=s2, limit=1 << 22)
        async with Mux(AsyncioByteStream(r1, w1)) as ma, Mux(AsyncioByteStream(r2, w2)) as mb:
            src, dst = ma.open(1), mb.open(1)
            sent_hash = hashlib.sha256()

            async def produce() -> None:
                for i in range(total // len(block)):
                    chunk = i.to_bytes(8, "big") + block[8:]
                    sent_hash.update(chunk)
                    await src.write(chunk)
                await src.write_eof()

            start = time.perf_counter()
            producer = asyncio.create_task(produce())
            got_hash, got = hashlib.sha256(), 0
            while data := await dst.read(1 << 20):
                got_hash.update(data)
                got += len(data)
            elapsed = time.perf_counter() - start
            await producer
            assert got == total and got_hash.digest() == sent_hash.digest()
            print(f"\n64 MiB over socketpair: {elapsed:.2f}s, {total / elapsed / 1e6:.0f} MB/s")

    run(body)


# --- fd pumps ---------------------------------------------------------------------------------


def test_pumps_through_real_pipes() -> None:
    async def body() -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            async with mux_pair() as (ma, mb):
                x_send, x_recv = ma.open(1), mb.open(1)  # test -> pipe
                y_send, y_recv = mb.open(2), ma.open(2)  # pipe -> test
                payload = os.urandom(1 << 20)  # well over the 64 KiB pipe buffer: EAGAIN both ways
                to_pipe = asyncio.create_task(pump_stream_to_fd(x_recv, w))
                from_pipe = asyncio.create_task(pump_fd_to_stream(r, y_send))
                received = asyncio.create_task(read_all(y_recv))
                await x_send.write(payload)
                await x_send.write_eof()
                assert await to_pipe == len(payload)
                os.close(w)
                w = -1
                assert await from_pipe == len(payload)
                assert await received == payload
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    run(body)


def test_pump_to_fd_epipe_resets_stream() -> None:
    async def body() -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        os.close(r)
        try:
            async with mux_pair() as (ma, mb):
                src, dst = ma.open(1), mb.open(1)
                pump = asyncio.create_task(pump_stream_to_fd(dst, w))
                await src.write(b"nobody reads this")
                assert await pump == 0
                assert dst.is_reset
                await barrier(mb, ma)
                assert src.is_reset
                with pytest.raises(BrokenPipeError):
                    await src.write(b"more")
                # a reset stream ends the pump quietly
                assert await pump_stream_to_fd(dst, w) == 0
        finally:
            os.close(w)

    run(body)


def test_pump_from_pty_master_eio_is_eof() -> None:
    async def body() -> None:
        master, slave = os.openpty()
        os.set_blocking(master, False)
        try:
            os.write(slave, b"hello from the pty")
            os.close(slave)
            async with mux_pair() as (ma, mb):
                src, dst = ma.open(1), mb.open(1)
                assert await pump_fd_to_stream(master, src) == 18
                assert await read_all(dst) == b"hello from the pty"
                assert src.eof_sent
        finally:
            os.close(master)

    run(body)


def test_pump_from_fd_stops_when_stream_reset() -> None:
    async def body() -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            os.write(w, b"output")
            async with mux_pair() as (ma, mb):
                src = ma.open(1)
                await mb.open(1).reset()
                await barrier(mb, ma)
                assert await pump_fd_to_stream(r, src) == 0
        finally:
            os.close(r)
            os.close(w)

    run(body)


def test_pumps_propagate_other_os_errors() -> None:
    async def body() -> None:
        r, w = os.pipe()
        try:
            async with mux_pair() as (ma, mb):
                src, dst = ma.open(1), mb.open(1)
                with pytest.raises(OSError):
                    await pump_fd_to_stream(w, src)  # reading a write end: EBADF
                await src.write(b"x")
                with pytest.raises(OSError):
                    await pump_stream_to_fd(dst, r)  # writing a read end: EBADF
        finally:
            os.close(r)
            os.close(w)

    run(body)
