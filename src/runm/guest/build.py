"""The steps that build a guest image (host side, stdlib only, needs root).

Two stages, cached separately by :mod:`runm.guest.image`:

* the *base* (slow, network): ``mmdebstrap --variant=extract`` of the root packages, the kernel
  .deb fetched by an extract hook in the same apt session, the PVH-bootable ``vmlinux`` and the
  initramfs modules taken from it, and the root tree trimmed, given busybox applet links and
  mount points, and byte-compiled by the guest's own python. Keyed by :func:`base_key`; bump
  :data:`BASE_VERSION` whenever anything in :func:`build_base` changes what it produces.
* the *image* (fast, offline): the base tree plus the runm agent sources (hard-linked copy),
  the initramfs (busybox + ``/init`` + modules) and the read-only erofs root image.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from runm.guest.errors import GuestImageError
from runm.guest.init_script import (
    INIT_SCRIPT,
    INITRAMFS_APPLETS,
    INITRAMFS_DIRS,
    MODULE_DIR,
    MODULE_ORDER_FILE,
)
from runm.sha import sha256_hex

__all__ = [
    "AGENT_MODULES",
    "AGENT_PACKAGES",
    "BASE_VERSION",
    "BUILDER_VERSION",
    "INITRAMFS_MODULES",
    "ROOT_PACKAGES",
    "SUITE",
    "Progress",
    "agent_sources",
    "base_key",
    "build_base",
    "build_erofs",
    "build_initrd",
    "check_root",
    "check_tools",
    "debian_arch",
    "extract_vmlinux",
    "file_digest_inputs",
    "host_debian_sources",
    "install_agent",
    "kernel_package",
    "remove_path",
    "stage_root_tree",
]

Progress = Callable[[str], None]

# Bump when the image-stage steps change their output in a way the hashed builder sources
# would not show (they are hashed into the image digest anyway).
BUILDER_VERSION = "1"
# Bump whenever build_base() or anything it calls produces something different: the base
# cache (Debian download + kernel + trimmed tree) is keyed by it, not by the source text.
BASE_VERSION = "2"

SUITE = "bookworm"
ROOT_PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "runc", "busybox-static")
# Debian's generic kernel, not the cloud one: only it has 9p, which page-sharing clones
# (the warm pool) need to share directories (see docs/design.md).
_KERNEL_PACKAGES = {"amd64": "linux-image-amd64"}
# Loaded by /init (with their dependencies, which are resolved from the .ko files).
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "fuse",
    "virtiofs",
    "overlay",
    "erofs",
    "squashfs",
    "virtio_rng",
    "virtio_balloon",
    "9pnet_virtio",
    "9p",
)
# runm modules and packages copied into the guest; only *.py files.
AGENT_MODULES = ("__init__.py", "records.py")
AGENT_PACKAGES = ("agent", "ttrpc", "proto", "channel")

GUEST_SITE = "usr/lib/python3/dist-packages"
EROFS_OPTIONS = ("-T0", "--all-root")  # plus -U<uuid derived from the image digest>

# base layout
BASE_TREE = "rootfs"
BASE_VMLINUX = "vmlinux"
BASE_MODULES = "modules"
BASE_META = "base.json"

# tool -> Debian package that ships it
TOOL_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "chroot": "coreutils",
    "mkfs.erofs": "erofs-utils",
}
BASE_TOOLS = ("mmdebstrap", "apt-get", "dpkg-deb", "lz4", "chroot")
IMAGE_TOOLS = ("chroot", "mkfs.erofs")
# sbin dirs are searched too: a non-root PATH often lacks them
SBIN_FALLBACK = "/usr/local/sbin:/usr/sbin:/sbin"

# PYTHONDONTWRITEBYTECODE: the modules compileall itself imports must not get timestamp .pyc
# files from the import system first (compileall would then skip them as up to date, and the
# erofs image's fixed mtimes would make them stale in the guest).
_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
}

# What the trimmed guest root does not need (globs relative to the tree).
_TRIM = (
    "usr/share/doc",
    "usr/share/doc-base",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/menu",
    "usr/share/polkit-1",
    "usr/share/binfmts",
    "usr/share/initramfs-tools",
    "usr/share/zsh",
    "usr/share/dpkg",
    "usr/lib/*-linux-gnu/gconv",
    "usr/lib/python3.*/test",
    "usr/lib/python3.*/idlelib",
    "usr/lib/python3.*/turtledemo",
    "usr/bin/dpkg*",
    "usr/sbin/dpkg*",
    "etc/apt",
    "etc/dpkg",
    "etc/cron.daily",
    "etc/logrotate.d",
    "var/cache/*",
    "var/lib/apt",
    "var/lib/dpkg",
    "var/log/*",
    "dev/*",
)
# Empty directories the guest mounts on or writes to (mode).
_GUEST_DIRS = {
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "run": 0o755,
    "tmp": 0o1777,
    "mnt": 0o755,
    "root": 0o700,
    "home": 0o755,
    "var/tmp": 0o1777,
    "var/log": 0o755,
    "var/lib": 0o755,
    "var/cache": 0o755,
    GUEST_SITE: 0o755,
}
_GUEST_FILES = {
    "etc/hostname": "runm\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",
}
_GUEST_FILES_IF_MISSING = {
    "etc/passwd": (
        "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}
# busybox applets not linked into the guest root even when nothing else provides them
_APPLET_EXCLUDE = frozenset(
    {"init", "linuxrc", "dpkg", "dpkg-deb", "rpm", "rpm2cpio", "login", "su", "sulogin"}
)
_BIN_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin")

# Extract hook: fetch the kernel image .deb (not the meta package) with mmdebstrap's apt
# configuration, so the kernel comes from the same apt session without being extracted into
# the root tree (its dependencies, initramfs-tools and udev among them, are not wanted there).
_KERNEL_HOOK = r"""set -e
export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"
cd "$RUNM_KERNEL_DEB_DIR"
pkg=$(apt-cache depends "$RUNM_KERNEL_PACKAGE" \
    | sed -n 's/^ *Depends: \(linux-image-[^ <>]*\)$/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    echo "E: cannot resolve $RUNM_KERNEL_PACKAGE to a kernel image package" >&2
    exit 1
fi
apt-get -o APT::Sandbox::User=root download "$pkg"
"""


def _report(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def debian_arch() -> str:
    """The Debian architecture name of this host (``amd64`` on x86_64)."""
    machine = os.uname().machine.lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def kernel_package(arch: str) -> str:
    try:
        return _KERNEL_PACKAGES[arch]
    except KeyError:
        raise GuestImageError(
            f"building guest image: no guest kernel for architecture {arch} yet "
            f"(supported: {', '.join(sorted(_KERNEL_PACKAGES))})"
        ) from None


def base_key(arch: str | None = None) -> str:
    """Cache key of the base stage: package list, suite, arch, module list, base version."""
    arch = arch or debian_arch()
    spec = {
        "base_version": BASE_VERSION,
        "suite": SUITE,
        "arch": arch,
        "packages": list(ROOT_PACKAGES),
        "kernel": _KERNEL_PACKAGES.get(arch, ""),
        "modules": list(INITRAMFS_MODULES),
    }
    return sha256_hex(json.dumps(spec, sort_keys=True).encode())


# --------------------------------------------------------------------------------------------
# host checks and subprocesses


def check_tools(tools: Iterable[str]) -> dict[str, str]:
    """Absolute paths of ``tools``; GuestImageError naming the packages of missing ones."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool in dict.fromkeys(tools):
        path = shutil.which(tool) or (
            shutil.which(tool, path=SBIN_FALLBACK) if SBIN_FALLBACK else None
        )
        if path is None:
            missing.append(tool)
        else:
            found[tool] = path
    if missing:
        packages = " ".join(dict.fromkeys(TOOL_PACKAGES.get(t, t) for t in missing))
        raise GuestImageError(
            f"building guest image: {', '.join(missing)} not found (install {packages})"
        )
    return found


def check_root() -> None:
    if os.geteuid() != 0:
        raise GuestImageError(
            "building guest image: needs root (mmdebstrap and chroot run as root): "
            "run `sudo runm guest build`"
        )


def _tail(data: bytes, lines: int = 12) -> str:
    text = data.decode("utf-8", "replace").strip().splitlines()
    return "\n".join(line.rstrip() for line in text[-lines:] if line.strip())


def _run(
    argv: Sequence[str],
    what: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GuestImageError(
            f"building guest image: {what} timed out after {timeout:.0f} s"
        ) from None
    except OSError as exc:
        raise GuestImageError(
            f"building guest image: {what}: cannot run {argv[0]}: {exc.strerror}"
        ) from None
    if proc.returncode != 0:
        detail = _tail(proc.stderr) or _tail(proc.stdout) or "no output"
        raise GuestImageError(
            f"building guest image: {what} failed (exit status {proc.returncode}): {detail}"
        )
    return proc


def remove_path(path: Path) -> None:
    """Remove a file, symlink or directory tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# Debian packages


def _deb822_paragraphs(text: str) -> list[dict[str, str]]:
    paras: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                paras.append(cur)
            cur, key = {}, ""
        elif raw[0] in " \t" and key:
            cur[key] += "\n" + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    return paras


def _parse_one_line(line: str) -> tuple[list[str], dict[str, str], str, str, list[str]] | None:
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    parts = line.split()
    types = [parts.pop(0)]
    opts: dict[str, str] = {}
    if parts and parts[0].startswith("["):
        words: list[str] = []
        while parts:
            word = parts.pop(0)
            words.append(word)
            if word.endswith("]"):
                break
        for opt in " ".join(words).strip("[] ").split():
            k, _, v = opt.partition("=")
            opts[k.lower()] = v
    if len(parts) < 2:
        return None
    return types, opts, parts[0], parts[1], parts[2:]


def host_debian_sources(suite: str, etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """The host's apt sources for ``suite`` (and -updates / -security), as one-line entries.

    Only ``main`` is used. Empty when the host has none (then mmdebstrap picks its default).
    """
    wanted_suites = {suite, f"{suite}-updates", f"{suite}-security", f"{suite}/updates"}
    entries: list[tuple[list[str], dict[str, str], str, str, list[str]]] = []
    files = [etc_apt / "sources.list"]
    sdir = etc_apt / "sources.list.d"
    if sdir.is_dir():
        files += sorted(sdir.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if path.name.endswith(".sources"):
            for para in _deb822_paragraphs(text):
                if para.get("enabled", "yes").lower() == "no":
                    continue
                opts = {}
                if "signed-by" in para:
                    opts["signed-by"] = para["signed-by"]
                comps = para.get("components", "").split()
                for uri in para.get("uris", "").split():
                    for s in para.get("suites", "").split():
                        entries.append((para.get("types", "").split(), opts, uri, s, comps))
        elif path.name == "sources.list" or path.name.endswith(".list"):
            for line in text.splitlines():
                parsed = _parse_one_line(line)
                if parsed is not None:
                    entries.append(parsed)
    out: list[str] = []
    for types, opts, uri, s, comps in entries:
        if "deb" not in types or s not in wanted_suites or "main" not in comps:
            continue
        signed_by = opts.get("signed-by", "")
        if signed_by and "\n" not in signed_by and Path(signed_by).is_file():
            line = f"deb [signed-by={signed_by}] {uri} {s} main"
        else:
            line = f"deb {uri} {s} main"
        if line not in out:
            out.append(line)
    return out


def _fetch_packages(tree: Path, debs: Path, arch: str, tools: dict[str, str]) -> Path:
    """mmdebstrap the root packages into ``tree``; the kernel .deb lands in ``debs``."""
    debs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["RUNM_KERNEL_DEB_DIR"] = str(debs)
    env["RUNM_KERNEL_PACKAGE"] = kernel_package(arch)
    argv = [
        tools["mmdebstrap"],
        "--variant=extract",
        "--mode=root",
        "--format=directory",
        f"--architectures={arch}",
        f"--include={','.join(ROOT_PACKAGES)}",
        "--skip=chroot/mount",
        f"--extract-hook={_KERNEL_HOOK}",
        SUITE,
        str(tree),
        *host_debian_sources(SUITE),
    ]
    _run(argv, "fetching Debian packages with mmdebstrap", env=env, timeout=1800)
    found = sorted(debs.glob("linux-image-*.deb"))
    if len(found) != 1:
        raise GuestImageError(
            f"building guest image: expected one kernel package in {debs}, found {len(found)}"
        )
    return found[0]


# --------------------------------------------------------------------------------------------
# kernel


def extract_vmlinux(bzimage: bytes, *, lz4: str | None = None, zstd: str | None = None) -> bytes:
    """The uncompressed ELF ``vmlinux`` inside an x86 bzImage (for PVH direct boot).

    Uses the setup header's payload_offset/payload_length (boot protocol >= 2.08); gzip and xz
    payloads are decompressed in Python, LZ4 (legacy frame) and zstd with the ``lz4``/``zstd``
    tools. The kernel build appends the uncompressed size to the payload: it is checked.
    """
    import lzma  # building only: not on every start's import path

    if bzimage[:4] == b"\x7fELF":
        return bzimage
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise GuestImageError("building guest image: the kernel is not an x86 bzImage")
    if struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        raise GuestImageError("building guest image: the kernel's boot protocol is too old")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise GuestImageError("building guest image: the kernel payload is truncated")
    size = struct.unpack("<I", payload[-4:])[0]
    magic = payload[:6]
    try:
        if magic[:2] == b"\x1f\x8b":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif magic == b"\xfd7zXZ\x00":
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload[:-4])
        elif magic[:4] == b"\x02\x21\x4c\x18":
            if lz4 is None:
                raise GuestImageError(
                    "building guest image: the kernel is LZ4-compressed: lz4 not found "
                    "(install lz4)"
                )
            out = _run_filter([lz4, "-dc"], payload[:-4], "decompressing the kernel (lz4)")
        elif magic[:4] == b"\x28\xb5\x2f\xfd":
            if zstd is None:
                raise GuestImageError(
                    "building guest image: the kernel is zstd-compressed: zstd not found "
                    "(install zstd)"
                )
            out = _run_filter([zstd, "-dcq"], payload[:-4], "decompressing the kernel (zstd)")
        else:
            raise GuestImageError(
                f"building guest image: unknown kernel compression (magic {magic.hex()})"
            )
    except (zlib.error, lzma.LZMAError) as exc:
        raise GuestImageError(f"building guest image: decompressing the kernel: {exc}") from None
    if out[:4] != b"\x7fELF":
        raise GuestImageError("building guest image: the decompressed kernel is not an ELF file")
    if magic[:2] != b"\x1f\x8b" and len(out) != size:
        raise GuestImageError(
            f"building guest image: the decompressed kernel is {len(out)} bytes, expected {size}"
        )
    return out


def _run_filter(argv: list[str], data: bytes, what: str) -> bytes:
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestImageError(f"building guest image: {what}: {exc}") from None
    if proc.returncode != 0:
        raise GuestImageError(
            f"building guest image: {what} failed (exit status {proc.returncode}): "
            f"{_tail(proc.stderr) or 'no output'}"
        )
    return proc.stdout


def _prepare_kernel(
    deb: Path, work: Path, base: Path, tools: dict[str, str]
) -> tuple[str, list[str]]:
    """Unpack the kernel .deb; write base/vmlinux and base/modules/. -> (release, module order)."""
    unpacked = work / "kernel"
    _run([tools["dpkg-deb"], "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
    releases = sorted(p.name for p in (unpacked / "lib/modules").glob("*") if p.is_dir())
    if len(releases) != 1:
        raise GuestImageError(
            f"building guest image: expected one kernel release in {deb.name}, found {releases}"
        )
    release = releases[0]
    vmlinuz = unpacked / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise GuestImageError(f"building guest image: {deb.name} has no boot/vmlinuz-{release}")
    vmlinux = extract_vmlinux(vmlinuz.read_bytes(), lz4=tools.get("lz4"), zstd=shutil.which("zstd"))
    (base / BASE_VMLINUX).write_bytes(vmlinux)

    from runm.guest.initramfs import (  # building only: not on every start's import path
        ModuleError,
        builtin_modules,
        load_order,
        read_module,
        scan_modules,
    )

    moddir = unpacked / "lib/modules" / release
    out = base / BASE_MODULES
    try:
        modules = scan_modules(moddir)
        names, aliases = builtin_modules(moddir)
        order = load_order(INITRAMFS_MODULES, modules, builtin=names, builtin_aliases=aliases)
        out.mkdir()
        for mod in order:
            assert mod.path is not None
            (out / f"{mod.name}.ko").write_bytes(read_module(mod.path))
    except ModuleError as exc:
        raise GuestImageError(f"building guest image: kernel {release}: {exc}") from None
    (out / "order").write_text("".join(f"{m.name}\n" for m in order))
    shutil.rmtree(unpacked)
    return release, [m.name for m in order]


# --------------------------------------------------------------------------------------------
# root tree


def _trim(tree: Path) -> None:
    for pattern in _TRIM:
        for path in sorted(tree.glob(pattern), reverse=True):
            remove_path(path)


def _busybox_links(tree: Path) -> int:
    """Symlink busybox applets into the tree where no real binary of that name exists."""
    busybox = tree / "bin/busybox"
    if not busybox.is_file():
        raise GuestImageError("building guest image: busybox-static did not install bin/busybox")
    proc = _run([str(busybox), "--list-full"], "listing busybox applets")
    count = 0
    for entry in proc.stdout.decode().split():
        rel = entry.strip("/")
        name = rel.rpartition("/")[2]
        if not name or name in _APPLET_EXCLUDE or name == "busybox":
            continue
        if any(os.path.lexists(tree / d / name) for d in _BIN_DIRS):
            continue
        link = tree / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        count += 1
    return count


def _guest_files(tree: Path) -> None:
    for rel, mode in _GUEST_DIRS.items():
        path = tree / rel
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            remove_path(path)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    for rel, text in _GUEST_FILES.items():
        path = tree / rel
        if os.path.lexists(path):
            remove_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    for rel, text in _GUEST_FILES_IF_MISSING.items():
        path = tree / rel
        if not os.path.lexists(path):
            path.write_text(text)
            path.chmod(0o644)
    mtab = tree / "etc/mtab"
    if not os.path.lexists(mtab):
        mtab.symlink_to("../proc/self/mounts")


def _python_dirs(tree: Path) -> list[str]:
    stdlib = sorted(p.name for p in (tree / "usr/lib").glob("python3.*") if p.is_dir())
    if not stdlib:
        raise GuestImageError("building guest image: no python3.* standard library in the tree")
    return [f"/usr/lib/{stdlib[-1]}", f"/{GUEST_SITE}"]


def _compileall(tree: Path, dirs: Sequence[str], tools: dict[str, str], what: str) -> None:
    # -f: rewrite whatever is there; no -j: the chroot has no /dev/shm for multiprocessing
    argv = [
        tools["chroot"],
        str(tree),
        "/usr/bin/python3",
        "-m",
        "compileall",
        "-q",
        "-f",
        "--invalidation-mode",
        "unchecked-hash",
        *dirs,
    ]
    _run(argv, what, env=dict(_CHROOT_ENV))
    _check_bytecode(tree, dirs, what)


def _check_bytecode(tree: Path, dirs: Sequence[str], what: str) -> None:
    """Every .py under ``dirs`` has an unchecked-hash .pyc (flags word == 1)."""
    for d in dirs:
        for src in (tree / d.lstrip("/")).rglob("*.py"):
            ok = False
            for pyc in (src.parent / "__pycache__").glob(f"{src.stem}.*.pyc"):
                if ".opt-" in pyc.name:
                    continue
                with pyc.open("rb") as f:
                    header = f.read(8)
                ok = ok or (len(header) == 8 and struct.unpack("<I", header[4:])[0] == 1)
            if not ok:
                rel = src.relative_to(tree)
                raise GuestImageError(
                    f"building guest image: {what}: /{rel} has no unchecked-hash .pyc"
                )


def build_base(
    base: Path, work: Path, tools: dict[str, str], progress: Progress | None = None
) -> dict[str, object]:
    """Build the base stage into the empty directory ``base`` (scratch space in ``work``).

    Returns (and writes as base.json) what it built.
    """
    arch = debian_arch()
    kernel_package(arch)  # fails early on unsupported architectures
    _report(progress, "fetching Debian packages (python3, runc, kernel)")
    tree = base / BASE_TREE
    deb = _fetch_packages(tree, work / "debs", arch, tools)

    _report(progress, "extracting kernel")
    release, order = _prepare_kernel(deb, work, base, tools)

    _report(progress, "preparing root tree")
    _trim(tree)
    _guest_files(tree)
    applets = _busybox_links(tree)
    _report(progress, "compiling Python bytecode")
    _compileall(tree, _python_dirs(tree), tools, "compiling the guest's Python standard library")

    meta: dict[str, object] = {
        "key": base_key(arch),
        "base_version": BASE_VERSION,
        "suite": SUITE,
        "arch": arch,
        "packages": list(ROOT_PACKAGES),
        "kernel_deb": deb.name,
        "kernel_release": release,
        "modules": order,
        "busybox_applets": applets,
    }
    (base / BASE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


# --------------------------------------------------------------------------------------------
# image stage


def agent_sources(runm_root: Path) -> list[tuple[str, Path]]:
    """(path relative to the runm package, file) of every agent source, sorted.

    :data:`AGENT_MODULES` plus the *.py files of :data:`AGENT_PACKAGES` (missing ones are
    skipped; __pycache__ and non-Python files are not copied).
    """
    found: list[tuple[str, Path]] = []
    for name in AGENT_MODULES:
        if (runm_root / name).is_file():
            found.append((name, runm_root / name))
    for pkg in AGENT_PACKAGES:
        pkg_dir = runm_root / pkg
        if not pkg_dir.is_dir():
            continue
        for path in pkg_dir.rglob("*.py"):
            rel = path.relative_to(runm_root)
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            found.append((rel.as_posix(), path))
    return sorted(found)


def stage_root_tree(base_tree: Path, tree: Path) -> None:
    """Hard-link copy of the base tree (the base itself is never modified)."""
    try:
        shutil.copytree(base_tree, tree, symlinks=True, copy_function=os.link)
    except (OSError, shutil.Error) as exc:
        raise GuestImageError(f"building guest image: copying {base_tree}: {exc}") from None


def install_agent(tree: Path, runm_root: Path, tools: dict[str, str]) -> int:
    """Copy the agent sources into the tree's site-packages and byte-compile them."""
    dest = tree / GUEST_SITE / "runm"
    if os.path.lexists(dest):
        remove_path(dest)
    sources = agent_sources(runm_root)
    for rel, src in sources:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        target.chmod(0o644)
    _compileall(tree, [f"/{GUEST_SITE}/runm"], tools, "compiling the runm agent")
    return len(sources)


def build_initrd(base: Path, out: Path) -> None:
    from runm.guest.initramfs import write_initramfs

    order = (base / BASE_MODULES / "order").read_text().split()
    modules = [(name, (base / BASE_MODULES / f"{name}.ko").read_bytes()) for name in order]
    write_initramfs(
        out,
        busybox=(base / BASE_TREE / "bin/busybox").read_bytes(),
        init=INIT_SCRIPT,
        applets=INITRAMFS_APPLETS,
        modules=modules,
        module_dir=MODULE_DIR,
        order_file=MODULE_ORDER_FILE,
        dirs=INITRAMFS_DIRS,
    )
    out.chmod(0o644)


def build_erofs(tree: Path, out: Path, digest: str, tools: dict[str, str]) -> None:
    import uuid  # building only (it imports platform: ~4 ms of every start otherwise)

    fs_uuid = str(uuid.UUID(digest[:32]))
    argv = [tools["mkfs.erofs"], "--quiet", *EROFS_OPTIONS, f"-U{fs_uuid}", str(out), str(tree)]
    _run(argv, "building the root image with mkfs.erofs")
    out.chmod(0o644)


def file_digest_inputs() -> list[tuple[str, bytes]]:
    """The builder's own sources that shape the image (hashed into the image digest)."""
    here = Path(__file__).resolve().parent
    return [
        (f"builder/{name}", (here / name).read_bytes())
        for name in ("build.py", "initramfs.py", "init_script.py")
    ]
