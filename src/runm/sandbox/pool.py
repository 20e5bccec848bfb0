"""The warm pool: guests restored from the snapshot and warmed up in advance, kept idle.

Under TCG the first container in a freshly restored guest is slow: every code path it runs is
translated for the first time. A pool member has already run a throwaway container, so a start
that takes it only resumes the VM, plugs in its shares and runs runc on warm paths.

Each member is a *keeper* process (`python -m runm.sandbox.pool keep RUN_DIR`, its own
session) that restores a VM in RUN_DIR under the run base, warms it up (agent WarmUp) and ends
its agent session (Quiesce), with the VM left idle (not paused: see Sandbox.detach). Then it
execs runm.sandbox.poolwait, a small standard-library program that holds the VM's connections
while it waits on RUN_DIR/pool.sock for a start to claim it (the protocol is described there):
the guest never sees its host go away, and a waiting member does not carry the ~15 MiB of the
interpreter that prepared it. QEMU is the keeper's child (PDEATHSIG) through both lives, so
nothing outlives the keeper.

The pool keeps a number of members per guest memory size: none unless `runm pool fill` (which
writes RUN_BASE/pool-sizes.json) or the config file's [pool] says so. A start that drew on it
refills it in the background once its container runs (Sandbox.refill_pool).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from runm.atomicfile import write_atomically
from runm.filelock import hold, open_lock
from runm.launch import module_argv
from runm.records import record
from runm.sandbox.config import load_config
from runm.sandbox.poolwait import (
    CLAIM_SOCKET,
    CLAIM_TIMEOUT,
    LOG_FILE,
    MEMBER_FILE,
    read_member,
    set_priority,
    write_member,
)
from runm.vm.base import IO_PORT, Share, SnapshotFiles

if TYPE_CHECKING:
    from runm.sandbox.sandbox import Sandbox

log = logging.getLogger("runm.pool")

MEMBER_PREFIX = "pool-"
SIZE_FILE = "pool-sizes.json"
REFILL_LOCK = ".pool-refill.lock"
KEEPER_SPAWN_GRACE = 60.0  # a member without a keeper pid yet is counted this long
WARM_UP_BUNDLE = "runm-warmup"
WARM_UP_TIMEOUT = 60.0  # one busybox container; a guest that takes longer is not pooled


@record
class Member:
    run_dir: Path
    state: str  # "starting" or "ready"
    key: str  # the snapshot (machine) it was restored from
    keeper_pid: int
    qemu_pid: int = 0
    memory_mib: int = 0  # the guest's memory: the pool keeps a number of members per size

    def write(self) -> None:
        write_member(self.run_dir, self.state, self.key, self.keeper_pid, self.qemu_pid,
                     self.memory_mib)


def _alive(pid: int) -> bool:
    if pid <= 0:  # kill(0) or kill(-N) would reach a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_members(base: Path) -> Iterator[tuple[Member, bool]]:
    """Every member dir under base that has a member file, and whether it is in the pool:
    its keeper lives, or is being started this instant (no pid yet: see start_keeper)."""
    for entry in sorted(base.glob(f"{MEMBER_PREFIX}*")):
        try:
            member = Member(entry, *read_member(entry))
            age = time.time() - (entry / MEMBER_FILE).stat().st_mtime
        except (OSError, ValueError):
            continue
        yield member, (_alive(member.keeper_pid) or
                       (member.keeper_pid == 0 and age < KEEPER_SPAWN_GRACE))


def members(base: Path) -> list[Member]:
    """The pool's members (unclaimed: a claimed one leaves the pool)."""
    return [member for member, in_pool in _read_members(base) if in_pool]


def _sweep(base: Path) -> list[Member]:
    """members(), in the same pass removing the dirs of members whose keeper died (SIGKILL, a
    crash: its QEMU died with it) or never started. Only under the refill lock, which
    start_keeper runs under too."""
    found = []
    for member, in_pool in _read_members(base):
        if in_pool:
            found.append(member)
        else:
            shutil.rmtree(member.run_dir, ignore_errors=True)
    return found


