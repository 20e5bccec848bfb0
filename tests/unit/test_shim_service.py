"""The shim's task service through runm's own ttrpc client, over a pod that is a fake (the
VM parts are exercised end to end in tests/e2e/test_shim.py): every error a containerd
client can provoke, Wait before Start, event forwarding and order, a VM dying."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from runm.channel.stream import AsyncioByteStream
from runm.errors import RunmError
from runm.proto import task as api
from runm.proto.codec import Message
from runm.sandbox.pod import KILLED_STATUS, PodProcess
from runm.shim.events import Publisher
from runm.shim.service import TaskService
from runm.ttrpc import CallContext, Client, Code, Server, TtrpcError
from runm.ttrpc.framing import MessageType, encode_frame

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(factory(), 10)

    return asyncio.run(guarded())


@dataclass
class FakeContainer:
    init: PodProcess
    execs: dict[str, PodProcess] = field(default_factory=dict)


class FakePod:
    """What the service needs of runm.sandbox.pod.Pod, with processes that exit on demand."""

    instances: ClassVar[list[FakePod]] = []

    def __init__(self, name: str, image: object, run_dir: Path, on_exit: Any,
                 on_oom: Any) -> None:
        self.name = name
        self.on_exit = on_exit
        self.on_oom = on_oom
        self.containers: dict[str, FakeContainer] = {}
        self.pid = 4242 + len(FakePod.instances)
        self.calls: list[tuple[str, ...]] = []
        self.closed = False
        self.fail_create: str | None = None
        FakePod.instances.append(self)

    async def create(self, cid: str, bundle: Any, io: Any, *, terminal: bool = False) -> Any:
        if self.fail_create:
            raise RunmError(self.fail_create)
        proc = PodProcess(cid, "", io, terminal=terminal, guest_pid=1)
        self.containers[cid] = FakeContainer(proc)
        return proc

    async def start(self, cid: str) -> Any:
        self.containers[cid].init.started = True
        return self.containers[cid].init

    async def exec(self, cid: str, exec_id: str, spec: str, io: Any, terminal: bool) -> Any:
        proc = PodProcess(cid, exec_id, io, terminal=terminal, guest_pid=7, started=True)
        self.containers[cid].execs[exec_id] = proc
        self.calls.append(("exec", cid, exec_id, spec))
        return proc

    async def exit(self, cid: str, exec_id: str = "", status: int = 0, ooms: int = 0) -> None:
        c = self.containers[cid]
        proc = c.execs[exec_id] if exec_id else c.init
        proc.exit_status, proc.exited_at_ns, proc.oom_kills = status, 1_700_000_000_5, ooms
        proc.exited.set()
        await self.on_exit(proc)

    async def kill(self, cid: str, signum: int, exec_id: str = "", all: bool = False) -> None:
        self.calls.append(("kill", cid, exec_id, str(signum)))

    async def pause(self, cid: str) -> None:
        self.calls.append(("pause", cid))

    async def resume(self, cid: str) -> None:
        self.calls.append(("resume", cid))

    async def pids(self, cid: str) -> list[int]:
        return [1, 7]

    async def stats(self, cid: str) -> str:
        return json.dumps({"type": "stats", "id": cid, "runm_oom_kills": 0, "data": {
            "pids": {"current": 2}, "memory": {"usage": {"usage": 4096, "limit": 8192}},
            "cpu": {"usage": {"total": 5_000_000}}}})

    async def update(self, cid: str, resources: str) -> None:
        self.calls.append(("update", cid, resources))

    async def resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        self.calls.append(("resize", cid, exec_id, f"{rows}x{cols}"))

    async def remove(self, cid: str) -> None:
        self.containers.pop(cid, None)
        if not self.containers:
            self.closed = True

    async def close(self) -> None:
        self.closed = True


class EventSink:
    """containerd's side of Events/Forward: keeps what arrives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, Any]] = []
        self.arrived = asyncio.Event()
        self.server = Server()
        self.server.register_unary(api.EVENTS_SERVICE, "Forward", api.ForwardRequest,
                                   self.forward)

    async def forward(self, req: api.ForwardRequest, ctx: CallContext) -> api.Empty:
        env = req.envelope
        assert env is not None and env.event is not None
        self.received.append((env.topic, ctx.namespace or "", env.event.type_url))
        self.arrived.set()
        return api.Empty()

    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.received]


