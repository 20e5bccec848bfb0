"""The runc contract for detached containers, driven the way go-runc and conmon drive runc."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from runm.sandbox.spec import make_busybox_bundle
from tests.conftest import Runm, vm_processes, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks")]


def wait_for_pid_exit(pid: int, timeout: float = 60) -> None:
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"pid {pid} did not exit within {timeout}s"
    finally:
        os.close(fd)


def state(runm: Runm, cid: str) -> dict:  # type: ignore[type-arg]
    result = runm.run("state", cid)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_create_start_kill_delete_like_go_runc(runm: Runm, tmp_path: Path) -> None:
    script = "echo started; trap 'echo terminated; exit 9' TERM; while true; do sleep 0.1; done"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    out_r, out_w = os.pipe()
    pid_file = tmp_path / "init.pid"
    log = tmp_path / "log.json"
    glob = ["--log", str(log), "--log-format", "json"]
    # The container keeps create's stdio (as with runc): the caller must not wait for EOF on
    # them, so runc's own errors are read from a file here, as runtime-tools does.
    err = tmp_path / "create.err"
    with open(err, "wb") as err_file:
        created = subprocess.run(
            runm.argv(*glob, "create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                      "c1"),
            stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_file, env=runm.env,
            timeout=300, check=False)
    os.close(out_w)
    assert created.returncode == 0, err.read_text()
    pid_text = pid_file.read_text()
    assert pid_text.isdigit(), "pid file: digits only, no newline"
    standin = int(pid_text)
    st = state(runm, "c1")
    assert st["status"] == "created"
    assert st["pid"] == standin
    assert st["bundle"] == str(bundle) and st["ociVersion"]
    os.kill(standin, 0)  # a live host process, as podman checks

    assert runm.run(*glob, "start", "c1").returncode == 0
    with os.fdopen(out_r, "rb") as out:
        assert out.readline() == b"started\n"
        assert state(runm, "c1")["status"] == "running"
        ps = runm.run("ps", "--format", "json", "c1")
        assert ps.returncode == 0 and json.loads(ps.stdout), ps.stderr.decode()
        assert runm.run("kill", "c1", "15").returncode == 0
        assert out.read() == b"terminated\n", "output reaches the caller's pipe, then EOF"
    wait_for_pid_exit(standin)
    st = state(runm, "c1")
    assert st["status"] == "stopped" and st["pid"] == 0

    again = runm.run(*glob, "kill", "c1", "KILL")
    assert again.returncode == 1
    assert b"container not running" in again.stderr
    assert json.loads(log.read_text().splitlines()[-1])["msg"] == "container not running"
    assert runm.run("delete", "c1").returncode == 0
    gone = runm.run("state", "c1")
    assert gone.returncode == 1 and b"container does not exist" in gone.stderr


def test_stand_in_exits_with_the_container_status(runm: Runm, tmp_path: Path) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "read x; exit $x"])
    pid_file = tmp_path / "pid"
    # The caller (like conmon) is the stand-in's parent once `create` exits: run create
    # through a subreaper-free wrapper and wait on the pid via pidfd.
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"42\n")
    with open(stdin, "rb") as stdin_file, open(tmp_path / "out", "wb") as out:
        created = subprocess.run(runm.argv("create", "-b", str(bundle), "--pid-file",
                                           str(pid_file), "c2"),
                                 stdin=stdin_file, stdout=out, stderr=out, env=runm.env,
                                 timeout=300, check=False)
    assert created.returncode == 0, (tmp_path / "out").read_text()
    standin = int(pid_file.read_text())
    assert runm.run("start", "c2").returncode == 0
    wait_for_pid_exit(standin)
    # The exit status is visible to the parent only; our child status checks go through
    # `runm run -d` + exec below. Here: the container is stopped and deletable.
    assert state(runm, "c2")["status"] == "stopped"
    assert runm.run("delete", "c2").returncode == 0


def test_exec_attached_detached_and_errors(runm: Runm, tmp_path: Path) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "600"])
    run = runm.run_detached("run", "-d", "-b", str(bundle), "c3")
    assert run.returncode == 0, run.stderr.decode()

    ex = runm.run("exec", "c3", "sh", "-c", "cat; echo err >&2; exit 4", input=b"hello\n")
    assert ex.returncode == 4
    assert ex.stdout == b"hello\n" and ex.stderr == b"err\n"

    process = {"args": ["sh", "-c", "echo $FOO; pwd"], "cwd": "/tmp",
               "env": ["FOO=bar", "PATH=/bin"], "user": {"uid": 0, "gid": 0}, "terminal": False}
    (tmp_path / "process.json").write_text(json.dumps(process))
    ex = runm.run("exec", "--process", str(tmp_path / "process.json"), "c3")
    assert (ex.returncode, ex.stdout) == (0, b"bar\n/tmp\n"), ex.stderr.decode()

    pid_file = tmp_path / "exec.pid"
    ex = runm.run_detached("exec", "--detach", "--pid-file", str(pid_file), "c3", "sleep", "1")
    assert ex.returncode == 0, ex.stderr.decode()
    wait_for_pid_exit(int(pid_file.read_text()))

    (tmp_path / "bad.json").write_text("{nope")
    bad = runm.run("exec", "--process", str(tmp_path / "bad.json"), "c3")
    assert bad.returncode == 1 and b"invalid JSON" in bad.stderr
    assert runm.run("exec", "c3").returncode == 1  # no command
    assert state(runm, "c3")["status"] == "running", "bad exec input leaves the container as is"

    stats = runm.run("events", "--stats", "c3")
    assert stats.returncode == 0, stats.stderr.decode()
    event = json.loads(stats.stdout)
    assert event["type"] == "stats" and event["id"] == "c3"
    assert event["data"]["pids"]["current"] >= 1
    assert event["data"]["memory"]["usage"]["usage"] > 0
    update = runm.run("update", "--memory", "67108864", "--pids-limit", "64", "c3")
    assert update.returncode == 0, update.stderr.decode()
    limits = json.loads(runm.run("events", "--stats", "c3").stdout)["data"]
    assert limits["pids"]["limit"] == 64
    assert limits["memory"]["usage"]["limit"] == 67108864
    # runc's spelling; runc's cgroup v2 conversion of 512 shares is weight 20
    assert runm.run("update", "--cpu-share", "512", "c3").returncode == 0
    weight = runm.run("exec", "c3", "sh", "-c",
                      'cat "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpu.weight"')
    assert weight.stdout == b"20\n", weight.stderr.decode()
    # as runc: with --resources, the other flags are ignored
    from_stdin = runm.run("update", "-r", "-", "--pids-limit", "5", "c3",
                          input=b'{"pids": {"limit": 32}}')
    assert from_stdin.returncode == 0, from_stdin.stderr.decode()
    assert json.loads(runm.run("events", "--stats", "c3").stdout)["data"]["pids"]["limit"] == 32

    assert runm.run("pause", "c3").returncode == 0
    assert state(runm, "c3")["status"] == "paused"
    assert runm.run("resume", "c3").returncode == 0
    assert state(runm, "c3")["status"] == "running"

    busy = runm.run("delete", "c3")
    assert busy.returncode == 1
    assert b"cannot delete container c3 that is not stopped: running" in busy.stderr
    bad_signal = runm.run("kill", "c3", "NOPE")
    assert bad_signal.returncode == 1
    assert b"unknown signal" in bad_signal.stderr and b"NOPE" in bad_signal.stderr
    assert runm.run("kill", "c3", "KILL").returncode == 0
    assert wait_until(lambda: state(runm, "c3")["status"] == "stopped", timeout=30)
    stopped_exec = runm.run("exec", "c3", "true")
    assert stopped_exec.returncode == 1
    assert b"cannot exec in a stopped container" in stopped_exec.stderr
    assert runm.run("delete", "c3").returncode == 0


def test_signals_to_a_stand_in_reach_its_process(runm: Runm, tmp_path: Path) -> None:
    """What conmon and shells rely on: a signal sent to the pid runm stands in with (an
    attached `runm exec`, or the --pid-file process of `exec -d`) reaches the process in the
    guest, and the stand-in exits with that process's status."""
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "600"])
    run = runm.run_detached("run", "-d", "-b", str(bundle), "c6")
    assert run.returncode == 0, run.stderr.decode()
    try:
        script = "trap 'echo got $1; exit 7' TERM; echo ready; while :; do sleep 1; done"
        attached = subprocess.Popen(runm.argv("exec", "c6", "sh", "-c", script, "sh", "TERM"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=runm.env)
        try:
            assert attached.stdout is not None
            assert attached.stdout.readline() == b"ready\n"  # the trap is set
            attached.send_signal(signal.SIGTERM)
            out, err = attached.communicate(timeout=60)
        finally:
            attached.kill()
        assert (attached.returncode, out) == (7, b"got TERM\n"), err.decode()

        pid_file = tmp_path / "exec.pid"
        detached = runm.run_detached("exec", "-d", "--pid-file", str(pid_file), "c6",
                                     "sleep", "601")
        assert detached.returncode == 0, detached.stderr.decode()
        standin = int(pid_file.read_text())
        os.kill(standin, signal.SIGUSR1)
        wait_for_pid_exit(standin)  # after the process it stands for
        ps = runm.run("exec", "c6", "ps")
        assert ps.returncode == 0 and b"sleep 600" in ps.stdout, ps.stderr.decode()
        assert b"sleep 601" not in ps.stdout, "the signal did not reach the exec'd process"
        assert state(runm, "c6")["status"] == "running", "only the exec'd process got the signal"
    finally:
        assert runm.run("delete", "--force", "c6").returncode == 0


def test_unknown_ids_and_force_delete(runm: Runm) -> None:
    for verb in (["start"], ["kill"], ["pause"], ["resume"], ["ps"], ["delete"], ["exec"],
                 ["state"]):
        result = runm.run(*verb, "ghost", *(["true"] if verb == ["exec"] else []))
        assert result.returncode == 1, verb
        assert b"container does not exist" in result.stderr, (verb, result.stderr)
    assert runm.run("delete", "--force", "ghost").returncode == 0
    features = json.loads(runm.run("features").stdout)
    assert features["linux"]["cgroup"]["v2"] is True
    version = runm.run("--version").stdout.decode()
    assert version.startswith("runc version "), "go-runc parses the first line"


def test_terminal_via_console_socket(runm: Runm, tmp_path: Path) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "stty size; echo tty-ok; read x"],
                                 terminal=True)
    no_socket = runm.run("create", "-b", str(bundle), "t0")
    assert no_socket.returncode == 1
    assert b"cannot allocate tty if runc will detach without setting console socket" \
        in no_socket.stderr
    sock_path = tmp_path / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    proc = runm.popen("create", "-b", str(bundle), "--console-socket", str(sock_path), "t1",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    conn, _ = listener.accept()
    msg, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    conn.close()
    listener.close()
    assert msg and len(fds) == 1, "one message carrying exactly one fd, as go-runc expects"
    master = fds[0]
    assert proc.wait(timeout=300) == 0
    import fcntl
    import struct
    import termios

    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    assert runm.run("start", "t1").returncode == 0
    seen = b""
    deadline = time.monotonic() + 60
    while b"tty-ok" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 5)
        if ready:
            seen += os.read(master, 4096)
    assert b"tty-ok" in seen, seen
    assert b"40 120" in seen
    os.write(master, b"done\r")
    assert wait_until(lambda: state(runm, "t1")["status"] == "stopped", timeout=30)
    os.close(master)
    assert runm.run("delete", "t1").returncode == 0


