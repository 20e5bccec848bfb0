"""Detached containers: the runc verbs (create/start/state/kill/delete/exec/ps/pause/resume).

`create` leaves two host processes behind: the monitor (owns the VM; see monitor.py) and the
stand-in for the container's init (its pid goes to --pid-file and `state`). Later verbs talk to
the monitor over `<run dir>/monitor.sock`. A dead monitor means a stopped container.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import tty
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from runm.atomicfile import write_pid_file
from runm.errors import RunmError
from runm.launch import module_argv
from runm.proto import agent as api
from runm.proto.codec import Message
from runm.records import record
from runm.sandbox.rundir import attach_socket, monitor_socket, vm_run_dir
from runm.sandbox.state import ContainerRecord, StateStore
from runm.sandbox.tty import RawTerminal, window_size
from runm.ttrpc.blocking import call_unix
from runm.ttrpc.status import TtrpcError

if TYPE_CHECKING:  # `state`, `kill` and the like do without the VM machinery's imports
    from runm.guest.image import GuestImage
    from runm.sandbox.bundle import Bundle
    from runm.vm.base import PortForward

M = TypeVar("M", bound=Message)
MONITOR_EXIT_TIMEOUT = 30.0


def _send_console(console_socket: str, master: int) -> None:
    """runc's console-socket protocol: one message, the pty master as SCM_RIGHTS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            connect_unix_long(sock, console_socket)
        except OSError as err:
            raise RunmError(f"dial unix {console_socket}: {err.strerror or err}") from None
        socket.send_fds(sock, [b"/dev/ptmx"], [master])


def connect_unix_long(sock: socket.socket, path: str) -> None:
    """connect() to a unix socket whose path may exceed sun_path (108 bytes), as callers'
    socket dirs often do: go through /proc/self/fd/N of its directory."""
    if len(path.encode()) < 108:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    dirfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/{name}")
    finally:
        os.close(dirfd)


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


@record
class CreateOptions:
    container_id: str
    bundle: Bundle
    store: StateStore
    image: GuestImage
    pid_file: str | None = None
    console_socket: str | None = None
    no_pivot: bool = False
    publish: list[PortForward] = field(default_factory=list)


def create(opts: CreateOptions) -> ContainerRecord:
    from runm.sandbox.monitor import MonitorConfig

    cid, bundle, store = opts.container_id, opts.bundle, opts.store
    terminal = bundle.terminal
    if terminal and not opts.console_socket:
        raise RunmError("cannot allocate tty if runc will detach without setting console socket")
    if not terminal and opts.console_socket:
        raise RunmError("cannot use console socket if runc will not detach or allocate tty")
    record = ContainerRecord(id=cid, bundle=str(bundle.path), rootfs=str(bundle.rootfs),
                             annotations=bundle.annotations)
    store.create(record)
    run_dir = vm_run_dir(store.root, cid)
    state_dir = store.dir(cid)
    config = MonitorConfig(
        container_id=cid, root=str(store.root), bundle=str(bundle.path), run_dir=str(run_dir),
        kernel=str(opts.image.kernel), initrd=str(opts.image.initrd),
        rootfs=str(opts.image.rootfs), digest=opts.image.digest,
        kernel_release=opts.image.kernel_release, terminal=terminal, no_pivot=opts.no_pivot,
        publish=[str(p) for p in opts.publish])
    config_path = state_dir / "monitor.json"
    config.save(config_path)
    stdio: list[int] = []
    tty_slave: int | None = None
    monitor: subprocess.Popen[bytes] | None = None
    try:
        if terminal:
            assert opts.console_socket is not None
            master, tty_slave = os.openpty()
            tty.setraw(tty_slave)  # the guest's pty does the line discipline
            try:
                _send_console(opts.console_socket, master)
            finally:
                os.close(master)
            stdio = [os.dup(tty_slave), os.dup(tty_slave)]
        else:
            stdio = [os.dup(0), os.dup(1), os.dup(2)]
        def record_monitor(pid: int) -> None:
            # Before the VM boots: should this process die from here on, `runm delete -f`
            # finds the monitor (and, through it, the VM) instead of a stopped container.
            record.vm = {"run_dir": str(run_dir), "monitor_pid": pid}
            with store.lock(cid):
                store.save(record)

        monitor = _start_monitor(config_path, state_dir, stdio, record_monitor)
        standin = _spawn_stand_in(run_dir, "", tty_slave if terminal else None)
    except BaseException:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        store.remove(cid)
        raise
    finally:
        for fd in stdio:
            os.close(fd)
        if tty_slave is not None:
            os.close(tty_slave)
    with store.lock(cid):
        current = store.load(cid)
        record.status = current.status if current.status == "stopped" else "created"
        record.pid = standin.pid
        store.save(record)
    if opts.pid_file:
        write_pid_file(opts.pid_file, standin.pid)
    return record


