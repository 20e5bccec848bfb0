"""Where each VM's host-side runtime files live: one short directory per VM (its QEMU, agent
and monitor sockets, logs), under a base that pool members share.

Kept apart from the modules that use these paths so that light commands (`runm state`,
`kill`, `delete`) find a container's sockets without importing the VM machinery.
"""

from __future__ import annotations

import os
from pathlib import Path

from runm.sha import sha256_hex


def run_base() -> Path:
    """Where VM run dirs (and pool members) live: $RUNM_RUN_DIR, else /run/runm-vm."""
    return Path(os.environ.get("RUNM_RUN_DIR", "/run/runm-vm"))


def vm_run_dir(root: Path, container_id: str) -> Path:
    """Short per-VM socket dir: unix socket paths are limited to 107 bytes, ids can be 64."""
    digest = sha256_hex(f"{root.resolve()}\0{container_id}".encode())[:16]
    return run_base() / digest


def monitor_socket(run_dir: Path) -> Path:
    """The container's monitor (runm.sandbox.monitor) serves its ttrpc API here."""
    return run_dir / "monitor.sock"


def attach_socket(run_dir: Path) -> Path:
    """Where an exec's stand-in hands the monitor its stdio fds."""
    return run_dir / "attach.sock"
