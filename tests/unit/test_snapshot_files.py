"""The snapshot RAM file handling: zero pages become holes, restores copy the data exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runm.sandbox.snapshot import PAGE, punch_zero_pages
from runm.vm.base import VMError
from runm.vm.qemu import empty_ram_copy, fill_ram_copy


def make_ram(path: Path) -> bytes:
    """4 MiB: data pages, written zero pages, a never-written hole, and a partial page."""
    size = 4 << 20
    pages = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for index in (0, 1, 7, 300, 301, 1023):
            chunk = os.urandom(PAGE)
            pages[index * PAGE:(index + 1) * PAGE] = chunk
            f.seek(index * PAGE)
            f.write(chunk)
        f.seek(100 * PAGE)
        f.write(bytes(50 * PAGE))  # allocated, but zero
        f.seek(500 * PAGE + 17)
        f.write(b"x")
        pages[500 * PAGE + 17] = ord("x")
    return bytes(pages)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_zero_pages_become_holes_and_the_content_is_unchanged(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    content = make_ram(ram)
    before = allocated(ram)
    with open(ram, "rb+") as f:
        freed = punch_zero_pages(f.fileno(), chunk=64 << 10)
    assert freed >= 50 * PAGE
    assert allocated(ram) <= before - 50 * PAGE
    assert allocated(ram) <= 7 * PAGE
    assert ram.read_bytes() == content


def test_a_file_of_only_holes_needs_no_punching(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(1 << 20)
    with open(ram, "rb+") as f:
        assert punch_zero_pages(f.fileno()) == 0


def test_private_copy_has_the_same_bytes_and_stays_sparse(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    content = make_ram(ram)
    with open(ram, "rb+") as f:
        punch_zero_pages(f.fileno())
    fd = empty_ram_copy(ram, len(content))
    try:
        assert os.fstat(fd).st_blocks == 0
        fill_ram_copy(fd, ram)
        assert os.fstat(fd).st_size == len(content)
        assert os.pread(fd, len(content), 0) == content
        assert os.fstat(fd).st_blocks * 512 <= 8 * PAGE
    finally:
        os.close(fd)
    ram.write_bytes(b"data")  # the copy is private: the source may change afterwards


def test_private_copy_refuses_a_ram_file_of_the_wrong_size(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(PAGE))
    with pytest.raises(VMError, match="expected 8192"):
        empty_ram_copy(ram, 2 * PAGE)
