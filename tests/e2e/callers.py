"""Fixtures for the three real callers of a runc-compatible runtime: podman, containerd, dockerd.

Each caller runs privately under one session directory (/tmp/runm-e2e-XXXX, kept short because
unix socket paths are limited to 107 bytes) and is handed the runtime under test:

* ``runtime_binary`` is the runtime being tested: ``$RUNM_E2E_RUNTIME`` or /usr/sbin/runc.
  Overriding this one fixture (or setting the variable) swaps runm in for runc everywhere.
* ``runtime`` is the path actually given to the callers: a tiny shell wrapper with the same
  basename that records every call (cwd + argv, see ``RuntimeTrace``) and then execs
  ``runtime_binary``, so tests can prove the caller really went through the runtime under test.
* ``podman``, ``containerd`` and ``dockerd`` (module scope) yield helpers whose ``run()`` /
  ``ctr()`` / ``docker()`` invoke the caller's CLI with every isolation flag already given.
  The busybox image from ``tests/e2e/images.py`` is loaded into each one, as ``helper.image``.

Load these in a test module with ``pytest_plugins = ["tests.e2e.callers"]``. Teardown stops the
daemons, waits for (then kills) any process still rooted in the session directory, unmounts
whatever is mounted below it, removes the empty cgroups and the few host paths the callers
insist on creating (/etc/docker/key.json, /run/docker, /run/containerd/{s,fifo}, /run/runc,
/var/lib/containers/cache), and deletes the directory. Anything that had to be killed or
unmounted is reported as a teardown error, so a runtime that leaks processes or mounts fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.images import DEFAULT_REF, build_busybox_image

RUNC = "/usr/sbin/runc"
IMAGE = DEFAULT_REF
CTR_NAMESPACE = "runm-test"
DOCKER_NAMESPACE = "runm-docker"
DOCKER_RUNTIME_NAME = "runm"
# Debian's client; /usr/local/bin/docker on this host is a newer, unrelated static CLI.
DOCKER_CLI = "/usr/bin/docker"
# Top-level cgroups the callers put containers in (cgroupfs driver) and never remove.
PODMAN_CGROUPS = ("libpod_parent",)
CONTAINERD_CGROUPS = (CTR_NAMESPACE,)  # ctr run: /<namespace>/<id>
DOCKER_CGROUPS = ("docker",)
# Host paths the callers create outside their configured directories; removed at teardown
# only if they did not exist before (files) or are then empty (directories). Deepest first.
PODMAN_HOST_PATHS = ("/var/lib/containers/cache/blob-info-cache-v1.boltdb",
                     "/var/lib/containers/cache", "/var/lib/containers", "/run/runc")
CONTAINERD_HOST_PATHS = ("/run/containerd/fifo", "/run/containerd/s", "/run/containerd")
DOCKER_HOST_PATHS = ("/etc/docker/key.json", "/run/docker/plugins", "/run/docker")
# Set in each caller's environment (so inherited by conmon, shims, the runtime and whatever it
# starts) to the fixture's directory: how teardown finds strays that mention no path of ours.
OWNER_ENV = "RUNM_E2E_OWNER"
# The daemons start in well under a second, so each test module gets its own: they are gone
# before the rest of the suite (VM tests, final leak checks) runs. The image, the runtime
# wrapper and the session directory are shared by the whole session.
CALLER_SCOPE: Final = "module"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "callers: drives podman, containerd or dockerd end to end")


# --------------------------------------------------------------------------------------------
# Running commands


class CallerError(subprocess.CalledProcessError):
    """A caller's CLI failed; the message carries its output and the daemon's log tail."""

    def __init__(self, result: subprocess.CompletedProcess[str], log: str = "") -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)
        self.log = log

    def __str__(self) -> str:
        text = (f"{shlex.join(map(str, self.cmd))} exited {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")
        if self.log:
            text += f"--- daemon log (tail)\n{self.log}"
        return text


def run_command(argv: Sequence[str], env: dict[str, str], *, check: bool = True,
                timeout: float = 60, input: str | None = None, log: Path | None = None,
                ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), env=env, input=input, capture_output=True, text=True,
                            timeout=timeout, check=False,
                            stdin=subprocess.DEVNULL if input is None else None)
    if check and result.returncode != 0:
        raise CallerError(result, tail(log) if log else "")
    return result


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Teardown: processes, mounts, cgroups, host paths


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def processes_under(base: Path, cgroups: Sequence[str] = ()) -> dict[int, str]:
    """pid -> cmdline of every process tied to `base`, except this process and its ancestors:
    it names `base` in its command line, has its root or cwd below it, inherited an
    OWNER_ENV below it (anything a caller or the runtime spawned), or sits in a cgroup below
    one of `cgroups` (top-level names such as `libpod_parent`: container processes)."""
    spared = set()
    pid = os.getpid()
    while pid > 1:
        spared.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = {}
    needle = str(base)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            links = []
            for name in ("root", "cwd"):
                with contextlib.suppress(OSError):
                    links.append(os.readlink(entry / name))
            groups = {line.split(":", 2)[-1].split("/")[1]
                      for line in (entry / "cgroup").read_text().splitlines()
                      if ":/" in line and line.split(":", 2)[-1] != "/"}
            owners = [var[len(OWNER_ENV) + 1:].decode(errors="replace")
                      for var in (entry / "environ").read_bytes().split(b"\0")
                      if var.startswith(OWNER_ENV.encode() + b"=")]
        except (OSError, IndexError):
            continue
        if not cmdline:  # kernel thread or zombie
            continue
        if (needle in cmdline or any(_under(link, needle) for link in links + owners)
                or groups.intersection(cgroups)):
            found[int(entry.name)] = cmdline.strip()
    return found


def stop_processes_under(base: Path, cgroups: Sequence[str] = (),
                         grace: float = 10.0) -> dict[int, str]:
    """Give the processes tied to `base` (see processes_under) `grace` seconds to exit on their
    own, then SIGTERM, then SIGKILL the rest. Returns those that had to be signalled."""
    def gone() -> bool:
        return not processes_under(base, cgroups)

    if wait_for(gone, grace, 0.1):
        return {}
    leftovers = processes_under(base, cgroups)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_under(base, cgroups):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_for(gone, 5.0, 0.05):
            break
    return leftovers


def _unescape_mount_path(field_: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_ = field_.replace(code, char)
    return field_


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below `base`, innermost (latest) first."""
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 1:
            point = _unescape_mount_path(parts[1])
            if _under(point, str(base)):
                points.append(point)
    return points[::-1]


