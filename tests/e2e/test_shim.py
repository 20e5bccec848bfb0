"""containerd 1.6 driving runm's own shim: `ctr ... --runtime io.containerd.runm.v2`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import fetch, free_port, runs_module, vm_processes, wait_until
from tests.e2e.images import busybox_layer
from tests.e2e.ptyrun import run_on_pty

if TYPE_CHECKING:
    from tests.e2e.callers import Containerd

pytest_plugins = ["tests.e2e.callers"]
pytestmark = [pytest.mark.callers, pytest.mark.vm]

RUNTIME = ["--runtime", "io.containerd.runm.v2"]
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


class Events:
    """`ctr events` running in the background, its lines parsed."""

    def __init__(self, containerd: Containerd, path: Path) -> None:
        self.containerd = containerd
        self.path = path
        self.out = path.open("wb")
        self.proc = subprocess.Popen(containerd.argv("events"), stdout=self.out,
                                     stderr=subprocess.STDOUT, env=containerd.env)
        self._subscribed()

    def _subscribed(self) -> None:
        """Wait until the subscription is live: containerd's own events show up in it."""
        probe = 0

        def seen() -> bool:
            nonlocal probe
            probe += 1
            self.containerd.ctr("namespaces", "create", f"probe-{os.getpid()}-{probe}")
            return "/namespaces/create" in self.path.read_text()

        assert wait_until(seen, timeout=30, interval=0.2), "ctr events never subscribed"
        for n in range(1, probe + 1):
            self.containerd.ctr("namespaces", "rm", f"probe-{os.getpid()}-{n}", check=False)

    def tasks(self, container: str) -> list[tuple[str, dict[str, object]]]:
        """(topic, event) of every /tasks/ event about container, in order."""
        found = []
        for line in self.path.read_text().splitlines():
            fields = line.split(" ", 6)
            if len(fields) < 7 or not fields[5].startswith("/tasks/"):
                continue
            event = json.loads(fields[6])
            if event.get("container_id") == container:
                found.append((fields[5], event))
        return found

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.out.close()


@pytest.fixture
def events(containerd: Containerd, tmp_path: Path) -> Iterator[Events]:
    watcher = Events(containerd, tmp_path / "events.txt")
    yield watcher
    watcher.close()


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs"
    path.mkdir()
    with tarfile.open(fileobj=io.BytesIO(busybox_layer())) as tar:
        tar.extractall(path)
    return path


def task_list(containerd: Containerd) -> dict[str, tuple[int, str]]:
    """`ctr task ls`: id -> (pid, status)."""
    rows = containerd.ctr("task", "ls").stdout.splitlines()[1:]
    return {r.split()[0]: (int(r.split()[1]), r.split()[2]) for r in rows if r.strip()}


def shims() -> dict[int, str]:
    return {p: c for p, c in vm_processes().items() if runs_module(c, "runm.shim.main")}


def test_run_from_an_image_and_from_a_rootfs_dir(containerd: Containerd, rootfs: Path,
                                                 tmp_path: Path) -> None:
    out = containerd.ctr("run", "--rm", *RUNTIME, containerd.image, "img",
                         "sh", "-c", "echo out; echo err >&2; exit 3", check=False, timeout=180)
    assert (out.returncode, out.stdout, out.stderr) == (3, "out\n", "err\n")

    cat = containerd.ctr("run", "--rm", *RUNTIME, "--rootfs", str(rootfs), "dir", "/bin/sh", "-c",
                         "cat; echo; test -f /bin/busybox && echo rootfs-ok",
                         input="from stdin", timeout=180)
    assert cat.stdout == "from stdin\nrootfs-ok\n"

    log = tmp_path / "logs" / "out.log"
    containerd.ctr("run", "--rm", *RUNTIME, "--log-uri", f"file://{log}", containerd.image,
                   "logged", "echo", "to-a-file", timeout=180)
    assert log.read_text() == "to-a-file\n"
    assert task_list(containerd) == {}
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"


def test_run_with_a_terminal(containerd: Containerd) -> None:
    argv = containerd.argv("run", "--rm", "-t", *RUNTIME, containerd.image, "tty",
                           "sh", "-c", "tty; stty size; read line; echo got:$line")
    code, shown = run_on_pty(argv, containerd.env, rows=33, cols=101, expect=b"33 101",
                             send=b"typed\r")
    assert code == 0, shown
    assert b"/dev/pts/0" in shown and b"got:typed" in shown, shown


