"""The guest agent's service, run on the host as a real process driving the host's real runc.

The agent code is the same that runs as PID 1 in the guest; here it is a subreaper serving two
socketpairs, so its logic (runc calls, stdio, exit statuses, errors) is tested and measured
without booting a VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from runm.channel.mux import Mux
from runm.channel.stream import AsyncioByteStream
from runm.proto import agent as api
from runm.sandbox.agent_client import AgentClient
from runm.sandbox.spec import make_busybox_bundle
from runm.ttrpc import Client, Code, TtrpcError

pytestmark = pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc on the host")
ROOT = Path(__file__).resolve().parents[2]


class Agent:
    def __init__(self, client: AgentClient, mux: Mux, tmp: Path) -> None:
        self.client = client
        self.mux = mux
        self.tmp = tmp

    def bundle(self, name: str, *args: str, terminal: bool = False) -> str:
        path = make_busybox_bundle(self.tmp / name, list(args), terminal=terminal)
        config = json.loads((path / "config.json").read_text())
        config["root"]["readonly"] = False
        (path / "config.json").write_text(json.dumps(config))
        return str(path)


@asynccontextmanager
async def agent_process(tmp_path: Path) -> AsyncIterator[Agent]:
    ctl_host, ctl_agent = socket.socketpair()
    io_host, io_agent = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runm.agent", "--ctl-fd", str(ctl_agent.fileno()),
         "--io-fd", str(io_agent.fileno()), "--runc-root", str(tmp_path / "runc"),
         "--state-dir", str(tmp_path / "agent")],
        pass_fds=(ctl_agent.fileno(), io_agent.fileno()), env=env)
    ctl_agent.close()
    io_agent.close()
    ctl = AsyncioByteStream(*await asyncio.open_connection(sock=ctl_host))
    io = AsyncioByteStream(*await asyncio.open_connection(sock=io_host))
    client = Client(ctl)
    mux = Mux(io)
    await mux.start()
    try:
        yield Agent(AgentClient(client), mux, tmp_path)
    finally:
        for cid in os.listdir(tmp_path / "runc") if (tmp_path / "runc").exists() else []:
            subprocess.run(["runc", "--root", str(tmp_path / "runc"), "delete", "-f", cid],
                           capture_output=True, check=False)
        with suppress(TtrpcError, ConnectionError, TimeoutError):
            await AgentClient(client).shutdown(timeout=5)
        await client.aclose()
        await mux.aclose()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


async def read_all(stream) -> bytes:  # type: ignore[no-untyped-def]
    chunks = []
    while chunk := await stream.read():
        chunks.append(chunk)
    return b"".join(chunks)


def test_create_start_wait_with_stdio(tmp_path: Path) -> None:
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            b = agent.bundle("b1", "sh", "-c", "read x; echo got $x; echo err >&2; exit 5")
            stdio = api.Stdio(stdin=1, stdout=3, stderr=5)
            pid = await agent.client.create_container("c1", b, stdio)
            assert pid > 0
            out, err = agent.mux.open(3), agent.mux.open(5)
            stdin = agent.mux.open(1)
            await stdin.write(b"hello\n")
            await stdin.write_eof()
            await agent.client.start_container("c1")
            waited = await agent.client.wait_process("c1")
            assert waited.exit_status == 5
            assert waited.exited_at_ns > 0
            assert await read_all(out) == b"got hello\n"
            assert await read_all(err) == b"err\n"
            state = json.loads(await agent.client.state("c1"))
            assert state["status"] == "stopped"
            await agent.client.delete_container("c1")
            with pytest.raises(TtrpcError) as exc:
                await agent.client.state("c1")
            assert exc.value.code == Code.NOT_FOUND
    run(body())


def test_create_with_start_runs_at_once_and_keeps_early_output(tmp_path: Path) -> None:
    """`runm run` without a terminal creates and starts in one `runc run --detach`: the
    process may be done before the call returns; its output and status are not lost."""
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            b = agent.bundle("b1", "sh", "-c", "echo quick; echo also >&2; exit 7")
            out, err = agent.mux.open(3), agent.mux.open(5)
            pid = await agent.client.create_container(
                "c1", b, api.Stdio(stdout=3, stderr=5), start=True)
            assert pid > 0
            assert (await agent.client.wait_process("c1")).exit_status == 7
            assert await read_all(out) == b"quick\n"
            assert await read_all(err) == b"also\n"
            with pytest.raises(TtrpcError) as exc:  # already started
                await agent.client.start_container("c1")
            assert "cannot start" in exc.value.message
            await agent.client.delete_container("c1")
    run(body())


def test_runc_records_the_cgroup_v2_directory_in_its_state(tmp_path: Path) -> None:
    from runm.agent.reaper import Reaper
    from runm.agent.runc import Runc

    runc = Runc(Reaper(), root=str(tmp_path))
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "state.json").write_text(
        json.dumps({"cgroup_paths": {"": "/sys/fs/cgroup/v2"}}))
    assert runc.cgroup("v2") == Path("/sys/fs/cgroup/v2")
    for cid, text in [("v1", json.dumps({"cgroup_paths": {"memory": "/sys/fs/cgroup/m/v1"}})),
                      ("bad", "{"), ("odd", json.dumps({"cgroup_paths": [""]}))]:
        (tmp_path / cid).mkdir()
        (tmp_path / cid / "state.json").write_text(text)
        assert runc.cgroup(cid) is None
    assert runc.cgroup("missing") is None


def test_signals_and_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            b = agent.bundle("b2", "sleep", "600")
            await agent.client.create_container("c2", b, api.Stdio())
            with pytest.raises(TtrpcError) as dup:
                await agent.client.create_container("c2", b, api.Stdio())
            assert dup.value.code == Code.ALREADY_EXISTS
            await agent.client.start_container("c2")
            with pytest.raises(TtrpcError) as busy:
                await agent.client.delete_container("c2")
            assert "not stopped" in busy.value.message
            await agent.client.signal_process("c2", signal.SIGKILL)
            assert (await agent.client.wait_process("c2")).exit_status == 137
            with pytest.raises(TtrpcError) as stopped:
                await agent.client.signal_process("c2", signal.SIGTERM)
            assert stopped.value.code == Code.NOT_FOUND
            assert "not running" in stopped.value.message
            await agent.client.delete_container("c2")
            for call in (agent.client.start_container("nope"), agent.client.wait_process("nope"),
                         agent.client.delete_container("nope")):
                with pytest.raises(TtrpcError) as missing:
                    await call
                assert missing.value.code == Code.NOT_FOUND
                assert missing.value.message == "container does not exist"
    run(body())


def test_runc_errors_come_back_in_runcs_words(tmp_path: Path) -> None:
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            b = Path(agent.bundle("b3", "/no/such/binary"))
            with pytest.raises(TtrpcError) as exc:
                await agent.client.create_container("c3", str(b), api.Stdio())
            assert 'exec: "/no/such/binary": stat /no/such/binary: no such file or directory' \
                in exc.value.message
            with pytest.raises(TtrpcError) as gone:
                await agent.client.state("c3")
            assert gone.value.code == Code.NOT_FOUND
            shutil.rmtree(b / "rootfs")
            with pytest.raises(TtrpcError) as bad:
                await agent.client.create_container("c4", str(b), api.Stdio())
            assert "rootfs" in bad.value.message
            assert not (tmp_path / "agent" / "c4").exists()
    run(body())


def test_exec_and_terminal(tmp_path: Path) -> None:
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            b = agent.bundle("b5", "sh", "-c", "stty size; echo tty-ok; sleep 600",
                             terminal=True)
            await agent.client.create_container("c5", b, api.Stdio(stdin=1, stdout=3,
                                                                    terminal=True))
            await agent.client.resize_pty("c5", 33, 101)
            out = agent.mux.open(3)
            await agent.client.start_container("c5")
            seen = b""
            while b"tty-ok" not in seen:
                seen += await out.read()
            assert b"33 101" in seen
            process = {"args": ["sh", "-c", "echo from exec; exit 4"], "cwd": "/",
                       "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
            pid = await agent.client.exec_process("c5", "e1", json.dumps(process),
                                                  api.Stdio(stdout=7))
            assert pid > 0
            assert (await agent.client.wait_process("c5", "e1")).exit_status == 4
            assert await read_all(agent.mux.open(7)) == b"from exec\n"
            with pytest.raises(TtrpcError) as dup:
                await agent.client.exec_process("c5", "e1", json.dumps(process), api.Stdio())
            assert dup.value.code == Code.ALREADY_EXISTS
            with pytest.raises(TtrpcError) as notty:
                await agent.client.resize_pty("c5", 1, 1, exec_id="e1")
            assert notty.value.code == Code.FAILED_PRECONDITION
            await agent.client.signal_process("c5", signal.SIGKILL)
            assert (await agent.client.wait_process("c5")).exit_status == 137
            await agent.client.delete_container("c5")
    run(body())


def test_mount_waits_only_for_a_device_that_may_still_appear(tmp_path: Path) -> None:
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            # An unknown virtiofs tag is what a hot-plugged share looks like before the guest
            # probed it: retried until wait_ms, then reported.
            with pytest.raises(TtrpcError) as late:
                await agent.client.mount("no-such-tag", str(tmp_path / "m1"), "virtiofs", [],
                                         wait_ms=200)
            assert late.value.code == Code.INTERNAL
            assert "no-such-tag" in late.value.message
            # Any other failure is final at once (a retry would outlast the 60 s test limit).
            with pytest.raises(TtrpcError) as bad:
                await agent.client.mount("x", str(tmp_path / "m2"), "no-such-fs", [],
                                         wait_ms=120_000)
            assert "no-such-fs" in bad.value.message
    run(body())


def mounts_at(target: Path) -> list[str]:
    return [line for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1] == str(target)]


def test_a_clones_shares_are_bind_mounts_of_its_export(tmp_path: Path) -> None:
    """A clone's 9p export (here a tmpfs) is mounted once; each share is a bind mount of one
    of its directories at the share's path."""
    export, share = tmp_path / "export", tmp_path / "share"

    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            await agent.client.mount("runmtest", str(export), "tmpfs", [])
            (export / "dir").mkdir()
            (export / "dir" / "f").write_text("seen\n")
            await agent.client.mount(str(export / "dir"), str(share), "none", ["bind"])
            assert (share / "f").read_text() == "seen\n"
    try:
        run(body())
    finally:
        for target in (share, export):
            while mounts_at(target):
                subprocess.run(["umount", str(target)], check=True)


def test_a_warm_up_runs_its_container_from_the_mount_it_is_given(tmp_path: Path) -> None:
    """WarmUp mounts its source as told (a clone: a bind of its 9p export's directory), runs
    the bundle to its exit with runc, and leaves no mount behind."""
    source = make_busybox_bundle(tmp_path / "source", ["true"])
    target = tmp_path / "warm"

    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            await agent.client.warm_up(str(source), str(target), 0, "none", ["bind"],
                                       timeout=30)
            assert not mounts_at(target) and not target.exists()
            failing = make_busybox_bundle(tmp_path / "failing", ["false"])
            with pytest.raises(TtrpcError, match="warm-up container exited with 1"):
                await agent.client.warm_up(str(failing), str(target), 0, "none", ["bind"],
                                           timeout=30)
            assert not mounts_at(target)
    run(body())


def test_quiesce_answers_then_ends_the_connection(tmp_path: Path) -> None:
    async def body() -> None:
        async with agent_process(tmp_path) as agent:
            await agent.client.quiesce(timeout=10)
            with pytest.raises(ConnectionError):
                await agent.client.state("c1")
    run(body())
