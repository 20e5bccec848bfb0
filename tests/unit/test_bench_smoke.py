"""The benchmark suite's pure logic, and one real `python -m bench --quick --only cold`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench import REPO
from bench.cli import build_parser, make_config
from bench.figures import drop_host_cache, not_measured, write_random
from bench.hostinfo import cpu_model
from bench.model import Figure, Line
from bench.procs import (
    component,
    components,
    descendants,
    parse_smaps_rollup,
    parse_stat,
    pss_kb,
    snapshot,
    tree,
    tree_pss,
)
from bench.report import headline, render
from bench.stats import (
    Kind,
    fmt_ratio,
    fmt_summary,
    fmt_value,
    median_phases,
    parse_int_list,
    ratio,
    sig,
    slowest,
    summarize,
)

SMAPS_ROLLUP = """\
55d0c0a3e000-7ffd1b3f2000 ---p 00000000 00:00 0                          [rollup]
Rss:              334784 kB
Pss:              330558 kB
Pss_Dirty:        262166 kB
Pss_Anon:         147056 kB
Pss_File:          68360 kB
Pss_Shmem:        115142 kB
Shared_Clean:       4036 kB
SwapPss:               0 kB
"""


def test_summary_median_and_spread() -> None:
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s.n, s.median, s.lo, s.hi) == (4, 2.5, 1.0, 10.0)
    assert s.p25 == 1.75 and s.p75 == 4.75
    one = summarize([5.0])
    assert one.median == one.lo == one.hi == one.p25 == one.p75 == 5.0
    with pytest.raises(ValueError):
        summarize([])


def test_ratio_is_runm_cost_in_both_directions() -> None:
    assert ratio(6.0, 3.0, Kind.TIME) == 2.0
    assert ratio(10.0, 1000.0, Kind.RATE) == 100.0  # runm 10 MB/s vs 1000 MB/s: x100
    assert ratio(200.0, 50.0, Kind.MEMORY) == 4.0
    assert ratio(1.0, 0.0, Kind.TIME) is None
    assert fmt_ratio(None) == "x?"
    assert fmt_ratio(101.3) == "x101"
    assert fmt_ratio(1.4234) == "x1.42"


def test_significant_digits_never_use_exponents() -> None:
    assert sig(6.1234) == "6.12"
    assert sig(0.04321) == "0.0432"
    assert sig(1234.6) == "1235"
    assert sig(9.996) == "10.0"
    assert sig(0.0) == "0"


def test_values_and_summaries_pick_readable_units() -> None:
    assert fmt_value(Kind.TIME, 6.1) == "6.10 s"
    assert fmt_value(Kind.TIME, 0.0432) == "43.2 ms"
    assert fmt_value(Kind.TIME, 5e-6) == "5.00 µs"
    assert fmt_value(Kind.RATE, 2345.6) == "2346 MB/s"
    assert fmt_summary(Kind.TIME, summarize([6.1, 5.9, 6.4])) == "6.10 s [5.90-6.40]"
    assert fmt_summary(Kind.TIME, summarize([0.05, 0.06, 0.07])) == "60.0 ms [50.0-70.0]"


def test_phase_medians_and_the_slowest_phase() -> None:
    runs = [{"qemu_start": 0.1, "guest_boot": 4.0, "teardown": 0.3},
            {"qemu_start": 0.3, "guest_boot": 5.0},
            {"qemu_start": 0.2, "guest_boot": 6.0, "teardown": 0.5}]
    med = median_phases(runs)
    assert list(med) == ["qemu_start", "guest_boot", "teardown"]
    assert med == {"qemu_start": 0.2, "guest_boot": 5.0, "teardown": 0.4}
    assert slowest(med) == ("guest_boot", 5.0)
    assert slowest({}) is None


def test_int_lists() -> None:
    assert parse_int_list("1, 4,8,4") == [1, 4, 8]
    for bad in ("", "0", "1,-2", "x"):
        with pytest.raises(ValueError):
            parse_int_list(bad)


def test_headline_and_report_show_baselines_with_ratios() -> None:
    fig = Figure("cold", "Cold start")
    fig.measure("runm", "runm run true", Kind.TIME).samples += [6.1, 5.9, 6.4]
    fig.measure("bare", "bare VM boot to agent-ready", Kind.TIME, "bare VM boot").samples += [
        4.3, 4.2, 4.5]
    runc = fig.measure("runc", "native runc run true", Kind.TIME, "native runc")
    runc.samples += [0.06]
    runc.add(None, "exit status 1: boom")
    fig.lines.append(Line("runm", ["bare", "runc"]))
    text = headline(fig, fig.lines[0])
    assert text == ("runm run true: 6.10 s [5.90-6.40]  | bare VM boot 4.30 s (x1.42)"
                    " | native runc 60.0 ms (x102)")
    info = {"date": "d", "host_kernel": "k", "machine": "m", "cpu_model": "c", "cores": 2,
            "cores_usable": 2, "mem_total_mib": 1, "cgroup": "v1", "loadavg_start": [1.0],
            "accel": "tcg", "qemu": "q", "runc": "r", "guest_kernel": "g", "runm": "v",
            "python": "p"}
    out = render(info, make_config(build_parser().parse_args(["--quick"]), "tcg"),
                 [fig, *not_measured(exec_possible=False)])
    assert "native runc run true: 60.0 ms [60.0-60.0]  (1 of 2 runs failed: exit status 1" in out
    assert re.search(r"^   not measured: needs `runm exec`", out, re.M)
    assert re.search(r"Rootfs read throughput via exec\n   not measured: ", out)
    assert not_measured(exec_possible=True) == []
    assert [f.key for f in not_measured(exec_possible=False)] == ["exec", "fs"]
    assert "1 run(s) failed" in out


def test_quick_and_explicit_options() -> None:
    quick = make_config(build_parser().parse_args(["--quick", "--repeat", "2"]), "kvm")
    assert (quick.repeat, quick.warmup, quick.size_mib, quick.density) == (2, 0, 4, [1, 2])
    full = make_config(build_parser().parse_args(["--density", "1,4", "--size", "8"]), "tcg")
    assert (full.repeat, full.warmup, full.size_mib, full.density) == (3, 1, 8, [1, 4])
    assert build_parser().parse_args(["--only", "cold,stdio"]).only == ["cold", "stdio"]
    assert "fs" in build_parser().parse_args([]).only
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--only", "cold,warp"])


def test_fs_figure_file_helpers(tmp_path: Path) -> None:
    big = tmp_path / "big"
    write_random(big, (1 << 20) + 5)
    data = big.read_bytes()
    assert len(data) == (1 << 20) + 5 and data.count(0) < len(data) // 2  # random, not zeros
    drop_host_cache(big)  # only evicts: the content is unchanged
    assert big.read_bytes() == data


def test_pss_parser_on_a_synthetic_rollup() -> None:
    fields = parse_smaps_rollup(SMAPS_ROLLUP)
    assert fields["Pss"] == 330558
    assert (fields["Pss_Anon"], fields["Pss_File"], fields["Pss_Shmem"]) == (147056, 68360,
                                                                            115142)
    assert "55d0c0a3e000-7ffd1b3f2000 ---p 00000000 00" not in fields
    assert parse_smaps_rollup("") == {}


def test_stat_parsing_survives_odd_command_names() -> None:
    line = "4242 (we(i)rd ) name) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 1 0"
    info = parse_stat(line)
    assert (info.pid, info.comm, info.state, info.ppid) == (4242, "we(i)rd ) name", "S", 17)
    assert info.cpu_ticks == 300


def test_process_tree_of_the_current_process() -> None:
    script = ("import subprocess, sys\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],"
              " stdin=subprocess.PIPE)\n"
              "print(g.pid, flush=True)\n"
              "sys.stdin.readline()\n"
              "g.stdin.close()\n"
              "g.wait()\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        grandchild = int(child.stdout.readline())  # printed once the grandchild runs
        mine = descendants(os.getpid(), snapshot())
        assert child.pid in mine and grandchild in mine
        assert mine.index(child.pid) < mine.index(grandchild)  # breadth first
        assert descendants(child.pid, snapshot()) == [grandchild]
        members = tree(os.getpid())
        assert members[0].pid == os.getpid()
        assert pss_kb(os.getpid()) > 0
        pss = tree_pss(child.pid)
        assert pss["processes"] == 2 and pss["total"] > 0
        assert components(pss) == ["runm"]  # python processes count as runm's
        assert tree(2**22 + 12345) == []
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(30)


def test_components_of_a_container() -> None:
    info = parse_stat("1 (qemu-system-x86) S 0 0 0 0 -1 0 0 0 0 0 0 0 0 0 0 0 0 0")
    assert component(info) == "qemu"
    info = parse_stat("1 (virtiofsd) S 0 0 0 0 -1 0 0 0 0 0 0 0 0 0 0 0 0 0")
    assert component(info) == "virtiofsd"
    info = parse_stat("1 (python3) S 0 0 0 0 -1 0 0 0 0 0 0 0 0 0 0 0 0 0")
    assert component(info, "python3 -m runm.cli.main run") == "runm"


def test_cpu_model_from_cpuinfo() -> None:
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 7B13\n"
    assert cpu_model(text) == "AMD EPYC 7B13"
    assert cpu_model("") == "unknown"


@pytest.mark.vm
def test_quick_start_bench_prints_snapshot_and_cold_rows_with_ratios(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "cold", "--json", str(out),
         "--chart", str(tmp_path / "bench.png")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    snap = re.search(r"^ *runm run true \(VM restored from its snapshot\): \S+ \w+ \[[^]]+\] +"
                     r"\| cold start \S+ \w+ \(x[\d.]+\) \| bare restore \S+ \w+ \(x[\d.]+\)"
                     r" \| runc in a running guest \S+ \w+ \(x[\d.]+\)"
                     r" \| native runc \S+ \w+ \(x[\d.]+\)$", text, re.M)
    assert snap, text
    head = re.search(r"^ *runm run true, cold boot \(RUNM_SNAPSHOT=0\): \S+ \w+ \[[^]]+\] +"
                     r"\| bare VM boot \S+ \w+ \(x[\d.]+\) \| native runc \S+ \w+ \(x[\d.]+\)$",
                     text, re.M)
    assert head, text
    assert re.search(r"^ *bare VM boot to agent-ready: \S+ \w+ \[", text, re.M), text
    assert re.search(r"^ *native runc run true: \S+ \w+ \[", text, re.M), text
    assert re.search(r"slowest phase: \w+", text), text
    assert "accel      " in text and "qemu       QEMU" in text
    doc = json.loads(out.read_text())
    cold = next(f for f in doc["figures"] if f["key"] == "cold")
    for key in ("runm", "runm_cold", "restore", "bare", "in_guest", "runc"):
        assert cold["measures"][key]["summary"]["n"] == 1, key
    assert doc["host"]["accel"] in ("kvm", "tcg")
