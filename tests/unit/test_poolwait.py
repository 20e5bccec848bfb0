"""A pool member's wait (runm.sandbox.poolwait) with real processes: `sleep` stands in for
QEMU (a child of the waiter, as QEMU is of the keeper) and socket pairs for its connections."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from runm.sandbox import pool
from runm.sandbox.poolwait import (
    CLAIM_SOCKET,
    LOG_FILE,
    MEMBER_FILE,
    WAIT_NICE,
    set_priority,
    write_member,
)
from runm.sandbox.sandbox import Sandbox, Timings
from runm.vm.base import SnapshotFiles
from tests.conftest import wait_until

KEY = "snapkey"
MEMORY = 256


def alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Member:
    waiter: subprocess.Popen[bytes]
    run_dir: Path
    vm_pid: int
    peers: list[socket.socket]  # our ends of the connections the waiter holds

    def member_file(self) -> dict[str, object]:
        return json.loads((self.run_dir / MEMBER_FILE).read_text())  # type: ignore[no-any-return]


@pytest.fixture
def member(tmp_path: Path) -> Iterator[Member]:
    base = tmp_path / "base"
    run_dir = base / f"{pool.MEMBER_PREFIX}abc"
    run_dir.mkdir(parents=True)
    pairs = [socket.socketpair() for _ in range(2)]
    theirs = [a.fileno() for a, _ in pairs]
    # sh starts the VM stand-in, then becomes the waiter: the stand-in is the waiter's child.
    # Both begin as SCHED_IDLE, as a keeper and its QEMU do.
    script = (f'sleep 600 & exec {sys.executable} -m runm.sandbox.poolwait '
              f'"$0" $! {KEY} {MEMORY} {theirs[0]},{theirs[1]}')
    waiter = subprocess.Popen(["chrt", "--idle", "0", "sh", "-c", script, str(run_dir)],
                              pass_fds=theirs)
    for a, _ in pairs:
        a.close()
    assert wait_until(lambda: (run_dir / MEMBER_FILE).exists())
    m = Member(waiter, run_dir, 0, [b for _, b in pairs])
    m.vm_pid = int(m.member_file()["qemu_pid"])  # type: ignore[call-overload]
    yield m
    if waiter.poll() is None:
        waiter.kill()
        waiter.wait(10)
    if alive(m.vm_pid):
        os.kill(m.vm_pid, signal.SIGKILL)
    for peer in m.peers:
        peer.close()


def scheduling(pid: int) -> tuple[int, int]:
    """(policy, niceness) of pid."""
    return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)


def test_a_ready_member_is_published(member: Member) -> None:
    assert member.member_file() == {"state": "ready", "key": KEY, "memory_mib": MEMORY,
                                    "keeper_pid": member.waiter.pid, "qemu_pid": member.vm_pid}
    assert [m.run_dir for m in pool.members(member.run_dir.parent)] == [member.run_dir]
    assert (member.run_dir / CLAIM_SOCKET).is_socket()
    assert "pooled VM ready" in (member.run_dir / LOG_FILE).read_text()
    # Prepared on idle CPUs only; waiting, at a niceness that still answers a claim at once.
    assert scheduling(member.waiter.pid) == (os.SCHED_OTHER, WAIT_NICE)
    assert scheduling(member.vm_pid) == (os.SCHED_OTHER, WAIT_NICE)


def test_a_claim_moves_the_member_and_hands_over_its_connections(member: Member,
                                                                tmp_path: Path) -> None:
    target = tmp_path / "c1"
    snapshot = SnapshotFiles(ram=tmp_path / KEY / "ram", state=tmp_path / KEY / "state")
    qemu_pid, fds = pool.claim(member.run_dir.parent, snapshot, target)
    assert qemu_pid == member.vm_pid
    assert scheduling(qemu_pid) == (os.SCHED_OTHER, 0)  # the taker's VM: normal priority
    assert not member.run_dir.exists() and target.is_dir()
    assert not (target / MEMBER_FILE).exists() and not (target / CLAIM_SOCKET).exists()
    assert pool.members(member.run_dir.parent) == []  # taken: no longer in the pool
    for fd, peer in zip(fds, member.peers, strict=True):
        with socket.socket(fileno=fd) as conn:  # the very connections the waiter held
            conn.sendall(b"ping")
            assert peer.recv(4) == b"ping"
    # The taker (this test) closes the VM: the waiter reaps it and exits, leaving the dir.
    os.kill(member.vm_pid, signal.SIGKILL)
    assert member.waiter.wait(10) == 0
    assert target.is_dir()


def test_a_member_restored_from_another_snapshot_is_not_taken(member: Member,
                                                              tmp_path: Path) -> None:
    other = SnapshotFiles(ram=tmp_path / "other" / "ram", state=tmp_path / "other" / "state")
    assert pool.claim(member.run_dir.parent, other, tmp_path / "c1") == (0, [])
    assert member.member_file()["state"] == "ready"


def claim_raw(member: Member, request: bytes) -> tuple[dict[str, object], list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(member.run_dir / CLAIM_SOCKET))
        sock.sendall(request)
        data, fds, _, _ = socket.recv_fds(sock, 4096, 2)
    return json.loads(data), list(fds)


def test_a_bad_claim_is_refused_and_the_member_keeps_waiting(member: Member,
                                                             tmp_path: Path) -> None:
    reply, fds = claim_raw(member, b'{"pid": "x"}\n')
    assert "error" in reply and fds == []
    reply, fds = claim_raw(member, b"not json\n")
    assert "error" in reply and fds == []
    assert member.waiter.poll() is None and member.member_file()["state"] == "ready"
    # A taker that dies takes its VM with it; the waiter cleans up and exits.
    taker = subprocess.Popen(["sleep", "600"])
    target = tmp_path / "c2"
    reply, fds = claim_raw(member, json.dumps({"pid": taker.pid,
                                               "run_dir": str(target)}).encode() + b"\n")
    assert reply == {"qemu_pid": member.vm_pid} and len(fds) == 2
    for fd in fds:
        os.close(fd)
    os.kill(member.waiter.pid, signal.SIGTERM)  # taken: stopping is the taker's business
    taker.kill()
    taker.wait()
    assert member.waiter.wait(10) == 0
    assert not alive(member.vm_pid)
    assert not target.exists()


def test_a_drain_stops_the_waiting_vm_and_removes_the_member(member: Member) -> None:
    assert pool.drain(member.run_dir.parent) == 1
    assert member.waiter.wait(10) == 0
    assert not alive(member.vm_pid)
    assert not member.run_dir.exists()


def test_a_vm_that_dies_while_waiting_takes_the_member_with_it(member: Member) -> None:
    os.kill(member.vm_pid, signal.SIGKILL)
    assert member.waiter.wait(10) == 0
    assert not member.run_dir.exists()


def test_starts_that_refill_at_once_do_not_overshoot_the_pool_sizes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    monkeypatch.setenv("RUNM_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("[vm]\nmemory_mib = 512\n")
    assert pool.set_pool_size(base, 2) == {512: 2}
    assert pool.set_pool_size(base, 1, 1024) == {512: 2, 1024: 1}
    started: list[list[str]] = []
    keeper = subprocess.Popen(["sleep", "600"])  # stands for every keeper: a live pid

    def popen(argv: list[str], **_: object) -> SimpleNamespace:
        started.append(argv)
        return SimpleNamespace(pid=keeper.pid)
    monkeypatch.setattr(pool.subprocess, "Popen", popen)
    barrier = threading.Barrier(8)

    def refill() -> None:
        barrier.wait()
        pool.refill(base)

    threads = [threading.Thread(target=refill) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(argv[-1] for argv in started) == ["1024", "512", "512"]
        # Counted before their keepers publish a pid.
        assert sorted((m.state, m.memory_mib, m.keeper_pid) for m in pool.members(base)) == [
            ("starting", 512, 0), ("starting", 512, 0), ("starting", 1024, 0)]
        assert pool.refill(base) == 0
    finally:
        keeper.kill()
        keeper.wait()


def test_pool_sizes_come_from_the_config_until_fill_or_drain_sets_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    monkeypatch.setenv("RUNM_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("[pool]\nsize = 1\nmemory_mib = { 256 = 2 }\n")
    assert pool.pool_sizes(base) == {512: 1, 256: 2}
    assert pool.set_pool_size(base, 0, 256) == {512: 1}  # one size off, the rest kept
    assert pool.pool_sizes(base) == {512: 1}
    assert pool.set_pool_size(base, 0) == {}  # drain: everything off, the config too
    assert pool.pool_sizes(base) == {}
    pool.use_configured_sizes(base)
    assert pool.pool_sizes(base) == {512: 1, 256: 2}
    (base / pool.SIZE_FILE).write_text("garbage")
    assert pool.pool_sizes(base) == {512: 1, 256: 2}  # a broken file is ignored (logged)


def test_member_files_that_are_not_members_are_left_out(tmp_path: Path) -> None:
    for name, text in [("pool-garbage", "{"), ("pool-list", "[1]"), ("pool-nokey", "{}"),
                       ("pool-badpid", '{"state": "ready", "key": "k", "keeper_pid": "x"}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / MEMBER_FILE).write_text(text)
    (tmp_path / "pool-nofile").mkdir()
    good = tmp_path / "pool-good"
    good.mkdir()
    write_member(good, "ready", "k1", os.getpid(), 0, 256)
    assert [(m.run_dir.name, m.state, m.key, m.memory_mib) for m in pool.members(tmp_path)] == [
        ("pool-good", "ready", "k1", 256)]


def test_a_member_being_started_is_counted_but_never_signalled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until its keeper publishes its pid a member has none: kill(0) would signal the drain's
    own process group (it once took down the test run that drained the pool)."""
    fresh = tmp_path / "pool-fresh"
    fresh.mkdir()
    write_member(fresh, "starting", "", 0, 0, 256)
    stale = tmp_path / "pool-stale"
    stale.mkdir()
    write_member(stale, "starting", "", 0, 0, 256)
    old = time.time() - 2 * pool.KEEPER_SPAWN_GRACE
    os.utime(stale / MEMBER_FILE, (old, old))
    assert [m.run_dir.name for m in pool.members(tmp_path)] == ["pool-fresh"]
    signalled: list[int] = []
    monkeypatch.setattr(pool.os, "kill", lambda pid, sig: signalled.append(pid))
    assert pool.drain(tmp_path) == 0
    assert signalled == []


