"""A busybox image built locally, for callers that cannot reach a registry.

`build_busybox_image` writes a docker-archive tarball (the `docker save` layout: manifest.json,
repositories, the image config and one uncompressed layer tar) holding /bin/busybox from
busybox-static, a symlink per applet and a minimal /etc. All three importers accept it:
`podman load -i`, `ctr images import` (format docker.v1.2) and `docker load -i`.

The output is byte-for-byte reproducible (fixed mtimes, owners and order), so its digests are
stable across runs and rebuilding it is harmless; within one process it is built once per path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
DEFAULT_REF = "localhost/runm-busybox:latest"
MTIME = 1704067200  # 2024-01-01T00:00:00Z: fixed so the layer digest does not change
CREATED = "2024-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_built: dict[tuple[Path, str], str] = {}  # (tarball, ref) -> sha256 of the tarball


def _goarch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}.get(machine, machine)


def _split_ref(ref: str) -> tuple[str, str]:
    """`localhost/x:tag` -> (`localhost/x`, `tag`); a missing tag means `latest`."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return name, tag


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    tar.addfile(_info(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in out.stdout.split() if a and "/" not in a and a != "busybox"})


def busybox_layer(busybox: Path = BUSYBOX) -> bytes:
    """The root filesystem as an uncompressed, reproducible layer tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in [("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555),
                           ("root", 0o700), ("run", 0o755), ("sys", 0o555), ("tmp", 0o1777),
                           ("usr", 0o755), ("usr/bin", 0o755), ("var", 0o755)]:
            tar.addfile(_info(name, tarfile.DIRTYPE, mode))
        _add_file(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        for applet in busybox_applets(busybox):
            tar.addfile(_info(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
        _add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                                     b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        _add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def build_busybox_image(path: Path, ref: str = DEFAULT_REF) -> Path:
    """Write the busybox image tagged `ref` as a docker-archive tarball at `path`; return `path`.

    Built once per (path, ref) per process; a later call returns the existing file unless it
    has disappeared or changed.
    """
    path = Path(path)
    key = (path.resolve(), ref)
    if key in _built and path.is_file() and sha256_file(path) == _built[key]:
        return path

    layer = busybox_layer()
    diff_id = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": _goarch(),
        "os": "linux",
        "created": CREATED,
        "config": {"Cmd": ["sh"], "Env": [PATH_ENV], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": CREATED, "created_by": "tests/e2e/images.py (busybox-static)"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_id = hashlib.sha256(config_bytes).hexdigest()
    layer_path = f"{diff_id}/layer.tar"
    manifest = [{"Config": f"{config_id}.json", "RepoTags": [ref], "Layers": [layer_path]}]
    repo, tag = _split_ref(ref)
    repositories = {repo: {tag: diff_id}}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(diff_id, tarfile.DIRTYPE, 0o755))
        _add_file(tar, f"{diff_id}/VERSION", b"1.0")
        _add_file(tar, layer_path, layer)
        _add_file(tar, f"{config_id}.json", config_bytes)
        _add_file(tar, "manifest.json", json.dumps(manifest).encode())
        _add_file(tar, "repositories", json.dumps(repositories).encode())
    tmp.replace(path)
    _built[key] = sha256_file(path)
    return path


def image_id(path: Path) -> str:
    """The image ID (`sha256:` + config digest) of a tarball written by build_busybox_image."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        config_name = json.load(member)[0]["Config"]
    return "sha256:" + Path(config_name).stem


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
