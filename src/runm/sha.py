"""SHA-256 hex digests of short inputs: container ids, cache keys, the guest image's sources.

Python's built-in `_sha256` rather than hashlib: hashlib loads OpenSSL's libcrypto, ~3 MiB of
PSS in every long-lived runm process (a detached container's monitor, a foreground `runm run`)
and ~5 ms of every start, for inputs of a few hundred KiB at most.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def sha256_hex(*parts: bytes | Iterable[bytes]) -> str:
    """The hex SHA-256 of the concatenation of parts (bytes, or iterables of bytes)."""
    try:
        h = importlib.import_module("_sha256").sha256()
    except ImportError:  # a Python built without it
        import hashlib

        h = hashlib.sha256()
    for part in parts:
        for chunk in (part,) if isinstance(part, bytes) else part:
            h.update(chunk)
    return str(h.hexdigest())
