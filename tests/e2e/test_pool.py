"""The warm pool: starts take paused, warmed-up VMs; the pool refills; nothing leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runm.sandbox.spec import make_busybox_bundle
from tests.conftest import Runm, vm_processes, wait_until
from tests.e2e.images import sha256_file

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks")]

TAKEN = "taken from the pool"


def pool_members(runm: Runm) -> list[dict]:  # type: ignore[type-arg]
    result = runm.run("pool", "list", "--format", "json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)["members"]  # type: ignore[no-any-return]


@pytest.fixture
def pool(runm: Runm) -> Iterator[Runm]:
    result = runm.run("pool", "fill", "1")
    assert result.returncode == 0, result.stderr.decode()
    members = pool_members(runm)
    assert [m["state"] for m in members] == ["ready"]
    yield runm
    assert runm.run("pool", "drain").returncode == 0
    assert wait_until(lambda: not pool_members(runm), timeout=30)


def test_a_start_takes_a_warm_vm_and_the_pool_refills(pool: Runm, tmp_path: Path) -> None:
    first = pool_members(pool)[0]
    data = tmp_path / "data"
    data.mkdir()
    b = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "cat; echo out > /data/f; exit 4"])
    config = json.loads((b / "config.json").read_text())
    config["mounts"].append({"destination": "/data", "type": "bind", "source": str(data),
                             "options": ["rbind", "rw"]})
    (b / "config.json").write_text(json.dumps(config))
    log = tmp_path / "run.log"
    result = pool.run("--log", str(log), "run", "-b", str(b), "p1", input=b"in\n")
    assert result.returncode == 4, result.stderr.decode()
    assert result.stdout == b"in\n"
    assert (data / "f").read_text() == "out\n"
    assert TAKEN in log.read_text()
    assert not any(str(first["qemu_pid"]) == str(p) for p in vm_processes()), \
        "the taken VM must be gone once its container is"

    def refilled() -> bool:
        members = pool_members(pool)
        return len(members) == 1 and members[0]["state"] == "ready" and \
            members[0]["run_dir"] != first["run_dir"]
    assert wait_until(refilled, timeout=120), pool_members(pool)


def test_a_pooled_vm_takes_as_many_shares_as_a_restored_one(pool: Runm, tmp_path: Path) -> None:
    """The warm-up's bundle is gone again, and a container with as many shares as a restored
    VM can take (the bundle and 7 read-only volumes: each a bind in the pooled VM's 9p export)
    still gets the pooled VM."""
    member = pool_members(pool)[0]
    run_dir = Path(member["run_dir"])
    assert not (run_dir / "runm-warmup").exists(), "the warm-up bundle must be gone"
    assert not [cmd for cmd in vm_processes().values()
                if "virtiofsd" in cmd.split(" ", 1)[0]], "the warm-up's virtiofsd must be gone"
    b = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "cat /v*/f"])
    config = json.loads((b / "config.json").read_text())
    for i in range(7):
        volume = tmp_path / f"vol{i}"
        volume.mkdir()
        (volume / "f").write_text(f"{i}\n")
        config["mounts"].append({"destination": f"/v{i}", "type": "bind",
                                 "source": str(volume), "options": ["rbind", "ro"]})
    (b / "config.json").write_text(json.dumps(config))
    log = tmp_path / "run.log"
    result = pool.run("--log", str(log), "run", "-b", str(b), "ports8")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"".join(f"{i}\n".encode() for i in range(7))
    assert TAKEN in log.read_text(), log.read_text()


def snapshot_ram_mapping(qemu_pid: int) -> tuple[Path, dict[str, int]]:
    """The snapshot RAM file a clone's QEMU maps, and that mapping's smaps fields (kB)."""
    path, fields = None, {}
    for line in Path(f"/proc/{qemu_pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            if path is not None:
                break
            if head[-1].endswith("/ram") and "/snapshots/" in head[-1]:
                path = Path(head[-1])
        elif path is not None and head[0].endswith(":") and len(head) == 3:
            fields[head[0][:-1]] = int(head[1])
    assert path is not None, f"QEMU {qemu_pid} does not map a snapshot's RAM file"
    return path, fields


def test_pooled_vms_share_the_snapshot_pages_and_never_write_them(runm: Runm,
                                                                  tmp_path: Path) -> None:
    """Pooled VMs map the snapshot's RAM copy-on-write: two of them share its pages in the
    host's page cache, and what a container does in one (use memory and free it again, with
    free page reporting off) leaves the file as it was for the others."""
    result = runm.run("pool", "fill", "2")
    assert result.returncode == 0, result.stderr.decode()
    try:
        members = pool_members(runm)
        assert [m["state"] for m in members] == ["ready", "ready"]
        mappings = [snapshot_ram_mapping(int(m["qemu_pid"])) for m in members]
        ram = mappings[0][0]
        assert mappings[1][0] == ram
        for _, fields in mappings:  # the pages both read (kernel, agent, runc) are shared
            assert fields["Shared_Clean"] > 16 * 1024, fields
        before = sha256_file(ram)
        b = make_busybox_bundle(tmp_path / "b", ["sh", "-c",
            "dd if=/dev/zero of=/dev/shm/x bs=1M count=64 2>/dev/null && rm /dev/shm/x && "
            "ls /sys/bus/virtio/drivers/virtio_balloon/"])
        log = tmp_path / "run.log"
        result = runm.run("--log", str(log), "run", "-b", str(b), "c1")
        assert result.returncode == 0, result.stderr.decode()
        assert TAKEN in log.read_text()
        assert b"virtio" not in result.stdout, "free page reporting must be off in a clone"
        assert sha256_file(ram) == before
    finally:
        assert runm.run("pool", "drain").returncode == 0
        assert wait_until(lambda: not pool_members(runm), timeout=60)


def test_a_pooled_vms_shares_are_mounts_of_its_own_and_writes_reach_the_host(
        pool: Runm, tmp_path: Path) -> None:
    """A pooled VM serves the bundle and volumes over 9p from bind mounts that exist only in
    its QEMU's mount namespace: none on the host. Writes are on the host at once, and a
    read-only volume stays read-only."""
    qemu_pid = pool_members(pool)[0]["qemu_pid"]
    data, ro = tmp_path / "data", tmp_path / "ro"
    data.mkdir()
    ro.mkdir()
    (ro / "f").write_text("kept\n")
    b = make_busybox_bundle(tmp_path / "b", ["sleep", "600"])
    config = json.loads((b / "config.json").read_text())
    config["mounts"] += [
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]},
        {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["rbind", "ro"]}]
    (b / "config.json").write_text(json.dumps(config))
    log = tmp_path / "c.log"
    result = pool.run_detached("--log", str(log), "run", "-d", "-b", str(b), "m1")
    assert result.returncode == 0, result.stderr.decode()
    try:
        assert TAKEN in log.read_text() or TAKEN in (pool.root / "m1" / "monitor.log").read_text()
        ex = pool.run("exec", "m1", "sh", "-c", "echo now > /data/f && echo x > /ro/f")
        assert ex.returncode != 0 and b"Read-only file system" in ex.stderr, ex.stderr
        assert (data / "f").read_text() == "now\n"  # while the container runs
        assert (ro / "f").read_text() == "kept\n"
        theirs = Path(f"/proc/{qemu_pid}/mountinfo").read_text()
        ours = Path("/proc/self/mountinfo").read_text()
        assert theirs.count("/9p/") >= 3, theirs  # bundle, rootfs's volume dirs
        assert "/9p/" not in ours
    finally:
        assert pool.run("delete", "-f", "m1").returncode == 0


def test_a_detached_container_runs_in_a_pooled_vm(pool: Runm, tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b", ["sleep", "600"])
    result = pool.run_detached("--log", str(tmp_path / "c.log"), "run", "-d", "-b", str(b), "d1")
    assert result.returncode == 0, result.stderr.decode()
    assert TAKEN in (tmp_path / "c.log").read_text() or \
        TAKEN in (pool.root / "d1" / "monitor.log").read_text()
    ex = pool.run("exec", "d1", "sh", "-c", "echo hi from exec")
    assert ex.stdout == b"hi from exec\n", ex.stderr.decode()
    assert pool.run("kill", "d1", "KILL").returncode == 0
    assert wait_until(lambda: json.loads(pool.run("state", "d1").stdout)["status"] == "stopped")
    assert pool.run("delete", "d1").returncode == 0


def test_a_killed_taker_takes_its_pooled_vm_with_it(pool: Runm, tmp_path: Path) -> None:
    taken = pool_members(pool)[0]
    b = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "echo ready; sleep 600"])
    proc = pool.popen("run", "-b", str(b), "k1", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    assert wait_until(lambda: taken["qemu_pid"] not in vm_processes(), timeout=30), \
        "the keeper must kill the VM of a taker that died"


def test_a_drain_while_members_are_being_prepared_leaves_nothing(runm: Runm) -> None:
    """`runm pool fill 2 --no-wait` then `drain` at once: members caught starting are stopped
    or stop themselves once ready (the pool no longer wants them), and the caller survives."""
    result = runm.run("pool", "fill", "2", "--no-wait")
    assert result.returncode == 0, result.stderr.decode()
    result = runm.run("pool", "drain")
    assert result.returncode == 0, result.stderr.decode()
    assert wait_until(lambda: not pool_members(runm), timeout=120), pool_members(runm)
    assert wait_until(lambda: not [cmd for cmd in vm_processes().values()
                                   if "runm.sandbox.pool" in cmd or "poolwait" in cmd],
                      timeout=60)


def test_bad_pool_size_is_an_error(runm: Runm) -> None:
    result = runm.run("pool", "fill", "-1")
    assert result.returncode == 1
    assert b"invalid pool size -1" in result.stderr
    assert pool_members(runm) == []


def test_without_a_pool_starts_restore_the_snapshot(runm: Runm, tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b", ["true"])
    log = tmp_path / "run.log"
    result = runm.run("--log", str(log), "run", "-b", str(b), "n1")
    assert result.returncode == 0, result.stderr.decode()
    text = log.read_text()
    assert TAKEN not in text and "started from snapshot" in text


def mem_total_kib(runm: Runm, bundle: Path, cid: str, log: Path) -> int:
    result = runm.run("--log", str(log), "run", "-b", str(bundle), cid)
    assert result.returncode == 0, result.stderr.decode()
    return int(result.stdout.split()[1])  # "MemTotal: N kB"


def test_a_pool_per_memory_size_serves_the_containers_of_that_size(runm: Runm,
                                                                    tmp_path: Path) -> None:
    result = runm.run("pool", "fill", "1", "--memory-mib", "256")
    assert result.returncode == 0, result.stderr.decode()
    listing = json.loads(runm.run("pool", "list", "--format", "json").stdout)
    assert listing["sizes"] == {"256": 1}
    assert [(m["memory_mib"], m["state"]) for m in listing["members"]] == [(256, "ready")]
    text = runm.run("pool", "list").stdout.decode()
    assert text.startswith("pool size 1 (1 x 256 MiB), 1 member(s)\n") and " 256 MiB " in text
    try:
        # No memory limit: the default size (512 MiB); the 256 MiB member is not for it.
        b = make_busybox_bundle(tmp_path / "b", ["grep", "MemTotal", "/proc/meminfo"])
        assert mem_total_kib(runm, b, "big", tmp_path / "big.log") > 400_000
        assert TAKEN not in (tmp_path / "big.log").read_text()
        assert len(pool_members(runm)) == 1
        # A 64 MiB limit plus the 192 MiB overhead: a 256 MiB VM, taken from the pool.
        config = json.loads((b / "config.json").read_text())
        config["linux"].setdefault("resources", {})["memory"] = {"limit": 64 << 20}
        (b / "config.json").write_text(json.dumps(config))
        assert mem_total_kib(runm, b, "small", tmp_path / "small.log") < 256 * 1024
        assert TAKEN in (tmp_path / "small.log").read_text()
        assert wait_until(lambda: [(m["memory_mib"], m["state"]) for m in pool_members(runm)]
                          == [(256, "ready")], timeout=120), pool_members(runm)
    finally:
        assert runm.run("pool", "drain").returncode == 0
        assert wait_until(lambda: not pool_members(runm), timeout=30)


def test_fill_without_a_size_needs_one_in_the_config(runm: Runm) -> None:
    result = runm.run("pool", "fill")
    assert result.returncode == 1
    assert b"no pool size given" in result.stderr
    result = runm.run("pool", "fill", "--memory-mib", "64", "1")
    assert result.returncode == 1
    assert b"invalid --memory-mib 64: must be 128 or more" in result.stderr


def test_a_pool_in_the_config_file_is_filled_by_a_start(runm: Runm, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[pool]\nsize = 1\n")
    runm.env["RUNM_CONFIG"] = str(config)
    assert json.loads(runm.run("pool", "list", "--format", "json").stdout)["sizes"] == \
        {"512": 1}
    assert pool_members(runm) == []  # configured, not filled yet
    b = make_busybox_bundle(tmp_path / "b", ["true"])
    try:
        result = runm.run("run", "-b", str(b), "c1")
        assert result.returncode == 0, result.stderr.decode()
        assert wait_until(lambda: [m["state"] for m in pool_members(runm)] == ["ready"],
                          timeout=120), pool_members(runm)
        result = runm.run("pool", "fill")  # to the configured size: already there
        assert result.returncode == 0, result.stderr.decode()
        assert len(pool_members(runm)) == 1
    finally:
        assert runm.run("pool", "drain").returncode == 0
        assert wait_until(lambda: not pool_members(runm), timeout=30)
    assert json.loads(runm.run("pool", "list", "--format", "json").stdout)["sizes"] == {}
