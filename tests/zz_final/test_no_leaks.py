"""Runs last: after the whole suite, no VM process and no share mount may be left anywhere."""

from __future__ import annotations

from tests.conftest import (
    VM_RUN_DIR,
    VM_RUN_DIRS_BEFORE,
    _entries,
    runm_mounts,
    vm_processes,
    wait_until,
)


def test_nothing_left_behind_by_the_suite() -> None:
    assert wait_until(lambda: not vm_processes(), timeout=20), vm_processes()
    assert not runm_mounts()
    left = _entries(VM_RUN_DIR) - VM_RUN_DIRS_BEFORE
    assert not left, f"per-VM run dirs left in {VM_RUN_DIR}: {sorted(left)}"
