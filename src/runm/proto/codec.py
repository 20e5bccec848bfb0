"""A small proto3 codec: dataclass messages whose fields carry their proto numbers.

Runs unchanged on the host and in the guest (stdlib only), so the agent needs no protobuf
package. Encoding follows proto3: scalars equal to their default are omitted, numeric repeated
fields are packed (both packed and unpacked are accepted), unknown fields are skipped.

    @record
    class KeyValue(Message):
        key: str = pfield(1, "string")
        value: str = pfield(2, "string")
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, Self

from runm.records import record

__all__ = ["DecodeError", "Message", "pfield"]

# wire types
VARINT, I64, LEN, I32 = 0, 1, 2, 5

_VARINT_KINDS = {"bool", "int32", "int64", "uint32", "uint64", "enum", "sint32", "sint64"}
_FIXED64_KINDS = {"fixed64", "sfixed64", "double"}
_FIXED32_KINDS = {"fixed32", "sfixed32", "float"}
_LEN_KINDS = {"string", "bytes", "message", "map"}
_KINDS = _VARINT_KINDS | _FIXED64_KINDS | _FIXED32_KINDS | _LEN_KINDS
_STRUCT = {
    "fixed64": struct.Struct("<Q"),
    "sfixed64": struct.Struct("<q"),
    "double": struct.Struct("<d"),
    "fixed32": struct.Struct("<I"),
    "sfixed32": struct.Struct("<i"),
    "float": struct.Struct("<f"),
}
_DEFAULTS: dict[str, Any] = {"string": "", "bytes": b"", "bool": False, "double": 0.0, "float": 0.0}


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the message."""


@record(frozen=True)
class FieldSpec:
    number: int
    kind: str
    repeated: bool
    message: type[Message] | None


