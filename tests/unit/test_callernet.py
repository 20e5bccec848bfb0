"""The caller's network: what is read from its namespace (`ip -j` output, as podman's CNI
bridge leaves it), and the agent recreating it with rtnetlink, in a namespace of the test's
own. The tap, tc and the guest's NIC are exercised end to end in tests/e2e/test_network.py
and test_podman.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with a guest's two NICs: eth0 as slirp's (10.0.2.15/24, default route
    through 10.0.2.2) and eth1, the caller's, down (a veth pair stands in for both)."""
    name = f"runm-unit-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                     ["addr", "add", "10.0.2.15/24", "dev", "eth0"],
                     ["link", "set", "eth0", "up"],
                     ["route", "add", "default", "via", "10.0.2.2"]):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_the_guest_makes_the_callers_nic_its_eth0_with_addresses_and_routes(
        netns: str) -> None:
    mac = ip_json(netns, "link", "show", "eth1")[0]["address"]
    callernet.in_netns(f"/run/netns/{netns}", lambda: callernic.configure(
        "eth1", 1400, ["10.88.0.2/16", "fd00::2/64"],
        ["default via 10.88.0.1", "10.99.0.0/24 via 10.88.0.254 src 10.88.0.2 metric 10 onlink",
         "192.168.5.0/24", "-6 default via fd00::1 metric 1024"]))
    links = {link["ifname"]: link for link in ip_json(netns, "addr", "show")}
    assert links["eth0"]["address"] == mac and links["eth0"]["mtu"] == 1400
    assert "UP" in links["eth0"]["flags"]
    assert [(a["local"], a["prefixlen"]) for a in links["eth0"]["addr_info"]
            if a["scope"] == "global"] == [("10.88.0.2", 16), ("fd00::2", 64)]
    assert "UP" not in links[callernic.SLIRP_NAME]["flags"]
    assert links[callernic.SLIRP_NAME]["addr_info"] == []
    routes = {r["dst"]: r for r in ip_json(netns, "route", "show")}
    assert routes["default"]["gateway"] == "10.88.0.1" and routes["default"]["dev"] == "eth0"
    assert routes["10.99.0.0/24"]["metric"] == 10 and "onlink" in routes["10.99.0.0/24"]["flags"]
    assert routes["10.99.0.0/24"]["prefsrc"] == "10.88.0.2"
    assert routes["192.168.5.0/24"]["scope"] == "link"
    routes6 = {r["dst"]: r for r in ip_json(netns, "-6", "route", "show")}
    assert routes6["default"]["gateway"] == "fd00::1" and routes6["default"]["metric"] == 1024


def test_with_published_ports_the_user_mode_nic_stays_up_without_the_default_route(
        netns: str) -> None:
    callernet.in_netns(f"/run/netns/{netns}", lambda: callernic.configure(
        "eth1", 0, ["10.88.0.2/16"], ["default via 10.88.0.1"], keep_user_network=True))
    slirp = ip_json(netns, "addr", "show", callernic.SLIRP_NAME)[0]
    assert "UP" in slirp["flags"]
    assert [a["local"] for a in slirp["addr_info"] if a["family"] == "inet"] == ["10.0.2.15"]
    routes = {r["dst"]: r["dev"] for r in ip_json(netns, "route", "show")}
    assert routes["default"] == "eth0" and routes["10.0.2.0/24"] == callernic.SLIRP_NAME


def test_a_failing_step_is_named(netns: str) -> None:
    with pytest.raises(RuntimeError, match=r"adding route default via 10\.1\.1\.1: Network is "
                                           r"unreachable"):
        callernet.in_netns(f"/run/netns/{netns}", lambda: callernic.configure(
            "eth1", 0, ["10.88.0.2/16"], ["default via 10.1.1.1"]))
    with pytest.raises(RuntimeError, match="no network interface eth9"):
        callernet.in_netns(f"/run/netns/{netns}", lambda: callernic.configure(
            "eth9", 0, [], []))
    with pytest.raises(RuntimeError, match="unknown 'via6'"):
        callernet.in_netns(f"/run/netns/{netns}", lambda: callernic.configure(
            "eth0", 0, [], ["default via6 x"]))


def test_the_nic_is_found_by_its_mac(tmp_path: Path) -> None:
    for name, mac in (("eth0", "52:54:00:12:34:56"), ("eth1", "82:f2:8f:e6:d1:33")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    (tmp_path / "broken").mkdir()
    assert callernic.find_nic("82:F2:8F:E6:D1:33", tmp_path) == "eth1"
    assert callernic.find_nic("00:11:22:33:44:55", tmp_path) is None
    assert callernic.find_nic("00:11:22:33:44:55", tmp_path / "none") is None


def test_attach_mirrors_the_interface_onto_a_tap_and_detach_gives_it_back(netns: str) -> None:
    net = callernet.inspect(f"/run/netns/{netns}")
    assert net is not None and net.interface == "eth0"  # eth1 has no global address
    assert net.routes == ["default via 10.0.2.2"]
    tap = callernet.attach(net)
    try:
        links = {link["ifname"]: link for link in ip_json(netns, "link")}
        assert "UP" in links[callernet.TAP_NAME]["flags"]
        for src, dst in (("eth0", callernet.TAP_NAME), (callernet.TAP_NAME, "eth0")):
            shown = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", src, "ingress"],
                                   capture_output=True, check=True).stdout.decode()
            assert f"Egress Redirect to device {dst}" in shown, shown
    finally:
        os.close(tap)
        callernet.detach(net)
    assert callernet.TAP_NAME not in {link["ifname"] for link in ip_json(netns, "link")}
    qdiscs = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", "eth0"],
                            capture_output=True, check=True).stdout.decode()
    assert "ingress" not in qdiscs


