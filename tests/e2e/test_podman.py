"""podman 4.3 with runm as its OCI runtime (`podman --runtime runm`), every command users use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.e2e.ptyrun import run_on_pty

if TYPE_CHECKING:
    from tests.e2e.callers import Podman, RuntimeTrace

pytest_plugins = ["tests.e2e.callers"]
pytestmark = [pytest.mark.callers, pytest.mark.vm]

LOOP = "echo started; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.1; done"


def test_run_rm_echo_and_exit_code(podman: Podman, runtime_trace: RuntimeTrace) -> None:
    since = runtime_trace.mark()
    result = podman.run("run", "--rm", "--network=none", podman.image, "echo", "hi")
    assert result.stdout == "hi\n"
    verbs = runtime_trace.verbs(since)
    assert "create" in verbs and "start" in verbs and "delete" in verbs, verbs
    failed = podman.run("run", "--rm", "--network=none", podman.image, "sh", "-c", "exit 3",
                        check=False)
    assert failed.returncode == 3
    assert podman.run("ps", "-aq").stdout == ""


def test_detached_lifecycle(podman: Podman) -> None:
    cid = podman.run("run", "-d", "--name", "web", "--network=none", podman.image,
                     "sh", "-c", LOOP).stdout.strip()
    assert cid
    assert podman.run("inspect", "-f", "{{.State.Status}}", "web").stdout.strip() == "running"
    assert podman.run("exec", "web", "echo", "from-exec").stdout == "from-exec\n"
    assert podman.run("exec", "web", "sh", "-c", "exit 5", check=False).returncode == 5
    assert "web" in podman.run("ps").stdout
    top = podman.run("top", "web", check=False)
    assert top.returncode == 0, top.stderr

    podman.run("pause", "web")
    assert podman.run("inspect", "-f", "{{.State.Status}}", "web").stdout.strip() == "paused"
    podman.run("unpause", "web")
    assert podman.run("inspect", "-f", "{{.State.Status}}", "web").stdout.strip() == "running"

    podman.run("kill", "-s", "TERM", "web")
    assert podman.run("wait", "web", timeout=120).stdout.strip() == "0"
    logs = podman.run("logs", "web").stdout
    assert logs == "started\nstopping\n"
    podman.run("rm", "web")
    assert podman.run("ps", "-aq").stdout == ""


def test_stop_escalates_to_kill_and_rm_force(podman: Podman) -> None:
    podman.run("run", "-d", "--name", "sleeper", "--network=none", podman.image, "sleep", "600")
    podman.run("stop", "-t", "1", "sleeper", timeout=120)
    assert podman.run("wait", "sleeper", timeout=60).stdout.strip() == "137"
    podman.run("run", "-d", "--name", "doomed", "--network=none", podman.image, "sleep", "600")
    podman.run("rm", "-f", "doomed", timeout=120)
    podman.run("rm", "sleeper")
    assert podman.run("ps", "-aq").stdout == ""


def test_run_it_and_exec_it_on_a_terminal(podman: Podman) -> None:
    status, screen = run_on_pty(
        podman.argv("run", "-it", "--rm", "--network=none", podman.image,
                    "sh", "-c", "stty size; tty; read line; echo got:$line"),
        podman.env, rows=33, cols=101, expect=b"/dev/pts/", send=b"typed\r")
    text = screen.decode(errors="replace")
    assert status == 0, text
    assert "33 101" in text
    assert "got:typed" in text

    status, screen = run_on_pty(
        podman.argv("run", "-it", "--rm", "--network=none", podman.image, "sh", "-c",
                    "trap 'echo interrupted; exit 4' INT; echo ready; "
                    "while true; do sleep 0.1; done"),
        podman.env, expect=b"ready", send=b"\x03")
    assert status == 4, screen
    assert b"interrupted" in screen, "Ctrl-C reaches the container's foreground process"

    podman.run("run", "-d", "--name", "shell", "--network=none", podman.image, "sleep", "600")
    # The exec's pty takes the caller's size once podman has sized conmon's end (after the
    # exec started): like a person, ask again until it shows.
    script = "tty; while read line; do s=$(stty size); echo size:$s; [ \"$s\" = '20 70' ] " \
             "&& exit 0; done"
    status, screen = run_on_pty(podman.argv("exec", "-it", "shell", "sh", "-c", script),
                                podman.env, rows=20, cols=70, expect=b"/dev/pts/",
                                send=b"\r", retype_until=b"size:20 70")
    assert status == 0, screen
    assert b"/dev/pts/" in screen and b"20 70" in screen
    podman.run("rm", "-f", "shell", timeout=120)


def test_podmans_network_and_published_port_reach_the_container(podman: Podman) -> None:
    """podman's default bridge network and its own `-p`, as with runc: the container has
    its address on podman's bridge, and the host port podman publishes reaches it."""
    from tests.conftest import fetch, free_port, wait_until

    port = free_port()
    podman.run("run", "-d", "--name", "web", "-p", f"{port}:80", podman.image, "sh", "-c",
               "mkdir -p /www && echo hello through podman > /www/index.html && "
               "exec httpd -f -p 80 -h /www", timeout=120)
    try:
        assert wait_until(lambda: fetch(f"http://127.0.0.1:{port}/")
                          == b"hello through podman\n", timeout=30)
        address = podman.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}",
                             "web").stdout.strip()
        assert address.startswith("10.88."), address
        seen = podman.run("exec", "web", "ip", "addr", "show", "eth0").stdout
        assert f"inet {address}/16" in seen, seen
    finally:
        podman.run("rm", "-f", "-t", "0", "web", timeout=120)
