"""runc's default config.json (`runm spec`) and a busybox bundle for demos, tests and bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from runm.errors import RunmError

CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
BUSYBOX_APPLETS = [
    "sh", "cat", "echo", "ls", "sleep", "true", "false", "uname", "head", "tail", "wc", "dd",
    "sha256sum", "md5sum", "env", "id", "ps", "kill", "mkdir", "rm", "hostname", "mount",
    "grep", "sed", "tr", "seq", "yes", "date", "test", "[", "printf", "httpd", "wget", "touch",
    "stat", "sync", "top", "stty", "tty", "od", "cut", "sort", "uniq", "xargs", "find", "cp",
]


def default_spec(args: list[str] | None = None, *, terminal: bool = True,
                 rootless: bool = False) -> dict[str, Any]:
    """The spec `runc spec` writes (runc 1.1), optionally with other process args."""
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args or ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: list(CAPS) for k in
                             ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if rootless:
        spec["linux"]["namespaces"].append({"type": "user"})
    return spec


def write_spec(bundle: Path, spec: dict[str, Any], *, overwrite: bool = True) -> Path:
    path = bundle / "config.json"
    if not overwrite and path.exists():
        raise RunmError("File config.json exists. Remove it first")
    path.write_text(json.dumps(spec, indent="\t") + "\n")
    return path


def make_busybox_bundle(bundle: Path, args: list[str], *, terminal: bool = False,
                        busybox: str = "/bin/busybox") -> Path:
    """A bundle whose rootfs is the host's busybox-static with its applets linked."""
    source = shutil.which(busybox) or busybox
    if not Path(source).is_file():
        raise RunmError(f"{busybox} not found: install busybox-static")
    rootfs = bundle / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root", "var/www"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        link = rootfs / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    write_spec(bundle, default_spec(args, terminal=terminal))
    return bundle
