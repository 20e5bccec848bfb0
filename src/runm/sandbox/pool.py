"""The warm pool: guests restored from the snapshot and warmed up in advance, kept idle.

Under TCG the first container in a freshly restored guest is slow: every code path it runs is
translated for the first time. A pool member has already run a throwaway container, so a start
that takes it only resumes the VM, plugs in its shares and runs runc on warm paths.

Each member is a *keeper* process (`python -m runm.sandbox.pool keep RUN_DIR`, its own
session) that restores a VM in RUN_DIR under the run base, warms it up (agent WarmUp), ends its
agent session (Quiesce) and waits on RUN_DIR/pool.sock, with the VM idle (not paused: see
Sandbox.detach). A start claims it by sending its pid and the run dir it wants; the keeper
renames RUN_DIR to that (QEMU's sockets are bound, so they move with it) and answers with
QEMU's pid and, as SCM_RIGHTS, its still-connected agent and stdio sockets: the guest never
sees its host go away. From then on the taker drives the VM as one it started, and the keeper
only watches: it kills the VM if the taker dies, and exits when the VM does. QEMU is the
keeper's child (PDEATHSIG), so nothing outlives the keeper either.

The pool is off unless a size is set (`runm pool fill N` writes RUN_BASE/pool-size); every
claim refills it in the background.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runm.vm.base import IO_PORT, SnapshotFiles

log = logging.getLogger("runm.pool")

MEMBER_PREFIX = "pool-"
MEMBER_FILE = "pool.json"
CLAIM_SOCKET = "pool.sock"
SIZE_FILE = "pool-size"
CLAIM_TIMEOUT = 5.0
WARM_UP_TIMEOUT = 60.0  # one busybox container; a guest that takes longer is not pooled
# Keepers (and so their QEMU) prepare VMs at this niceness: refilling the pool must not slow
# down the start that just took a member. A taken VM gets normal priority back.
BACKGROUND_NICE = 10


@dataclass
class Member:
    run_dir: Path
    state: str  # "starting" or "ready"
    key: str  # the snapshot (machine) it was restored from
    keeper_pid: int
    qemu_pid: int = 0

    def write(self) -> None:
        tmp = self.run_dir / f".{MEMBER_FILE}.tmp"
        tmp.write_text(json.dumps({"state": self.state, "key": self.key,
                                   "keeper_pid": self.keeper_pid, "qemu_pid": self.qemu_pid}))
        tmp.replace(self.run_dir / MEMBER_FILE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def members(base: Path) -> list[Member]:
    """The pool's members with a live keeper (unclaimed: a claimed one leaves the pool)."""
    found = []
    for entry in sorted(base.glob(f"{MEMBER_PREFIX}*")):
        try:
            data = json.loads((entry / MEMBER_FILE).read_text())
            member = Member(entry, str(data["state"]), str(data["key"]),
                            int(data["keeper_pid"]), int(data.get("qemu_pid", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(member.keeper_pid):
            found.append(member)
    return found


def pool_size(base: Path) -> int:
    try:
        return max(0, int((base / SIZE_FILE).read_text()))
    except (OSError, ValueError):
        return 0


def set_pool_size(base: Path, size: int) -> None:
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    if size <= 0:
        with contextlib.suppress(FileNotFoundError):
            (base / SIZE_FILE).unlink()
        return
    (base / SIZE_FILE).write_text(f"{size}\n")


def claim(base: Path, snapshot: SnapshotFiles, run_dir: Path) -> tuple[int, list[int]]:
    """Take a ready member restored from `snapshot`, moved to run_dir: its QEMU pid and
    its connected (agent, stdio) sockets - or (0, [])."""
    if pool_size(base) == 0 and not any(base.glob(f"{MEMBER_PREFIX}*")):
        return 0, []
    key = snapshot.ram.parent.name
    for member in members(base):
        if member.state != "ready" or member.key != key:
            continue
        fds: list[int] = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(CLAIM_TIMEOUT)
                sock.connect(str(member.run_dir / CLAIM_SOCKET))
                sock.sendall(json.dumps({"pid": os.getpid(), "run_dir": str(run_dir)}).encode()
                             + b"\n")
                data, fds, _, _ = socket.recv_fds(sock, 4096, 2)
                reply = json.loads(data or b"{}")
        except (OSError, ValueError) as err:
            log.debug("pool member %s: %s", member.run_dir, err)
            _close_all(fds)
            continue
        if reply.get("qemu_pid") and len(fds) == 2:
            return int(reply["qemu_pid"]), list(fds)
        _close_all(fds)
        log.debug("pool member %s refused: %s", member.run_dir, reply.get("error"))
    return 0, []


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def refill(base: Path) -> int:
    """Start keepers until the pool has its size again; return how many were started."""
    missing = pool_size(base) - len(members(base))
    for _ in range(max(0, missing)):
        start_keeper(base)
    return max(0, missing)


def start_keeper(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir = base / f"{MEMBER_PREFIX}{secrets.token_hex(5)}"
    run_dir.mkdir(mode=0o700)
    Member(run_dir, "starting", "", 0).write()  # counted at once; the keeper fills in its pid
    subprocess.Popen([sys.executable, "-m", "runm.sandbox.pool", "keep", str(run_dir)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    return run_dir


def drain(base: Path) -> int:
    """Stop every unclaimed member; return how many were told to stop."""
    count = 0
    for member in members(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member.keeper_pid, signal.SIGTERM)
            count += 1
    return count


# -- the keeper -------------------------------------------------------------------------


class Keeper:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.claimed = asyncio.Event()
        self.stop = asyncio.Event()
        self.taker_pid = 0
        self.qemu_pid = 0
        self.fds: list[int] = []  # the agent and stdio connections, for the taker

    async def run(self) -> int:
        from runm.guest.image import GuestImageError, find_image
        from runm.sandbox.sandbox import Sandbox, Timings

        member = Member(self.run_dir, "starting", "", os.getpid())
        member.write()
        try:
            image = find_image()
        except GuestImageError as err:
            log.error("no guest image: %s", err)
            return 1
        sandbox = Sandbox.create(f"runm-{self.run_dir.name}", image, self.run_dir, [])
        snapshot = await sandbox.snapshot(Timings())
        if snapshot is None:
            log.error("no VM snapshot to restore")
            return 1
        try:
            await sandbox.start_restored(snapshot, stdio=False)
            assert sandbox.agent is not None
            await sandbox.agent.warm_up(timeout=WARM_UP_TIMEOUT)
            # The taker gets these very connections: the guest never sees its host leave.
            io = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            io.connect(str(sandbox.vm.port_path(IO_PORT)))
            self.fds = [await sandbox.detach(), io.detach()]
        except Exception as err:
            log.error("preparing the pooled VM failed: %s", err)
            await sandbox.close()
            return 1
        vm_exit = asyncio.ensure_future(sandbox.vm.wait_exit())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.run_dir / CLAIM_SOCKET))
        listener.listen(8)
        listener.setblocking(False)
        accepting = asyncio.ensure_future(self._serve_claims(listener))
        self.qemu_pid = sandbox.vm.pid
        member.state, member.key, member.qemu_pid = "ready", snapshot.ram.parent.name, self.qemu_pid
        member.write()
        log.info("pooled VM ready: qemu pid %d", sandbox.vm.pid)
        stop = asyncio.ensure_future(self.stop.wait())
        claimed = asyncio.ensure_future(self.claimed.wait())
        try:
            await asyncio.wait({vm_exit, stop, claimed}, return_when=asyncio.FIRST_COMPLETED)
            accepting.cancel()
            listener.close()
            _close_all(self.fds)
            if claimed.done():
                await self._watch_taker(vm_exit)
                if not vm_exit.done():
                    sandbox.vm.kill()  # the taker died without closing it
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                return 0
        finally:
            for task in (stop, claimed):
                task.cancel()
        # Stopped (drain) or the VM died while waiting: the member is ours to clean up.
        sandbox.vm.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return 0

    async def _watch_taker(self, vm_exit: asyncio.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.taker_pid)
        except ProcessLookupError:
            return

        def on_gone() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(pidfd, on_gone)
        try:
            waiters: list[asyncio.Future[Any]] = [vm_exit, gone]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    async def _serve_claims(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.claimed.is_set():
            conn, _ = await loop.sock_accept(listener)
            with conn:
                try:
                    await asyncio.wait_for(self._on_claim(conn), CLAIM_TIMEOUT)
                except (OSError, TimeoutError) as err:
                    log.warning("claim failed: %s", err)

    async def _on_claim(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        data = b""
        while not data.endswith(b"\n"):
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                return
            data += chunk
        fds: list[int] = []
        try:
            request = json.loads(data)
            if self.claimed.is_set() or self.stop.is_set():
                raise ValueError("already taken")
            target = Path(request["run_dir"])
            taker = int(request["pid"])
            os.rename(self.run_dir, target)  # replaces an empty dir; sockets move along
            self.run_dir = target
            for name in (MEMBER_FILE, CLAIM_SOCKET):
                with contextlib.suppress(FileNotFoundError):
                    (target / name).unlink()
            self.taker_pid = taker
            _renice_process(self.qemu_pid, 0)
            reply: dict[str, object] = {"qemu_pid": self.qemu_pid}
            fds = self.fds
            log.info("taken by pid %d into %s", taker, target)
        except (OSError, ValueError, KeyError, TypeError) as err:
            reply = {"error": str(err)}
        conn.setblocking(True)  # one small message: it fits the socket buffer
        socket.send_fds(conn, [json.dumps(reply).encode() + b"\n"], fds)
        if fds:
            self.claimed.set()


def _renice_process(pid: int, nice: int) -> None:
    """Give every thread of pid (vCPUs, I/O) the niceness `nice`."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in threads:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runm-pool-keeper")
    sub = parser.add_subparsers(dest="command", required=True)
    keep = sub.add_parser("keep")
    keep.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    logging.basicConfig(filename=str(run_dir / "keeper.log"), level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("qemu").setLevel(logging.CRITICAL)

    os.nice(BACKGROUND_NICE)

    async def body() -> int:
        keeper = Keeper(run_dir)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, keeper.stop.set)
        code = await keeper.run()
        if code != 0:
            shutil.rmtree(keeper.run_dir, ignore_errors=True)
        return code

    return asyncio.run(body())


if __name__ == "__main__":
    sys.exit(main())
