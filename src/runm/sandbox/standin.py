"""The stand-in: the host process whose pid callers (conmon, containerd's shim) wait for.

It stands for one container process in the guest: every signal it receives goes to that process
(SIGWINCH becomes a terminal resize), and it exits with that process's status (128+N for a
signal death; 137 if the VM or its monitor dies). It is a child of the `runm create`/`exec`
that started it, so it is reparented to the caller when that invocation exits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import termios
from collections.abc import Iterator
from types import FrameType

from runm.proto import agent as api
from runm.proto.codec import Message
from runm.sandbox.tty import window_size
from runm.ttrpc.blocking import call_unix
from runm.ttrpc.status import TtrpcError

LOST = 137
UNFORWARDED = {signal.SIGCHLD, signal.SIGPIPE, signal.SIGKILL, signal.SIGSTOP, signal.SIGURG}
FORWARDED = frozenset(s for s in signal.valid_signals()
                      if s not in UNFORWARDED and 0 < s < signal.SIGRTMIN)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Block the forwarded signals in this thread meanwhile: a stand-in started inside
    inherits them blocked and takes them once it can forward them (its pid may be
    published, and signalled, before its interpreter has even started)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stand_in(socket_path: str, exec_id: str, tty_fd: int | None) -> int:
    """Mirror one guest process until it exits; return its exit status.

    Blocking, without asyncio (a stand-in lives as long as its container: every MiB and
    every import counts): the main thread waits in one `Wait` call, and each signal's
    handler makes its own call (the wait's recv() resumes after the handler, PEP 475)."""

    def call(method: str, request: Message, response_type: type[Message]) -> Message:
        return call_unix(socket_path, api.MONITOR_SERVICE, method, request, response_type)

    def forward(signum: int, frame: FrameType | None = None) -> None:
        with contextlib.suppress(TtrpcError, OSError):
            if signum == signal.SIGWINCH:
                size = window_size(tty_fd) if tty_fd is not None else None
                if size:
                    call("Resize", api.ResizeRequest("", exec_id, *size), api.Empty)
                return
            call("Kill", api.SignalRequest("", exec_id, signum), api.Empty)

    for signum in FORWARDED:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # those that came meanwhile: now
    if tty_fd is not None:
        forward(signal.SIGWINCH)
    try:
        waited = call("Wait", api.ProcessRequest("", exec_id), api.WaitResponse)
    except (TtrpcError, OSError):
        return LOST
    assert isinstance(waited, api.WaitResponse)
    return waited.exit_status


def take_terminal(fd: int) -> None:
    """Make the pty slave our controlling terminal, so its resizes reach us as SIGWINCH."""
    with contextlib.suppress(OSError):
        os.setsid()
    with contextlib.suppress(OSError):
        # 1 = take it even if the `runm exec` that opened the pty got it as its own ctty
        fcntl.ioctl(fd, termios.TIOCSCTTY, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runm-standin")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--exec-id", default="")
    parser.add_argument("--tty-fd", type=int)
    args = parser.parse_args(argv)
    if args.tty_fd is not None:
        take_terminal(args.tty_fd)
    return stand_in(args.socket, args.exec_id, args.tty_fd)


if __name__ == "__main__":
    sys.exit(main())
