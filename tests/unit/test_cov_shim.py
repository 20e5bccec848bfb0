"""containerd-shim-runm-v2's command line: -v, usage errors, the socket name containerd
expects, the delete action's output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import runm
from runm.proto import task as api
from runm.shim import main as shim


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:2] == ["containerd-shim-runm-v2:",
                                             f"  Version:  {runm.__version__}"]
    assert captured.err == ""


def test_version_flag_among_other_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["-namespace", "k8s.io", "--v"]) == 0
    assert runm.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["serve"], ["-namespace", "default", "bogus"]])
def test_unknown_actions_print_usage(argv: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: containerd-shim-runm-v2" in captured.err


def test_start_needs_an_id_and_a_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["start"]) == 2
    assert "-id and -namespace are required" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["-h"]) == 0
    assert "io.containerd.runm.v2" in capsys.readouterr().err


def test_socket_address_is_containerds() -> None:
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert shim.socket_address("/run/containerd/containerd.sock", "default", "c1") == \
        f"unix:///run/containerd/s/{digest}"


def test_group_is_the_sandbox_id_when_annotated(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"annotations": {"io.kubernetes.cri.sandbox-id": "pod9"}}')
    assert shim._group_of(tmp_path, "c1") == "pod9"
    (tmp_path / "config.json").write_text("{not json")
    assert shim._group_of(tmp_path, "c1") == "c1"


def test_delete_action_prints_a_delete_response(tmp_path: Path,
                                                capsysbinary: pytest.CaptureFixture[bytes]
                                                ) -> None:
    (tmp_path / "rootfs").mkdir()
    argv = ["-namespace", "ns", "-address", str(tmp_path / "c.sock"), "-id", "gone",
            "-bundle", str(tmp_path), "delete"]
    assert shim.main(argv) == 0
    response = api.DeleteResponse.decode(capsysbinary.readouterr().out)
    assert response.exit_status == 137 and response.exited_at is not None
    assert shim.main(argv) == 0  # idempotent
