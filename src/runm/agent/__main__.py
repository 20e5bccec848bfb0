"""The runm guest agent: PID 1 of the guest, serving the agent API over virtio-serial.

In the guest: `python3 -I -m runm.agent` (started by the initramfs after switch_root).
On a host, for tests: `python3 -m runm.agent --ctl-fd N --io-fd M --state-dir D --runc-root R`
serves one connection on each of two already-connected sockets with the host's runc.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # The agent uses no TLS and no compression: asyncio and shutil import these only if they
    # can, and leaving their C extensions (with libssl, libcrypto, libbz2, liblzma) unloaded
    # makes a TCG boot faster and every VM's memory smaller.
    for _unused in ("ssl", "bz2", "lzma"):
        sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import traceback

from runm.agent import sysapi
from runm.agent.reaper import Reaper
from runm.agent.runc import Runc
from runm.agent.service import AgentService
from runm.channel.mux import Mux, MuxStream
from runm.channel.stream import AsyncioByteStream, ByteStream
from runm.ttrpc import Server

log = logging.getLogger("runm.agent")

CTL_PORT = "runm.ctl"
IO_PORT = "runm.io"


class MuxHolder:
    """The current io-port mux; replaced when the host reconnects."""

    def __init__(self) -> None:
        self.mux: Mux | None = None

    def open(self, stream_id: int) -> MuxStream:
        if self.mux is None:
            raise ConnectionResetError("stdio channel is not connected")
        return self.mux.open(stream_id)


async def serve_ctl(server: Server, stream: ByteStream) -> None:
    await server.serve(stream)


async def serve_io(holder: MuxHolder, stream: ByteStream) -> None:
    async with Mux(stream) as mux:
        holder.mux = mux
        await mux.wait_closed()


async def run_guest(debug: bool) -> None:
    from runm.agent.port import VirtioPort, find_port

    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install(loop)
    holder = MuxHolder()
    service = AgentService(reaper, Runc(reaper, binary=_runc_binary()), streams=holder,
                           pid1=os.getpid() == 1)
    server = Server()
    service.register(server)
    paths = {name: find_port(name) for name in (CTL_PORT, IO_PORT)}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise RuntimeError(f"virtio-serial port(s) {', '.join(missing)} not found")
    ctl = VirtioPort.open(paths[CTL_PORT])  # type: ignore[arg-type]
    io = VirtioPort.open(paths[IO_PORT])  # type: ignore[arg-type]

    def on_sigio() -> None:
        ctl.notify()
        io.notify()

    loop.add_signal_handler(signal.SIGIO, on_sigio)

    async def ctl_loop() -> None:
        while True:
            await ctl.wait_connected()
            await server.serve(ctl)
            service.connection_ended()

    async def io_loop() -> None:
        while True:
            await io.wait_connected()
            await serve_io(holder, io)
            holder.mux = None

    tasks = [asyncio.ensure_future(ctl_loop()), asyncio.ensure_future(io_loop())]
    try:
        await service.shutdown_requested.wait()
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)


def _runc_binary() -> str:
    """runc, run from a sealed in-memory copy held by this process (see sysapi.sealed_copy)."""
    path = shutil.which("runc")
    if path is None:
        raise RuntimeError("runc is not installed in the guest image")
    try:
        fd = sysapi.sealed_copy(path)
    except OSError as err:
        log.warning("running runc from %s: no sealed copy: %s", path, err)
        return path
    return f"/proc/{os.getpid()}/fd/{fd}"


async def run_host(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sysapi.prctl(sysapi.PR_SET_CHILD_SUBREAPER, 1)
    reaper = Reaper()
    reaper.install(loop)
    holder = MuxHolder()
    runc = Runc(reaper, binary=args.runc, root=args.runc_root, state_dir=args.state_dir)
    service = AgentService(reaper, runc, streams=holder)
    server = Server()
    service.register(server)
    ctl_sock = socket.socket(fileno=args.ctl_fd)
    io_sock = socket.socket(fileno=args.io_fd)
    ctl = AsyncioByteStream(*await asyncio.open_connection(sock=ctl_sock, limit=1 << 22))
    io = AsyncioByteStream(*await asyncio.open_connection(sock=io_sock, limit=1 << 22))
    io_task = asyncio.ensure_future(serve_io(holder, io))
    ctl_task = asyncio.ensure_future(serve_ctl(server, ctl))
    ctl_task.add_done_callback(lambda _: service.connection_ended())
    shutdown = asyncio.ensure_future(service.shutdown_requested.wait())
    try:
        await asyncio.wait({ctl_task, shutdown}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (io_task, ctl_task, shutdown):
            task.cancel()
        await asyncio.gather(io_task, ctl_task, shutdown, return_exceptions=True)
        await ctl.aclose()
        await io.aclose()
        reaper.uninstall()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runm-agent")
    parser.add_argument("--ctl-fd", type=int)
    parser.add_argument("--io-fd", type=int)
    parser.add_argument("--runc", default="runc")
    parser.add_argument("--runc-root", default="/run/runc")
    parser.add_argument("--state-dir", default="/run/runm")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    debug = args.debug or "runm.debug" in _cmdline()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="runm-agent: %(levelname)s %(message)s", stream=sys.stderr)
    if args.ctl_fd is not None:
        asyncio.run(run_host(args))
        return 0
    pid1 = os.getpid() == 1
    try:
        if pid1:
            from runm.agent.pid1 import setup_system

            setup_system()
        asyncio.run(run_guest(debug))
    except BaseException:  # PID 1 must never just exit: the kernel would panic.
        traceback.print_exc()
        if not pid1:
            return 1
    if pid1:
        sysapi.power_off()
    return 0


def _cmdline() -> list[str]:
    try:
        with open("/proc/cmdline") as f:
            return f.read().split()
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
