"""The guest initramfs: a newc cpio writer and kernel-module load ordering.

Pure Python on purpose: the archive is written without the `cpio` tool, and the module load
order is computed from each ``.ko`` file's ``.modinfo`` section (``depends=`` and
``softdep=pre:``) because Debian's kernel packages ship no ``modules.dep`` and the host may not be
able to run ``depmod``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Protocol

from runm.records import record

__all__ = [
    "CpioWriter",
    "KernelModule",
    "ModuleError",
    "builtin_modules",
    "is_module_file",
    "load_order",
    "module_name",
    "read_modinfo",
    "read_module",
    "scan_modules",
    "write_initramfs",
]

# --------------------------------------------------------------------------------------------
# cpio "newc" (SVR4 without CRC) writer


_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes a newc cpio archive (the format the Linux kernel unpacks as an initramfs).

    Every entry is owned by root with mtime 0, so the output depends only on what is added.
    Parent directories are added automatically (mode 0755) when an entry needs them.
    """

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._ino = 0
        self._names: set[str] = set()
        self._closed = False

    @staticmethod
    def _norm(name: str) -> str:
        name = name.strip("/")
        if not name or any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"bad cpio entry name {name!r}")
        return name

    def _header(
        self,
        name: str,
        mode: int,
        size: int,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        encoded = name.encode() + b"\0"
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            size,
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))

    def _add(self, name: str) -> str:
        if self._closed:
            raise ValueError("cpio archive already closed")
        name = self._norm(name)
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.add_dir(parent)
        self._names.add(name)
        return name

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = self._add(name)
        self._header(name, stat.S_IFDIR | (mode & 0o7777), 0, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = self._add(name)
        self._header(name, stat.S_IFREG | (mode & 0o7777), len(data))
        self._out.write(data)
        self._out.write(_pad4(len(data)))

    def add_symlink(self, name: str, target: str) -> None:
        name = self._add(name)
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self._out.write(data + _pad4(len(data)))

    def add_device(self, name: str, *, char: bool, major: int, minor: int, mode: int) -> None:
        name = self._add(name)
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        self._header(name, kind | (mode & 0o7777), 0, rdev=(major, minor))

    def has(self, name: str) -> bool:
        return self._norm(name) in self._names

    def close(self) -> None:
        """Write the trailer entry. The underlying stream is left open."""
        if not self._closed:
            self._header(_TRAILER, 0, 0, ino=0)
            self._closed = True


def write_initramfs(
    out: Path,
    *,
    busybox: bytes,
    init: str,
    applets: Iterable[str],
    modules: Sequence[tuple[str, bytes]],
    module_dir: str,
    order_file: str,
    dirs: Iterable[str] = (),
) -> None:
    """Write a gzip'd (level 1) newc initramfs to ``out``.

    Contents: ``/bin/busybox`` with symlinks for ``applets``, ``/init``, ``/dev/console``, the
    empty ``dirs``, and each module as ``<module_dir>/<name>.ko`` plus ``order_file`` listing the
    module names in load order.
    """
    with (
        out.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz,
    ):
        cpio = CpioWriter(gz)
        cpio.add_file("bin/busybox", busybox, 0o755)
        for applet in sorted(set(applets)):
            if applet != "busybox":
                cpio.add_symlink(f"bin/{applet}", "busybox")
        cpio.add_file("init", init.encode(), 0o755)
        cpio.add_dir("dev")
        cpio.add_device("dev/console", char=True, major=5, minor=1, mode=0o600)
        for d in dirs:
            if not cpio.has(d):
                cpio.add_dir(d)
        mdir = module_dir.strip("/")
        if not cpio.has(mdir):
            cpio.add_dir(mdir)
        for name, data in modules:
            cpio.add_file(f"{mdir}/{name}.ko", data, 0o644)
        cpio.add_file(order_file, "".join(f"{name}\n" for name, _ in modules).encode(), 0o644)
        cpio.close()


# --------------------------------------------------------------------------------------------
# kernel modules


class ModuleError(Exception):
    """A kernel module could not be read or its dependencies could not be resolved."""


_MODULE_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst", ".ko")


def is_module_file(filename: str) -> bool:
    return filename.endswith(_MODULE_SUFFIXES)


def module_name(filename: str) -> str:
    """The kernel's name for a module file: ``virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = os.path.basename(filename)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """Parse the ``.modinfo`` section of an (uncompressed) ELF kernel module.

    Returns each key with all its values in file order (keys such as ``alias`` repeat).
    """
    if data[:4] != b"\x7fELF":
        raise ModuleError("not an ELF file")
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise ModuleError("unsupported ELF class or byte order")
    e = "<" if enc == 1 else ">"
    try:
        if cls == 2:
            shoff = struct.unpack_from(e + "Q", data, 0x28)[0]
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
            sh_fmt, off_at = e + "IIQQQQ", (4, 5)
        else:
            shoff = struct.unpack_from(e + "I", data, 0x20)[0]
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)
            sh_fmt, off_at = e + "IIIIII", (4, 5)
        sections: list[tuple[int, int, int]] = []
        for i in range(shnum):
            fields = struct.unpack_from(sh_fmt, data, shoff + i * shentsize)
            sections.append((fields[0], fields[off_at[0]], fields[off_at[1]]))
        _, str_off, str_size = sections[shstrndx]
        strtab = data[str_off : str_off + str_size]
    except (struct.error, IndexError) as exc:
        raise ModuleError(f"truncated or corrupt ELF headers ({exc})") from None
    info: dict[str, list[str]] = {}
    for name_off, off, size in sections:
        end = strtab.find(b"\0", name_off)
        if strtab[name_off:end] != b".modinfo":
            continue
        if off + size > len(data):
            raise ModuleError(".modinfo section runs past the end of the file")
        for entry in data[off : off + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info
    raise ModuleError("no .modinfo section")


def read_module(path: Path) -> bytes:
    """The uncompressed contents of a ``.ko``, ``.ko.xz`` or ``.ko.gz`` file."""
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        raise ModuleError(f"{path.name}: zstd-compressed modules are not supported")
    return raw


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(module_name(v) for v in value.split(",") if v.strip())


def _softdep_pre(values: Iterable[str]) -> tuple[str, ...]:
    """``softdep=pre: a b post: c`` -> ("a", "b")."""
    pre: list[str] = []
    for value in values:
        mode = ""
        for word in value.split():
            if word.endswith(":"):
                mode = word[:-1]
            elif mode == "pre":
                pre.append(word)
    return tuple(pre)


@record(frozen=True)
class KernelModule:
    """What load ordering needs to know about one loadable module."""

    name: str
    depends: tuple[str, ...] = ()
    softdep_pre: tuple[str, ...] = ()  # names or aliases, loaded first when not built in
    aliases: tuple[str, ...] = ()
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_modinfo(cls, info: Mapping[str, Sequence[str]], path: Path) -> KernelModule:
        names = info.get("name")
        name = module_name(names[0]) if names else module_name(path.name)
        depends: tuple[str, ...] = ()
        for value in info.get("depends", ()):
            depends += _split_list(value)
        return cls(
            name=name,
            depends=depends,
            softdep_pre=_softdep_pre(info.get("softdep", ())),
            aliases=tuple(info.get("alias", ())),
            path=path,
        )


def scan_modules(moddir: Path) -> dict[str, KernelModule]:
    """Read every module under ``moddir`` (``lib/modules/<release>``), keyed by module name."""
    mods: dict[str, KernelModule] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        if not is_module_file(path.name) or not path.is_file():
            continue
        try:
            mod = KernelModule.from_modinfo(read_modinfo(read_module(path)), path)
        except (ModuleError, OSError, lzma.LZMAError, EOFError) as exc:
            raise ModuleError(f"reading kernel module {path}: {exc}") from None
        mods.setdefault(mod.name, mod)
    return mods


def builtin_modules(moddir: Path) -> tuple[set[str], set[str]]:
    """Names and aliases of modules built into the kernel.

    From ``modules.builtin.modinfo`` (``name.key=value`` records) when present, else from the
    paths in ``modules.builtin``.
    """
    names: set[str] = set()
    aliases: set[str] = set()
    modinfo = moddir / "modules.builtin.modinfo"
    if modinfo.is_file():
        for record in modinfo.read_bytes().split(b"\0"):
            key, sep, value = record.decode("utf-8", "replace").partition("=")
            mod, dot, field_name = key.partition(".")
            if not (sep and dot):
                continue
            names.add(module_name(mod))
            if field_name == "alias":
                aliases.add(value)
    builtin = moddir / "modules.builtin"
    if builtin.is_file():
        for line in builtin.read_text().splitlines():
            if line.strip():
                names.add(module_name(line.strip()))
    return names, aliases


def load_order(
    wanted: Sequence[str],
    modules: Mapping[str, KernelModule],
    *,
    builtin: Iterable[str] = (),
    builtin_aliases: Iterable[str] = (),
) -> list[KernelModule]:
    """The modules to insert for ``wanted`` (names), dependencies first, each once.

    Wanted modules and hard dependencies that are built into the kernel are skipped; any other
    missing one is an error. Pre-softdeps (by name or exact alias) are loaded before their module
    when they are loadable modules and skipped when built in or absent (they are optional).
    """
    modules = {module_name(m.name): m for m in modules.values()}
    builtin_names = {module_name(b) for b in builtin}
    builtin_alias_set = set(builtin_aliases)
    by_alias: dict[str, list[str]] = {}
    for mod in modules.values():
        for alias in mod.aliases:
            by_alias.setdefault(alias, []).append(mod.name)

    order: list[KernelModule] = []
    done: set[str] = set()
    visiting: list[str] = []

    def resolve_soft(dep: str) -> list[str]:
        name = module_name(dep)
        if name in builtin_names or dep in builtin_alias_set:
            return []
        if name in modules:
            return [name]
        matches = sorted(by_alias.get(dep, ()))
        generic = [m for m in matches if m == f"{name}_generic"]
        return generic or matches

    def visit(name: str, needed_by: str | None, *, soft: bool = False) -> None:
        if name in done or (soft and name in visiting):
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ModuleError(f"kernel module dependency cycle: {cycle}")
        mod = modules.get(name)
        if mod is None:
            if name in builtin_names:
                return
            if needed_by is None:
                raise ModuleError(f"kernel module {name} not found")
            raise ModuleError(f"kernel module {name} (needed by {needed_by}) not found")
        visiting.append(name)
        for softdep in mod.softdep_pre:
            for dep in resolve_soft(softdep):
                visit(dep, name, soft=True)
        for dep in mod.depends:
            visit(module_name(dep), name)
        visiting.pop()
        done.add(name)
        order.append(mod)

    for want in wanted:
        visit(module_name(want), None)
    return order
