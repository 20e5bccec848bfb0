"""Snapshots of a booted guest, so containers start from a restore instead of a cold boot.

A snapshot is made once per (guest image, QEMU binary, machine: accelerator, memory, cpus,
devices) by booting a template VM with its RAM in a file, waiting for the agent, ending the
agent's connection and saving the device state with x-ignore-shared (the RAM stays in the
file). Restoring copies that file into a private memfd (virtiofs needs shared guest RAM, and
the snapshot must never change) and loads the 0.4 MB device state: ~0.1 s against seconds.

Layout: <image dir>/snapshots/<key>/{ram,state,meta.json}, so a snapshot goes away with its
image. Anything that does not match exactly is ignored, and a snapshot that fails to restore
is removed (the next start makes a new one); correctness never depends on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from runm.channel.stream import AsyncioByteStream
from runm.errors import RunmError
from runm.filelock import hold, open_lock
from runm.guest.image import GuestImage
from runm.sandbox.agent_client import AgentClient
from runm.sha import sha256_hex
from runm.ttrpc import Client
from runm.vm.base import CTL_PORT, SnapshotFiles, VMConfig, VMError
from runm.vm.qemu import QemuVM, data_extents, qemu_binary

log = logging.getLogger("runm.snapshot")

SNAPSHOT_FORMAT = "1"
META_FILE = "meta.json"
# A good snapshot's agent answers a restore's first request in ~0.3 s; in some snapshots QEMU
# 7.2 loses that request on every restore (each start then pays the re-ask, see wait_agent).
# A new snapshot is restored once to tell, and made again if it is such a one.
FIRST_ANSWER_TIMEOUT = 2.0
MAKE_ATTEMPTS = 3


def snapshots_enabled() -> bool:
    """RUNM_SNAPSHOT=0|1 if set (for comparison and debugging), else the config file's
    [snapshot] enabled (default true)."""
    forced = os.environ.get("RUNM_SNAPSHOT")
    if forced is not None:
        return forced != "0"
    from runm.sandbox.config import load_config

    return load_config().snapshots


def snapshots_dir(image: GuestImage) -> Path:
    return image.kernel.parent / "snapshots"


def machine_identity(image: GuestImage, vm: QemuVM, accel: str) -> str:
    """What a snapshot must match: QEMU's build and the machine's exact configuration (the
    image by content: its folder may be linked elsewhere, as `runm bench` does)."""
    qemu = qemu_binary()
    st = os.stat(qemu)
    signature = vm.machine_signature(accel).replace(str(image.kernel.parent), "$IMAGE")
    return "\n".join([SNAPSHOT_FORMAT, f"{qemu} {st.st_size} {st.st_mtime_ns}", signature])


def snapshot_key(identity: str) -> str:
    return sha256_hex(identity.encode())[:16]


def find_snapshot(image: GuestImage, vm: QemuVM, accel: str) -> SnapshotFiles | None:
    """The snapshot this VM can be restored from, if one was made and looks whole."""
    identity = machine_identity(image, vm, accel)
    folder = snapshots_dir(image) / snapshot_key(identity)
    files = SnapshotFiles(ram=folder / "ram", state=folder / "state")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        ram_size = files.ram.stat().st_size
        state_size = files.state.stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("identity") != identity:
        log.info("ignoring snapshot %s: made for another machine", folder)
        return None
    if ram_size != vm.config.memory_mib << 20 or state_size == 0:
        log.info("ignoring snapshot %s: its files are incomplete", folder)
        return None
    return files


def discard_snapshot(files: SnapshotFiles) -> None:
    """Remove a snapshot that failed to restore, so the next start makes a fresh one.

    Restores running from it are unaffected: each holds its own copy of the RAM.
    """
    shutil.rmtree(files.ram.parent, ignore_errors=True)


PAGE = 4096
_ZERO_PAGE = bytes(PAGE)
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def punch_zero_pages(fd: int, chunk: int = 2 << 20) -> int:
    """Turn every all-zero page of the file into a hole; return the bytes freed. Restores
    copy only data extents, so this is RAM (and copy time) saved in every restored VM."""
    from runm.libc import check, libc  # ctypes only here: a start does not need it

    zero_chunk = bytes(chunk)
    runs: list[tuple[int, int]] = []  # (start, end) of zero pages, merged

    def zero(start: int, end: int) -> None:
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))

    for data_start, data_end in data_extents(fd):
        offset = data_start
        while offset < data_end:
            block = os.pread(fd, min(chunk, data_end - offset), offset)
            if block == zero_chunk[:len(block)]:
                zero(offset, offset + len(block))
            else:
                view = memoryview(block)
                for page in range(0, len(block), PAGE):
                    if view[page:page + PAGE] == _ZERO_PAGE[:len(view[page:page + PAGE])]:
                        zero(offset + page, offset + min(page + PAGE, len(block)))
            offset += len(block)
    freed = 0
    for start, end in runs:
        check(libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start,
                             end - start), "punching holes in the snapshot RAM")
        freed += end - start
    return freed


@contextlib.contextmanager
def _lock(path: Path, progress: Callable[[str], None] | None) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with hold(open_lock(path), (lambda: progress("waiting for another runm making the VM "
                                                 "snapshot")) if progress else None):
        yield


async def ensure_snapshot(image: GuestImage, vm: QemuVM, accel: str, run_base: Path,
                          progress: Callable[[str], None] | None = None) -> SnapshotFiles:
    """The snapshot for vm's machine, made now (one cold boot) if there is none yet."""
    found = find_snapshot(image, vm, accel)
    if found is not None:
        return found
    parent = snapshots_dir(image)
    with _lock(parent / ".lock", progress):
        found = find_snapshot(image, vm, accel)
        if found is not None:
            return found
        if progress is not None:
            progress("making a snapshot of a booted guest (once per image and VM size)")
        identity = machine_identity(image, vm, accel)
        final = parent / snapshot_key(identity)
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=parent))
        try:
            for attempt in range(1, MAKE_ATTEMPTS + 1):
                for name in ("ram", "state"):
                    (staging / name).unlink(missing_ok=True)
                await _make_snapshot(image, vm.config, accel, staging, run_base)
                if await _answers_first_request(image, vm.config, accel, staging, run_base):
                    break
                log.info("the new VM snapshot loses the first request of every restore "
                         "(attempt %d of %d)%s", attempt, MAKE_ATTEMPTS,
                         ": making it again" if attempt < MAKE_ATTEMPTS else ": kept")
            (staging / META_FILE).write_text(json.dumps({"identity": identity}))
            staging.chmod(0o755)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("made VM snapshot %s", final)
    return SnapshotFiles(ram=final / "ram", state=final / "state")


