"""Shared fixtures: the runm CLI as a subprocess, the guest image, and leak checks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VM_RUN_DIR = Path("/run/runm-vm")  # runm's default per-VM socket dirs


def _entries(path: Path) -> set[str]:
    try:
        return {p.name for p in path.iterdir()}
    except OSError:
        return set()


# What other runm users on this host had before the suite started (not ours to judge).
VM_RUN_DIRS_BEFORE = _entries(VM_RUN_DIR)
LEAK_PATTERNS = ("qemu-system", "virtiofsd")
LEAK_MODULES = ("runm.sandbox.monitor", "runm.sandbox.standin", "runm.sandbox.pool",
                "runm.sandbox.poolwait",
                "runm.shim.main")


def vm_processes() -> dict[int, str]:
    """pid -> cmdline of every QEMU, virtiofsd, runm monitor and stand-in on the host."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(p in cmdline.split(" ", 1)[0] for p in LEAK_PATTERNS) or \
                any(runs_module(cmdline, module) for module in LEAK_MODULES):
            found[int(entry.name)] = cmdline
    return found


def runs_module(cmdline: str, module: str) -> bool:
    """Whether a command line runs a runm module (`python -m M` or `python -m runm.launch M`)."""
    return f"-m {module} " in cmdline or f"-m runm.launch {module} " in cmdline


def runm_mounts() -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line for line in lines if "virtiofs" in line or "runm" in line]


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll predicate until true or timeout (a bounded readiness check, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> bytes | None:
    """The body at url, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bytes(response.read())
    except OSError:
        return None


@dataclass
class Runm:
    root: Path
    env: dict[str, str]

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runm.cli.main", "--root", str(self.root), *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, env=env or self.env, check=False)

    def run_detached(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """For verbs after which the container keeps the caller's stdio (create, run -d,
        exec -d): output goes through a file, since its pipes would not see EOF."""
        import tempfile

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = subprocess.run(self.argv(*args), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, timeout=timeout, env=self.env, check=False)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(result.args, result.returncode, out.read(),
                                               err.read())

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), env=self.env, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def runm(tmp_path: Path) -> Runm:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src")
    env["RUNM_RUN_DIR"] = str(tmp_path / "vm")  # so leak checks can tell this test's VMs apart
    return Runm(root=tmp_path / "state", env=env)


@pytest.fixture(scope="session")
def guest_image():  # type: ignore[no-untyped-def]
    import asyncio

    from runm.guest.image import default_data_dir, ensure_image
    from runm.sandbox.sandbox import prepare_snapshot

    image = ensure_image(default_data_dir())
    assert asyncio.run(prepare_snapshot(image)), "making the VM snapshot failed"
    return image


@pytest.fixture
def no_leaks(tmp_path: Path) -> Iterator[None]:
    """Fail the test if it leaves a QEMU, a virtiofsd or a mount behind.

    A test's VMs are told apart from anything else running on the host by its tmp_path, which
    appears in their command lines (run dir, bundle).
    """
    mounts_before = set(runm_mounts())
    yield
    leaked: dict[int, str] = {}
    mine = str(tmp_path)

    def clean() -> bool:
        nonlocal leaked
        leaked = {p: c for p, c in vm_processes().items() if mine in c}
        return not leaked

    ok = wait_until(clean, timeout=15)
    for pid in leaked:  # do not let one leak cascade into every later test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert ok, f"leaked processes: {leaked}"
    leaked_mounts = {m for m in set(runm_mounts()) - mounts_before
                     if mine in m or " virtiofs " in m}
    assert not leaked_mounts, f"leaked mounts: {leaked_mounts}"
