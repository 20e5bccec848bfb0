"""The caller's network namespace, brought into the VM (what Kata calls tc mirroring).

podman, CNI and Kubernetes prepare a network namespace on the host for a container (a veth
into a bridge, an address, routes; DNAT rules on the host for published ports) and name it
in the spec. runc runs the container in it. A VM cannot move into it, so its traffic is
brought to the VM instead: a tap device made inside the namespace carries a second NIC of the
VM, and tc redirects every frame between the namespace's interface and the tap, both ways.
The guest's NIC takes the interface's MAC, addresses and routes (`runm.agent.callernic`), so
what the caller set up for that address (`podman run -p`, the bridge, DNS) reaches the
container as it would under runc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from runm.errors import RunmError
from runm.libc import check, libc
from runm.records import record

log = logging.getLogger(__name__)
T = TypeVar("T")

TAP_NAME = "runm0"  # inside the caller's namespace, beside its interface
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
SETKEY_HOOK = "libnetwork-setkey"  # Docker's prestart hook that configures the namespace
# Holds a new network namespace, and dies with the process that made it.
_HOLDER = ("import ctypes, os, signal\n"
           "libc = ctypes.CDLL(None, use_errno=True)\n"
           "libc.prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG
           "if libc.unshare(0x40000000) != 0: os._exit(1)\n"  # CLONE_NEWNET
           "os.write(1, b'ready')\n"
           "os.close(1)\n"
           "while True: signal.pause()\n")
# Every frame that arrives on one side leaves through the other.
_MIRROR = ("filter add dev {src} parent ffff: protocol all u32 match u8 0 0 "
           "action mirred egress redirect dev {dst}")


@record
class CallerNetwork:
    netns: str  # the namespace's path on the host
    interface: str  # its interface that the VM's NIC stands in for
    mac: str
    mtu: int
    addresses: list[str]  # "10.88.0.2/16"
    routes: list[str]  # `ip route add` arguments without the device; "-6 ..." for IPv6
    holder_pid: int = 0  # our child that holds the namespace, if we made it (Docker's)


class _Unreadable(RunmError):
    """The namespace could not be read: not the container's fault."""


def caller_netns(spec: dict[str, Any]) -> str | None:
    """The network namespace path the spec names, if it exists here and is not our own."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        path = ns.get("path")
        if ns.get("type") != "network" or not path:
            continue
        try:
            theirs, ours = os.stat(path), os.stat("/proc/self/ns/net")
        except OSError:
            return None
        return None if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) else path
    return None


def _ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    try:
        result = subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", *args],
                                capture_output=True, check=False)
    except OSError as err:
        raise _Unreadable(f"running ip in {netns}: {err}") from None
    if result.returncode != 0:
        raise _Unreadable(f"ip {' '.join(args)} in {netns}: "
                        f"{result.stderr.decode(errors='replace').strip()}")
    try:
        value = json.loads(result.stdout or b"[]")
    except ValueError:
        raise _Unreadable(f"ip {' '.join(args)} in {netns}: output is not JSON") from None
    return [item for item in value if isinstance(item, dict)]


def route_args(route: dict[str, Any], interface: str) -> str | None:
    """`ip route add` arguments (without the device) that recreate route, or None for a
    route the addresses create by themselves or one through another interface."""
    dst = str(route.get("dst", ""))
    if (not dst or route.get("dev", interface) != interface
            or route.get("protocol") == "kernel" or route.get("type") in ("multicast",
                                                                          "local")
            or dst.startswith("fe80:")):
        return None
    args = [dst]
    if route.get("gateway"):
        args += ["via", str(route["gateway"])]
    if route.get("prefsrc"):
        args += ["src", str(route["prefsrc"])]
    if route.get("scope") and route["scope"] != "global":
        args += ["scope", str(route["scope"])]
    if route.get("metric"):
        args += ["metric", str(route["metric"])]
    if "onlink" in (route.get("flags") or []):
        args.append("onlink")
    return " ".join(args)


def describe(links: list[dict[str, Any]], routes4: list[dict[str, Any]],
             routes6: list[dict[str, Any]], netns: str) -> CallerNetwork | None:
    """The namespace's first Ethernet interface with a global address, as a CallerNetwork;
    None if it has none (only loopback: nothing to bring into the VM)."""
    for link in links:
        addresses = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info") or []
                     if a.get("scope") == "global" and a.get("local")]
        if link.get("link_type") != "ether" or not addresses or link.get("ifname") == TAP_NAME:
            continue
        name = str(link["ifname"])
        routes = [r for r in (route_args(route, name) for route in routes4) if r]
        routes += [f"-6 {r}" for r in (route_args(route, name) for route in routes6) if r]
        return CallerNetwork(netns=netns, interface=name, mac=str(link["address"]),
                             mtu=int(link.get("mtu", 0)), addresses=addresses, routes=routes)
    return None


def inspect(netns: str) -> CallerNetwork | None:
    """What the caller set up in netns (see describe)."""
    return describe(_ip_json(netns, "addr", "show"),
                    _ip_json(netns, "route", "show", "table", "main"),
                    _ip_json(netns, "-6", "route", "show", "table", "main"), netns)


def for_container(container_id: str, bundle: Path, spec: dict[str, Any]) -> CallerNetwork | None:
    """The network the caller made for the container: the namespace its spec names, or the
    one Docker's network hook configures (run here, as runc would). None: runc's own
    namespaces, or one that cannot be read (a warning; the container gets the VM's own
    network, as when bringing it into the VM fails). A failing hook fails the container,
    as with runc."""
    netns = caller_netns(spec)
    try:
        if netns is not None:
            return inspect(netns)
        found = setkey_hook(spec)
        return None if found is None else _from_setkey_hook(*found, container_id, bundle,
                                                             spec)
    except _Unreadable as err:
        log.warning("%s: the container gets the VM's own network instead", err)
        return None


def setkey_hook(spec: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(index among the prestart hooks, hook) of Docker's hook that configures a new network
    namespace (`libnetwork-setkey`: dockerd moves the veth of the container's network in and
    sets its address)."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    if not any(ns.get("type") == "network" and not ns.get("path") for ns in namespaces):
        return None
    for index, hook in enumerate((spec.get("hooks") or {}).get("prestart") or []):
        if (hook.get("args") or [])[:1] == [SETKEY_HOOK] and os.path.exists(
                str(hook.get("path", ""))):
            return index, hook
    return None


def _from_setkey_hook(index: int, hook: dict[str, Any], container_id: str, bundle: Path,
                      spec: dict[str, Any]) -> CallerNetwork | None:
    """Make a namespace (held by a child of ours that dies with us), let Docker's hook
    configure it, and read what it set up. The holder lives as long as the network is
    attached (detach() ends it)."""
    holder = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HOLDER],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    keep = False
    try:
        assert holder.stdout is not None
        if holder.stdout.read(5) != b"ready":
            raise _Unreadable("making a network namespace for Docker's network hook failed")
        state = {"ociVersion": spec.get("ociVersion", ""), "id": container_id,
                 "status": "creating", "pid": holder.pid, "bundle": str(bundle),
                 "annotations": spec.get("annotations") or {}}
        run_hook(hook, state, index)
        net = inspect(f"/proc/{holder.pid}/ns/net")
        if net is None:  # `--network none`: loopback only, as runc's new namespace
            return None
        keep = True
        return dataclasses.replace(net, holder_pid=holder.pid)
    finally:
        holder.stdout.close()  # type: ignore[union-attr]
        if not keep:
            holder.kill()
            holder.wait()


def run_hook(hook: dict[str, Any], state: dict[str, Any], index: int) -> None:
    """Run an OCI hook with the container's state on stdin; a failure raises runc's error."""
    args = [str(a) for a in hook.get("args") or [hook["path"]]]
    env = hook.get("env")
    try:
        result = subprocess.run(args, executable=str(hook["path"]),
                                input=json.dumps(state).encode(), capture_output=True,
                                env=None if env is None else dict(e.split("=", 1) for e in env
                                                                  if "=" in e),
                                timeout=hook.get("timeout") or None, check=False)
    except subprocess.TimeoutExpired:
        raise RunmError(f"error running hook #{index}: timeout after "
                        f"{hook['timeout']} seconds") from None
    except OSError as err:
        raise RunmError(f"error running hook #{index}: {err}") from None
    if result.returncode != 0:
        raise RunmError(f"error running hook #{index}: exit status {result.returncode}, "
                        f"stdout: {result.stdout.decode(errors='replace')}, "
                        f"stderr: {result.stderr.decode(errors='replace')}")


def in_netns(netns: str, action: Callable[[], T]) -> T:
    """action(), run in a thread that enters netns first (a thread's network namespace is
    its own; the thread ends with it)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                check(libc.setns(ns_fd, CLONE_NEWNET), "setns")
            finally:
                os.close(ns_fd)
            result.append(action())
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=run, name="runm-netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _open_tap() -> int:
    """A tap device in this thread's namespace, with the virtio-net header QEMU wants."""
    tap = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", TAP_NAME.encode(),
                                                IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except BaseException:
        os.close(tap)
        raise
    return tap


