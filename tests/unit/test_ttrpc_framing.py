"""runm.ttrpc.framing: the sans-I/O frame encoder/decoder."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runm.ttrpc.framing import (
    HEADER_SIZE,
    MAX_DATA,
    Flags,
    Frame,
    FrameDecoder,
    FramingError,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    encode_frame,
)
from runm.ttrpc.status import Code

frames = st.builds(
    Frame,
    stream_id=st.integers(0, 0xFFFFFFFF),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    data=st.binary(max_size=64),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split data at the given offsets (taken modulo len+1, any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def drain(decoder: FrameDecoder) -> list[Frame | OversizedFrame]:
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    wire = encode_frame(3, MessageType.REQUEST, Flags.REMOTE_CLOSED, b"abc")
    assert wire == b"\x00\x00\x00\x03" + b"\x00\x00\x00\x03" + b"\x01\x01" + b"abc"
    assert len(wire) == HEADER_SIZE + 3


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_round_trip_with_arbitrary_chunking(sequence: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in sequence)
    decoder = FrameDecoder()
    events: list[Frame | OversizedFrame] = []
    for chunk in chunked(wire, cuts):
        decoder.feed(chunk)
        events += drain(decoder)
    assert events == sequence
    assert decoder.pending == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(frames, min_size=1, max_size=4))
def test_one_byte_at_a_time(sequence: list[Frame]) -> None:
    wire = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in sequence)
    decoder = FrameDecoder()
    events: list[Frame | OversizedFrame] = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        events += drain(decoder)
    assert events == sequence


@settings(max_examples=200, deadline=None)
@given(frames, st.data())
def test_truncated_frame_yields_nothing_and_stays_pending(
    frame: Frame, data: st.DataObject
) -> None:
    wire = encode_frame(frame.stream_id, frame.type, frame.flags, frame.data)
    cut = data.draw(st.integers(0, len(wire) - 1))
    decoder = FrameDecoder()
    decoder.feed(wire[:cut])
    assert decoder.next_event() is None
    assert decoder.pending == cut
    decoder.feed(wire[cut:])
    assert decoder.next_event() == frame
    assert decoder.next_event() is None
    assert decoder.pending == 0


def test_many_frames_in_one_chunk_leave_the_partial_tail_pending() -> None:
    wire = b"".join(encode_frame(2 * i + 1, 1, 0, b"x" * i) for i in range(50))
    decoder = FrameDecoder()
    decoder.feed(wire + wire[:5])
    assert [e.stream_id for e in drain(decoder)] == [2 * i + 1 for i in range(50)]
    assert decoder.pending == 5


oversized_or_frame = st.one_of(
    frames.filter(lambda f: len(f.data) <= 16),
    st.builds(
        OversizedFrame,
        stream_id=st.integers(0, 0xFFFFFFFF),
        type=st.integers(0, 255),
        length=st.integers(17, 200),
    ),
)


def _wire(event: Frame | OversizedFrame) -> bytes:
    if isinstance(event, Frame):
        return encode_frame(event.stream_id, event.type, event.flags, event.data)
    header = struct.pack(">IIBB", event.length, event.stream_id, event.type, 0)
    # a zero payload would parse as empty frames if the decoder did not skip it
    return header + bytes(event.length)


@settings(max_examples=200, deadline=None)
@given(st.lists(oversized_or_frame, max_size=8), st.lists(st.integers(0, 5_000), max_size=30))
def test_oversized_frames_are_reported_and_skipped_without_buffering(
    sequence: list[Frame | OversizedFrame], cuts: list[int]
) -> None:
    max_data = 16
    wire = b"".join(_wire(e) for e in sequence)
    decoder = FrameDecoder(max_data=max_data)
    events: list[Frame | OversizedFrame] = []
    for chunk in chunked(wire, cuts):
        decoder.feed(chunk)
        # only ever an incomplete legal frame is buffered, never an oversized payload
        assert decoder.pending < HEADER_SIZE + max_data
        events += drain(decoder)
    assert events == sequence
    assert decoder.pending == 0
    assert decoder.skipping == 0


def test_real_limit_oversized_payload_in_pieces_then_next_frame_decodes() -> None:
    decoder = FrameDecoder()
    length = MAX_DATA + 1
    decoder.feed(struct.pack(">IIBB", length, 7, MessageType.REQUEST, 0))
    assert decoder.next_event() == OversizedFrame(7, MessageType.REQUEST, length)
    assert decoder.skipping == length
    piece = b"\xab" * (1 << 16)
    remaining = length
    while remaining > 100:
        decoder.feed(piece[: min(len(piece), remaining - 100)])
        remaining -= min(len(piece), remaining - 100)
        assert decoder.pending == 0
        assert decoder.next_event() is None
    # the last bytes of the payload arrive together with the next frame
    decoder.feed(b"\xab" * remaining + encode_frame(9, MessageType.REQUEST, 0, b"ok"))
    assert decoder.next_event() == Frame(9, MessageType.REQUEST, 0, b"ok")
    assert decoder.skipping == 0


def test_exactly_max_data_is_a_normal_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(1, MessageType.RESPONSE, 0, bytes(MAX_DATA)))
    event = decoder.next_event()
    assert isinstance(event, Frame)
    assert len(event.data) == MAX_DATA


def test_length_just_below_16mib_is_oversized_not_garbage() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IIBB", (1 << 24) - 1, 1, 1, 0))
    assert decoder.next_event() == OversizedFrame(1, 1, (1 << 24) - 1)


def test_reserved_length_byte_set_is_a_framing_error_after_earlier_frames() -> None:
    decoder = FrameDecoder()
    good = encode_frame(1, MessageType.REQUEST, 0, b"a")
    decoder.feed(good + b"\x01" + bytes(9) + good)
    assert decoder.next_event() == Frame(1, MessageType.REQUEST, 0, b"a")
    with pytest.raises(FramingError, match="out of sync"):
        decoder.next_event()
    assert decoder.pending == 0
    with pytest.raises(FramingError):
        decoder.feed(good)
    with pytest.raises(FramingError):
        decoder.next_event()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=10))
def test_garbage_never_raises_anything_but_framing_error(garbage: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_data=64)
    try:
        for chunk in chunked(garbage, cuts):
            decoder.feed(chunk)
            for event in drain(decoder):
                assert isinstance(event, Frame | OversizedFrame)
                if isinstance(event, Frame):
                    assert len(event.data) <= 64
    except FramingError:
        pass
    assert decoder.pending < HEADER_SIZE + 64


def test_encode_refuses_oversized_data() -> None:
    with pytest.raises(OversizedMessageError) as info:
        encode_frame(1, MessageType.REQUEST, 0, bytes(MAX_DATA + 1))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert info.value.length == MAX_DATA + 1
    assert info.value.message == "message length 4194305 exceed maximum message size of 4194304"
    assert len(encode_frame(1, MessageType.REQUEST, 0, bytes(MAX_DATA))) == HEADER_SIZE + MAX_DATA


def test_encode_refuses_out_of_range_stream_id() -> None:
    with pytest.raises(ValueError, match="stream id"):
        encode_frame(1 << 32, MessageType.REQUEST, 0, b"")
    with pytest.raises(ValueError, match="stream id"):
        encode_frame(-1, MessageType.REQUEST, 0, b"")
