"""Driving the guest's (unmodified) runc."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from runm.agent.reaper import Reaper


class RuncError(Exception):
    """runc failed; the message is runc's own error text."""


class Runc:
    def __init__(self, reaper: Reaper, *, binary: str = "runc", root: str = "/run/runc",
                 state_dir: str = "/run/runm") -> None:
        self.reaper = reaper
        self.binary = binary
        self.root = root
        self.state_dir = Path(state_dir)

    def log_path(self, container_id: str) -> Path:
        return self.state_dir / container_id / "runc.log"

    def argv(self, container_id: str, *args: str) -> list[str]:
        return [self.binary, "--root", self.root, "--log", str(self.log_path(container_id)),
                "--log-format", "json", *args]

    async def run(self, container_id: str, args: Sequence[str], *, stdin: int | None = None,
                  stdout: int | None = None, stderr: int | None = None) -> None:
        """Run one runc command; raise RuncError with runc's message when it fails."""
        log = self.log_path(container_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        status = await self.reaper.run(self.argv(container_id, *args), stdin=stdin,
                                       stdout=stdout, stderr=stderr)
        if status != 0:
            raise RuncError(last_error(log, offset) or f"runc {args[0]} exited with {status}")

    async def output(self, container_id: str, args: Sequence[str]) -> str:
        log = self.log_path(container_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        status, out, err = await self.reaper.output(self.argv(container_id, *args))
        if status != 0:
            msg = last_error(log, offset) or err.decode(errors="replace").strip()
            raise RuncError(msg or f"runc {args[0]} exited with {status}")
        return out.decode(errors="replace")

    def cgroup(self, container_id: str) -> Path | None:
        """The container's cgroup v2 directory, as runc recorded it in its state file
        (there even when the container's process has exited already)."""
        try:
            state = json.loads((Path(self.root) / container_id / "state.json").read_text())
            path = state["cgroup_paths"][""]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Path(path) if isinstance(path, str) and path else None

    async def state(self, container_id: str) -> dict[str, object]:
        out = await self.output(container_id, ["state", container_id])
        state: dict[str, object] = json.loads(out)
        return state


def last_error(log: Path, offset: int = 0) -> str:
    """The last level=error message runc wrote to its JSON log after offset."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "error":
            return str(entry.get("msg", ""))
    return ""


def read_pid_file(path: Path) -> int:
    return int(path.read_text().strip())


def remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            child.unlink()
    os.rmdir(path)
