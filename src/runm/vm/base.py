"""What runm needs from a hypervisor, independent of which one runs the guest."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import field
from pathlib import Path

from runm.records import record

CTL_PORT = "runm.ctl"
IO_PORT = "runm.io"


class VMError(Exception):
    """The VM could not be started or died; the message says why (with the console tail)."""


@record(frozen=True)
class Share:
    """A host directory visible in the guest at guest_path."""

    tag: str
    host_path: Path
    guest_path: str
    readonly: bool = False


@record(frozen=True)
class PortForward:
    """A host port forwarded to the guest's (and so the container's) port."""

    protocol: str  # "tcp" or "udp"
    host_ip: str
    host_port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.guest_port}/{self.protocol}"


@record(frozen=True)
class TapNic:
    """A second NIC on a tap device made elsewhere (in the caller's network namespace):
    QEMU gets the tap's fd."""

    fd: int
    mac: str


@record(frozen=True)
class SnapshotFiles:
    """A saved guest: its RAM as a (sparse) file and QEMU's device state without RAM."""

    ram: Path
    state: Path


@record
class VMConfig:
    name: str
    kernel: Path
    initrd: Path
    rootfs: Path
    run_dir: Path
    memory_mib: int = 512
    cpus: int = 1
    shares: list[Share] = field(default_factory=list)
    ports: tuple[str, ...] = (CTL_PORT, IO_PORT)
    kernel_args: list[str] = field(default_factory=list)
    accel: str | None = None  # None: probe (kvm where it really boots, else tcg)
    # Boot with guest RAM in this file (shared), so the VM can be saved as a snapshot.
    memory_file: Path | None = None
    # Start from this snapshot instead of booting (RAM from a private copy of its file).
    restore: SnapshotFiles | None = None
    # With restore: map the snapshot's RAM file privately (copy-on-write) instead of copying
    # it, so clones share its pages; shares then go over 9p (vhost-user needs shared RAM).
    clone: bool = False
    publish: list[PortForward] = field(default_factory=list)
    tap: TapNic | None = None


class VirtualMachine(abc.ABC):
    """One guest. start() returns once the hypervisor runs; the agent comes up later."""

    def __init__(self, config: VMConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def start(self, connect: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start the hypervisor; `connect` runs once its ports accept connections and
        before a restored guest resumes."""

    @abc.abstractmethod
    def port_path(self, name: str) -> Path:
        """Host-side unix socket of the virtio-serial (or vsock) port `name`."""

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @abc.abstractmethod
    def exited(self) -> bool: ...

    @abc.abstractmethod
    async def wait_exit(self) -> int: ...

    @abc.abstractmethod
    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the hypervisor to quit; kill it (and its helpers) after timeout."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the hypervisor and its helpers now; never raises."""

    @abc.abstractmethod
    def console_tail(self, lines: int = 20) -> str: ...
