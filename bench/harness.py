"""Running things to measure: `runm run`, native `runc run`, a bare VM, host pipes.

Every process started here is tracked, and :meth:`Harness.close` leaves nothing behind: live
processes are stopped (SIGTERM, then SIGKILL), native runc containers are force-deleted, VM
run directories of killed runm processes are removed, and any process still below the
bench's own pid is killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import SRC
from bench.procs import cmdline, descendants, kill_pids, snapshot

CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
# what the installed `runm` script runs (its entry point keeps ssl unloaded), from SRC
RUNM = (sys.executable, "-m", "runm.cli.entry")


@dataclass
class RunResult:
    wall: float = 0.0  # seconds from just before spawning to the process's exit
    rc: int | None = None
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # RUNM_TIMINGS of this run
    nbytes: int = 0
    stream: float | None = None  # first to last byte, as seen on the host
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class Harness:
    def __init__(self, work: Path, data_dir: Path, image: Any, src: Path = SRC,
                 timeout: float = 600.0, boot_timeout: float = 300.0) -> None:
        self.work = work
        self.image = image
        self.timeout = timeout
        self.runm_root = work / "runm-root"
        self.runc_root = work / "runc-root"
        self.logs = work / "logs"
        for d in (self.runm_root, self.runc_root, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
        env["RUNM_DATA_DIR"] = str(data_dir)
        env["RUNM_AUTO_BUILD"] = "0"  # the bench found or built the image up front
        env.setdefault("RUNM_BOOT_TIMEOUT", str(int(boot_timeout)))
        env.pop("RUNM_TIMINGS", None)
        self.env = env
        self._seq = 0
        self._live: set[subprocess.Popen[bytes]] = set()
        self._runm_ids: list[str] = []
        self._runc_ids: list[str] = []
        self._bundles: dict[str, Path] = {}

    # -- naming and argv ---------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        self._seq += 1
        return f"bench-{prefix}-{os.getpid()}-{self._seq}"

    def bundle(self, name: str, args: list[str], *, writable: bool = False,
               binds: dict[str, Path] | None = None) -> Path:
        """A busybox bundle running args (built once per name); writable: a read-write
        rootfs; binds: container path -> host directory, bind-mounted read-write."""
        from runm.sandbox.spec import make_busybox_bundle

        if name not in self._bundles:
            path = make_busybox_bundle(self.work / "bundles" / name, args)
            config = json.loads((path / "config.json").read_text())
            config["root"]["readonly"] = not writable
            for target, source in (binds or {}).items():
                config["mounts"].append({"destination": target, "type": "bind",
                                         "source": str(source), "options": ["rbind", "rw"]})
            (path / "config.json").write_text(json.dumps(config))
            self._bundles[name] = path
        return self._bundles[name]

    def runm_argv(self, bundle: Path, cid: str) -> list[str]:
        self._runm_ids.append(cid)
        return [*RUNM, "--root", str(self.runm_root), "run",
                "--bundle", str(bundle), cid]

    def runc_argv(self, bundle: Path, cid: str) -> list[str]:
        self._runc_ids.append(cid)
        return ["runc", "--root", str(self.runc_root), "run", "--bundle", str(bundle), cid]

    def runm_cli(self, *args: str) -> list[str]:
        """Any runm verb against the bench's --root (`run` ids: use runm_argv or track())."""
        return [*RUNM, "--root", str(self.runm_root), *args]

    def runc_cli(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.runc_root), *args]

    def track(self, runm_id: str | None = None, runc_id: str | None = None) -> None:
        """Remember a container id so that close() removes it if it is still there."""
        if runm_id:
            self._runm_ids.append(runm_id)
        if runc_id:
            self._runc_ids.append(runc_id)

    # -- processes ---------------------------------------------------------------------

    def spawn(self, argv: Sequence[str], name: str, *, stdin: int | None = subprocess.DEVNULL,
              stdout: int | None = subprocess.DEVNULL,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.err", "wb") as err:
            proc = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=err,
                                    env=env or self.env)
        self._live.add(proc)
        return proc

    def _reaped(self, proc: subprocess.Popen[bytes]) -> None:
        self._live.discard(proc)

    def stderr_tail(self, name: str, lines: int = 3) -> str:
        try:
            text = (self.logs / f"{name}.err").read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def _failure(self, name: str, rc: int | None, what: str = "") -> str:
        tail = self.stderr_tail(name)
        why = what or f"exit status {rc}"
        return f"{why}" + (f": {tail}" if tail else "")

    def _finish(self, proc: subprocess.Popen[bytes], timeout: float) -> int | None:
        """Wait for proc; stop it if it outlives timeout. None if it had to be stopped."""
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            return None
        finally:
            self._reaped(proc)

    def _timings_env(self, name: str) -> tuple[dict[str, str], Path]:
        path = self.logs / f"{name}.timings"
        env = dict(self.env)
        env["RUNM_TIMINGS"] = str(path)
        return env, path

    @staticmethod
    def _read_timings(path: Path) -> dict[str, float]:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return {}
        if not lines:
            return {}
        data = json.loads(lines[-1])
        return {str(k): float(v) for k, v in data.items()}

    # -- one-shot runs -----------------------------------------------------------------

    def timed(self, argv: Sequence[str], name: str, timings: bool = False,
              snapshot: bool = True) -> RunResult:
        """Wall clock of one process with stdin and stdout on /dev/null (snapshot=False:
        runm boots its VM cold)."""
        env, tpath = self._timings_env(name) if timings else (dict(self.env), None)
        if not snapshot:
            env["RUNM_SNAPSHOT"] = "0"
        t0 = time.perf_counter()
        proc = self.spawn(argv, name, env=env)
        rc = self._finish(proc, self.timeout)
        wall = time.perf_counter() - t0
        res = RunResult(wall=wall, rc=rc)
        if rc != 0:
            res.error = self._failure(name, rc, "" if rc is not None else "timed out")
        if tpath is not None:
            res.phases = self._read_timings(tpath)
        return res

    def pump_out(self, argv: Sequence[str], name: str, nbytes: int,
                 timings: bool = False) -> RunResult:
        """Run a process that writes nbytes to stdout; read and discard them."""
        env, tpath = self._timings_env(name) if timings else (self.env, None)
        t0 = time.perf_counter()
        proc = self.spawn(argv, name, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        watchdog = threading.Timer(self.timeout, stop_process, (proc,))
        watchdog.start()
        got, first, last = 0, 0.0, 0.0
        fd = proc.stdout.fileno()
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                last = time.perf_counter()
                if not got:
                    first = last
                got += len(data)
            proc.stdout.close()
            rc = self._finish(proc, self.timeout)
        finally:
            watchdog.cancel()
        res = RunResult(wall=time.perf_counter() - t0, rc=rc, nbytes=got)
        if got > 0:
            res.stream = last - first
        if rc != 0:
            res.error = self._failure(name, rc)
        elif got != nbytes:
            res.error = self._failure(name, rc, f"short output: {got} of {nbytes} bytes")
        if tpath is not None:
            res.phases = self._read_timings(tpath)
        return res

    def pump_in(self, argv: Sequence[str], name: str, nbytes: int,
                timings: bool = False) -> RunResult:
        """Run a process that reads stdin to EOF; feed it nbytes of zeros."""
        env, tpath = self._timings_env(name) if timings else (self.env, None)
        t0 = time.perf_counter()
        proc = self.spawn(argv, name, stdin=subprocess.PIPE, env=env)
        assert proc.stdin is not None
        watchdog = threading.Timer(self.timeout, stop_process, (proc,))
        watchdog.start()
        sent, first, last = 0, 0.0, 0.0
        error: str | None = None
        fd = proc.stdin.fileno()
        try:
            try:
                while sent < nbytes:
                    view = memoryview(ZEROS)[: min(CHUNK, nbytes - sent)]
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        sent += n
                        last = time.perf_counter()
                        if not first:
                            first = last
            except OSError as err:  # EPIPE: the reader is gone
                error = f"stdin closed after {sent} of {nbytes} bytes ({err.strerror})"
            with contextlib.suppress(OSError):
                proc.stdin.close()
            rc = self._finish(proc, self.timeout)
        finally:
            watchdog.cancel()
        res = RunResult(wall=time.perf_counter() - t0, rc=rc, nbytes=sent)
        if sent > 0:
            res.stream = last - first
        if rc != 0 or error:
            res.error = self._failure(name, rc, error or "")
        if tpath is not None:
            res.phases = self._read_timings(tpath)
        return res

    def bare_vm(self, name: str, snapshot: bool = False) -> RunResult:
        """A VM of the guest image with no shares, booted (or restored from its snapshot)
        to agent-ready, then closed."""
        return asyncio.run(self._bare_vm(name, snapshot))

    async def _bare_vm(self, name: str, snapshot: bool) -> RunResult:
        from runm.errors import RunmError
        from runm.sandbox.rundir import vm_run_dir
        from runm.sandbox.sandbox import Sandbox, Timings

        self._runm_ids.append(name)
        timings = Timings()
        t0 = time.perf_counter()
        sandbox = Sandbox.create(name, self.image, vm_run_dir(self.runm_root, name), shares=[])
        res = RunResult()
        try:
            with _env("RUNM_SNAPSHOT", "1" if snapshot else "0"):
                await sandbox.boot(timings)
            res.wall = time.perf_counter() - t0
            if snapshot and not sandbox.restored:
                res.error = "not restored from the snapshot (see the log)"
        except (RunmError, OSError) as err:
            res.error = str(err).splitlines()[0]
        finally:
            t1 = time.perf_counter()
            await sandbox.close()
            res.extra["close"] = time.perf_counter() - t1
        res.phases = dict(timings.phases)
        return res

    def runc_in_guest(self, name: str, bundle: Path) -> RunResult:
        """`runc run` of bundle inside a restored guest, twice: wall is the second run (the
        floor a pre-warmed guest could reach), extra["first"] the first (cold TCG cache)."""
        return asyncio.run(self._runc_in_guest(name, bundle))

    async def _runc_in_guest(self, name: str, bundle: Path) -> RunResult:
        from runm.errors import RunmError
        from runm.proto import agent as api
        from runm.sandbox.bundle import load_bundle
        from runm.sandbox.run import bundle_shares
        from runm.sandbox.rundir import vm_run_dir
        from runm.sandbox.sandbox import Sandbox
        from runm.ttrpc import TtrpcError

        self._runm_ids.append(name)
        shares = bundle_shares(load_bundle(bundle))
        sandbox = Sandbox.create(name, self.image, vm_run_dir(self.runm_root, name), shares)
        res = RunResult()
        try:
            with _env("RUNM_SNAPSHOT", "1"):
                await sandbox.boot()
            agent = sandbox.agent
            assert agent is not None
            walls = []
            for i in range(2):
                t0 = time.perf_counter()
                cid = f"{name}-{i}"
                # `runc run --detach`, as `runm run` has the guest do
                await agent.create_container(cid, str(bundle), api.Stdio(), start=True)
                status = (await agent.wait_process(cid)).exit_status
                await agent.delete_container(cid)
                walls.append(time.perf_counter() - t0)
                if status != 0:
                    res.error = f"exit status {status}"
            res.extra["first"], res.wall = walls
        except (RunmError, TtrpcError, OSError) as err:
            res.error = str(err).splitlines()[0]
        finally:
            await sandbox.close()
        return res

    # -- the warm pool ------------------------------------------------------------------

    def pool(self, *args: str) -> RunResult:
        """`runm pool ARGS` (fill waits until the pool is full)."""
        return self.timed(self.runm_cli("pool", *args), self.new_id("pool"))

    def pool_members(self) -> list[Any]:
        from runm.sandbox import pool
        from runm.sandbox.rundir import run_base

        return pool.members(run_base())

    def pool_drain(self, timeout: float = 60.0) -> str | None:
        """Turn the pool off, stop its members and wait until they are gone."""
        self.pool("drain")
        deadline = time.monotonic() + timeout
        while self.pool_members():
            if time.monotonic() > deadline:
                return "pool members still there after drain"
            time.sleep(0.1)  # keepers exit on SIGTERM; there is no other signal to wait on
        return None

    # -- concurrent long-running containers ----------------------------------------------

    def batch(self, argvs: list[tuple[str, list[str]]]) -> Batch:
        return Batch(self, argvs)

    # -- cleanup -------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop and remove everything the bench started; return what had to be cleaned."""
        from runm.sandbox.rundir import vm_run_dir

        cleaned: list[str] = []
        if self.pool_members():
            cleaned.append("drained the warm pool")
            self.pool_drain()
        for proc in list(self._live):
            if proc.poll() is None:
                cleaned.append(f"stopped leftover pid {proc.pid}")
                stop_process(proc)
            self._live.discard(proc)
        for cid in self._runc_ids:
            if (self.runc_root / cid).exists():
                subprocess.run(["runc", "--root", str(self.runc_root), "delete", "-f", cid],
                               capture_output=True, timeout=60, check=False)
                cleaned.append(f"deleted runc container {cid}")
        for cid in self._runm_ids:
            if (self.runm_root / cid).exists():  # detached (or kept) container: its VM too
                subprocess.run(self.runm_cli("delete", "--force", cid), env=self.env,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                               check=False)
                cleaned.append(f"force-deleted runm container {cid}")
            run_dir = vm_run_dir(self.runm_root, cid)
            if run_dir.exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                cleaned.append(f"removed VM run dir of {cid}")
        procs = snapshot()
        leftovers = descendants(os.getpid(), procs)
        # detached containers' monitors are re-parented away from us: find them (and their
        # QEMU and virtiofsd) by the bench's unique work dir in their command lines
        leftovers += [pid for pid in procs
                      if pid not in leftovers and str(self.work) in cmdline(pid)]
        if leftovers:
            cleaned.append(f"killed leftover descendants {leftovers}")
            kill_pids(leftovers)
        for d in (self.runm_root, self.runc_root, self.logs, self.work / "bundles"):
            shutil.rmtree(d, ignore_errors=True)
        return cleaned


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def stop_process(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM (runm forwards it and tears its VM down), then SIGKILL after grace."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class Batch:
    """Containers started together that print a first line, then idle until SIGTERM."""

    def __init__(self, harness: Harness, argvs: list[tuple[str, list[str]]]) -> None:
        self.harness = harness
        self._failed: set[int] = set()  # already reported by wait_ready
        self.names = [name for name, _ in argvs]
        n = len(argvs)
        self.ready_at: list[float | None] = [None] * n
        self.first_line: list[bytes] = [b""] * n
        self._events = [threading.Event() for _ in range(n)]
        self._threads: list[threading.Thread] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.t0 = time.perf_counter()
        for i, (name, argv) in enumerate(argvs):
            proc = harness.spawn(argv, name, stdout=subprocess.PIPE)
            self.procs.append(proc)
            assert proc.stdout is not None
            t = threading.Thread(target=self._read, args=(i, proc.stdout), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, i: int, stream: IO[bytes]) -> None:
        line = stream.readline()
        if line:
            self.ready_at[i] = time.perf_counter()
            self.first_line[i] = line
        self._events[i].set()
        with contextlib.suppress(OSError, ValueError):  # drain (and discard) until EOF
            while os.read(stream.fileno(), 65536):
                pass

    def wait_ready(self, timeout: float) -> list[str]:
        """Block until every container printed its first line; return the failures."""
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        for i, event in enumerate(self._events):
            if not event.wait(max(deadline - time.monotonic(), 0)):
                errors.append(f"{self.names[i]}: no first line within {timeout:.0f}s")
            elif self.ready_at[i] is None:
                self.procs[i].wait()
                self._failed.add(i)
                errors.append(f"{self.names[i]}: " + self.harness._failure(
                    self.names[i], self.procs[i].returncode, "exited before its first line"
                    f" (status {self.procs[i].returncode})"))
        return errors

    def ready_times(self) -> list[float]:
        return [t - self.t0 for t in self.ready_at if t is not None]

    def stop(self, grace: float = 60.0) -> list[str]:
        """SIGTERM all (in parallel), wait for them; return non-zero exits."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        errors: list[str] = []
        for i, (name, proc) in enumerate(zip(self.names, self.procs, strict=True)):
            try:
                rc = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                stop_process(proc, grace=5)
                errors.append(f"{name}: did not stop on SIGTERM within {grace:.0f}s")
                rc = proc.returncode
            if rc not in (0, None) and i not in self._failed:
                errors.append(f"{name}: " + self.harness._failure(name, rc))
            self.harness._reaped(proc)
        for t in self._threads:
            t.join(5)
        return errors