def _vm_config(image: GuestImage, like: VMConfig, accel: str, run_base: Path, name: str,
               memory_file: Path | None = None,
               restore: SnapshotFiles | None = None) -> VMConfig:
    """A VM like `like` in a new run dir under run_base, for making or checking a snapshot."""
    run_base.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=run_base))
    return VMConfig(name=f"runm-{name}", kernel=image.kernel, initrd=image.initrd,
                    rootfs=image.rootfs, run_dir=run_dir, memory_mib=like.memory_mib,
                    cpus=like.cpus, ports=like.ports, kernel_args=list(like.kernel_args),
                    accel=accel, memory_file=memory_file, restore=restore)


async def _answers_first_request(image: GuestImage, like: VMConfig, accel: str, folder: Path,
                                 run_base: Path) -> bool:
    """Restore the snapshot in folder once, its ports connected as a start connects them:
    does the agent answer the first request?"""
    config = _vm_config(image, like, accel, run_base, "snapshot-check",
                        restore=SnapshotFiles(ram=folder / "ram", state=folder / "state"))
    vm = QemuVM(config)
    streams: list[AsyncioByteStream] = []

    async def connect() -> None:
        for port in like.ports:
            streams.append(await AsyncioByteStream.connect_unix(str(vm.port_path(port))))

    try:
        await vm.start(connect)
        async with Client(streams[0]) as client:
            await AgentClient(client).setup(0, b"", timeout=FIRST_ANSWER_TIMEOUT)
        return True
    except (TimeoutError, ConnectionError, VMError, OSError) as err:
        log.info("restoring the new VM snapshot: %s", err or type(err).__name__)
        return False
    finally:
        vm.kill()
        for stream in streams:  # idempotent: the client closed the first if it got one
            await stream.aclose()
        vm.remove_run_dir()


async def _make_snapshot(image: GuestImage, like: VMConfig, accel: str, folder: Path,
                         run_base: Path) -> None:
    from runm.sandbox.sandbox import boot_timeout, wait_agent

    vm = QemuVM(_vm_config(image, like, accel, run_base, "template",
                           memory_file=folder / "ram"))
    try:
        try:
            await vm.start()
        except (VMError, OSError) as err:
            raise RunmError(f"starting the template VM: {err}") from None
        # Only the control port is connected: the stdio mux of a restored guest starts fresh.
        ctl = await AsyncioByteStream.connect_unix(str(vm.port_path(CTL_PORT)))
        async with Client(ctl) as client:
            agent = AgentClient(client)
            await wait_agent(vm, agent, boot_timeout())
            await agent.quiesce(for_snapshot=True, timeout=60)
            try:
                await vm.save_snapshot(folder / "state")
            except VMError as err:
                raise RunmError(f"saving the template VM: {err}") from None
        await vm.stop()
        with open(folder / "ram", "rb+") as ram:
            punch_zero_pages(ram.fileno())
            os.fsync(ram.fileno())  # a torn RAM file after a host crash would restore garbage
    finally:
        vm.kill()
        vm.remove_run_dir()
