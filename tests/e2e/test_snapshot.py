"""Containers start from a snapshot of a booted guest: same behaviour as a cold boot, a broken
snapshot falls back to a cold boot with a log line, and restored guests do not share state."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runm.guest.image import GuestImage
from runm.proto import agent as api
from runm.sandbox.bundle import load_bundle
from runm.sandbox.run import bundle_shares
from runm.sandbox.rundir import vm_run_dir
from runm.sandbox.sandbox import Sandbox
from runm.sandbox.snapshot import find_snapshot
from runm.sandbox.spec import make_busybox_bundle
from runm.vm.accel import choose_accelerator
from runm.vm.base import SnapshotFiles
from tests.conftest import Runm

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_image", "no_leaks")]

RESTORED = "started from snapshot"
CLONE = "as a page-sharing clone"
FELL_BACK = "booting cold instead"


def current_snapshot(image: GuestImage) -> SnapshotFiles:
    sandbox = Sandbox.create("probe", image, vm_run_dir(Path("/"), "probe"), [])
    found = find_snapshot(image, sandbox.vm, choose_accelerator(image.kernel))
    assert found is not None, "the guest_image fixture makes the snapshot"
    return found


def run_logged(runm: Runm, tmp_path: Path, name: str, bundle: Path,
               env: dict[str, str] | None = None, **kwargs: object
               ) -> tuple[subprocess.CompletedProcess[bytes], str]:
    log = tmp_path / f"{name}.log"
    result = runm.run("--log", str(log), "run", "-b", str(bundle), name,
                      env=env, **kwargs)  # type: ignore[arg-type]
    return result, log.read_text() if log.exists() else ""


PROBE = ("echo args: $0 $1; cat; grep -c ' /proc ' /proc/mounts; "
         "ls /data; echo written > /data/out; hostname; exit 5")


def probe_bundle(tmp_path: Path, name: str) -> Path:
    data = tmp_path / f"{name}-data"
    data.mkdir()
    (data / "in").write_text("from the host\n")
    b = make_busybox_bundle(tmp_path / name, ["sh", "-c", PROBE, "x", "y"])
    config = json.loads((b / "config.json").read_text())
    config["mounts"].append({"destination": "/data", "type": "bind", "source": str(data),
                             "options": ["rbind", "rw"]})
    config["hostname"] = "probe"
    (b / "config.json").write_text(json.dumps(config))
    return b


def test_restored_container_behaves_like_a_cold_booted_one(runm: Runm, tmp_path: Path) -> None:
    """Cold, restored with its own RAM copy (virtiofs), and restored as a page-sharing clone
    (`[snapshot] clones = true`: 9p, as pooled VMs are): the same output, exit code, mounts."""
    clones = tmp_path / "clones.toml"
    clones.write_text("[snapshot]\nclones = true\n")
    results = {}
    for mode, flag in (("cold", "0"), ("restored", "1"), ("clone", "1")):
        env = {**runm.env, "RUNM_SNAPSHOT": flag}
        if mode == "clone":
            env["RUNM_CONFIG"] = str(clones)
        result, log = run_logged(runm, tmp_path, mode, probe_bundle(tmp_path, mode), env,
                                 input=b"stdin line\n")
        assert (RESTORED in log) == (mode != "cold"), log
        assert (tmp_path / f"{mode}-data" / "out").read_text() == "written\n"
        assert (CLONE in log) == (mode == "clone"), log
        results[mode] = (result.returncode, result.stdout, result.stderr)
    assert results["restored"] == results["cold"] == results["clone"]
    assert results["cold"][0] == 5
    assert results["cold"][1].decode().splitlines() == [
        "args: x y", "stdin line", "1", "in", "probe"]


def test_signal_reaches_a_container_in_a_restored_guest(runm: Runm, tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b", [
        "sh", "-c", "trap 'echo got TERM; exit 42' TERM; echo ready; "
                    "while true; do sleep 0.1; done"])
    log = tmp_path / "sig.log"
    proc = runm.popen("--log", str(log), "run", "-b", str(b), "sig", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert out == b"got TERM\n"
    assert proc.returncode == 42
    assert RESTORED in log.read_text()


def test_restored_guests_have_their_own_randomness_and_the_current_time(
        runm: Runm, tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b", [
        "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"])
    seen = []
    for i in range(2):
        result, log = run_logged(runm, tmp_path, f"r{i}", b)
        assert result.returncode == 0, result.stderr.decode()
        assert RESTORED in log
        random_hex, guest_time = result.stdout.decode().split()
        assert abs(int(guest_time) - time.time()) < 30, "the guest clock was not set"
        seen.append(random_hex)
    assert len(seen[0]) == 32
    assert seen[0] != seen[1], "two guests restored from one snapshot share their RNG state"


def kernel_text_bundle(tmp_path: Path) -> Path:
    """A container that writes the guest kernel's text range (_stext, _etext) to /out."""
    b = make_busybox_bundle(tmp_path / "ktext", [
        "sh", "-c", "grep -w -e _stext -e _etext /proc/kallsyms > /out"])
    config = json.loads((b / "config.json").read_text())
    config["root"]["readonly"] = False
    for kind in config["process"]["capabilities"]:
        config["process"]["capabilities"][kind].append("CAP_SYSLOG")  # real addresses
    (b / "config.json").write_text(json.dumps(config))
    return b


