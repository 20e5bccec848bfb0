"""The QEMU backend: q35 + direct vmlinux (PVH) boot, virtio devices, QMP control.

Every socket QEMU or virtiofsd serves is bound by us first and handed over as an fd, so the
host can connect the moment the process exists - no polling for socket files. Children run
in their own session (a terminal's Ctrl-C goes to runm, which forwards it to the container,
not to QEMU) with PR_SET_PDEATHSIG=SIGKILL, so they die with their owner even when the owner
is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from runm.proto import network
from runm.vm.accel import choose_accelerator
from runm.vm.base import Share, SnapshotFiles, TapNic, VirtualMachine, VMConfig, VMError
from runm.vm.qmp import QmpClient

log = logging.getLogger("runm.vm")

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")
# Measured (guest-spike FACTS §2): these save ~0.4 s of a TCG boot.
FAST_KERNEL_ARGS = [
    "console=ttyS0", "quiet", "panic=-1", "tsc=reliable", "no_timer_check",
    "cryptomgr.notests", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
    "8250.nr_uarts=1", "random.trust_cpu=on", "runm.root=/dev/vda",
]
# PCIe root ports reserved at boot so a restored snapshot can take this many virtiofs shares.
HOTPLUG_ROOT_PORTS = 8
TAP_NETDEV = "callernet"  # QEMU's id of the caller's network (netdev, its fd, the NIC)
NINEP_ID = "share9p"  # QEMU's id of a clone's 9p export (its fsdev and its device)
NINEP_TAG = "runm9p"  # the export's mount tag in the guest
MIGRATION_TIMEOUT = 30.0
UNPLUG_TIMEOUT = 10.0  # device_del needs the guest's consent (ACPI eject): ~0.1 s under TCG
_ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[@-Z\\-_])")


def qemu_binary() -> str:
    machine = os.uname().machine
    name = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}.get(
        machine, f"qemu-system-{machine}")
    path = shutil.which(name)
    if path is None:
        raise VMError(f"{name} not found: install qemu-system-x86 (QEMU is not installed)")
    return path


def virtiofsd_binary() -> str:
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("virtiofsd")
    if found is None:
        raise VMError("virtiofsd not found: install qemu-system-common (or virtiofsd)")
    return found


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: SIGKILL the child when this process dies (checked against a fork race).
    ctypes is loaded here, in the parent, and only by the paths that start processes."""
    from runm.libc import libc

    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def _spawn(argv: Sequence[str], pass_fds: Sequence[int], stderr_path: Path,
           own_mounts: bool = False) -> subprocess.Popen[bytes]:
    """Start a helper or QEMU; own_mounts: in a mount namespace of its own (nsmount)."""
    die_with_parent = _die_with_parent()
    new_namespace: Callable[[], None] | None = None
    if own_mounts:
        from runm.vm import nsmount  # ctypes: only on the paths that need it

        new_namespace = nsmount.new_namespace

    def preexec() -> None:
        die_with_parent()
        if new_namespace is not None:
            new_namespace()

    with open(stderr_path, "ab") as err:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            pass_fds=tuple(pass_fds), start_new_session=True,
            preexec_fn=preexec,
        )