@dataclass
class Shim:
    service: TaskService
    client: Client
    sink: EventSink
    bundle: Path

    async def call(self, method: str, request: Message, reply: type[M]) -> M:
        return await self.client.call(api.TASK_SERVICE, method, request, reply)

    @property
    def pod(self) -> FakePod:
        return FakePod.instances[-1]

    async def create(self, cid: str = "c1", **kw: Any) -> api.CreateTaskResponse:
        return await self.call("Create", api.CreateTaskRequest(id=cid, bundle=str(self.bundle),
                                                               **kw), api.CreateTaskResponse)

    async def events(self, count: int) -> list[str]:
        while len(self.sink.received) < count:
            self.sink.arrived.clear()
            await self.sink.arrived.wait()
        return self.sink.topics()


def make_bundle(path: Path, annotations: dict[str, str] | None = None) -> Path:
    (path / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"}, "annotations": annotations or {}}
    (path / "config.json").write_text(json.dumps(spec))
    return path


@asynccontextmanager
async def shim(tmp_path: Path) -> AsyncIterator[Shim]:
    FakePod.instances.clear()
    sink = EventSink()
    events_path = str(tmp_path / "events.sock")
    listener = await asyncio.start_unix_server(
        lambda r, w: sink.server.serve(AsyncioByteStream(r, w)), events_path)

    async def no_image() -> Any:
        return object()

    service = TaskService("ns1", Publisher(events_path, "ns1"), no_image,
                          pod_factory=FakePod)  # type: ignore[arg-type]
    server = Server()
    service.register(server)
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    serving = asyncio.create_task(server.serve(AsyncioByteStream(rb, wb)))
    bundle = make_bundle(tmp_path / "bundle")
    try:
        async with Client(AsyncioByteStream(ra, wa)) as client:
            yield Shim(service, client, sink, bundle)
    finally:
        await asyncio.wait_for(serving, 2)
        await service.events.aclose()
        listener.close()


def code_of(call: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, tuple[Code, str]]:
    async def inner() -> tuple[Code, str]:
        try:
            await call
        except TtrpcError as err:
            return err.code, err.message
        raise AssertionError("the call succeeded")

    return inner()


def test_a_task_lifecycle_publishes_events_in_order(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            created = await s.create(stdin="", stdout="", stderr="")
            assert created.pid == s.pod.pid
            waiting = asyncio.ensure_future(
                s.call("Wait", api.TaskRequest("c1"), api.WaitResponse))
            state = await s.call("State", api.TaskRequest("c1"), api.StateResponse)
            assert (state.status, state.pid, state.bundle) == (api.CREATED, s.pod.pid,
                                                               str(s.bundle))
            started = await s.call("Start", api.TaskRequest("c1"), api.StartResponse)
            assert started.pid == s.pod.pid and not waiting.done()
            spec = api.Any(api.PROCESS_TYPE_URL, json.dumps({"args": ["ls"]}).encode())
            await s.call("Exec", api.ExecProcessRequest("c1", "e1", spec=spec), api.Empty)
            exec_wait = asyncio.ensure_future(
                s.call("Wait", api.TaskRequest("c1", "e1"), api.WaitResponse))
            await s.call("Start", api.TaskRequest("c1", "e1"), api.StartResponse)
            assert s.pod.calls[-1] == ("exec", "c1", "e1", json.dumps({"args": ["ls"]}))
            pids = await s.call("Pids", api.IdRequest("c1"), api.PidsResponse)
            assert [p.pid for p in pids.processes] == [1, 7]
            details = pids.processes[1].info
            assert details is not None and details.type_url == api.PROCESS_DETAILS_TYPE_URL
            assert api.ProcessDetails.decode(details.value).exec_id == "e1"
            await s.pod.exit("c1", "e1", status=3)
            assert (await exec_wait).exit_status == 3
            await s.call("Delete", api.TaskRequest("c1", "e1"), api.DeleteResponse)
            await s.call("Pause", api.IdRequest("c1"), api.Empty)
            paused = await s.call("State", api.TaskRequest("c1"), api.StateResponse)
            assert paused.status == api.PAUSED
            await s.call("Resume", api.IdRequest("c1"), api.Empty)
            stats = await s.call("Stats", api.IdRequest("c1"), api.StatsResponse)
            assert stats.stats is not None and stats.stats.type_url == api.METRICS_TYPE_URL
            metrics = api.Metrics.decode(stats.stats.value)
            assert metrics.memory is not None and metrics.memory.usage == 4096
            assert metrics.cpu is not None and metrics.cpu.usage_usec == 5000
            await s.pod.exit("c1", status=137, ooms=1)
            waited = await waiting
            assert waited.exit_status == 137 and waited.exited_at is not None
            deleted = await s.call("Delete", api.TaskRequest("c1"), api.DeleteResponse)
            assert deleted.exit_status == 137
            assert s.pod.closed
            topics = await s.events(10)
            assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                              "/tasks/exec-started", "/tasks/exit", "/tasks/paused",
                              "/tasks/resumed", "/tasks/oom", "/tasks/exit",
                              "/tasks/delete"]
            assert {ns for _, ns, _ in s.sink.received} == {"ns1"}
            assert s.sink.received[0][2] == "containerd.events.TaskCreate"
            await s.call("Shutdown", api.ShutdownRequest("c1"), api.Empty)
            await asyncio.wait_for(s.service.done.wait(), 2)

    run(body)


def test_an_oom_kill_while_running_is_published_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            await s.create()
            await s.call("Start", api.TaskRequest("c1"), api.StartResponse)
            await s.pod.on_oom("c1", 1)  # the pod's OOM watch saw a child killed
            await s.pod.on_oom("gone", 1)  # a task deleted meanwhile: nothing
            await s.pod.exit("c1", status=0, ooms=1)  # the same kill, counted again at exit
            topics = await s.events(4)
            assert topics == ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit"]

    run(body)


def test_unknown_ids_are_not_found(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            for method, request in [("State", api.TaskRequest("nope")),
                                    ("Start", api.TaskRequest("nope")),
                                    ("Delete", api.TaskRequest("nope")),
                                    ("Wait", api.TaskRequest("nope")),
                                    ("Kill", api.KillRequest("nope", signal=9)),
                                    ("Pids", api.IdRequest("nope")),
                                    ("Pause", api.IdRequest("nope")),
                                    ("Stats", api.IdRequest("nope")),
                                    ("CloseIO", api.CloseIORequest("nope")),
                                    ("Checkpoint", api.CheckpointTaskRequest("nope"))]:
                code, message = await code_of(s.call(method, request, api.Empty))
                assert code == Code.NOT_FOUND, method
                assert "nope" in message and "not found" in message
            await s.create()
            code, message = await code_of(s.call("Kill", api.KillRequest("c1", "e9", 9),
                                                 api.Empty))
            assert code == Code.NOT_FOUND and "e9" in message

    run(body)


def test_errors_in_containerds_terms(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            assert (await code_of(s.create("")))[0] == Code.INVALID_ARGUMENT
            assert (await code_of(s.call("Create", api.CreateTaskRequest("x", "relative"),
                                         api.Empty)))[0] == Code.INVALID_ARGUMENT
            assert (await code_of(s.create(stdout="weird://x")))[0] == Code.INVALID_ARGUMENT
            await s.create()
            assert (await code_of(s.create()))[0] == Code.ALREADY_EXISTS
            spec = api.Any(api.PROCESS_TYPE_URL, b'{"args": ["sh"]}')
            await s.call("Exec", api.ExecProcessRequest("c1", "e1", spec=spec), api.Empty)
            code, _ = await code_of(s.call("Exec", api.ExecProcessRequest("c1", "e1",
                                                                         spec=spec), api.Empty))
            assert code == Code.ALREADY_EXISTS
            for bad in (None, api.Any("wrong/type", b"{}"),
                        api.Any(api.PROCESS_TYPE_URL, b"not json"),
                        api.Any(api.PROCESS_TYPE_URL, b'{"args": []}')):
                code, _ = await code_of(s.call("Exec", api.ExecProcessRequest(
                    "c1", "e2", spec=bad), api.Empty))
                assert code == Code.INVALID_ARGUMENT
            code, _ = await code_of(s.call("Kill", api.KillRequest("c1", "e1", 9), api.Empty))
            assert code == Code.FAILED_PRECONDITION  # exec not started
            await s.call("Start", api.TaskRequest("c1"), api.StartResponse)
            code, _ = await code_of(s.call("Start", api.TaskRequest("c1"), api.Empty))
            assert code == Code.FAILED_PRECONDITION
            code, message = await code_of(s.call("Delete", api.TaskRequest("c1"), api.Empty))
            assert code == Code.FAILED_PRECONDITION and "running" in message
            code, _ = await code_of(s.call("Resume", api.IdRequest("c1"), api.Empty))
            assert code == Code.FAILED_PRECONDITION
            code, _ = await code_of(s.call("Update", api.UpdateTaskRequest("c1"), api.Empty))
            assert code == Code.INVALID_ARGUMENT
            resources = api.Any(api.RESOURCES_TYPE_URL, b'{"pids": {"limit": 9}}')
            await s.call("Update", api.UpdateTaskRequest("c1", resources), api.Empty)
            assert s.pod.calls[-1] == ("update", "c1", '{"pids": {"limit": 9}}')
            code, _ = await code_of(s.call("Checkpoint", api.CheckpointTaskRequest("c1"),
                                           api.Empty))
            assert code == Code.UNIMPLEMENTED
            await s.call("Kill", api.KillRequest("c1", signal=15, all=True), api.Empty)
            await s.pod.exit("c1", status=143)
            code, message = await code_of(s.call("Kill", api.KillRequest("c1", signal=9),
                                                 api.Empty))
            assert (code, message) == (Code.NOT_FOUND, "process already finished: not found")
            code, _ = await code_of(s.call("Exec", api.ExecProcessRequest("c1", "e3",
                                                                         spec=spec), api.Empty))
            assert code == Code.FAILED_PRECONDITION  # the container has stopped
            # Shutdown while a task is left keeps the shim
            await s.call("Shutdown", api.ShutdownRequest("c1"), api.Empty)
            assert not s.service.done.is_set()

    run(body)


def test_a_failed_create_leaves_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            original = FakePod.__init__

            def failing(self: FakePod, *args: Any, **kw: Any) -> None:
                original(self, *args, **kw)
                self.fail_create = "runc create failed: exec: no such file"

            FakePod.__init__ = failing  # type: ignore[method-assign]
            try:
                code, message = await code_of(s.create())
            finally:
                FakePod.__init__ = original  # type: ignore[method-assign]
            assert code == Code.UNKNOWN and message == ("creating c1: runc create failed: "
                                                        "exec: no such file")
            assert s.service.tasks == {} and s.service.pods == {} and s.pod.closed

    run(body)


def test_wait_never_blocks_other_calls_and_a_dead_vm_means_137(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            await s.create()
            waits = [asyncio.ensure_future(s.call("Wait", api.TaskRequest("c1"),
                                                   api.WaitResponse)) for _ in range(3)]
            await s.call("Start", api.TaskRequest("c1"), api.StartResponse)
            state = await s.call("State", api.TaskRequest("c1"), api.StateResponse)
            assert state.status == api.RUNNING
            await s.pod.exit("c1", status=KILLED_STATUS)  # what Pod does when QEMU dies
            assert {(await w).exit_status for w in waits} == {137}
            state = await s.call("State", api.TaskRequest("c1"), api.StateResponse)
            assert (state.status, state.exit_status) == (api.STOPPED, 137)
            await s.call("Delete", api.TaskRequest("c1"), api.DeleteResponse)

    run(body)


def test_sandbox_annotation_groups_tasks_in_one_pod(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            pod_bundle = make_bundle(tmp_path / "p", {"io.kubernetes.cri.sandbox-id": "sb"})
            app_bundle = make_bundle(tmp_path / "a", {"io.kubernetes.cri.sandbox-id": "sb"})
            first = await s.call("Create", api.CreateTaskRequest("sb", str(pod_bundle)),
                                 api.CreateTaskResponse)
            second = await s.call("Create", api.CreateTaskRequest("app", str(app_bundle)),
                                  api.CreateTaskResponse)
            assert first.pid == second.pid and len(FakePod.instances) == 1
            other = await s.create("solo")
            assert other.pid != first.pid
            connect = await s.call("Connect", api.IdRequest("app"), api.ConnectResponse)
            assert (connect.shim_pid, connect.task_pid) == (os.getpid(), first.pid)

    run(body)


def test_garbage_and_oversized_frames_do_not_stop_the_shim(tmp_path: Path) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            server = Server()
            s.service.register(server)
            a, b = socket.socketpair()
            ra, wa = await asyncio.open_connection(sock=a)
            rb, wb = await asyncio.open_connection(sock=b)
            serving = asyncio.create_task(server.serve(AsyncioByteStream(rb, wb)))
            wa.write(encode_frame(1, MessageType.REQUEST, 0, b"\xff\xff\xff garbage"))
            wa.write(b"\x01\x00\x00\x00" + b"\x00\x00\x00\x03\x01\x00")  # 16 MiB frame
            await wa.drain()
            reply = await ra.read(4096)
            assert reply, "the shim answers a request it cannot decode with a status"
            wa.close()
            await asyncio.wait_for(serving, 2)
            # the shim still serves its other connection
            await s.create()
            state = await s.call("State", api.TaskRequest("c1"), api.StateResponse)
            assert state.id == "c1"

    run(body)


@pytest.mark.parametrize("method", ["ResizePty", "CloseIO"])
def test_terminal_and_stdin_calls_on_a_created_task(tmp_path: Path, method: str) -> None:
    async def body() -> None:
        async with shim(tmp_path) as s:
            await s.create(terminal=True)
            request: Message = (api.ResizePtyRequest("c1", width=80, height=24)
                                if method == "ResizePty" else api.CloseIORequest("c1",
                                                                                 stdin=True))
            await s.call(method, request, api.Empty)
            await s.call("Start", api.TaskRequest("c1"), api.StartResponse)
            await s.call(method, request, api.Empty)
            if method == "ResizePty":
                assert s.pod.calls[-1] == ("resize", "c1", "", "24x80")

    run(body)