def member_dirs(base: Path) -> list[str]:
    return sorted(p.name for p in base.glob("pool-*") if p.is_dir())


def test_members_whose_keeper_died_or_never_started_are_swept(tmp_path: Path) -> None:
    """A keeper killed outright (its QEMU dies with it) leaves its dir behind: the next refill
    or drain removes it, and nothing that is still in the pool."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    layout = {"pool-dead": dead.pid, "pool-stale": 0, "pool-fresh": 0, "pool-live": os.getpid()}
    for name, pid in layout.items():
        (tmp_path / name).mkdir()
        write_member(tmp_path / name, "starting", "", pid, 0, 256)
    old = time.time() - 2 * pool.KEEPER_SPAWN_GRACE
    os.utime(tmp_path / "pool-stale" / MEMBER_FILE, (old, old))
    pool.set_pool_size(tmp_path, 2, 256)
    assert pool.refill(tmp_path) == 0  # fresh and live count: nothing to start
    assert member_dirs(tmp_path) == ["pool-fresh", "pool-live"]
    (tmp_path / "pool-dead").mkdir()
    write_member(tmp_path / "pool-dead", "ready", "k", dead.pid, 0, 256)
    pool.drain(tmp_path / "nonexistent")  # no base: nothing to do, no error
    signalled: list[int] = []
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if sig == 0:
            real_kill(pid, 0)  # liveness probes go through
        else:
            signalled.append(pid)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pool.os, "kill", kill)
        assert pool.drain(tmp_path) == 1
    assert signalled == [os.getpid()]  # the live one, told to stop (here: recorded only)
    assert member_dirs(tmp_path) == ["pool-fresh", "pool-live"]


def test_set_priority_covers_every_thread_and_threads_made_later() -> None:
    # python with a thread already running when the class changes, and one started after.
    script = ("import sys, threading, time\n"
              "def spin(): time.sleep(600)\n"
              "threading.Thread(target=spin, daemon=True).start()\n"
              "sys.stdout.write('1\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
              "threading.Thread(target=spin, daemon=True).start()\n"
              "sys.stdout.write('2\\n'); sys.stdout.flush(); sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"1\n"
        set_priority(proc.pid, idle=True)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"2\n"
        threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(threads) == 3
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_IDLE}
        set_priority(proc.pid, 7)
        assert {scheduling(t) for t in threads} == {(os.SCHED_OTHER, 7)}
    finally:
        proc.kill()
        proc.wait(10)
    set_priority(proc.pid, 0)  # gone: nothing to do, no error


class FakeVM:
    run_dir = Path("/nonexistent")


def test_a_start_refills_the_pool_once_its_container_runs(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """Preparing a member costs seconds of CPU: it must not overlap the start that drew on
    the pool, so the refill waits for refill_pool() (or close())."""
    refills: list[Path] = []
    monkeypatch.setenv("RUNM_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(pool, "claim", lambda base, snapshot, run_dir: (0, []))

    def refill(base: Path) -> int:
        refills.append(base)
        return 1
    monkeypatch.setattr(pool, "refill", refill)
    sandbox = Sandbox(FakeVM(), [])  # type: ignore[arg-type]
    snapshot = SnapshotFiles(ram=tmp_path / KEY / "ram", state=tmp_path / KEY / "state")
    assert asyncio.run(sandbox._from_pool(Timings(), snapshot)) is False  # pool empty
    assert refills == []
    sandbox.refill_pool()
    sandbox.refill_pool()
    assert refills == [tmp_path]
    Sandbox(FakeVM(), []).refill_pool()  # type: ignore[arg-type]
    assert refills == [tmp_path], "a start that did not ask the pool does not refill it"
