"""A stand-in is started with the signals it forwards held, so none is lost to the default
action before its handlers exist (its pid is published as soon as it is spawned)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from runm.sandbox.standin import FORWARDED, UNFORWARDED, signals_held

SHOW_MASK = ("import json, signal; "
             "print(json.dumps([int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])]))")


def child_mask() -> set[int]:
    out = subprocess.run([sys.executable, "-c", SHOW_MASK], capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out))


def test_a_child_started_while_held_inherits_the_forwarded_signals_blocked() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with signals_held():
        inside = child_mask()
    assert {int(s) for s in FORWARDED} <= inside
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # restored
    assert not {int(s) for s in FORWARDED} <= child_mask()


def test_forwarded_signals_are_what_a_caller_sends() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGWINCH, signal.SIGQUIT):
        assert signum in FORWARDED
    assert not FORWARDED & UNFORWARDED
    assert signal.SIGKILL not in FORWARDED and signal.SIGCHLD not in FORWARDED
