"""One VM with its agent connection and stdio mux: boot to agent-ready, and tear down."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

from runm.channel.mux import Mux
from runm.channel.stream import AsyncioByteStream
from runm.errors import RunmError
from runm.guest.image import GuestImage
from runm.sandbox.agent_client import AgentClient
from runm.ttrpc import Client
from runm.vm.base import CTL_PORT, IO_PORT, Share, VMConfig, VMError
from runm.vm.qemu import QemuVM

log = logging.getLogger("runm.sandbox")

DEFAULT_MEMORY_MIB = 512


def boot_timeout() -> float:
    return float(os.environ.get("RUNM_BOOT_TIMEOUT", "90"))


def vm_run_dir(root: Path, container_id: str) -> Path:
    """Short per-VM socket dir: unix socket paths are limited to 107 bytes, ids can be 64."""
    base = Path(os.environ.get("RUNM_RUN_DIR", "/run/runm-vm"))
    digest = hashlib.sha256(f"{root.resolve()}\0{container_id}".encode()).hexdigest()[:16]
    return base / digest


class Timings:
    """Phase durations of one start, for `runm bench` (RUNM_TIMINGS=FILE dumps them)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = self.start
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - self.last)
        self.last = now


class Sandbox:
    def __init__(self, vm: QemuVM, shares: list[Share]) -> None:
        self.vm = vm
        self.shares = shares
        self.agent: AgentClient | None = None
        self.mux: Mux | None = None
        self._client: Client | None = None
        self.kernel_release = ""

    @classmethod
    def create(cls, name: str, image: GuestImage, run_dir: Path, shares: list[Share],
               memory_mib: int = DEFAULT_MEMORY_MIB) -> Sandbox:
        config = VMConfig(name=name, kernel=image.kernel, initrd=image.initrd,
                          rootfs=image.rootfs, run_dir=run_dir, memory_mib=memory_mib,
                          shares=shares)
        return cls(QemuVM(config), shares)

    async def boot(self, timings: Timings | None = None) -> None:
        """Start the VM and return once the agent answers and the shares are mounted."""
        timings = timings or Timings()
        try:
            await self.vm.start()
        except VMError as err:
            raise RunmError(f"starting VM: {err}") from None
        except OSError as err:
            raise RunmError(f"starting VM: {err}") from None
        timings.mark("qemu_start")
        ctl = await AsyncioByteStream.connect_unix(str(self.vm.port_path(CTL_PORT)))
        io = await AsyncioByteStream.connect_unix(str(self.vm.port_path(IO_PORT)))
        self._client = Client(ctl)
        self.agent = AgentClient(self._client)
        self.mux = Mux(io)
        await self.mux.start()
        await self._wait_agent(boot_timeout())
        timings.mark("guest_boot")
        for share in self.shares:
            options = ["ro"] if share.readonly else []
            await self.agent.mount(share.tag, share.guest_path, "virtiofs", options)
        timings.mark("mount_shares")

    async def _wait_agent(self, timeout: float) -> None:
        """Wait for the agent's first answer, then give it the clock and fresh entropy.

        Requests sent before the guest opens its port wait in the socket (QEMU reads the
        chardev only once the port is open), so one probe suffices; the clock goes in a second
        call because the probe may have waited for the whole boot.
        """
        assert self.agent is not None
        probe = asyncio.ensure_future(self.agent.setup(0, b""))
        exit_wait = asyncio.ensure_future(self.vm.wait_exit())
        try:
            done, _ = await asyncio.wait({probe, exit_wait}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if exit_wait in done:
                raise RunmError(self._boot_failure(f"VM exited with {exit_wait.result()}"))
            if probe not in done:
                raise RunmError(self._boot_failure(
                    f"guest agent did not answer within {timeout:.0f}s"))
            try:
                probe.result()
                setup = await self.agent.setup(time.time_ns(), os.urandom(64), timeout=10)
            except ConnectionError as err:
                # The channel closes when QEMU exits: report the exit, not the symptom.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exit_wait), 5)
                what = (f"VM exited with {exit_wait.result()}" if exit_wait.done()
                        else f"agent channel closed: {err}")
                raise RunmError(self._boot_failure(what)) from None
            self.kernel_release = setup.kernel_release
        finally:
            probe.cancel()
            exit_wait.cancel()

    def _boot_failure(self, what: str) -> str:
        tail = self.vm.console_tail(15)
        return f"booting VM: {what}" + (f"\nguest console (last lines):\n{tail}" if tail else "")

    async def close(self, timeout: float = 5.0) -> None:
        """Power the guest off (agent first, QEMU quit as fallback) and remove every trace."""
        try:
            if self.agent is not None and not self.vm.exited():
                with contextlib.suppress(Exception):
                    await self.agent.shutdown(timeout=1.0)
                with contextlib.suppress(TimeoutError, VMError):
                    await asyncio.wait_for(self.vm.wait_exit(), timeout)
            await self.vm.stop(timeout)
        finally:
            self.vm.kill()
            if self.mux is not None:
                with contextlib.suppress(Exception):
                    await self.mux.aclose()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self._client.aclose()
            self.vm.remove_run_dir()
