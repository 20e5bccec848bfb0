"""The config file (errors name the key) and sizing a VM from the container's spec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runm.errors import RunmError
from runm.sandbox.config import (
    Config,
    VMDefaults,
    load_config,
    parse_config,
    vm_size,
)

ROOT = Path(__file__).resolve().parents[2]


def test_default_vcpus_are_two_at_most_the_hosts_cores() -> None:
    from runm.sandbox.config import default_cpus

    cores = os.cpu_count() or 1
    assert default_cpus() == min(2, cores)
    assert vm_size(spec(), {}, Config()).cpus == min(2, cores)


def test_a_missing_default_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml", required=False) == Config()
    with pytest.raises(RunmError, match="no such file"):
        load_config(tmp_path / "none.toml", required=True)


def test_a_full_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[vm]\nmemory_mib = 1024\ncpus = 1\noverhead_mib = 0\n"
                    "max_memory_mib = 4096\nmax_cpus = 4\n[snapshot]\nenabled = false\n"
                    "clones = true\n")
    config = load_config(path, required=True)
    assert config.vm == VMDefaults(1024, 1, 0, 4096, 4)
    assert config.snapshots is False
    assert config.clones is True
    assert Config().clones is False
    assert config.pool_sizes() == {}


def test_pool_sizes_per_guest_memory_size(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[vm]\nmemory_mib = 1024\n[pool]\nsize = 2\n"
                    "[pool.memory_mib]\n256 = 1\n4096 = 0\n")
    assert load_config(path, required=True).pool_sizes() == {1024: 2, 256: 1}
    path.write_text("[pool]\nmemory_mib = { 512 = 3 }\n")  # the default size named
    assert load_config(path, required=True).pool_sizes() == {512: 3}


@pytest.mark.parametrize("text,message", [
    ("[vm]\nmemroy_mib = 1\n", "unknown key 'vm.memroy_mib'"),
    ("[network]\n", "unknown key 'network'"),
    ("[snapshot]\nclones = 1\n", "snapshot.clones must be true or false, not 1"),
    ("[snapshot]\nclone = true\n", "unknown key 'snapshot.clone' (known: clones, enabled)"),
    ("vm = 3\n", "vm must be a table"),
    ("[vm]\ncpus = -1\n", "vm.cpus must be an integer >= 0, not -1"),
    ("[vm]\ncpus = true\n", "vm.cpus must be an integer >= 0, not True"),
    ("[vm]\nmemory_mib = 64\n", "vm.memory_mib must be an integer >= 128"),
    ("[vm]\nmemory_mib = '1G'\n", "vm.memory_mib must be an integer"),
    ("[vm]\nmemory_mib = 8192\nmax_memory_mib = 1024\n", "is above vm.max_memory_mib"),
    ("[snapshot]\nenabled = 'no'\n", "snapshot.enabled must be true or false"),
    ("[snapshot]\nkeep = 1\n", "unknown key 'snapshot.keep'"),
    ("[pool]\nsize = -1\n", "pool.size must be an integer >= 0, not -1"),
    ("[pool]\nsizes = 1\n", "unknown key 'pool.sizes'"),
    ("[pool]\nmemory_mib = 1024\n", "pool.memory_mib must be a table"),
    ("[pool.memory_mib]\n1G = 1\n", "pool.memory_mib: '1G' is not a memory size"),
    ("[pool.memory_mib]\n64 = 1\n", "pool.memory_mib: '64' is not a memory size in MiB >= 128"),
    ("[pool.memory_mib]\n256 = 'two'\n", "pool.memory_mib.256 must be an integer >= 0"),
    ("[vm\n", "config"),
])
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(RunmError) as err:
        load_config(path, required=True)
    assert message in err.value.message
    assert str(path) in err.value.message


def spec(memory: int | None = None, quota: int | None = None, period: int | None = None,
         cpuset: str | None = None) -> dict:  # type: ignore[type-arg]
    resources: dict = {}  # type: ignore[type-arg]
    if memory is not None:
        resources["memory"] = {"limit": memory}
    cpu: dict = {}  # type: ignore[type-arg]
    if quota is not None:
        cpu["quota"] = quota
    if period is not None:
        cpu["period"] = period
    if cpuset is not None:
        cpu["cpus"] = cpuset
    if cpu:
        resources["cpu"] = cpu
    return {"linux": {"resources": resources}}


CONFIG = parse_config({"vm": {"memory_mib": 512, "cpus": 2, "overhead_mib": 192,
                              "max_memory_mib": 4096, "max_cpus": 8}})


@pytest.mark.parametrize("s,annotations,memory,cpus", [
    (spec(), {}, 512, 2),
    (spec(memory=64 << 20), {}, 256, 2),  # 64 + 192 -> 256
    (spec(memory=300 << 20), {}, 512, 2),  # 492 -> 512
    (spec(memory=1 << 40), {}, 4096, 2),  # clamped
    (spec(memory=-1), {}, 512, 2),  # unlimited
    (spec(quota=150000, period=100000), {}, 512, 2),
    (spec(quota=350000), {}, 512, 4),
    (spec(quota=10_000_000), {}, 512, 8),  # clamped
    (spec(cpuset="0-2,5"), {}, 512, 4),
    (spec(memory=64 << 20), {"io.runm.vm.memory_mib": "1024", "io.runm.vm.cpus": "1"}, 1024, 1),
])
def test_vm_size_from_the_spec(s: dict, annotations: dict[str, str], memory: int,  # type: ignore[type-arg]
                               cpus: int) -> None:
    size = vm_size(s, annotations, CONFIG)
    assert (size.memory_mib, size.cpus) == (memory, cpus), size.why


@pytest.mark.parametrize("annotations,message", [
    ({"io.runm.vm.memory_mib": "lots"}, "io.runm.vm.memory_mib='lots'"),
    ({"io.runm.vm.cpus": "0"}, "must be an integer >= 1"),
])
def test_bad_size_annotations_are_errors(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(RunmError, match=message):
        vm_size(spec(), annotations, CONFIG)
    with pytest.raises(RunmError, match="invalid cpuset"):
        vm_size(spec(cpuset="a-b"), {}, CONFIG)


def test_cli_reports_a_bad_config_file_in_runcs_format(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[vm]\ncpu = 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "runm.cli.main", "--config", str(path), "list"],
        capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        check=False)
    assert result.returncode == 1
    assert "unknown key 'vm.cpu'" in result.stderr
    assert "Traceback" not in result.stderr
