"""The per-VM monitor: owns one VM and its container after `runm create` returns.

`runm create` starts it (a new session, stdio on /dev/null, logging to the VM's run dir) and
waits on a pipe for "ok" or an error. The monitor boots the VM, creates the container in the
guest with the caller's stdio fds (inherited from `create`) bridged to mux streams, and then
serves later invocations over ttrpc on `<run dir>/monitor.sock`:

    State Start Kill Wait Exec Resize Pause Resume Ps Stats Update Delete

plus `<run dir>/attach.sock`, where `runm exec` hands over the stdio fds of a new process with
SCM_RIGHTS before asking for it. QEMU dies with the monitor (PDEATHSIG); the stand-in processes
notice the monitor's socket closing and exit 137.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict, field
from pathlib import Path
from typing import Any

from runm.errors import RunmError
from runm.guest.image import GuestImage
from runm.net.ports import parse_publish
from runm.proto import agent as api
from runm.records import record
from runm.sandbox import hoststdio
from runm.sandbox.bundle import load_bundle
from runm.sandbox.pod import Pod, PodProcess
from runm.sandbox.rundir import attach_socket, monitor_socket
from runm.sandbox.state import StateStore
from runm.ttrpc import CallContext, Code, Server, TtrpcError, serve_unix

log = logging.getLogger("runm.monitor")


@record
class MonitorConfig:
    container_id: str
    root: str
    bundle: str
    run_dir: str
    kernel: str
    initrd: str
    rootfs: str
    digest: str
    kernel_release: str
    terminal: bool = False
    no_pivot: bool = False
    publish: list[str] = field(default_factory=list)  # PortForward texts

    def image(self) -> GuestImage:
        return GuestImage(Path(self.kernel), Path(self.initrd), Path(self.rootfs), self.digest,
                          self.kernel_release)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> MonitorConfig:
        return cls(**json.loads(path.read_text()))


class Monitor:
    """The monitor's service over a one-container pod (see pod.py)."""

    def __init__(self, config: MonitorConfig, stdio_fds: list[int]) -> None:
        self.config = config
        self.cid = config.container_id
        self.run_dir = Path(config.run_dir)
        self.store = StateStore(config.root)
        self.stdio_fds = stdio_fds
        self.pod = Pod(self.cid, config.image(), self.run_dir, on_exit=self._on_exit)
        self.status = "creating"
        self.pending_fds: dict[str, tuple[list[int], list[bool]]] = {}
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _set_status(self, status: str) -> None:
        self.status = status
        with contextlib.suppress(RunmError, OSError), self.store.lock(self.cid):
            record = self.store.load(self.cid)
            record.status = status
            self.store.save(record)

    async def _on_exit(self, proc: PodProcess) -> None:
        if not proc.exec_id and self.status != "stopped":
            self._set_status("stopped")

    # -- lifecycle ---------------------------------------------------------------------

    async def boot_and_create(self) -> None:
        bundle = load_bundle(self.config.bundle)
        terminal = self.config.terminal
        io = hoststdio.FdIO(self.stdio_fds, [True, True, not terminal])
        await self.pod.create(self.cid, bundle, io, terminal=terminal,
                              no_pivot=self.config.no_pivot,
                              publish=[parse_publish(p) for p in self.config.publish])
        self.status = "created"

    async def close(self) -> None:
        self.done.set()
        for task in list(self.tasks):
            task.cancel()
        await self.pod.close()

    # -- the service -------------------------------------------------------------------

    def register(self, server: Server) -> None:
        methods: dict[str, tuple[type[Any], Any]] = {
            "State": (api.ContainerRequest, self.state),
            "Start": (api.ContainerRequest, self.start),
            "Kill": (api.SignalRequest, self.kill),
            "Wait": (api.ProcessRequest, self.wait),
            "Exec": (api.ExecProcessRequest, self.exec),
            "Resize": (api.ResizeRequest, self.resize),
            "Pause": (api.ContainerRequest, self.pause),
            "Resume": (api.ContainerRequest, self.resume),
            "Ps": (api.ContainerRequest, self.ps),
            "Delete": (api.DeleteRequest, self.delete),
            "Stats": (api.ContainerRequest, self.stats),
            "Update": (api.JsonMessage, self.update),
        }
        for name, (request_type, handler) in methods.items():
            server.register_unary(api.MONITOR_SERVICE, name, request_type, handler)

    def _process(self, exec_id: str) -> PodProcess:
        container = self.pod.containers.get(self.cid)
        proc = None
        if container is not None:
            proc = container.execs.get(exec_id) if exec_id else container.init
        if proc is None:
            raise TtrpcError(Code.NOT_FOUND, f"process {exec_id} does not exist")
        return proc

    async def state(self, req: api.ContainerRequest, ctx: CallContext) -> api.MonitorState:
        init = self._process("")
        return api.MonitorState(status=self.status, exit_status=init.exit_status or 0,
                                guest_pid=init.guest_pid, exited_at_ns=init.exited_at_ns)

    async def start(self, req: api.ContainerRequest, ctx: CallContext) -> api.Empty:
        if self.status != "created":
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             "cannot start a container that has stopped" if self.status ==
                             "stopped" else f"cannot start an already {self.status} container")
        await self.pod.start(self.cid)
        if self.status == "created":
            self._set_status("running")
        return api.Empty()

    async def kill(self, req: api.SignalRequest, ctx: CallContext) -> api.Empty:
        proc = self._process(req.exec_id)
        if proc.exited.is_set() or (self.status == "stopped" and not req.exec_id):
            raise TtrpcError(Code.NOT_FOUND, "container not running")
        await self.pod.kill(self.cid, req.signal, exec_id=req.exec_id, all=req.all)
        return api.Empty()

    async def wait(self, req: api.ProcessRequest, ctx: CallContext) -> api.WaitResponse:
        proc = self._process(req.exec_id)
        await proc.exited.wait()
        return api.WaitResponse(exit_status=proc.exit_status or 0,
                                exited_at_ns=proc.exited_at_ns)

    async def exec(self, req: api.ExecProcessRequest, ctx: CallContext) -> api.ProcessResponse:
        if self.status not in ("created", "running"):
            raise TtrpcError(Code.FAILED_PRECONDITION, "cannot exec in a stopped container"
                             if self.status == "stopped" else
                             f"cannot exec in a {self.status} container")
        container = self.pod.container(self.cid)
        if req.exec_id in container.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec id {req.exec_id} already exists")
        fds, wanted = self.pending_fds.pop(req.exec_id, ([], [False, False, False]))
        terminal = bool(req.stdio and req.stdio.terminal)
        proc = await self.pod.exec(self.cid, req.exec_id, req.process_json,
                                   hoststdio.FdIO(fds, wanted), terminal)
        return api.ProcessResponse(pid=proc.guest_pid)

    async def resize(self, req: api.ResizeRequest, ctx: CallContext) -> api.Empty:
        await self.pod.resize(self.cid, req.exec_id, req.rows, req.cols)
        return api.Empty()

    async def pause(self, req: api.ContainerRequest, ctx: CallContext) -> api.Empty:
        if self.status != "running":
            raise TtrpcError(Code.FAILED_PRECONDITION, "container not running")
        await self.pod.pause(self.cid)
        self._set_status("paused")
        return api.Empty()

    async def resume(self, req: api.ContainerRequest, ctx: CallContext) -> api.Empty:
        if self.status != "paused":
            raise TtrpcError(Code.FAILED_PRECONDITION, "container not paused")
        await self.pod.resume(self.cid)
        self._set_status("running")
        return api.Empty()

    async def ps(self, req: api.ContainerRequest, ctx: CallContext) -> api.PsResponse:
        if self.status == "stopped":
            return api.PsResponse()
        return api.PsResponse(pids=await self.pod.pids(self.cid))

    async def stats(self, req: api.ContainerRequest, ctx: CallContext) -> api.JsonMessage:
        if self.status not in ("running", "paused"):
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"container with id {self.cid} is not running")
        return api.JsonMessage(id=self.cid, json=await self.pod.stats(self.cid))

    async def update(self, req: api.JsonMessage, ctx: CallContext) -> api.Empty:
        if self.status == "stopped":
            raise TtrpcError(Code.FAILED_PRECONDITION, "container not running")
        await self.pod.update(self.cid, req.json)
        return api.Empty()

    async def delete(self, req: api.DeleteRequest, ctx: CallContext) -> api.Empty:
        if self.status in ("running", "paused") and not req.force:
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"cannot delete container {self.cid} that is not stopped: "
                             f"{self.status}")
        await self.pod.remove(self.cid)  # the last container out stops the VM
        asyncio.get_running_loop().call_soon(self.done.set)
        return api.Empty()

    # -- stdio handover for exec -------------------------------------------------------

    async def serve_attach(self, path: Path) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock.bind(str(path))
        sock.listen(16)
        sock.setblocking(False)

        async def accept_loop() -> None:
            while True:
                conn, _ = await loop.sock_accept(sock)
                self._spawn(self._handle_attach(conn))

        self._spawn(accept_loop())
        return sock

    async def _handle_attach(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(True)
            msg, fds, _, _ = await loop.run_in_executor(None, socket.recv_fds, conn, 4096, 3)
            try:
                header = json.loads(msg)
                wanted = [bool(header.get(k)) for k in ("stdin", "stdout", "stderr")]
                if sum(wanted) != len(fds):
                    raise ValueError("fd count does not match the header")
                self.pending_fds[str(header["exec_id"])] = (fds, wanted)
                reply = b"ok\n"
            except (ValueError, KeyError) as err:
                for fd in fds:
                    os.close(fd)
                reply = f"error: {err}\n".encode()
            await loop.run_in_executor(None, conn.sendall, reply)


async def run_monitor(config: MonitorConfig, stdio_fds: list[int], ready_fd: int) -> int:
    monitor = Monitor(config, stdio_fds)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, monitor.done.set)
    listeners: list[asyncio.AbstractServer | socket.socket] = []
    try:
        try:
            await monitor.boot_and_create()
            server = Server()
            monitor.register(server)
            listeners.append(await serve_unix(server, str(monitor_socket(monitor.run_dir))))
            listeners.append(await monitor.serve_attach(attach_socket(monitor.run_dir)))
        except RunmError as err:
            _tell_creator(monitor, ready_fd, f"error: {err.message}")
            return 1
        except Exception as err:
            log.exception("monitor failed")
            _tell_creator(monitor, ready_fd, f"error: {err}")
            return 1
        if not _tell_creator(monitor, ready_fd, "ok"):
            return 1
        await monitor.done.wait()
        return 0
    finally:
        for listener in listeners:
            listener.close()
        await monitor.close()


def _tell_creator(monitor: Monitor, ready_fd: int, answer: str) -> bool:
    """Give `runm create` its answer ("ok" or "error: ..."); False if it is gone.

    A creator that died waiting (killed, or a caller's timeout) has not cleaned up and nobody
    knows of this container: its state goes too, and the monitor ends (its VM with it)."""
    try:
        os.write(ready_fd, f"{answer}\n".encode())
    except BrokenPipeError:
        log.warning("container %s: runm create is gone: removing the container",
                    monitor.config.container_id)
        monitor.store.remove(monitor.config.container_id)
        return False
    finally:
        os.close(ready_fd)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runm-monitor")
    parser.add_argument("config")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--stdio-fds", default="")
    parser.add_argument("--log")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = MonitorConfig.load(Path(args.config))
    fds = [int(fd) for fd in args.stdio_fds.split(",") if fd]
    return asyncio.run(run_monitor(config, fds, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
