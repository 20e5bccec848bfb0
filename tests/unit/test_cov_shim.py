"""containerd-shim-runm-v2: containerd probes it with -v; everything else is not there yet."""

from __future__ import annotations

import pytest

import runm
from runm.shim import main as shim


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["containerd-shim-runm-v2:",
                                         f"  Version:  {runm.__version__}"]
    assert captured.err == ""


def test_version_flag_among_other_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["-namespace", "k8s.io", "-v"]) == 0
    assert runm.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [[], ["start"], ["-namespace", "default", "-id", "c1", "start"], ["delete"]])
def test_other_invocations_fail_clearly(argv: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "containerd-shim-runm-v2" in captured.err
    assert "not implemented" in captured.err


def test_arguments_default_to_sys_argv(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", ["containerd-shim-runm-v2", "-v"])
    assert shim.main() == 0
    assert capsys.readouterr().out.startswith("containerd-shim-runm-v2:")
    monkeypatch.setattr("sys.argv", ["containerd-shim-runm-v2"])
    assert shim.main() == 1
