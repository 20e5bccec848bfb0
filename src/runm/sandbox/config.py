"""runm's configuration file and how big a container's VM is.

`/etc/runm/config.toml` (or `runm --config FILE`, or $RUNM_CONFIG) sets defaults; a missing
default file is fine, a missing named file, an unknown key or a bad value is an error that
names the key. A VM's size comes from the container's spec: memory = the spec's memory limit
plus the guest's overhead, rounded up to a power of two (each size has its own snapshot, so
sizes are kept few); vCPUs from the CPU quota or the cpuset; else the defaults. Annotations
`io.runm.vm.memory_mib` and `io.runm.vm.cpus` override all of that for one container.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from runm.errors import RunmError
from runm.records import record

DEFAULT_PATH = Path("/etc/runm/config.toml")
CONFIG_ENV = "RUNM_CONFIG"
MEMORY_ANNOTATION = "io.runm.vm.memory_mib"
CPUS_ANNOTATION = "io.runm.vm.cpus"
MIN_MEMORY_MIB = 128


@record(frozen=True)
class VMDefaults:
    """The [vm] table."""

    memory_mib: int = 512  # guest RAM when the spec sets no memory limit
    cpus: int = 0  # vCPUs when the spec sets no CPU limit; 0: auto (see default_cpus)
    overhead_mib: int = 192  # guest kernel, agent, runc: added to the spec's memory limit
    max_memory_mib: int = 16384
    max_cpus: int = os.cpu_count() or 1


@record(frozen=True)
class PoolTargets:
    """The [pool] table: warm VMs to keep ready (runm.sandbox.pool), none by default."""

    size: int = 0  # of the default size (vm.memory_mib)
    memory_mib: tuple[tuple[int, int], ...] = ()  # (guest memory MiB, count): other sizes


@record(frozen=True)
class Config:
    vm: VMDefaults = VMDefaults()
    snapshots: bool = True  # [snapshot] enabled
    # [snapshot] clones: every restored VM is a page-sharing clone (9p shares, no free page
    # reporting), not only pooled ones (see docs/design.md, "Starting from a snapshot")
    clones: bool = False
    pool: PoolTargets = PoolTargets()
    path: str = ""  # where it was read from ("" = built-in defaults)

    def pool_sizes(self) -> dict[int, int]:
        """Warm VMs to keep per guest memory size (MiB), as configured."""
        sizes = {self.vm.memory_mib: self.pool.size, **dict(self.pool.memory_mib)}
        return {memory: count for memory, count in sizes.items() if count > 0}


def default_cpus() -> int:
    """vCPUs of a VM whose spec and config say nothing: 2, at most the host's cores, with
    any accelerator. Under TCG the second vCPU translates in parallel: a restored guest's
    first runc is ~30% faster. (Two-vCPU TCG guests used to lock up in ~1 of 50 starts, on
    kernel code patched when a container's cgroup switched a static key; the agent holds
    those keys on for the VM's life now: pid1.hold_kernel_switches.)"""
    return min(2, os.cpu_count() or 1)


def config_path() -> tuple[Path, bool]:
    """(the file to read, whether it was named explicitly)."""
    named = os.environ.get(CONFIG_ENV)
    return (Path(named), True) if named else (DEFAULT_PATH, False)


def load_config(path: Path | None = None, required: bool | None = None) -> Config:
    if path is None:
        path, required = config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise RunmError(f"config {path}: no such file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as err:
        raise RunmError(f"config {path}: {err}") from None
    import tomllib  # only with a file to read: most hosts have none, and it is ~4 ms a start

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RunmError(f"config {path}: {err}") from None
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], where: str = "config") -> Config:
    tables = {"vm": _parse_vm, "snapshot": _parse_snapshot, "pool": _parse_pool}
    unknown = sorted(set(data) - set(tables))
    if unknown:
        raise RunmError(f"{where}: unknown key {unknown[0]!r} (known: pool, snapshot, vm)")
    vm = VMDefaults()
    snapshots, clones = True, False
    if "vm" in data:
        vm = _parse_vm(_table(data, "vm", where), where)
    if "snapshot" in data:
        snapshots, clones = _parse_snapshot(_table(data, "snapshot", where), where)
    pool = _parse_pool(_table(data, "pool", where), where) if "pool" in data else PoolTargets()
    if vm.memory_mib > vm.max_memory_mib:
        raise RunmError(f"{where}: vm.memory_mib ({vm.memory_mib}) is above vm.max_memory_mib "
                        f"({vm.max_memory_mib})")
    return Config(vm=vm, snapshots=snapshots, clones=clones, pool=pool, path=where)


