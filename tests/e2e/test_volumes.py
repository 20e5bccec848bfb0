"""Bind mounts from config.json, inside the VM (part of issue 5): shared at their host paths."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from runm.sandbox.spec import make_busybox_bundle
from tests.conftest import Runm, vm_processes, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks")]


def bundle_with(tmp_path: Path, args: list[str],
                mounts: list[dict]) -> Path:  # type: ignore[type-arg]
    bundle = make_busybox_bundle(tmp_path / "bundle", args)
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] += mounts
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_bind_mounts_rw_ro_and_files(runm: Runm, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("original\n")
    single = tmp_path / "single.conf"
    single.write_text("key=value\n")
    script = ("cat /data/in.txt; echo written-in-vm > /data/out.txt; "
              "dd if=/dev/urandom of=/data/big bs=1M count=100 2>/dev/null; "
              "sha256sum /data/big > /data/big.sha; "
              "cat /etc/single.conf; "
              "if echo x > /ro/keep.txt 2>/dev/null; then echo ro-writable; "
              "else echo ro-refused; fi")
    bundle = bundle_with(tmp_path, ["sh", "-c", script], [
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "rw"]},
        {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["rbind", "ro"]},
        {"destination": "/etc/single.conf", "type": "bind", "source": str(single),
         "options": ["bind", "ro"]},
    ])
    result = runm.run("run", "-b", str(bundle), "vol1", timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == ["from the host", "key=value", "ro-refused"]
    assert (data / "out.txt").read_text() == "written-in-vm\n", "writes reach the host"
    assert (ro / "keep.txt").read_text() == "original\n"
    big = (data / "big").read_bytes()
    assert len(big) == 100 << 20
    assert (data / "big.sha").read_text().split()[0] == hashlib.sha256(big).hexdigest()


def test_missing_bind_source_fails_before_any_vm(runm: Runm, tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, ["true"], [
        {"destination": "/x", "type": "bind", "source": str(tmp_path / "nope"),
         "options": ["rbind"]}])
    result = runm.run("run", "-b", str(bundle), "vol2")
    assert result.returncode == 1
    assert b"invalid mount /x" in result.stderr and b"no such file or directory" in result.stderr
    assert not (tmp_path / "vm").exists() or not any((tmp_path / "vm").iterdir())


def test_memory_limit_is_enforced_in_the_guest(runm: Runm, tmp_path: Path) -> None:
    """The spec's memory limit applies in the guest's cgroup v2: a hog is OOM-killed (137)."""
    bundle = bundle_with(tmp_path, ["dd", "if=/dev/zero", "of=/dev/shm/hog", "bs=1M",
                                    "count=200"], [])
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["resources"]["memory"] = {"limit": 64 << 20, "swap": 64 << 20}
    for mount in config["mounts"]:
        if mount["destination"] == "/dev/shm":  # room for the hog beyond the limit
            mount["options"] = [o for o in mount["options"] if not o.startswith("size=")] + \
                ["size=300m"]
    (bundle / "config.json").write_text(json.dumps(config))
    result = runm.run("run", "-b", str(bundle), "hog")
    assert result.returncode == 137, (result.stdout, result.stderr)
    log = tmp_path / "hog.log"
    again = runm.run("--log", str(log), "run", "-b", str(bundle), "hog2")
    assert again.returncode == 137
    assert "the OOM killer took" in log.read_text(), "the caller's log says why it died"
    assert "memory 256 MiB (memory limit + overhead)" in log.read_text(), \
        "the VM is sized from the spec's limit"


def test_an_oom_kill_is_reported_by_events(runm: Runm, tmp_path: Path) -> None:
    """A process of a running container killed for memory: `runm events` says "oom"."""
    import subprocess

    script = ("echo started; while [ ! -e /tmp/go ]; do sleep 0.1; done; "
              "dd if=/dev/zero of=/dev/null bs=200M count=1; echo survived; sleep 600")
    bundle = bundle_with(tmp_path, ["sh", "-c", script], [])
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["resources"]["memory"] = {"limit": 64 << 20, "swap": 64 << 20}
    config["root"]["readonly"] = False
    (bundle / "config.json").write_text(json.dumps(config))
    assert runm.run_detached("run", "-d", "-b", str(bundle), "oomy").returncode == 0
    events = runm.popen("events", "--interval", "1s", "oomy", stdout=subprocess.PIPE)
    try:
        assert events.stdout is not None
        first = json.loads(events.stdout.readline())
        assert first["type"] == "stats" and "runm_oom_kills" not in first
        assert runm.run("exec", "oomy", "touch", "/tmp/go").returncode == 0
        for _ in range(120):  # one stats event per second until the oom one
            event = json.loads(events.stdout.readline())
            if event["type"] == "oom":
                break
        assert event == {"type": "oom", "id": "oomy"}
    finally:
        events.kill()
        events.wait()
        if events.stdout is not None:
            events.stdout.close()
        runm.run("delete", "-f", "oomy")


def test_tmpfs_mounts_work_and_leave_nothing_on_the_host(runm: Runm, tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, ["sh", "-c", "echo x > /scratch/f && cat /scratch/f && "
                                    "grep ' /scratch ' /proc/mounts | cut -d' ' -f3,4"],
                         [{"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "size=1m"]}])
    result = runm.run("run", "-b", str(bundle), "tmp1")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "x"
    assert lines[1].startswith("tmpfs rw,nosuid"), lines
    assert not (bundle / "rootfs" / "scratch" / "f").exists()


def guest_ram_mib(qemu_pid: int) -> int:
    """MiB of host memory holding a VM's guest RAM (its memfd's allocated blocks)."""
    for fd in Path(f"/proc/{qemu_pid}/fd").iterdir():
        try:
            if "runm-guest-ram" in os.readlink(fd):
                return fd.stat().st_blocks * 512 >> 20
        except OSError:
            continue
    raise AssertionError(f"qemu {qemu_pid} has no guest RAM memfd")


def test_memory_a_container_frees_goes_back_to_the_host(runm: Runm, tmp_path: Path) -> None:
    """The guest reports free pages (virtio-balloon free page reporting): after a 256 MiB
    spike the host no longer holds that memory for the idle container."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = ("dd if=/dev/zero of=/dev/null bs=256M count=1 2>/dev/null; "
              "touch /marks/freed; sleep 600")
    bundle = bundle_with(tmp_path, ["sh", "-c", script],
                         [{"destination": "/marks", "type": "bind", "source": str(marks),
                           "options": ["rbind", "rw"]}])
    ran = runm.run_detached("run", "-d", "-b", str(bundle), "spike")
    assert ran.returncode == 0, ran.stderr.decode()
    try:
        qemu = next(pid for pid, cmd in vm_processes().items()
                    if "qemu-system" in cmd and "-name spike " in cmd)
        assert wait_until(lambda: (marks / "freed").exists(), timeout=60)
        assert wait_until(lambda: guest_ram_mib(qemu) < 200, timeout=60), guest_ram_mib(qemu)
    finally:
        assert runm.run("delete", "-f", "spike").returncode == 0
