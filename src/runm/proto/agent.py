"""The host<->guest agent API (ttrpc service `runm.agent.v1.Agent`).

Stdio does not travel in these messages: each process's stdin/stdout/stderr is a stream on the
stdio multiplexer (the second virtio-serial port), named here by its stream id (0 = none).
"""

from __future__ import annotations

from runm.proto.codec import Message, pfield
from runm.records import record

SERVICE = "runm.agent.v1.Agent"


@record
class Empty(Message):
    pass


@record
class QuiesceRequest(Message):
    """End the host's connection; for_snapshot: also page in and zero free memory first."""

    for_snapshot: bool = pfield(1, "bool")


@record
class SetupRequest(Message):
    """Sent once per boot or restore, before anything else: the guest's clock and entropy."""

    time_ns: int = pfield(1, "int64")
    entropy: bytes = pfield(2, "bytes")
    hostname: str = pfield(3, "string")
    # Report free guest pages to the host (free page reporting); false in page-sharing
    # clones. Snapshots are saved with it off.
    report_free_pages: bool = pfield(4, "bool")


@record
class SetupResponse(Message):
    kernel_release: str = pfield(1, "string")
    agent_pid: int = pfield(2, "uint32")


@record
class MountRequest(Message):
    source: str = pfield(1, "string")
    target: str = pfield(2, "string")
    fstype: str = pfield(3, "string")
    options: list[str] = pfield(4, "string", repeated=True)
    # >0: the device may still be appearing (hot-plugged after a snapshot restore); retry a
    # "no such device/tag" failure for up to this long.
    wait_ms: int = pfield(5, "uint32")


@record
class NetworkRequest(Message):
    """Give the VM the network of the caller's namespace (podman's, CNI's): the NIC with
    this MAC (hot-plugged: wait up to wait_ms for it) becomes eth0 with these addresses
    ("10.88.0.2/16") and routes (`ip route add` arguments without the device; "-6 ..." for
    IPv6), and QEMU's user-mode NIC goes down."""

    mac: str = pfield(1, "string")
    mtu: int = pfield(2, "uint32")
    addresses: list[str] = pfield(3, "string", repeated=True)
    routes: list[str] = pfield(4, "string", repeated=True)
    wait_ms: int = pfield(5, "uint32")
    # Ports are published through the user-mode network too: its NIC stays up, without
    # the default route.
    keep_user_network: bool = pfield(6, "bool")


@record
class WarmUpRequest(Message):
    """Mount `source` at `bundle` (the hot-plugged virtiofs share of that tag, waiting up to
    wait_ms for it to appear; or as fstype with options), run the container bundle there to
    its exit, then unmount it."""

    source: str = pfield(1, "string")
    bundle: str = pfield(2, "string")
    wait_ms: int = pfield(3, "uint32")
    fstype: str = pfield(4, "string")  # default: virtiofs
    options: list[str] = pfield(5, "string", repeated=True)


@record
class Stdio(Message):
    stdin: int = pfield(1, "uint32")
    stdout: int = pfield(2, "uint32")
    stderr: int = pfield(3, "uint32")
    terminal: bool = pfield(4, "bool")


@record
class CreateContainerRequest(Message):
    id: str = pfield(1, "string")
    bundle: str = pfield(2, "string")
    stdio: Stdio | None = pfield(3, "message", message=Stdio)
    no_pivot: bool = pfield(4, "bool")
    # The container joins the VM's network (its NIC, published ports) even if the spec asks
    # for a new, empty network namespace.
    vm_network: bool = pfield(5, "bool")
    # Namespace paths /proc/<host_pid>/ns/* in the spec mean /proc/<guest_pid>/ns/*: in a
    # pod, containers name the sandbox's namespaces by the pid the host knows it by.
    host_pid: int = pfield(6, "uint32")
    guest_pid: int = pfield(7, "uint32")
    # Start it too (`runc run --detach`): one runc process instead of create's and start's.
    start: bool = pfield(8, "bool")


@record
class CreateContainerResponse(Message):
    pid: int = pfield(1, "uint32")
    notes: list[str] = pfield(2, "string", repeated=True)  # how the spec was adapted


@record
class ContainerRequest(Message):
    id: str = pfield(1, "string")


@record
class ExecProcessRequest(Message):
    container_id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    process_json: str = pfield(3, "string")
    stdio: Stdio | None = pfield(4, "message", message=Stdio)


@record
class ProcessRequest(Message):
    container_id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")


@record
class ProcessResponse(Message):
    pid: int = pfield(1, "uint32")


# Added by the agent to runc's stats event (Stats): the container's cgroup's oom_kill count,
# which `runm events` turns into {"type": "oom"} events.
OOM_KILLS_KEY = "runm_oom_kills"


@record
class WaitResponse(Message):
    exit_status: int = pfield(1, "uint32")
    exited_at_ns: int = pfield(2, "int64")
    oom_kills: int = pfield(3, "uint32")  # the container's cgroup's oom_kill count then


@record
class OomWaitRequest(Message):
    """Answer once the container's cgroup counts more than `seen` OOM kills, or its init
    has exited (a long poll: the host keeps one open per container)."""

    container_id: str = pfield(1, "string")
    seen: int = pfield(2, "uint32")


@record
class OomWaitResponse(Message):
    oom_kills: int = pfield(1, "uint32")
    exited: bool = pfield(2, "bool")  # the init has exited: no more waits


@record
class SignalRequest(Message):
    container_id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    signal: int = pfield(3, "uint32")
    all: bool = pfield(4, "bool")


@record
class ResizeRequest(Message):
    container_id: str = pfield(1, "string")
    exec_id: str = pfield(2, "string")
    rows: int = pfield(3, "uint32")
    cols: int = pfield(4, "uint32")


@record
class DeleteRequest(Message):
    id: str = pfield(1, "string")
    force: bool = pfield(2, "bool")


@record
class StateResponse(Message):
    """runc's `state` JSON, as the guest's runc printed it."""

    state_json: str = pfield(1, "string")


@record
class PsResponse(Message):
    """The container's processes, as guest pids."""

    pids: list[int] = pfield(1, "uint32", repeated=True)


@record
class JsonMessage(Message):
    """A JSON document (runc's stats event; OCI LinuxResources for an update)."""

    id: str = pfield(1, "string")
    json: str = pfield(2, "string")


# -- the per-VM monitor's service (host only), over <vm run dir>/monitor.sock ------------------

MONITOR_SERVICE = "runm.monitor.v1.Monitor"


@record
class MonitorState(Message):
    status: str = pfield(1, "string")  # created | running | paused | stopped
    exit_status: int = pfield(2, "uint32")
    guest_pid: int = pfield(3, "uint32")
    exited_at_ns: int = pfield(4, "int64")
