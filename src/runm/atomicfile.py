"""Files that readers see whole: the old version or the new one, never a part."""

from __future__ import annotations

from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write text to a temporary file beside path (`.NAME.tmp`), then rename it over path."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_pid_file(path: str, pid: int) -> None:
    """A --pid-file in runc's format: digits only, no newline, written atomically."""
    write_atomically(Path(path).absolute(), str(pid))
