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
