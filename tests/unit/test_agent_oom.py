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
