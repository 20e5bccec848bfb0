"""PID 1 helpers and the libc wrappers, exercised without changing the host.

mount() is only called with a filesystem type the kernel does not know, so it fails before
anything is mounted; the tests check that nothing was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runm.agent import pid1, sysapi


def read_fifo(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return bytes(out)
        out += chunk


# --- pid1 ------------------------------------------------------------------------------------


def test_enable_cgroup_controllers_writes_one_plus_entry_per_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    # A FIFO records every write separately, as cgroupfs applies each one.
    os.mkfifo(tmp_path / "cgroup.subtree_control")
    reader = os.open(tmp_path / "cgroup.subtree_control", os.O_RDWR | os.O_NONBLOCK)
    try:
        pid1.enable_cgroup_controllers(tmp_path)
        assert read_fifo(reader) == b"+cpuset+cpu+io+memory+pids"
    finally:
        os.close(reader)


def test_enable_cgroup_controllers_ends_with_the_last_controller_in_a_plain_file(
        tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    pid1.enable_cgroup_controllers(tmp_path)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"


def test_enable_cgroup_controllers_without_controllers_file_does_nothing(tmp_path: Path) -> None:
    pid1.enable_cgroup_controllers(tmp_path)
    pid1.enable_cgroup_controllers(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


def test_enable_cgroup_controllers_with_no_controllers_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("\n")
    pid1.enable_cgroup_controllers(tmp_path)
    assert not (tmp_path / "cgroup.subtree_control").exists()


def test_enable_cgroup_controllers_ignores_rejected_writes(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    (tmp_path / "cgroup.subtree_control").mkdir()  # every write fails (EISDIR)
    pid1.enable_cgroup_controllers(tmp_path)  # no exception
    assert (tmp_path / "cgroup.subtree_control").is_dir()


def test_mounted_targets_lists_mount_points() -> None:
    targets = pid1.mounted_targets()
    assert "/" in targets
    assert "/proc" in targets  # we are reading it through /proc
    assert all(t.startswith("/") for t in targets)


def fake_virtio_bus(root: Path, bound: bool) -> Path:
    """A sysfs virtio bus with a console (0x0003) and a balloon (0x0005) device."""
    driver = root / "drivers" / "virtio_balloon"
    driver.mkdir(parents=True)
    for name, device_id in (("virtio1", "0x0003"), ("virtio4", "0x0005")):
        (root / "devices" / name).mkdir(parents=True)
        (root / "devices" / name / "device").write_text(device_id + "\n")
    (root / "devices" / "virtio9").mkdir()  # no id: skipped
    for control in ("bind", "unbind"):
        (driver / control).write_text("")
    if bound:
        (driver / "virtio4").symlink_to(root / "devices" / "virtio4")
    return driver


def test_free_page_reporting_unbinds_and_binds_the_balloon_driver_only(tmp_path: Path) -> None:
    driver = fake_virtio_bus(tmp_path, bound=True)
    assert sysapi.set_free_page_reporting(True, bus=str(tmp_path)) is False  # on already
    assert (driver / "bind").read_text() == ""
    assert sysapi.set_free_page_reporting(False, bus=str(tmp_path)) is True
    assert (driver / "unbind").read_text() == "virtio4"
    (driver / "virtio4").unlink()  # what the kernel does on unbind
    assert sysapi.set_free_page_reporting(False, bus=str(tmp_path)) is False
    assert sysapi.set_free_page_reporting(True, bus=str(tmp_path)) is True
    assert (driver / "bind").read_text() == "virtio4"


def test_mount_table_covers_what_runc_needs() -> None:
    targets = [m[1] for m in pid1.MOUNTS]
    assert len(targets) == len(set(targets))
    # parents are mounted before what lives inside them
    assert targets.index("/sys") < targets.index("/sys/fs/cgroup")
    for _, _target, _fstype, options in pid1.MOUNTS:
        flags, _data = sysapi.split_mount_options(options)
        assert flags & sysapi.MS_NOSUID


@pytest.fixture
def cgroup2(tmp_path: Path) -> Iterator[Path]:
    """The host's cgroup v2 hierarchy, mounted here (beside its v1 controllers, if any)."""
    root = tmp_path / "cgroup2"
    root.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(root)], check=True)
    try:
        yield root
    finally:
        with contextlib.suppress(FileNotFoundError):
            (root / pid1.HOLD_CGROUP).rmdir()
        subprocess.run(["umount", str(root)], check=True)


