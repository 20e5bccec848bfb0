"""write_atomically: readers see the old file or the new one, and no temporary file stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from runm.atomicfile import write_atomically


def test_the_new_text_replaces_the_old_and_nothing_else_stays(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_missing_directory_is_an_error_and_leaves_the_target_alone(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "gone" / "state.json", "x")
