"""Reading the JSON documents users hand runm (config.json, process.json, resources)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from runm.errors import RunmError


def read_text(path: str | Path) -> str:
    """The file's text; "-" reads stdin (as runc's --process - and --resources - do)."""
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as err:
        raise RunmError(f"open {path}: {err.strerror}") from None


def parse_object(text: str, source: str | Path, what: str = "document") -> dict[str, Any]:
    """A JSON object, or runm's error naming the source."""
    try:
        loaded = json.loads(text)
    except ValueError as err:
        raise RunmError(f"parsing {source}: invalid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise RunmError(f"parsing {source}: the {what} must be a JSON object")
    return dict(loaded)
