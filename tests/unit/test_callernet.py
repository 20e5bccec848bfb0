"""The caller's network: what is read from its namespace (`ip -j` output, as podman's CNI
bridge leaves it) and the guest's `ip` commands that recreate it. The tap, tc and the guest's
NIC are exercised for real in tests/e2e/test_network.py and test_podman.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from runm.agent import callernic
from runm.net import callernet

LINKS = [
    {"ifindex": 1, "ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00",
     "mtu": 65536, "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8,
                                  "scope": "host"}]},
    {"ifindex": 2, "ifname": "eth0", "link_type": "ether", "address": "82:f2:8f:e6:d1:33",
     "mtu": 1500, "addr_info": [
         {"family": "inet", "local": "10.88.0.2", "prefixlen": 16, "scope": "global"},
         {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global"},
         {"family": "inet6", "local": "fe80::80f2:8fff:fee6:d133", "prefixlen": 64,
          "scope": "link"}]},
]
ROUTES4 = [
    {"dst": "default", "gateway": "10.88.0.1", "dev": "eth0"},
    {"dst": "10.88.0.0/16", "dev": "eth0", "protocol": "kernel", "scope": "link",
     "prefsrc": "10.88.0.2"},
    {"dst": "10.99.0.0/24", "gateway": "10.88.0.254", "dev": "eth0", "metric": 10,
     "prefsrc": "10.88.0.2", "flags": ["onlink"]},
    {"dst": "192.168.7.0/24", "dev": "other0", "scope": "link"},
]
ROUTES6 = [
    {"dst": "fd00::/64", "dev": "eth0", "protocol": "kernel", "metric": 256},
    {"dst": "fe80::/64", "dev": "eth0", "protocol": "kernel", "metric": 256},
    {"dst": "default", "gateway": "fd00::1", "dev": "eth0", "metric": 1024},
    {"type": "multicast", "dst": "ff00::/8", "dev": "eth0", "metric": 256},
]


def test_the_interface_with_a_global_address_is_what_the_vm_stands_in_for() -> None:
    net = callernet.describe(LINKS, ROUTES4, ROUTES6, "/run/netns/cni-1")
    assert net == callernet.CallerNetwork(
        netns="/run/netns/cni-1", interface="eth0", mac="82:f2:8f:e6:d1:33", mtu=1500,
        addresses=["10.88.0.2/16", "fd00::2/64"],
        routes=["default via 10.88.0.1",
                "10.99.0.0/24 via 10.88.0.254 src 10.88.0.2 metric 10 onlink",
                "-6 default via fd00::1 metric 1024"])


def test_a_namespace_with_loopback_only_has_nothing_to_bring() -> None:
    assert callernet.describe(LINKS[:1], [], [], "/run/netns/x") is None
    no_address = [{**LINKS[1], "addr_info": LINKS[1]["addr_info"][2:]}]
    assert callernet.describe(no_address, ROUTES4, [], "/run/netns/x") is None


def test_only_a_network_namespace_path_that_exists_and_is_not_ours_counts(
        tmp_path: Path) -> None:
    def spec(path: str | None) -> dict[str, object]:
        ns = {"type": "network", **({"path": path} if path else {})}
        return {"linux": {"namespaces": [{"type": "pid"}, ns]}}

    assert callernet.caller_netns(spec(None)) is None
    assert callernet.caller_netns(spec(str(tmp_path / "gone"))) is None
    assert callernet.caller_netns(spec("/proc/self/ns/net")) is None
    other = tmp_path / "netns"
    other.write_text("")  # any other file: the inode differs from our namespace's
    assert callernet.caller_netns(spec(str(other))) == str(other)
    assert callernet.caller_netns({}) is None


def test_the_guest_renames_the_nics_and_recreates_addresses_and_routes() -> None:
    commands = callernic.ip_commands("eth1", 1400, ["10.88.0.2/16", "fd00::2/64"],
                                     ["default via 10.88.0.1", "-6 default via fd00::1"])
    assert commands == [
        ["link", "set", "eth0", "down"], ["addr", "flush", "dev", "eth0"],
        ["link", "set", "eth0", "name", callernic.SLIRP_NAME],
        ["link", "set", "eth1", "name", "eth0"],
        ["link", "set", "eth0", "mtu", "1400"], ["link", "set", "eth0", "up"],
        ["addr", "add", "10.88.0.2/16", "dev", "eth0"],
        ["-6", "addr", "add", "fd00::2/64", "dev", "eth0"],
        ["route", "add", "default", "via", "10.88.0.1", "dev", "eth0"],
        ["-6", "route", "add", "default", "via", "fd00::1", "dev", "eth0"]]
    assert callernic.ip_commands("eth0", 0, [], []) == [["link", "set", "eth0", "up"]]


def test_the_nic_is_found_by_its_mac(tmp_path: Path) -> None:
    for name, mac in (("eth0", "52:54:00:12:34:56"), ("eth1", "82:f2:8f:e6:d1:33")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    (tmp_path / "broken").mkdir()
    assert callernic.find_nic("82:F2:8F:E6:D1:33", tmp_path) == "eth1"
    assert callernic.find_nic("00:11:22:33:44:55", tmp_path) is None
    assert callernic.find_nic("00:11:22:33:44:55", tmp_path / "none") is None


def test_a_failing_ip_command_is_named() -> None:
    callernic.configure([["link", "set", "eth0", "up"]], ip="true")
    with pytest.raises(RuntimeError, match="ip link set eth0 up: exit 1"):
        callernic.configure([["link", "set", "eth0", "up"]], ip="false")
