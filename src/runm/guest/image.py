"""The guest image: find it (cheap, on every container start) or build it (cached).

Layout under ``<data_dir>/guest/``::

    lock                     flock'd by builders
    base/<base_key>/         Debian download + kernel + trimmed, compiled root tree (slow part)
        rootfs/ vmlinux modules/ base.json
    images/<digest>/         one finished image per image_digest()
        vmlinux initrd.img rootfs.erofs manifest.json
    tmp/                     builders' scratch space (only touched under the lock)

Both stages are built in ``tmp/`` and renamed into place, so a directory that exists is
complete. Old images and bases are pruned (the newest two of each are kept).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runm.filelock import hold, open_lock
from runm.guest import build
from runm.guest.errors import GuestImageError
from runm.guest.init_script import INIT_SCRIPT
from runm.records import record
from runm.sha import sha256_hex

__all__ = [
    "GuestImage",
    "GuestImageError",
    "build_image",
    "default_data_dir",
    "ensure_image",
    "find_image",
    "image_digest",
]

KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.img"
ROOTFS_FILE = "rootfs.erofs"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
IMAGE_FILES = (KERNEL_FILE, INITRD_FILE, ROOTFS_FILE)
KEEP_IMAGES = 2
LAST_USED = "last-used"
IN_USE_GRACE = 3600.0  # seconds since an image last started a VM before it may be pruned
KEEP_BASES = 2


@record(frozen=True)
class GuestImage:
    kernel: Path  # uncompressed PVH-bootable vmlinux ELF
    initrd: Path  # gzip'd newc cpio: busybox + /init + kernel modules
    rootfs: Path  # read-only erofs root image (python3, runc, busybox, the runm agent)
    digest: str  # content hash of all inputs (hex)
    kernel_release: str  # what `uname -r` prints in the guest


def default_data_dir() -> Path:
    """``$RUNM_DATA_DIR`` if set, else ``/var/lib/runm``."""
    env = os.environ.get("RUNM_DATA_DIR")
    return Path(env) if env else Path("/var/lib/runm")


def _runm_root() -> Path:
    import runm

    return Path(runm.__file__).resolve().parent


def _digest_for(runm_root: Path) -> str:
    def put(label: str, data: bytes) -> bytes:
        return label.encode() + b"\0" + len(data).to_bytes(8, "little") + data

    return sha256_hex(
        put("builder-version", build.BUILDER_VERSION.encode()),
        put("base-key", build.base_key().encode()),
        put("init", INIT_SCRIPT.encode()),
        put("erofs", " ".join(build.EROFS_OPTIONS).encode()),
        (put(label, data) for label, data in build.file_digest_inputs()),
        (put(f"agent/{rel}", path.read_bytes()) for rel, path in build.agent_sources(runm_root)))


def image_digest() -> str:
    """Hash of everything the image is built from, without building anything.

    Covers the agent sources, the /init script, the builder's sources and version, and the
    base key (package list, suite, arch, kernel modules).
    """
    return _digest_for(_runm_root())


def _guest_dir(data_dir: Path | None) -> Path:
    return (data_dir if data_dir is not None else default_data_dir()).absolute() / "guest"


def _load_image(guest: Path, digest: str) -> GuestImage:
    d = guest / "images" / digest
    mpath = d / MANIFEST_FILE

    def corrupt(reason: str) -> GuestImageError:
        return GuestImageError(f"guest image in {d} is corrupt ({reason}): run `runm guest build`")

    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise GuestImageError(f"guest image not found in {guest}: run `runm guest build`") from None
    except OSError as exc:
        raise GuestImageError(f"reading guest image manifest {mpath}: {exc.strerror}") from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        release = manifest["kernel_release"]
        if (
            manifest["format"] != MANIFEST_FORMAT
            or not isinstance(files, dict)
            or not isinstance(release, str)
        ):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise corrupt("unreadable manifest.json") from None
    if manifest.get("digest") != digest:
        raise corrupt("manifest.json is for another digest")
    for name in IMAGE_FILES:
        expected = files.get(name)
        if not isinstance(expected, int):
            raise corrupt(f"manifest.json has no size for {name}")
        try:
            size = (d / name).stat().st_size
        except FileNotFoundError:
            raise corrupt(f"{name} is missing") from None
        except OSError as exc:
            raise corrupt(f"{name}: {exc.strerror}") from None
        if size != expected:
            raise corrupt(f"{name} is {size} bytes, manifest.json says {expected}")
    return GuestImage(
        kernel=d / KERNEL_FILE,
        initrd=d / INITRD_FILE,
        rootfs=d / ROOTFS_FILE,
        digest=digest,
        kernel_release=release,
    )


def find_image(data_dir: Path | None = None) -> GuestImage:
    """The built image for the current :func:`image_digest`.

    Cheap (hashes only the small inputs and stats the image files against manifest.json);
    raises GuestImageError if the image is missing or corrupt.
    """
    image = _load_image(_guest_dir(data_dir), image_digest())
    with contextlib.suppress(OSError):  # a start is under way: no pruning from under it
        (image.rootfs.parent / LAST_USED).touch()
    return image


def ensure_image(
    data_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> GuestImage:
    """:func:`find_image`, else :func:`build_image` (``force`` rebuilds regardless)."""
    if not force:
        with contextlib.suppress(GuestImageError):
            return find_image(data_dir)
    return build_image(data_dir, progress=progress, force=force)


@contextlib.contextmanager
def _locked(path: Path, progress: Callable[[str], None] | None) -> Iterator[None]:
    try:
        fd = open_lock(path)
    except OSError as exc:
        raise GuestImageError(f"building guest image: opening {path}: {exc.strerror}") from None
    with hold(fd, (lambda: progress("waiting for another guest image build")) if progress
              else None):
        yield


def _replace_dir(staging: Path, final: Path, tmp: Path) -> None:
    """Rename ``staging`` to ``final``, replacing (then deleting) an existing ``final``."""
    staging.chmod(0o755)
    old: Path | None = None
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix="old-", dir=tmp))
        os.rename(final, old / "x")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(parent: Path, keep: Path, count: int, marker: str) -> None:
    def age(p: Path) -> float:
        try:
            return (p / marker).stat().st_mtime
        except OSError:
            return 0.0

    def recently_used(p: Path) -> bool:
        try:
            return time.time() - (p / LAST_USED).stat().st_mtime < IN_USE_GRACE
        except OSError:
            return False

    others = [p for p in parent.iterdir() if p.is_dir() and p != keep]
    others.sort(key=age, reverse=True)
    for p in others[max(count - 1, 0) :]:
        if not recently_used(p):  # a VM may be booting from it right now
            shutil.rmtree(p, ignore_errors=True)


def build_image(
    data_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> GuestImage:
    """Build the image for the current digest unless a valid one exists (``force``: rebuild
    everything, re-downloading the Debian packages too).

    Safe against concurrent builders (an flock on ``<data_dir>/guest/lock``); nothing
    half-built is left in place on failure.
    """
    guest = _guest_dir(data_dir)
    runm_root = _runm_root()
    digest = _digest_for(runm_root)
    tmp = guest / "tmp"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestImageError(f"building guest image: creating {tmp}: {exc.strerror}") from None

    with _locked(guest / "lock", progress):
        if not force:
            with contextlib.suppress(GuestImageError):
                return _load_image(guest, digest)
        try:
            image = _build_locked(guest, digest, runm_root, progress, force)
        except OSError as exc:
            raise GuestImageError(f"building guest image in {guest}: {exc}") from None
        return image


def _read_base_meta(base_dir: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((base_dir / build.BASE_META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not all(
        k in meta for k in ("key", "kernel_release", "kernel_deb", "modules")
    ):
        return None
    return meta


def _build_locked(
    guest: Path,
    digest: str,
    runm_root: Path,
    progress: Callable[[str], None] | None,
    force: bool,
) -> GuestImage:
    tmp = guest / "tmp"
    for stale in tmp.iterdir():  # left by a builder that was killed
        build.remove_path(stale)

    base_dir = guest / "base" / build.base_key()
    meta = None if force else _read_base_meta(base_dir)
    tools = build.check_tools((build.BASE_TOOLS if meta is None else ()) + build.IMAGE_TOOLS)
    build.check_root()

    if meta is None:
        staging = Path(tempfile.mkdtemp(prefix="base-", dir=tmp))
        try:
            work = staging / "work"
            work.mkdir()
            base_staging = staging / "base"
            base_staging.mkdir()
            build.build_base(base_staging, work, tools, progress)
            _replace_dir(base_staging, base_dir, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        meta = _read_base_meta(base_dir)
        if meta is None:
            raise GuestImageError(
                f"building guest image: {base_dir}/{build.BASE_META} is unreadable"
            )

    final = guest / "images" / digest
    staging = Path(tempfile.mkdtemp(prefix="image-", dir=tmp))
    try:
        tree = staging / "tree"
        if progress is not None:
            progress("adding the runm agent")
        build.stage_root_tree(base_dir / build.BASE_TREE, tree)
        build.install_agent(tree, runm_root, tools)
        if progress is not None:
            progress("building initramfs")
        build.build_initrd(base_dir, staging / INITRD_FILE)
        if progress is not None:
            progress("building root image (erofs)")
        build.build_erofs(tree, staging / ROOTFS_FILE, digest, tools)
        shutil.rmtree(tree)
        try:
            os.link(base_dir / build.BASE_VMLINUX, staging / KERNEL_FILE)
        except OSError:
            shutil.copyfile(base_dir / build.BASE_VMLINUX, staging / KERNEL_FILE)
        manifest = {
            "format": MANIFEST_FORMAT,
            "digest": digest,
            "base_key": meta["key"],
            "kernel_release": meta["kernel_release"],
            "kernel_deb": meta["kernel_deb"],
            "modules": meta["modules"],
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {name: (staging / name).stat().st_size for name in IMAGE_FILES},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(staging, final, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    _prune(guest / "images", final, KEEP_IMAGES, MANIFEST_FILE)
    _prune(guest / "base", base_dir, KEEP_BASES, build.BASE_META)
    return _load_image(guest, digest)
