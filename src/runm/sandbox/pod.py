"""One VM holding one or more containers (a pod): the runtime the containerd shim drives.

The first container boots (or restores) the VM with its bundle and volumes shared; later ones
have theirs hot-plugged and mounted. Every process's stdio rides on mux streams that a
`ProcessIO` bridges to its caller. Exits are reported through `on_exit`, once per process, in
the order they happen; a VM that dies takes every process with it (exit status 137).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Protocol

from runm.channel.mux import MuxStream
from runm.errors import RunmError
from runm.guest.image import GuestImage
from runm.net import callernet
from runm.net.ports import resolve_publish
from runm.proto import agent as api
from runm.records import record
from runm.sandbox.agent_client import AgentClient
from runm.sandbox.bundle import Bundle
from runm.sandbox.run import bundle_shares, bundle_vm_size
from runm.sandbox.sandbox import RESTORE_TIMEOUT, Sandbox
from runm.ttrpc import Code, TtrpcError
from runm.vm.base import PortForward, Share, VMError

log = logging.getLogger("runm.pod")

KILLED_STATUS = 128 + 9  # a process SIGKILLed, or lost with its VM


class ProcessIO(Protocol):
    """The caller's side of a process's stdio."""

    stdin: bool
    stdout: bool
    stderr: bool

    def connect(self, stdin: MuxStream | None, stdout: MuxStream | None,
                stderr: MuxStream | None) -> list[asyncio.Future[None]]:
        """Start copying; return the output copies, done once all output has reached the
        caller."""

    def close(self) -> None:
        """Let go of the caller's ends (it sees EOF)."""


@record
class PodProcess:
    container_id: str
    exec_id: str  # "" for the container's init process
    io: ProcessIO
    terminal: bool = False
    guest_pid: int = 0
    started: bool = False
    exit_status: int | None = None
    exited_at_ns: int = 0
    oom_kills: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    outputs: list[asyncio.Future[None]] = field(default_factory=list)


@record
class PodContainer:
    id: str
    bundle: Bundle
    init: PodProcess
    execs: dict[str, PodProcess] = field(default_factory=dict)
    status: str = "created"  # created | running | paused | stopped


ExitCallback = Callable[[PodProcess], Awaitable[None]]
OomCallback = Callable[[str, int], Awaitable[None]]  # container id, its OOM kills so far


