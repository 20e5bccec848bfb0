"""runm.guest.image / build: caching, manifest checks, digests, tool errors (no network)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

import runm
from runm.guest import build
from runm.guest import image as gi
from runm.guest.errors import GuestImageError
from runm.guest.image import (
    GuestImage,
    default_data_dir,
    ensure_image,
    find_image,
    image_digest,
)

RUNM_ROOT = Path(runm.__file__).resolve().parent


def fake_image(data_dir: Path, digest: str | None = None, **manifest_extra: object) -> Path:
    """An image directory that find_image accepts (small fake files)."""
    digest = digest or image_digest()
    d = data_dir / "guest" / "images" / digest
    d.mkdir(parents=True)
    sizes = {}
    for name, size in (("vmlinux", 100), ("initrd.img", 50), ("rootfs.erofs", 4096)):
        (d / name).write_bytes(b"x" * size)
        sizes[name] = size
    manifest = {
        "format": 1,
        "digest": digest,
        "kernel_release": "6.1.0-test-cloud-amd64",
        "files": sizes,
        **manifest_extra,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


# ------------------------------------------------------------------------------------------
# data dir, find_image


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNM_DATA_DIR", raising=False)
    assert default_data_dir() == Path("/var/lib/runm")
    monkeypatch.setenv("RUNM_DATA_DIR", "/tmp/somewhere")
    assert default_data_dir() == Path("/tmp/somewhere")
    monkeypatch.setenv("RUNM_DATA_DIR", "")
    assert default_data_dir() == Path("/var/lib/runm")


def test_find_image_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_image(tmp_path)
    img = find_image(tmp_path)
    assert img == GuestImage(
        kernel=d / "vmlinux",
        initrd=d / "initrd.img",
        rootfs=d / "rootfs.erofs",
        digest=image_digest(),
        kernel_release="6.1.0-test-cloud-amd64",
    )
    monkeypatch.setenv("RUNM_DATA_DIR", str(tmp_path))
    assert find_image() == img
    assert find_image(None) == img


def test_find_image_missing(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError) as exc:
        find_image(tmp_path)
    msg = str(exc.value)
    assert msg == f"guest image not found in {tmp_path / 'guest'}: run `runm guest build`"


def test_find_image_other_digest_is_not_found(tmp_path: Path) -> None:
    fake_image(tmp_path, digest="0" * 64)
    with pytest.raises(GuestImageError, match="not found"):
        find_image(tmp_path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "rootfs.erofs").unlink(), "rootfs.erofs is missing"),
        (lambda d: os.truncate(d / "rootfs.erofs", 10), "rootfs.erofs is 10 bytes"),
        (lambda d: (d / "vmlinux").write_bytes(b"x" * 101), "vmlinux is 101 bytes"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable manifest"),
        (lambda d: (d / "manifest.json").write_text("[]"), "unreadable manifest"),
        (
            lambda d: (d / "manifest.json").write_text(
                json.dumps({"format": 1, "digest": "x", "kernel_release": "r", "files": {}})
            ),
            "another digest",
        ),
        (
            lambda d: (d / "manifest.json").write_text(
                json.dumps({"format": 1, "digest": d.name, "kernel_release": "r", "files": {}})
            ),
            "no size for vmlinux",
        ),
    ],
)
def test_find_image_corrupt(tmp_path: Path, damage: object, reason: str) -> None:
    d = fake_image(tmp_path)
    assert callable(damage)
    damage(d)
    with pytest.raises(GuestImageError) as exc:
        find_image(tmp_path)
    assert reason in str(exc.value)
    assert str(exc.value).startswith(f"guest image in {d} is corrupt (")


def test_find_image_is_cheap(tmp_path: Path) -> None:
    fake_image(tmp_path)
    t = time.perf_counter()
    for _ in range(20):
        find_image(tmp_path)
    assert (time.perf_counter() - t) / 20 < 0.05


def test_ensure_image_returns_existing_without_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_image(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setattr(build, "SBIN_FALLBACK", "")
    calls: list[str] = []
    assert ensure_image(tmp_path, progress=calls.append).digest == image_digest()
    assert gi.build_image(tmp_path, progress=calls.append).digest == image_digest()
    assert calls == []


# ------------------------------------------------------------------------------------------
# digest


def fake_runm(root: Path) -> Path:
    r = root / "runm"
    for rel, text in {
        "__init__.py": "__version__ = '0'\n",
        "records.py": "",
        "errors.py": "host only\n",
        "agent/__init__.py": "",
        "agent/__main__.py": "print('agent')\n",
        "ttrpc/__init__.py": "",
        "proto/gen/x_pb.py": "X = 1\n",
        "channel/stream.py": "",
        "cli/main.py": "host only\n",
    }.items():
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_text(text)
    return r


def test_agent_sources(tmp_path: Path) -> None:
    r = fake_runm(tmp_path)
    (r / "agent/__pycache__").mkdir()
    (r / "agent/__pycache__/x.py").write_text("junk")
    (r / "agent/notes.txt").write_text("junk")
    rels = [rel for rel, _ in build.agent_sources(r)]
    assert rels == [
        "__init__.py",
        "agent/__init__.py",
        "agent/__main__.py",
        "channel/stream.py",
        "proto/gen/x_pb.py",
        "records.py",
        "ttrpc/__init__.py",
    ]


def test_digest_tracks_agent_sources_only(tmp_path: Path) -> None:
    r = fake_runm(tmp_path)
    d0 = gi._digest_for(r)
    assert len(d0) == 64 and int(d0, 16) >= 0
    assert gi._digest_for(r) == d0  # stable
    (r / "cli/main.py").write_text("changed host-only code\n")
    (r / "agent/README.txt").write_text("not python\n")
    (r / "agent/__pycache__").mkdir()
    (r / "agent/__pycache__/__main__.cpython-311.pyc").write_bytes(b"pyc")
    assert gi._digest_for(r) == d0
    (r / "agent/__main__.py").write_text("print('agent v2')\n")
    d1 = gi._digest_for(r)
    assert d1 != d0
    (r / "agent/new.py").write_text("")
    assert gi._digest_for(r) not in (d0, d1)


def test_digest_tracks_builder_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = fake_runm(tmp_path)
    d0 = gi._digest_for(r)
    monkeypatch.setattr(build, "ROOT_PACKAGES", (*build.ROOT_PACKAGES, "strace"))
    d1 = gi._digest_for(r)
    assert d1 != d0
    monkeypatch.setattr(build, "BUILDER_VERSION", build.BUILDER_VERSION + "x")
    assert gi._digest_for(r) not in (d0, d1)
    monkeypatch.setattr(gi, "INIT_SCRIPT", "#!/bin/sh\n")
    assert gi._digest_for(r) not in (d0, d1)


def test_image_digest_uses_installed_runm() -> None:
    assert image_digest() == gi._digest_for(RUNM_ROOT)


def test_base_key_ignores_agent_and_tracks_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    k0 = build.base_key("amd64")
    assert build.base_key("amd64") == k0
    assert build.base_key("arm64") != k0
    monkeypatch.setattr(build, "INITRAMFS_MODULES", ("virtio_blk",))
    assert build.base_key("amd64") != k0


# ------------------------------------------------------------------------------------------
# tools and failures


def test_check_tools_names_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "SBIN_FALLBACK", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestImageError) as exc:
        build.check_tools(["mkfs.erofs"])
    assert str(exc.value) == "building guest image: mkfs.erofs not found (install erofs-utils)"
    with pytest.raises(GuestImageError) as exc:
        build.check_tools(["mmdebstrap", "lz4", "chroot"])
    assert str(exc.value) == (
        "building guest image: mmdebstrap, lz4, chroot not found (install mmdebstrap lz4 coreutils)"
    )
    tool = tmp_path / "lz4"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert build.check_tools(["lz4"]) == {"lz4": str(tool)}


def test_build_image_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tool but mkfs.erofs present: the build stops before doing anything."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in (*build.BASE_TOOLS, *build.IMAGE_TOOLS):
        if tool != "mkfs.erofs":
            (bindir / tool).write_text("#!/bin/sh\nexit 99\n")
            (bindir / tool).chmod(0o755)
    monkeypatch.setattr(build, "SBIN_FALLBACK", "")
    monkeypatch.setenv("PATH", str(bindir))
    data = tmp_path / "data"
    with pytest.raises(GuestImageError) as exc:
        gi.build_image(data)
    assert str(exc.value) == "building guest image: mkfs.erofs not found (install erofs-utils)"
    assert list((data / "guest/tmp").iterdir()) == []
    assert not (data / "guest/images").exists()
    assert not (data / "guest/base").exists()


def test_build_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing mmdebstrap: its stderr tail is in the error, the temp dirs are gone."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in (*build.BASE_TOOLS, *build.IMAGE_TOOLS):
        (bindir / tool).write_text("#!/bin/sh\necho 'E: cannot reach the mirror' >&2\nexit 25\n")
        (bindir / tool).chmod(0o755)
    monkeypatch.setattr(build, "SBIN_FALLBACK", "")
    monkeypatch.setattr(build, "check_root", lambda: None)
    monkeypatch.setattr(build, "debian_arch", lambda: "amd64")
    monkeypatch.setenv("PATH", str(bindir))
    data = tmp_path / "data"
    steps: list[str] = []
    with pytest.raises(GuestImageError) as exc:
        gi.build_image(data, progress=steps.append)
    assert str(exc.value) == (
        "building guest image: fetching Debian packages with mmdebstrap failed "
        "(exit status 25): E: cannot reach the mirror"
    )
    assert steps == ["fetching Debian packages (python3, runc, kernel)"]
    assert list((data / "guest/tmp").iterdir()) == []
    assert not (data / "guest/base").exists()


def test_stale_temp_dirs_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "guest/tmp/image-dead"
    (stale / "tree").mkdir(parents=True)
    monkeypatch.setattr(build, "SBIN_FALLBACK", "")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(GuestImageError, match="not found"):
        gi.build_image(tmp_path)
    assert not stale.exists()


def test_prune_keeps_newest(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for i, name in enumerate(["a", "b", "c", "d"]):
        (images / name).mkdir(parents=True)
        (images / name / "manifest.json").write_text("{}")
        os.utime(images / name / "manifest.json", (1000 + i, 1000 + i))
    gi._prune(images, images / "a", 2, "manifest.json")
    assert sorted(p.name for p in images.iterdir()) == ["a", "d"]


# ------------------------------------------------------------------------------------------
# apt sources


def test_host_debian_sources(tmp_path: Path) -> None:
    keyring = tmp_path / "debian.gpg"
    keyring.write_bytes(b"k")
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb [arch=amd64] http://mirror.example/debian bullseye main\n"
    )
    sd = tmp_path / "sources.list.d"
    sd.mkdir()
    (sd / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.example/archive\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        f"Signed-By: {keyring}\n"
        "\n"
        "Types: deb\n"
        "URIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main non-free\n"
        "\n"
        "Types: deb\n"
        "URIs: http://disabled.example/\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (sd / "vendor.list").write_text(
        "deb [signed-by=/x.gpg] https://vendor.example/apt cloud-sdk-bookworm main\n"
    )
    (sd / "node.sources").write_text(
        "Types: deb\nURIs: https://node.example/\nSuites: nodistro\nComponents: main\n"
    )
    assert build.host_debian_sources("bookworm", tmp_path) == [
        "deb http://mirror.example/debian bookworm main",
        f"deb [signed-by={keyring}] http://mirror.example/debian bookworm main",
        f"deb [signed-by={keyring}] http://mirror.example/debian bookworm-updates main",
        "deb http://security.example/debian-security bookworm-security main",
    ]
    assert build.host_debian_sources("trixie", tmp_path) == []
    assert build.host_debian_sources("bookworm", tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------
# kernel extraction


def fake_bzimage(payload: bytes, *, version: int = 0x20F, setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    pm_prefix = b"\x00" * 100  # decompressor code before the payload
    struct.pack_into("<II", setup, 0x248, len(pm_prefix), len(payload))
    return bytes(setup) + pm_prefix + payload + b"\xcc" * 37


ELF = b"\x7fELF" + bytes(range(256)) * 40


def test_extract_vmlinux_gzip_and_xz() -> None:
    gz = gzip.compress(ELF, mtime=0)
    assert build.extract_vmlinux(fake_bzimage(gz)) == ELF
    xz = lzma.compress(ELF, format=lzma.FORMAT_XZ) + struct.pack("<I", len(ELF))
    assert build.extract_vmlinux(fake_bzimage(xz)) == ELF
    assert build.extract_vmlinux(ELF) == ELF  # already an ELF


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 not installed")
def test_extract_vmlinux_lz4_legacy(tmp_path: Path) -> None:
    import subprocess

    lz4 = shutil.which("lz4")
    assert lz4 is not None
    comp = subprocess.run([lz4, "-l", "-c1"], input=ELF, capture_output=True, check=True).stdout
    assert comp[:4] == b"\x02\x21\x4c\x18"
    image = fake_bzimage(comp + struct.pack("<I", len(ELF)))
    assert build.extract_vmlinux(image, lz4=lz4) == ELF
    with pytest.raises(GuestImageError, match=r"lz4 not found \(install lz4\)"):
        build.extract_vmlinux(image, lz4=None)
    bad_size = fake_bzimage(comp + struct.pack("<I", len(ELF) + 1))
    with pytest.raises(GuestImageError, match="expected"):
        build.extract_vmlinux(bad_size, lz4=lz4)


def test_extract_vmlinux_errors() -> None:
    with pytest.raises(GuestImageError, match="not an x86 bzImage"):
        build.extract_vmlinux(b"MZ" + b"\0" * 1000)
    with pytest.raises(GuestImageError, match="too old"):
        build.extract_vmlinux(fake_bzimage(b"x" * 64, version=0x205))
    with pytest.raises(GuestImageError, match="unknown kernel compression"):
        build.extract_vmlinux(fake_bzimage(b"ABCDEFGH" * 8))
    not_elf = gzip.compress(b"hello" * 100)
    with pytest.raises(GuestImageError, match="not an ELF"):
        build.extract_vmlinux(fake_bzimage(not_elf))
    truncated = fake_bzimage(gzip.compress(ELF))[:-200]
    with pytest.raises(GuestImageError):
        build.extract_vmlinux(truncated)
