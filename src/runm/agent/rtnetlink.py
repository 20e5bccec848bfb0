"""The few rtnetlink requests the agent makes (links, addresses, routes), without `ip`.

Under TCG every process the agent starts costs tens of milliseconds; a request on a netlink
socket costs microseconds. Each request asks for an acknowledgement, and a failure raises
OSError with the kernel's errno.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
RTM_NEWLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE = 16, 20, 21, 24
IFLA_IFNAME, IFLA_MTU = 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 4, 5, 6, 7
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST, RTNH_F_ONLINK = 254, 3, 1, 0x4
SCOPES = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254}


def _address(text: str) -> tuple[int, bytes]:
    """(family, packed address) of an IPv4 or IPv6 address (ipaddress would cost an import
    in the guest's agent)."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        return family, socket.inet_pton(family, text)
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _prefix(cidr: str) -> tuple[int, bytes, int]:
    """(family, packed address, prefix length) of "ADDRESS/LENGTH"."""
    address, _, length = cidr.partition("/")
    family, packed = _address(address)
    bits = len(packed) * 8
    if not length.isdigit() or int(length) > bits:
        raise ValueError(f"{cidr!r}: the prefix length must be 0-{bits}")
    return family, packed, int(length)


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("HH", length, kind) + data + b"\0" * (-length % 4)


class RouteSocket:
    """One netlink socket to the kernel's routing subsystem (of this thread's namespace)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RouteSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, body: bytes, flags: int = 0) -> None:
        """Send one request and wait for its acknowledgement."""
        seq = next(self._seq)
        header = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                             seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_type, _, msg_seq, _ = struct.unpack_from("=IHHII", data, offset)
                if msg_type == NLMSG_ERROR and msg_seq == seq:
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return
                offset += max((length + 3) & ~3, 16)

    def set_link(self, index: int, *, up: bool | None = None, name: str = "",
                 mtu: int = 0) -> None:
        change = IFF_UP if up is not None else 0
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change)
        if name:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        self.request(RTM_NEWLINK, body)

    def address(self, index: int, cidr: str, *, add: bool = True) -> None:
        family, packed, prefix = _prefix(cidr)
        body = struct.pack("=BBBBI", family, prefix, 0, 0, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        if add:
            self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)
        else:
            self.request(RTM_DELADDR, body)

    def add_route(self, index: int, route: str) -> None:
        """route: `ip route add` arguments without the device ("-6 " first for IPv6):
        DST|default [via GW] [src ADDR] [scope SCOPE] [metric N] [onlink]."""
        words = route.split()
        ipv6 = words[:1] == ["-6"]
        words = words[1:] if ipv6 else words
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        dst, options = words[0], words[1:]
        body_attrs = _attr(RTA_OIF, struct.pack("=I", index))
        prefix = 0
        if dst != "default":
            _, packed, prefix = _prefix(dst if "/" in dst else f"{dst}/{32 if not ipv6 else 128}")
            body_attrs += _attr(RTA_DST, packed)
        gateway = False
        scope = SCOPES["global"]
        flags = 0
        pairs = iter(options)
        for word in pairs:
            if word == "onlink":
                flags |= RTNH_F_ONLINK
                continue
            value = next(pairs, "")
            if word == "via":
                body_attrs += _attr(RTA_GATEWAY, _address(value)[1])
                gateway = True
            elif word == "src":
                body_attrs += _attr(RTA_PREFSRC, _address(value)[1])
            elif word == "metric":
                body_attrs += _attr(RTA_PRIORITY, struct.pack("=I", int(value)))
            elif word == "scope" and value in SCOPES:
                scope = SCOPES[value]
            else:
                raise ValueError(f"route {route!r}: unknown {word!r}")
        if not gateway and "scope" not in options and not ipv6:
            scope = SCOPES["link"]  # a directly connected network, as `ip route add` makes it
        body = struct.pack("=BBBBBBBBI", family, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           scope, RTN_UNICAST, flags)
        self.request(RTM_NEWROUTE, body + body_attrs, NLM_F_CREATE | NLM_F_EXCL)
