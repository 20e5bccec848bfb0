"""What the figures were measured on: host, CPU, QEMU, runc, accelerator, date."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model(cpuinfo: str) -> str:
    """'model name' of the first CPU in /proc/cpuinfo text (or 'unknown')."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "cpu model"):
            return " ".join(value.split())
    return "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def mem_total_mib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def git_revision() -> str:
    """Read-only: the checked-out commit, with '+changes' if the tree differs from it."""
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    return head + (" +changes in src/" if dirty.strip() else "")


def collect(accel: str, qemu: str, kernel_release: str) -> dict[str, Any]:
    import runm

    uname = os.uname()
    load = os.getloadavg()
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_kernel": uname.release,
        "machine": uname.machine,
        "cpu_model": cpu_model(_read("/proc/cpuinfo")),
        "cores": os.cpu_count() or 0,
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_mib": mem_total_mib(),
        "cgroup": cgroup,
        "loadavg_start": [round(x, 2) for x in load],
        "accel": accel,
        "qemu": _first_line([qemu, "--version"]),
        "runc": _first_line([shutil.which("runc") or "runc", "--version"]),
        "guest_kernel": kernel_release,
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "runm": f"{runm.__version__} ({git_revision()})",
    }


def header_lines(info: dict[str, Any]) -> list[str]:
    load = info.get("loadavg_start", [])
    end = info.get("loadavg_end", [])
    load_text = "/".join(str(x) for x in load) + (
        f" at start, {'/'.join(str(x) for x in end)} at end" if end else "")
    return [
        f"date       {info['date']}",
        f"host       Linux {info['host_kernel']} {info['machine']}, {info['cpu_model']}, "
        f"{info['cores']} cores ({info['cores_usable']} usable), {info['mem_total_mib']} MiB, "
        f"cgroup {info['cgroup']}",
        f"load       {load_text} (other work on the host skews every figure)",
        f"accel      {info['accel']}" + ("  (TCG: software emulation, no KVM)"
                                         if info["accel"] == "tcg" else ""),
        f"qemu       {info['qemu']}",
        f"runc       {info['runc']} (host, native baselines)",
        f"guest      kernel {info['guest_kernel']}"
        + (f", image {info['guest_image']}" if info.get("guest_image") else ""),
        f"runm       {info['runm']}, {info['python']}",
    ]
