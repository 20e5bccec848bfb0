"""containerd's ttrpc protocol: a sans-I/O framing core plus asyncio client and server.

Carries the host<->guest agent API and the containerd shim API. Stdlib only (it also runs in the
guest). Modules: `framing` (bytes <-> frames, no I/O), `messages` (envelope protobufs), `status`
(gRPC codes, TtrpcError), `client`, `server`.
"""

from runm.ttrpc.client import Client, ClientStream
from runm.ttrpc.framing import MAX_DATA, FramingError, OversizedMessageError
from runm.ttrpc.server import CallContext, Server, serve_unix
from runm.ttrpc.status import Code, TtrpcError

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