class Pod:
    def __init__(self, name: str, image: GuestImage, run_dir: Path,
                 on_exit: ExitCallback | None = None, on_oom: OomCallback | None = None
                 ) -> None:
        self.name = name
        self.image = image
        self.run_dir = run_dir
        self.on_exit = on_exit
        self.on_oom = on_oom
        self.sandbox: Sandbox | None = None
        self.containers: dict[str, PodContainer] = {}
        self._next_stream = 1
        self._next_tag = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()  # one create/remove at a time: they change the VM
        self.closed = False

    # -- plumbing ----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The host pid standing for the pod's processes: QEMU's (killing it kills them)."""
        return self.sandbox.vm.pid if self.sandbox is not None else 0

    @property
    def agent(self) -> AgentClient:
        if self.sandbox is None or self.sandbox.agent is None:
            raise TtrpcError(Code.UNAVAILABLE, "the VM is not running")
        return self.sandbox.agent

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shares_for(self, bundle: Bundle) -> list[Share]:
        """Shares for the bundle's directories the VM does not have yet (new tags)."""
        vm = self.sandbox.vm.config if self.sandbox else None
        have = frozenset(share.host_path for share in vm.shares) if vm else frozenset()
        shares = bundle_shares(bundle, self._next_tag, have)  # vm.shares: with hot-plugged
        self._next_tag += len(shares)
        return shares

    def _wire(self, proc: PodProcess) -> api.Stdio:
        """Mux streams for the process's stdio, bridged to its ProcessIO."""
        assert self.sandbox is not None and self.sandbox.mux is not None
        mux = self.sandbox.mux
        ids = list(range(self._next_stream, self._next_stream + 6, 2))
        self._next_stream += 6
        io = proc.io
        want = [io.stdin, io.stdout, io.stderr and not proc.terminal]
        streams = [mux.open(i) if w else None for i, w in zip(ids, want, strict=True)]
        proc.outputs = io.connect(*streams)
        stdin, stdout, stderr = (i if w else 0 for i, w in zip(ids, want, strict=True))
        return api.Stdio(stdin, stdout, stderr, terminal=proc.terminal)

    # -- containers --------------------------------------------------------------------

    async def create(self, cid: str, bundle: Bundle, io: ProcessIO, *, terminal: bool = False,
                     no_pivot: bool = False,
                     publish: list[PortForward] | None = None) -> PodProcess:
        """Create the container in the VM (booting the VM for the first one, with the ports
        in publish, by default those of the bundle's annotation)."""
        async with self._lock:
            if self.closed:
                raise RunmError("the pod's VM has stopped")
            shares = self._shares_for(bundle)
            if self.sandbox is None:
                size = bundle_vm_size(bundle)
                if publish is None:
                    publish = resolve_publish([], bundle.annotations)
                caller_net = callernet.for_container(cid, bundle.path, bundle.spec)
                self.sandbox = Sandbox.create(self.name, self.image, self.run_dir, shares,
                                              memory_mib=size.memory_mib, cpus=size.cpus,
                                              publish=publish, caller_net=caller_net)
                try:
                    await self.sandbox.boot()
                except BaseException:
                    await self.sandbox.close()
                    self.sandbox = None
                    raise
                self._spawn(self._watch_vm(self.sandbox))
            else:
                await self._add_shares(shares)
            proc = PodProcess(cid, "", io, terminal=terminal)
            stdio = self._wire(proc)
            sandbox = next(iter(self.containers.values()), None)  # the pod's first
            try:
                proc.guest_pid = await self.agent.create_container(
                    cid, str(bundle.path), stdio, no_pivot=no_pivot,
                    vm_network=self.sandbox.vm_network,
                    pid_alias=(self.pid, sandbox.init.guest_pid) if sandbox else (0, 0))
            except TtrpcError as err:
                io.close()
                raise RunmError(err.message) from None
            self.containers[cid] = PodContainer(cid, bundle, proc)
            self.sandbox.refill_pool()
            self._spawn(self._watch(proc))
            if self.on_oom is not None:
                self._spawn(self._watch_oom(cid, self.on_oom))
            return proc

    async def _add_shares(self, shares: list[Share]) -> None:
        assert self.sandbox is not None
        for share in shares:
            try:
                await self.sandbox.vm.add_share(share)
            except (VMError, OSError) as err:
                raise RunmError(f"sharing {share.host_path} with the VM: {err}") from None
        # virtiofs, or in a page-sharing clone (a pooled VM) binds of its 9p export
        await self.sandbox.mount_shares(shares, wait_ms=int(RESTORE_TIMEOUT * 1000))

    def container(self, cid: str) -> PodContainer:
        container = self.containers.get(cid)
        if container is None:
            raise KeyError(cid)
        return container

    async def start(self, cid: str) -> PodProcess:
        container = self.container(cid)
        await self.agent.start_container(cid)
        container.init.started = True
        if container.status == "created":
            container.status = "running"
        return container.init

    async def exec(self, cid: str, exec_id: str, process_json: str, io: ProcessIO,
                   terminal: bool) -> PodProcess:
        """Run a new process in the container now."""
        container = self.container(cid)
        proc = PodProcess(cid, exec_id, io, terminal=terminal)
        stdio = self._wire(proc)
        try:
            proc.guest_pid = await self.agent.exec_process(cid, exec_id, process_json, stdio)
        except TtrpcError:
            io.close()
            raise
        proc.started = True
        container.execs[exec_id] = proc
        self._spawn(self._watch(proc))
        return proc

    async def kill(self, cid: str, signum: int, exec_id: str = "", all: bool = False) -> None:
        await self.agent.signal_process(cid, signum, exec_id=exec_id, all=all)

    async def pause(self, cid: str) -> None:
        await self.agent.pause_container(cid)
        self.container(cid).status = "paused"

    async def resume(self, cid: str) -> None:
        await self.agent.resume_container(cid)
        self.container(cid).status = "running"

    async def pids(self, cid: str) -> list[int]:
        return await self.agent.list_processes(cid)

    async def stats(self, cid: str) -> str:
        return await self.agent.stats(cid)

    async def update(self, cid: str, resources_json: str) -> None:
        await self.agent.update(cid, resources_json)

    async def resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        await self.agent.resize_pty(cid, rows, cols, exec_id=exec_id)

    async def remove(self, cid: str) -> None:
        """Delete the container in the guest (killing what is left of it); the last one out
        stops the VM, which takes the container with it: no `runc delete` in the guest then
        (a Go process, ~0.3 s under TCG, for state that dies with the VM; the agent's
        shutdown still syncs the guest's writes first)."""
        async with self._lock:
            container = self.containers.pop(cid, None)
            if container is not None and self.containers and self.sandbox is not None \
                    and not self.sandbox.vm.exited():
                with contextlib.suppress(TtrpcError, ConnectionError):
                    await self.agent.delete_container(cid, force=True)
            for proc in ([container.init, *container.execs.values()] if container else []):
                if not proc.exited.is_set():
                    proc.io.close()
            if not self.containers:
                await self._close()

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self.sandbox is not None:
            await self.sandbox.close()

    # -- exits -------------------------------------------------------------------------

    async def _watch(self, proc: PodProcess) -> None:
        try:
            waited = await self.agent.wait_process(proc.container_id, proc.exec_id)
            status, at, ooms = waited.exit_status, waited.exited_at_ns, waited.oom_kills
        except (TtrpcError, ConnectionError) as err:
            if self.closed:
                return
            log.warning("waiting for %s/%s: %s", proc.container_id, proc.exec_id or "init",
                        err)
            status, at, ooms = KILLED_STATUS, 0, 0
        if proc.outputs:  # all output reaches the caller before the exit is known
            await asyncio.gather(*proc.outputs, return_exceptions=True)
        await self._finish(proc, status, at, ooms)

    async def _watch_oom(self, cid: str, report: OomCallback) -> None:
        """Report each OOM kill in the container while its init lives (the agent answers a
        long poll when memory.events changes)."""
        seen = 0
        while True:
            try:
                answer = await self.agent.wait_oom(cid, seen)
            except (TtrpcError, ConnectionError):
                return  # the container or the VM is gone
            if answer.oom_kills > seen:
                seen = answer.oom_kills
                await report(cid, seen)
            if answer.exited:
                return

    async def _finish(self, proc: PodProcess, status: int, at_ns: int, oom_kills: int) -> None:
        if proc.exited.is_set():
            return
        proc.io.close()
        proc.exit_status, proc.exited_at_ns, proc.oom_kills = status, at_ns, oom_kills
        proc.exited.set()
        container = self.containers.get(proc.container_id)
        if container is not None and not proc.exec_id:
            container.status = "stopped"
        if self.on_exit is not None:
            await self.on_exit(proc)

    async def _watch_vm(self, sandbox: Sandbox) -> None:
        code = await sandbox.vm.wait_exit()
        if self.closed:
            return
        log.warning("VM %s exited with %d", self.name, code)
        for container in list(self.containers.values()):
            for proc in [container.init, *container.execs.values()]:
                await self._finish(proc, KILLED_STATUS, 0, 0)