def test_task_commands_and_event_order(containerd: Containerd, events: Events) -> None:
    containerd.ctr("run", "-d", *RUNTIME, containerd.image, "svc", "sleep", "600", timeout=180)
    pid, status = task_list(containerd)["svc"]
    assert status == "RUNNING" and "qemu" in Path(f"/proc/{pid}/cmdline").read_text()

    exec_out = containerd.ctr("task", "exec", "--exec-id", "e1", "svc", "sh", "-c",
                              "cat; echo from-exec; exit 4", input="in\n", check=False,
                              timeout=120)
    assert (exec_out.returncode, exec_out.stdout) == (4, "in\nfrom-exec\n")
    code, shown = run_on_pty(containerd.argv("task", "exec", "-t", "--exec-id", "e2", "svc",
                                             "sh", "-c", "tty; stty size"),
                             containerd.env, rows=21, cols=63)
    assert code == 0 and b"/dev/pts/" in shown and b"21 63" in shown, shown

    ps = containerd.ctr("task", "ps", "svc").stdout.splitlines()
    assert ps[0].split() == ["PID", "INFO"] and len(ps) >= 2
    metrics = containerd.ctr("task", "metrics", "svc").stdout
    assert "pids.current" in metrics and "memory.usage" in metrics

    containerd.ctr("task", "pause", "svc")
    assert task_list(containerd)["svc"][1] == "PAUSED"
    containerd.ctr("task", "resume", "svc")
    assert task_list(containerd)["svc"][1] == "RUNNING"

    state = json.loads(containerd.ctr("shim", "--id", "svc", "state").stdout)
    assert (state["id"], state["pid"], state["status"]) == ("svc", pid, 2)

    running = containerd.ctr("task", "delete", "svc", check=False)
    assert running.returncode != 0 and "must be stopped" in running.stderr
    containerd.ctr("task", "kill", "-s", "SIGKILL", "svc")
    assert wait_until(lambda: task_list(containerd)["svc"][1] == "STOPPED", timeout=60)
    gone = containerd.ctr("task", "kill", "-s", "SIGKILL", "svc", check=False)
    assert gone.returncode != 0 and "not found" in gone.stderr
    containerd.ctr("task", "delete", "svc", timeout=60)
    containerd.ctr("container", "rm", "svc")
    assert task_list(containerd) == {}

    def complete() -> bool:
        return any(topic == "/tasks/delete" for topic, _ in events.tasks("svc"))

    assert wait_until(complete, timeout=15)
    seen = events.tasks("svc")
    assert [topic for topic, _ in seen] == [
        "/tasks/create", "/tasks/start",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
        "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]
    by_topic = [(t, e) for t, e in seen]
    assert by_topic[1][1]["pid"] == pid
    assert by_topic[3][1]["exec_id"] == "e1"
    assert (by_topic[4][1]["id"], by_topic[4][1]["exit_status"]) == ("e1", 4)
    assert (by_topic[10][1]["id"], by_topic[10][1]["exit_status"]) == ("svc", 137)
    assert by_topic[11][1]["exit_status"] == 137
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"


def test_an_oom_kill_becomes_a_tasks_oom_event(containerd: Containerd, events: Events) -> None:
    hog = containerd.ctr("run", "--rm", *RUNTIME, "--memory-limit", str(64 << 20),
                         containerd.image, "hog", "sh", "-c", "tail /dev/zero",
                         check=False, timeout=180)
    assert hog.returncode == 137
    assert wait_until(lambda: any(t == "/tasks/delete" for t, _ in events.tasks("hog")))
    topics = [topic for topic, _ in events.tasks("hog")]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit",
                      "/tasks/delete"]

    # a child killed while the init lives on: reported as it happens, not at the end
    containerd.ctr("run", "-d", *RUNTIME, "--memory-limit", str(64 << 20), containerd.image,
                   "parent", "sh", "-c", "tail /dev/zero; sleep 600", timeout=180)
    assert wait_until(lambda: any(t == "/tasks/oom" for t, _ in events.tasks("parent")),
                      timeout=120), "no /tasks/oom while the task runs"
    assert task_list(containerd)["parent"][1] == "RUNNING"
    containerd.ctr("task", "kill", "-s", "SIGKILL", "parent")
    assert wait_until(lambda: task_list(containerd)["parent"][1] == "STOPPED", timeout=60)
    containerd.ctr("task", "delete", "parent", timeout=60)
    containerd.ctr("container", "rm", "parent")
    assert [t for t, _ in events.tasks("parent")].count("/tasks/oom") == 1


def test_tasks_of_one_sandbox_share_a_vm(containerd: Containerd) -> None:
    pod = ["--annotation", f"{SANDBOX_ID}=pod1"]
    containerd.ctr("run", "-d", *RUNTIME, *pod, containerd.image, "pod1", "sleep", "600",
                   timeout=180)
    containerd.ctr("run", "-d", *RUNTIME, *pod, containerd.image, "app1", "sh", "-c",
                   "echo app > /tmp/x; sleep 600", timeout=180)
    containerd.ctr("run", "-d", *RUNTIME, containerd.image, "solo", "sleep", "600",
                   timeout=180)
    tasks = task_list(containerd)
    assert tasks["pod1"][0] == tasks["app1"][0] != tasks["solo"][0]
    assert len(shims()) == 2, shims()
    hostname = containerd.ctr("task", "exec", "--exec-id", "h", "app1", "cat", "/tmp/x",
                              timeout=120)
    assert hostname.stdout == "app\n"

    for task in ("app1", "pod1", "solo"):
        containerd.ctr("task", "kill", "-s", "SIGKILL", task)
        assert wait_until(lambda t=task: task_list(containerd)[t][1] == "STOPPED", timeout=60)
        containerd.ctr("task", "delete", task, timeout=60)
        containerd.ctr("container", "rm", task)
        if task == "app1":  # the pod's VM stays for its sandbox
            assert task_list(containerd)["pod1"][1] == "RUNNING"
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"


