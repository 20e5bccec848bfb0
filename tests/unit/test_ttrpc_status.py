"""runm.ttrpc.status and runm.ttrpc.messages: codes, TtrpcError, envelope encoding."""

from __future__ import annotations

import pickle

from runm.ttrpc import MAX_DATA, Code, OversizedMessageError, TtrpcError
from runm.ttrpc.messages import AnyMessage, KeyValue, Request, Response, Status


def test_all_grpc_codes_with_their_numbers() -> None:
    assert len(Code) == 17
    assert int(Code.OK) == 0
    assert int(Code.NOT_FOUND) == 5
    assert int(Code.RESOURCE_EXHAUSTED) == 8
    assert int(Code.UNIMPLEMENTED) == 12
    assert int(Code.UNAUTHENTICATED) == 16
    assert Code.FAILED_PRECONDITION.phrase == "failed precondition"


def test_error_text_and_repr() -> None:
    err = TtrpcError(Code.NOT_FOUND, "container c1 does not exist")
    assert str(err) == "ttrpc: not found: container c1 does not exist"
    assert repr(err) == "TtrpcError(Code.NOT_FOUND, 'container c1 does not exist')"
    assert str(TtrpcError(Code.UNAVAILABLE)) == "ttrpc: unavailable"


def test_unknown_wire_codes_count_as_unknown() -> None:
    assert Code.from_wire(99) is Code.UNKNOWN
    assert TtrpcError(-1, "x").code is Code.UNKNOWN
    assert TtrpcError(6, "x").code is Code.ALREADY_EXISTS


def test_status_round_trip_through_a_response_envelope() -> None:
    details = [AnyMessage("type.googleapis.com/x.Y", b"\x01\x02")]
    err = TtrpcError(Code.ALREADY_EXISTS, "id c1 is already in use", details)
    wire = Response(status=err.to_status()).encode()
    status = Response.decode(wire).status
    assert status == Status(6, "id c1 is already in use", details)
    back = TtrpcError.from_status(status)
    assert (back.code, back.message, back.details) == (err.code, err.message, details)


def test_ok_status_is_present_but_empty_on_the_wire() -> None:
    # Go ttrpc sets status even on success: field 1 with zero bytes
    assert Response(status=Status(), payload=b"x").encode() == b"\x0a\x00\x12\x01x"
    assert Response.decode(b"\x0a\x00").status == Status()


def test_request_envelope_field_numbers() -> None:
    req = Request("svc", "M", b"p", 5, [KeyValue("k", "v")])
    assert req.encode() == (
        b"\x0a\x03svc" + b"\x12\x01M" + b"\x1a\x01p" + b"\x20\x05" + b"\x2a\x06\x0a\x01k\x12\x01v"
    )
    assert Request.decode(req.encode()) == req


def test_errors_pickle() -> None:
    err = pickle.loads(pickle.dumps(TtrpcError(Code.INTERNAL, "boom")))
    assert (type(err), err.code, err.message) == (TtrpcError, Code.INTERNAL, "boom")
    big = pickle.loads(pickle.dumps(OversizedMessageError(MAX_DATA + 5)))
    assert isinstance(big, OversizedMessageError)
    assert (big.code, big.length) == (Code.RESOURCE_EXHAUSTED, MAX_DATA + 5)
    assert str(big) == (
        "ttrpc: resource exhausted: message length 4194309 exceed maximum message size of 4194304"
    )
