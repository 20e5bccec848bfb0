"""The ttrpc envelope messages (package ``ttrpc`` in containerd/ttrpc's request.proto).

    message Request  { string service = 1; string method = 2; bytes payload = 3;
                       int64 timeout_nano = 4; repeated KeyValue metadata = 5; }
    message Response { google.rpc.Status status = 1; bytes payload = 2; }
    message KeyValue { string key = 1; string value = 2; }

plus google.rpc.Status and google.protobuf.Any (`AnyMessage`, so the name does not clash with
typing.Any).
"""

from __future__ import annotations

from runm.proto.codec import Message, pfield
from runm.records import record

__all__ = ["AnyMessage", "KeyValue", "Request", "Response", "Status"]


@record
class KeyValue(Message):
    key: str = pfield(1, "string")
    value: str = pfield(2, "string")


@record
class AnyMessage(Message):
    """google.protobuf.Any."""

    type_url: str = pfield(1, "string")
    value: bytes = pfield(2, "bytes")


@record
class Status(Message):
    """google.rpc.Status."""

    code: int = pfield(1, "int32")
    message: str = pfield(2, "string")
    details: list[AnyMessage] = pfield(3, "message", repeated=True, message=AnyMessage)


@record
class Request(Message):
    service: str = pfield(1, "string")
    method: str = pfield(2, "string")
    payload: bytes = pfield(3, "bytes")
    timeout_nano: int = pfield(4, "int64")
    metadata: list[KeyValue] = pfield(5, "message", repeated=True, message=KeyValue)


@record
class Response(Message):
    status: Status | None = pfield(1, "message", message=Status)
    payload: bytes = pfield(2, "bytes")
