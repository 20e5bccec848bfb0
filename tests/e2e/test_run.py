"""`runm run` end to end: real QEMU, the real guest image, runc inside the guest."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from runm.sandbox.spec import make_busybox_bundle
from tests.conftest import Runm, vm_processes, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks")]


def bundle(tmp_path: Path, *args: str, pid_ns: bool = True) -> Path:
    path = make_busybox_bundle(tmp_path / "bundle", list(args))
    if not pid_ns:
        config = json.loads((path / "config.json").read_text())
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"]
                                         if ns["type"] != "pid"]
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_output_comes_from_the_guest_kernel(runm: Runm, tmp_path: Path, guest_image) -> None:  # type: ignore[no-untyped-def]
    b = bundle(tmp_path, "sh", "-c", "echo hello from the container; uname -r; echo oops >&2")
    result = runm.run("run", "--bundle", str(b), "c1")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines == ["hello from the container", guest_image.kernel_release]
    assert guest_image.kernel_release != os.uname().release
    assert result.stderr.decode() == "oops\n"
    assert not (runm.root / "c1").exists(), "container state must be deleted after run"


def test_exit_code_comes_back(runm: Runm, tmp_path: Path) -> None:
    result = runm.run("run", "-b", str(bundle(tmp_path, "sh", "-c", "exit 7")), "c7")
    assert result.returncode == 7, result.stderr.decode()


def test_death_by_signal_is_128_plus_n(runm: Runm, tmp_path: Path) -> None:
    b = bundle(tmp_path, "sh", "-c", "kill -9 $$", pid_ns=False)
    result = runm.run("run", "-b", str(b), "ck")
    assert result.returncode == 137, result.stderr.decode()


def test_stdin_flows_in(runm: Runm, tmp_path: Path) -> None:
    result = runm.run("run", "-b", str(bundle(tmp_path, "cat")), "cat1", input=b"hi\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hi\n"


def test_64mib_through_cat_is_byte_identical(runm: Runm, tmp_path: Path) -> None:
    data = os.urandom(64 << 20)
    result = runm.run("run", "-b", str(bundle(tmp_path, "cat")), "big", input=data, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded(runm: Runm, tmp_path: Path, signum: int) -> None:
    script = ("trap 'echo got signal; exit 3' TERM INT; echo ready; "
              "while true; do sleep 0.1; done")
    proc = runm.popen("run", "-b", str(bundle(tmp_path, "sh", "-c", script)), "sig",
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == b"got signal\n", err.decode()
    assert proc.returncode == 3


def test_a_signal_while_the_vm_starts_ends_runm_and_leaves_nothing(runm: Runm,
                                                                 tmp_path: Path) -> None:
    """SIGTERM as soon as the container's state exists: runm exits 143 and removes the
    state and the VM, whether the signal came before the process started (runm's own) or
    after (forwarded to `sleep`, which is not a pid-namespace init here, so it dies of it)."""
    proc = runm.popen("run", "-b", str(bundle(tmp_path, "sleep", "600", pid_ns=False)), "early",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: (runm.root / "early").exists(), timeout=60, interval=0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert not (runm.root / "early").exists()
    assert runm.run("state", "early").returncode == 1


def test_sigkilled_runm_leaves_no_vm_behind(runm: Runm, tmp_path: Path) -> None:
    proc = runm.popen("run", "-b", str(bundle(tmp_path, "sh", "-c", "echo up; sleep 600")),
                      "orphan", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    ours = {pid: cmd for pid, cmd in vm_processes().items()
            if str(tmp_path) in cmd and "runm.sandbox" not in cmd}
    assert any("qemu-system" in cmd for cmd in ours.values()), "QEMU should be running"
    assert any("virtiofsd" in cmd for cmd in ours.values()), "virtiofsd should be running"
    proc.kill()
    proc.wait()
    assert wait_until(lambda: not (set(vm_processes()) & set(ours)), timeout=15), ours


def test_keep_leaves_a_stopped_container_to_delete(runm: Runm, tmp_path: Path) -> None:
    result = runm.run("run", "--keep", "-b", str(bundle(tmp_path, "true")), "kept")
    assert result.returncode == 0, result.stderr.decode()
    state = json.loads(runm.run("state", "kept").stdout)
    assert state["status"] == "stopped"
    assert state["pid"] == 0
    assert runm.run("list", "-q").stdout == b"kept\n"
    assert runm.run("delete", "kept").returncode == 0
    gone = runm.run("state", "kept")
    assert gone.returncode == 1
    assert b"container does not exist" in gone.stderr


def test_json_log_records_errors(runm: Runm, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    result = runm.run("--log", str(log), "--log-format", "json", "state", "nope")
    assert result.returncode == 1
    assert b"container does not exist" in result.stderr
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == "container does not exist"


def test_terminal_container_gets_a_pty_with_the_callers_size(runm: Runm, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    b = make_busybox_bundle(tmp_path / "tty", ["sh", "-c", "stty size; tty; exit 3"],
                            terminal=True)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    try:
        proc = runm.popen("run", "-b", str(b), "tty1", stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the slave is gone
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=120) == 3, output.decode(errors="replace")
    finally:
        os.close(master)
    text = output.decode(errors="replace")
    assert "33 101" in text
    assert "/dev/pts/" in text