def _create_until_its_monitor_runs(runm: Runm, tmp_path: Path,
                                   cid: str) -> subprocess.Popen[bytes]:
    """`runm create` of a sleeping container, once its VM monitor has started."""
    bundle = make_busybox_bundle(tmp_path / "bundle", ["sleep", "600"])
    proc = runm.popen("create", "-b", str(bundle), cid, stdin=subprocess.DEVNULL,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: any("runm.sandbox.monitor" in cmd and str(runm.root) in cmd
                                      for cmd in vm_processes().values()),
                          timeout=60, interval=0.005)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def test_a_create_killed_while_the_vm_starts_leaves_nothing(runm: Runm, tmp_path: Path) -> None:
    """A caller's timeout SIGKILLs `runm create` while its VM monitor boots: the monitor finds
    its creator gone, stops the VM and removes the container's state."""
    proc = _create_until_its_monitor_runs(runm, tmp_path, "gone")
    proc.kill()
    proc.wait()
    assert wait_until(lambda: not (runm.root / "gone").exists(), timeout=120)
    assert runm.run("state", "gone").returncode == 1


def _unread_pipe_bytes(pid: int) -> int:
    """Bytes waiting in the pipes process pid reads from (its monitor's answer)."""
    import fcntl
    import termios

    waiting = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if os.readlink(fd).startswith("pipe:"):
            with open(fd, "rb", buffering=0) as pipe:
                count = bytearray(4)
                fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count)
                waiting += int.from_bytes(count, "little")
    return waiting


