"""runm.guest.initramfs: the newc cpio writer, .modinfo parsing and module load order."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from runm.guest.init_script import INIT_SCRIPT, INITRAMFS_APPLETS
from runm.guest.initramfs import (
    CpioWriter,
    KernelModule,
    ModuleError,
    builtin_modules,
    load_order,
    module_name,
    read_modinfo,
    scan_modules,
    write_initramfs,
)

# ------------------------------------------------------------------------------------------
# helpers


@dataclass
class Entry:
    name: str
    mode: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(blob: bytes) -> list[Entry]:
    """A tiny newc reader (checks magic, 4-byte alignment and the trailer)."""
    entries: list[Entry] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        header = blob[pos : pos + 110]
        assert header[:6] == b"070701", header[:6]
        f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, gid, nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, check = f
        assert (uid, gid, check) == (0, 0, 0)
        name_start = pos + 110
        raw_name = blob[name_start : name_start + namesize]
        assert raw_name.endswith(b"\0")
        name = raw_name[:-1].decode()
        data_start = name_start + namesize
        data_start += -data_start % 4
        data = blob[data_start : data_start + size]
        pos = data_start + size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(blob)
            return entries
        entries.append(Entry(name, mode, nlink, mtime, (rmaj, rmin), data))


def make_ko(
    info: list[tuple[str, str]], *, elfclass: int = 2, little: bool = True, extra: bool = True
) -> bytes:
    """A minimal relocatable ELF with a .modinfo section (and optionally another one)."""
    e = "<" if little else ">"
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info)
    names = (
        [b"", b".text", b".modinfo", b".shstrtab"] if extra else [b"", b".modinfo", b".shstrtab"]
    )
    shstrtab = b"\0".join(names) + b"\0"
    name_offs = []
    off = 0
    for n in names:
        name_offs.append(off)
        off += len(n) + 1
    ehsize = 64 if elfclass == 2 else 52
    shentsize = 64 if elfclass == 2 else 40
    body = b""
    sections: list[tuple[int, int, int]] = [(0, 0, 0)]  # (name, offset, size)
    cursor = ehsize
    contents = ([b"\x90" * 7] if extra else []) + [modinfo, shstrtab]
    for i, content in enumerate(contents, start=1):
        sections.append((name_offs[i], cursor, len(content)))
        body += content
        cursor += len(content)
    pad = -cursor % 8
    body += b"\0" * pad
    shoff = cursor + pad
    ident = b"\x7fELF" + bytes([elfclass, 1 if little else 2, 1]) + b"\0" * 9
    if elfclass == 2:
        hdr = ident + struct.pack(
            e + "HHIQQQIHHHHHH",
            1,
            62,
            1,
            0,
            0,
            shoff,
            0,
            ehsize,
            0,
            0,
            shentsize,
            len(sections),
            len(sections) - 1,
        )
        shdrs = b"".join(
            struct.pack(e + "IIQQQQIIQQ", n, 1 if i else 0, 0, 0, o, s, 0, 0, 1, 0)
            for i, (n, o, s) in enumerate(sections)
        )
    else:
        hdr = ident + struct.pack(
            e + "HHIIIIIHHHHHH",
            1,
            3,
            1,
            0,
            0,
            shoff,
            0,
            ehsize,
            0,
            0,
            shentsize,
            len(sections),
            len(sections) - 1,
        )
        shdrs = b"".join(
            struct.pack(e + "IIIIIIIIII", n, 1 if i else 0, 0, 0, o, s, 0, 0, 1, 0)
            for i, (n, o, s) in enumerate(sections)
        )
    assert len(hdr) == ehsize
    return hdr + body + shdrs


def mods(spec: dict[str, tuple[str, ...]], **kw: tuple[str, ...]) -> dict[str, KernelModule]:
    out = {name: KernelModule(name=name, depends=deps) for name, deps in spec.items()}
    for name, soft in kw.items():
        out[name] = KernelModule(name=name, depends=out[name].depends, softdep_pre=soft)
    return out


def assert_deps_first(order: list[KernelModule]) -> None:
    seen: set[str] = set()
    for m in order:
        assert m.name not in seen, f"{m.name} twice"
        for d in m.depends:
            assert d in seen or d not in {x.name for x in order}, f"{d} after {m.name}"
        seen.add(m.name)


# ------------------------------------------------------------------------------------------
# cpio


def test_cpio_writer_roundtrip() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file("bin/busybox", b"\x7fELFbusybox", 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.add_file("empty", b"")
    w.add_device("dev/console", char=True, major=5, minor=1, mode=0o600)
    w.add_dir("lib/modules/x", 0o700)
    w.close()
    entries = read_newc(buf.getvalue())
    names = [e.name for e in entries]
    # parents are created before their children, automatically
    assert names == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "init",
        "empty",
        "dev",
        "dev/console",
        "lib",
        "lib/modules",
        "lib/modules/x",
    ]
    by = {e.name: e for e in entries}
    assert stat.S_ISDIR(by["bin"].mode) and by["bin"].nlink == 2
    assert by["bin/busybox"].data == b"\x7fELFbusybox"
    assert stat.S_IMODE(by["bin/busybox"].mode) == 0o755
    assert stat.S_ISLNK(by["bin/sh"].mode) and by["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(by["lib/modules/x"].mode) == 0o700
    assert by["empty"].data == b""
    assert all(e.mtime == 0 for e in entries)


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "./x", "a//b"])
def test_cpio_writer_rejects_bad_names(bad: str) -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add_file(bad, b"")


def test_cpio_writer_rejects_duplicates_and_writes_after_close() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_file("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_file("/a", b"2")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add_file("b", b"")


def _initramfs(tmp_path: Path) -> Path:
    out = tmp_path / "initrd.img"
    write_initramfs(
        out,
        busybox=b"BB" * 1000,
        init=INIT_SCRIPT,
        applets=INITRAMFS_APPLETS,
        modules=[("virtio_ring", b"ring"), ("virtio", b"virtio!")],
        module_dir="lib/modules",
        order_file="lib/modules/order",
        dirs=("dev", "proc", "newroot"),
    )
    return out


def test_write_initramfs_layout(tmp_path: Path) -> None:
    out = _initramfs(tmp_path)
    blob = gzip.decompress(out.read_bytes())
    by = {e.name: e for e in read_newc(blob)}
    assert by["init"].data.decode() == INIT_SCRIPT
    assert stat.S_IMODE(by["init"].mode) == 0o755
    assert by["bin/busybox"].data == b"BB" * 1000
    for applet in INITRAMFS_APPLETS:
        assert by[f"bin/{applet}"].data == b"busybox"
    assert by["lib/modules/virtio.ko"].data == b"virtio!"
    assert by["lib/modules/order"].data == b"virtio_ring\nvirtio\n"
    assert stat.S_ISCHR(by["dev/console"].mode)
    assert stat.S_ISDIR(by["newroot"].mode)
    # reproducible: same inputs, same bytes
    first = out.read_bytes()
    assert _initramfs(tmp_path).read_bytes() == first


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_write_initramfs_readable_by_cpio(tmp_path: Path) -> None:
    out = _initramfs(tmp_path)
    listing = (
        subprocess.run(
            ["cpio", "-t", "--quiet"],
            input=gzip.decompress(out.read_bytes()),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split()
    )
    assert {"init", "bin/busybox", "bin/sh", "lib/modules/order", "dev/console"} <= set(listing)


@pytest.mark.skipif(
    shutil.which("busybox") is None and shutil.which("sh") is None, reason="no shell"
)
def test_init_script_parses() -> None:
    sh = [shutil.which("busybox") or "", "sh"] if shutil.which("busybox") else ["sh"]
    subprocess.run([*sh, "-n"], input=INIT_SCRIPT.encode(), check=True)
    assert INIT_SCRIPT.startswith("#!/bin/busybox sh\n")
    assert "exec switch_root /newroot" in INIT_SCRIPT
    assert "/usr/bin/python3 -I -m runm.agent" in INIT_SCRIPT


# ------------------------------------------------------------------------------------------
# .modinfo


@pytest.mark.parametrize(("elfclass", "little"), [(2, True), (1, True), (2, False), (1, False)])
def test_read_modinfo(elfclass: int, little: bool) -> None:
    ko = make_ko(
        [("alias", "crypto-foo"), ("depends", "a,b-c"), ("alias", "foo"), ("name", "foo_bar")],
        elfclass=elfclass,
        little=little,
    )
    info = read_modinfo(ko)
    assert info == {"alias": ["crypto-foo", "foo"], "depends": ["a,b-c"], "name": ["foo_bar"]}


def test_read_modinfo_errors() -> None:
    with pytest.raises(ModuleError, match="not an ELF"):
        read_modinfo(b"hello world")
    with pytest.raises(ModuleError, match=r"no \.modinfo"):
        read_modinfo(make_ko([]).replace(b".modinfo", b".modinfX"))
    with pytest.raises(ModuleError, match="truncated"):
        read_modinfo(make_ko([("depends", "")])[:70])


def test_module_from_modinfo() -> None:
    info = read_modinfo(
        make_ko(
            [
                ("depends", "virtio,virtio_ring"),
                ("softdep", "pre: crc32c foo post: bar"),
                ("name", "virtio-blk"),
            ]
        )
    )
    m = KernelModule.from_modinfo(info, Path("x/virtio_blk.ko"))
    assert m.name == "virtio_blk"
    assert m.depends == ("virtio", "virtio_ring")
    assert m.softdep_pre == ("crc32c", "foo")
    empty = KernelModule.from_modinfo(read_modinfo(make_ko([("depends", "")])), Path("a-b.ko.xz"))
    assert (empty.name, empty.depends) == ("a_b", ())


def test_module_name() -> None:
    assert module_name("virtio-rng.ko") == "virtio_rng"
    assert module_name("kernel/fs/erofs/erofs.ko.xz") == "erofs"
    assert module_name("virtio_pci") == "virtio_pci"


def test_scan_modules_and_builtins(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/6.1.0-test"
    (moddir / "kernel/drivers").mkdir(parents=True)
    (moddir / "kernel/drivers/virtio-rng.ko").write_bytes(
        make_ko([("depends", "virtio"), ("name", "virtio_rng")])
    )
    (moddir / "kernel/drivers/virtio.ko.xz").write_bytes(
        lzma.compress(make_ko([("depends", ""), ("alias", "virtio:*")]))
    )
    (moddir / "kernel/drivers/notes.kobj").write_text("not a module")
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (moddir / "modules.builtin.modinfo").write_bytes(
        b"crc32c_generic.alias=crc32c\0crc32c_generic.license=GPL\0ext4.softdep=pre: crc32c\0"
    )
    found = scan_modules(moddir)
    assert sorted(found) == ["virtio", "virtio_rng"]
    assert found["virtio_rng"].depends == ("virtio",)
    names, aliases = builtin_modules(moddir)
    assert names == {"crc32c_generic", "ext4"}
    assert aliases == {"crc32c"}
    order = load_order(["virtio-rng"], found, builtin=names, builtin_aliases=aliases)
    assert [m.name for m in order] == ["virtio", "virtio_rng"]


def test_scan_modules_reports_bad_files(tmp_path: Path) -> None:
    (tmp_path / "broken.ko").write_bytes(b"garbage")
    with pytest.raises(ModuleError, match=r"broken\.ko"):
        scan_modules(tmp_path)


# ------------------------------------------------------------------------------------------
# load order

# The real dependency shape of the Debian cloud kernel's initramfs modules.
CLOUD = {
    "virtio_ring": (),
    "virtio": ("virtio_ring",),
    "virtio_pci_modern_dev": (),
    "virtio_pci_legacy_dev": (),
    "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
    "virtio_blk": ("virtio", "virtio_ring"),
    "failover": (),
    "net_failover": ("failover",),
    "virtio_net": ("virtio_ring", "virtio", "net_failover"),
    "vsock": (),
    "vmw_vsock_virtio_transport_common": ("vsock",),
    "vmw_vsock_virtio_transport": (
        "virtio",
        "vmw_vsock_virtio_transport_common",
        "virtio_ring",
        "vsock",
    ),
    "fuse": (),
    "virtiofs": ("fuse", "virtio", "virtio_ring"),
    "libcrc32c": (),
    "erofs": ("libcrc32c",),
}


def test_load_order_dependencies_first_each_once() -> None:
    wanted = [
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "vmw_vsock_virtio_transport",
        "virtiofs",
        "erofs",
    ]
    order = load_order(wanted, mods(CLOUD))
    names = [m.name for m in order]
    assert_deps_first(order)
    assert set(names) == set(CLOUD)
    assert len(names) == len(set(names))
    assert names[:2] == ["virtio_ring", "virtio_pci_modern_dev"]  # deterministic
    assert names.index("virtio") < names.index("virtio_pci")
    assert names.index("libcrc32c") < names.index("erofs")


def test_load_order_is_deterministic() -> None:
    wanted = ["virtiofs", "erofs", "virtio_net"]
    a = [m.name for m in load_order(wanted, mods(CLOUD))]
    b = [m.name for m in load_order(wanted, dict(reversed(list(mods(CLOUD).items()))))]
    assert a == b


def test_load_order_normalises_names() -> None:
    order = load_order(["virtio-blk"], mods({"virtio_blk": ("virtio-ring",), "virtio_ring": ()}))
    assert [m.name for m in order] == ["virtio_ring", "virtio_blk"]


def test_load_order_skips_builtin() -> None:
    m = mods({"erofs": ("libcrc32c",)})
    order = load_order(["erofs", "overlay"], m, builtin=["libcrc32c", "overlay"])
    assert [x.name for x in order] == ["erofs"]


def test_load_order_missing_modules() -> None:
    with pytest.raises(ModuleError, match="kernel module nosuch not found"):
        load_order(["nosuch"], mods(CLOUD))
    with pytest.raises(ModuleError, match=r"libcrc32c \(needed by erofs\) not found"):
        load_order(["erofs"], mods({"erofs": ("libcrc32c",)}))


def test_load_order_cycle() -> None:
    with pytest.raises(ModuleError, match="cycle: a -> b -> a"):
        load_order(["a"], mods({"a": ("b",), "b": ("a",)}))


def test_load_order_softdeps() -> None:
    base = {
        "libcrc32c": KernelModule("libcrc32c", softdep_pre=("crc32c",)),
        "erofs": KernelModule("erofs", depends=("libcrc32c",)),
        "crc32c_intel": KernelModule("crc32c_intel", aliases=("crc32c", "crypto-crc32c")),
        "crc32c_generic": KernelModule("crc32c_generic", aliases=("crc32c",)),
    }
    # a loadable provider is inserted first; the generic one is preferred among aliases
    names = [m.name for m in load_order(["erofs"], base)]
    assert names == ["crc32c_generic", "libcrc32c", "erofs"]
    # built in (by alias): nothing extra
    names = [m.name for m in load_order(["erofs"], base, builtin_aliases=["crc32c"])]
    assert names == ["libcrc32c", "erofs"]
    # absent softdeps are optional
    only = {k: v for k, v in base.items() if k in ("libcrc32c", "erofs")}
    assert [m.name for m in load_order(["erofs"], only)] == ["libcrc32c", "erofs"]
    # a softdep cycle is not an error
    soft_cycle = {
        "a": KernelModule("a", softdep_pre=("b",)),
        "b": KernelModule("b", depends=("a",)),
    }
    assert [m.name for m in load_order(["b"], soft_cycle)] == ["a", "b"]