def unmount_under(base: Path) -> list[str]:
    """Lazily unmount everything mounted at or below `base`; return what was mounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    mnt_detach = 2
    found = mounts_under(base)
    for _ in range(5):
        points = mounts_under(base)
        if not points:
            break
        for point in points:
            libc.umount2(point.encode(), mnt_detach)
    return found


def new_cgroup_names(names: Sequence[str], existed: set[Path]) -> list[str]:
    """Which of `names` had no cgroup anywhere when `existed` (existing_cgroups) was taken."""
    return [n for n in names if not any(p.name == n for p in existed)]


def remove_empty_cgroups(names: Sequence[str], existed: set[Path]) -> None:
    """rmdir the cgroup v1/v2 directories `names` (and empty children) that were created after
    `existed` was taken by `existing_cgroups`."""
    for path in existing_cgroups(names) - existed:
        for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()


def existing_cgroups(names: Sequence[str]) -> set[Path]:
    root = Path("/sys/fs/cgroup")
    hierarchies = [root] if (root / "cgroup.controllers").exists() else [
        p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    return {h / n for h in hierarchies for n in names if (h / n).is_dir()}


@dataclass
class HostFootprint:
    """Host paths a caller creates outside the directories it was given."""

    paths: Sequence[str]
    existed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.existed = {p for p in self.paths if os.path.lexists(p)}

    def clean(self) -> None:
        for p in self.paths:  # deepest first
            if p in self.existed or not os.path.lexists(p):
                continue
            with contextlib.suppress(OSError):
                if os.path.isdir(p) and not os.path.islink(p):
                    os.rmdir(p)  # only if empty
                else:
                    os.unlink(p)


@dataclass
class Teardown:
    """Collects what a fixture had to clean up by force, to fail the session loudly."""

    name: str
    base: Path
    cgroups: Sequence[str] = ()  # top-level cgroups only this fixture's containers use
    killed: dict[int, str] = field(default_factory=dict)
    unmounted: list[str] = field(default_factory=list)

    def finish(self) -> None:
        self.killed.update(stop_processes_under(self.base, self.cgroups))
        self.unmounted += unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
        problems = [f"killed pid {pid}: {cmd}" for pid, cmd in self.killed.items()]
        problems += [f"unmounted {point}" for point in self.unmounted]
        if problems:
            raise AssertionError(f"{self.name} left things behind:\n  " + "\n  ".join(problems))


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if it exited on SIGTERM."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False


def caller_env(directory: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[OWNER_ENV] = str(directory)
    return env


def require(*binaries: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the callers' fixtures need root")
    missing = [b for b in binaries if not (shutil.which(b) or os.access(b, os.X_OK))]
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)} (run scripts/install.sh --dev)")


# --------------------------------------------------------------------------------------------
# Session directory, image and runtime


@pytest.fixture(scope="session")
def e2e_dir() -> Iterator[Path]:
    """The session's private directory, short enough for unix socket paths."""
    path = Path(tempfile.mkdtemp(prefix="runm-e2e-", dir="/tmp"))
    yield path
    Teardown("e2e session directory", path).finish()


