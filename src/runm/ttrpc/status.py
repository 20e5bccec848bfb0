"""gRPC status codes and the exception that carries a non-OK ttrpc status.

ttrpc reuses google.rpc.Status: an int32 gRPC code, a message and optional details. A
`TtrpcError` is what a client raises for a non-OK Response and what a server handler raises to
answer with a given status.

`str(TtrpcError(Code.NOT_FOUND, "container c1 does not exist"))` is
``"ttrpc: not found: container c1 does not exist"``: a fixed ``ttrpc:`` prefix, the code name in
lower case with spaces (the word form containerd's errdefs use), then the message. An empty
message gives just ``"ttrpc: not found"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Any

from runm.ttrpc.messages import AnyMessage, Status

__all__ = ["Code", "TtrpcError"]


class Code(IntEnum):
    """The canonical gRPC status codes (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """The code for a wire value; values outside the table count as UNKNOWN (as gRPC does)."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @property
    def phrase(self) -> str:
        """Lower-case words: ``Code.NOT_FOUND.phrase == "not found"``."""
        return self.name.lower().replace("_", " ")


class TtrpcError(Exception):
    """A non-OK ttrpc status: `.code`, `.message` and `.details` (google.protobuf.Any list)."""

    def __init__(self, code: Code | int, message: str = "", details: Iterable[AnyMessage] = ()):
        self.code: Code = Code.from_wire(int(code))
        self.message: str = message
        self.details: list[AnyMessage] = list(details)
        super().__init__(self.code, message)

    def __str__(self) -> str:
        if self.message:
            return f"ttrpc: {self.code.phrase}: {self.message}"
        return f"ttrpc: {self.code.phrase}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(Code.{self.code.name}, {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (TtrpcError, (int(self.code), self.message, self.details))

    def to_status(self) -> Status:
        return Status(code=int(self.code), message=self.message, details=list(self.details))

    @classmethod
    def from_status(cls, status: Status) -> TtrpcError:
        return cls(status.code, status.message, status.details)
