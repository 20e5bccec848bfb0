"""The figures: what is run, in which order, and what is recorded.

Every figure runs `warmup` uncounted rounds, then `repeat` counted ones. Within a round the
subject and its baselines run back to back (interleaved), so slow drift in the host's load
hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.harness import Harness, RunResult
from bench.model import Figure, Line
from bench.procs import components, tree_cpu_seconds, tree_pss
from bench.stats import Kind, fmt_value, median_phases, sig, slowest

Log = Callable[[str], None]
FIGURES = ("cold", "stdio", "memory", "density", "exec")
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
    fig = Figure("cold", "Cold start: `true` in a new container, spawn to exit, wall clock")
    runm = fig.measure("runm", "runm run true", Kind.TIME)
    bare = fig.measure("bare", "bare VM boot to agent-ready", Kind.TIME, short="bare VM boot")
    runc = fig.measure("runc", "native runc run true", Kind.TIME, short="native runc")
    close = fig.measure("bare_close", "bare VM close (agent shutdown, QEMU exit)", Kind.TIME)
    outside = fig.measure("outside", "runm run outside its phases", Kind.TIME)
    fig.lines.append(Line("runm", ["bare", "runc"], ["bare_close", "outside"]))
    bundle = h.bundle("true", ["true"])
    runm_phases: list[dict[str, float]] = []
    bare_phases: list[dict[str, float]] = []
    for counted, tag in cfg.rounds():
        cid = h.new_id("cold")
        r = h.timed(h.runm_argv(bundle, cid), cid, timings=True)
        vid = h.new_id("bare")
        b = h.bare_vm(vid)
        nid = h.new_id("runc")
        n = h.timed(h.runc_argv(bundle, nid), nid)
        log(f"[cold {tag}] runm run {_brief(r, fmt_value(Kind.TIME, r.wall))} | bare VM boot "
            f"{_brief(b, fmt_value(Kind.TIME, b.wall))} | native runc "
            f"{_brief(n, fmt_value(Kind.TIME, n.wall))}")
        if not counted:
            continue
        runm.add(r.wall, r.error)
        bare.add(b.wall, b.error)
        runc.add(n.wall, n.error)
        close.add(b.extra.get("close"), None if "close" in b.extra else "no close time")
        if r.ok and r.phases:
            runm_phases.append(r.phases)
            outside.add(r.wall - sum(r.phases.values()))
        if b.ok and b.phases:
            bare_phases.append(b.phases)
    fig.data["runm_phases"] = runm_phases
    fig.data["bare_phases"] = bare_phases
    fig.notes += phase_notes(runm_phases, runm, "runm run")
    if bare_phases:
        med = median_phases(bare_phases)
        fig.notes.append("bare VM phases (median): " + " | ".join(
            f"{k} {fmt_value(Kind.TIME, v)}" for k, v in med.items()))
    fig.notes.append("bare VM boot: Sandbox.create() to the agent's first answer, in-process "
                     "(no interpreter start, no shares); native runc: host runc, same bundle")
    return fig


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
    host_out = ["head", "-c", str(size), "/dev/zero"]
    host_in = ["sh", "-c", "cat >/dev/null"]
    directions = {
        "out": ("container->host", "head -c N /dev/zero", out_bundle, host_out, h.pump_out),
        "in": ("host->container", "cat >/dev/null", in_bundle, host_in, h.pump_in),
    }
    phases: dict[str, list[dict[str, float]]] = {"out": [], "in": []}
    for d, (label, what, _, _, _) in directions.items():
        fig.measure(f"{d}_runm", f"{label} ({what}): runm run", Kind.RATE)
        fig.measure(f"{d}_runc", f"{label}: native runc run", Kind.RATE, short="native runc")
        fig.measure(f"{d}_pipe", f"{label}: native pipe", Kind.RATE, short="native pipe")
        fig.measure(f"{d}_stream", "runm, first to last byte seen by the host (for "
                                   "reference only: excludes boot and teardown)", Kind.RATE)
        fig.lines.append(Line(f"{d}_runm", [f"{d}_runc", f"{d}_pipe"], [f"{d}_stream"]))
    for counted, tag in cfg.rounds():
        for d, (label, _, bundle, host_argv, pump) in directions.items():
            cid, nid, pid = h.new_id(f"io{d}"), h.new_id(f"io{d}-runc"), h.new_id(f"io{d}-pipe")
            r = pump(h.runm_argv(bundle, cid), cid, size, True)
            n = pump(h.runc_argv(bundle, nid), nid, size, False)
            p = pump(host_argv, pid, size, False)
            log(f"[stdio {tag}] {label}: runm run {_brief(r, rate(size, r.wall))} | native runc "
                f"{_brief(n, rate(size, n.wall))} | pipe {_brief(p, rate(size, p.wall))}")
            if not counted:
                continue
            for key, res in (("runm", r), ("runc", n), ("pipe", p)):
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
    out.append(Figure("sharedfs", "Shared-filesystem read throughput of the rootfs, "
                                  "virtiofs vs 9p",
                      not_measured="runm shares the bundle over virtiofs only; there is no 9p "
                                   "transport to compare with"))
    return out
