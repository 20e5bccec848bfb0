"""Host processes: the tree under a pid (via /proc/*/stat ppid) and its PSS (smaps_rollup)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    state: str
    cpu_ticks: int = 0  # utime + stime, in clock ticks


def parse_stat(text: str) -> ProcInfo:
    """One /proc/PID/stat line. comm may hold spaces and parentheses: split at the last ')'."""
    lpar, rpar = text.index("("), text.rindex(")")
    rest = text[rpar + 2 :].split()  # rest[0] is field 3 (state); utime, stime: fields 14, 15
    ticks = int(rest[11]) + int(rest[12]) if len(rest) > 12 else 0
    return ProcInfo(pid=int(text[:lpar]), comm=text[lpar + 1 : rpar], state=rest[0],
                    ppid=int(rest[1]), cpu_ticks=ticks)


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by root and its live descendants."""
    return sum(p.cpu_ticks for p in tree(root)) / os.sysconf("SC_CLK_TCK")


def snapshot(proc: Path = PROC) -> dict[int, ProcInfo]:
    """Every live process (vanishing ones are skipped)."""
    out: dict[int, ProcInfo] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        out[info.pid] = info
    return out


def descendants(root: int, procs: dict[int, ProcInfo]) -> list[int]:
    """Pids below root (children, grandchildren, ...), breadth first; root not included."""
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    out: list[int] = []
    queue = [root]
    seen = {root}
    while queue:
        pid = queue.pop(0)
        for child in sorted(children.get(pid, [])):
            if child not in seen:
                seen.add(child)
                out.append(child)
                queue.append(child)
    return out


def tree(root: int, procs: dict[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """root and its descendants (root first; empty if root is gone)."""
    procs = snapshot() if procs is None else procs
    if root not in procs:
        return []
    return [procs[root], *(procs[p] for p in descendants(root, procs))]


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """The 'Field:  N kB' lines of /proc/PID/smaps_rollup, in kB."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def rollup(pid: int, proc: Path = PROC) -> dict[str, int]:
    """/proc/PID/smaps_rollup of one process in kB (empty if it is gone or has no memory)."""
    try:
        return parse_smaps_rollup((proc / str(pid) / "smaps_rollup").read_text())
    except OSError:
        return {}


def pss_kb(pid: int, proc: Path = PROC) -> int:
    """Proportional set size of one process in kB (0 if it is gone or has no memory)."""
    return rollup(pid, proc).get("Pss", 0)


def component(info: ProcInfo, cmdline: str = "") -> str:
    """Which part of a runm container a process is: qemu, virtiofsd, runm or other."""
    name = f"{info.comm} {cmdline}"
    if "qemu-system" in name:
        return "qemu"
    if "virtiofsd" in name:
        return "virtiofsd"
    if "python" in info.comm or "runm" in cmdline:
        return "runm"
    if info.comm.startswith("runc"):
        return "runc"
    return "other"


def cmdline(pid: int, proc: Path = PROC) -> str:
    try:
        return (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


PSS_KINDS = ("Pss_Anon", "Pss_File", "Pss_Shmem")


def tree_pss(root: int) -> dict[str, int]:
    """PSS (kB) of root's whole process tree: 'total', 'processes', per component ('qemu')
    and per component and kind ('qemu.anon', 'qemu.file', 'qemu.shmem')."""
    out: dict[str, int] = {}
    members = tree(root)
    total = 0
    for info in members:
        part = component(info, cmdline(info.pid))
        fields = rollup(info.pid)
        total += fields.get("Pss", 0)
        out[part] = out.get(part, 0) + fields.get("Pss", 0)
        for kind in PSS_KINDS:
            if kind in fields:
                key = f"{part}.{kind[4:].lower()}"
                out[key] = out.get(key, 0) + fields[kind]
        if part == "qemu":
            unmapped = guest_ram_unmapped_kb(info.pid)
            if unmapped:
                out["guest RAM not mapped"] = out.get("guest RAM not mapped", 0) + unmapped
                total += unmapped
    out["total"] = total
    out["processes"] = len(members)
    return out


GUEST_RAM_MEMFD = "memfd:runm-guest-ram"


def tcg_buffer_kb(pid: int, proc: Path = PROC) -> int:
    """PSS (kB) of a QEMU's TCG translation buffer: its anonymous executable mappings (host
    code translated from guest code; a KVM guest has none)."""
    total, counting = 0, False
    try:
        text = (proc / str(pid) / "smaps").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header
            counting = len(fields) == 5 and "x" in fields[1]  # no path: anonymous
        elif counting and fields[0] == "Pss:":
            total += int(fields[1])
    return total


def guest_ram_unmapped_kb(pid: int, proc: Path = PROC) -> int:
    """kB of a restored guest's RAM memfd that are allocated but not mapped into QEMU.

    A restore copies the snapshot's RAM into a memfd; PSS counts only the pages QEMU touched
    since, but the rest uses host memory too, so it is added to the total."""
    allocated = 0
    seen: set[int] = set()
    try:
        for fd in (proc / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                if GUEST_RAM_MEMFD in os.readlink(fd):
                    st = fd.stat()
                    if st.st_ino not in seen:
                        seen.add(st.st_ino)
                        allocated += st.st_blocks * 512 // 1024
        if not allocated:
            return 0
        mapped = 0
        in_memfd = False
        for line in (proc / str(pid) / "smaps").read_text().splitlines():
            if line[:1].isalnum() and "-" in line.split(" ", 1)[0]:
                in_memfd = GUEST_RAM_MEMFD in line
            elif in_memfd and line.startswith("Rss:"):
                mapped += int(line.split()[1])
    except OSError:
        return 0
    return max(0, allocated - mapped)


def components(pss: dict[str, int]) -> list[str]:
    """The component names in a tree_pss() result, largest first."""
    names = [k for k in pss if "." not in k and k not in ("total", "processes")]
    return sorted(names, key=lambda k: -pss[k])


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
