"""containerd's ttrpc protocol: a sans-I/O framing core plus asyncio client and server.

Carries the host<->guest agent API and the containerd shim API. Stdlib only (it also runs in the
guest). Modules: `framing` (bytes <-> frames, no I/O), `messages` (envelope protobufs), `status`
(gRPC codes, TtrpcError), `calls` (envelopes and replies, no I/O), `client`, `server`, and
`blocking` (one call without asyncio, for short-lived commands).

The asyncio client and server are imported on first use, so importing `runm.ttrpc.blocking`
or `runm.ttrpc.status` does not load asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runm.ttrpc.framing import MAX_DATA, FramingError, OversizedMessageError
from runm.ttrpc.status import Code, TtrpcError

if TYPE_CHECKING:
    from runm.ttrpc.client import Client, ClientStream
    from runm.ttrpc.server import CallContext, Server, serve_unix

__all__ = [
    "MAX_DATA",
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "FramingError",
    "OversizedMessageError",
    "Server",
    "TtrpcError",
    "serve_unix",
]

_LAZY = {"Client": "client", "ClientStream": "client", "CallContext": "server",
         "Server": "server", "serve_unix": "server"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