def pfield(
    number: int,
    kind: str,
    *,
    repeated: bool = False,
    message: type[Message] | None = None,
) -> Any:
    """Declare a message field: its proto number and kind.

    kind is a proto3 scalar type name, "message" (give `message=`; default None) or "map"
    (map<string,string>, a dict). Repeated fields default to an empty list.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown proto kind {kind!r}")
    if kind == "message" and message is None:
        raise ValueError("message fields need message=")
    spec = FieldSpec(number, kind, repeated, message)
    meta = {"proto": spec}
    if repeated:
        return dataclasses.field(default_factory=list, metadata=meta)
    if kind == "map":
        return dataclasses.field(default_factory=dict, metadata=meta)
    if kind == "message":
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default=_DEFAULTS.get(kind, 0), metadata=meta)


def _encode_varint(value: int, out: bytearray) -> None:
    if value < 0:
        value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint too long")


def _to_signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _scalar_from_varint(kind: str, raw: int) -> Any:
    if kind == "bool":
        return raw != 0
    if kind in ("int32", "enum"):
        return _to_signed(raw, 32)
    if kind == "int64":
        return _to_signed(raw, 64)
    if kind == "uint32":
        return raw & 0xFFFFFFFF
    if kind in ("sint32", "sint64"):
        return (raw >> 1) ^ -(raw & 1)
    return raw & ((1 << 64) - 1)


def _varint_of(kind: str, value: Any) -> int:
    if kind in ("sint32", "sint64"):
        v = int(value)
        return (v << 1) ^ (v >> 63)
    return int(value)


def _wire_type(kind: str) -> int:
    if kind in _VARINT_KINDS:
        return VARINT
    if kind in _FIXED64_KINDS:
        return I64
    if kind in _FIXED32_KINDS:
        return I32
    return LEN


class Message:
    """Base class for proto3 messages declared as dataclasses with `pfield`."""

    _specs: ClassVar[dict[int, tuple[str, FieldSpec]] | None] = None

    @classmethod
    def _fields_by_number(cls) -> dict[int, tuple[str, FieldSpec]]:
        specs = cls.__dict__.get("_specs")
        if specs is None:
            specs = {}
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                spec = f.metadata.get("proto")
                if spec is not None:
                    specs[spec.number] = (f.name, spec)
            cls._specs = specs
        return specs

    def encode(self) -> bytes:
        out = bytearray()
        for number, (name, spec) in sorted(self._fields_by_number().items()):
            value = getattr(self, name)
            if spec.kind == "map":
                for key, val in value.items():
                    entry = bytearray()
                    _encode_field(1, "string", key, entry)
                    _encode_field(2, "string", val, entry)
                    _encode_key(number, LEN, out)
                    _encode_varint(len(entry), out)
                    out += entry
            elif spec.repeated:
                if not value:
                    continue
                if _wire_type(spec.kind) != LEN:
                    packed = bytearray()
                    for item in value:
                        _encode_raw(spec.kind, item, packed)
                    _encode_key(number, LEN, out)
                    _encode_varint(len(packed), out)
                    out += packed
                else:
                    for item in value:
                        _encode_field(number, spec.kind, item, out, force=True)
            else:
                _encode_field(number, spec.kind, value, out)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        specs = cls._fields_by_number()
        values: dict[str, Any] = {}
        pos, end = 0, len(data)
        while pos < end:
            key, pos = _decode_varint(data, pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise DecodeError("field number 0")
            pos, raw = _read_value(data, pos, wire)
            entry = specs.get(number)
            if entry is None:
                continue
            name, spec = entry
            if spec.kind == "map":
                if not isinstance(raw, memoryview):
                    raise DecodeError(f"field {number}: map entry must be length-delimited")
                entry_msg = _MapEntry.decode(raw)
                values.setdefault(name, {})[entry_msg.key] = entry_msg.value
            elif spec.repeated and wire == LEN and _wire_type(spec.kind) != LEN:
                assert isinstance(raw, memoryview)
                lst = values.setdefault(name, [])
                ppos = 0
                while ppos < len(raw):
                    ppos, item = _read_value(raw, ppos, _wire_type(spec.kind))
                    lst.append(_convert(spec, item, _wire_type(spec.kind)))
            elif spec.repeated:
                values.setdefault(name, []).append(_convert(spec, raw, wire))
            else:
                values[name] = _convert(spec, raw, wire)
        try:
            return cls(**values)
        except TypeError as err:  # pragma: no cover - only if a subclass is not a dataclass
            raise DecodeError(str(err)) from err


def _encode_key(number: int, wire: int, out: bytearray) -> None:
    _encode_varint((number << 3) | wire, out)


def _encode_raw(kind: str, value: Any, out: bytearray) -> None:
    if kind in _VARINT_KINDS:
        _encode_varint(_varint_of(kind, value), out)
    else:
        out += _STRUCT[kind].pack(value)


def _encode_field(number: int, kind: str, value: Any, out: bytearray, force: bool = False) -> None:
    if kind == "message":
        if value is None:
            return
        body = value.encode()
        _encode_key(number, LEN, out)
        _encode_varint(len(body), out)
        out += body
        return
    if not force and (value is None or value == _DEFAULTS.get(kind, 0)):
        return
    if kind in ("string", "bytes"):
        body = value.encode() if kind == "string" else bytes(value)
        _encode_key(number, LEN, out)
        _encode_varint(len(body), out)
        out += body
        return
    _encode_key(number, _wire_type(kind), out)
    _encode_raw(kind, value, out)


def _read_value(data: bytes | memoryview, pos: int, wire: int) -> tuple[int, Any]:
    if wire == VARINT:
        value, pos = _decode_varint(data, pos)
        return pos, value
    if wire == I64:
        if pos + 8 > len(data):
            raise DecodeError("truncated fixed64")
        return pos + 8, bytes(data[pos : pos + 8])
    if wire == I32:
        if pos + 4 > len(data):
            raise DecodeError("truncated fixed32")
        return pos + 4, bytes(data[pos : pos + 4])
    if wire == LEN:
        length, pos = _decode_varint(data, pos)
        if pos + length > len(data):
            raise DecodeError("truncated length-delimited field")
        return pos + length, memoryview(data)[pos : pos + length]
    raise DecodeError(f"unsupported wire type {wire}")


def _convert(spec: FieldSpec, raw: Any, wire: int) -> Any:
    kind = spec.kind
    if _wire_type(kind) != wire:
        raise DecodeError(f"field {spec.number}: wire type {wire} does not match {kind}")
    if wire == VARINT:
        return _scalar_from_varint(kind, raw)
    if wire in (I64, I32):
        return _STRUCT[kind].unpack(raw)[0]
    if kind == "string":
        try:
            return bytes(raw).decode()
        except UnicodeDecodeError as err:
            raise DecodeError(f"field {spec.number}: invalid UTF-8") from err
    if kind == "bytes":
        return bytes(raw)
    assert spec.message is not None
    return spec.message.decode(raw)


@record
class _MapEntry(Message):
    key: str = pfield(1, "string")
    value: str = pfield(2, "string")
