"""`runm run` in the foreground: a container in its own VM, attached to the caller's stdio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import field
from pathlib import Path

from runm.atomicfile import write_pid_file
from runm.channel.mux import Mux
from runm.errors import RunmError
from runm.guest.image import GuestImage
from runm.net import callernet
from runm.proto import agent as api
from runm.records import record
from runm.sandbox import hoststdio
from runm.sandbox.bundle import Bundle
from runm.sandbox.config import VMSize, load_config
from runm.sandbox.config import vm_size as size_for_spec
from runm.sandbox.rundir import vm_run_dir
from runm.sandbox.sandbox import Sandbox, Timings
from runm.sandbox.state import ContainerRecord, StateStore
from runm.sandbox.tty import RawTerminal, window_size
from runm.ttrpc import TtrpcError
from runm.vm.base import PortForward, Share

log = logging.getLogger("runm.run")

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
STDIN_STREAM, STDOUT_STREAM, STDERR_STREAM = 1, 3, 5


@record
class RunOptions:
    container_id: str
    bundle: Bundle
    store: StateStore
    image: GuestImage
    keep: bool = False
    no_pivot: bool = False
    pid_file: str | None = None
    stdin: int = 0
    stdout: int = 1
    stderr: int = 2
    timings: Timings = field(default_factory=Timings)
    publish: list[PortForward] = field(default_factory=list)


def bundle_shares(bundle: Bundle, first_tag: int = 0,
                  have: frozenset[Path] = frozenset()) -> list[Share]:
    """One virtiofs share per directory the container needs, at its host path; tags
    share<first_tag>, ... (unique in a VM); directories in `have` (shared already) skipped."""
    paths = [path for path in bundle.shared_dirs() if path not in have]
    return [Share(f"share{first_tag + i}", path, str(path)) for i, path in enumerate(paths)]


def bundle_vm_size(bundle: Bundle) -> VMSize:
    """The VM size for this bundle's container (logged: it decides which snapshot is used)."""
    size = size_for_spec(bundle.spec, bundle.annotations, load_config())
    log.info("VM for %s: %s", bundle.path, size.why)
    return size


def copy_outputs(mux: Mux, stdout: int, stderr: int | None) -> list[asyncio.Future[None]]:
    """Copy the container's stdout and stderr streams to the caller's fds, from now on
    (stderr None: a terminal, whose one stream is stdout)."""
    streams = [(STDOUT_STREAM, stdout)] + ([] if stderr is None else [(STDERR_STREAM, stderr)])
    return [hoststdio.copy_stream_to_fd(mux.open(stream), fd) for stream, fd in streams]


