"""The caller's network in the guest (the agent's half of `runm.net.callernet`).

The host hot-plugs a NIC whose frames are the caller's namespace's (its veth, mirrored by tc):
that NIC becomes eth0, with the addresses and routes the namespace had, and QEMU's user-mode
NIC steps aside (down, renamed), so a container that joins the VM's network sees what it
would have seen under runc: podman's bridge address, its gateway, its published ports.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

from runm.agent.rtnetlink import RouteSocket
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


def configure(nic: str, mtu: int, addresses: list[str], routes: list[str],
              keep_user_network: bool = False) -> None:
    """Make `nic` the guest's eth0 with these addresses and routes ("-6 ..." for IPv6; see
    RouteSocket.add_route), after taking the user-mode NIC down (which drops its routes) and
    renaming it. keep_user_network: ports are published through it too, so it comes back up
    with its address (replies to its forwarded connections leave through it) but without its
    default route. The first failure raises RuntimeError naming the step."""
    eth0 = network.GUEST_INTERFACE
    index = _index(nic)
    with RouteSocket() as rt:
        steps: list[tuple[str, Callable[[], None]]] = []
        if nic != eth0:
            slirp = _index(eth0)
            steps += [(f"taking {eth0} down", partial(rt.set_link, slirp, up=False)),
                      (f"renaming {eth0}", partial(rt.set_link, slirp, name=SLIRP_NAME)),
                      (f"renaming {nic}", partial(rt.set_link, index, name=eth0))]
            if keep_user_network:
                steps.append((f"bringing {SLIRP_NAME} up", partial(rt.set_link, slirp, up=True)))
            else:
                with contextlib.suppress(OSError):  # the container's `ip addr` would show it
                    rt.address(slirp, network.GUEST_CIDR, add=False)
        steps.append((f"bringing {eth0} up", partial(rt.set_link, index, up=True, mtu=mtu)))
        steps += [(f"adding address {a}", partial(rt.address, index, a)) for a in addresses]
        steps += [(f"adding route {r}", partial(rt.add_route, index, r)) for r in routes]
        for what, action in steps:
            try:
                action()
            except OSError as err:
                raise RuntimeError(f"{what}: {err.strerror or err}") from None
            except ValueError as err:
                raise RuntimeError(f"{what}: {err}") from None


def _index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise RuntimeError(f"no network interface {name}") from None
