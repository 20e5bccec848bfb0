"""containerd 1.6's own runc shim driving runm (`ctr run --runc-binary runm`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.conftest import wait_until

if TYPE_CHECKING:
    from tests.e2e.callers import Containerd, RuntimeTrace

pytest_plugins = ["tests.e2e.callers"]
pytestmark = [pytest.mark.callers, pytest.mark.vm]


def test_ctr_run_exec_pause_kill_delete(containerd: Containerd, runtime: str,
                                        runtime_trace: RuntimeTrace) -> None:
    flags = containerd.runtime_flags(runtime)
    since = runtime_trace.mark()
    assert containerd.ctr("run", "--rm", *flags, containerd.image, "once", "echo", "hi",
                          timeout=180).stdout == "hi\n"
    assert "create" in runtime_trace.verbs(since)

    containerd.ctr("run", "-d", *flags, containerd.image, "svc", "sleep", "600", timeout=180)
    tasks = containerd.ctr("task", "ls").stdout
    assert "svc" in tasks and "RUNNING" in tasks
    out = containerd.ctr("task", "exec", "--exec-id", "e1", "svc", "sh", "-c",
                         "echo from-exec; exit 0", timeout=120)
    assert out.stdout == "from-exec\n"
    containerd.ctr("task", "pause", "svc")
    assert "PAUSED" in containerd.ctr("task", "ls").stdout
    containerd.ctr("task", "resume", "svc")
    assert "RUNNING" in containerd.ctr("task", "ls").stdout
    running = containerd.ctr("task", "delete", "svc", check=False)
    assert running.returncode != 0 and "must be stopped" in running.stderr
    containerd.ctr("task", "kill", "-s", "SIGKILL", "svc")
    assert wait_until(lambda: "STOPPED" in containerd.ctr("task", "ls").stdout, timeout=60)
    containerd.ctr("task", "delete", "svc", timeout=120)
    containerd.ctr("container", "rm", "svc")
    assert containerd.ctr("task", "ls", "-q").stdout == ""