def pool_sizes(base: Path) -> dict[int, int]:
    """How many members to keep, per guest memory size (MiB): what `runm pool fill` or
    `drain` set since boot (RUN_BASE/pool-sizes.json), else the config file's [pool]."""
    try:
        data = json.loads((base / SIZE_FILE).read_text())
        return {int(memory): int(count) for memory, count in data.items() if int(count) > 0}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, TypeError) as err:
        log.warning("ignoring %s: %s", base / SIZE_FILE, err)
    return load_config().pool_sizes()


def use_configured_sizes(base: Path) -> None:
    """Forget what `runm pool fill` or `drain` set: the config file's [pool] applies again."""
    with contextlib.suppress(FileNotFoundError):
        (base / SIZE_FILE).unlink()


def set_pool_size(base: Path, size: int, memory_mib: int | None = None) -> dict[int, int]:
    """Keep `size` members of `memory_mib` (default: the default VM size) from now on, the
    other sizes as they are; size 0 with no memory_mib turns the whole pool off."""
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    if memory_mib is None and size <= 0:
        sizes: dict[int, int] = {}
    else:
        sizes = pool_sizes(base)
        sizes[memory_mib or load_config().vm.memory_mib] = max(0, size)
        sizes = {memory: count for memory, count in sizes.items() if count > 0}
    write_atomically(base / SIZE_FILE,
                     json.dumps({str(memory): count for memory, count in sorted(sizes.items())}))
    return sizes


def claim(base: Path, snapshot: SnapshotFiles, run_dir: Path) -> tuple[int, list[int]]:
    """Take a ready member restored from `snapshot`, moved to run_dir: its QEMU pid and
    its connected (agent, stdio) sockets - or (0, [])."""
    if not any(base.glob(f"{MEMBER_PREFIX}*")):
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
    """Start keepers until the pool has its sizes again; return how many were started.
    Serialized (a lock file), so starts that claim at once do not overshoot the sizes."""
    sizes = pool_sizes(base)
    if not sizes:
        return 0
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    started = 0
    with hold(open_lock(base / REFILL_LOCK)):
        have = [m.memory_mib for m in _sweep(base)]
        for memory_mib, count in sorted(sizes.items()):
            for _ in range(max(0, count - have.count(memory_mib))):
                start_keeper(base, memory_mib)
                started += 1
    return started


