"""The `containerd.task.v2.Task` service: containerd's view of tasks, over runm pods.

Tasks sharing a `io.kubernetes.cri.sandbox-id` annotation run in one pod (one VM); every
other task gets a pod of its own. Events go out through the Publisher in the order their
causes happened: a process's exit is published under the same lock as its start, so
/tasks/exit never overtakes /tasks/start (or /tasks/exec-started).

Errors map to gRPC codes here, at the edge: unknown ids NOT_FOUND, reused exec ids
ALREADY_EXISTS, wrong state FAILED_PRECONDITION, bad requests INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import field
from pathlib import Path
from typing import Any

import runm
from runm.errors import RunmError
from runm.guest.image import GuestImage
from runm.proto import task as api
from runm.proto.codec import Message
from runm.records import record
from runm.sandbox.bundle import load_bundle, validate_id
from runm.sandbox.pod import KILLED_STATUS, Pod, PodProcess
from runm.sandbox.rundir import vm_run_dir
from runm.shim import rootfs
from runm.shim.events import Publisher
from runm.shim.metrics import metrics_from_runc_stats
from runm.shim.stdio import ShimIO, StdioError
from runm.ttrpc import CallContext, Code, Server, TtrpcError

log = logging.getLogger("runm.shim")

SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"


@record
class TaskProcess:
    """A process as containerd sees it: init (exec_id "") or an exec, before and after it
    runs in the VM."""

    exec_id: str
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    spec_json: str = ""  # an exec's OCI process
    io: ShimIO | None = None
    running: PodProcess | None = None
    exit_status: int = 0
    exited_at_ns: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> int:
        if self.exited.is_set():
            return api.STOPPED
        if self.running is not None and self.running.started:
            return api.RUNNING
        return api.CREATED

    def finish(self, status: int, at_ns: int) -> None:
        if not self.exited.is_set():
            self.exit_status, self.exited_at_ns = status, at_ns or time.time_ns()
            self.exited.set()


@record
class Task:
    id: str
    bundle: str
    group: str
    pod: Pod
    init: TaskProcess
    rootfs_mounted: bool = False
    paused: bool = False
    oom_kills: int = 0
    execs: dict[str, TaskProcess] = field(default_factory=dict)

    def process(self, exec_id: str) -> TaskProcess:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise TtrpcError(Code.NOT_FOUND, f"process {exec_id} does not exist in task "
                                             f"{self.id}: not found")
        return proc


def pod_run_dir(namespace: str, group: str) -> Path:
    """The run dir of the VM of a containerd pod (also what `delete` cleans up)."""
    return vm_run_dir(Path("/containerd") / namespace, group)


def _exited_at(ns: int) -> api.Timestamp | None:
    return api.Timestamp.from_ns(ns) if ns else None


class TaskService:
    def __init__(self, namespace: str, publisher: Publisher,
                 image_loader: Callable[[], Awaitable[GuestImage]],
                 pod_factory: Callable[..., Pod] | None = None) -> None:
        self.namespace = namespace
        self.events = publisher
        self.load_image = image_loader
        self.pod_factory = pod_factory or Pod
        self.tasks: dict[str, Task] = {}
        self.pods: dict[str, Pod] = {}
        self.event_lock = asyncio.Lock()
        self.done = asyncio.Event()  # Shutdown with no tasks left: the shim exits

    def register(self, server: Server) -> None:
        methods: dict[str, tuple[type[Message], Any]] = {
            "State": (api.TaskRequest, self.state),
            "Create": (api.CreateTaskRequest, self.create),
            "Start": (api.TaskRequest, self.start),
            "Delete": (api.TaskRequest, self.delete),
            "Pids": (api.IdRequest, self.pids),
            "Pause": (api.IdRequest, self.pause),
            "Resume": (api.IdRequest, self.resume),
            "Checkpoint": (api.CheckpointTaskRequest, self.checkpoint),
            "Kill": (api.KillRequest, self.kill),
            "Exec": (api.ExecProcessRequest, self.exec),
            "ResizePty": (api.ResizePtyRequest, self.resize_pty),
            "CloseIO": (api.CloseIORequest, self.close_io),
            "Update": (api.UpdateTaskRequest, self.update),
            "Wait": (api.TaskRequest, self.wait),
            "Stats": (api.IdRequest, self.stats),
            "Connect": (api.IdRequest, self.connect),
            "Shutdown": (api.ShutdownRequest, self.shutdown),
        }
        for name, (request_type, handler) in methods.items():
            server.register_unary(api.TASK_SERVICE, name, request_type, handler)

    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {task_id}: not found")
        return task

    # -- create / start / delete ----------------------------------------------------------

    async def create(self, req: api.CreateTaskRequest, ctx: CallContext) -> Message:
        try:
            validate_id(req.id)
        except RunmError as err:
            raise TtrpcError(Code.INVALID_ARGUMENT, err.message) from None
        if req.id in self.tasks:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "runm cannot restore checkpoints")
        if not req.bundle or not os.path.isabs(req.bundle):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {req.bundle!r} must be an "
                                                    "absolute path")
        mounted = False
        io: ShimIO | None = None
        try:
            if req.rootfs:
                await rootfs.mount_all(req.rootfs, Path(req.bundle) / "rootfs")
                mounted = True
            try:
                bundle = load_bundle(req.bundle)
            except RunmError as err:
                raise TtrpcError(Code.INVALID_ARGUMENT, err.message) from None
            group = bundle.annotations.get(SANDBOX_ID_ANNOTATION) or req.id
            try:
                io = await ShimIO.open(req.stdin, req.stdout, "" if req.terminal
                                       else req.stderr, container_id=req.id,
                                       namespace=self.namespace)
            except StdioError as err:
                raise TtrpcError(Code.INVALID_ARGUMENT, err.message) from None
            pod = self.pods.get(group)
            if pod is None:
                image = await self.load_image()
                run_dir = pod_run_dir(self.namespace, group)
                pod = self.pods[group] = self.pod_factory(group, image, run_dir,
                                                          on_exit=self._on_exit,
                                                          on_oom=self._on_oom)
            init = TaskProcess("", req.stdin, req.stdout, req.stderr, req.terminal, io=io)
            task = Task(req.id, req.bundle, group, pod, init, rootfs_mounted=mounted)
            self.tasks[req.id] = task  # exits may be reported while create returns
            try:
                init.running = await pod.create(req.id, bundle, io, terminal=req.terminal)
            except BaseException:
                del self.tasks[req.id]
                if not pod.containers:
                    self.pods.pop(group, None)
                    await pod.close()
                raise
        except RunmError as err:
            await self._undo_create(io, req.bundle, mounted)
            raise TtrpcError(Code.UNKNOWN, f"creating {req.id}: {err.message}") from None
        except BaseException:
            await self._undo_create(io, req.bundle, mounted)
            raise
        self.events.publish(api.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
            io=api.TaskIO(req.stdin, req.stdout, req.stderr, req.terminal), pid=pod.pid))
        return api.CreateTaskResponse(pid=pod.pid)

    @staticmethod
    async def _undo_create(io: ShimIO | None, bundle: str, mounted: bool) -> None:
        if io is not None:
            io.close()
        if mounted:
            await rootfs.unmount(Path(bundle) / "rootfs")

    async def start(self, req: api.TaskRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.status != api.CREATED:
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"process {req.exec_id or req.id} is "
                             f"{'stopped' if proc.status == api.STOPPED else 'running'}: "
                             "failed precondition")
        async with self.event_lock:
            if not req.exec_id:
                await self._agent_call(task.pod.start(task.id))
                self.events.publish(api.TaskStart(container_id=task.id, pid=task.pod.pid))
                return api.StartResponse(pid=task.pod.pid)
            try:
                proc.io = await ShimIO.open(proc.stdin, proc.stdout,
                                            "" if proc.terminal else proc.stderr,
                                            container_id=task.id, namespace=self.namespace)
            except StdioError as err:
                raise TtrpcError(Code.INVALID_ARGUMENT, err.message) from None
            proc.running = await self._agent_call(task.pod.exec(
                task.id, proc.exec_id, proc.spec_json, proc.io, proc.terminal))
            self.events.publish(api.TaskExecStarted(container_id=task.id,
                                                    exec_id=proc.exec_id,
                                                    pid=task.pod.pid))
            return api.StartResponse(pid=task.pod.pid)

    async def delete(self, req: api.TaskRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.status == api.RUNNING or (not req.exec_id and task.paused):
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"cannot delete a running process {req.exec_id or req.id}: "
                             "failed precondition")
        if req.exec_id:
            del task.execs[req.exec_id]
            if proc.io is not None:
                proc.io.close()
            if not proc.exited.is_set():
                proc.finish(0, 0)  # never started
            return api.DeleteResponse(pid=task.pod.pid, exit_status=proc.exit_status,
                                      exited_at=_exited_at(proc.exited_at_ns))
        del self.tasks[task.id]
        await task.pod.remove(task.id)
        if not task.pod.containers and self.pods.get(task.group) is task.pod:
            del self.pods[task.group]
        if proc.io is not None:
            proc.io.close()
        proc.finish(KILLED_STATUS, 0)  # a created task is killed by the delete
        if task.rootfs_mounted:
            await rootfs.unmount(Path(task.bundle) / "rootfs")
        async with self.event_lock:
            self.events.publish(api.TaskDelete(
                container_id=task.id, pid=task.pod.pid, exit_status=proc.exit_status,
                exited_at=_exited_at(proc.exited_at_ns), id=task.id))
        return api.DeleteResponse(pid=task.pod.pid, exit_status=proc.exit_status,
                                  exited_at=_exited_at(proc.exited_at_ns))

    # -- processes --------------------------------------------------------------------

    async def exec(self, req: api.ExecProcessRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        if not req.exec_id:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec id is required: invalid argument")
        if req.exec_id in task.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"id {req.exec_id}: already exists")
        if task.init.status == api.STOPPED:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {task.id} is stopped: "
                                                       "failed precondition")
        if req.spec is None or req.spec.type_url != api.PROCESS_TYPE_URL:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec spec must be an OCI process "
                                                    f"({api.PROCESS_TYPE_URL})")
        try:
            process = json.loads(req.spec.value)
            if not isinstance(process, dict) or not process.get("args"):
                raise ValueError("args must not be empty")
        except ValueError as err:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec spec: {err}") from None
        task.execs[req.exec_id] = TaskProcess(req.exec_id, req.stdin, req.stdout, req.stderr,
                                              req.terminal, spec_json=json.dumps(process))
        async with self.event_lock:
            self.events.publish(api.TaskExecAdded(container_id=task.id, exec_id=req.exec_id))
        return api.Empty()

    async def kill(self, req: api.KillRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.exited.is_set():
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        if proc.running is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"process {req.exec_id} is not "
                                                       "started: failed precondition")
        try:
            await task.pod.kill(task.id, req.signal, exec_id=req.exec_id, all=req.all)
        except TtrpcError as err:
            if proc.exited.is_set() or "not running" in err.message \
                    or "no such process" in err.message:
                raise TtrpcError(Code.NOT_FOUND, "process already finished: not found") \
                    from None
            raise
        return api.Empty()

    async def wait(self, req: api.TaskRequest, ctx: CallContext) -> Message:
        proc = self._task(req.id).process(req.exec_id)
        await proc.exited.wait()
        return api.WaitResponse(exit_status=proc.exit_status,
                                exited_at=_exited_at(proc.exited_at_ns))

    async def state(self, req: api.TaskRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        status = proc.status
        if status == api.RUNNING and not req.exec_id and task.paused:
            status = api.PAUSED
        return api.StateResponse(
            id=task.id, bundle=task.bundle, pid=task.pod.pid, status=status,
            stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr, terminal=proc.terminal,
            exit_status=proc.exit_status, exited_at=_exited_at(proc.exited_at_ns),
            exec_id=req.exec_id)

    async def resize_pty(self, req: api.ResizePtyRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.terminal and proc.status == api.RUNNING:
            await self._agent_call(task.pod.resize(task.id, req.exec_id, req.height,
                                                   req.width))
        return api.Empty()

    async def close_io(self, req: api.CloseIORequest, ctx: CallContext) -> Message:
        proc = self._task(req.id).process(req.exec_id)
        if req.stdin and proc.io is not None:
            proc.io.close_stdin()
        return api.Empty()

    async def pids(self, req: api.IdRequest, ctx: CallContext) -> Message:
        task = self._task(req.id)
        if task.init.status == api.STOPPED:
            return api.PidsResponse()
        by_pid = {p.running.guest_pid: p.exec_id for p in task.execs.values()
                  if p.running is not None and not p.exited.is_set()}
        processes = []
        for pid in await self._agent_call(task.pod.pids(task.id)):
            info = None
            if pid in by_pid:
                info = api.Any.of(api.ProcessDetails(exec_id=by_pid[pid]))
            processes.append(api.ProcessInfo(pid=pid, info=info))
        return api.PidsResponse(processes=processes)

    # -- the container as a whole ---------------------------------------------------------

    def _running(self, task_id: str) -> Task:
        task = self._task(task_id)
        if task.init.status != api.RUNNING:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {task.id} is not running: "
                                                       "failed precondition")
        return task

    async def pause(self, req: api.IdRequest, ctx: CallContext) -> Message:
        task = self._running(req.id)
        if task.paused:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {task.id} is already "
                                                       "paused: failed precondition")
        await self._agent_call(task.pod.pause(task.id))
        task.paused = True
        async with self.event_lock:
            self.events.publish(api.TaskPaused(container_id=task.id))
        return api.Empty()

    async def resume(self, req: api.IdRequest, ctx: CallContext) -> Message:
        task = self._running(req.id)
        if not task.paused:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {task.id} is not paused: "
                                                       "failed precondition")
        await self._agent_call(task.pod.resume(task.id))
        task.paused = False
        async with self.event_lock:
            self.events.publish(api.TaskResumed(container_id=task.id))
        return api.Empty()

    async def checkpoint(self, req: api.CheckpointTaskRequest, ctx: CallContext) -> Message:
        self._task(req.id)
        raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint is not supported by runm: "
                                             "not implemented")

    async def update(self, req: api.UpdateTaskRequest, ctx: CallContext) -> Message:
        task = self._running(req.id)
        if req.resources is None or req.resources.type_url != api.RESOURCES_TYPE_URL:
            raise TtrpcError(Code.INVALID_ARGUMENT, "resources must be OCI LinuxResources "
                                                    f"({api.RESOURCES_TYPE_URL})")
        try:
            resources = json.loads(req.resources.value)
        except ValueError as err:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"resources: {err}") from None
        await self._agent_call(task.pod.update(task.id, json.dumps(resources)))
        return api.Empty()

    async def stats(self, req: api.IdRequest, ctx: CallContext) -> Message:
        task = self._running(req.id)
        text = await self._agent_call(task.pod.stats(task.id))
        try:
            event = json.loads(text)
        except ValueError:
            raise TtrpcError(Code.UNKNOWN, f"the guest's runc printed no stats for "
                                           f"{task.id}") from None
        await self._report_oom(task, int(event.get("runm_oom_kills") or 0))
        metrics = metrics_from_runc_stats(event)
        return api.StatsResponse(stats=api.Any.of(metrics))

    async def connect(self, req: api.IdRequest, ctx: CallContext) -> Message:
        task = self.tasks.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(),
                                   task_pid=task.pod.pid if task is not None else 0,
                                   version=runm.__version__)

    async def shutdown(self, req: api.ShutdownRequest, ctx: CallContext) -> Message:
        if not self.tasks:
            ctx.on_replied = self.done.set  # exit once containerd has the answer
        return api.Empty()

    # -- exits ------------------------------------------------------------------------

    async def _report_oom(self, task: Task, oom_kills: int) -> None:
        if oom_kills > task.oom_kills:
            task.oom_kills = oom_kills
            self.events.publish(api.TaskOOM(container_id=task.id))

    async def _on_oom(self, task_id: str, oom_kills: int) -> None:
        task = self.tasks.get(task_id)
        if task is not None:
            async with self.event_lock:
                await self._report_oom(task, oom_kills)

    async def _on_exit(self, running: PodProcess) -> None:
        task = self.tasks.get(running.container_id)
        if task is None:
            return
        proc = task.init if not running.exec_id else task.execs.get(running.exec_id)
        if proc is None or proc.exited.is_set():
            return
        async with self.event_lock:
            await self._report_oom(task, running.oom_kills)
            proc.finish(running.exit_status or 0, running.exited_at_ns)
            self.events.publish(api.TaskExit(
                container_id=task.id, id=proc.exec_id or task.id, pid=task.pod.pid,
                exit_status=proc.exit_status, exited_at=_exited_at(proc.exited_at_ns)))
        if not proc.exec_id:  # the init's end ends its execs, as runc's would
            for other in task.execs.values():
                if other.running is None:
                    other.finish(KILLED_STATUS, 0)

    @staticmethod
    async def _agent_call(call: Awaitable[Any]) -> Any:
        """A call into the pod; failures with the VM become ttrpc errors with context."""
        try:
            return await call
        except RunmError as err:
            raise TtrpcError(Code.UNKNOWN, err.message) from None
        except ConnectionError as err:
            raise TtrpcError(Code.UNAVAILABLE, f"the VM is gone: {err}") from None
        except KeyError as err:
            raise TtrpcError(Code.NOT_FOUND, f"container {err}: not found") from None

    async def aclose(self) -> None:
        """Stop every pod (the shim is going away)."""
        for pod in list(self.pods.values()):
            with contextlib.suppress(Exception):
                await pod.close()
        self.pods.clear()
        for task in list(self.tasks.values()):
            if task.rootfs_mounted:
                await rootfs.unmount(Path(task.bundle) / "rootfs")
        self.tasks.clear()
