"""Bind mounts into a process's own mount namespace (a page-sharing clone's 9p export), on
real namespaces: seen there, never on the host, gone with the process."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runm.vm import nsmount


@pytest.fixture
def holder() -> Iterator[int]:
    """A process in a mount namespace of its own, as a clone's QEMU is."""
    proc = subprocess.Popen(["sleep", "600"], preexec_fn=nsmount.new_namespace)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def seen_by(pid: int, path: Path) -> Path:
    return Path(f"/proc/{pid}/root") / path.relative_to("/")


def mount_points(pid: int | str) -> list[str]:
    return [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]


def test_a_bind_is_seen_in_the_namespace_only_and_goes_when_unmounted(
        holder: int, tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "f").write_text("shared\n")
    nsmount.bind_into(holder, source, target)
    assert (seen_by(holder, target) / "f").read_text() == "shared\n"
    assert str(target) in mount_points(holder)
    assert str(target) not in mount_points("self")
    (seen_by(holder, target) / "new").write_text("written\n")
    assert (source / "new").read_text() == "written\n"
    nsmount.unmount_in(holder, target)
    assert str(target) not in mount_points(holder)
    assert not (seen_by(holder, target) / "f").exists()


def test_a_read_only_bind_refuses_writes(holder: int, tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    nsmount.bind_into(holder, source, target, readonly=True)
    with pytest.raises(OSError) as refused:
        (seen_by(holder, target) / "f").write_text("no\n")
    assert refused.value.errno == errno.EROFS
    assert not (source / "f").exists()


def test_a_mount_made_on_the_host_after_the_namespace_is_what_the_bind_shows(
        holder: int, tmp_path: Path) -> None:
    """Podman mounts a container's rootfs after the pooled VM's QEMU started: the bind must
    carry the host's view of the source, mounts below it included."""
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "rootfs").mkdir(parents=True)
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "runmtest", str(source / "rootfs")], check=True)
    try:
        (source / "rootfs" / "f").write_text("in the later mount\n")
        nsmount.bind_into(holder, source, target)
        assert (seen_by(holder, target) / "rootfs" / "f").read_text() == "in the later mount\n"
    finally:
        subprocess.run(["umount", "-l", str(source / "rootfs")], check=True)


def test_failures_say_what_failed(holder: int, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(OSError, match=r"cloning the mounts at .*missing") as missing:
        nsmount.bind_into(holder, tmp_path / "missing", target)
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(OSError, match=r"mounting .* on .*nowhere") as nowhere:
        nsmount.bind_into(holder, tmp_path, tmp_path / "nowhere")
    assert nowhere.value.errno == errno.ENOENT
    with pytest.raises(OSError, match="unmounting") as not_mounted:
        nsmount.unmount_in(holder, target)
    assert not_mounted.value.errno == errno.EINVAL
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(FileNotFoundError):
        nsmount.unmount_in(gone.pid, target)
