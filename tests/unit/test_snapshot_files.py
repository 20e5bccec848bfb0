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


def test_a_snapshot_that_loses_first_requests_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a snapshot restores it once (_answers_first_request): one that loses the first
    request of every restore is made again, up to MAKE_ATTEMPTS times, then kept."""
    import asyncio

    from runm.guest.image import GuestImage
    from runm.sandbox import snapshot
    from runm.vm.base import VMConfig
    from runm.vm.qemu import QemuVM

    image_dir = tmp_path / "image"
    image_dir.mkdir()
    image = GuestImage(image_dir / "vmlinux", image_dir / "initrd.img",
                       image_dir / "rootfs.erofs", "d" * 64, "6.1.0-test")
    config = VMConfig(name="c", kernel=image.kernel, initrd=image.initrd, rootfs=image.rootfs,
                      run_dir=tmp_path / "run", memory_mib=1)
    made: list[Path] = []

    async def make(image: GuestImage, like: VMConfig, accel: str, folder: Path,
                   run_base: Path) -> None:
        assert not (folder / "ram").exists(), "a remake starts from nothing"
        made.append(folder)
        (folder / "ram").write_bytes(bytes(1 << 20))
        (folder / "state").write_bytes(b"state")

    answers: list[bool] = []

    async def check(*args: object) -> bool:
        return answers.pop(0)

    monkeypatch.setattr(snapshot, "_make_snapshot", make)
    monkeypatch.setattr(snapshot, "_answers_first_request", check)
    for answered, attempts in (([False, True], 2), ([False] * 5, snapshot.MAKE_ATTEMPTS)):
        made.clear()
        answers[:] = answered
        files = asyncio.run(snapshot.ensure_snapshot(image, QemuVM(config), "tcg",
                                                     tmp_path / "runbase"))
        assert len(made) == attempts
        assert files.ram.read_bytes() == bytes(1 << 20)
        assert snapshot.find_snapshot(image, QemuVM(config), "tcg") == files
        snapshot.discard_snapshot(files)