def test_a_create_killed_once_its_container_exists_is_found_by_delete(
        runm: Runm, tmp_path: Path) -> None:
    """`runm create` dies after its monitor said the container exists, before it recorded
    the container's pid: `state` still finds the container and `delete -f` removes it with
    its VM (the fixture checks that no process is left)."""
    proc = _create_until_its_monitor_runs(runm, tmp_path, "late")
    try:
        state_file = runm.root / "late" / "state.json"
        assert wait_until(lambda: "monitor_pid" in json.loads(state_file.read_text())["vm"],
                          timeout=60, interval=0.005)  # recorded before the VM boots
        os.kill(proc.pid, signal.SIGSTOP)  # it must not read the monitor's answer
        assert wait_until(lambda: _unread_pipe_bytes(proc.pid) > 0, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert state(runm, "late")["status"] == "created"
    assert runm.run("delete", "-f", "late").returncode == 0
    assert not (runm.root / "late").exists()
    assert wait_until(lambda: not any(str(tmp_path) in cmd
                                      for cmd in vm_processes().values()), timeout=30)


def test_monitor_death_means_stopped_and_clean_delete(runm: Runm, tmp_path: Path) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "600"])
    pid_file = tmp_path / "pid"
    assert runm.run_detached("run", "-d", "-b", str(bundle), "--pid-file", str(pid_file),
                             "c4").returncode == 0
    standin = int(pid_file.read_text())
    qemu = [pid for pid, cmd in vm_processes().items()
            if str(tmp_path) in cmd and "qemu-system" in cmd]
    assert len(qemu) == 1
    os.kill(qemu[0], signal.SIGKILL)
    wait_for_pid_exit(standin)
    assert wait_until(lambda: state(runm, "c4")["status"] == "stopped", timeout=30)
    assert runm.run("delete", "c4").returncode == 0