@pytest.fixture(scope="session")
def busybox_image(e2e_dir: Path) -> Path:
    """The busybox image tarball (docker-archive, tagged IMAGE), built once per session."""
    return build_busybox_image(e2e_dir / "busybox.tar", IMAGE)


@pytest.fixture(scope="session")
def runtime_binary(e2e_dir: Path, guest_image: object) -> str:
    """The runtime under test: runm from this checkout (RUNM_E2E_RUNTIME=/usr/sbin/runc runs the
    same tests against plain runc, to tell the callers' behaviour from runm's)."""
    forced = os.environ.get("RUNM_E2E_RUNTIME")
    if forced:
        return forced
    src = Path(__file__).resolve().parents[2] / "src"
    path = e2e_dir / "bin" / "runm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n"
                    f"PYTHONPATH={shlex.quote(str(src))} "
                    f"exec {shlex.quote(sys.executable)} -m runm.cli.entry \"$@\"\n")
    path.chmod(0o755)
    return str(path)


@dataclass
class RuntimeTrace:
    """A wrapper script that records each invocation of the runtime before exec'ing it.

    Each call leaves one file in `log_dir` named `<ns timestamp>.<pid>` holding the cwd and the
    arguments, NUL-separated.
    """

    path: Path
    real: str
    log_dir: Path

    @classmethod
    def create(cls, directory: Path, real: str) -> RuntimeTrace:
        real = shutil.which(real) or real
        directory.mkdir(parents=True, exist_ok=True)
        log_dir = directory / "calls"
        log_dir.mkdir(exist_ok=True)
        path = directory / Path(real).name  # same basename: callers key behaviour off it
        date = shutil.which("date") or "/bin/date"
        path.write_text(
            "#!/bin/sh\n"
            "# runm e2e: record this call, then become the runtime under test.\n"
            f"printf '%s\\0' \"$PWD\" \"$@\" > {shlex.quote(str(log_dir))}/"
            f"\"$({shlex.quote(date)} +%s%N).$$\" 2>/dev/null\n"
            f"exec {shlex.quote(real)} \"$@\"\n")
        path.chmod(0o755)
        return cls(path=path, real=real, log_dir=log_dir)

    def calls(self, since: int = 0) -> list[list[str]]:
        """The calls recorded since `since` (see mark) in order, each as [cwd, arg1, ...]."""
        entries = []
        for entry in self.log_dir.iterdir():
            stamp, _, pid = entry.name.partition(".")
            with contextlib.suppress(OSError, ValueError):
                if int(stamp) >= since:
                    entries.append(((int(stamp), int(pid)), entry.read_bytes()))
        entries.sort()
        return [data.decode(errors="replace").split("\0")[:-1] for _, data in entries]

    def mark(self) -> int:
        """Now, to pass as `since=` to see only the calls made from this point on."""
        return time.time_ns()

    def verbs(self, since: int = 0) -> list[str]:
        """The subcommand of each call since `since` (`create`, `start`, `state`, ...)."""
        return [runtime_verb(call[1:]) for call in self.calls(since)]