async def _kernel_text_changes(image: GuestImage, tmp_path: Path) -> list[int]:
    """Bytes of guest kernel code that changed while a container was created, then while it
    was removed (QMP memsave of _stext.._etext around each)."""
    ktext = kernel_text_bundle(tmp_path)
    true = make_busybox_bundle(tmp_path / "true", ["true"])
    shares = bundle_shares(load_bundle(ktext)) + bundle_shares(load_bundle(true), 1)
    sandbox = Sandbox.create("ktext", image, vm_run_dir(tmp_path, "ktext"), shares)
    await sandbox.boot()
    agent = sandbox.agent
    assert agent is not None

    async def run(cid: str, bundle: Path, between: list[bytes] | None = None) -> None:
        await agent.create_container(cid, str(bundle), api.Stdio())
        if between is not None:
            between.append(await dump())
        await agent.start_container(cid)
        assert (await agent.wait_process(cid)).exit_status == 0
        await agent.delete_container(cid)

    async def dump() -> bytes:
        out = tmp_path / "text.bin"
        await sandbox.vm.qmp("memsave", val=start - (1 << 64), size=end - start,
                             filename=str(out))
        return out.read_bytes()

    try:
        await run("ktext", ktext)
        symbols = {line.split()[2]: int(line.split()[0], 16)
                   for line in (ktext / "rootfs" / "out").read_text().splitlines()}
        start, end = symbols["_stext"], symbols["_etext"]
        assert 0 < end - start < 64 << 20
        dumps = [await dump()]
        await run("true", true, between=dumps)
        dumps.append(await dump())
    finally:
        await sandbox.close()
    return [changed_bytes(before, after) for before, after in itertools.pairwise(dumps)]


def changed_bytes(before: bytes, after: bytes, page: int = 4096) -> int:
    assert len(before) == len(after)
    return sum(sum(a != b for a, b in zip(before[o:o + page], after[o:o + page], strict=True))
               for o in range(0, len(before), page) if before[o:o + page] != after[o:o + page])


def test_containers_come_and_go_without_patching_kernel_code(
        guest_image: GuestImage, tmp_path: Path) -> None:
    """A container's cgroup would switch kernel static keys on (and its removal off), and
    the kernel patches its code for that: with two vCPUs under TCG, QEMU 7.2 sometimes ran
    a stale translation of the patch's int3 and the guest locked up. The agent holds those
    keys on for the VM's life (pid1.hold_kernel_switches); without, this reads [62, 62]."""
    assert asyncio.run(_kernel_text_changes(guest_image, tmp_path)) == [0, 0]


def private_data_dir(tmp_path: Path, image: GuestImage, snapshot: SnapshotFiles,
                     ram: Path | None = None, state: bytes | None = None) -> Path:
    """A RUNM_DATA_DIR with the current image (linked) and a copy of its snapshot that has
    the given RAM file or state bytes instead of the good ones."""
    data = tmp_path / "data"
    image_dir = data / "guest" / "images" / image.kernel.parent.name
    shutil.copytree(image.kernel.parent, image_dir, copy_function=os.link,
                    ignore=shutil.ignore_patterns("snapshots", ".lock"))
    accel = Path(os.environ.get("RUNM_DATA_DIR", "/var/lib/runm")) / "accel"
    if accel.is_dir():
        shutil.copytree(accel, data / "accel")
    folder = image_dir / "snapshots" / snapshot.ram.parent.name
    folder.mkdir(parents=True)
    shutil.copy(snapshot.ram.parent / "meta.json", folder / "meta.json")
    if ram is None:
        os.link(snapshot.ram, folder / "ram")
    else:
        shutil.move(ram, folder / "ram")
    (folder / "state").write_bytes(state if state is not None else snapshot.state.read_bytes())
    return data


