"""PID 1 duties in the guest: the filesystems runc and containers expect."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from functools import partial
from pathlib import Path

from runm.agent import sysapi
from runm.proto import network

# (source, target, fstype, options) - after switch_root only /dev (devtmpfs) is mounted.
MOUNTS = [
    ("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"]),
    ("sysfs", "/sys", "sysfs", ["nosuid", "nodev", "noexec"]),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", ["nosuid", "nodev", "noexec", "nsdelegate"]),
    ("tmpfs", "/run", "tmpfs", ["nosuid", "nodev", "mode=755"]),
    ("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev", "mode=1777"]),
    ("devpts", "/dev/pts", "devpts", ["nosuid", "noexec", "gid=5", "mode=620", "ptmxmode=666"]),
    ("tmpfs", "/dev/shm", "tmpfs", ["nosuid", "nodev", "mode=1777"]),
    ("mqueue", "/dev/mqueue", "mqueue", ["nosuid", "nodev", "noexec"]),
]

DEV_LINKS = {
    "/dev/fd": "/proc/self/fd",
    "/dev/stdin": "/proc/self/fd/0",
    "/dev/stdout": "/proc/self/fd/1",
    "/dev/stderr": "/proc/self/fd/2",
    "/dev/ptmx": "pts/ptmx",
}


def mounted_targets() -> set[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[1] for line in lines if len(line.split()) > 1}


def setup_system() -> None:
    """Mount what is missing; enable every cgroup v2 controller for containers."""
    for source, target, fstype, options in MOUNTS:
        if target in mounted_targets():
            continue
        os.makedirs(target, exist_ok=True)
        try:
            sysapi.mount(source, target, fstype, options)
        except OSError as err:
            if fstype == "cgroup2" and "nsdelegate" in options:
                sysapi.mount(source, target, fstype, [o for o in options if o != "nsdelegate"])
            else:
                raise RuntimeError(str(err)) from err
    for link, target in DEV_LINKS.items():
        if not os.path.lexists(link):
            with contextlib.suppress(OSError):
                os.symlink(target, link)
    enable_cgroup_controllers(Path("/sys/fs/cgroup"))
    hold_kernel_switches(Path("/sys/fs/cgroup"))
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    _loopback_up()
    network_up()


def network_up() -> list[str]:
    """Configure the NIC for QEMU's user-mode network (static: no DHCP round trip at boot);
    return the errors (logged; a VM without network still runs containers)."""
    from runm.agent.rtnetlink import RouteSocket

    eth0 = network.GUEST_INTERFACE
    try:
        index = socket.if_nametoindex(eth0)
    except OSError:
        return [f"no {eth0}"]
    errors = []
    with RouteSocket() as rt:
        for what, action in (
                (f"address {network.GUEST_CIDR}", partial(rt.address, index, network.GUEST_CIDR)),
                (f"{eth0} up", partial(rt.set_link, index, up=True)),
                (f"route default via {network.GATEWAY}",
                 partial(rt.add_route, index, f"default via {network.GATEWAY}"))):
            try:
                action()
            except OSError as err:
                errors.append(f"{what}: {err.strerror}")
    for error in errors:
        print(f"runm-agent: network: {error}", file=sys.stderr)
    return errors


def enable_cgroup_controllers(root: Path) -> None:
    try:
        available = (root / "cgroup.controllers").read_text().split()
    except OSError:
        return
    for controller in available:
        with contextlib.suppress(OSError):
            (root / "cgroup.subtree_control").write_text(f"+{controller}")


HOLD_CGROUP = "runm.hold"


def hold_kernel_switches(root: Path) -> str | None:
    """Turn on, for the VM's life, the kernel's static keys that a container's cgroup would
    switch on and its removal off again (memcg kmem and socket accounting, cpusets, cgroup
    device programs): an empty cgroup with every controller and an allow-all device program.

    Flipping a static key rewrites kernel code on every CPU. Under TCG with two vCPUs, QEMU
    7.2 sometimes kept running a stale translation of a patched site (the int3 of the
    patch), and the guest looped on it for good (soft lockup in runc's cgroup mkdir). With
    the keys held, starting and removing containers patches no kernel code (and under TCG
    retranslates none). Returns what failed, or None (a VM still runs containers without)."""
    hold = root / HOLD_CGROUP
    try:
        hold.mkdir(exist_ok=True)
        sysapi.attach_allow_all_device_program(str(hold))
    except OSError as err:
        print(f"runm-agent: holding kernel switches: {err}", file=sys.stderr)
        return str(err)
    return None


def _loopback_up() -> None:
    from runm.agent.rtnetlink import RouteSocket

    with RouteSocket() as rt:
        rt.set_link(socket.if_nametoindex("lo"), up=True)
