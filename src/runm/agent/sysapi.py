"""Thin wrappers over the Linux calls the agent needs that Python's os module lacks."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import struct

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_RELATIME = 1 << 21
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
RB_POWER_OFF = 0x4321FEDC
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "relatime": MS_RELATIME,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def split_mount_options(options: list[str]) -> tuple[int, str]:
    """Mount flags and the fs-specific data string for a list like ["ro", "mode=755"]."""
    flags = 0
    data = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        elif opt and opt != "rw":
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, options: list[str] | None = None) -> None:
    flags, data = split_mount_options(options or [])
    ret = libc().mount(
        source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(ret, f"mounting {fstype} {source} on {target}")


def umount(target: str) -> None:
    _check(libc().umount2(target.encode(), 0), f"unmounting {target}")


def prctl(option: int, arg: int) -> None:
    _check(libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def power_off() -> None:
    os.sync()
    libc().reboot(RB_POWER_OFF)


def add_entropy(seed: bytes) -> None:
    """Credit seed to the kernel's pool and force a CRNG reseed (restored clones share state)."""
    if not seed:
        return
    info = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    with open("/dev/urandom", "wb", buffering=0) as f:
        fcntl.ioctl(f, RNDADDENTROPY, info)
        fcntl.ioctl(f, RNDRESEEDCRNG)


# runc's "already cloned" test (libcontainer/nsenter/cloned_binary.c, runc 1.1): a binary in a
# memfd with exactly these seals is run as is instead of being copied again.
RUNC_MEMFD_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed_copy(path: str) -> int:
    """An fd of a sealed in-memory copy of the executable at path.

    `runc init` copies runc into a fresh memfd on every container start unless it already runs
    from a sealed one: under TCG that is a 10 MB copy and, worse, all of runc's code on new
    physical pages to translate again. Running runc from one sealed copy avoids both, with the
    same protection (nothing can write to it).
    """
    fd = os.memfd_create("runc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            copied = 0
            while copied < size:
                sent = os.sendfile(fd, src.fileno(), copied, size - copied)
                if sent == 0:
                    raise OSError(f"{path}: unexpected end of file")
                copied += sent
            # The file's pages are not needed twice in guest RAM (and in every snapshot).
            os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, RUNC_MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_sysctl(key: str, value: str, root: str = "/proc/sys") -> None:
    """Set sysctl `key` (dotted, as in a spec's linux.sysctl); OSError names it (runc's
    words: "write sysctl key net.x: ...")."""
    if ".." in key or key.startswith(".") or "/" in key:
        raise OSError(errno.EINVAL, f"invalid sysctl key {key!r}")
    try:
        with open(os.path.join(root, *key.split(".")), "w") as f:
            f.write(value)
    except OSError as err:
        raise OSError(err.errno, f"write sysctl key {key}: {err.strerror}") from None


def drop_page_cache(control: str = "/proc/sys/vm/drop_caches") -> None:
    """Have the kernel drop its clean, unmapped page cache (what a guest read while booting)."""
    os.sync()
    with open(control, "w") as f:
        f.write("1")


VIRTIO_BALLOON_ID = "0x0005"


def set_free_page_reporting(on: bool, bus: str = "/sys/bus/virtio") -> bool:
    """Bind (on) or unbind the virtio_balloon driver, which reports free pages to the host;
    return whether anything changed. Off in a snapshot's guest: a page-sharing clone must
    not report (QEMU 7.2 would punch the page out of the snapshot's file, under every other
    clone); a restore with its own copy of the RAM turns it back on."""
    driver = os.path.join(bus, "drivers", "virtio_balloon")
    devices = os.path.join(bus, "devices")
    changed = False
    for name in sorted(os.listdir(devices)):
        try:
            with open(os.path.join(devices, name, "device")) as f:
                if f.read().strip() != VIRTIO_BALLOON_ID:
                    continue
        except OSError:
            continue
        if os.path.exists(os.path.join(driver, name)) == on:
            continue
        with open(os.path.join(driver, "bind" if on else "unbind"), "w") as f:
            f.write(name)
        changed = True
    return changed


def zero_free_memory(margin: int = 48 << 20, meminfo: str = "/proc/meminfo") -> int:
    """Have the kernel zero (almost) every free page; return how many bytes were zeroed.

    Freed pages keep their old bytes, and every non-zero guest page costs RAM in each VM
    restored from a snapshot; zero pages are left out of it. The page cache is not touched
    here (see drop_page_cache).
    """
    free = 0
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemFree:"):
                free = int(line.split()[1]) * 1024
    size = (free - margin) & ~0xFFFFF
    if size <= 0:
        return 0
    # MAP_POPULATE: the kernel faults in (and clears) every page inside mmap(); unmapping
    # returns them to the free lists, zeroed.
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    region.close()
    return size


IN_MODIFY = 0x2
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


def watch_modify(path: str) -> int:
    """An inotify fd that becomes readable when path is modified (cgroup v2 event files
    such as memory.events notify that way)."""
    fd = int(libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    _check(min(fd, 0), "inotify_init1")  # a descriptor, or -1
    try:
        _check(min(int(libc().inotify_add_watch(fd, path.encode(), IN_MODIFY)), 0),
               f"watching {path}")  # a watch descriptor, or -1
    except OSError:
        os.close(fd)
        raise
    return fd


# bpf(2) on x86_64 and aarch64; the commands, types and instructions a device program needs.
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
# r0 = 1 (allow); exit
_ALLOW_ALL = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    nr = _BPF_SYSCALL.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{what}: bpf(2) not known on {os.uname().machine}")
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    ret = int(libc().syscall(nr, cmd, buf, 128))
    _check(min(ret, 0), what)  # a descriptor (or 0), or -1
    return ret


def attach_allow_all_device_program(cgroup: str) -> None:
    """Attach a cgroup v2 device program that allows every device to the cgroup directory.
    It stays attached (the kernel holds it) until the cgroup is removed."""
    insns = ctypes.create_string_buffer(_ALLOW_ALL, len(_ALLOW_ALL))
    license = ctypes.create_string_buffer(b"GPL")
    prog = _bpf(BPF_PROG_LOAD, struct.pack(
        "<IIQQ", BPF_PROG_TYPE_CGROUP_DEVICE, len(_ALLOW_ALL) // 8,
        ctypes.addressof(insns), ctypes.addressof(license)), "loading a device program")
    try:
        target = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", target, prog, BPF_CGROUP_DEVICE, 0),
                 f"attaching a device program to {cgroup}")
        finally:
            os.close(target)
    finally:
        os.close(prog)
