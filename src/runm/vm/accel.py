"""Choosing the accelerator by a real probe: /dev/kvm existing is not proof that KVM works.

On some hosts (nested paravirtual KVM) QEMU aborts at once with -cpu host, or the stock kernel
crawls for minutes. The probe boots our kernel with no root device: a working accelerator
reaches the "unable to mount root" panic in well under a second; we allow PROBE_TIMEOUT.
The verdict is cached per host kernel, QEMU binary and guest kernel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from runm.atomicfile import write_atomically
from runm.sha import sha256_hex

log = logging.getLogger("runm.vm")

PROBE_TIMEOUT = 10.0
PANIC_MARKERS = ("Kernel panic", "VFS: Unable to mount root", "Unable to mount root")


def cache_dir() -> Path:
    base = os.environ.get("RUNM_DATA_DIR", "/var/lib/runm")
    return Path(base) / "accel"


def _cache_key(kernel: Path, qemu: str) -> str:
    st = os.stat(qemu)
    kst = kernel.stat()
    raw = f"{os.uname().release}|{qemu}|{st.st_mtime_ns}|{kernel}|{kst.st_size}|{kst.st_mtime_ns}"
    return sha256_hex(raw.encode())[:16]


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_kvm(kernel: Path, qemu: str, timeout: float = PROBE_TIMEOUT) -> bool:
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-M", "q35", "-m", "128", "-nodefaults",
            "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False
    out = proc.stdout.decode(errors="replace")
    return any(marker in out for marker in PANIC_MARKERS)


def choose_accelerator(kernel: Path) -> str:
    """'kvm' where KVM really boots our kernel, else 'tcg'. RUNM_ACCEL overrides."""
    forced = os.environ.get("RUNM_ACCEL")
    if forced:
        return forced
    if not kvm_usable():
        return "tcg"
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    try:
        key = _cache_key(kernel, qemu)
    except OSError:
        return "tcg"
    cache = cache_dir() / f"{key}.json"
    try:
        return str(json.loads(cache.read_text())["accel"])
    except (OSError, ValueError, KeyError):
        pass
    accel = "kvm" if probe_kvm(kernel, qemu) else "tcg"
    log.info("accelerator probe: %s", accel)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, json.dumps({"accel": accel}))
    except OSError:
        pass
    return accel
