"""Networking: published ports reach a server in the container, the container reaches the
host through the gateway address, and a container without a network has loopback only."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runm.proto.network import DNS, GATEWAY
from runm.sandbox.spec import make_busybox_bundle
from tests.conftest import Runm, fetch, free_port, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks")]

HTTPD = ("mkdir -p /tmp/www && echo hello from httpd > /tmp/www/index.html && "
         "exec httpd -f -p 80 -h /tmp/www")


def httpd_bundle(tmp_path: Path, annotations: dict[str, str] | None = None) -> Path:
    b = make_busybox_bundle(tmp_path / "httpd", ["sh", "-c", HTTPD])
    config = json.loads((b / "config.json").read_text())
    config["root"]["readonly"] = False
    if annotations:
        config["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(config))
    return b


def test_published_port_reaches_httpd_in_the_container(runm: Runm, tmp_path: Path) -> None:
    port = free_port()
    result = runm.run_detached("run", "-d", "-p", f"127.0.0.1:{port}:80",
                               "-b", str(httpd_bundle(tmp_path)), "web")
    assert result.returncode == 0, result.stderr.decode()
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_until(lambda: fetch(url) is not None, timeout=60), "httpd never answered"
        assert fetch(url) == b"hello from httpd\n"
    finally:
        runm.run("delete", "-f", "web")
    assert fetch(f"http://127.0.0.1:{port}/") is None, "the port must be closed with the VM"


def test_publish_annotation_for_callers_without_flags(runm: Runm, tmp_path: Path) -> None:
    port = free_port()
    b = httpd_bundle(tmp_path, {"io.runm.publish": f"127.0.0.1:{port}:80/tcp"})
    result = runm.run_detached("create", "-b", str(b), "web2")
    assert result.returncode == 0, result.stderr.decode()
    try:
        assert runm.run("start", "web2").returncode == 0
        url = f"http://127.0.0.1:{port}/"
        assert wait_until(lambda: fetch(url) is not None, timeout=60), "httpd never answered"
        assert fetch(url) == b"hello from httpd\n"
    finally:
        runm.run("delete", "-f", "web2")


# A UDP echo server and a TCP greeter in one container (busybox has no UDP server; the
# guest image's own root has python3).
SERVERS = """
import socket, threading
def tcp():
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", 8080))
    t.listen()
    while True:
        c, _ = t.accept()
        c.sendall(b"tcp-hello\\n")
        c.close()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 5353))
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(b"echo:" + data, peer)
"""


@pytest.fixture(scope="module")
def python_rootfs(guest_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root filesystem with python3: the guest image's root, extracted."""
    import subprocess

    target = tmp_path_factory.mktemp("pyroot") / "rootfs"
    subprocess.run(["fsck.erofs", f"--extract={target}", str(guest_image.rootfs)],
                   check=True, capture_output=True)
    return target