@pytest.fixture(params=["copy", "clone"])
def restore_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """A pod's VM restored with its own RAM copy (virtiofs shares), or as a page-sharing clone
    (`[snapshot] clones = true` in the default config file, which the shims read: 9p)."""
    config = Path("/etc/runm/config.toml")
    if request.param == "clone":
        if config.exists():
            pytest.fail(f"{config} exists: the test would replace the host's runm config")
        config.parent.mkdir(exist_ok=True)
        config.write_text("[snapshot]\nclones = true\n")
    try:
        yield str(request.param)
    finally:
        if request.param == "clone":
            config.unlink()


def test_a_pods_containers_join_the_sandboxs_namespaces(containerd: Containerd,
                                                        restore_kind: str) -> None:
    """CRI names the sandbox's namespaces by its task pid (QEMU's): in the VM they are the
    sandbox container's. The second container's bundle is added to the running VM: a virtiofs
    share, or a bind in a clone's 9p export."""
    pod = ["--annotation", f"{SANDBOX_ID}=pod2"]
    containerd.ctr("run", "-d", *RUNTIME, *pod, containerd.image, "pod2", "sleep", "601",
                   timeout=180)
    pid, _ = task_list(containerd)["pod2"]
    app = containerd.ctr("run", "--rm", *RUNTIME, *pod, "--with-ns",
                         f"pid:/proc/{pid}/ns/pid", containerd.image, "app2", "ps", "-o",
                         "args", timeout=180)
    assert "sleep 601" in app.stdout.splitlines()
    mounts = Path(f"/proc/{pid}/mountinfo").read_text()  # QEMU's: a clone's binds are there
    assert ("/9p/" in mounts) == (restore_kind == "clone"), mounts
    containerd.ctr("task", "kill", "-s", "SIGKILL", "pod2")
    assert wait_until(lambda: task_list(containerd)["pod2"][1] == "STOPPED", timeout=60)
    containerd.ctr("task", "delete", "pod2", timeout=60)
    containerd.ctr("container", "rm", "pod2")
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"


def test_a_dead_vm_is_a_stopped_task_with_137(containerd: Containerd, events: Events) -> None:
    """(The victim serves HTTP on a port published with runm's annotation, first.)"""
    port = free_port()
    containerd.ctr("run", "-d", *RUNTIME, "--annotation",
                   f"io.runm.publish=127.0.0.1:{port}:80/tcp", containerd.image, "victim",
                   "sh", "-c", "mkdir /www && echo served > /www/index.html && "
                   "exec httpd -f -p 80 -h /www", timeout=180)
    url = f"http://127.0.0.1:{port}/"
    assert wait_until(lambda: fetch(url) is not None, timeout=60), "httpd never answered"
    assert fetch(url) == b"served\n"
    pid, _ = task_list(containerd)["victim"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: task_list(containerd)["victim"][1] == "STOPPED", timeout=30)
    deleted = containerd.ctr("task", "delete", "victim", timeout=60)
    assert deleted.returncode == 0
    containerd.ctr("container", "rm", "victim")
    exits = [e for t, e in events.tasks("victim") if t == "/tasks/exit"]
    assert [e["exit_status"] for e in exits] == [137]
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"


def test_bad_requests_get_clear_errors(containerd: Containerd) -> None:
    missing = containerd.ctr("run", "--rm", *RUNTIME, containerd.image, "nobin",
                             "/no/such/binary", check=False, timeout=180)
    assert missing.returncode != 0 and "no such file or directory" in missing.stderr.lower()
    assert task_list(containerd) == {}
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"


def test_the_shim_survives_a_containerd_restart(containerd: Containerd) -> None:
    from tests.e2e.callers import stop_daemon

    containerd.ctr("run", "-d", *RUNTIME, containerd.image, "lasting", "sleep", "600",
                   timeout=180)
    pid, _ = task_list(containerd)["lasting"]
    assert stop_daemon(containerd.proc)
    with containerd.log.open("ab") as log:
        containerd.proc = subprocess.Popen(
            ["containerd", "--config", str(containerd.dir / "config.toml"), "--log-level",
             "warn"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=containerd.env,
            start_new_session=True)
    assert wait_until(lambda: containerd.ctr("version", check=False).returncode == 0,
                      timeout=30)
    assert task_list(containerd)["lasting"] == (pid, "RUNNING")
    out = containerd.ctr("task", "exec", "--exec-id", "after", "lasting", "echo", "still-here",
                         timeout=120)
    assert out.stdout == "still-here\n"
    containerd.ctr("task", "kill", "-s", "SIGKILL", "lasting")
    assert wait_until(lambda: task_list(containerd)["lasting"][1] == "STOPPED", timeout=60)
    containerd.ctr("task", "delete", "lasting", timeout=60)
    containerd.ctr("container", "rm", "lasting")
    assert wait_until(lambda: not shims(), timeout=15), f"shims left: {shims()}"