def _table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = data[name]
    if not isinstance(value, dict):
        raise RunmError(f"{where}: {name} must be a table ([{name}])")
    return value


def _parse_vm(table: dict[str, Any], where: str) -> VMDefaults:
    known = {f.name for f in fields(VMDefaults)}
    values: dict[str, int] = {}
    for key, value in table.items():
        if key not in known:
            raise RunmError(f"{where}: unknown key 'vm.{key}' (known: {', '.join(sorted(known))})")
        least = MIN_MEMORY_MIB if key.endswith("memory_mib") else \
            0 if key in ("overhead_mib", "cpus") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise RunmError(f"{where}: vm.{key} must be an integer >= {least}, not {value!r}")
        values[key] = value
    return VMDefaults(**values)


def _parse_snapshot(table: dict[str, Any], where: str) -> tuple[bool, bool]:
    """(enabled, clones)."""
    for key, value in table.items():
        if key not in ("enabled", "clones"):
            raise RunmError(f"{where}: unknown key 'snapshot.{key}' (known: clones, enabled)")
        if not isinstance(value, bool):
            raise RunmError(f"{where}: snapshot.{key} must be true or false, not {value!r}")
    return bool(table.get("enabled", True)), bool(table.get("clones", False))


def _parse_pool(table: dict[str, Any], where: str) -> PoolTargets:
    def count(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RunmError(f"{where}: {key} must be an integer >= 0, not {value!r}")
        return value

    size = 0
    by_memory: list[tuple[int, int]] = []
    for key, value in table.items():
        if key == "size":
            size = count("pool.size", value)
        elif key == "memory_mib":
            if not isinstance(value, dict):
                raise RunmError(f"{where}: pool.memory_mib must be a table of guest memory "
                                f"sizes (MiB) to counts, like {{ 1024 = 1 }}")
            for memory, n in value.items():
                if not memory.isdigit() or int(memory) < MIN_MEMORY_MIB:
                    raise RunmError(f"{where}: pool.memory_mib: {memory!r} is not a memory "
                                    f"size in MiB >= {MIN_MEMORY_MIB}")
                by_memory.append((int(memory), count(f"pool.memory_mib.{memory}", n)))
        else:
            raise RunmError(f"{where}: unknown key 'pool.{key}' (known: memory_mib, size)")
    return PoolTargets(size, tuple(by_memory))


@record(frozen=True)
class VMSize:
    memory_mib: int
    cpus: int
    why: str  # for the log: where the numbers came from


def vm_size(spec: dict[str, Any], annotations: dict[str, str], config: Config) -> VMSize:
    """How big the container's VM is (see the module docstring)."""
    d = config.vm
    resources = ((spec.get("linux") or {}).get("resources") or {})
    memory, why_memory = d.memory_mib, "default"
    limit = (resources.get("memory") or {}).get("limit")
    if isinstance(limit, int) and 0 < limit < 1 << 62:
        wanted = math.ceil(limit / (1 << 20)) + d.overhead_mib
        memory, why_memory = _power_of_two_at_least(wanted), "memory limit + overhead"
    cpus, why_cpus = d.cpus or default_cpus(), "default"
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period") or 100000
    if isinstance(quota, int) and quota > 0 and isinstance(period, int) and period > 0:
        cpus, why_cpus = math.ceil(quota / period), "cpu quota"
    elif isinstance(cpu.get("cpus"), str) and cpu["cpus"]:
        cpus, why_cpus = _cpuset_size(cpu["cpus"]), "cpuset"
    if MEMORY_ANNOTATION in annotations:
        memory, why_memory = _annotation_int(annotations, MEMORY_ANNOTATION,
                                             MIN_MEMORY_MIB), "annotation"
    if CPUS_ANNOTATION in annotations:
        cpus, why_cpus = _annotation_int(annotations, CPUS_ANNOTATION, 1), "annotation"
    memory = max(MIN_MEMORY_MIB, min(memory, d.max_memory_mib))
    cpus = max(1, min(cpus, d.max_cpus))
    return VMSize(memory, cpus, f"memory {memory} MiB ({why_memory}), {cpus} vCPU(s) "
                                f"({why_cpus})")


def _power_of_two_at_least(mib: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(mib, 1))))


def _cpuset_size(text: str) -> int:
    """Number of CPUs in a cpuset list like '0-3,6'."""
    count = 0
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise RunmError(f"invalid cpuset {text!r}")
        count += int(high) - int(low) + 1 if high else 1
    return max(count, 1)


def _annotation_int(annotations: dict[str, str], key: str, least: int) -> int:
    value = annotations[key]
    if not value.isdigit() or int(value) < least:
        raise RunmError(f"annotation {key}={value!r}: must be an integer >= {least}")
    return int(value)
