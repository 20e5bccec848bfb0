"""Published ports: `-p [IP:]HOSTPORT:CONTAINERPORT[/PROTO]` and the `io.runm.publish`
annotation, as docker and podman spell them, checked before any VM starts."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping

from runm.errors import RunmError
from runm.vm.base import PortForward

PUBLISH_ANNOTATION = "io.runm.publish"
PROTOCOLS = ("tcp", "udp")


def parse_publish(text: str) -> PortForward:
    """One `[IP:]HOSTPORT:CONTAINERPORT[/tcp|udp]`; IP defaults to 0.0.0.0, as docker's."""
    spec, _, protocol = text.strip().partition("/")
    protocol = protocol or "tcp"
    if protocol not in PROTOCOLS:
        raise RunmError(f"invalid publish {text!r}: protocol must be tcp or udp")
    parts = spec.rsplit(":", 2)
    if len(parts) == 2:
        host_ip, host_port, guest_port = "0.0.0.0", parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host_port, guest_port = parts
        host_ip = host_ip.strip("[]") or "0.0.0.0"
    else:
        raise RunmError(f"invalid publish {text!r}: want [IP:]HOSTPORT:CONTAINERPORT[/PROTO]")
    import ipaddress  # only for -p: a start without it does not load it

    try:
        address = ipaddress.ip_address(host_ip)
    except ValueError:
        raise RunmError(f"invalid publish {text!r}: {host_ip!r} is not an IP address") from None
    if address.version != 4:
        raise RunmError(f"invalid publish {text!r}: only IPv4 host addresses are supported")
    ports = []
    for port in (host_port, guest_port):
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise RunmError(f"invalid publish {text!r}: {port!r} is not a port (1-65535)")
        ports.append(int(port))
    return PortForward(protocol, host_ip, ports[0], ports[1])


def publish_list(flags: Iterable[str], annotations: Mapping[str, str]) -> list[PortForward]:
    """The -p flags and the bundle's io.runm.publish annotation (comma-separated)."""
    texts = list(flags)
    texts += [t for t in annotations.get(PUBLISH_ANNOTATION, "").split(",") if t.strip()]
    forwards = [parse_publish(t) for t in texts]
    seen: set[tuple[str, int]] = set()
    for f in forwards:
        if (f.protocol, f.host_port) in seen:
            raise RunmError(f"invalid publish: host port {f.host_port}/{f.protocol} given twice")
        seen.add((f.protocol, f.host_port))
    return forwards


def check_available(forward: PortForward) -> None:
    """Fail now, in words a user knows, if the host port is taken (QEMU's own message on a
    failed forward is vague, and would come only after the VM started)."""
    kind = socket.SOCK_STREAM if forward.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((forward.host_ip, forward.host_port))
        except OSError as err:
            reason = (err.strerror or str(err)).lower()
            raise RunmError(f"publishing {forward}: cannot bind {forward.host_ip}:"
                            f"{forward.host_port}/{forward.protocol}: {reason}") from None


def resolve_publish(flags: Iterable[str], annotations: Mapping[str, str]) -> list[PortForward]:
    """What to publish for a container (flags + annotation), each host port checked free."""
    forwards = publish_list(flags, annotations)
    for forward in forwards:
        check_available(forward)
    return forwards