RUNTIME_GLOBAL_FLAGS_WITH_VALUE = {"--root", "--log", "--log-format", "--criu", "--rootless"}


def runtime_verb(args: Sequence[str]) -> str:
    """The subcommand in a runc-style argv (global flags skipped), or '' (e.g. `--version`)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in RUNTIME_GLOBAL_FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return ""


@pytest.fixture(scope="session")
def shim_dir(e2e_dir: Path, guest_image: object) -> Path:
    """A directory holding containerd-shim-runm-v2 from this checkout, for containerd's PATH
    (containerd finds the shim of runtime io.containerd.runm.v2 by that name)."""
    src = Path(__file__).resolve().parents[2] / "src"
    directory = e2e_dir / "shimbin"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "containerd-shim-runm-v2"
    path.write_text("#!/bin/sh\n"
                    f"PYTHONPATH={shlex.quote(str(src))} "
                    f"exec {shlex.quote(sys.executable)} -m runm.shim.entry \"$@\"\n")
    path.chmod(0o755)
    return directory


@pytest.fixture(scope="session")
def runtime_trace(runtime_binary: str, e2e_dir: Path) -> RuntimeTrace:
    return RuntimeTrace.create(e2e_dir / "runtime", runtime_binary)


@pytest.fixture(scope="session")
def runtime(runtime_trace: RuntimeTrace) -> str:
    """The runtime path handed to podman, containerd and dockerd (the tracing wrapper)."""
    return str(runtime_trace.path)


# --------------------------------------------------------------------------------------------
# podman


@dataclass
class Podman:
    dir: Path
    runtime: str
    conmon: str
    env: dict[str, str]
    image: str = IMAGE

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.dir / "root"), "--runroot", str(self.dir / "run"),
                "--tmpdir", str(self.dir / "tmp"), "--volumepath", str(self.dir / "volumes"),
                "--network-config-dir", str(self.dir / "net"), "--runtime", self.runtime,
                "--conmon", self.conmon, "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--storage-driver", "overlay", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_command(self.argv(*args), self.env, check=check, timeout=timeout,
                           input=input)


def podman_env(directory: Path) -> dict[str, str]:
    """Write an isolated containers.conf, storage.conf and registries.conf; return the env."""
    for sub in ("root", "run", "tmp", "volumes", "net"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    conf = directory / "containers.conf"
    conf.write_text(f"""\
[containers]
# No CAP_SYS_RESOURCE here: podman's default (raising nofile/nproc) makes runc fail.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
# podman passes --log-format=json --log FILE only to runtimes it knows understand them.
runtime_supports_json = ["runm", "runc", "crun"]
events_logger = "file"
events_logfile_path = "{directory}/events.log"
# File locks under tmp_dir rather than the host-wide /dev/shm/libpod_lock.
lock_type = "file"
tmp_dir = "{directory}/tmp"
volume_path = "{directory}/volumes"

[network]
network_config_dir = "{directory}/net"
""")
    storage = directory / "storage.conf"
    storage.write_text(f"""\