def start_keeper(base: Path, memory_mib: int) -> Path:
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir = base / f"{MEMBER_PREFIX}{os.urandom(5).hex()}"
    run_dir.mkdir(mode=0o700)
    # Counted at once, under the refill lock; the keeper fills in its pid once it can handle
    # a drain's SIGTERM (Keeper.run), so a drain never kills it halfway.
    Member(run_dir, "starting", "", 0, memory_mib=memory_mib).write()
    keeper = subprocess.Popen(module_argv("runm.sandbox.pool", "keep", str(run_dir),
                                          str(memory_mib)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    # Preparing a member (restore, warm-up: seconds of TCG) runs only on CPUs that nothing
    # else wants, from its first instruction on; poolwait gives it a normal class once it waits.
    set_priority(keeper.pid, idle=True)
    return run_dir


def drain(base: Path) -> int:
    """Stop every unclaimed member; return how many were told to stop. One whose keeper has
    not published its pid yet finds the pool size changed once it is ready (Keeper.run)."""
    count = 0
    found: list[Member] = []
    with contextlib.suppress(FileNotFoundError), hold(open_lock(base / REFILL_LOCK)):
        found = _sweep(base)
    for member in found:
        if member.keeper_pid <= 0:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(member.keeper_pid, signal.SIGTERM)
            count += 1
    return count


# -- the keeper -------------------------------------------------------------------------


class Keeper:
    """A member's first life: restore and warm up the VM, then exec into poolwait."""

    def __init__(self, run_dir: Path, memory_mib: int) -> None:
        self.run_dir = run_dir
        self.memory_mib = memory_mib
        self.stop = asyncio.Event()

    async def run(self) -> int:
        """Prepare the VM, then become poolwait (on success, this never returns)."""
        from runm.guest.image import GuestImageError, find_image
        from runm.sandbox.sandbox import Sandbox, Timings

        Member(self.run_dir, "starting", "", os.getpid(), memory_mib=self.memory_mib).write()
        try:
            image = find_image()
        except GuestImageError as err:
            log.error("no guest image: %s", err)
            return 1
        sandbox = Sandbox.create(f"runm-{self.run_dir.name}", image, self.run_dir, [],
                                 memory_mib=self.memory_mib)
        sandbox.vm.config.clone = True  # pooled VMs share the snapshot's pages
        snapshot = await sandbox.snapshot(Timings())
        if snapshot is None:
            log.error("no VM snapshot to restore")
            return 1
        preparing = asyncio.ensure_future(_prepare(sandbox, snapshot))
        stop = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({preparing, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            preparing.cancel()
        try:
            fds = await preparing
        except asyncio.CancelledError:
            log.info("stopped while preparing the pooled VM")
            await sandbox.close()
            return 1
        except Exception as err:
            log.error("preparing the pooled VM failed: %s", err)
            await sandbox.close()
            return 1
        if self.stop.is_set():  # a drain between the last await and now
            await sandbox.close()
            return 1
        if not pool_sizes(self.run_dir.parent).get(self.memory_mib):
            log.info("the pool no longer keeps %d MiB VMs: not waiting", self.memory_mib)
            await sandbox.close()
            return 1
        # The taker gets these very connections: the guest never sees its host leave.
        for fd in fds:
            os.set_inheritable(fd, True)
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, "-m", "runm.sandbox.poolwait",
                                  str(self.run_dir), str(sandbox.vm.pid),
                                  snapshot.ram.parent.name, str(self.memory_mib),
                                  ",".join(map(str, fds))])


async def _prepare(sandbox: Sandbox, snapshot: SnapshotFiles) -> list[int]:
    """Restore and warm up the VM; its agent and stdio connections.

    The VM is a page-sharing clone of the snapshot, so its shares go over 9p. The warm-up
    goes the way of a real start: the 9p device hot-plugged and mounted, a busybox bundle
    bound into its export and run with `runc run`. Then the bundle is unbound again; the 9p
    device and its guest mount stay for the taker, and the guest has every code path of a
    start translated."""
    from runm.sandbox.sandbox import RESTORE_TIMEOUT
    from runm.sandbox.spec import make_busybox_bundle

    await sandbox.start_restored(snapshot, stdio=False)
    assert sandbox.agent is not None
    bundle = make_busybox_bundle(sandbox.vm.run_dir / WARM_UP_BUNDLE, ["true"])
    try:
        share = Share(WARM_UP_BUNDLE, bundle, f"/run/{WARM_UP_BUNDLE}")
        await sandbox.vm.add_share(share)
        began = time.monotonic()
        wait_ms = int(RESTORE_TIMEOUT * 1000)
        await sandbox.mount_export(wait_ms)  # a clone's: it stays mounted for the taker
        source, fstype, options = sandbox.share_mount(share)
        await sandbox.agent.warm_up(source, share.guest_path, wait_ms, fstype, options,
                                    timeout=WARM_UP_TIMEOUT)
        warmed = time.monotonic()
        await sandbox.vm.remove_share(share)
        log.info("warm-up container %.2fs, unplugging its share %.2fs", warmed - began,
                 time.monotonic() - warmed)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    io = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    io.connect(str(sandbox.vm.port_path(IO_PORT)))
    return [await sandbox.detach(), io.detach()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runm-pool-keeper")
    sub = parser.add_subparsers(dest="command", required=True)
    keep = sub.add_parser("keep")
    keep.add_argument("run_dir")
    keep.add_argument("memory_mib", type=int)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    logging.basicConfig(filename=str(run_dir / LOG_FILE), level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    set_priority(os.getpid(), idle=True)  # again, for a keeper not run by start_keeper

    async def body() -> int:
        keeper = Keeper(run_dir, args.memory_mib)
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
