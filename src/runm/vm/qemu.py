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
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from runm.vm.accel import choose_accelerator
from runm.vm.base import VirtualMachine, VMConfig, VMError

log = logging.getLogger("runm.vm")

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")
# Measured (guest-spike FACTS §2): these save ~0.4 s of a TCG boot.
FAST_KERNEL_ARGS = [
    "console=ttyS0", "quiet", "panic=-1", "tsc=reliable", "no_timer_check",
    "cryptomgr.notests", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
    "8250.nr_uarts=1", "random.trust_cpu=on", "runm.root=/dev/vda",
]
HOTPLUG_ROOT_PORTS = 2  # reserved for shares plugged after a snapshot restore
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


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when its parent dies (checked against a fork race)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def _spawn(argv: Sequence[str], pass_fds: Sequence[int],
           stderr_path: Path) -> subprocess.Popen[bytes]:
    parent = os.getpid()
    with open(stderr_path, "ab") as err:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            pass_fds=tuple(pass_fds), start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )


class QemuVM(VirtualMachine):
    def __init__(self, config: VMConfig) -> None:
        super().__init__(config)
        self.run_dir = config.run_dir
        self.accel = ""
        self._qemu: subprocess.Popen[bytes] | None = None
        self._helpers: list[subprocess.Popen[bytes]] = []
        self._exit: asyncio.Future[int] | None = None
        self._qmp: object | None = None

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
        return self._qemu.pid if self._qemu else 0

    def helper_pids(self) -> list[int]:
        return [p.pid for p in self._helpers]

    # -- lifecycle ---------------------------------------------------------------------

    def build_argv(self, accel: str, fds: dict[str, int]) -> list[str]:
        c = self.config
        mem = f"{c.memory_mib}M"
        argv = [
            qemu_binary(), "-name", c.name, "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-accel", accel, "-smp", str(c.cpus), "-m", mem,
            # virtiofs needs guest RAM the vhost-user daemon can map (share=on)
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
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
            "-device", "virtio-serial-pci,id=vs0",
        ]
        if accel.startswith("kvm"):
            argv += ["-cpu", "host"]
        for i, name in enumerate(c.ports):
            argv += ["-chardev", f"socket,id=port{i},fd={fds[name]},server=on,wait=off",
                     "-device", f"virtserialport,bus=vs0.0,chardev=port{i},name={name}"]
        for i, share in enumerate(c.shares):
            argv += ["-chardev", f"socket,id=fs{i},path={self._virtiofsd_socket(i)}",
                     "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={share.tag},queue-size=1024"]
        for i in range(HOTPLUG_ROOT_PORTS):
            argv += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}"]
        return argv

    def _virtiofsd_socket(self, index: int) -> Path:
        return self.run_dir / f"fs{index}.sock"

    async def start(self) -> None:
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
        try:
            fds: dict[str, int] = {}
            for key, path in [("qmp", self.qmp_path),
                              *((name, self.port_path(name)) for name in c.ports)]:
                sock = _listen(path)
                sockets.append(sock)
                fds[key] = sock.fileno()
            if c.shares:
                virtiofsd = virtiofsd_binary()
            for i, share in enumerate(c.shares):
                sock = _listen(self._virtiofsd_socket(i))
                sockets.append(sock)
                argv = [virtiofsd, f"--fd={sock.fileno()}", "-o", f"source={share.host_path}",
                        "-o", "cache=auto", "-o", "announce_submounts"]
                self._helpers.append(_spawn(argv, [sock.fileno()],
                                            self.run_dir / f"virtiofsd{i}.log"))
            self._qemu = _spawn(self.build_argv(self.accel, fds), list(fds.values()),
                                self.stderr_path)
        except BaseException:
            self.kill()
            raise
        finally:
            for sock in sockets:
                sock.close()
        self._exit = _watch_exit(self._qemu)
        log.debug("qemu pid=%d accel=%s", self._qemu.pid, self.accel)

    def exited(self) -> bool:
        return self._exit is not None and self._exit.done()

    async def wait_exit(self) -> int:
        if self._exit is None:
            raise VMError("VM was not started")
        return await asyncio.shield(self._exit)

    async def qmp(self, command: str, **arguments: object) -> object:
        from qemu.qmp import QMPClient

        if self._qmp is None:
            client = QMPClient(self.config.name)
            await client.connect(str(self.qmp_path))
            self._qmp = client
        return await self._qmp.execute(command, arguments or None)  # type: ignore[attr-defined]

    async def stop(self, timeout: float = 5.0) -> None:
        if self._qemu is None:
            return
        if not self.exited():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp("quit"), timeout)
            try:
                await asyncio.wait_for(self.wait_exit(), timeout)
            except TimeoutError:
                log.warning("qemu pid=%d did not quit in %.0fs: killing it", self.pid, timeout)
        await self._close_qmp()
        self.kill()
        await self._reap_helpers(timeout)

    async def _close_qmp(self) -> None:
        client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()  # type: ignore[attr-defined]

    async def _reap_helpers(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        for helper in self._helpers:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, helper.wait), timeout)
            except TimeoutError:
                helper.kill()
                await loop.run_in_executor(None, helper.wait)

    def kill(self) -> None:
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
