"""The figures: what is run, in which order, and what is recorded.

Every figure runs `warmup` uncounted rounds, then `repeat` counted ones. Within a round the
subject and its baselines run back to back (interleaved), so slow drift in the host's load
hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Harness, RunResult, stop_process
from bench.model import Figure, Line
from bench.procs import components, tcg_buffer_kb, tree, tree_cpu_seconds, tree_pss
from bench.stats import Kind, fmt_value, median_phases, sig, slowest

Log = Callable[[str], None]
FIGURES = ("cold", "stdio", "memory", "density", "exec", "fs", "net", "shim")
IDLE_SCRIPT = "trap 'exit 0' TERM; echo ready; sleep 3600 & wait"


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Config:
    repeat: int = 3
    warmup: int = 1
    size_mib: int = 64
    density: list[int] = field(default_factory=lambda: [1, 4, 8])
    settle: float = 3.0
    ready_timeout: float = 900.0
    accel: str = ""
    cores: int = 0

    def rounds(self) -> list[tuple[bool, str]]:
        """(counted, tag) per round: the warm-ups first."""
        out = [(False, "warm-up") for _ in range(self.warmup)]
        out += [(True, f"{i + 1}/{self.repeat}") for i in range(self.repeat)]
        return out


def _brief(res: RunResult, value: str) -> str:
    return value if res.ok else f"FAILED ({res.error})"


# -- 1. cold start ----------------------------------------------------------------------


def cold(h: Harness, cfg: Config, log: Log = stderr_log) -> Figure:
    fig = Figure("cold", "Start: `true` in a new container, spawn to exit, wall clock")
    runm = fig.measure("runm", "runm run true (VM restored from its snapshot)", Kind.TIME,
                       short="snapshot start")
    cold_runm = fig.measure("runm_cold", "runm run true, cold boot (RUNM_SNAPSHOT=0)",
                            Kind.TIME, short="cold start")
    restore = fig.measure("restore", "bare VM restore to agent-ready", Kind.TIME,
                          short="bare restore")
    bare = fig.measure("bare", "bare VM boot to agent-ready", Kind.TIME, short="bare VM boot")
    pooled = fig.measure("pool", "runm run true (VM from the warm pool, which refills once the "
                         "container runs)", Kind.TIME, short="pool start")
    pooled_quiet = fig.measure("pool_quiet", "runm run true (VM from the warm pool; pool size 0 "
                               "first: no refill)", Kind.TIME, short="pool start, no refill")
    in_guest = fig.measure("in_guest", "runc run true in a running guest (its 2nd container)",
                           Kind.TIME, short="runc in a running guest")
    first = fig.measure("in_guest_first", "runc run true in a running guest (its 1st "
                        "container: cold translation cache)", Kind.TIME)
    runc = fig.measure("runc", "native runc run true", Kind.TIME, short="native runc")
    close = fig.measure("bare_close", "bare VM close (agent shutdown, QEMU exit)", Kind.TIME)
    outside = fig.measure("outside", "runm run (snapshot) outside its phases", Kind.TIME)
    fig.lines.append(Line("runm", ["runm_cold", "restore", "in_guest", "runc"],
                          ["in_guest_first", "outside"]))
    fig.lines.append(Line("pool", ["in_guest", "runm"], ["pool_quiet"]))
    fig.lines.append(Line("runm_cold", ["bare", "runc"], ["bare_close"]))
    bundle = h.bundle("true", ["true"])
    runm_phases: list[dict[str, float]] = []
    cold_phases: list[dict[str, float]] = []
    pool_phases: list[dict[str, float]] = []
    bare_phases: list[dict[str, float]] = []
    for counted, tag in cfg.rounds():
        cid = h.new_id("snap")
        r = h.timed(h.runm_argv(bundle, cid), cid, timings=True)
        cid = h.new_id("cold")
        c = h.timed(h.runm_argv(bundle, cid), cid, timings=True, snapshot=False)
        p, q = pool_starts(h, bundle)
        s = h.bare_vm(h.new_id("restore"), snapshot=True)
        b = h.bare_vm(h.new_id("bare"))
        g = h.runc_in_guest(h.new_id("inguest"), bundle)
        nid = h.new_id("runc")
        n = h.timed(h.runc_argv(bundle, nid), nid)
        log(f"[start {tag}] runm run: snapshot {_brief(r, fmt_value(Kind.TIME, r.wall))}, "
            f"cold {_brief(c, fmt_value(Kind.TIME, c.wall))}, pool "
            f"{_brief(p, fmt_value(Kind.TIME, p.wall))}, pool (no refill) "
            f"{_brief(q, fmt_value(Kind.TIME, q.wall))} | bare restore "
            f"{_brief(s, fmt_value(Kind.TIME, s.wall))}, boot "
            f"{_brief(b, fmt_value(Kind.TIME, b.wall))} | runc in guest "
            f"{_brief(g, fmt_value(Kind.TIME, g.wall))} | native runc "
            f"{_brief(n, fmt_value(Kind.TIME, n.wall))}")
        if not counted:
            continue
        runm.add(r.wall, r.error)
        cold_runm.add(c.wall, c.error)
        pooled.add(p.wall, p.error)
        pooled_quiet.add(q.wall, q.error)
        if p.ok and p.phases:
            pool_phases.append(p.phases)
        restore.add(s.wall, s.error)
        bare.add(b.wall, b.error)
        in_guest.add(g.wall, g.error)
        first.add(g.extra.get("first"), g.error)
        runc.add(n.wall, n.error)
        close.add(b.extra.get("close"), None if "close" in b.extra else "no close time")
        if r.ok and r.phases:
            runm_phases.append(r.phases)
            outside.add(r.wall - sum(r.phases.values()))
        if c.ok and c.phases:
            cold_phases.append(c.phases)
        if b.ok and b.phases:
            bare_phases.append(b.phases)
    fig.data["runm_phases"] = runm_phases
    fig.data["cold_phases"] = cold_phases
    fig.data["bare_phases"] = bare_phases
    fig.notes += phase_notes(runm_phases, runm, "runm run (snapshot)")
    fig.notes += phase_notes(cold_phases, cold_runm, "runm run (cold boot)")
    fig.notes += phase_notes(pool_phases, pooled, "runm run (pool)")
    if bare_phases:
        med = median_phases(bare_phases)
        fig.notes.append("bare VM phases (median): " + " | ".join(
            f"{k} {fmt_value(Kind.TIME, v)}" for k, v in med.items()))
    fig.notes.append("bare VM: Sandbox.create() to the agent's first answer, in-process (no "
                     "interpreter start, no shares); runc in a running guest: runc run -d, "
                     "wait and delete through the agent in a restored VM; native runc: host "
                     "runc, same bundle")
    return fig


POOLED_MEMBERS = 3  # pooled VMs map the snapshot's RAM copy-on-write: they share its pages


def pooled_memory(h: Harness, cfg: Config, mem: Figure, log: Log) -> None:
    """Host memory of a pooled VM waiting to be taken (keeper + its QEMU), in a pool of
    POOLED_MEMBERS, and the part of it a KVM host would not have (TCG's translations)."""
    measure = mem.measure("pooled", f"one pooled VM waiting, in a pool of {POOLED_MEMBERS} "
                                    "(keeper + QEMU, restored and warmed up): PSS", Kind.MEMORY)
    tcg = mem.measure("pooled_tcg", "of it, TCG's translation buffer (none with KVM)",
                      Kind.MEMORY)
    mem.lines.append(Line("pooled", [f"pc{cfg.density[0]}"], ["pooled_tcg"]))
    trees = []
    for counted, tag in cfg.rounds():
        fill = h.pool("fill", str(POOLED_MEMBERS))
        members = h.pool_members()
        error = None if fill.ok and len(members) == POOLED_MEMBERS else \
            f"pool fill: {fill.error or f'{len(members)} members'}"
        per_member: list[dict[str, int]] = []
        tcg_kb: list[int] = []
        if error is None:
            time.sleep(cfg.settle)  # a documented settle, not synchronisation
            per_member = [tree_pss(m.keeper_pid) for m in members]
            tcg_kb = [sum(tcg_buffer_kb(p.pid) for p in tree(m.keeper_pid)) for m in members]
        drained = h.pool_drain()
        error = error or drained
        pss = statistics.mean(t["total"] for t in per_member) / 1024 if per_member else 0.0
        log(f"[memory {tag}] pooled VM: " + (f"PSS {sig(pss)} MiB" if per_member
                                              else f"FAILED ({error})"))
        if counted:
            measure.add(pss if per_member and not error else None, error)
            tcg.add(statistics.mean(tcg_kb) / 1024 if tcg_kb and not error else None, error)
            if per_member and not error:
                trees += per_member
    if trees:
        mem.notes.append("pooled VM (median): " + breakdown(trees))


def pool_starts(h: Harness, bundle: object) -> tuple[RunResult, RunResult]:
    """`runm run true` from a full pool of 1: once while the taken VM's replacement is being
    prepared (what back-to-back starts see), once with the pool's size set to 0 first."""
    results = []
    for refill in (True, False):
        fill = h.pool("fill", "1")
        if not fill.ok:
            results.append(RunResult(error=f"pool fill: {fill.error}"))
            continue
        if not refill:
            h.pool("fill", "0", "--no-wait")
        cid = h.new_id("pool")
        res = h.timed(h.runm_argv(bundle, cid), cid, timings=True)  # type: ignore[arg-type]
        if res.ok and "qemu_attach" not in res.phases:
            res.error = "not taken from the pool"
        results.append(res)
    drained = h.pool_drain()
    if drained:
        results[-1].error = drained
    return results[0], results[1]


def phase_notes(runs: list[dict[str, float]], wall: object, what: str) -> list[str]:
    if not runs:
        return [f"phases of {what}: none recorded (RUNM_TIMINGS gave nothing)"]
    med = median_phases(runs)
    notes = [f"phases of {what} (RUNM_TIMINGS, median of {len(runs)}): " + " | ".join(
        f"{k} {fmt_value(Kind.TIME, v)}" for k, v in med.items())]
    top = slowest(med)
    summary = getattr(wall, "summary", None)
    if top is not None:
        share = (f" = {sig(100 * top[1] / summary.median, 2)}% of the median wall clock"
                 if summary and summary.median > 0 else "")
        notes.append(f"slowest phase: {top[0]} ({fmt_value(Kind.TIME, top[1])}{share})")
    return notes


# -- 2. stdio throughput ----------------------------------------------------------------


def stdio(h: Harness, cfg: Config, log: Log = stderr_log) -> Figure:
    size = cfg.size_mib << 20
    fig = Figure("stdio", f"Stdio throughput: {cfg.size_mib} MiB through the container's "
                          "stdio, wall clock from spawn to exit (nothing subtracted)")
    out_bundle = h.bundle(f"out-{size}", ["head", "-c", str(size), "/dev/zero"])
    in_bundle = h.bundle("in", ["sh", "-c", "cat >/dev/null"])
    # The producer alone, a floor: under TCG the guest's own `head` (4 KiB writes) may be the
    # limit of container->host.
    out_floor = h.bundle(f"out-guest-{size}", ["sh", "-c", f"head -c {size} /dev/zero >/dev/null"])
    host_out = ["head", "-c", str(size), "/dev/zero"]
    host_in = ["sh", "-c", "cat >/dev/null"]
    directions = {
        "out": ("container->host", "head -c N /dev/zero", out_bundle, host_out, h.pump_out,
                out_floor),
        "in": ("host->container", "cat >/dev/null", in_bundle, host_in, h.pump_in, None),
    }
    phases: dict[str, list[dict[str, float]]] = {"out": [], "in": []}
    for d, (label, what, _, _, _, floor) in directions.items():
        fig.measure(f"{d}_runm", f"{label} ({what}): runm run", Kind.RATE)
        fig.measure(f"{d}_runc", f"{label}: native runc run", Kind.RATE, short="native runc")
        fig.measure(f"{d}_pipe", f"{label}: native pipe", Kind.RATE, short="native pipe")
        fig.measure(f"{d}_stream", "runm, first to last byte seen by the host (for "
                                   "reference only: excludes boot and teardown)", Kind.RATE)
        baselines = [f"{d}_runc", f"{d}_pipe"]
        if floor is not None:
            fig.measure(f"{d}_guest", f"{label}: the same command inside the guest, to "
                                      "/dev/null (runm run)", Kind.RATE,
                        short="the guest's own head")
            baselines.append(f"{d}_guest")
        fig.lines.append(Line(f"{d}_runm", baselines, [f"{d}_stream"]))
    for counted, tag in cfg.rounds():
        for d, (label, _, bundle, host_argv, pump, floor) in directions.items():
            cid, nid, pid = h.new_id(f"io{d}"), h.new_id(f"io{d}-runc"), h.new_id(f"io{d}-pipe")
            r = pump(h.runm_argv(bundle, cid), cid, size, True)
            n = pump(h.runc_argv(bundle, nid), nid, size, False)
            p = pump(host_argv, pid, size, False)
            log(f"[stdio {tag}] {label}: runm run {_brief(r, rate(size, r.wall))} | native runc "
                f"{_brief(n, rate(size, n.wall))} | pipe {_brief(p, rate(size, p.wall))}")
            results = [("runm", r), ("runc", n), ("pipe", p)]
            if floor is not None:
                gid = h.new_id(f"io{d}-guest")
                g = h.timed(h.runm_argv(floor, gid), gid)
                log(f"[stdio {tag}] {label}: the same inside the guest, to /dev/null "
                    f"{_brief(g, rate(size, g.wall))}")
                results.append(("guest", g))
            if not counted:
                continue
            for key, res in results:
                fig.measures[f"{d}_{key}"].add(size / res.wall / 1e6 if res.ok else None,
                                               res.error)
            if r.ok and r.stream:
                fig.measures[f"{d}_stream"].add(size / r.stream / 1e6)
                phases[d].append(r.phases)
    fig.data["runm_phases"] = phases
    for d, runs in phases.items():
        if runs:
            med = median_phases(runs)
            fig.notes.append(f"{directions[d][0]} runm phases (median): " + " | ".join(
                f"{k} {fmt_value(Kind.TIME, v)}" for k, v in med.items()))
    fig.notes.append("MB/s = 10^6 bytes/s over the whole run (runm: boot + transfer + teardown);"
                     " native pipe: the same command on the host, piped to/from the bench")
    return fig


def rate(nbytes: int, seconds: float) -> str:
    return fmt_value(Kind.RATE, nbytes / seconds / 1e6) if seconds > 0 else "inf"


# -- 3. memory and 4. density (one set of concurrent batches serves both) ---------------


def memory_and_density(h: Harness, cfg: Config, want: set[str],
                       log: Log = stderr_log) -> list[Figure]:
    mem = Figure("memory", "Memory: host PSS of idle containers (runm + its QEMU + virtiofsd "
                           "children), sampled after the container printed \"ready\" and "
                           f"{cfg.settle:g} s of settling")
    den = Figure("density", "Density: N containers started at once, wall time until every one "
                            "printed its first line")
    bundle = h.bundle("idle", ["sh", "-c", IDLE_SCRIPT])
    parts: dict[int, list[dict[str, int]]] = {}
    for n in cfg.density:
        mem.measure(f"pc{n}", f"runm, {n} idle container{'s' * (n > 1)}: PSS per container",
                    Kind.MEMORY, short=f"runm, {n} at once")
        mem.measure(f"total{n}", f"runm, {n} idle container{'s' * (n > 1)}: PSS total",
                    Kind.MEMORY)
        mem.measure(f"runc{n}", f"native runc, {n} idle: PSS per container", Kind.MEMORY,
                    short="native runc")
        mem.measure(f"cpu{n}", f"runm, {n} idle: CPU per container during the settle "
                               "(% of one core)", Kind.PERCENT)
        den.measure(f"runm{n}", f"N={n}: runm run", Kind.TIME, short=f"runm N={n}")
        den.measure(f"runc{n}", f"native runc, N={n}", Kind.TIME, short="native runc")
        den.measure(f"each{n}", f"N={n}: runm, each container's own time to its first line",
                    Kind.TIME)
        base = [f"runc{n}"] if n == 1 else [f"pc{cfg.density[0]}", f"runc{n}"]
        mem.lines.append(Line(f"pc{n}", base, [f"total{n}", f"cpu{n}"]))
        den_base = [f"runc{n}"] if n == 1 else [f"runm{cfg.density[0]}", f"runc{n}"]
        den.lines.append(Line(f"runm{n}", den_base, [f"each{n}"]))
    rounds: list[tuple[int, bool, str]] = [(cfg.density[0], False, "warm-up")] * cfg.warmup
    for n in cfg.density:
        rounds += [(n, True, f"{i + 1}/{cfg.repeat}") for i in range(cfg.repeat)]
    for n, counted, tag in rounds:
        for runtime in ("runm", "runc"):
            ids = [h.new_id(f"n{n}-{runtime}") for _ in range(n)]
            argvs = [(cid, h.runm_argv(bundle, cid) if runtime == "runm"
                      else h.runc_argv(bundle, cid)) for cid in ids]
            batch = h.batch(argvs)
            errors: list[str] = []
            pss: list[dict[str, int]] = []
            wall: float | None = None
            cpu: float | None = None
            try:
                errors = batch.wait_ready(cfg.ready_timeout)
                wall = max(batch.ready_times()) if not errors else None
                if not errors and "memory" in want:
                    cpu0, t0 = [tree_cpu_seconds(p.pid) for p in batch.procs], time.monotonic()
                    time.sleep(cfg.settle)  # a documented settle, not synchronisation
                    cpu1, t1 = [tree_cpu_seconds(p.pid) for p in batch.procs], time.monotonic()
                    pss = [tree_pss(p.pid) for p in batch.procs]
                    cpu = 100 * (sum(cpu1) - sum(cpu0)) / (t1 - t0) / n
            finally:
                errors += batch.stop()
            error = "; ".join(errors) if errors else None
            if error is None and "memory" in want and any(p["total"] == 0 for p in pss):
                error = "a container's process tree was gone before it was measured"
            wall_text = "FAILED" if wall is None else fmt_value(Kind.TIME, wall)
            mib = sum(p["total"] for p in pss) / 1024
            log(f"[density/memory {tag}] N={n} {runtime}: all first lines after {wall_text}"
                + (f", PSS total {sig(mib)} MiB" if pss else "")
                + (f" ({error})" if error else ""))
            if not counted:
                continue
            if runtime == "runm":
                den.measures[f"runm{n}"].add(wall, error)
                for t in batch.ready_times():
                    den.measures[f"each{n}"].add(t)
                mem.measures[f"pc{n}"].add(mib / n if pss and not error else None, error)
                mem.measures[f"total{n}"].add(mib if pss and not error else None, error)
                mem.measures[f"cpu{n}"].add(cpu if not error else None, error)
                if pss and not error:
                    parts.setdefault(n, []).extend(pss)
            else:
                den.measures[f"runc{n}"].add(wall, error)
                mem.measures[f"runc{n}"].add(mib / n if pss and not error else None, error)
    if "memory" in want:
        pooled_memory(h, cfg, mem, log)
    mem.data["per_container_kb"] = {str(k): v for k, v in parts.items()}
    for n, trees in parts.items():
        mem.notes.append(f"{n} at once, per container (median): " + breakdown(trees))
    mem.notes.append(f"container: sh -c \"{IDLE_SCRIPT}\"; PSS = sum of Pss in "
                     "/proc/PID/smaps_rollup over the runm pid and its descendants "
                     "(native: runc run and its container)")
    den.notes.append("ratio to N=1: 1 = perfectly parallel, N = no better than one at a time")
    if cfg.accel == "tcg" and cfg.cores and max(cfg.density) > cfg.cores:
        note = (f"TCG on {cfg.cores} cores: more than {cfg.cores} VMs booting at once are "
                "CPU-bound, so N=8 (default 1,4,8) takes minutes here; pick N with --density")
        den.notes.append(note)
        mem.notes.append(note)
    den.notes.append(f"sets of N: {','.join(map(str, cfg.density))} (--density)")
    return [f for f in (mem, den) if f.key in want]


def breakdown(trees: list[dict[str, int]]) -> str:
    """'qemu 323 MiB (anon 147, file 68, shmem 115) | runm 20 MiB | ... (4 processes)'."""
    def med(key: str) -> float:
        return statistics.median([t.get(key, 0) for t in trees]) / 1024

    keys = {k for t in trees for k in t}
    parts = []
    for name in components({k: round(med(k) * 1024) for k in keys}):
        kinds = [f"{kind} {sig(med(f'{name}.{kind}'))}" for kind in ("anon", "file", "shmem")
                 if f"{name}.{kind}" in keys and med(f"{name}.{kind}") >= 0.05]
        parts.append(f"{name} {sig(med(name))} MiB" + (f" ({', '.join(kinds)})" if kinds else ""))
    processes = statistics.median([t.get("processes", 0) for t in trees])
    return " | ".join(parts) + f" ({processes:g} processes)"


# -- 5. exec latency ----------------------------------------------------------------------


def exec_latency(h: Harness, cfg: Config, log: Log = stderr_log) -> Figure:
    fig = Figure("exec", "Exec latency: `exec ID true` into a running idle container, spawn "
                         "to exit, wall clock")
    runm = fig.measure("runm", "runm exec true", Kind.TIME)
    runc = fig.measure("runc", "native runc exec true", Kind.TIME, short="native runc exec")
    state = fig.measure("state", "runm state (CLI round trip: interpreter, imports, state "
                                 "file; no guest)", Kind.TIME, short="runm state")
    detach = fig.measure("detach", "runm run -d (VM boot to container running; once)",
                         Kind.TIME)
    fig.lines.append(Line("runm", ["runc", "state"], ["detach"]))
    bundle = h.bundle("sleeper", ["sleep", "3600"])
    rid, nid = h.new_id("exec"), h.new_id("exec-runc")
    h.track(runm_id=rid, runc_id=nid)
    try:
        started = h.timed(h.runm_cli("run", "-d", "--bundle", str(bundle), rid), rid)
        detach.add(started.wall, started.error)
        native = h.timed(h.runc_cli("run", "-d", "--bundle", str(bundle), nid), nid)
        log(f"[exec] runm run -d {_brief(started, fmt_value(Kind.TIME, started.wall))} | "
            f"runc run -d {_brief(native, fmt_value(Kind.TIME, native.wall))}")
        skipped = RunResult(error="not run: `run -d` failed")
        for counted, tag in cfg.rounds():
            r = h.timed(h.runm_cli("exec", rid, "true"), h.new_id("exec-x")) if started.ok \
                else skipped
            st = h.timed(h.runm_cli("state", rid), h.new_id("exec-state")) if started.ok \
                else skipped
            n = h.timed(h.runc_cli("exec", nid, "true"), h.new_id("exec-runc-x")) \
                if native.ok else skipped
            log(f"[exec {tag}] runm exec {_brief(r, fmt_value(Kind.TIME, r.wall))} | runm "
                f"state {_brief(st, fmt_value(Kind.TIME, st.wall))} | runc exec "
                f"{_brief(n, fmt_value(Kind.TIME, n.wall))}")
            if counted:
                runm.add(r.wall, r.error)
                state.add(st.wall, st.error)
                runc.add(n.wall, n.error)
    finally:
        stop = h.timed(h.runm_cli("delete", "--force", rid), h.new_id("exec-delete"))
        h.timed(h.runc_cli("delete", "-f", nid), h.new_id("exec-runc-delete"))
        fig.data["runm_delete_force_s"] = stop.wall
    fig.notes.append(f"container: {' '.join(['sleep', '3600'])}, started with `run -d`; "
                     f"`runm delete --force` afterwards took {fmt_value(Kind.TIME, stop.wall)}")
    return fig


# -- 6. rootfs read throughput ----------------------------------------------------------


def drop_host_cache(path: os.PathLike[str] | str) -> None:
    """Evict one file's clean pages from the host's page cache (not the whole cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_random(path: os.PathLike[str] | str, nbytes: int) -> None:
    with open(path, "wb") as f:
        left = nbytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def fs_read(h: Harness, cfg: Config, log: Log = stderr_log) -> Figure:
    size = cfg.size_mib << 20
    fig = Figure("fs", f"Shared-directory throughput (the rootfs; bind mounts are shared the "
                       f"same way): `dd` of {cfg.size_mib} MiB via `exec`, wall clock from "
                       "spawn to exit")
    for c in ("cold", "warm"):
        what = ("first read, host page cache of the file dropped" if c == "cold"
                else "second read of the same file")
        fig.measure(f"{c}_runm", f"{c} ({what}): runm exec (virtiofs in the VM)", Kind.RATE,
                    short="virtiofs")
        fig.measure(f"{c}_runm9p", f"{c}: runm exec (9p: a VM from the warm pool)", Kind.RATE)
        fig.measure(f"{c}_runc", f"{c}: native runc exec", Kind.RATE, short="native runc exec")
        fig.measure(f"{c}_host", f"{c}: host dd", Kind.RATE, short="host dd")
        fig.measure(f"{c}_net", f"{c}: runm exec minus this round's `runm exec true` (the "
                                "fixed exec overhead)", Kind.RATE)
        fig.lines.append(Line(f"{c}_runm", [f"{c}_runc", f"{c}_host"], [f"{c}_net"]))
        fig.lines.append(Line(f"{c}_runm9p", [f"{c}_runm", f"{c}_runc"]))
    fig.measure("write_runm", "write to a bind mount (dd if=/dev/zero of=/data/FILE bs=1M "
                              "conv=fsync, a new file each round): runm exec (virtiofs in the "
                              "VM)", Kind.RATE, short="virtiofs")
    fig.measure("write_runm9p", "write: runm exec (9p: a VM from the warm pool)", Kind.RATE)
    fig.measure("write_runc", "write: native runc exec", Kind.RATE, short="native runc exec")
    fig.measure("write_host", "write: host dd", Kind.RATE, short="host dd")
    fig.lines.append(Line("write_runm", ["write_runc", "write_host"]))
    fig.lines.append(Line("write_runm9p", ["write_runm", "write_runc"]))
    true_runm = fig.measure("true_runm", "runm exec true (fixed overhead, as in figure 5)",
                            Kind.TIME)
    true_runc = fig.measure("true_runc", "native runc exec true", Kind.TIME)
    data = h.work / "fs-data"
    data.mkdir(exist_ok=True)
    bundle = h.bundle(f"fs-{size}", ["sleep", "3600"], binds={"/data": data})
    rootfs = bundle / "rootfs"
    rounds = cfg.rounds()
    # one fresh file per round: the guest's page cache of earlier rounds' files stays
    names = [f"big{i}" for i in range(len(rounds))]
    for name in names:
        if not (rootfs / name).exists():
            write_random(rootfs / name, size)
    rid, nid, pid9 = h.new_id("fs"), h.new_id("fs-runc"), h.new_id("fs-9p")
    h.track(runm_id=rid, runc_id=nid)
    h.track(runm_id=pid9)
    try:
        started = h.timed(h.runm_cli("run", "-d", "--bundle", str(bundle), rid), rid)
        native = h.timed(h.runc_cli("run", "-d", "--bundle", str(bundle), nid), nid)
        pooled = _pooled_run_d(h, bundle, pid9)
        log(f"[fs] runm run -d {_brief(started, fmt_value(Kind.TIME, started.wall))} | "
            f"runc run -d {_brief(native, fmt_value(Kind.TIME, native.wall))} | "
            f"runm run -d from the pool {_brief(pooled, fmt_value(Kind.TIME, pooled.wall))}")
        skipped = RunResult(error="not run: `run -d` failed")
        argvs = {"runm": (h.runm_cli("exec", rid), started.ok),
                 "runm9p": (h.runm_cli("exec", pid9), pooled.ok),
                 "runc": (h.runc_cli("exec", nid), native.ok)}

        def run(who: str, argv: list[str]) -> RunResult:
            if who == "host":  # dd if=/NAME or dd if=/dev/zero of=/data/NAME: the host paths
                return h.timed(["dd", *(host_path(a) for a in argv[1:])], h.new_id("fs-host"))
            prefix, ok = argvs[who]
            return h.timed([*prefix, *argv], h.new_id(f"fs-{who}-x")) if ok else skipped

        def host_path(arg: str) -> str:
            key, sep, path = arg.partition("=/")
            if not sep or path.startswith("dev/"):
                return arg
            if path.startswith("data/"):
                return f"{key}={data / path[5:]}"
            return f"{key}={rootfs / path}"

        for (counted, tag), name in zip(rounds, names, strict=True):
            dd = ["dd", f"if=/{name}", "of=/dev/null", "bs=1M"]
            got: dict[str, RunResult] = {}
            for who in ("runm", "runm9p", "runc", "host"):
                drop_host_cache(rootfs / name)
                got[f"cold_{who}"] = run(who, dd)
                got[f"warm_{who}"] = run(who, dd)
                written = f"w-{who}-{name}"
                got[f"write_{who}"] = run(who, ["dd", "if=/dev/zero", f"of=/data/{written}",
                                                "bs=1M", f"count={cfg.size_mib}", "conv=fsync"])
                if got[f"write_{who}"].ok and (data / written).stat().st_size != size:
                    got[f"write_{who}"].error = "the written file has the wrong size on the host"
                with contextlib.suppress(OSError):
                    (data / written).unlink()
            t_runm = run("runm", ["true"])
            t_runc = run("runc", ["true"])
            log(f"[fs {tag}] " + " | ".join(
                f"{k} {_brief(r, rate(size, r.wall))}" for k, r in got.items())
                + f" | exec true: runm {_brief(t_runm, fmt_value(Kind.TIME, t_runm.wall))}")
            if not counted:
                continue
            for key, res in got.items():
                fig.measures[key].add(size / res.wall / 1e6 if res.ok else None, res.error)
            true_runm.add(t_runm.wall, t_runm.error)
            true_runc.add(t_runc.wall, t_runc.error)
            for c in ("cold", "warm"):
                r = got[f"{c}_runm"]
                net = r.wall - t_runm.wall
                if r.ok and t_runm.ok and net <= 0:
                    continue  # overhead noise exceeded the read: no net figure this round
                fig.measures[f"{c}_net"].add(
                    size / net / 1e6 if r.ok and t_runm.ok else None, r.error or t_runm.error)
    finally:
        h.timed(h.runm_cli("delete", "--force", rid), h.new_id("fs-delete"))
        h.timed(h.runm_cli("delete", "--force", pid9), h.new_id("fs-delete"))
        h.timed(h.runc_cli("delete", "-f", nid), h.new_id("fs-runc-delete"))
        for name in names:
            with contextlib.suppress(OSError):
                (rootfs / name).unlink()
    fig.notes.append("one container per runtime (`run -d`, sleep 3600) for all rounds, a fresh "
                     "file per round; before each cold read the file's pages are dropped from "
                     "the host page cache (posix_fadvise DONTNEED), the guest's cache of it is "
                     "empty (never read in that VM before)")
    fig.notes.append("MB/s = 10^6 bytes over the exec's whole wall clock (for runm: CLI start, "
                     "agent round trip, dd in the guest reading over virtiofs); the `true` "
                     "rows are the same exec doing nothing")
    fig.notes.append("virtiofs: a VM restored from the snapshot with its own copy of the "
                     "guest RAM (every start without a pool); 9p: a VM from the warm pool, a "
                     "page-sharing clone of the snapshot (vhost-user cannot serve it)")
    return fig


def _pooled_run_d(h: Harness, bundle: Path, cid: str) -> RunResult:
    """`runm run -d` of bundle in a VM taken from a pool of 1 (drained after)."""
    fill = h.pool("fill", "1")
    if not fill.ok:
        return RunResult(error=f"pool fill: {fill.error}")
    log_file = h.work / f"{cid}.log"
    res = h.timed(h.runm_cli("--log", str(log_file), "run", "-d", "--bundle", str(bundle),
                             cid), cid)
    drained = h.pool_drain()
    logs = ""  # a detached container's VM is started by its monitor, which has its own log
    for path in (log_file, h.runm_root / cid / "monitor.log"):
        with contextlib.suppress(OSError):
            logs += path.read_text()
    if res.ok and "taken from the pool" not in logs:
        res.error = "not taken from the pool"
    res.error = res.error or drained
    return res


# -- 7. HTTP through a published port -------------------------------------------------------

HTTP_REQUESTS = 200
HTTPD_SCRIPT = ("mkdir -p /tmp/www && head -c 1024 /dev/zero > /tmp/www/index.html && "
                "exec httpd -f -p {port} -h /tmp/www")


def http_rate(port: int, requests: int, ready_timeout: float) -> RunResult:
    """Sequential GETs of a 1 KiB page, a new connection each (busybox httpd closes them):
    requests/s in `wall`'s place (extra["seconds"] is the time they took)."""
    import urllib.request

    url = f"http://127.0.0.1:{port}/index.html"
    deadline = time.monotonic() + ready_timeout
    while True:  # the server's readiness: its first answer
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
            break
        except OSError as err:
            if time.monotonic() > deadline:
                return RunResult(error=f"no answer on port {port}: {err}")
            time.sleep(0.1)
    t0 = time.perf_counter()
    try:
        for _ in range(requests):
            with urllib.request.urlopen(url, timeout=30) as response:
                if len(response.read()) != 1024:
                    return RunResult(error="short reply")
    except OSError as err:
        return RunResult(error=f"request failed: {err}")
    seconds = time.perf_counter() - t0
    return RunResult(wall=requests / seconds, extra={"seconds": seconds})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def net(h: Harness, cfg: Config, log: Log = stderr_log) -> Figure:
    fig = Figure("net", f"HTTP through a published port: {HTTP_REQUESTS} sequential GETs of a "
                        "1 KiB page from busybox httpd, a new connection each")
    runm = fig.measure("runm", "runm: httpd in a container, `-p 127.0.0.1:PORT:80` (QEMU "
                               "user-mode network)", Kind.REQUESTS)
    native = fig.measure("native", "native: the same busybox httpd on the host",
                         Kind.REQUESTS, short="native httpd")
    fig.lines.append(Line("runm", ["native"]))
    rport, nport = free_port(), free_port()
    bundle = h.bundle("httpd", ["sh", "-c", HTTPD_SCRIPT.format(port=80)], writable=True)
    rid = h.new_id("httpd")
    h.track(runm_id=rid)
    server = None
    try:
        started = h.timed(h.runm_cli("run", "-d", "-p", f"127.0.0.1:{rport}:80",
                                     "--bundle", str(bundle), rid), rid)
        www = h.work / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_bytes(bytes(1024))
        server = h.spawn(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{nport}", "-h", str(www)],
                         h.new_id("httpd-native"))
        for counted, tag in cfg.rounds():
            r = http_rate(rport, HTTP_REQUESTS, 120) if started.ok else \
                RunResult(error=f"run -d failed: {started.error}")
            n = http_rate(nport, HTTP_REQUESTS, 30)
            log(f"[net {tag}] runm {_brief(r, f'{sig(r.wall)} req/s')} | native "
                f"{_brief(n, f'{sig(n.wall)} req/s')}")
            if counted:
                runm.add(r.wall if r.ok else None, r.error)
                native.add(n.wall if n.ok else None, n.error)
    finally:
        if server is not None:
            stop_process(server)
        h.timed(h.runm_cli("delete", "--force", rid), h.new_id("httpd-delete"))
    fig.notes.append("client: Python urllib in the bench process, one request at a time; the "
                     "container is started with `run -d` once for all rounds")
    return fig


CONTAINERD_CONFIG = """\
version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{dir}/c.sock"
[ttrpc]
  address = "{dir}/c.sock.ttrpc"
"""


def _script(path: Path, module: str) -> str:
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def shim_start(h: Harness, cfg: Config, log: Log = stderr_log) -> Figure:
    fig = Figure("shim", "containerd 1.6: `ctr run --rm --rootfs DIR ID true`, spawn to exit")
    shim = fig.measure("shim", "runm's shim: --runtime io.containerd.runm.v2", Kind.TIME)
    via_runc_shim = fig.measure("runc_shim", "containerd's runc shim driving the runm CLI "
                                             "(--runc-binary)", Kind.TIME,
                                short="runc shim + runm CLI")
    native = fig.measure("native", "containerd's runc shim and runc", Kind.TIME,
                         short="native runc")
    fig.lines.append(Line("shim", ["native", "runc_shim"]))
    if not shutil.which("containerd") or not shutil.which("ctr"):
        fig.not_measured = "containerd and ctr are not installed (scripts/install.sh --dev)"
        return fig
    directory = Path(tempfile.mkdtemp(prefix="ctrd-", dir=h.work))
    (directory / "bin").mkdir()
    _script(directory / "bin" / "containerd-shim-runm-v2", "runm.shim.entry")
    runm_binary = _script(directory / "bin" / "runm", "runm.cli.entry")
    (directory / "config.toml").write_text(CONTAINERD_CONFIG.format(dir=directory))
    env = dict(h.env, PATH=f"{directory / 'bin'}:{os.environ.get('PATH', '')}")
    rootfs = h.bundle("true", ["true"]) / "rootfs"
    ctr = ["ctr", "--address", str(directory / "c.sock"), "--namespace", "bench"]
    daemon = h.spawn(["containerd", "--config", str(directory / "config.toml")],
                     h.new_id("containerd"), env=env)
    try:
        ready = time.monotonic() + 30
        while h.timed([*ctr, "version"], h.new_id("ctr-version")).rc != 0:
            if time.monotonic() > ready or daemon.poll() is not None:
                fig.not_measured = "containerd did not start"
                return fig
        variants = [(shim, ["--runtime", "io.containerd.runm.v2"]),
                    (via_runc_shim, ["--runc-binary", runm_binary]),
                    (native, [])]
        for counted, tag in cfg.rounds():
            line = []
            for measure, flags in variants:
                cid = h.new_id("ctr")
                r = h.timed([*ctr, "run", "--rm", *flags, "--rootfs", str(rootfs), cid,
                             "/bin/true"], cid)
                line.append(f"{measure.name.split(':')[0]} {_brief(r, f'{r.wall:.2f}s')}")
                if counted:
                    measure.add(r.wall if r.ok else None, r.error)
            log(f"[shim {tag}] " + " | ".join(line))
    finally:
        stop_process(daemon)
    fig.notes.append("a private containerd (no CRI), the busybox rootfs as `--rootfs`; runm "
                     "starts from its snapshot either way")
    return fig


# -- figures that need runm capabilities it does not have yet -----------------------------


def runm_verbs() -> set[str]:
    from runm.cli.main import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def can_exec() -> bool:
    return {"exec", "delete"} <= runm_verbs()


def not_measured(exec_possible: bool = True) -> list[Figure]:
    """Figures runm cannot be measured on yet, each with the reason."""
    out = []
    if not exec_possible:
        out.append(Figure("exec", "Exec latency into a running container",
                          not_measured="needs `runm exec` and detached containers "
                                       "(`runm run --detach`); runm has neither yet"))
        out.append(Figure("fs", "Rootfs read throughput via exec",
                          not_measured="needs `runm exec` and `runm run --detach`"))
    return out