def test_an_interface_with_an_ingress_qdisc_of_its_own_is_left_alone(netns: str) -> None:
    subprocess.run(["tc", "-n", netns, "qdisc", "add", "dev", "eth0", "ingress"], check=True)
    net = callernet.inspect(f"/run/netns/{netns}")
    assert net is not None
    with pytest.raises(callernet.RunmError, match="connecting the VM to eth0 in /run/netns/"):
        callernet.attach(net)
    assert callernet.TAP_NAME not in {link["ifname"] for link in ip_json(netns, "link")}
    qdiscs = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", "eth0"],
                            capture_output=True, check=True).stdout.decode()
    assert "ingress" in qdiscs, "the caller's qdisc stays"


def test_a_namespace_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    net = callernet.CallerNetwork(netns=str(tmp_path / "gone"), interface="eth0",
                                  mac="02:00:00:00:00:01", mtu=1500, addresses=[], routes=[])
    with pytest.raises(callernet.RunmError, match=r"making a tap device in .*gone"):
        callernet.attach(net)
    with pytest.raises(callernet.RunmError, match=r"ip addr show in .*gone"):
        callernet.inspect(str(tmp_path / "gone"))


def test_a_namespace_that_cannot_be_read_means_the_vms_own_network(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = tmp_path / "netns"
    other.write_text("")  # exists, but nsenter cannot enter it
    spec = {"linux": {"namespaces": [{"type": "network", "path": str(other)}]}}
    assert callernet.for_container("c1", tmp_path, spec) is None
    assert "the container gets the VM's own network instead" in caplog.text


def _holders() -> list[int]:
    """Our children that hold a namespace for Docker's hook."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and \
                        b"unshare(0x40000000)" in cmdline:
                    found.append(int(entry.name))
    return found


def setkey_spec(tmp_path: Path, script: str) -> dict[str, Any]:
    """A spec as Docker writes it: a new network namespace and its setkey prestart hook."""
    hook = tmp_path / "dockerd"
    hook.write_text("#!/bin/sh\n" + script)
    hook.chmod(0o755)
    return {"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "network"}]},
            "hooks": {"prestart": [{"path": str(hook),
                                    "args": [callernet.SETKEY_HOOK, "-exec-root=/x", "c1"]}]}}


def test_dockers_network_hook_configures_a_namespace_runm_then_brings_in(
        tmp_path: Path) -> None:
    """What libnetwork-setkey does, by a script: given the state's pid, put a veth into
    that process's network namespace and configure it."""
    host_end = f"rk{os.getpid() % 10**6}"
    spec = setkey_spec(tmp_path, f"""
pid=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
ip link add {host_end} type veth peer name eth0 netns "$pid"
nsenter --net=/proc/$pid/ns/net ip addr add 10.55.0.2/24 dev eth0
nsenter --net=/proc/$pid/ns/net ip link set eth0 up
""")
    try:
        net = callernet.for_container("c1", tmp_path, spec)
        assert net is not None and net.holder_pid in _holders()
        assert (net.interface, net.addresses) == ("eth0", ["10.55.0.2/24"])
        assert net.netns == f"/proc/{net.holder_pid}/ns/net"
        callernet.release(net)
        assert _holders() == []
    finally:
        subprocess.run(["ip", "link", "del", host_end], check=False, capture_output=True)


def test_a_hook_that_configures_nothing_means_loopback_only(tmp_path: Path) -> None:
    spec = setkey_spec(tmp_path, "cat >/dev/null\n")  # `docker run --network none`
    assert callernet.for_container("c1", tmp_path, spec) is None
    assert _holders() == []


def test_a_failing_hook_fails_the_container_in_runcs_words(tmp_path: Path) -> None:
    spec = setkey_spec(tmp_path, "echo boom >&2; exit 3\n")
    with pytest.raises(callernet.RunmError,
                       match="error running hook #0: exit status 3, stdout: , stderr: boom"):
        callernet.for_container("c1", tmp_path, spec)
    assert _holders() == []


def test_only_dockers_hook_on_a_new_namespace_is_run_here(tmp_path: Path) -> None:
    spec = setkey_spec(tmp_path, "exit 0\n")
    assert callernet.setkey_hook(spec) is not None
    spec["linux"]["namespaces"] = [{"type": "network", "path": "/run/netns/x"}]
    assert callernet.setkey_hook(spec) is None
    spec["linux"]["namespaces"] = [{"type": "network"}]
    spec["hooks"]["prestart"][0]["args"][0] = "other-hook"
    assert callernet.setkey_hook(spec) is None
    assert callernet.setkey_hook({}) is None
