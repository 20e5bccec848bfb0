"""Container state on disk under --root: one directory per container, like runc's."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import Any

from runm.atomicfile import write_atomically
from runm.errors import RunmError
from runm.records import record

DEFAULT_ROOT = Path("/run/runm")


def rfc3339_now(digits: int = 9) -> str:
    """The UTC time now as RFC 3339 with `digits` fraction digits (as Go's time package)."""
    seconds, ns = divmod(time.time_ns(), 1_000_000_000)
    fraction = f"{ns:09d}"[:digits]
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds)) + fraction + "Z"


@record
class ContainerRecord:
    id: str
    bundle: str
    rootfs: str
    status: str = "creating"
    pid: int = 0
    created: str = field(default_factory=rfc3339_now)
    annotations: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    vm: dict[str, Any] = field(default_factory=dict)

    def oci_state(self) -> dict[str, Any]:
        """runc's `state` JSON shape."""
        state: dict[str, Any] = {
            "ociVersion": "1.0.2-dev",
            "id": self.id,
            "pid": self.pid if self.status in ("created", "running", "paused") else 0,
            "status": self.status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
        }
        if self.annotations:
            state["annotations"] = self.annotations
        state["owner"] = self.owner
        return state


class StateStore:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else DEFAULT_ROOT

    def dir(self, container_id: str) -> Path:
        return self.root / container_id

    def create(self, record: ContainerRecord) -> None:
        """Claim the id atomically; fails if it is in use."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        except OSError as err:
            raise RunmError(f"creating state root {self.root}: {err.strerror}") from None
        try:
            self.dir(record.id).mkdir(mode=0o711)
        except FileExistsError:
            raise RunmError("container with given ID already exists") from None
        self.save(record)

    def save(self, record: ContainerRecord) -> None:
        """Write the record; a container deleted meanwhile (delete -f) stays deleted."""
        with contextlib.suppress(FileNotFoundError):
            write_atomically(self.dir(record.id) / "state.json",
                             json.dumps(dataclasses.asdict(record)))

    def load(self, container_id: str) -> ContainerRecord:
        try:
            data = json.loads((self.dir(container_id) / "state.json").read_text())
        except OSError:  # missing, or not a valid path at all (e.g. a 300-byte id)
            raise RunmError("container does not exist") from None
        except ValueError as err:
            raise RunmError(f"reading state of {container_id}: {err}") from None
        if not isinstance(data, dict):
            raise RunmError(f"reading state of {container_id}: not a JSON object")
        known = {f.name for f in dataclasses.fields(ContainerRecord)}
        try:  # fields written by another runm version are ignored
            return ContainerRecord(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise RunmError(f"reading state of {container_id}: {err}") from None

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir(container_id), ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, container_id: str) -> Iterator[None]:
        """Serialize state changes of one container across runm invocations."""
        path = self.dir(container_id) / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            raise RunmError("container does not exist") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
