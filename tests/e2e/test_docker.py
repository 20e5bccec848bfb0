"""Docker 20.10 with runm added as a runtime (`dockerd --add-runtime runm=...`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.callers import Dockerd

pytest_plugins = ["tests.e2e.callers"]
pytestmark = [pytest.mark.callers, pytest.mark.vm]


def test_docker_run_exit_code_detached_exec_stop_rm(dockerd: Dockerd) -> None:
    run = ["run", "--runtime", dockerd.runtime_name, "--network", "none"]
    assert dockerd.docker(*run, "--rm", dockerd.image, "echo", "hi").stdout == "hi\n"
    failed = dockerd.docker(*run, "--rm", dockerd.image, "sh", "-c", "exit 7", check=False)
    assert failed.returncode == 7

    cid = dockerd.docker(*run, "-d", "--name", "svc", dockerd.image, "sleep", "600")
    assert cid.stdout.strip()
    assert dockerd.docker("exec", "svc", "echo", "inside").stdout == "inside\n"
    assert dockerd.docker("inspect", "-f", "{{.State.Running}}", "svc").stdout.strip() == "true"
    dockerd.docker("stop", "-t", "1", "svc", timeout=120)
    assert dockerd.docker("inspect", "-f", "{{.State.ExitCode}}", "svc").stdout.strip() == "137"
    dockerd.docker("rm", "svc")
    assert dockerd.docker("ps", "-aq").stdout == ""


def test_a_docker_bridge_network_is_the_containers(dockerd: Dockerd) -> None:
    """Docker configures a container's network from a prestart hook (libnetwork-setkey)
    that runc runs on the host: runm runs it too, on a namespace of its own, and brings
    that namespace into the VM. (A user-defined bridge: the fixture's dockerd runs without
    docker0 and iptables, to leave the host as it was.)"""
    from tests.conftest import fetch, wait_until

    dockerd.docker("network", "create", "--driver", "bridge", "--subnet", "10.66.0.0/24",
                   "-o", "com.docker.network.bridge.name=runmtest0", "runmnet")
    try:
        dockerd.docker("run", "-d", "--runtime", dockerd.runtime_name, "--network", "runmnet",
                       "--name", "web", dockerd.image, "sh", "-c",
                       "mkdir -p /www && echo hello through docker > /www/index.html && "
                       "exec httpd -f -p 80 -h /www", timeout=120)
        address = dockerd.docker("inspect", "-f",
                                 "{{.NetworkSettings.Networks.runmnet.IPAddress}}",
                                 "web").stdout.strip()
        assert address.startswith("10.66.0."), address
        assert wait_until(lambda: fetch(f"http://{address}/") == b"hello through docker\n",
                          timeout=30)
        seen = dockerd.docker("exec", "web", "sh", "-c", "ip addr show eth0").stdout
        assert f"inet {address}/24" in seen, seen
    finally:
        dockerd.docker("rm", "-f", "web", check=False, timeout=120)
        dockerd.docker("network", "rm", "runmnet", check=False)
