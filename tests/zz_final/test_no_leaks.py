"""Runs last: after the whole suite, no VM process and no share mount may be left anywhere."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import runm_mounts, vm_processes, wait_until


def test_nothing_left_behind_by_the_suite() -> None:
    assert wait_until(lambda: not vm_processes(), timeout=20), vm_processes()
    assert not runm_mounts()
    run_dir = Path("/run/runm-vm")
    assert not run_dir.exists() or not any(run_dir.iterdir()), list(run_dir.iterdir())