def device_programs(cgroup: Path) -> int:
    """How many device programs are attached to the cgroup (BPF_PROG_QUERY)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 8)()
        attr = ctypes.create_string_buffer(struct.pack(
            "<IIIIQI", fd, sysapi.BPF_CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), 8), 128)
        sysapi._check(sysapi.libc().syscall(321, 16, attr, 128), "BPF_PROG_QUERY")
        return int(struct.unpack_from("<I", attr.raw, 24)[0])
    finally:
        os.close(fd)


def test_held_switches_are_an_empty_cgroup_whose_device_program_allows_all(
        cgroup2: Path) -> None:
    assert pid1.hold_kernel_switches(cgroup2) is None
    hold = cgroup2 / pid1.HOLD_CGROUP
    assert device_programs(hold) == 1
    assert (hold / "cgroup.procs").read_text() == ""
    # A process in it may still open devices: the program allows everything.
    script = (f"open({str(hold / 'cgroup.procs')!r}, 'w').write('0');"
              "open('/dev/null', 'w').write('x'); open('/dev/zero', 'rb').read(1)")
    opened = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False)
    assert opened.returncode == 0, opened.stderr
    assert pid1.hold_kernel_switches(cgroup2) is None  # again (a restarted agent): still one
    assert device_programs(hold) == 1


def test_failing_to_hold_switches_is_reported_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    error = pid1.hold_kernel_switches(tmp_path)  # not a cgroup: no device program attaches
    assert error and "device program" in error
    assert "holding kernel switches" in capsys.readouterr().err
    monkeypatch.setattr(sysapi, "_BPF_SYSCALL", {})
    assert "bpf(2) not known" in str(pid1.hold_kernel_switches(tmp_path))


class FakeSystem:
    """Stands in for every host-changing call setup_system makes; records them instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, mounted: set[str],
                 fail: dict[tuple[str, bool], OSError] | None = None) -> None:
        self.mounted = set(mounted)
        self.fail = fail or {}
        self.calls: list[tuple[str, ...]] = []
        monkeypatch.setattr(pid1, "mounted_targets", lambda: set(self.mounted))
        monkeypatch.setattr(pid1.sysapi, "mount", self.mount)
        monkeypatch.setattr(pid1.os, "makedirs", self.makedirs)
        monkeypatch.setattr(pid1.os, "symlink", self.symlink)
        monkeypatch.setattr(pid1.os.path, "lexists", lambda path: path == "/dev/stdin")
        monkeypatch.setattr(pid1, "enable_cgroup_controllers",
                            lambda root: self.calls.append(("cgroups", str(root))))
        monkeypatch.setattr(pid1, "hold_kernel_switches",
                            lambda root: self.calls.append(("hold", str(root))))
        monkeypatch.setattr(pid1, "_loopback_up", lambda: self.calls.append(("lo",)))

    def mount(self, source: str, target: str, fstype: str, options: list[str]) -> None:
        self.calls.append(("mount", source, target, fstype, ",".join(options)))
        err = self.fail.get((target, "nsdelegate" in options))
        if err is not None:
            raise err
        self.mounted.add(target)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        assert exist_ok
        self.calls.append(("mkdir", path))

    def symlink(self, target: str, link: str) -> None:
        self.calls.append(("symlink", link, target))
        if link == "/dev/fd":
            raise FileExistsError(link)  # ignored


def test_setup_system_mounts_what_is_missing_then_links_and_cgroups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystem(monkeypatch, mounted={"/", "/dev", "/proc", "/dev/shm"})
    pid1.setup_system()
    mounts = [c for c in fake.calls if c[0] == "mount"]
    assert [c[2] for c in mounts] == ["/sys", "/sys/fs/cgroup", "/run", "/tmp", "/dev/pts",
                                      "/dev/mqueue"]
    assert ("mount", "cgroup2", "/sys/fs/cgroup", "cgroup2",
            "nosuid,nodev,noexec,nsdelegate") in mounts
    assert ("mkdir", "/dev/pts") in fake.calls
    assert fake.calls.index(("mkdir", "/dev/pts")) < fake.calls.index(mounts[4])
    links = {c[1]: c[2] for c in fake.calls if c[0] == "symlink"}
    assert links == {k: v for k, v in pid1.DEV_LINKS.items() if k != "/dev/stdin"}
    assert fake.calls[-3:] == [("cgroups", "/sys/fs/cgroup"), ("hold", "/sys/fs/cgroup"),
                               ("lo",)]


