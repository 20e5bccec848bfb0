"""The task's root filesystem from containerd's mounts (a snapshotter's overlay, usually),
mounted onto `<bundle>/rootfs` before the bundle is shared with the VM, and unmounted on
delete (also by the `delete` action, after a shim that died)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from runm.errors import RunmError
from runm.proto import task as api

log = logging.getLogger("runm.shim")


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


async def mount_all(mounts: list[api.Mount], target: Path) -> None:
    """Mount each in order onto target (undoing them all if one fails)."""
    target.mkdir(parents=True, exist_ok=True)
    for done, mount in enumerate(mounts):
        options = list(mount.options)
        argv = ["mount"]
        if mount.type not in ("bind", "rbind", ""):
            argv += ["-t", mount.type]
        elif not {"bind", "rbind"} & set(options):
            options.append("rbind" if mount.type == "rbind" else "bind")
        if options:
            argv += ["-o", ",".join(options)]
        code, err = await _run(*argv, mount.source or "none", str(target))
        if code != 0:
            for _ in range(done):
                await _run("umount", str(target))
            raise RunmError(f"mounting rootfs ({mount.type} {mount.source}) on {target}: "
                            f"{err or f'mount exited with {code}'}")


async def unmount(target: Path) -> None:
    """Unmount everything mounted on target; never raises (cleanup must go on)."""
    for _ in range(32):
        try:
            if not is_mountpoint(target):
                return
        except OSError:
            return
        code, err = await _run("umount", str(target))
        if code != 0:
            code, err = await _run("umount", "-l", str(target))
            if code != 0:
                log.warning("unmounting %s: %s", target, err)
                return
