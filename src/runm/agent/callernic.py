"""The caller's network in the guest (the agent's half of `runm.net.callernet`).

The host hot-plugs a NIC whose frames are the caller's namespace's (its veth, mirrored by tc):
that NIC becomes eth0, with the addresses and routes the namespace had, and QEMU's user-mode
NIC steps aside (down, renamed), so a container that joins the VM's network sees what it
would have seen under runc: podman's bridge address, its gateway, its published ports.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from runm.proto import network

SLIRP_NAME = "slirp0"  # QEMU's user-mode NIC once the caller's takes its name


def find_nic(mac: str, sys_net: Path = Path("/sys/class/net")) -> str | None:
    """The name of the interface with this MAC address (no udev here: read sysfs)."""
    for entry in sorted(sys_net.iterdir()) if sys_net.is_dir() else []:
        try:
            if (entry / "address").read_text().strip().lower() == mac.lower():
                return entry.name
        except OSError:
            continue
    return None


def ip_commands(nic: str, mtu: int, addresses: list[str], routes: list[str]) -> list[list[str]]:
    """The `ip` invocations that make `nic` the guest's eth0 with these addresses and routes
    (taking the user-mode NIC down first drops its default route)."""
    eth0 = network.GUEST_INTERFACE
    commands: list[list[str]] = []
    if nic != eth0:
        commands += [["link", "set", eth0, "down"], ["addr", "flush", "dev", eth0],
                     ["link", "set", eth0, "name", SLIRP_NAME],
                     ["link", "set", nic, "name", eth0]]
    if mtu:
        commands.append(["link", "set", eth0, "mtu", str(mtu)])
    commands.append(["link", "set", eth0, "up"])
    for address in addresses:
        commands.append([*(["-6"] if ":" in address else []), "addr", "add", address,
                         "dev", eth0])
    for route in routes:
        args = route.split()
        family = ["-6"] if args[:1] == ["-6"] else []
        commands.append([*family, "route", "add", *args[len(family):], "dev", eth0])
    return commands


def configure(commands: list[list[str]], ip: str = "ip") -> None:
    """Run the commands in order; the first failure raises RuntimeError naming it."""
    for args in commands:
        result = subprocess.run([ip, *args], capture_output=True, check=False)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"ip {' '.join(args)}: {detail or f'exit {result.returncode}'}")
