"""containerd-shim-runm-v2: the containerd shim v2 for runm (runtime `io.containerd.runm.v2`).

containerd runs it as

    containerd-shim-runm-v2 -namespace NS -address ADDR -publish-binary BIN -id ID start
    containerd-shim-runm-v2 -namespace NS -address ADDR -publish-binary BIN -id ID \\
        -bundle DIR delete

with the bundle as working directory. `start` makes (or finds: tasks of one pod share a
shim) the shim's socket, leaves the long-running server behind in a session of its own,
writes `<bundle>/address` and prints only the address. `delete` cleans up after a task
whose shim is gone and prints a DeleteResponse. `-v` prints the version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import runm
from runm.errors import RunmError
from runm.launch import module_argv
from runm.proto import task as api
from runm.sha import sha256_hex

SOCKET_DIR = Path("/run/containerd/s")
USAGE = """\
usage: containerd-shim-runm-v2 [-namespace NS] [-address ADDR] [-publish-binary BIN]
                               [-id ID] [-bundle DIR] [-debug] [-v] start|delete

The containerd shim v2 of runm: containerd starts it for tasks of the runtime
io.containerd.runm.v2, e.g. `ctr run --runtime io.containerd.runm.v2 IMAGE ID`.
Each task (or each pod: tasks sharing io.kubernetes.cri.sandbox-id) runs in its
own virtual machine. See runm(1) and docs/shim.md.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    # Go's flag package: one or two dashes, `-flag value` or `-flag=value`.
    parser = argparse.ArgumentParser(prog="containerd-shim-runm-v2", usage=USAGE,
                                     add_help=False, allow_abbrev=False)
    for name in ("namespace", "address", "publish-binary", "id", "bundle", "socket",
                 "debug-socket"):
        parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"),
                            default="")
    for name in ("debug", "v", "info", "h", "help"):
        parser.add_argument(f"-{name}", f"--{name}", dest=name, action="store_true")
    parser.add_argument("action", nargs="?", default="")
    return parser.parse_args(argv)


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """containerd's shim.SocketAddress: the same name for the same pod, so `ctr shim` and a
    restarted containerd find the shim."""
    key = os.path.normpath(os.path.join(containerd_address, namespace, group))
    return f"unix://{SOCKET_DIR}/{sha256_hex(key.encode())}"


def _group_of(bundle: Path, task_id: str) -> str:
    from runm.shim.service import SANDBOX_ID_ANNOTATION

    with contextlib.suppress(OSError, ValueError, AttributeError):
        spec = json.loads((bundle / "config.json").read_text())
        group = (spec.get("annotations") or {}).get(SANDBOX_ID_ANNOTATION)
        if group:
            return str(group)
    return task_id


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _listen_or_existing(path: Path) -> socket.socket | None:
    """A listening socket at path, or None if a live shim already listens there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError:
        if _alive(path):
            sock.close()
            return None  # the pod's shim is alive: reuse it
        path.unlink(missing_ok=True)  # a dead shim's socket
        sock.bind(str(path))
    sock.listen(64)
    return sock


def action_start(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle or os.getcwd())
    group = _group_of(bundle, args.id)
    address = socket_address(args.address, args.namespace, group)
    path = Path(address.removeprefix("unix://"))
    sock = _listen_or_existing(path)
    if sock is not None:
        try:
            argv = module_argv("runm.shim.main", "-namespace", args.namespace,
                               "-address", args.address, "-id", group, "-socket-fd",
                               str(sock.fileno()), *(["-debug"] if args.debug else []), "serve")
            subprocess.Popen(argv, cwd=bundle, pass_fds=(sock.fileno(),),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            sock.close()
    (bundle / "address").write_text(address)
    sys.stdout.write(address)
    return 0


def action_delete(args: argparse.Namespace) -> int:
    """Cleanup after a task whose shim went away (or a normal one's last step)."""
    from runm.shim import rootfs
    from runm.shim.service import pod_run_dir

    bundle = Path(args.bundle or os.getcwd())
    asyncio.run(rootfs.unmount(bundle / "rootfs"))
    group = _group_of(bundle, args.id)
    shim = Path(socket_address(args.address, args.namespace, group).removeprefix("unix://"))
    if not _alive(shim):  # its VMs died with it; their run dir may be left
        shutil.rmtree(pod_run_dir(args.namespace, group), ignore_errors=True)
        shim.unlink(missing_ok=True)
    response = api.DeleteResponse(exit_status=137, exited_at=api.Timestamp.now())
    sys.stdout.buffer.write(response.encode())
    return 0


def _open_log(bundle: Path, debug: bool) -> None:
    """Log to the bundle's `log` FIFO, which containerd reads (nowhere if it is not there)."""
    logging.raiseExceptions = False  # a reader gone must not print tracebacks
    handler: logging.Handler
    try:
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        handler = logging.StreamHandler(os.fdopen(fd, "w", buffering=1))
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(
        "time=%(asctime)s level=%(levelname)s msg=%(message)s logger=%(name)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


async def serve(namespace: str, sock: socket.socket) -> int:
    from runm.guest.image import GuestImage, ensure_image
    from runm.shim.events import Publisher
    from runm.shim.service import TaskService
    from runm.ttrpc import Server

    loop = asyncio.get_running_loop()

    async def load_image() -> GuestImage:
        return await loop.run_in_executor(None, ensure_image)

    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), namespace)
    service = TaskService(namespace, publisher, load_image)
    server = Server()
    service.register(server)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.done.set)
    loop.add_signal_handler(signal.SIGPIPE, lambda: None)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from runm.channel.stream import AsyncioByteStream

        await server.serve(AsyncioByteStream(reader, writer))

    listener = await asyncio.start_unix_server(on_connect, sock=sock)
    path = sock.getsockname()
    logging.getLogger("runm.shim").info("shim %d serving on %s", os.getpid(), path)
    try:
        await service.done.wait()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        await service.aclose()
        await publisher.flush(5.0)
        await publisher.aclose()
        await server.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if "-socket-fd" in raw:  # the server, started by `start`
        i = raw.index("-socket-fd")
        fd = int(raw[i + 1])
        args = parse_args(raw[:i] + raw[i + 2:])
        _open_log(Path.cwd(), args.debug)
        sock = socket.socket(fileno=fd)
        return asyncio.run(serve(args.namespace, sock))
    args = parse_args(raw)
    if args.v:
        print(f"containerd-shim-runm-v2:\n  Version:  {runm.__version__}\n"
              f"  Runtime:  io.containerd.runm.v2")
        return 0
    if args.h or args.help or args.action not in ("start", "delete"):
        sys.stderr.write(USAGE)
        return 0 if (args.h or args.help) else 2
    if not args.id or not args.namespace:
        sys.stderr.write("containerd-shim-runm-v2: -id and -namespace are required\n")
        return 2
    try:
        return action_start(args) if args.action == "start" else action_delete(args)
    except (RunmError, OSError) as err:
        sys.stderr.write(f"containerd-shim-runm-v2 {args.action}: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