def udp_echo(port: int, message: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(message, ("127.0.0.1", port))
        try:
            return s.recv(2048)
        except OSError:
            return None


def test_udp_and_tcp_ports_published_together(runm: Runm, tmp_path: Path,
                                              python_rootfs: Path) -> None:
    udp, tcp = free_port(), free_port()
    b = make_busybox_bundle(tmp_path / "servers", ["python3", "-c", SERVERS])
    config = json.loads((b / "config.json").read_text())
    config["root"] = {"path": str(python_rootfs), "readonly": True}
    config["process"]["env"] = ["PATH=/usr/bin:/bin"]
    (b / "config.json").write_text(json.dumps(config))
    result = runm.run_detached("run", "-d", "-p", f"127.0.0.1:{udp}:5353/udp",
                               "-p", f"127.0.0.1:{tcp}:8080", "-b", str(b), "servers")
    assert result.returncode == 0, result.stderr.decode()
    try:
        # a datagram sent before the server binds is lost: ask again until it answers
        assert wait_until(lambda: udp_echo(udp, b"ping") is not None, timeout=90,
                          interval=0.0), "no UDP echo"
        assert udp_echo(udp, b"x" * 1400) == b"echo:" + b"x" * 1400
        with socket.create_connection(("127.0.0.1", tcp), timeout=10) as conn:
            assert conn.makefile("rb").readline() == b"tcp-hello\n"
    finally:
        runm.run("delete", "-f", "servers")
    assert udp_echo(udp, b"gone") is None


OUTSIDE = """
import socket
print(socket.gethostbyname("deb.debian.org"))
s = socket.create_connection(("deb.debian.org", 80), timeout=20)
s.sendall(b"HEAD / HTTP/1.0\\r\\nHost: deb.debian.org\\r\\n\\r\\n")
print(s.recv(64).split(b" ")[0].decode())
"""


def test_names_resolve_and_the_outside_is_reached_through_the_host(
        runm: Runm, tmp_path: Path, python_rootfs: Path) -> None:
    """slirp's DNS forwarder (10.0.2.3) asks the host's resolver; connections go out through
    the host's NAT. (deb.debian.org: the one outside name these machines can reach.)"""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {DNS}\n")
    b = make_busybox_bundle(tmp_path / "out", ["python3", "-c", OUTSIDE])
    config = json.loads((b / "config.json").read_text())
    config["root"] = {"path": str(python_rootfs), "readonly": True}
    config["process"]["env"] = ["PATH=/usr/bin:/bin"]
    config["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind",
                             "source": str(resolv), "options": ["rbind", "ro"]})
    namespaces = config["linux"]["namespaces"]  # no netns of its own: the VM's network
    config["linux"]["namespaces"] = [ns for ns in namespaces if ns["type"] != "network"]
    (b / "config.json").write_text(json.dumps(config))
    result = runm.run("run", "-b", str(b), "outside")
    assert result.returncode == 0, result.stderr.decode()
    address, status = result.stdout.decode().split()
    socket.inet_aton(address)  # an IPv4 address, resolved in the container
    assert status.startswith("HTTP/"), "an answer from outside"


def test_a_taken_host_port_is_a_clear_error_before_any_vm(runm: Runm, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runm.run("run", "-p", f"127.0.0.1:{port}:80", "-b",
                          str(httpd_bundle(tmp_path)), "busy")
    assert result.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}/tcp: address already in use".encode() in result.stderr
    assert not (runm.root / "busy").exists()
    assert not (tmp_path / "vm").exists() or not any((tmp_path / "vm").iterdir())


@pytest.mark.parametrize("bad", ["80", "x:80", "1:2:3:4", "127.0.0.1:0:80", "8080:80/sctp",
                                 "::1:8080:80"])
def test_bad_publish_values_are_rejected(runm: Runm, tmp_path: Path, bad: str) -> None:
    result = runm.run("run", "-p", bad, "-b", str(httpd_bundle(tmp_path)), "bad")
    assert result.returncode == 1
    assert b"invalid publish" in result.stderr or b"only IPv4" in result.stderr


@pytest.fixture
def host_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_container_reaches_the_hosts_loopback_through_the_gateway(
        runm: Runm, tmp_path: Path, host_server: int) -> None:
    b = make_busybox_bundle(tmp_path / "b", [
        "wget", "-q", "-O", "-", f"http://{GATEWAY}:{host_server}/"])
    config = json.loads((b / "config.json").read_text())
    # a network namespace the caller prepared on the host: "give it a network"
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = "/var/run/netns/made-by-the-caller"
    (b / "config.json").write_text(json.dumps(config))
    result = runm.run("run", "-b", str(b), "client")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello from the host\n"


