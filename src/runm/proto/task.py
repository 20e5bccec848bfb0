"""The containerd subset the shim serves and sends: the `containerd.task.v2.Task` messages,
the task events and their `Events/Forward` envelope, and the cgroup v2 metrics `Stats` returns.

Field numbers are containerd's (1.6 and 2.x share them); see docs/design.md, "The shim".
"""

from __future__ import annotations

import time

from runm.proto.codec import Message, pfield
from runm.records import record

TASK_SERVICE = "containerd.task.v2.Task"
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

# typeurl names of the JSON-encoded runtime-spec types inside Anys
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
METRICS_TYPE_URL = "io.containerd.cgroups.v2.Metrics"
PROCESS_DETAILS_TYPE_URL = "containerd.runc.v1.ProcessDetails"


@record
class Empty(Message):
    pass


@record
class Any(Message):
    type_url: str = pfield(1, "string")
    value: bytes = pfield(2, "bytes")

    @classmethod
    def of(cls, message: Message) -> Any:
        """An Any of an event or metrics message: the type URL is the bare proto name."""
        return cls(str(getattr(message, "TYPE_URL")), message.encode())  # noqa: B009


@record
class Timestamp(Message):
    seconds: int = pfield(1, "int64")
    nanos: int = pfield(2, "int32")

    @classmethod
    def from_ns(cls, ns: int) -> Timestamp:
        return cls(ns // 1_000_000_000, ns % 1_000_000_000)

    @classmethod
    def now(cls) -> Timestamp:
        return cls.from_ns(time.time_ns())


@record
class Mount(Message):
    type: str = pfield(1, "string")
    source: str = pfield(2, "string")
    target: str = pfield(3, "string")
    options: list[str] = pfield(4, "string", repeated=True)


# containerd.v1.types.Status
UNKNOWN, CREATED, RUNNING, STOPPED, PAUSED, PAUSING = range(6)


@record
class ProcessInfo(Message):
    pid: int = pfield(1, "uint32")
    info: Any | None = pfield(2, "message", message=Any)


@record
class ProcessDetails(Message):
    TYPE_URL = PROCESS_DETAILS_TYPE_URL
    exec_id: str = pfield(1, "string")


# -- requests and responses ---------------------------------------------------------------


@record
class CreateTaskRequest(Message):
    id: str = pfield(1, "string")
    bundle: str = pfield(2, "string")
    rootfs: list[Mount] = pfield(3, "message", repeated=True, message=Mount)
    terminal: bool = pfield(4, "bool")
    stdin: str = pfield(5, "string")
    stdout: str = pfield(6, "string")
    stderr: str = pfield(7, "string")
    checkpoint: str = pfield(8, "string")
    parent_checkpoint: str = pfield(9, "string")
    options: Any | None = pfield(10, "message", message=Any)


@record
class CreateTaskResponse(Message):
    pid: int = pfield(1, "uint32")


@record
class TaskRequest(Message):
    """StartRequest, DeleteRequest, StateRequest, WaitRequest (id + exec_id)."""

    id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")


@record
class IdRequest(Message):
    """PidsRequest, PauseRequest, ResumeRequest, StatsRequest, ConnectRequest."""

    id: str = pfield(1, "string")


@record
class StartResponse(Message):
    pid: int = pfield(1, "uint32")


@record
class DeleteResponse(Message):
    pid: int = pfield(1, "uint32")
    exit_status: int = pfield(2, "uint32")
    exited_at: Timestamp | None = pfield(3, "message", message=Timestamp)


@record
class ExecProcessRequest(Message):
    id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    terminal: bool = pfield(3, "bool")
    stdin: str = pfield(4, "string")
    stdout: str = pfield(5, "string")
    stderr: str = pfield(6, "string")
    spec: Any | None = pfield(7, "message", message=Any)


@record
class ResizePtyRequest(Message):
    id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    width: int = pfield(3, "uint32")
    height: int = pfield(4, "uint32")


@record
class StateResponse(Message):
    id: str = pfield(1, "string")
    bundle: str = pfield(2, "string")
    pid: int = pfield(3, "uint32")
    status: int = pfield(4, "enum")
    stdin: str = pfield(5, "string")
    stdout: str = pfield(6, "string")
    stderr: str = pfield(7, "string")
    terminal: bool = pfield(8, "bool")
    exit_status: int = pfield(9, "uint32")
    exited_at: Timestamp | None = pfield(10, "message", message=Timestamp)
    exec_id: str = pfield(11, "string")


@record
class KillRequest(Message):
    id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    signal: int = pfield(3, "uint32")
    all: bool = pfield(4, "bool")


@record
class CloseIORequest(Message):
    id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    stdin: bool = pfield(3, "bool")


@record
class PidsResponse(Message):
    processes: list[ProcessInfo] = pfield(1, "message", repeated=True, message=ProcessInfo)


@record
class CheckpointTaskRequest(Message):
    id: str = pfield(1, "string")
    path: str = pfield(2, "string")
    options: Any | None = pfield(3, "message", message=Any)


@record
class UpdateTaskRequest(Message):
    id: str = pfield(1, "string")
    resources: Any | None = pfield(2, "message", message=Any)
    annotations: dict[str, str] = pfield(3, "map")


@record
class WaitResponse(Message):
    exit_status: int = pfield(1, "uint32")
    exited_at: Timestamp | None = pfield(2, "message", message=Timestamp)


@record
class StatsResponse(Message):
    stats: Any | None = pfield(1, "message", message=Any)


@record
class ConnectResponse(Message):
    shim_pid: int = pfield(1, "uint32")
    task_pid: int = pfield(2, "uint32")
    version: str = pfield(3, "string")


@record
class ShutdownRequest(Message):
    id: str = pfield(1, "string")
    now: bool = pfield(2, "bool")


# -- events (package containerd.events) ---------------------------------------------------


@record
class TaskIO(Message):
    stdin: str = pfield(1, "string")
    stdout: str = pfield(2, "string")
    stderr: str = pfield(3, "string")
    terminal: bool = pfield(4, "bool")


@record
class TaskCreate(Message):
    TOPIC = "/tasks/create"
    TYPE_URL = "containerd.events.TaskCreate"
    container_id: str = pfield(1, "string")
    bundle: str = pfield(2, "string")
    rootfs: list[Mount] = pfield(3, "message", repeated=True, message=Mount)
    io: TaskIO | None = pfield(4, "message", message=TaskIO)
    checkpoint: str = pfield(5, "string")
    pid: int = pfield(6, "uint32")


@record
class TaskStart(Message):
    TOPIC = "/tasks/start"
    TYPE_URL = "containerd.events.TaskStart"
    container_id: str = pfield(1, "string")
    pid: int = pfield(2, "uint32")


@record
class TaskDelete(Message):
    TOPIC = "/tasks/delete"
    TYPE_URL = "containerd.events.TaskDelete"
    container_id: str = pfield(1, "string")
    pid: int = pfield(2, "uint32")
    exit_status: int = pfield(3, "uint32")
    exited_at: Timestamp | None = pfield(4, "message", message=Timestamp)
    id: str = pfield(5, "string")


@record
class TaskExit(Message):
    TOPIC = "/tasks/exit"
    TYPE_URL = "containerd.events.TaskExit"
    container_id: str = pfield(1, "string")
    id: str = pfield(2, "string")
    pid: int = pfield(3, "uint32")
    exit_status: int = pfield(4, "uint32")
    exited_at: Timestamp | None = pfield(5, "message", message=Timestamp)


@record
class TaskOOM(Message):
    TOPIC = "/tasks/oom"
    TYPE_URL = "containerd.events.TaskOOM"
    container_id: str = pfield(1, "string")


@record
class TaskExecAdded(Message):
    TOPIC = "/tasks/exec-added"
    TYPE_URL = "containerd.events.TaskExecAdded"
    container_id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")


@record
class TaskExecStarted(Message):
    TOPIC = "/tasks/exec-started"
    TYPE_URL = "containerd.events.TaskExecStarted"
    container_id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    pid: int = pfield(3, "uint32")


@record
class TaskPaused(Message):
    TOPIC = "/tasks/paused"
    TYPE_URL = "containerd.events.TaskPaused"
    container_id: str = pfield(1, "string")


@record
class TaskResumed(Message):
    TOPIC = "/tasks/resumed"
    TYPE_URL = "containerd.events.TaskResumed"
    container_id: str = pfield(1, "string")


@record
class Envelope(Message):
    timestamp: Timestamp | None = pfield(1, "message", message=Timestamp)
    namespace: str = pfield(2, "string")
    topic: str = pfield(3, "string")
    event: Any | None = pfield(4, "message", message=Any)


@record
class ForwardRequest(Message):
    envelope: Envelope | None = pfield(1, "message", message=Envelope)


# -- io.containerd.cgroups.v2.Metrics (the fields runc's stats give us) --------------------


@record
class PidsStat(Message):
    current: int = pfield(1, "uint64")
    limit: int = pfield(2, "uint64")


@record
class CPUStat(Message):
    usage_usec: int = pfield(1, "uint64")
    user_usec: int = pfield(2, "uint64")
    system_usec: int = pfield(3, "uint64")
    nr_periods: int = pfield(4, "uint64")
    nr_throttled: int = pfield(5, "uint64")
    throttled_usec: int = pfield(6, "uint64")


# memory.stat keys in MemoryStat field order (numbers 1..31)
MEMORY_STAT_KEYS = (
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file",
    "active_file", "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault",
    "pgmajfault", "workingset_refault", "workingset_activate", "workingset_nodereclaim",
    "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
    "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc")


@record
class MemoryStat(Message):
    anon: int = pfield(1, "uint64")
    file: int = pfield(2, "uint64")
    kernel_stack: int = pfield(3, "uint64")
    slab: int = pfield(4, "uint64")
    sock: int = pfield(5, "uint64")
    shmem: int = pfield(6, "uint64")
    file_mapped: int = pfield(7, "uint64")
    file_dirty: int = pfield(8, "uint64")
    file_writeback: int = pfield(9, "uint64")
    anon_thp: int = pfield(10, "uint64")
    inactive_anon: int = pfield(11, "uint64")
    active_anon: int = pfield(12, "uint64")
    inactive_file: int = pfield(13, "uint64")
    active_file: int = pfield(14, "uint64")
    unevictable: int = pfield(15, "uint64")
    slab_reclaimable: int = pfield(16, "uint64")
    slab_unreclaimable: int = pfield(17, "uint64")
    pgfault: int = pfield(18, "uint64")
    pgmajfault: int = pfield(19, "uint64")
    workingset_refault: int = pfield(20, "uint64")
    workingset_activate: int = pfield(21, "uint64")
    workingset_nodereclaim: int = pfield(22, "uint64")
    pgrefill: int = pfield(23, "uint64")
    pgscan: int = pfield(24, "uint64")
    pgsteal: int = pfield(25, "uint64")
    pgactivate: int = pfield(26, "uint64")
    pgdeactivate: int = pfield(27, "uint64")
    pglazyfree: int = pfield(28, "uint64")
    pglazyfreed: int = pfield(29, "uint64")
    thp_fault_alloc: int = pfield(30, "uint64")
    thp_collapse_alloc: int = pfield(31, "uint64")
    usage: int = pfield(32, "uint64")
    usage_limit: int = pfield(33, "uint64")
    swap_usage: int = pfield(34, "uint64")
    swap_limit: int = pfield(35, "uint64")
    max_usage: int = pfield(36, "uint64")
    swap_max_usage: int = pfield(37, "uint64")


@record
class MemoryEvents(Message):
    low: int = pfield(1, "uint64")
    high: int = pfield(2, "uint64")
    max: int = pfield(3, "uint64")
    oom: int = pfield(4, "uint64")
    oom_kill: int = pfield(5, "uint64")


@record
class Metrics(Message):
    TYPE_URL = METRICS_TYPE_URL
    pids: PidsStat | None = pfield(1, "message", message=PidsStat)
    cpu: CPUStat | None = pfield(2, "message", message=CPUStat)
    memory: MemoryStat | None = pfield(4, "message", message=MemoryStat)
    memory_events: MemoryEvents | None = pfield(8, "message", message=MemoryEvents)
