"""Each real caller runs a busybox container through the runtime under test.

The runtime is plain runc unless `runtime_binary` is overridden or RUNM_E2E_RUNTIME is set
(e.g. RUNM_E2E_RUNTIME=/usr/local/bin/runm): see tests/e2e/callers.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported for real by pytest_plugins, so that pytest can rewrite it
    from tests.e2e.callers import Containerd, Dockerd, Podman, RuntimeTrace

pytest_plugins = ["tests.e2e.callers"]
pytestmark = pytest.mark.callers


def assert_went_through_runtime(trace: RuntimeTrace, since: int) -> None:
    verbs = trace.verbs(since)
    assert "create" in verbs and "start" in verbs, verbs


def test_podman_run(podman: Podman, runtime_trace: RuntimeTrace) -> None:
    since = runtime_trace.mark()
    result = podman.run("run", "--rm", "--network=none", podman.image, "echo", "hi")
    assert result.stdout == "hi\n"
    assert_went_through_runtime(runtime_trace, since)
    assert podman.run("ps", "-aq").stdout == ""


def test_ctr_run(containerd: Containerd, runtime: str, runtime_trace: RuntimeTrace) -> None:
    since = runtime_trace.mark()
    result = containerd.ctr("run", "--rm", *containerd.runtime_flags(runtime),
                            containerd.image, "smoke-ctr", "echo", "hi")
    assert result.stdout == "hi\n"
    assert_went_through_runtime(runtime_trace, since)
    assert containerd.ctr("containers", "ls", "-q").stdout == ""


def test_docker_run(dockerd: Dockerd, runtime_trace: RuntimeTrace) -> None:
    since = runtime_trace.mark()
    result = dockerd.docker("run", "--rm", "--runtime", dockerd.runtime_name, "--network", "none",
                            dockerd.image, "echo", "hi")
    assert result.stdout == "hi\n"
    assert_went_through_runtime(runtime_trace, since)
    assert dockerd.docker("ps", "-aq").stdout == ""