def _run_in(netns: str, argv: list[str], stdin: str = "") -> None:
    result = subprocess.run(["nsenter", f"--net={netns}", *argv], input=stdin.encode(),
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {result.stderr.decode(errors='replace').strip()}")


def attach(net: CallerNetwork) -> int:
    """Make the tap in the caller's namespace and mirror its interface onto it; return the
    tap's fd for QEMU (the tap goes away with the last fd). Undone on failure."""
    try:
        tap = in_netns(net.netns, _open_tap)
    except OSError as err:
        raise RunmError(f"making a tap device in {net.netns}: {err}") from None
    what = f"connecting the VM to {net.interface} in {net.netns}"
    try:
        _run_in(net.netns, ["ip", "link", "set", TAP_NAME, "mtu", str(net.mtu or 1500), "up"])
        # Fails if the interface has an ingress qdisc already: someone else's to keep.
        _run_in(net.netns, ["tc", "qdisc", "add", "dev", net.interface, "ingress"])
    except OSError as err:
        os.close(tap)
        raise RunmError(f"{what}: {err}") from None
    try:
        _run_in(net.netns, ["tc", "-batch", "-"], "\n".join([
            _MIRROR.format(src=net.interface, dst=TAP_NAME),
            f"qdisc add dev {TAP_NAME} ingress",
            _MIRROR.format(src=TAP_NAME, dst=net.interface)]) + "\n")
    except OSError as err:
        os.close(tap)
        _remove_mirror(net)
        raise RunmError(f"{what}: {err}") from None
    return tap


def detach(net: CallerNetwork) -> None:
    """Give the caller's interface back (its namespace may be gone already: no errors),
    and release() it."""
    _remove_mirror(net)
    release(net)


def _remove_mirror(net: CallerNetwork) -> None:
    with contextlib.suppress(OSError):
        _run_in(net.netns, ["tc", "qdisc", "del", "dev", net.interface, "ingress"])


def release(net: CallerNetwork) -> None:
    """End the process that holds the namespace, if it is ours."""
    if net.holder_pid:
        with contextlib.suppress(OSError):
            os.kill(net.holder_pid, signal.SIGKILL)
            os.waitpid(net.holder_pid, 0)
