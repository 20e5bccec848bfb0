"""The guest's one and only waiter for child processes.

The agent is PID 1: orphaned container processes are reparented to it, and runc's
`create` leaves the container init as such an orphan. Every exit status therefore arrives
through one `waitpid(-1)` loop here, and is handed to whoever asked for that pid. Processes the
agent starts itself go through `spawn()`, never through subprocess' own waiting, so no two
waiters ever race for one status.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence


def exit_status(wait_status: int) -> int:
    """Shell-style status: the exit code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255  # pragma: no cover - stopped/continued are not reported without WUNTRACED


class Reaper:
    """Collects every child's exit status and delivers it to its waiter."""

    # Statuses of pids nobody waits for yet (e.g. a container init that exits before the agent
    # has read its pid file). Bounded: orphans of orphans pile up here otherwise.
    MAX_UNCLAIMED = 4096

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        """Collect every exited child now (SIGCHLD handler; safe to call any time)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._deliver(pid, exit_status(status))

    def _deliver(self, pid: int, status: int) -> None:
        fut = self._waiters.get(pid)
        if fut is not None and not fut.done():
            fut.set_result(status)  # stays registered until its owner forgets the pid
            return
        self._waiters.pop(pid, None)  # a stale entry of an earlier process with this pid
        if len(self._unclaimed) >= self.MAX_UNCLAIMED:
            self._unclaimed.pop(next(iter(self._unclaimed)))
        self._unclaimed[pid] = status

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for pid's exit status (already resolved if it has exited unclaimed)."""
        loop = asyncio.get_running_loop()
        fut = self._waiters.get(pid)
        if fut is None:
            fut = loop.create_future()
            if pid in self._unclaimed:
                fut.set_result(self._unclaimed.pop(pid))
            else:
                self._waiters[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """The owner of pid's status is done with it (the pid may be reused)."""
        self._waiters.pop(pid, None)
        self._unclaimed.pop(pid, None)

    async def wait(self, pid: int) -> int:
        """Wait for pid's exit status and forget it."""
        status = await asyncio.shield(self.watch(pid))
        self.forget(pid)
        return status

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> int:
        """Start argv with the given fds as its stdio (None = /dev/null); return its pid."""
        actions: list[tuple[int, ...]] = []
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for target, fd in enumerate((stdin, stdout, stderr)):
                actions.append((os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target))
            if cwd is not None:  # posix_spawn has no chdir action before 3.13: use a shell-free hop
                argv = ["/usr/bin/env", "-C", cwd, *argv]
            pid = os.posix_spawnp(
                argv[0],
                list(argv),
                dict(os.environ if env is None else env),
                file_actions=actions,
                setsigdef=(signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE),
                setsigmask=(),
            )
        finally:
            os.close(devnull)
        self.forget(pid)  # a new process: nothing known of an earlier one with this pid
        self.watch(pid)
        return pid

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Run argv to completion and return its exit status."""
        return await self.wait(self.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env))

    async def output(self, argv: Sequence[str]) -> tuple[int, bytes, bytes]:
        """Run argv; return (status, stdout, stderr), each captured in full."""
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = self.spawn(argv, stdout=out_w, stderr=err_w)
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            out, err = await asyncio.gather(
                loop.run_in_executor(None, _read_all, out_r),
                loop.run_in_executor(None, _read_all, err_r),
            )
        finally:
            os.close(out_r)
            os.close(err_r)
        return await self.wait(pid), out, err


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
