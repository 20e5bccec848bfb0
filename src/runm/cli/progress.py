"""Progress for long work: a live status line on a terminal, silence otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False

    @classmethod
    def for_stderr(cls) -> Progress:
        return cls(sys.stderr if sys.stderr.isatty() else None)

    def step(self, message: str) -> None:
        if self.stream is None:
            return
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r\x1b[2Krunm guest image: {message} ({elapsed:.0f}s)")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.stream is not None and self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