class QemuVM(VirtualMachine):
    def __init__(self, config: VMConfig) -> None:
        super().__init__(config)
        self.run_dir = config.run_dir
        self.accel = ""
        self._qemu: subprocess.Popen[bytes] | None = None
        self._helpers: list[subprocess.Popen[bytes]] = []
        self._exit: asyncio.Future[int] | None = None
        self._qmp: QmpClient | None = None
        self._adopted: int = 0  # pid of a QEMU started by another process (a pool keeper)
        self._adopted_pidfd = -1
        self._hotplugged = 0  # reserved root ports in use
        self._ram_filled: asyncio.Future[None] | None = None  # a restore's RAM copy

    # -- paths -------------------------------------------------------------------------

    def port_path(self, name: str) -> Path:
        return self.run_dir / f"{name.replace('.', '-')}.sock"

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pid(self) -> int:
        return self._qemu.pid if self._qemu else self._adopted

    def helper_pids(self) -> list[int]:
        return [p.pid for p in self._helpers]

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def export_dir(self) -> Path:
        """A clone's 9p export: every share is a bind mount here, in QEMU's namespace."""
        return self.run_dir / "9p"

    def _memory_backend(self, fds: dict[str, int]) -> list[str]:
        """Guest RAM. virtiofs needs RAM the vhost-user daemon can map: share=on always,
        except in a clone, which maps the snapshot's file copy-on-write (share=off)."""
        c = self.config
        size = f"size={c.memory_mib}M"
        if c.restore is not None:  # the snapshot's RAM or a private copy, passed as an fd
            share = "off" if c.clone else "on"
            return ["-object", f"memory-backend-file,id=mem,{size},"
                    f"mem-path=/proc/self/fd/{fds['ram']},share={share}", "-incoming", "defer"]
        if c.memory_file is not None:
            return ["-object", f"memory-backend-file,id=mem,{size},mem-path={c.memory_file},"
                    "share=on"]
        return ["-object", f"memory-backend-memfd,id=mem,{size},share=on"]

    def machine_signature(self, accel: str) -> str:
        """The VM's devices and boot parameters, without RAM backing, run paths or fds: a
        snapshot restores only into a VM whose signature equals the one it was taken from."""
        fds = {name: 0 for name in ("qmp", "ram", *self.config.ports)}
        argv = self._argv(accel, fds, shares=[])
        return " ".join(argv).replace(str(self.run_dir), "$RUN")

    def build_argv(self, accel: str, fds: dict[str, int]) -> list[str]:
        c = self.config
        # A restored guest gets its shares hot-plugged: its devices must be the template's.
        shares = [] if c.restore is not None else c.shares
        binary, *rest = self._argv(accel, fds, shares)
        if c.tap is not None and c.restore is None:  # a restored guest gets it hot-plugged
            rest += ["-netdev", f"tap,id={TAP_NETDEV},fd={fds['tap']}",
                     "-device", f"virtio-net-pci,netdev={TAP_NETDEV},mac={c.tap.mac},romfile="]
        if self.is_clone:  # the export only: its device is hot-plugged after the restore
            rest += ["-fsdev", f"local,id={NINEP_ID},path={self.export_dir},"
                               "security_model=passthrough,multidevs=remap"]
        return [binary, "-name", c.name, *rest, *self._memory_backend(fds)]

    def _argv(self, accel: str, fds: dict[str, int], shares: list[Share]) -> list[str]:
        c = self.config
        mem = f"{c.memory_mib}M"
        argv = [
            qemu_binary(), "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-accel", accel, "-smp", str(c.cpus), "-m", mem,
            "-machine", "q35,memory-backend=mem",
            "-kernel", str(c.kernel), "-initrd", str(c.initrd),
            "-append", " ".join([*FAST_KERNEL_ARGS, *c.kernel_args]),
            "-chardev", f"file,id=con0,path={self.console_path}",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=qmp0,fd={fds['qmp']},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-drive", f"file={c.rootfs},format=raw,if=none,id=root0,readonly=on",
            "-device", "virtio-blk-pci,drive=root0,id=rootdisk",
            "-device", "virtio-rng-pci",
            "-device", "virtio-balloon-pci,free-page-reporting=on",
            # User-mode networking (slirp, in QEMU's process): NAT to the host, DNS through
            # the host's resolver, ports published with hostfwd_add at run time.
            "-netdev", f"user,id=net0,net={network.GUEST_NETWORK},host={network.GATEWAY},"
                       f"dns={network.DNS},ipv6=off",
            "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile=",
            "-device", "virtio-serial-pci,id=vs0",
        ]
        if accel.startswith("kvm"):
            argv += ["-cpu", "host"]
        for i, name in enumerate(c.ports):
            argv += ["-chardev", f"socket,id=port{i},fd={fds[name]},server=on,wait=off",
                     "-device", f"virtserialport,bus=vs0.0,chardev=port{i},name={name}"]
        for i, share in enumerate(shares):
            argv += ["-chardev", f"socket,id=fs{i},path={self._virtiofsd_socket(i)}",
                     "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={share.tag},queue-size=1024"]
        for i in range(HOTPLUG_ROOT_PORTS):
            argv += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}"]
        return argv

    @property
    def is_clone(self) -> bool:
        return self.config.clone and self.config.restore is not None

    def _virtiofsd_socket(self, index: int) -> Path:
        return self.run_dir / f"fs{index}.sock"

    async def start(self, connect: Callable[[], Awaitable[None]] | None = None) -> None:
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (self.console_path, self.stderr_path):
            path.write_bytes(b"")
        if c.accel:
            self.accel = c.accel
        else:
            self.accel = await asyncio.get_running_loop().run_in_executor(
                None, choose_accelerator, c.kernel)
        sockets: list[socket.socket] = []
        ram_fd = -1
        try:
            fds: dict[str, int] = {}
            for key, path in [("qmp", self.qmp_path),
                              *((name, self.port_path(name)) for name in c.ports)]:
                sock = _listen(path)
                sockets.append(sock)
                fds[key] = sock.fileno()
            if c.tap is not None and c.restore is None:
                fds["tap"] = c.tap.fd
            if self.is_clone:
                assert c.restore is not None
                ram_fd = fds["ram"] = snapshot_ram(c.restore.ram, c.memory_mib << 20)
                self.export_dir.mkdir(mode=0o700, exist_ok=True)
            elif c.restore is not None:
                ram_fd = fds["ram"] = empty_ram_copy(c.restore.ram, c.memory_mib << 20)
            else:
                for i, share in enumerate(c.shares):
                    self._start_virtiofsd(i, share)
            self._qemu = _spawn(self.build_argv(self.accel, fds), list(fds.values()),
                                self.stderr_path, own_mounts=self.is_clone)
        except BaseException:
            self.kill()
            if ram_fd >= 0:
                os.close(ram_fd)
            raise
        finally:
            for sock in sockets:
                sock.close()
        if self.is_clone:
            os.close(ram_fd)  # QEMU has its own
        elif c.restore is not None:
            # The copy fills while QEMU starts (~0.1 s of each): with `-incoming defer` QEMU
            # writes no guest RAM and the guest runs only after migrate-incoming, which
            # _restore issues once the copy is complete.
            self._ram_filled = asyncio.get_running_loop().run_in_executor(
                None, _fill_and_close, ram_fd, c.restore.ram)
            # Retrieved by _restore; if QEMU fails first, nobody asks, and that is no news.
            self._ram_filled.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._exit = _watch_exit(self._qemu)
        log.debug("qemu pid=%d accel=%s", self._qemu.pid, self.accel)
        restore = c.restore
        await self._bring_up(None if restore is None else lambda: self._restore(restore),
                             connect)

    async def attach(self, qemu_pid: int) -> None:
        """Take over a restored QEMU another process started in our run dir (a pool member):
        make sure it runs (`cont`) and hot-plug our shares. Its exit code cannot be known (not our
        child): wait_exit() gives -1."""
        self._adopted = qemu_pid
        self._adopted_pidfd = os.pidfd_open(qemu_pid)
        self._exit = _watch_pidfd(self._adopted_pidfd, self._forget_adopted)
        self.accel = self.config.accel or ""
        if self.is_clone:
            self._hotplugged = 1  # its keeper plugged the 9p device (_bring_up)
        await self._bring_up(lambda: self.qmp("cont"))

    async def _bring_up(self, resume: Callable[[], Awaitable[object]] | None,
                        connect: Callable[[], Awaitable[None]] | None = None) -> None:
        """Once QEMU runs: `connect` the host's ports, `resume` a VM that did not boot here
        (restore it, or let an adopted one run), then hot-plug the shares it did not boot
        with, then publish the ports. Any failure kills the VM.

        A restored guest's ports are connected before its device state loads: the snapshot
        was saved with its host connected, so the guest sees no close and reopen of its
        ports (in some snapshots QEMU 7.2 then lost the host's first request on every
        restore)."""
        try:
            if connect is not None:
                await connect()
            if resume is not None:
                await resume()
                if self.is_clone and not self._hotplugged:
                    await self._hotplug_9p()
                for share in self.config.shares:
                    await self._hotplug_share(share)
                if self.config.tap is not None:
                    await self._hotplug_tap(self.config.tap)
            await self._forward_ports()
        except BaseException:
            await self.close_qmp()
            self.kill()
            raise

    def _forget_adopted(self) -> None:
        os.close(self._adopted_pidfd)
        self._adopted_pidfd = -1

    def _start_virtiofsd(self, index: int, share: Share) -> None:
        sock = _listen(self._virtiofsd_socket(index))
        try:
            argv = [virtiofsd_binary(), f"--fd={sock.fileno()}",
                    "-o", f"source={share.host_path}", "-o", "cache=auto",
                    "-o", "announce_submounts"]
            self._helpers.append(_spawn(argv, [sock.fileno()],
                                        self.run_dir / f"virtiofsd{index}.log"))
        finally:
            sock.close()

    async def _forward_ports(self) -> None:
        for forward in self.config.publish:
            rule = (f"{forward.protocol}:{forward.host_ip}:{forward.host_port}"
                    f"-:{forward.guest_port}")
            out = await self.qmp("human-monitor-command",
                                 **{"command-line": f"hostfwd_add net0 {rule}"})
            if isinstance(out, str) and out.strip():
                raise VMError(f"publishing {forward}: {out.strip()}")

    async def add_share(self, share: Share) -> None:
        """Share one more directory with the running guest (it still has to mount it)."""
        self.config.shares.append(share)
        try:
            await self._hotplug_share(share)
        except BaseException:
            self.config.shares.remove(share)
            raise

    async def remove_share(self, share: Share) -> None:
        """Unplug the last hot-plugged share (the guest has unmounted it) and end its
        virtiofsd (in a clone: unbind it from the 9p export): the VM is as before add_share."""
        if self.is_clone:
            from runm.vm import nsmount

            await self._run_sync(nsmount.unmount_in, self.pid, self.export_dir / share.tag)
            (self.export_dir / share.tag).rmdir()
            self.config.shares.remove(share)
            return
        index = self.config.shares.index(share)
        if index != len(self.config.shares) - 1 or not self._hotplugged:
            raise VMError(f"{share.host_path}: only the last hot-plugged share can be removed")
        client = self._qmp
        assert client is not None
        with client.listen("DEVICE_DELETED") as deleted:
            await self.qmp("device_del", id=f"fsdev{index}")

            async def gone() -> None:
                while (await deleted.get()).get("data", {}).get("device") != f"fsdev{index}":
                    pass
            try:
                await asyncio.wait_for(gone(), UNPLUG_TIMEOUT)
            except TimeoutError:
                raise VMError(f"the guest did not release {share.host_path} within "
                              f"{UNPLUG_TIMEOUT:.0f}s") from None
        await self.qmp("chardev-remove", id=f"fs{index}")
        helper = self._helpers.pop()  # started by _hotplug_share, in order
        await self._reap_helper(helper, 5.0)  # it exits once QEMU hangs up
        self.config.shares.remove(share)
        self._hotplugged -= 1

    async def _hotplug_share(self, share: Share) -> None:
        """Attach a virtiofs share (one of config.shares) to the running guest, into the next
        free reserved root port; in a clone, bind it into the 9p export."""
        if self.is_clone:
            from runm.vm import nsmount

            target = self.export_dir / share.tag
            target.mkdir(mode=0o700)
            try:
                await self._run_sync(nsmount.bind_into, self.pid, share.host_path, target,
                                     share.readonly)
            except OSError as err:
                target.rmdir()
                raise VMError(f"sharing {share.host_path}: {err.strerror}") from None
            return
        index = self.config.shares.index(share)
        bus = self._free_root_port("shares")
        self._start_virtiofsd(index, share)
        address = {"type": "unix", "data": {"path": str(self._virtiofsd_socket(index))}}
        await self.qmp("chardev-add", id=f"fs{index}",
                       backend={"type": "socket", "data": {"addr": address, "server": False}})
        await self.qmp("device_add", driver="vhost-user-fs-pci", id=f"fsdev{index}",
                       chardev=f"fs{index}", tag=share.tag, bus=bus,
                       **{"queue-size": 1024})
        self._hotplugged += 1

    def _free_root_port(self, what: str) -> str:
        """The bus of the next free reserved root port (taken once the device is added)."""
        if self._hotplugged >= HOTPLUG_ROOT_PORTS:
            raise VMError(f"cannot hot-plug more than {HOTPLUG_ROOT_PORTS} {what}")
        return f"hp{self._hotplugged}"

    async def _hotplug_9p(self) -> None:
        """Plug a clone's 9p device (its export is on the command line) into the first
        reserved root port; the shares are bind mounts in its export from then on."""
        await self.qmp("device_add", driver="virtio-9p-pci", id=NINEP_ID, fsdev=NINEP_ID,
                       mount_tag=NINEP_TAG, bus=self._free_root_port("devices"))
        self._hotplugged += 1

    @staticmethod
    async def _run_sync(func: Callable[..., None], *args: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, func, *args)

    async def _hotplug_tap(self, tap: TapNic) -> None:
        """Attach the tap NIC to the running guest, into the next free reserved root port."""
        bus = self._free_root_port("devices")
        await self.qmp_passing([tap.fd], "getfd", fdname=TAP_NETDEV)
        await self.qmp("netdev_add", type="tap", id=TAP_NETDEV, fd=TAP_NETDEV)
        await self.qmp("device_add", driver="virtio-net-pci", id=f"{TAP_NETDEV}nic",
                       netdev=TAP_NETDEV, mac=tap.mac, bus=bus, romfile="")
        self._hotplugged += 1

    async def _migration(self, command: str, uri: str) -> None:
        """Run `migrate` or `migrate-incoming` (guest RAM excluded) and wait for it to finish."""
        await self.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True}])
        client = self._qmp
        assert client is not None
        exited = self._exit
        assert exited is not None
        with client.listen("MIGRATION") as listener:
            await self.qmp(command, uri=uri)

            async def finished() -> str:
                while True:
                    event: Any = await listener.get()
                    status = str(event["data"]["status"])
                    if status in ("completed", "failed", "cancelled"):
                        return status

            done = asyncio.ensure_future(finished())
            try:
                waiters: list[asyncio.Future[Any]] = [done, exited]
                await asyncio.wait(waiters, timeout=MIGRATION_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                done.cancel()
            if exited.done():
                raise VMError(f"qemu exited with {exited.result()} during {command}: "
                              f"{self.console_tail(3)}")
            if not done.done() or done.cancelled():
                raise VMError(f"{command} did not finish within {MIGRATION_TIMEOUT:.0f}s")
            if done.result() != "completed":
                raise VMError(f"{command} {done.result()}: {self.console_tail(3)}")

    async def _restore(self, snapshot: SnapshotFiles) -> None:
        if self._ram_filled is not None:
            try:
                await self._ram_filled
            except OSError as err:
                raise VMError(f"copying the snapshot RAM: {err}") from None
        await self._migration("migrate-incoming", f"exec:cat {shlex.quote(str(snapshot.state))}")
        await self.qmp("cont")

    async def save_snapshot(self, state: Path) -> None:
        """Stop the guest and write its device state to `state`; RAM stays in memory_file."""
        if self.config.memory_file is None:
            raise VMError("only a VM booted with a memory file can be snapshotted")
        await self.qmp("stop")
        await self._migration("migrate", f"exec:cat > {shlex.quote(str(state))}")

    def exited(self) -> bool:
        return self._exit is not None and self._exit.done()

    async def wait_exit(self) -> int:
        if self._exit is None:
            raise VMError("VM was not started")
        return await asyncio.shield(self._exit)

    async def qmp(self, command: str, **arguments: object) -> Any:
        """Run a QMP command (connecting first if needed); its errors are VMErrors."""
        return await self.qmp_passing((), command, **arguments)

    async def qmp_passing(self, fds: Sequence[int], command: str, **arguments: object) -> Any:
        """qmp(), passing QEMU `fds` along with the command."""
        if self._qmp is None:
            client = QmpClient()
            await client.connect(str(self.qmp_path))
            self._qmp = client
        return await self._qmp.execute(command, arguments or None, fds=fds)

    async def stop(self, timeout: float = 5.0) -> None:
        if self._qemu is None and not self._adopted:
            return
        if not self.exited():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp("quit"), timeout)
            try:
                await asyncio.wait_for(self.wait_exit(), timeout)
            except TimeoutError:
                log.warning("qemu pid=%d did not quit in %.0fs: killing it", self.pid, timeout)
        await self.close_qmp()
        self.kill()
        await self._reap_helpers(timeout)

    async def close_qmp(self) -> None:
        """Disconnect from QMP (it serves one client at a time)."""
        client, self._qmp = self._qmp, None
        if client is not None:
            await client.disconnect()

    async def _reap_helpers(self, timeout: float) -> None:
        for helper in self._helpers:
            await self._reap_helper(helper, timeout)

    @staticmethod
    async def _reap_helper(helper: subprocess.Popen[bytes], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, helper.wait), timeout)
        except TimeoutError:
            helper.kill()
            await loop.run_in_executor(None, helper.wait)

    def kill(self) -> None:
        if self._adopted_pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._adopted_pidfd, signal.SIGKILL)
            select.select([self._adopted_pidfd], [], [], 5)  # readable once it has exited
        for proc in [*( [self._qemu] if self._qemu else []), *self._helpers]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if self._qemu is not None:
            with contextlib.suppress(Exception):
                self._qemu.wait(5)
        for helper in self._helpers:
            with contextlib.suppress(Exception):
                helper.wait(5)

    def console_tail(self, lines: int = 20) -> str:
        parts: list[str] = []
        for path in (self.console_path, self.stderr_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            text = _ANSI_ESCAPE.sub("", text)
            parts.extend(line for line in text.splitlines() if line.strip())
        return "\n".join(parts[-lines:])

    def remove_run_dir(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every data extent of a sparse file, in order (holes skipped)."""
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def _check_ram_size(path: Path, size: int) -> None:
    actual = os.stat(path).st_size
    if actual != size:
        raise VMError(f"snapshot RAM {path} is {actual} bytes, expected {size}")


def snapshot_ram(path: Path, size: int) -> int:
    """An fd of the snapshot's RAM file itself, for a clone: QEMU maps it privately and never
    writes to it (free page reporting, which would punch holes in it, is off in clones)."""
    _check_ram_size(path, size)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def empty_ram_copy(path: Path, size: int) -> int:
    """The memfd for a private copy of the snapshot RAM file at path, sized but not filled yet
    (fill_ram_copy does that; holes stay holes). A restored guest writes to its own pages,
    never to the snapshot, while virtiofsd can still map them. QEMU may map the memfd and
    start while it fills, as long as the guest does not run before."""
    _check_ram_size(path, size)
    fd = os.memfd_create("runm-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fill_ram_copy(fd: int, path: Path) -> None:
    """Copy the data extents of the RAM file at path into fd at the same offsets."""
    with open(path, "rb") as src:
        in_fd = src.fileno()
        for start, end in data_extents(in_fd):
            os.lseek(fd, start, os.SEEK_SET)
            while start < end:
                sent = os.sendfile(fd, in_fd, start, end - start)
                if sent == 0:
                    raise VMError(f"snapshot RAM {path}: short read at {start}")
                start += sent


def _fill_and_close(fd: int, path: Path) -> None:
    try:
        fill_ram_copy(fd, path)
    finally:
        os.close(fd)  # QEMU has its own reference


def _watch_pidfd(pidfd: int, closed: Callable[[], None]) -> asyncio.Future[int]:
    """A future resolved with -1 when the (non-child) process behind pidfd exits; `closed`
    is called then, to close the pidfd."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        closed()
        if not fut.done():
            fut.set_result(-1)

    loop.add_reader(pidfd, on_exit)
    return fut


def _watch_exit(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future resolved with proc's exit code, driven by a pidfd (no child watcher thread)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = proc.wait()
        if not fut.done():
            fut.set_result(code)

    loop.add_reader(pidfd, on_exit)
    return fut
