"""A pool member's wait, once its VM is warmed up: hold the VM's agent and stdio connections,
hand them to the start that claims the member, then watch that start (the *taker*).

The keeper (runm.sandbox.pool) restores and warms up the VM with all of runm and asyncio
loaded, then execs ``python -m runm.sandbox.poolwait`` in the same process: QEMU stays its
child (and dies with it), the connections are inherited, and the ~15 MiB of the first life's
interpreter state are not carried while the VM waits, which may be for hours. Hence the
standard library only here, and no asyncio.

Claim protocol (runm.sandbox.pool.claim): the taker connects to RUN_DIR/pool.sock and sends one
JSON line ``{"pid": TAKER_PID, "run_dir": TARGET}``. The keeper renames RUN_DIR to TARGET
(QEMU's sockets are bound, so they move with it), gives QEMU normal priority back and answers
``{"qemu_pid": PID}`` with the two connections as SCM_RIGHTS, or ``{"error": TEXT}``. From then
on it kills the VM if the taker dies first, and exits when the VM does.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from runm.atomicfile import write_atomically

MEMBER_FILE = "pool.json"
CLAIM_SOCKET = "pool.sock"
CLAIM_TIMEOUT = 5.0
LOG_FILE = "keeper.log"


def write_member(run_dir: Path, state: str, key: str, keeper_pid: int, qemu_pid: int,
                 memory_mib: int) -> None:
    """Publish a member's state (RUN_DIR/pool.json), atomically."""
    write_atomically(run_dir / MEMBER_FILE, json.dumps({
        "state": state, "key": key, "keeper_pid": keeper_pid, "qemu_pid": qemu_pid,
        "memory_mib": memory_mib}))


def read_member(run_dir: Path) -> tuple[str, str, int, int, int]:
    """(state, key, keeper_pid, qemu_pid, memory_mib) from what write_member wrote; OSError
    or ValueError if there is no such file or it is not one."""
    data = json.loads((run_dir / MEMBER_FILE).read_text())
    try:
        return (str(data["state"]), str(data["key"]), int(data["keeper_pid"]),
                int(data.get("qemu_pid", 0)), int(data.get("memory_mib", 0)))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{run_dir / MEMBER_FILE}: not a pool member: {err!r}") from None


# A waiting member's keeper and QEMU run at this niceness: an idle VM, but a claim must be
# answered at once even on a busy host (SCHED_IDLE would leave it waiting for a free CPU).
WAIT_NICE = 10


def set_priority(pid: int, nice: int = 0, *, idle: bool = False) -> None:
    """Schedule every thread of pid (vCPUs, I/O): with idle, as SCHED_IDLE, which runs only
    on CPUs nothing else wants; else normally, at niceness `nice`. Threads made later
    inherit it."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in map(int, threads):
        with contextlib.suppress(OSError):  # a thread that just ended
            if idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, nice)


class Waiter:
    """One member's wait (run()), with the VM's QEMU a child of this process."""

    def __init__(self, run_dir: Path, qemu_pid: int, key: str, memory_mib: int,
                 fds: list[int]) -> None:
        self.run_dir = run_dir
        self.qemu_pid = qemu_pid
        self.key = key
        self.memory_mib = memory_mib
        self.fds = fds  # the agent and stdio connections, for the taker
        self.taker_pid = 0
        self._qemu_exit = os.pidfd_open(qemu_pid)
        self._signals_r, self._signals_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def log(self, message: str) -> None:
        with contextlib.suppress(OSError), open(self.run_dir / LOG_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} runm.pool INFO {message}\n")

    def run(self) -> int:
        # Prepared as SCHED_IDLE (runm.sandbox.pool); waiting, it must answer a claim soon.
        set_priority(os.getpid(), WAIT_NICE)
        set_priority(self.qemu_pid, WAIT_NICE)
        signal.set_wakeup_fd(self._signals_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.run_dir / CLAIM_SOCKET))
        listener.listen(8)
        write_member(self.run_dir, "ready", self.key, os.getpid(), self.qemu_pid,
                     self.memory_mib)
        self.log(f"pooled VM ready: qemu pid {self.qemu_pid}")
        try:
            claimed = self._wait_for_claim(listener)
        finally:
            listener.close()
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if claimed:
            self._watch_taker()
        else:
            # Stopped (drain) or the VM died while waiting: the member is ours to clean up.
            self._end_vm()
        return 0

    def _wait_for_claim(self, listener: socket.socket) -> bool:
        """True once a taker has the connections; False on a stop signal or the VM's exit."""
        while True:
            ready, _, _ = select.select(
                [listener.fileno(), self._qemu_exit, self._signals_r], [], [])
            if self._qemu_exit in ready:
                return False
            if self._signals_r in ready:
                os.read(self._signals_r, 64)
                return False
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(CLAIM_TIMEOUT)
                try:
                    if self._on_claim(conn):
                        return True
                except OSError as err:
                    self.log(f"claim failed: {err}")

    def _on_claim(self, conn: socket.socket) -> bool:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return False
            data += chunk
        fds: list[int] = []
        try:
            request = json.loads(data)
            target = Path(request["run_dir"])
            taker = int(request["pid"])
            os.rename(self.run_dir, target)  # replaces an empty dir; sockets move along
            self.run_dir = target
            for name in (MEMBER_FILE, CLAIM_SOCKET):
                with contextlib.suppress(FileNotFoundError):
                    (target / name).unlink()
            self.taker_pid = taker
            set_priority(self.qemu_pid, 0)
            reply: dict[str, object] = {"qemu_pid": self.qemu_pid}
            fds = self.fds
            self.log(f"taken by pid {taker} into {target}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            reply = {"error": str(err)}
        socket.send_fds(conn, [json.dumps(reply).encode() + b"\n"], fds)
        return bool(fds)

    def _watch_taker(self) -> None:
        """Wait for the VM's exit (the taker closed it); kill it if the taker dies first."""
        try:
            taker = os.pidfd_open(self.taker_pid)
        except ProcessLookupError:
            self._end_vm()
            return
        try:
            while True:
                ready, _, _ = select.select([self._qemu_exit, taker, self._signals_r], [], [])
                if self._signals_r in ready:
                    os.read(self._signals_r, 64)  # taken: stopping is the taker's business
                    continue
                if self._qemu_exit in ready:
                    self._reap()
                    return
                self.log(f"taker {self.taker_pid} died: stopping its VM")
                self._end_vm()
                return
        finally:
            os.close(taker)

    def _end_vm(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.qemu_pid, signal.SIGKILL)
        self._reap()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.qemu_pid, 0)


def main(argv: list[str] | None = None) -> int:
    """poolwait RUN_DIR QEMU_PID KEY MEMORY_MIB AGENT_FD,STDIO_FD (the keeper's exec)."""
    args = sys.argv[1:] if argv is None else argv
    run_dir, qemu_pid, key, memory_mib, fds = args
    return Waiter(Path(run_dir), int(qemu_pid), key, int(memory_mib),
                  [int(fd) for fd in fds.split(",")]).run()


if __name__ == "__main__":
    sys.exit(main())
