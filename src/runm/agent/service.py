"""The agent's ttrpc service: containers and processes in the guest, driven through runc."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Protocol

from runm.agent import callernic, sysapi
from runm.agent import stdio as stdio_copy
from runm.agent.reaper import Reaper
from runm.agent.runc import Runc, RuncError, read_pid_file, remove_tree
from runm.agent.specadapt import write_guest_bundle
from runm.channel.mux import MuxStream
from runm.proto import agent as api
from runm.proto.codec import Message
from runm.records import record
from runm.ttrpc import CallContext, Code, Server, TtrpcError

log = logging.getLogger("runm.agent")

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
MOUNT_RETRY_INTERVAL = 0.005
WARM_UP_ID = "runm-warmup"
REPORTING_DELAY = 5.0  # seconds from Setup to free page reporting (back) on: after most starts
OOM_POLL = 5.0  # seconds between reads of memory.events when inotify says nothing


def report_free_pages() -> None:
    """Turn free page reporting on (see sysapi.set_free_page_reporting); a failure only
    means freed memory is not given back, so it is logged, not raised."""
    try:
        sysapi.set_free_page_reporting(True)
    except OSError as err:
        log.warning("free page reporting: %s", err)


class StreamSource(Protocol):
    """Where stdio streams come from: the mux on the io port."""

    def open(self, stream_id: int) -> MuxStream: ...


@record
class ManagedProcess:
    container_id: str
    exec_id: str
    pid: int = 0
    status: asyncio.Future[int] | None = None
    exited_at_ns: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    output_pumps: list[asyncio.Task[None]] = field(default_factory=list)
    tty_master: int = -1

    def close(self, reaper: Reaper | None = None) -> None:
        if reaper is not None and self.pid:
            reaper.forget(self.pid)
        for task in self.pumps:
            task.cancel()
        if self.tty_master >= 0:
            with contextlib.suppress(OSError):
                os.close(self.tty_master)
            self.tty_master = -1


@record
class ManagedContainer:
    id: str
    bundle: str
    init: ManagedProcess
    execs: dict[str, ManagedProcess] = field(default_factory=dict)
    cgroup: Path | None = None  # its cgroup v2 directory, read from /proc/PID/cgroup

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took from this container so far."""
        if self.cgroup is None:
            return 0
        try:
            for line in (self.cgroup / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


def _drain_and_wake(fd: int, future: asyncio.Future[None]) -> None:
    with contextlib.suppress(OSError):
        os.read(fd, 4096)
    if not future.done():
        future.set_result(None)


def cgroup_of(pid: int, proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup")
              ) -> Path | None:
    """The cgroup v2 directory of pid ("0::/path" in /proc/PID/cgroup)."""
    try:
        for line in (proc / str(pid) / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    except OSError:
        pass
    return None


class AgentService:
    def __init__(self, reaper: Reaper, runc: Runc, *, streams: StreamSource | None = None,
                 pid1: bool = False) -> None:
        self.reaper = reaper
        self.runc = runc
        self.streams = streams
        self.pid1 = pid1
        self.containers: dict[str, ManagedContainer] = {}
        self.shutdown_requested = asyncio.Event()
        self.stopping = False  # Shutdown answered: power off once the connection has ended
        self._reporting_on: asyncio.TimerHandle | None = None  # see setup()

    def register(self, server: Server) -> None:
        handlers: dict[str, tuple[type[Message], Callable[[Any, CallContext], Awaitable[Message]]]]
        handlers = {
            "Setup": (api.SetupRequest, self.setup),
            "Mount": (api.MountRequest, self.mount),
            "SetupNetwork": (api.NetworkRequest, self.setup_network),
            "CreateContainer": (api.CreateContainerRequest, self.create_container),
            "StartContainer": (api.ContainerRequest, self.start_container),
            "ExecProcess": (api.ExecProcessRequest, self.exec_process),
            "WaitProcess": (api.ProcessRequest, self.wait_process),
            "WaitOom": (api.OomWaitRequest, self.wait_oom),
            "SignalProcess": (api.SignalRequest, self.signal_process),
            "ResizePty": (api.ResizeRequest, self.resize_pty),
            "DeleteContainer": (api.DeleteRequest, self.delete_container),
            "State": (api.ContainerRequest, self.state),
            "PauseContainer": (api.ContainerRequest, self.pause_container),
            "ResumeContainer": (api.ContainerRequest, self.resume_container),
            "ListProcesses": (api.ContainerRequest, self.list_processes),
            "Stats": (api.ContainerRequest, self.stats),
            "Update": (api.JsonMessage, self.update),
            "Shutdown": (api.Empty, self.shutdown),
            "Quiesce": (api.QuiesceRequest, self.quiesce),
            "WarmUp": (api.WarmUpRequest, self.warm_up),
        }
        for method, (request_type, handler) in handlers.items():
            server.register_unary(api.SERVICE, method, request_type, handler)

    # -- machine ---------------------------------------------------------------------------

    async def setup(self, req: api.SetupRequest, ctx: CallContext) -> api.SetupResponse:
        if self.pid1:
            if req.time_ns:
                time.clock_settime_ns(time.CLOCK_REALTIME, req.time_ns)
            sysapi.add_entropy(req.entropy)
            if req.time_ns:  # the host's second Setup
                self._cancel_reporting_on()
                if req.report_free_pages:
                    # Binding the balloon driver takes ~0.05-0.1 s of CPU under TCG, and
                    # reporting starts with every page free at that time: later, off the
                    # start's critical path (at 1 s it slowed `runc run`). Turning it off is
                    # never needed here: snapshots are saved with it off and this timer
                    # cancelled.
                    loop = asyncio.get_running_loop()
                    self._reporting_on = loop.call_later(
                        REPORTING_DELAY, loop.run_in_executor, None, report_free_pages)
            if req.hostname:
                socket.sethostname(req.hostname)
        return api.SetupResponse(kernel_release=os.uname().release, agent_pid=os.getpid())

    def _cancel_reporting_on(self) -> None:
        if self._reporting_on is not None:
            self._reporting_on.cancel()
            self._reporting_on = None

    async def mount(self, req: api.MountRequest, ctx: CallContext) -> api.Empty:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait_ms / 1000
        try:
            os.makedirs(req.target, exist_ok=True)
            while True:
                try:
                    await loop.run_in_executor(None, sysapi.mount, req.source, req.target,
                                               req.fstype, list(req.options))
                    break
                except OSError as err:
                    # A hot-plugged device is probed asynchronously and there is no udev to
                    # tell us when: an unknown virtiofs tag is EINVAL, a missing disk ENOENT.
                    if err.errno not in (errno.EINVAL, errno.ENOENT) or loop.time() >= deadline:
                        raise
                    await asyncio.sleep(MOUNT_RETRY_INTERVAL)
        except OSError as err:
            raise TtrpcError(Code.INTERNAL, str(err)) from err
        return api.Empty()

    async def setup_network(self, req: api.NetworkRequest, ctx: CallContext) -> api.Empty:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait_ms / 1000
        while (nic := callernic.find_nic(req.mac)) is None:
            if loop.time() >= deadline:  # hot-plugged: probed asynchronously, as in mount
                raise TtrpcError(Code.NOT_FOUND, f"no network interface with MAC {req.mac}")
            await asyncio.sleep(MOUNT_RETRY_INTERVAL)
        try:
            await loop.run_in_executor(None, callernic.configure, nic, req.mtu,
                                       list(req.addresses), list(req.routes),
                                       req.keep_user_network)
        except RuntimeError as err:
            raise TtrpcError(Code.INTERNAL, f"configuring the network: {err}") from None
        return api.Empty()

    async def quiesce(self, req: api.QuiesceRequest, ctx: CallContext) -> api.Empty:
        """The host is about to snapshot this VM: end its connection once this reply is out,
        so whatever connects next (a restored copy's host) starts a fresh ttrpc session."""
        ctx.end_connection = True
        if self.pid1 and req.for_snapshot:
            await self._prepare_snapshot()
        os.sync()
        return api.Empty()

    async def _prepare_snapshot(self) -> None:
        """Leave in the snapshot's RAM what container starts need and little else: drop the
        page cache (the boot's and the agent's imports: 8 MiB), page runc back in, then zero
        the free memory, so the host can leave those pages out of the snapshot's RAM file.
        Measured: starts from such a snapshot were no slower (medians within 0.1 s, 18 pairs)."""
        loop = asyncio.get_running_loop()
        self._cancel_reporting_on()  # it would fire in every restored guest, clones too
        await loop.run_in_executor(None, sysapi.set_free_page_reporting, False)
        await loop.run_in_executor(None, sysapi.drop_page_cache)
        await self.reaper.output([self.runc.binary, "--version"])
        await loop.run_in_executor(None, sysapi.zero_free_memory)

    async def warm_up(self, req: api.WarmUpRequest, ctx: CallContext) -> api.Empty:
        """Run a throwaway container from a hot-plugged share, as a real start does.

        Under TCG, a freshly restored guest translates every code path the first time it runs:
        the first container start costs about a second more than the second, and the first
        hot-plugged share ~0.1 s more to appear. A pooled guest pays both (PCI hot-plug,
        virtiofs mount and reads, `runc run`) before anyone waits for it.
        """
        await self.mount(api.MountRequest(req.source, req.bundle, req.fstype or "virtiofs",
                                          list(req.options), req.wait_ms), ctx)
        try:
            await self.create_container(
                api.CreateContainerRequest(WARM_UP_ID, req.bundle, api.Stdio(), start=True), ctx)
            status = (await self.wait_process(api.ProcessRequest(WARM_UP_ID), ctx)).exit_status
            await self.delete_container(api.DeleteRequest(WARM_UP_ID, True), ctx)
        finally:
            try:
                sysapi.umount(req.bundle)
            except OSError as err:
                raise TtrpcError(Code.INTERNAL, f"warm-up container: {err}") from err
            with contextlib.suppress(OSError):
                os.rmdir(req.bundle)  # made by mount(); the taker's guest need not see it
        if status != 0:
            raise TtrpcError(Code.INTERNAL, f"warm-up container exited with {status}")
        return api.Empty()

    async def shutdown(self, req: api.Empty, ctx: CallContext) -> api.Empty:
        """Flush every write to the host (virtiofs), answer, then power off. The host may
        kill the VM as soon as it has the answer: nothing is left to lose by then."""
        await asyncio.get_running_loop().run_in_executor(None, os.sync)
        ctx.end_connection = True  # the answer goes out, then the serving loop sees `stopping`
        self.stopping = True
        return api.Empty()

    def connection_ended(self) -> None:
        """The host's connection ended; after a Shutdown, that is the time to power off."""
        if self.stopping:
            self.shutdown_requested.set()

    # -- containers ------------------------------------------------------------------------

    def _container(self, container_id: str) -> ManagedContainer:
        container = self.containers.get(container_id)
        if container is None:
            raise TtrpcError(Code.NOT_FOUND, "container does not exist")
        return container

    def _process(self, container_id: str, exec_id: str) -> ManagedProcess:
        container = self._container(container_id)
        if not exec_id:
            return container.init
        proc = container.execs.get(exec_id)
        if proc is None:
            raise TtrpcError(Code.NOT_FOUND, f"process {exec_id} does not exist in {container_id}")
        return proc

    async def create_container(self, req: api.CreateContainerRequest,
                               ctx: CallContext) -> api.CreateContainerResponse:
        if req.id in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, "container with given ID already exists")
        state_dir = self.runc.state_dir / req.id
        state_dir.mkdir(parents=True, exist_ok=True)
        pid_file = state_dir / "init.pid"
        proc = ManagedProcess(req.id, "")
        try:
            notes, vm_sysctls = write_guest_bundle(req.bundle, req.id, state_dir / "bundle",
                                                   vm_network=req.vm_network,
                                                   pid_alias=(req.host_pid, req.guest_pid))
        except (OSError, ValueError) as err:
            remove_tree(state_dir)
            raise TtrpcError(Code.INVALID_ARGUMENT, f"reading the bundle's config.json: {err}"
                             ) from err
        try:
            for key, value in vm_sysctls.items():
                sysapi.write_sysctl(key, value)
        except OSError as err:
            remove_tree(state_dir)
            raise TtrpcError(Code.INVALID_ARGUMENT, err.strerror or str(err)) from err
        for note in notes:
            log.info("container %s: %s", req.id, note)
        verb = ["run", "--detach"] if req.start else ["create"]
        args = [*verb, "--bundle", str(state_dir / "bundle"), "--pid-file", str(pid_file)]
        if req.no_pivot:
            args.append("--no-pivot")
        stdio = req.stdio or api.Stdio()
        try:
            spec_process = json.loads((state_dir / "bundle" / "config.json").read_text()).get(
                "process") or {}
            await self._launch(proc, [*args, req.id], stdio, state_dir, pid_file,
                               _console_size(json.dumps(spec_process)))
        except BaseException:
            proc.close()
            with contextlib.suppress(OSError):
                remove_tree(state_dir)
            raise
        self.containers[req.id] = ManagedContainer(
            req.id, req.bundle, proc, cgroup=self.runc.cgroup(req.id) or cgroup_of(proc.pid))
        return api.CreateContainerResponse(pid=proc.pid, notes=notes)

    async def start_container(self, req: api.ContainerRequest, ctx: CallContext) -> api.Empty:
        self._container(req.id)
        await self._runc(req.id, ["start", req.id])
        return api.Empty()

    async def exec_process(self, req: api.ExecProcessRequest,
                           ctx: CallContext) -> api.ProcessResponse:
        container = self._container(req.container_id)
        if not req.exec_id or req.exec_id in container.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec id {req.exec_id!r} already exists")
        if container.init.exited.is_set():
            raise TtrpcError(Code.FAILED_PRECONDITION, "cannot exec in a stopped container")
        state_dir = self.runc.state_dir / req.container_id / "exec" / req.exec_id
        state_dir.mkdir(parents=True, exist_ok=True)
        spec = state_dir / "process.json"
        spec.write_text(req.process_json)
        pid_file = state_dir / "pid"
        proc = ManagedProcess(req.container_id, req.exec_id)
        args = ["exec", "--process", str(spec), "--detach", "--pid-file", str(pid_file),
                req.container_id]
        stdio = req.stdio or api.Stdio()
        try:
            await self._launch(proc, args, stdio, state_dir, pid_file,
                               _console_size(req.process_json))
        except BaseException:
            proc.close()
            raise
        container.execs[req.exec_id] = proc
        return api.ProcessResponse(pid=proc.pid)

    async def _launch(self, proc: ManagedProcess, args: list[str], stdio: api.Stdio,
                      state_dir: Path, pid_file: Path,
                      console_size: tuple[int, int] | None = None) -> None:
        """Run `runc create|run --detach|exec` for proc with its stdio wired to mux streams."""
        child_fds: list[int] = []
        keep: list[tuple[str, int]] = []  # (direction, our end)
        console: socket.socket | None = None
        try:
            if stdio.terminal:
                # container ids can be 64 chars: keep the path well under sun_path's 108
                console_path = Path("/run") / f"runm-console-{os.urandom(6).hex()}.sock"
                with contextlib.suppress(FileNotFoundError):
                    console_path.unlink()
                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                console.bind(str(console_path))
                console.listen(1)
                console.setblocking(False)
                args = [args[0], "--console-socket", str(console_path), *args[1:]]
                fds: list[int | None] = [None, None, None]
            else:
                fds = []
                for direction, stream_id in (("in", stdio.stdin), ("out", stdio.stdout),
                                             ("err", stdio.stderr)):
                    if not stream_id:
                        fds.append(None)
                        continue
                    r, w = os.pipe()
                    with contextlib.suppress(OSError):  # fewer, bigger reads under TCG
                        fcntl.fcntl(r, F_SETPIPE_SZ, PIPE_SIZE)
                    ours, theirs = (w, r) if direction == "in" else (r, w)
                    child_fds.append(theirs)
                    keep.append((direction, ours))
                    fds.append(theirs)
            run = asyncio.ensure_future(self._runc(proc.container_id, args, stdin=fds[0],
                                                   stdout=fds[1], stderr=fds[2]))
            if console is not None:
                proc.tty_master = await _receive_console(console, run)
                if console_size:  # before the process looks (runc races us otherwise)
                    _set_window(proc.tty_master, *console_size)
            await run
        finally:
            for fd in child_fds:
                os.close(fd)
            if console is not None:
                console.close()
                with contextlib.suppress(OSError):
                    os.unlink(console_path)
        proc.pid = read_pid_file(pid_file)
        proc.status = self.reaper.watch(proc.pid)
        proc.status.add_done_callback(lambda _: _mark_exited(proc))
        self._wire_stdio(proc, stdio, keep)

    def _wire_stdio(self, proc: ManagedProcess, stdio: api.Stdio,
                    pipes: list[tuple[str, int]]) -> None:
        if self.streams is None:
            for _, fd in pipes:
                os.close(fd)
            return
        streams = self.streams
        if proc.tty_master >= 0:
            master = proc.tty_master
            if stdio.stdout:
                out_fd = os.dup(master)
                proc.output_pumps.append(asyncio.ensure_future(
                    stdio_copy.copy_output(out_fd, streams.open(stdio.stdout), proc.exited)))
            if stdio.stdin:
                in_fd = os.dup(master)
                proc.pumps.append(asyncio.ensure_future(
                    stdio_copy.copy_input(streams.open(stdio.stdin), in_fd)))
        else:
            ids = {"in": stdio.stdin, "out": stdio.stdout, "err": stdio.stderr}
            for direction, fd in pipes:
                stream = streams.open(ids[direction])
                if direction == "in":
                    proc.pumps.append(asyncio.ensure_future(stdio_copy.copy_input(stream, fd)))
                else:
                    proc.output_pumps.append(asyncio.ensure_future(
                        stdio_copy.copy_output(fd, stream, proc.exited)))
        proc.pumps.extend(proc.output_pumps)

    async def wait_process(self, req: api.ProcessRequest, ctx: CallContext) -> api.WaitResponse:
        proc = self._process(req.container_id, req.exec_id)
        assert proc.status is not None
        status = await asyncio.shield(proc.status)
        # The exit status is only final for the caller once its output has been flushed.
        if proc.output_pumps:
            await asyncio.wait(proc.output_pumps)
        oom_kills = self._container(req.container_id).oom_kills()
        return api.WaitResponse(exit_status=status, exited_at_ns=proc.exited_at_ns,
                                oom_kills=oom_kills)

    async def wait_oom(self, req: api.OomWaitRequest, ctx: CallContext) -> api.OomWaitResponse:
        """Long poll: returns when the container's OOM kill count passes req.seen, or its
        init has exited. memory.events is watched with inotify; polled every OOM_POLL
        seconds as well, in case a kernel does not notify."""
        container = self._container(req.container_id)
        status = container.init.status
        loop = asyncio.get_running_loop()
        fd = -1
        if container.cgroup is not None:
            with contextlib.suppress(OSError):
                fd = sysapi.watch_modify(str(container.cgroup / "memory.events"))
        try:
            while True:
                count = container.oom_kills()
                if status is None or status.done() or count > req.seen:
                    return api.OomWaitResponse(oom_kills=count,
                                               exited=status is None or status.done())
                changed: asyncio.Future[None] = loop.create_future()
                if fd >= 0:
                    loop.add_reader(fd, _drain_and_wake, fd, changed)
                waiters: list[asyncio.Future[Any]] = [changed, asyncio.shield(status)]
                try:
                    await asyncio.wait(waiters, timeout=OOM_POLL,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if fd >= 0:
                        loop.remove_reader(fd)
                    for waiter in waiters:
                        waiter.cancel()  # the shield's, not the process's own status
        finally:
            if fd >= 0:
                os.close(fd)

    async def signal_process(self, req: api.SignalRequest, ctx: CallContext) -> api.Empty:
        proc = self._process(req.container_id, req.exec_id)
        if proc.exited.is_set():
            raise TtrpcError(Code.NOT_FOUND, "container not running" if not req.exec_id
                             else "process already finished")
        if req.exec_id:
            try:
                os.kill(proc.pid, req.signal)
            except ProcessLookupError as err:
                raise TtrpcError(Code.NOT_FOUND, "process already finished") from err
            return api.Empty()
        args = ["kill"] + (["--all"] if req.all else []) + [req.container_id, str(req.signal)]
        await self._runc(req.container_id, args)
        return api.Empty()

    async def resize_pty(self, req: api.ResizeRequest, ctx: CallContext) -> api.Empty:
        proc = self._process(req.container_id, req.exec_id)
        if proc.tty_master < 0:
            raise TtrpcError(Code.FAILED_PRECONDITION, "process has no terminal")
        _set_window(proc.tty_master, req.rows, req.cols)
        return api.Empty()

    async def delete_container(self, req: api.DeleteRequest, ctx: CallContext) -> api.Empty:
        container = self._container(req.id)
        args = ["delete"] + (["--force"] if req.force else []) + [req.id]
        await self._runc(req.id, args)
        for proc in (container.init, *container.execs.values()):
            proc.close(self.reaper)
        del self.containers[req.id]
        with contextlib.suppress(OSError):
            remove_tree(self.runc.state_dir / req.id)
        return api.Empty()

    async def state(self, req: api.ContainerRequest, ctx: CallContext) -> api.StateResponse:
        self._container(req.id)
        try:
            out = await self.runc.output(req.id, ["state", req.id])
        except RuncError as err:
            raise TtrpcError(Code.NOT_FOUND if "does not exist" in str(err) else Code.UNKNOWN,
                             str(err)) from err
        return api.StateResponse(state_json=json.dumps(json.loads(out)))

    async def pause_container(self, req: api.ContainerRequest, ctx: CallContext) -> api.Empty:
        self._container(req.id)
        await self._runc(req.id, ["pause", req.id])
        return api.Empty()

    async def resume_container(self, req: api.ContainerRequest, ctx: CallContext) -> api.Empty:
        self._container(req.id)
        await self._runc(req.id, ["resume", req.id])
        return api.Empty()

    async def list_processes(self, req: api.ContainerRequest, ctx: CallContext) -> api.PsResponse:
        self._container(req.id)
        try:
            out = await self.runc.output(req.id, ["ps", "--format", "json", req.id])
        except RuncError as err:
            raise TtrpcError(Code.UNKNOWN, str(err)) from err
        return api.PsResponse(pids=[int(p) for p in json.loads(out or "[]")])

    async def stats(self, req: api.ContainerRequest, ctx: CallContext) -> api.JsonMessage:
        """runc's own stats event (`runc events --stats`), from the guest's cgroup v2."""
        self._container(req.id)
        try:
            out = await self.runc.output(req.id, ["events", "--stats", req.id])
        except RuncError as err:
            raise TtrpcError(Code.FAILED_PRECONDITION if "not running" in str(err)
                             else Code.UNKNOWN, str(err)) from err
        try:
            event = json.loads(out)
        except ValueError:
            return api.JsonMessage(id=req.id, json=out.strip())
        event[api.OOM_KILLS_KEY] = self._container(req.id).oom_kills()
        return api.JsonMessage(id=req.id, json=json.dumps(event))

    async def update(self, req: api.JsonMessage, ctx: CallContext) -> api.Empty:
        self._container(req.id)
        path = self.runc.state_dir / req.id / "resources.json"
        path.write_text(req.json)
        await self._runc(req.id, ["update", "--resources", str(path), req.id])
        return api.Empty()

    async def _runc(self, container_id: str, args: list[str], **fds: int | None) -> None:
        try:
            await self.runc.run(container_id, args, **fds)
        except RuncError as err:
            text = str(err)
            code = Code.UNKNOWN
            if "does not exist" in text:
                code = Code.NOT_FOUND
            elif "not running" in text or "not stopped" in text:
                code = Code.FAILED_PRECONDITION
            raise TtrpcError(code, text) from err


def _set_window(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _console_size(process_json: str) -> tuple[int, int] | None:
    """The OCI process's consoleSize (rows, cols), if it has one."""
    try:
        size = json.loads(process_json).get("consoleSize") or {}
        rows, cols = int(size.get("height", 0)), int(size.get("width", 0))
    except (ValueError, AttributeError, TypeError):
        return None
    return (rows, cols) if rows and cols else None


def _mark_exited(proc: ManagedProcess) -> None:
    proc.exited_at_ns = time.time_ns()
    proc.exited.set()


async def _receive_console(console: socket.socket, runc: asyncio.Future[None]) -> int:
    """Accept runc's console-socket connection and take the pty master it sends."""
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(console))
    waiting: set[asyncio.Future[Any]] = {accept, runc}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if accept not in done:
        accept.cancel()
        await runc  # raises runc's error
        raise TtrpcError(Code.INTERNAL, "runc did not send a console")
    conn, _ = accept.result()
    with conn:
        conn.setblocking(True)
        _, fds, _, _ = await loop.run_in_executor(None, socket.recv_fds, conn, 4096, 1)
    if not fds:
        raise TtrpcError(Code.INTERNAL, "runc sent no pty master on the console socket")
    return fds[0]
