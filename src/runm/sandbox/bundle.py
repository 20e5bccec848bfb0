"""Reading and checking an OCI bundle the way runc does, with runc's error texts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from runm.errors import RunmError
from runm.jsonfile import parse_object
from runm.records import record

# runc 1.1: libcontainer's idRegex plus its clean-path check.
_ID_RE = re.compile(r"[\w+\-.]+", re.ASCII)
GUEST_OWN_TREES = ("dev", "proc", "sys")


def validate_id(container_id: str) -> None:
    if not container_id:
        raise RunmError("container id cannot be empty")
    if (not _ID_RE.fullmatch(container_id) or container_id in (".", "..")
            or os.path.normpath("/" + container_id) != "/" + container_id):
        raise RunmError(f"invalid container id format: {container_id}")


@record(frozen=True)
class Bundle:
    path: Path  # absolute
    spec: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        root = self.spec.get("root") or {}
        rootfs = Path(str(root.get("path", "rootfs")))
        return rootfs if rootfs.is_absolute() else self.path / rootfs

    @property
    def terminal(self) -> bool:
        return bool((self.spec.get("process") or {}).get("terminal", False))

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.spec.get("annotations") or {})

    def bind_sources(self) -> list[tuple[str, Path]]:
        """(destination, host source) of every bind mount in the spec."""
        binds = []
        for mount in self.spec.get("mounts") or []:
            if not isinstance(mount, dict):
                continue
            options = mount.get("options") or []
            source = str(mount.get("source", ""))
            if (mount.get("type") == "bind" or "bind" in options or "rbind" in options) \
                    and source.startswith("/"):
                binds.append((str(mount.get("destination", "")), Path(os.path.normpath(source))))
        return binds

    def shared_dirs(self) -> list[Path]:
        """Host directories the guest needs at the same paths: the bundle, the rootfs, and every
        bind source (a file's directory); nested ones are covered by their parent."""
        wanted = [self.path, Path(os.path.normpath(self.rootfs))]
        for destination, source in self.bind_sources():
            if source.parts[1:2] and source.parts[1] in GUEST_OWN_TREES:
                continue  # the guest has its own /dev, /proc and /sys
            if not source.exists():
                raise RunmError(f"invalid mount {destination}: stat {source}: "
                                "no such file or directory")
            wanted.append(source if source.is_dir() else source.parent)
        shared: list[Path] = []
        for path in sorted(set(wanted), key=lambda p: (len(p.parts), str(p))):
            if not any(path.is_relative_to(parent) for parent in shared):
                shared.append(path)
        return shared

    def namespaces(self) -> set[str]:
        linux = self.spec.get("linux") or {}
        return {str(ns.get("type")) for ns in linux.get("namespaces") or []}


def load_bundle(bundle: str | os.PathLike[str] | None) -> Bundle:
    """Load <bundle>/config.json (bundle defaults to the cwd) and check what runc checks."""
    path = Path(os.path.abspath(bundle if bundle else os.getcwd()))
    if not path.is_dir():
        what = "no such file or directory" if not path.exists() else "not a directory"
        raise RunmError(f"chdir {path}: {what}")
    config = path / "config.json"
    try:
        text = config.read_text()
    except FileNotFoundError:
        raise RunmError("JSON specification file config.json not found") from None
    except OSError as err:
        raise RunmError(f"open {config}: {err.strerror}") from None
    spec = parse_object(text, config, "specification")
    process = spec.get("process")
    if process is not None and not isinstance(process, dict):
        raise RunmError(f"parsing {config}: process must be an object")
    if not isinstance(spec.get("root", {}), dict):
        raise RunmError(f"parsing {config}: root must be an object")
    result = Bundle(path, spec)
    if not result.rootfs.is_dir():
        raise RunmError(f"invalid rootfs: stat {result.rootfs}: no such file or directory")
    if process is None:
        raise RunmError("process not found in config")  # runc: spec validation
    if not process.get("args"):
        raise RunmError("args must not be empty")
    result.shared_dirs()  # a missing bind source is an error before any VM boots
    return result