def _spawn_stand_in(run_dir: Path, exec_id: str, tty_slave: int | None) -> subprocess.Popen[bytes]:
    """The stand-in process for exec_id ("": the container's init), with the signals it
    forwards held until it can forward them (its pid is published right away)."""
    from runm.sandbox.standin import signals_held

    with signals_held():
        return subprocess.Popen(
            module_argv("runm.sandbox.standin", "--socket", str(monitor_socket(run_dir)),
                        *(["--exec-id", exec_id] if exec_id else []),
                        *(["--tty-fd", "0"] if tty_slave is not None else [])),
            stdin=tty_slave if tty_slave is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _start_monitor(config_path: Path, state_dir: Path, stdio: list[int],
                   spawned: Callable[[int], None]) -> subprocess.Popen[bytes]:
    """Start the container's monitor and wait until its container is created; `spawned`
    gets its pid first."""
    ready_r, ready_w = os.pipe()
    log = state_dir / "monitor.log"
    try:
        with open(log, "ab") as log_file:
            monitor = subprocess.Popen(
                module_argv("runm.sandbox.monitor", str(config_path),
                            "--ready-fd", str(ready_w),
                            "--stdio-fds", ",".join(map(str, stdio)), "--log", str(log)),
                pass_fds=(ready_w, *stdio), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
    finally:
        os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        spawned(monitor.pid)
        answer = ready.read().decode(errors="replace").strip()
    if answer == "ok":
        return monitor
    monitor.wait()
    if answer.startswith("error: "):
        raise RunmError(answer.removeprefix("error: "))
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else ""
    raise RunmError(f"the VM monitor exited with {monitor.returncode}" +
                    (f":\n{tail}" if tail else ""))


class Container:
    """An existing container, as later invocations see it."""

    def __init__(self, store: StateStore, container_id: str) -> None:
        self.store = store
        self.id = container_id
        self.record = store.load(container_id)
        self.run_dir = Path(self.record.vm.get("run_dir", "/nonexistent"))

    def monitor_alive(self) -> bool:
        pid = int(self.record.vm.get("monitor_pid", 0))
        return pid > 0 and _pid_alive(pid, str(self.store.dir(self.id)))

    def foreground_alive(self) -> bool:
        """A `runm run` in the foreground owns its VM itself (no monitor)."""
        pid = int(self.record.vm.get("foreground_pid", 0))
        return pid > 0 and _pid_alive(pid, "runm")

    def run(self, method: str, request: Message, response_type: type[M]) -> M:
        """One call to the container's monitor (blocking: these verbs make one and exit)."""
        try:
            return call_unix(str(monitor_socket(self.run_dir)), api.MONITOR_SERVICE, method,
                             request, response_type)
        except TtrpcError as err:
            raise RunmError(err.message) from None
        except OSError:  # no monitor to connect to, or it went away before answering
            raise RunmError("container not running") from None

    def status(self) -> str:
        if self.record.status == "stopped":
            return "stopped"
        if "foreground_pid" in self.record.vm:
            return self.record.status if self.foreground_alive() else "stopped"
        if not self.monitor_alive():
            return "stopped"
        try:
            return self.run("State", api.ContainerRequest(self.id), api.MonitorState).status
        except RunmError:
            return "stopped"

    def oci_state(self) -> dict[str, Any]:
        self.record.status = self.status()
        return self.record.oci_state()

    def require_running(self, what: str = "container not running") -> None:
        if self.status() not in ("created", "running", "paused"):
            raise RunmError(what)

    def start(self) -> None:
        status = self.status()
        if status == "stopped":
            raise RunmError("cannot start a container that has stopped")
        if status != "created":
            raise RunmError(f"cannot start an already {status} container")
        self.run("Start", api.ContainerRequest(self.id), api.Empty)

    def kill(self, signum: int, all: bool = False) -> None:
        self.require_running()
        self.run("Kill", api.SignalRequest(self.id, "", signum, all), api.Empty)

    def pause(self) -> None:
        self.require_running()
        self.run("Pause", api.ContainerRequest(self.id), api.Empty)

    def resume(self) -> None:
        self.require_running()
        self.run("Resume", api.ContainerRequest(self.id), api.Empty)

    def ps(self) -> list[int]:
        if self.status() == "stopped":
            return []
        return list(self.run("Ps", api.ContainerRequest(self.id), api.PsResponse).pids)

    def stats(self) -> dict[str, Any]:
        """runc's stats event ({"type": "stats", "id": ..., "data": {...}})."""
        if self.status() not in ("running", "paused"):
            raise RunmError(f"container with id {self.id} is not running")
        text = self.run("Stats", api.ContainerRequest(self.id), api.JsonMessage).json
        try:
            event = json.loads(text)
        except ValueError:
            raise RunmError(f"the guest's runc printed no stats for {self.id}") from None
        return dict(event)

    def update(self, resources: dict[str, Any]) -> None:
        self.require_running()
        self.run("Update", api.JsonMessage(self.id, json.dumps(resources)), api.Empty)

    def delete(self, force: bool = False) -> None:
        status = self.status()
        if status in ("running", "paused") and not force:
            raise RunmError(f"cannot delete container {self.id} that is not stopped: {status}")
        if self.monitor_alive():
            with contextlib.suppress(RunmError):
                self.run("Delete", api.DeleteRequest(self.id, force), api.Empty)
            self._wait_monitor_exit()
        elif force and self.foreground_alive():
            # a foreground `runm run` owns its VM: killing it kills the VM (PDEATHSIG)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(self.record.vm["foreground_pid"]), signal.SIGKILL)
        if "run_dir" in self.record.vm:  # left behind if its owner was SIGKILLed
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.store.remove(self.id)

    def _wait_monitor_exit(self) -> None:
        pid = int(self.record.vm.get("monitor_pid", 0))
        deadline = time.monotonic() + MONITOR_EXIT_TIMEOUT
        marker = str(self.store.dir(self.id))
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            import select

            while _pid_alive(pid, marker):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    os.kill(pid, signal.SIGKILL)
                    remaining = 5
                select.select([pidfd], [], [], min(remaining, 1.0))
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    # -- exec -----------------------------------------------------------------------

    def exec(self, process: dict[str, Any], *, detach: bool, pid_file: str | None,
             console_socket: str | None) -> int:
        """Run process in the container: return its exit status, or 0 once detached."""
        self.require_running("cannot exec in a stopped container")
        terminal = bool(process.get("terminal"))
        if terminal and detach and not console_socket:
            raise RunmError("cannot allocate tty if runc will detach without setting console "
                            "socket")
        if console_socket and not terminal:
            raise RunmError("cannot use console socket if runc will not detach or allocate tty")
        exec_id = "exec-" + os.urandom(8).hex()
        tty_slave: int | None = None
        if terminal and console_socket:
            master, tty_slave = os.openpty()
            tty.setraw(tty_slave)
            try:
                _send_console(console_socket, master)
            finally:
                os.close(master)
            fds, wanted = [tty_slave, tty_slave], [True, True, False]
        elif terminal:
            fds, wanted = [0, 1], [True, True, False]
        else:
            fds, wanted = [0, 1, 2], [True, True, True]
        try:
            if tty_slave is not None and "consoleSize" not in process:
                size = window_size(tty_slave)  # the caller may have sized its master already
                if size:
                    process = dict(process, consoleSize={"height": size[0], "width": size[1]})
            self._attach(exec_id, fds, wanted)
            request = api.ExecProcessRequest(self.id, exec_id, json.dumps(process),
                                             api.Stdio(terminal=terminal))
            from runm.sandbox.standin import signals_held

            # attached, this process is the stand-in: the signals it forwards are held from
            # before the process starts, so that process gets them
            with contextlib.nullcontext() if detach else signals_held():
                self.run("Exec", request, api.ProcessResponse)
                if not detach:
                    return self._stand_in_here(exec_id, terminal and not console_socket)
            standin = _spawn_stand_in(self.run_dir, exec_id, tty_slave)
        finally:
            if tty_slave is not None:
                os.close(tty_slave)
        if pid_file:
            write_pid_file(pid_file, standin.pid)
        return 0

    def _attach(self, exec_id: str, fds: list[int], wanted: list[bool]) -> None:
        header = json.dumps({"exec_id": exec_id, "stdin": wanted[0], "stdout": wanted[1],
                             "stderr": wanted[2]}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(attach_socket(self.run_dir)))
                socket.send_fds(sock, [header], fds)
                reply = sock.recv(4096).decode(errors="replace").strip()
            except OSError as err:
                raise RunmError(f"attaching stdio: {err}") from None
        if reply != "ok":
            raise RunmError(f"attaching stdio: {reply}")

    def _stand_in_here(self, exec_id: str, own_terminal: bool) -> int:
        """`runm exec` without --detach: this process is the stand-in."""
        from runm.sandbox.standin import stand_in

        socket_path = str(monitor_socket(self.run_dir))
        if own_terminal and os.isatty(0):
            with RawTerminal(0):
                return stand_in(socket_path, exec_id, 0)
        return stand_in(socket_path, exec_id, None)