def test_setup_system_retries_cgroup2_without_nsdelegate(monkeypatch: pytest.MonkeyPatch) -> None:
    everything_else = {m[1] for m in pid1.MOUNTS} - {"/sys/fs/cgroup"}
    fake = FakeSystem(monkeypatch, mounted=everything_else,
                      fail={("/sys/fs/cgroup", True): OSError(errno.EINVAL, "nsdelegate")})
    pid1.setup_system()
    assert [c for c in fake.calls if c[0] == "mount"] == [
        ("mount", "cgroup2", "/sys/fs/cgroup", "cgroup2", "nosuid,nodev,noexec,nsdelegate"),
        ("mount", "cgroup2", "/sys/fs/cgroup", "cgroup2", "nosuid,nodev,noexec"),
    ]


def test_setup_system_reports_a_failed_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeSystem(monkeypatch, mounted={"/proc", "/sys", "/sys/fs/cgroup"},
               fail={("/run", False): OSError(errno.ENODEV, "mounting tmpfs tmpfs on /run")})
    with pytest.raises(RuntimeError, match="mounting tmpfs tmpfs on /run"):
        pid1.setup_system()


def test_setup_system_sets_a_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeSystem(monkeypatch, mounted={m[1] for m in pid1.MOUNTS})
    monkeypatch.delenv("PATH")
    pid1.setup_system()
    assert os.environ["PATH"].split(":")[:2] == ["/usr/local/sbin", "/usr/local/bin"]
    monkeypatch.setenv("PATH", "/custom")
    pid1.setup_system()
    assert os.environ["PATH"] == "/custom"


# --- sysapi ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flags", "data"),
    [
        ([], 0, ""),
        (["ro"], sysapi.MS_RDONLY, ""),
        (["rw"], 0, ""),
        (["nosuid", "nodev", "noexec"], sysapi.MS_NOSUID | sysapi.MS_NODEV | sysapi.MS_NOEXEC,
         ""),
        (["relatime"], sysapi.MS_RELATIME, ""),
        (["mode=755"], 0, "mode=755"),
        (["ro", "nosuid", "gid=5", "rw", "mode=620", "", "ptmxmode=666"],
         sysapi.MS_RDONLY | sysapi.MS_NOSUID, "gid=5,mode=620,ptmxmode=666"),
        (["nsdelegate"], 0, "nsdelegate"),
    ],
)
def test_split_mount_options(options: list[str], flags: int, data: str) -> None:
    assert sysapi.split_mount_options(options) == (flags, data)


def test_mount_flag_values_match_linux() -> None:
    assert (sysapi.MS_RDONLY, sysapi.MS_NOSUID, sysapi.MS_NODEV, sysapi.MS_NOEXEC) == (1, 2, 4, 8)
    assert sysapi.MS_RELATIME == 0x200000


