"""Running a command on a real pseudo-terminal, as a person at a terminal would."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Sequence


def run_on_pty(argv: Sequence[str], env: dict[str, str], *, rows: int = 30, cols: int = 90,
               send: bytes = b"", expect: bytes = b"", timeout: float = 180,
               retype_until: bytes = b"") -> tuple[int, bytes]:
    """Run argv with a pty as its stdio; after `expect` shows up, type `send`.

    With `retype_until`, `send` is typed again each second until that text shows up (like a
    person re-running a command), then once more `send` is not typed: the caller's program
    must end by itself after seeing it. Returns (exit status, everything the terminal showed).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    seen = b""
    sent = not send
    last_typed = 0.0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sent and expect in seen:
                os.write(master, send)
                sent = not retype_until
                last_typed = time.monotonic()
            elif retype_until and not sent and retype_until in seen:
                sent = True
            elif retype_until and not sent and time.monotonic() - last_typed > 1.0:
                os.write(master, send)
                last_typed = time.monotonic()
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is gone
                break
            if not chunk:
                break
            seen += chunk
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
