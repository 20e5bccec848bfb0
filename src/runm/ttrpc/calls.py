"""The two ends of a ttrpc call, without I/O: the Request envelope to send, and what a reply
frame means (the decoded payload, or the error it stands for). Shared by the asyncio client and
the blocking one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from runm.proto.codec import DecodeError, Message
from runm.ttrpc.framing import MAX_DATA, Frame, OversizedFrame, OversizedMessageError
from runm.ttrpc.messages import KeyValue, Request, Response
from runm.ttrpc.status import Code, TtrpcError

M = TypeVar("M", bound=Message)

_MAX_INT64 = (1 << 63) - 1


def request_bytes(
    service: str,
    method: str,
    request: Message,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
) -> bytes:
    """The encoded Request envelope. Raises OversizedMessageError if it is over 4 MiB."""
    envelope = Request(
        service=service,
        method=method,
        payload=request.encode(),
        timeout_nano=timeout_nano(timeout),
        metadata=[KeyValue(k.lower(), v) for k, v in (metadata or {}).items()],
    )
    data = envelope.encode()
    if len(data) > MAX_DATA:
        raise OversizedMessageError(len(data))
    return data


def timeout_nano(timeout: float | None) -> int:
    if timeout is None or timeout <= 0:
        return 0
    return int(min(timeout * 1e9, _MAX_INT64))


def response_of(item: Frame | OversizedFrame) -> Response:
    """The Response envelope in a RESPONSE frame, or raise what the frame means."""
    if isinstance(item, OversizedFrame):
        raise OversizedMessageError(item.length)
    try:
        return Response.decode(item.data)
    except DecodeError as err:
        raise TtrpcError(Code.INTERNAL, f"bad response envelope: {err}") from err


def reply_of(response: Response, response_type: type[M]) -> M:
    """The reply a Response carries: its decoded payload, or its non-OK status raised."""
    if response.status is not None and response.status.code != Code.OK:
        raise TtrpcError.from_status(response.status)
    return decode_payload(response_type, response.payload)


def decode_payload(response_type: type[M], payload: bytes) -> M:
    try:
        return response_type.decode(payload)
    except DecodeError as err:
        raise TtrpcError(Code.INTERNAL, f"cannot decode {response_type.__name__}: {err}") from err