def test_mount_of_unknown_fstype_raises_and_mounts_nothing(tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    before = pid1.mounted_targets()
    with pytest.raises(OSError) as info:
        sysapi.mount("none", str(target), "runmnosuchfs", ["nosuid", "mode=755"])
    err = info.value
    # ENODEV as root; EPERM if the tests run without CAP_SYS_ADMIN
    assert err.errno in (errno.ENODEV, errno.EPERM)
    assert "runmnosuchfs" in str(err)
    assert str(target) in str(err)
    assert os.strerror(err.errno) in str(err)
    assert str(target) not in pid1.mounted_targets()
    assert pid1.mounted_targets() == before


def test_mount_without_options_passes_no_data(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="runmnosuchfs src on"):
        sysapi.mount("src", str(tmp_path), "runmnosuchfs")
    assert str(tmp_path) not in pid1.mounted_targets()


def test_prctl_with_invalid_option_raises_einval() -> None:
    with pytest.raises(OSError) as info:
        sysapi.prctl(0x7FFF_FFFF, 0)
    assert info.value.errno == errno.EINVAL
    assert f"prctl({0x7FFF_FFFF})" in str(info.value)


def test_libc_is_loaded_once() -> None:
    assert sysapi.libc() is sysapi.libc()


def test_add_entropy_with_empty_seed_does_nothing() -> None:
    assert sysapi.add_entropy(b"") is None


LOOPBACK_PROBE = """
import json, socket
from runm.agent import pid1

def localhost_works():
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            with socket.create_connection(server.getsockname(), timeout=5):
                return True
    except OSError:
        return False

before = localhost_works()
pid1._loopback_up()
after = localhost_works()
pid1._loopback_up()  # again: no error when it is already up
print(json.dumps([before, after]))
"""


def test_loopback_up_makes_localhost_usable_in_a_fresh_network_namespace() -> None:
    """What the guest's PID 1 does at boot, tried in a new (empty) network namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) not installed")
    env = dict(os.environ, PYTHONPATH=str(Path(pid1.__file__).parents[2]))
    proc = subprocess.run([unshare, "--net", sys.executable, "-c", LOOPBACK_PROBE],
                          capture_output=True, text=True, env=env, timeout=30, check=False)
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot create a network namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, True]


def test_sealed_copy_runs_and_cannot_be_changed(tmp_path: Path) -> None:
    """runc 1.1 skips its per-start self-copy only for a memfd with exactly these seals."""
    import fcntl

    fd = sysapi.sealed_copy(shutil.which("true") or "/bin/true")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == sysapi.RUNC_MEMFD_SEALS
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        result = subprocess.run([f"/proc/{os.getpid()}/fd/{fd}"], check=False)
        assert result.returncode == 0
    finally:
        os.close(fd)


def test_sealed_copy_of_a_missing_binary_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        sysapi.sealed_copy(str(tmp_path / "no-runc"))


def test_zero_free_memory_leaves_the_margin(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  524288 kB\nMemFree:   102400 kB\n")
    assert sysapi.zero_free_memory(margin=48 << 20, meminfo=str(meminfo)) == 52 << 20
    meminfo.write_text("MemFree:   1024 kB\n")
    assert sysapi.zero_free_memory(meminfo=str(meminfo)) == 0


def test_network_up_configures_the_nic_for_slirp() -> None:
    """In a namespace of the test's own: eth0 (a veth) gets slirp's address and route; a
    second time, the errors are reported, not raised; without eth0 nothing is done."""
    from runm.net.callernet import in_netns

    name = f"runm-unit-up-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        path = f"/run/netns/{name}"
        assert in_netns(path, pid1.network_up) == ["no eth0"]
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name",
                        "peer0"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "peer0", "up"], check=True)
        assert in_netns(path, pid1.network_up) == []
        link = json.loads(subprocess.run(["ip", "-n", name, "-j", "addr", "show", "eth0"],
                                         capture_output=True, check=True).stdout)[0]
        assert "UP" in link["flags"]
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet"] == [("10.0.2.15", 24)]
        routes = json.loads(subprocess.run(["ip", "-n", name, "-j", "route"],
                                           capture_output=True, check=True).stdout)
        assert {"dst": "default", "gateway": "10.0.2.2"}.items() <= routes[0].items()
        again = in_netns(path, pid1.network_up)
        assert again[0] == "address 10.0.2.15/24: File exists", again
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_drop_page_cache_asks_the_kernel_for_level_1(tmp_path: Path) -> None:
    control = tmp_path / "drop_caches"
    control.write_text("")
    sysapi.drop_page_cache(str(control))
    assert control.read_text() == "1"  # page cache only: dentries and inodes stay


def test_turning_free_page_reporting_on_logs_a_failure_and_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from runm.agent import service

    def unbound(on: bool, bus: str = "") -> bool:
        raise OSError(errno.ENOENT, "no virtio bus")

    monkeypatch.setattr(service.sysapi, "set_free_page_reporting", unbound)
    service.report_free_pages()  # no exception: freed memory is just not given back
    assert "free page reporting: [Errno 2] no virtio bus" in caplog.text