@pytest.mark.parametrize("damage", ["truncated state", "zeroed ram"])
def test_a_broken_snapshot_falls_back_to_a_cold_boot(
        runm: Runm, tmp_path: Path, guest_image: GuestImage, damage: str) -> None:
    good = current_snapshot(guest_image)
    if damage == "truncated state":
        data = private_data_dir(tmp_path, guest_image, good,
                                state=good.state.read_bytes()[:4096])
    else:
        zeroed = tmp_path / "zero.ram"
        with open(zeroed, "wb") as f:
            f.truncate(good.ram.stat().st_size)
        data = private_data_dir(tmp_path, guest_image, good, ram=zeroed)
    env = {**runm.env, "RUNM_DATA_DIR": str(data)}
    b = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "echo still works; exit 3"])
    result, log = run_logged(runm, tmp_path, "fb", b, env)
    assert result.returncode == 3, result.stderr.decode()
    assert result.stdout == b"still works\n"
    assert FELL_BACK in log, log
    assert RESTORED not in log
    assert not (data / "guest" / "images" / guest_image.kernel.parent.name / "snapshots" /
                good.ram.parent.name).exists(), "a snapshot that failed must be discarded"
    assert good.ram.exists(), "the shared snapshot is untouched"


def test_a_new_snapshot_answers_the_first_request_of_every_restore(
        runm: Runm, tmp_path: Path, guest_image: GuestImage) -> None:
    """Some snapshots lose the first request of every restore (QEMU 7.2): each start from
    one would wait for the re-ask. A new snapshot is restored once to tell, and made again
    if it is such a one, so starts from a freshly made snapshot never ask twice."""
    data = tmp_path / "data"
    shutil.copytree(guest_image.kernel.parent, data / "guest" / "images" /
                    guest_image.kernel.parent.name, copy_function=os.link,
                    ignore=shutil.ignore_patterns("snapshots", ".lock"))
    accel = Path(os.environ.get("RUNM_DATA_DIR", "/var/lib/runm")) / "accel"
    if accel.is_dir():  # the accelerator probe's result, as the host's runm has it
        shutil.copytree(accel, data / "accel")
    env = {**runm.env, "RUNM_DATA_DIR": str(data)}
    b = make_busybox_bundle(tmp_path / "b", ["true"])
    for name in ("make", "first", "second"):
        result, log = run_logged(runm, tmp_path, name, b, env)
        assert result.returncode == 0, result.stderr.decode()
        assert RESTORED in log, log
        assert "asking again" not in log, log


def test_more_shares_than_hotplug_slots_boots_cold_and_works(runm: Runm,
                                                             tmp_path: Path) -> None:
    from runm.vm.qemu import HOTPLUG_ROOT_PORTS

    b = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "cat /v*/f | wc -l"])
    config = json.loads((b / "config.json").read_text())
    for i in range(HOTPLUG_ROOT_PORTS + 1):
        d = tmp_path / f"vol{i}"
        d.mkdir()
        (d / "f").write_text(f"{i}\n")
        config["mounts"].append({"destination": f"/v{i}", "type": "bind", "source": str(d),
                                 "options": ["rbind", "ro"]})
    (b / "config.json").write_text(json.dumps(config))
    result, log = run_logged(runm, tmp_path, "many", b)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == str(HOTPLUG_ROOT_PORTS + 1)
    assert RESTORED not in log
    assert "booting cold" in log


def test_guest_build_makes_the_snapshot(guest_image: GuestImage) -> None:
    snapshot = current_snapshot(guest_image)
    assert snapshot.state.stat().st_size < 4 << 20, "the state holds devices, not RAM"
    allocated = os.stat(snapshot.ram).st_blocks * 512
    assert allocated < snapshot.ram.stat().st_size / 2, "the RAM file is sparse"


