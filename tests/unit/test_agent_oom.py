"""Finding a container's cgroup and reading its OOM kill count (the agent, on the host)."""

from __future__ import annotations

from pathlib import Path

from runm.agent.service import ManagedContainer, ManagedProcess, cgroup_of


def test_cgroup_of_reads_the_v2_line(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("1:name=systemd:/x\n0::/runm/c1\n")
    assert cgroup_of(42, proc, tmp_path / "cg") == tmp_path / "cg" / "runm" / "c1"
    assert cgroup_of(43, proc, tmp_path / "cg") is None
    (proc / "44").mkdir()
    (proc / "44" / "cgroup").write_text("1:memory:/x\n")
    assert cgroup_of(44, proc) is None


def test_oom_kills_come_from_memory_events(tmp_path: Path) -> None:
    container = ManagedContainer("c1", "/b", ManagedProcess("c1", ""), cgroup=tmp_path)
    assert container.oom_kills() == 0, "no memory.events (yet): none"
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n")
    assert container.oom_kills() == 2
    (tmp_path / "memory.events").write_text("oom_kill x\n")
    assert container.oom_kills() == 0
    assert ManagedContainer("c2", "/b", ManagedProcess("c2", "")).oom_kills() == 0


def test_wait_oom_answers_when_memory_events_changes_and_when_the_init_ends(
        tmp_path: Path) -> None:
    """The long poll behind /tasks/oom: inotify on memory.events (a regular file here)."""
    import asyncio

    from runm.agent.service import AgentService
    from runm.proto import agent as api
    from runm.ttrpc import CallContext

    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    ctx = CallContext("s", "WaitOom", {}, None, 1)

    async def body() -> None:
        service = AgentService(reaper=None, runc=None)  # type: ignore[arg-type]
        init = ManagedProcess("c1", "")
        init.status = asyncio.get_running_loop().create_future()
        service.containers["c1"] = ManagedContainer("c1", "/b", init, cgroup=tmp_path)
        waiting = asyncio.ensure_future(service.wait_oom(api.OomWaitRequest("c1", 0), ctx))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "nothing happened yet"
        events.write_text("oom 1\noom_kill 1\n")
        answer = await asyncio.wait_for(waiting, 2)  # well before the 5 s poll
        assert (answer.oom_kills, answer.exited) == (1, False)
        again = asyncio.ensure_future(service.wait_oom(api.OomWaitRequest("c1", 1), ctx))
        await asyncio.sleep(0.05)
        init.status.set_result(137)
        answer = await asyncio.wait_for(again, 2)
        assert (answer.oom_kills, answer.exited) == (1, True)

    asyncio.run(body())
