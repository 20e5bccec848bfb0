"""The proto3 codec: wire-exact encodings, round trips, unknown fields and decode errors.

Expected bytes are worked out by hand from the protobuf encoding rules (and the examples in
the protobuf encoding guide), so they are what any protobuf implementation produces.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runm.proto.codec import DecodeError, Message, pfield

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)


@dataclass
class Inner(Message):
    a: int = pfield(1, "int32")
    s: str = pfield(2, "string")


@dataclass
class Scalars(Message):
    i32: int = pfield(1, "int32")
    i64: int = pfield(2, "int64")
    u32: int = pfield(3, "uint32")
    u64: int = pfield(4, "uint64")
    s32: int = pfield(5, "sint32")
    s64: int = pfield(6, "sint64")
    f32: int = pfield(7, "fixed32")
    f64: int = pfield(8, "fixed64")
    sf32: int = pfield(9, "sfixed32")
    sf64: int = pfield(10, "sfixed64")
    flt: float = pfield(11, "float")
    dbl: float = pfield(12, "double")
    flag: bool = pfield(13, "bool")
    blob: bytes = pfield(14, "bytes")
    text: str = pfield(15, "string")
    color: int = pfield(16, "enum")
    inner: Inner | None = pfield(17, "message", message=Inner)
    labels: dict[str, str] = pfield(18, "map")


@dataclass
class Repeated(Message):
    ints: list[int] = pfield(1, "int32", repeated=True)
    sints: list[int] = pfield(2, "sint64", repeated=True)
    fixed: list[int] = pfield(3, "fixed32", repeated=True)
    dbls: list[float] = pfield(4, "double", repeated=True)
    flags: list[bool] = pfield(5, "bool", repeated=True)
    strs: list[str] = pfield(6, "string", repeated=True)
    msgs: list[Inner] = pfield(7, "message", repeated=True, message=Inner)
    blobs: list[bytes] = pfield(8, "bytes", repeated=True)
    u64s: list[int] = pfield(9, "uint64", repeated=True)
    flts: list[float] = pfield(10, "float", repeated=True)
    sf64s: list[int] = pfield(11, "sfixed64", repeated=True)


@dataclass
class Known(Message):
    name: str = pfield(1, "string")
    n: int = pfield(2, "int64")


# Messages from the protobuf encoding guide.
@dataclass
class Guide1(Message):
    a: int = pfield(1, "int32")


@dataclass
class Guide2(Message):
    b: str = pfield(2, "string")


@dataclass
class Guide3(Message):
    c: Guide1 | None = pfield(3, "message", message=Guide1)


@dataclass
class Guide5(Message):
    f: list[int] = pfield(6, "int32", repeated=True)


@dataclass
class Big(Message):
    x: int = pfield(16, "int32")
    y: int = pfield(536870911, "uint32")  # the largest field number


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# --- byte-exact encodings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (Known(name="a"), "0a 01 61"),
        (Known(n=-1), "10 ff ff ff ff ff ff ff ff ff 01"),
        (Known(name="a", n=-1), "0a 01 61 10 ff ff ff ff ff ff ff ff ff 01"),
        (Guide1(a=150), "08 96 01"),
        (Guide2(b="testing"), "12 07 74 65 73 74 69 6e 67"),
        (Guide3(c=Guide1(a=150)), "1a 03 08 96 01"),
        (Guide3(c=Guide1()), "1a 00"),  # a present but empty message is still sent
        (Guide5(f=[3, 270, 86942]), "32 06 03 8e 02 9e a7 05"),
        (Scalars(i32=-1), "08 ff ff ff ff ff ff ff ff ff 01"),  # int32 < 0: 10 bytes too
        (Scalars(u32=2**32 - 1), "18 ff ff ff ff 0f"),
        (Scalars(u64=2**64 - 1), "20 ff ff ff ff ff ff ff ff ff 01"),
        (Scalars(s32=-1), "28 01"),
        (Scalars(s32=1), "28 02"),
        (Scalars(s32=-2), "28 03"),
        (Scalars(s32=2**31 - 1), "28 fe ff ff ff 0f"),
        (Scalars(s32=-(2**31)), "28 ff ff ff ff 0f"),
        (Scalars(s64=-(2**63)), "30 ff ff ff ff ff ff ff ff ff 01"),
        (Scalars(f32=1), "3d 01 00 00 00"),
        (Scalars(f64=2**64 - 1), "41 ff ff ff ff ff ff ff ff"),
        (Scalars(sf32=-2), "4d fe ff ff ff"),
        (Scalars(sf64=-2), "51 fe ff ff ff ff ff ff ff"),
        (Scalars(flt=1.5), "5d 00 00 c0 3f"),
        (Scalars(dbl=1.0), "61 00 00 00 00 00 00 f0 3f"),
        (Scalars(flag=True), "68 01"),
        (Scalars(blob=b"\x00\xff"), "72 02 00 ff"),
        (Scalars(text="é"), "7a 02 c3 a9"),
        (Scalars(color=2), "80 01 02"),  # field 16: the key needs two bytes
        (Scalars(inner=Inner(a=1, s="x")), "8a 01 05 08 01 12 01 78"),
        (Scalars(labels={"k": "v"}), "92 01 06 0a 01 6b 12 01 76"),
        (Big(x=1, y=1), "80 01 01 f8 ff ff ff 0f 01"),
        (Repeated(strs=["a", "", "b"]), "32 01 61 32 00 32 01 62"),  # "" kept in lists
        (Repeated(fixed=[1, 2]), "1a 08 01 00 00 00 02 00 00 00"),
        (Repeated(sints=[-1, 1]), "12 02 01 02"),
        (Repeated(flags=[True, False]), "2a 02 01 00"),
        (Repeated(msgs=[Inner(a=1), Inner()]), "3a 02 08 01 3a 00"),
        (Repeated(blobs=[b"", b"z"]), "42 00 42 01 7a"),
    ],
)
def test_encoding_is_byte_exact(msg: Message, wire: str) -> None:
    assert msg.encode() == h(wire)
    assert type(msg).decode(h(wire)) == msg


def test_fields_are_written_in_field_number_order() -> None:
    @dataclass
    class Backwards(Message):
        second: int = pfield(2, "int32")
        first: int = pfield(1, "int32")

    assert Backwards(second=2, first=1).encode() == h("08 01 10 02")


def test_defaults_are_omitted_on_the_wire() -> None:
    assert Scalars().encode() == b""
    assert Scalars(i32=0, text="", blob=b"", flag=False, dbl=0.0, inner=None,
                   labels={}).encode() == b""
    assert Repeated().encode() == b""


def test_empty_input_decodes_to_defaults() -> None:
    msg = Scalars.decode(b"")
    assert msg == Scalars()
    assert msg.inner is None
    assert msg.labels == {}
    assert Repeated.decode(b"").ints == []


def test_nested_message_presence_survives_a_round_trip() -> None:
    assert Scalars.decode(Scalars(inner=Inner()).encode()).inner == Inner()
    assert Scalars.decode(Scalars().encode()).inner is None


def test_decode_accepts_memoryview_input() -> None:
    data = memoryview(b"junk" + Known(name="x", n=5).encode())[4:]
    assert Known.decode(data) == Known(name="x", n=5)


# --- scalar round trips ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("i32", [1, -1, 2**31 - 1, -(2**31)]),
        ("i64", [1, -1, 2**63 - 1, -(2**63)]),
        ("u32", [1, 2**31, 2**32 - 1]),
        ("u64", [1, 2**63, 2**64 - 1]),
        ("s32", [1, -1, 2**31 - 1, -(2**31)]),
        ("s64", [1, -1, 2**63 - 1, -(2**63)]),
        ("f32", [1, 2**32 - 1]),
        ("f64", [1, 2**64 - 1]),
        ("sf32", [-1, 2**31 - 1, -(2**31)]),
        ("sf64", [-1, 2**63 - 1, -(2**63)]),
        ("flt", [1.5, -0.25, math.inf, -math.inf]),
        ("dbl", [1e300, -1e-300, math.inf]),
        ("flag", [True]),
        ("blob", [b"\x00", bytes(range(256))]),
        ("text", ["a", "héllo wörld", "日本語", "\U0001f600", "x" * 300]),
        ("color", [1, -1, 2**31 - 1]),
    ],
)
def test_scalar_round_trip(field: str, values: list[object]) -> None:
    for value in values:
        msg = Scalars(**{field: value})
        decoded = Scalars.decode(msg.encode())
        assert getattr(decoded, field) == value
        assert decoded == msg


def test_nan_round_trips_as_nan() -> None:
    decoded = Scalars.decode(Scalars(dbl=math.nan, flt=math.nan).encode())
    assert math.isnan(decoded.dbl)
    assert math.isnan(decoded.flt)


def test_float_is_stored_with_single_precision() -> None:
    decoded = Scalars.decode(Scalars(flt=0.1).encode())
    assert decoded.flt == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    assert decoded.flt != 0.1


def test_overlong_varints_are_truncated_to_the_field_width() -> None:
    # A 10-byte varint holding 2**64-1 is -1 for int32/int64 and 2**32-1 for uint32.
    ones = "ff ff ff ff ff ff ff ff ff 01"
    assert Scalars.decode(h("08 " + ones)).i32 == -1
    assert Scalars.decode(h("10 " + ones)).i64 == -1
    assert Scalars.decode(h("18 " + ones)).u32 == 2**32 - 1
    assert Scalars.decode(h("68 " + ones)).flag is True
    assert Scalars.decode(h("68 00")).flag is False


# --- repeated fields and maps ----------------------------------------------------------------


def test_repeated_round_trip() -> None:
    msg = Repeated(
        ints=[0, 1, -1, 2**31 - 1, -(2**31)],
        sints=[0, -(2**63), 2**63 - 1],
        fixed=[0, 2**32 - 1],
        dbls=[0.0, -1.5, 1e100],
        flags=[True, False, True],
        strs=["", "ünï", "x"],
        msgs=[Inner(), Inner(a=-5, s="s")],
        blobs=[b"", b"\x00\x01"],
        u64s=[2**64 - 1, 0],
        flts=[0.5, -2.0],
        sf64s=[-(2**63), 2**63 - 1],
    )
    assert Repeated.decode(msg.encode()) == msg


def test_numeric_repeated_fields_are_packed() -> None:
    wire = Repeated(ints=[1, 2, 3]).encode()
    assert wire == h("0a 03 01 02 03")  # one length-delimited record, not three


def test_decoder_accepts_unpacked_numeric_repeated_fields() -> None:
    unpacked = h("08 01 08 ff ff ff ff ff ff ff ff ff 01 08 03")
    assert Repeated.decode(unpacked).ints == [1, -1, 3]
    fixed = h("1d 01 00 00 00 1d 02 00 00 00")
    assert Repeated.decode(fixed).fixed == [1, 2]
    dbls = h("21" + struct.pack("<d", 2.5).hex() + "21" + struct.pack("<d", -1.0).hex())
    assert Repeated.decode(dbls).dbls == [2.5, -1.0]


def test_packed_and_unpacked_records_of_one_field_concatenate_in_order() -> None:
    mixed = h("08 01 0a 02 02 03 08 04")
    assert Repeated.decode(mixed).ints == [1, 2, 3, 4]


def test_empty_packed_record_adds_nothing() -> None:
    assert Repeated.decode(h("0a 00")).ints == []


def test_repeated_messages_and_strings_keep_their_order() -> None:
    msg = Repeated(strs=["c", "a", "b"], msgs=[Inner(a=3), Inner(a=1), Inner(a=2)])
    decoded = Repeated.decode(msg.encode())
    assert decoded.strs == ["c", "a", "b"]
    assert [m.a for m in decoded.msgs] == [3, 1, 2]


def test_map_round_trip() -> None:
    labels = {"a": "1", "": "empty key", "empty value": "", "ü": "日本"}
    assert Scalars.decode(Scalars(labels=labels).encode()).labels == labels


def test_map_last_entry_for_a_key_wins() -> None:
    wire = h("92 01 06 0a 01 6b 12 01 31") + h("92 01 06 0a 01 6b 12 01 32")
    assert Scalars.decode(wire).labels == {"k": "2"}


def test_map_entry_with_missing_key_and_value_is_an_empty_pair() -> None:
    assert Scalars.decode(h("92 01 00")).labels == {"": ""}


def test_last_value_of_a_singular_field_wins() -> None:
    assert Known.decode(h("0a 01 61 0a 01 62 10 01 10 02")) == Known(name="b", n=2)


# --- unknown fields --------------------------------------------------------------------------


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    wire = (
        h("18 96 01")  # 3: varint
        + h("21 01 02 03 04 05 06 07 08")  # 4: fixed64
        + h("0a 01 61")  # 1: known
        + h("2a 03 ff fe fd")  # 5: length-delimited (not even UTF-8)
        + h("35 01 02 03 04")  # 6: fixed32
        + h("f8 ff ff ff 0f 01")  # 536870911: varint
        + h("10 07")  # 2: known
    )
    assert Known.decode(wire) == Known(name="a", n=7)


def test_message_decodes_newer_encodings_with_extra_fields() -> None:
    newer = Scalars(i32=7, i64=-9, text="t", labels={"k": "v"}, inner=Inner(a=1))

    @dataclass
    class Older(Message):
        i64: int = pfield(2, "int64")
        text: str = pfield(15, "string")

    assert Older.decode(newer.encode()) == Older(i64=-9, text="t")


# --- decode errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        ("80", "truncated varint"),  # key itself truncated
        ("08 96", "truncated varint"),
        ("10 ff ff ff ff ff ff ff ff ff ff 01", "varint too long"),
        ("0a 05 61 62", "truncated length-delimited"),
        ("0a", "truncated varint"),  # length missing
        ("19 01 02 03", "truncated fixed64"),  # unknown field 3, fixed64
        ("1d 01 02", "truncated fixed32"),
        ("08 01", "wire type 0 does not match string"),
        ("12 01 01", "wire type 2 does not match int64"),
        ("0a 01 ff", "invalid UTF-8"),
        ("0a 02 c3 28", "invalid UTF-8"),
        ("00 00", "field number 0"),
        ("02 00", "field number 0"),
        ("0b", "unsupported wire type 3"),  # start group of field 1
        ("0c", "unsupported wire type 4"),  # end group of field 1
        ("1b", "unsupported wire type 3"),  # ... also for unknown fields
        ("1c", "unsupported wire type 4"),
        ("1e", "unsupported wire type 6"),
        ("1f", "unsupported wire type 7"),
    ],
)
def test_decode_errors(wire: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        Known.decode(h(wire))


@pytest.mark.parametrize(
    ("cls", "wire", "reason"),
    [
        (Scalars, "90 01 01", "map entry must be length-delimited"),
        (Scalars, "92 01 02 0a 05", "truncated length-delimited"),  # inside a map entry
        (Scalars, "92 01 02 08 01", "wire type 0 does not match string"),
        (Scalars, "8a 01 02 12 01", "truncated length-delimited"),  # inside a nested message
        (Scalars, "8a 01 05 08", "truncated length-delimited"),  # nested body cut short
        (Scalars, "8a 01 01 00", "field number 0"),  # error inside the nested message
        (Scalars, "88 01 01", "wire type 0 does not match message"),
        (Scalars, "3d 01 00 00 00 3d 01 00", "truncated fixed32"),
        (Scalars, "39 00 00 00 00 00 00 00 00", "wire type 1 does not match fixed32"),
        (Repeated, "1a 03 01 00 00", "truncated fixed32"),  # packed fixed32, 3 bytes
        (Repeated, "0a 01 80", "truncated varint"),  # packed varints, last one cut
        (Repeated, "22 04 00 00 00 00", "truncated fixed64"),
        (Repeated, "38 01", "wire type 0 does not match message"),
    ],
)
def test_decode_errors_in_nested_structures(cls: type[Message], wire: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        cls.decode(h(wire))


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


def test_pfield_rejects_bad_declarations() -> None:
    with pytest.raises(ValueError, match="unknown proto kind 'int'"):
        pfield(1, "int")
    with pytest.raises(ValueError, match="message fields need message="):
        pfield(1, "message")


def test_repeated_and_map_defaults_are_not_shared() -> None:
    one, two = Repeated(), Repeated()
    one.ints.append(1)
    assert two.ints == []
    a, b = Scalars(), Scalars()
    a.labels["k"] = "v"
    assert b.labels == {}


# --- properties ------------------------------------------------------------------------------

FLOAT32 = st.floats(width=32, allow_nan=False)
FLOAT64 = st.floats(allow_nan=False)
inners = st.builds(Inner, a=INT32, s=st.text(max_size=8))
scalars = st.builds(
    Scalars,
    i32=INT32, i64=INT64, u32=UINT32, u64=UINT64, s32=INT32, s64=INT64,
    f32=UINT32, f64=UINT64, sf32=INT32, sf64=INT64, flt=FLOAT32, dbl=FLOAT64,
    flag=st.booleans(), blob=st.binary(max_size=32), text=st.text(max_size=32),
    color=INT32, inner=st.none() | inners,
    labels=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
)
repeateds = st.builds(
    Repeated,
    ints=st.lists(INT32, max_size=6), sints=st.lists(INT64, max_size=6),
    fixed=st.lists(UINT32, max_size=6), dbls=st.lists(FLOAT64, max_size=6),
    flags=st.lists(st.booleans(), max_size=6), strs=st.lists(st.text(max_size=6), max_size=6),
    msgs=st.lists(inners, max_size=4), blobs=st.lists(st.binary(max_size=6), max_size=4),
    u64s=st.lists(UINT64, max_size=6), flts=st.lists(FLOAT32, max_size=6),
    sf64s=st.lists(INT64, max_size=6),
)


@settings(max_examples=50, deadline=None)
@given(scalars)
def test_property_scalars_round_trip(msg: Scalars) -> None:
    assert Scalars.decode(msg.encode()) == msg


@settings(max_examples=40, deadline=None)
@given(repeateds)
def test_property_repeated_round_trip(msg: Repeated) -> None:
    assert Repeated.decode(msg.encode()) == msg


@settings(max_examples=25, deadline=None)
@given(scalars, scalars)
def test_property_concatenation_merges_like_protobuf_for_scalars(a: Scalars, b: Scalars) -> None:
    # Proto rule: decoding A+B gives B's value for every singular scalar B sets, A's otherwise.
    merged = Scalars.decode(a.encode() + b.encode())
    for name in ("i32", "i64", "u32", "u64", "s32", "s64", "f32", "f64", "text", "blob"):
        expected = getattr(b, name) or getattr(a, name)
        assert getattr(merged, name) == expected
    assert merged.labels == {**a.labels, **b.labels}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_property_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    for cls in (Scalars, Repeated, Known):
        try:
            msg = cls.decode(data)
        except DecodeError:
            continue
        assert isinstance(msg, cls)
