"""Parsing and checking published ports (`-p` and the io.runm.publish annotation)."""

from __future__ import annotations

import socket

import pytest

from runm.errors import RunmError
from runm.net.ports import (
    PUBLISH_ANNOTATION,
    check_available,
    parse_publish,
    publish_list,
    resolve_publish,
)
from runm.vm.base import PortForward


@pytest.mark.parametrize("text,want", [
    ("8080:80", PortForward("tcp", "0.0.0.0", 8080, 80)),
    ("127.0.0.1:8080:80", PortForward("tcp", "127.0.0.1", 8080, 80)),
    ("127.0.0.1:5353:53/udp", PortForward("udp", "127.0.0.1", 5353, 53)),
    ("[127.0.0.1]:1:65535/tcp", PortForward("tcp", "127.0.0.1", 1, 65535)),
    (":9000:90", PortForward("tcp", "0.0.0.0", 9000, 90)),
])
def test_docker_spellings_parse(text: str, want: PortForward) -> None:
    assert parse_publish(text) == want
    assert parse_publish(str(want)) == want, "str() round-trips (the monitor's config)"


@pytest.mark.parametrize("text,message", [
    ("80", "want [IP:]HOSTPORT"),
    ("a:b:c:d", "is not an IP address"),
    ("host:80:80", "is not an IP address"),
    ("::1:80:80", "only IPv4 host addresses"),
    ("8080:80/sctp", "protocol must be tcp or udp"),
    ("0:80", "is not a port"),
    ("8080:70000", "is not a port"),
    ("x:80", "is not a port"),
])
def test_bad_values_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RunmError, match="invalid publish") as err:
        parse_publish(text)
    assert message in err.value.message


def test_flags_and_annotation_combine_and_duplicates_are_refused() -> None:
    got = publish_list(["8080:80"], {PUBLISH_ANNOTATION: "127.0.0.1:5353:53/udp, 9090:90"})
    assert [f.host_port for f in got] == [8080, 5353, 9090]
    assert publish_list([], {}) == []
    with pytest.raises(RunmError, match="given twice"):
        publish_list(["8080:80"], {PUBLISH_ANNOTATION: "8080:81"})
    assert len(publish_list(["8080:80"], {PUBLISH_ANNOTATION: "8080:80/udp"})) == 2


def test_a_taken_port_is_refused_and_a_free_one_passes() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RunmError, match="address already in use"):
            check_available(PortForward("tcp", "127.0.0.1", port, 80))
        with pytest.raises(RunmError, match="address already in use"):
            resolve_publish([f"127.0.0.1:{port}:80"], {})
    check_available(PortForward("tcp", "127.0.0.1", port, 80))