[storage]
driver = "overlay"
graphroot = "{directory}/root"
runroot = "{directory}/run"
""")
    registries = directory / "registries.conf"
    registries.write_text("unqualified-search-registries = []\n")
    env = caller_env(directory)
    env.update(CONTAINERS_CONF=str(conf), CONTAINERS_STORAGE_CONF=str(storage),
               CONTAINERS_REGISTRIES_CONF=str(registries))
    return env


@pytest.fixture(scope=CALLER_SCOPE)
def podman(runtime: str, busybox_image: Path, e2e_dir: Path) -> Iterator[Podman]:
    require("podman", "conmon")
    directory = Path(tempfile.mkdtemp(prefix="podman-", dir=e2e_dir))
    footprint = HostFootprint(PODMAN_HOST_PATHS)
    cgroups = existing_cgroups(PODMAN_CGROUPS)
    helper = Podman(dir=directory, runtime=runtime, conmon=shutil.which("conmon") or "conmon",
                    env=podman_env(directory))
    teardown = Teardown("podman", directory, new_cgroup_names(PODMAN_CGROUPS, cgroups))
    try:
        helper.run("load", "-i", str(busybox_image), timeout=120)
        yield helper
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            helper.run("rm", "--all", "--force", "--time", "0", check=False, timeout=60)
        try:
            teardown.finish()
        finally:
            remove_empty_cgroups(PODMAN_CGROUPS, cgroups)
            footprint.clean()


# --------------------------------------------------------------------------------------------
# containerd


@dataclass
class Containerd:
    dir: Path
    address: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    namespace: str = CTR_NAMESPACE
    image: str = IMAGE

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def runc_root(self) -> Path:
        """Where the runtime keeps container state for `ctr run` (ctr appends the namespace)."""
        return self.dir / "runc"

    def argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", namespace or self.namespace,
                *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_command(self.argv(*args, namespace=namespace), self.env, check=check,
                           timeout=timeout, input=input, log=self.log)

    run = ctr

    def runtime_flags(self, runtime: str) -> list[str]:
        """`ctr run` flags making containerd-shim-runc-v2 use `runtime`, with state kept here."""
        return ["--runc-binary", runtime, "--runc-root", str(self.runc_root),
                "--fifo-dir", str(self.dir / "fifo")]


def containerd_config(directory: Path) -> Path:
    config = directory / "config.toml"
    disabled = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.tracing",
                "io.containerd.tracing.processor.v1.otlp"]
    config.write_text(f"""\
version = 2
root = "{directory}/root"
state = "{directory}/state"
disabled_plugins = [{", ".join(f'"{p}"' for p in disabled)}]

[grpc]
  address = "{directory}/c.sock"

[ttrpc]
  address = "{directory}/c.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{directory}/opt"