async def run_container(opts: RunOptions) -> int:
    """Run the bundle's process in a fresh VM; return its exit status (128+N for signal N)."""
    cid = opts.container_id
    bundle = opts.bundle
    run_dir = vm_run_dir(opts.store.root, cid)
    vm_size = bundle_vm_size(bundle)
    caller_net = callernet.for_container(cid, bundle.path, bundle.spec)
    sandbox = Sandbox.create(cid, opts.image, run_dir, bundle_shares(bundle),
                             memory_mib=vm_size.memory_mib, cpus=vm_size.cpus,
                             publish=opts.publish, caller_net=caller_net)
    loop = asyncio.get_running_loop()
    interrupted: list[int] = []
    started = asyncio.Event()
    agent_ready = False
    pending: set[asyncio.Task[None]] = set()
    main = asyncio.current_task()
    assert main is not None

    def on_signal(signum: int) -> None:
        if not started.is_set():
            interrupted.append(signum)
            main.cancel()
            return
        if sandbox.agent is not None:
            task = loop.create_task(_forward(sandbox, cid, signum))
            pending.add(task)
            task.add_done_callback(pending.discard)

    # Handled from before the state exists (the first await below cancels), so that the
    # `finally` removes the state and the VM; a signal before this kills runm with nothing made.
    for signum in FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    record = ContainerRecord(id=cid, bundle=str(bundle.path), rootfs=str(bundle.rootfs),
                             annotations=bundle.annotations, pid=os.getpid())
    try:
        opts.store.create(record)
    except BaseException:
        for signum in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signum)
        raise
    record.vm = {"run_dir": str(run_dir), "foreground_pid": os.getpid()}

    def running() -> None:
        """The container's process runs: signals go to it now, the pool may refill."""
        started.set()
        sandbox.refill_pool()
        record.status = "running"
        opts.store.save(record)

    terminal = bundle.terminal
    status = 255
    try:
        record.vm["qemu_pid"] = 0
        await sandbox.boot(opts.timings)
        record.vm["qemu_pid"] = sandbox.vm.pid
        opts.store.save(record)
        agent, mux = sandbox.agent, sandbox.mux
        assert agent is not None and mux is not None
        agent_ready = True
        stdio = api.Stdio(stdin=STDIN_STREAM, stdout=STDOUT_STREAM,
                          stderr=0 if terminal else STDERR_STREAM, terminal=terminal)
        # Without a terminal, one `runc run --detach` creates and starts the container (a
        # runc process less); its output streams are open before (the mux keeps what comes
        # first). With one, the pty gets the caller's size between create and start.
        start_now = not terminal
        outputs = [] if terminal else copy_outputs(mux, opts.stdout, opts.stderr)
        try:
            await agent.create_container(cid, str(bundle.path), stdio, no_pivot=opts.no_pivot,
                                         vm_network=sandbox.vm_network, start=start_now)
        except TtrpcError as err:
            raise RunmError(err.message) from None
        opts.timings.mark("runc_run" if start_now else "runc_create")
        if start_now:
            running()
        else:
            record.status = "created"
            opts.store.save(record)
        if opts.pid_file:
            write_pid_file(opts.pid_file, os.getpid())
        with RawTerminal(opts.stdin) if terminal else contextlib.nullcontext():
            if terminal:
                size = window_size(opts.stdin, 0, 1, 2)
                if size:
                    await agent.resize_pty(cid, *size)
                loop.add_signal_handler(signal.SIGWINCH, on_signal, signal.SIGWINCH)
                outputs = copy_outputs(mux, opts.stdout, None)
            hoststdio.copy_fd_to_stream(opts.stdin, mux.open(STDIN_STREAM))
            if not start_now:
                try:
                    await agent.start_container(cid)
                except TtrpcError as err:
                    raise RunmError(err.message) from None
                opts.timings.mark("runc_start")
                running()
            waited = await agent.wait_process(cid)
            status = waited.exit_status
            if waited.oom_kills:
                log.warning("container %s: the OOM killer took %d process(es) (memory limit "
                            "reached)", cid, waited.oom_kills)
            opts.timings.mark("process_run")
            await asyncio.gather(*outputs, return_exceptions=True)
        record.status = "stopped"
        opts.store.save(record)
        return status
    except asyncio.CancelledError:
        if interrupted:
            return 128 + interrupted[0]
        raise
    except TtrpcError as err:
        raise RunmError(err.message) from None
    except ConnectionError as err:
        if sandbox.vm.exited():
            raise RunmError(f"VM exited unexpectedly\n{sandbox.vm.console_tail(10)}") from None
        raise RunmError(f"lost the guest agent: {err}") from None
    finally:
        for signum in (*FORWARDED_SIGNALS, signal.SIGWINCH):
            loop.remove_signal_handler(signum)
        for task in pending:
            task.cancel()
        if agent_ready and opts.keep:
            record.status = "stopped"
            opts.store.save(record)
        await sandbox.close()
        opts.timings.mark("teardown")
        if not opts.keep or not agent_ready:
            opts.store.remove(cid)
        _dump_timings(opts.timings)


async def _forward(sandbox: Sandbox, cid: str, signum: int) -> None:
    assert sandbox.agent is not None
    try:
        if signum == signal.SIGWINCH:
            size = window_size(0, 1, 2)
            if size:
                await sandbox.agent.resize_pty(cid, *size)
            return
        await sandbox.agent.signal_process(cid, signum)
    except (TtrpcError, ConnectionError) as err:
        log.debug("forwarding signal %d: %s", signum, err)


def _dump_timings(timings: Timings) -> None:
    path = os.environ.get("RUNM_TIMINGS")
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "a") as f:
        f.write(json.dumps(timings.phases) + "\n")
