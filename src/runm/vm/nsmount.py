"""Mounts inside a QEMU's own mount namespace (the 9p export of a page-sharing clone).

A clone's QEMU serves its shares over 9p from one export directory. Each share is a bind
mount in that directory, made in a mount namespace only that QEMU lives in (new_namespace,
run in QEMU's child before exec, with slave propagation: nothing made there reaches the
host). The mounts die with the QEMU, even when everything is SIGKILLed: no mount is ever
left on the host.

The source is taken with open_tree(2) in the caller's namespace (so a mount the caller sees,
such as podman's overlay rootfs made after the QEMU started, is what the guest sees) and
attached with move_mount(2) by a forked child that has entered QEMU's namespace (setns of a
mount namespace needs a single-threaded process).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

from runm.libc import check as _check
from runm.libc import libc as _libc

# x86_64 and aarch64 share these numbers (the unified syscall table of Linux >= 5.1).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_CLONE_NEWNS = 0x20000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2

def new_namespace() -> None:
    """In a child about to exec: a mount namespace of its own whose mounts stay in it."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare")
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_SLAVE), None),
           "making / a slave mount")


def bind_into(pid: int, source: Path, target: Path, readonly: bool = False) -> None:
    """Bind source (with the mounts below it) onto target in pid's mount namespace."""
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source),
                                _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE),
                  f"cloning the mounts at {source}")
    try:
        if readonly:
            attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr
            _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | _AT_RECURSIVE,
                                 attr, len(attr)), f"making {source} read-only")
        target_path = os.fsencode(target)
        _in_namespace(pid, lambda: _check(
            _libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target_path,
                          _MOVE_MOUNT_F_EMPTY_PATH), f"mounting {source} on {target}"))
    finally:
        os.close(tree)


def unmount_in(pid: int, target: Path) -> None:
    """Detach the mount at target in pid's mount namespace."""
    target_path = os.fsencode(target)
    _in_namespace(pid, lambda: _check(_libc.umount2(target_path, _MNT_DETACH),
                                      f"unmounting {target}"))


def _in_namespace(pid: int, action: Callable[[], object]) -> None:
    """Run action in a forked child that entered pid's mount namespace; its OSError is
    raised here (errno and message)."""
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - measured in the parent: exit status and message
            code = 0
            try:
                os.close(read_end)
                _check(_libc.setns(ns, _CLONE_NEWNS), "entering the VM's mount namespace")
                action()
            except OSError as err:
                os.write(write_end, f"{err.errno}:{err.strerror}".encode())
                code = 1
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as failure:
            message = failure.read().decode(errors="replace")
        _, status = os.waitpid(child, 0)
    finally:
        os.close(ns)
    if os.waitstatus_to_exitcode(status) != 0:
        number, _, text = message.partition(":")
        raise OSError(int(number) if number.isdigit() else 0, text or "mount helper failed")