def test_a_new_empty_network_namespace_has_loopback_only(runm: Runm, tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b", ["ls", "/sys/class/net"])
    result = runm.run("run", "-b", str(b), "none")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split() == [b"lo"]


@pytest.fixture
def caller_netns(tmp_path: Path) -> Iterator[str]:
    """A network namespace as podman's CNI bridge leaves one for its container: a veth whose
    end inside has 10.77.0.2/24 and a default route through the host's end, 10.77.0.1."""
    import subprocess

    name = f"runm-test-{tmp_path.name}"[-40:]
    host_end = f"rt{abs(hash(name)) % 10**8}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
                      "netns", name],
                     ["ip", "addr", "add", "10.77.0.1/24", "dev", host_end],
                     ["ip", "link", "set", host_end, "up"],
                     ["ip", "-n", name, "addr", "add", "10.77.0.2/24", "dev", "eth0"],
                     ["ip", "-n", name, "link", "set", "eth0", "up"],
                     ["ip", "-n", name, "link", "set", "lo", "up"],
                     ["ip", "-n", name, "route", "add", "default", "via", "10.77.0.1"]):
            subprocess.run(argv, check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "link", "del", host_end], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.parametrize("snapshot", ["1", "0"], ids=["restored", "cold"])
def test_the_callers_network_namespace_is_the_containers_network(
        runm: Runm, tmp_path: Path, caller_netns: str, snapshot: str) -> None:
    """podman, CNI and Kubernetes give the container a namespace with an address on their
    bridge: under runm, as under runc, the container has that address and routes, what is
    sent to it reaches the container, and the container reaches the bridge's other side."""
    import subprocess

    runm = Runm(root=runm.root, env={**runm.env, "RUNM_SNAPSHOT": snapshot})
    b = httpd_bundle(tmp_path)
    config = json.loads((b / "config.json").read_text())
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = caller_netns
    (b / "config.json").write_text(json.dumps(config))
    server = http.server.ThreadingHTTPServer(("10.77.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert runm.run_detached("run", "-d", "-b", str(b), "web").returncode == 0
        assert wait_until(lambda: fetch("http://10.77.0.2:80/") == b"hello from httpd\n",
                          timeout=30)
        seen = runm.run("exec", "web", "sh", "-c", "ip addr show eth0; ip route; wget -q -O "
                        f"/dev/null http://10.77.0.1:{server.server_address[1]}/ && echo out-ok")
        assert seen.returncode == 0, seen.stderr.decode()
        text = seen.stdout.decode()
        assert "inet 10.77.0.2/24" in text and "default via 10.77.0.1 dev eth0" in text, text
        assert text.endswith("out-ok\n"), text
    finally:
        server.shutdown()
        server.server_close()
        runm.run("delete", "-f", "web")
    inside = subprocess.run(["ip", "-n", caller_netns.rsplit("/", 1)[1], "-j", "link"],
                            capture_output=True, check=True).stdout.decode()
    assert "runm0" not in inside, "the tap goes with the VM"
    qdiscs = subprocess.run(["tc", "-n", caller_netns.rsplit("/", 1)[1], "qdisc", "show",
                             "dev", "eth0"], capture_output=True, check=True).stdout.decode()
    assert "ingress" not in qdiscs, "the caller's interface is given back"


def test_ports_published_by_runm_still_work_beside_the_callers_network(
        runm: Runm, tmp_path: Path, caller_netns: str) -> None:
    """A port published with io.runm.publish (QEMU's user-mode network) and the caller's
    address both reach the container; its default route is the caller's."""
    port = free_port()
    b = httpd_bundle(tmp_path, {"io.runm.publish": f"127.0.0.1:{port}:80"})
    config = json.loads((b / "config.json").read_text())
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = caller_netns
    (b / "config.json").write_text(json.dumps(config))
    try:
        assert runm.run_detached("run", "-d", "-b", str(b), "both").returncode == 0
        assert wait_until(lambda: fetch(f"http://127.0.0.1:{port}/") == b"hello from httpd\n",
                          timeout=30)
        assert fetch("http://10.77.0.2:80/") == b"hello from httpd\n"
        seen = runm.run("exec", "both", "sh", "-c", "ip route")
        routes = seen.stdout.decode() + seen.stderr.decode()
        assert "default via 10.77.0.1 dev eth0" in routes, routes
    finally:
        runm.run("delete", "-f", "both")
