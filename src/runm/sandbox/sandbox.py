"""One VM with its agent connection and stdio mux: boot to agent-ready, and tear down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from runm.channel.mux import Mux
from runm.channel.stream import AsyncioByteStream
from runm.errors import RunmError
from runm.guest.image import GuestImage
from runm.net import callernet
from runm.net.callernet import CallerNetwork
from runm.proto import agent as api
from runm.sandbox.agent_client import AgentClient
from runm.sandbox.config import default_cpus, load_config
from runm.sandbox.rundir import run_base, vm_run_dir
from runm.sandbox.snapshot import discard_snapshot, ensure_snapshot, snapshots_enabled
from runm.ttrpc import Client, TtrpcError
from runm.vm.accel import choose_accelerator
from runm.vm.base import (
    CTL_PORT,
    IO_PORT,
    PortForward,
    Share,
    SnapshotFiles,
    TapNic,
    VMConfig,
    VMError,
)
from runm.vm.qemu import HOTPLUG_ROOT_PORTS, NINEP_TAG, QemuVM

log = logging.getLogger("runm.sandbox")

RESTORE_TIMEOUT = 10.0  # a restored agent answers in ~0.1 s; past this, boot cold instead
# A restored agent answers in 0.2-0.3 s here (more on a busy host). QEMU 7.2 sometimes loses
# the first request's notification after a restore (the guest then never sees it); a second
# request gets through. Asking again early is cheap: a duplicate probe is harmless.
RESTORE_ASK_AGAIN = 0.4
NINEP_ROOT = "/run/runm-9p"  # where a clone's guest mounts its 9p export
# 9p's virtio transport carries at most ~512 KiB per message; cache=mmap: no caching but
# of mmap'd pages (shared writable mmap works), so every write reaches the host at once.
NINEP_OPTIONS = ["trans=virtio", "version=9p2000.L", "msize=512000", "cache=mmap"]


def boot_timeout() -> float:
    return float(os.environ.get("RUNM_BOOT_TIMEOUT", "90"))


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


async def wait_agent(vm: QemuVM, agent: AgentClient, timeout: float,
                     ask_again_after: float = 0.0, report_free_pages: bool = True) -> str:
    """Wait for the agent's first answer, then give it the clock and fresh entropy (a
    restored guest has the snapshot's); return the guest's kernel release.

    Requests sent before the guest opens its port wait in the socket (QEMU reads the
    chardev only once the port is open), so one probe suffices for a boot; the clock goes
    in a second call because the probe may have waited for the whole boot. A restored guest
    answers within a second even on a busy host: with ask_again_after, one that has not by
    then is asked again, since a second request makes QEMU notify the guest's port again
    should the first notification have been lost (seen with QEMU 7.2 around `stop`/`cont` of
    pooled VMs, and once in 16 restores beside a pool refill). report_free_pages: see
    SetupRequest (off in page-sharing clones).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    probes = [asyncio.ensure_future(agent.setup(0, b""))]
    exit_wait = asyncio.ensure_future(vm.wait_exit())
    try:
        while True:
            left = deadline - loop.time()
            step = min(left, ask_again_after) if ask_again_after > 0 else left
            done, _ = await asyncio.wait({*probes, exit_wait}, timeout=max(step, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if exit_wait in done:
                raise RunmError(_boot_failure(vm, f"VM exited with {exit_wait.result()}"))
            answered = [probe for probe in probes if probe in done]
            if answered:
                break
            if loop.time() >= deadline:
                raise RunmError(_boot_failure(
                    vm, f"guest agent did not answer within {timeout:.0f}s"))
            # info, not a warning: stderr of `runm run` is the container's too, and this is
            # recovered from (--log files and --debug show it)
            log.info("guest agent of %s has not answered after %.1fs: asking again",
                     vm.config.name, timeout - left + step)
            probes.append(asyncio.ensure_future(agent.setup(0, b"")))
            ask_again_after = 0.0  # once: past that, it is the guest, not a notification
        try:
            answered[0].result()
            setup = await agent.setup(time.time_ns(), os.urandom(64), timeout=10,
                                      report_free_pages=report_free_pages)
        except ConnectionError as err:
            # The channel closes when QEMU exits: report the exit, not the symptom.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_wait), 5)
            what = (f"VM exited with {exit_wait.result()}" if exit_wait.done()
                    else f"agent channel closed: {err}")
            raise RunmError(_boot_failure(vm, what)) from None
        return setup.kernel_release
    finally:
        for probe in probes:
            probe.cancel()
        exit_wait.cancel()


def _boot_failure(vm: QemuVM, what: str) -> str:
    tail = vm.console_tail(15)
    return f"booting VM: {what}" + (f"\nguest console (last lines):\n{tail}" if tail else "")


async def prepare_snapshot(image: GuestImage,
                           progress: Callable[[str], None] | None = None) -> bool:
    """Make the snapshot a default-sized VM starts from, unless there is one already (or
    snapshots are off); False if it could not be made (starts will boot cold)."""
    sandbox = Sandbox.create("runm-template", image, vm_run_dir(Path("/"), "template"), [])
    sandbox.progress = progress
    return await sandbox.snapshot(Timings()) is not None


class Sandbox:
    def __init__(self, vm: QemuVM, shares: list[Share], image: GuestImage | None = None,
                 caller_net: CallerNetwork | None = None) -> None:
        self.vm = vm
        self.shares = shares
        self.image = image
        self.caller_net = caller_net  # the network namespace the caller made, brought in
        self._tap_fd = -1  # the tap in the caller's namespace, while this sandbox has it
        self.agent: AgentClient | None = None
        self.mux: Mux | None = None
        self._client: Client | None = None
        self._ctl: AsyncioByteStream | None = None
        self.kernel_release = ""
        self.restored = False  # started from a snapshot rather than a cold boot
        self.pooled = False  # taken from the warm pool (restored and warmed up in advance)
        self._refill_due = False  # this start asked the pool for a member: see refill_pool
        self._export_mounted = False  # a clone's 9p export is mounted in the guest
        self.progress: Callable[[str], None] | None = None

    @classmethod
    def create(cls, name: str, image: GuestImage, run_dir: Path, shares: list[Share],
               memory_mib: int = 0, cpus: int = 0,
               publish: list[PortForward] | None = None,
               caller_net: CallerNetwork | None = None) -> Sandbox:
        """A sandbox for a VM of the given size (0: the config file's default size)."""
        if not memory_mib or not cpus:
            defaults = load_config().vm
            memory_mib = memory_mib or defaults.memory_mib
            cpus = cpus or defaults.cpus or default_cpus()
        config = VMConfig(name=name, kernel=image.kernel, initrd=image.initrd,
                          rootfs=image.rootfs, run_dir=run_dir, memory_mib=memory_mib,
                          cpus=cpus, shares=shares, publish=list(publish or []))
        return cls(QemuVM(config), shares, image, caller_net)

    async def boot(self, timings: Timings | None = None) -> None:
        """Start the VM and return once the agent answers and the shares are mounted.

        From a snapshot of a booted guest when possible (made on first use); a cold boot
        when there is none to be had or restoring fails, with a log line saying why.
        """
        timings = timings or Timings()
        if self.caller_net is not None and self._tap_fd < 0:
            try:
                self._tap_fd = callernet.attach(self.caller_net)
            except RunmError as err:  # a host without tun or tc: still run it, as before
                log.warning("%s: the container gets the VM's own network instead", err)
                callernet.release(self.caller_net)
                self.caller_net = None
            else:
                self.vm.config.tap = TapNic(self._tap_fd, self.caller_net.mac)
        snapshot = await self.snapshot(timings)
        if snapshot is not None and await self._from_pool(timings, snapshot):
            return
        if snapshot is not None:
            began = time.monotonic()
            self.vm.config.clone = load_config().clones
            try:
                await self._start(timings, restore=snapshot)
                self.restored = True
                log.info("VM %s started from snapshot %s%s in %.2fs", self.vm.config.name,
                         snapshot.ram.parent,
                         " as a page-sharing clone" if self.vm.is_clone else "",
                         time.monotonic() - began)
                return
            except (RunmError, VMError, OSError) as err:
                log.warning("restoring VM snapshot %s failed, booting cold instead: %s",
                            snapshot.ram.parent, err)
                await self._reset()
                discard_snapshot(snapshot)
                timings.mark("restore_failed")
        await self._start(timings, restore=None)

    async def _from_pool(self, timings: Timings, snapshot: SnapshotFiles) -> bool:
        """Take a paused, warmed-up guest from the pool, if it has one for this machine."""
        from runm.sandbox import pool

        began = time.monotonic()
        qemu_pid, fds = pool.claim(run_base(), snapshot, self.vm.run_dir)
        try:
            if not qemu_pid:
                return False
            self.vm.config.clone = True  # as the keeper restored it
            await self._start(timings, restore=snapshot, adopt=qemu_pid, adopt_fds=fds)
        except (RunmError, VMError, OSError) as err:
            log.warning("pooled VM %d failed, restoring the snapshot instead: %s", qemu_pid, err)
            await self._reset()
            self.vm.config.clone = False
            return False
        finally:
            self._refill_due = True
        self.restored = self.pooled = True
        log.info("VM %s taken from the pool in %.2fs", self.vm.config.name,
                 time.monotonic() - began)
        return True

    def refill_pool(self) -> None:
        """Refill the pool this start drew on (a no-op if it did not, or did already).

        Called once the container runs, not at the claim: preparing a member is seconds of
        CPU, and even at the lowest priority it slowed this start's `runc run` twofold on a
        2-core host. Keepers are their own processes: this returns at once."""
        if self._refill_due:
            from runm.sandbox import pool

            self._refill_due = False
            pool.refill(run_base())

    async def snapshot(self, timings: Timings) -> SnapshotFiles | None:
        """The snapshot this VM can start from (made now if missing), or None: boot cold."""
        if self.image is None or not snapshots_enabled():
            return None
        devices = len(self.shares) + (self.caller_net is not None)
        if devices > HOTPLUG_ROOT_PORTS:
            log.info("booting cold: %d shares and NICs, a restored VM takes at most %d",
                     devices, HOTPLUG_ROOT_PORTS)
            return None
        loop = asyncio.get_running_loop()
        accel = await loop.run_in_executor(None, choose_accelerator, self.image.kernel)
        self.vm.config.accel = accel
        try:
            return await ensure_snapshot(self.image, self.vm, accel,
                                         self.vm.run_dir.parent, self.progress)
        except (RunmError, OSError) as err:
            log.warning("booting cold: no VM snapshot: %s", err)
            return None
        finally:
            timings.mark("snapshot_check")

    async def start_restored(self, snapshot: SnapshotFiles, stdio: bool = True) -> None:
        """Restore the snapshot and connect to the agent (no fallback: errors are raised)."""
        await self._start(Timings(), restore=snapshot, stdio=stdio)

    async def _start(self, timings: Timings, restore: SnapshotFiles | None, *,
                     adopt: int = 0, adopt_fds: list[int] | None = None,
                     stdio: bool = True) -> None:
        """Boot, restore or (adopt: a pool member's QEMU pid) resume the VM, then connect
        to the agent - or, with adopt_fds, go on with the pool member's connections (the
        guest must not see its host go and come back around a pause: virtio-serial can lose
        that news, and the agent would wait for a host that is there). stdio=False leaves
        the stdio port unconnected."""
        self.vm.config.restore = restore
        what = "taking pooled" if adopt else "restoring" if restore else "starting"
        streams: list[AsyncioByteStream] = []

        async def connect_ports() -> None:
            streams.append(await AsyncioByteStream.connect_unix(
                str(self.vm.port_path(CTL_PORT))))
            if stdio:
                streams.append(await AsyncioByteStream.connect_unix(
                    str(self.vm.port_path(IO_PORT))))

        try:
            if adopt:
                await self.vm.attach(adopt)
                self._export_mounted = self.vm.is_clone  # by the keeper's warm-up
            else:
                await self.vm.start(connect_ports)
        except (VMError, OSError) as err:
            for stream in streams:
                await stream.aclose()
            raise RunmError(f"{what} VM: {err}") from None
        timings.mark("qemu_attach" if adopt else "qemu_restore" if restore else "qemu_start")
        if adopt_fds:
            streams = [await AsyncioByteStream.from_fd(fd) for fd in adopt_fds[:2]]
        self._ctl = streams[0]
        self._client = Client(streams[0])
        self.agent = AgentClient(self._client)
        if stdio:
            self.mux = Mux(streams[1])
            await self.mux.start()
        if restore:
            self.kernel_release = await wait_agent(self.vm, self.agent, RESTORE_TIMEOUT,
                                                   ask_again_after=RESTORE_ASK_AGAIN,
                                                   report_free_pages=not self.vm.is_clone)
        else:
            self.kernel_release = await wait_agent(self.vm, self.agent, boot_timeout())
        timings.mark("agent_ready" if restore else "guest_boot")
        # Hot-plugged shares appear in the guest a little after device_add returns.
        await self.mount_shares(self.shares, int(RESTORE_TIMEOUT * 1000) if restore else 0)
        timings.mark("mount_shares")
        net = self.caller_net
        if net is not None:
            try:
                await self.agent.setup_network(api.NetworkRequest(
                    net.mac, net.mtu, net.addresses, net.routes, int(RESTORE_TIMEOUT * 1000),
                    keep_user_network=bool(self.vm.config.publish)))
            except TtrpcError as err:
                raise RunmError(f"giving the VM the network of {net.netns}: {err}") from None
            timings.mark("caller_network")

    def share_mount(self, share: Share) -> tuple[str, str, list[str]]:
        """How the guest mounts a share: (source, fstype, options). A clone's shares are
        directories of its 9p export (mounted by mount_shares; read-only ones are read-only
        on the host's side already)."""
        if self.vm.is_clone:
            return f"{NINEP_ROOT}/{share.tag}", "none", ["bind"]
        return share.tag, "virtiofs", ["ro"] if share.readonly else []

    async def mount_export(self, wait_ms: int) -> None:
        """A clone's 9p export, at NINEP_ROOT in the guest, once (a pooled guest's warm-up
        mounted it already)."""
        assert self.agent is not None
        if not self.vm.is_clone or self._export_mounted:
            return
        try:
            await self.agent.mount(NINEP_TAG, NINEP_ROOT, "9p", NINEP_OPTIONS, wait_ms)
        except TtrpcError as err:
            raise RunmError(f"mounting the VM's 9p export in the guest: {err}") from None
        self._export_mounted = True

    async def mount_shares(self, shares: list[Share], wait_ms: int) -> None:
        """Mount shares at their guest paths (hot-plugged: wait up to wait_ms for them)."""
        assert self.agent is not None
        if shares:
            await self.mount_export(wait_ms)
        for share in shares:
            source, fstype, options = self.share_mount(share)
            try:
                await self.agent.mount(source, share.guest_path, fstype, options, wait_ms)
            except TtrpcError as err:
                raise RunmError(f"mounting {share.host_path} in the guest: {err}") from None

    async def _reset(self) -> None:
        """Forget a failed start: kill its VM and helpers, close its channels."""
        self.vm.kill()
        await self._close_channels()
        self.vm = QemuVM(self.vm.config)
        self._export_mounted = False

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the VM and remove every trace. Once the agent has answered Shutdown, every
        write has reached the host and the VM is simply killed (a guest power-off under TCG
        takes ~0.2 s); QMP quit, then SIGKILL, if the agent does not answer."""
        self.refill_pool()  # a start that failed before its container ran
        try:
            if self.agent is not None and not self.vm.exited():
                try:
                    await self.agent.shutdown(timeout=5.0)
                except Exception as err:  # no answer: let QEMU quit on its own terms
                    log.debug("agent shutdown: %s", err)
                else:
                    self.vm.kill()
            await self.vm.stop(timeout)
        finally:
            self.vm.kill()
            await self._close_channels()
            self.vm.remove_run_dir()
            self._release_caller_network()

    def _release_caller_network(self) -> None:
        """Close the tap (it goes with QEMU's copy) and give the caller's interface back."""
        net, self.caller_net = self.caller_net, None
        if net is None:
            return
        if self._tap_fd >= 0:
            os.close(self._tap_fd)
            self._tap_fd = -1
            callernet.detach(net)
        else:
            callernet.release(net)

    @property
    def vm_network(self) -> bool:
        """Ports are published, or the VM has the caller's network: the container must use
        the VM's network namespace."""
        return bool(self.vm.config.publish) or self.caller_net is not None

    async def detach(self) -> int:
        """Hand the VM over (a pool member): the agent ends its ttrpc session (its next
        request starts a new one) and QMP is released. Returns a duplicate of the agent
        connection's fd, which stays connected for the next owner.

        The VM is left running (idle), not paused: with QEMU 7.2, a guest paused (QMP
        `stop`) and resumed (`cont`) lost its host's next request in ~13% of hand-overs
        (the agent never got it; a reconnect did), and 0 of 30 when left running."""
        assert self.agent is not None and self._ctl is not None
        await self.agent.quiesce(timeout=10)
        fd = self._ctl.dup_fd()
        await self._close_channels()
        await self.vm.close_qmp()
        return fd

    async def _close_channels(self) -> None:
        mux, client = self.mux, self._client
        self.mux = self._client = None
        self.agent = None
        if mux is not None:
            with contextlib.suppress(Exception):
                await mux.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