""")
    return config


def clean_containerd_namespace(helper: Containerd, namespace: str) -> None:
    """Force-delete every task and container in `namespace` (kills their processes)."""
    tasks = helper.ctr("tasks", "ls", "-q", namespace=namespace, check=False).stdout.split()
    for task in tasks:
        helper.ctr("tasks", "rm", "--force", task, namespace=namespace, check=False)
    containers = helper.ctr("containers", "ls", "-q", namespace=namespace, check=False)
    for container in containers.stdout.split():
        helper.ctr("containers", "rm", container, namespace=namespace, check=False)


@pytest.fixture(scope=CALLER_SCOPE)
def containerd(busybox_image: Path, e2e_dir: Path, shim_dir: Path) -> Iterator[Containerd]:
    require("containerd", "ctr", "containerd-shim-runc-v2")
    directory = Path(tempfile.mkdtemp(prefix="ctrd-", dir=e2e_dir))
    (directory / "fifo").mkdir()
    footprint = HostFootprint(CONTAINERD_HOST_PATHS)
    cgroups = existing_cgroups(CONTAINERD_CGROUPS)
    config = containerd_config(directory)
    teardown = Teardown("containerd", directory, new_cgroup_names(CONTAINERD_CGROUPS, cgroups))
    env = caller_env(directory)
    env["PATH"] = f"{shim_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    with (directory / "containerd.log").open("wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(config), "--log-level", "warn"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)
    helper = Containerd(dir=directory, address=str(directory / "c.sock"), proc=proc, env=env)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited {proc.returncode}:\n{tail(helper.log)}")
            return helper.ctr("version", check=False, timeout=10).returncode == 0

        if not wait_for(ready, timeout=30):
            raise RuntimeError(f"containerd not ready after 30 s:\n{tail(helper.log)}")
        helper.ctr("images", "import", str(busybox_image), timeout=120)
        yield helper
    finally:
        proc = helper.proc  # a test may have restarted containerd
        try:
            if proc.poll() is None:
                namespaces = helper.ctr("namespaces", "ls", "-q", check=False).stdout.split()
                for namespace in namespaces:
                    clean_containerd_namespace(helper, namespace)
            if not stop_daemon(proc):
                teardown.killed[proc.pid] = "containerd (ignored SIGTERM)"
            teardown.finish()
        finally:
            remove_empty_cgroups(CONTAINERD_CGROUPS, cgroups)
            footprint.clean()


# --------------------------------------------------------------------------------------------
# dockerd


@dataclass
class Dockerd:
    dir: Path
    host: str
    runtime: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    runtime_name: str = DOCKER_RUNTIME_NAME
    image: str = IMAGE

    @property
    def log(self) -> Path:
        return self.dir / "dockerd.log"

    def argv(self, *args: str) -> list[str]:
        return [DOCKER_CLI, "--host", self.host, *args]

    def docker(self, *args: str, check: bool = True, timeout: float = 60,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_command(self.argv(*args), self.env, check=check, timeout=timeout,
                           input=input, log=self.log)

    run = docker


def dockerd_argv(directory: Path, containerd_address: str, runtime: str) -> list[str]:
    (directory / "daemon.json").write_text("{}\n")
    return ["dockerd", "--config-file", str(directory / "daemon.json"),
            "--data-root", str(directory / "data"), "--exec-root", str(directory / "exec"),
            "--pidfile", str(directory / "dockerd.pid"), "--host", f"unix://{directory}/d.sock",
            "--containerd", containerd_address,
            "--containerd-namespace", DOCKER_NAMESPACE,
            "--containerd-plugins-namespace", f"{DOCKER_NAMESPACE}-plugins",
            "--add-runtime", f"{DOCKER_RUNTIME_NAME}={runtime}",
            "--storage-driver", "overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            "--ip-forward=false", "--userland-proxy=false", "--log-level", "warn"]


@pytest.fixture(scope=CALLER_SCOPE)
def dockerd(runtime: str, containerd: Containerd, busybox_image: Path,
            e2e_dir: Path) -> Iterator[Dockerd]:
    require("dockerd", DOCKER_CLI)
    directory = Path(tempfile.mkdtemp(prefix="docker-", dir=e2e_dir))
    footprint = HostFootprint(DOCKER_HOST_PATHS)
    cgroups = existing_cgroups(DOCKER_CGROUPS)
    argv = dockerd_argv(directory, containerd.address, runtime)
    teardown = Teardown("dockerd", directory, new_cgroup_names(DOCKER_CGROUPS, cgroups))
    env = caller_env(directory)
    env.pop("DOCKER_HOST", None)
    env["DOCKER_CONFIG"] = str(directory / "cli")  # not ~/.docker
    with (directory / "dockerd.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, start_new_session=True)
    helper = Dockerd(dir=directory, host=f"unix://{directory}/d.sock", runtime=runtime,
                     proc=proc, env=env)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {proc.returncode}:\n{tail(helper.log)}")
            return helper.docker("version", check=False, timeout=10).returncode == 0

        if not wait_for(ready, timeout=60):
            raise RuntimeError(f"dockerd not ready after 60 s:\n{tail(helper.log)}")
        helper.docker("load", "-i", str(busybox_image), timeout=120)
        yield helper
    finally:
        try:
            if proc.poll() is None:
                ids = helper.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    helper.docker("rm", "--force", *ids, check=False, timeout=60)
            if not stop_daemon(proc, timeout=30):
                teardown.killed[proc.pid] = "dockerd (ignored SIGTERM)"
            if containerd.proc.poll() is None:
                clean_containerd_namespace(containerd, DOCKER_NAMESPACE)
            teardown.finish()
        finally:
            remove_empty_cgroups(DOCKER_CGROUPS, cgroups)
            footprint.clean()
