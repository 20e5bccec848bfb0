"""`runm`: the runc-compatible command line, plus runm's own verbs (`runm guest build`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import runm
from runm.cli import verbs
from runm.cli.logs import Logging
from runm.cli.progress import Progress
from runm.errors import RunmError

RUNC_COMPAT_VERSION = "1.1.5"
SPEC_VERSION = "1.0.2-dev"

DESCRIPTION = """\
runm runs OCI containers the way runc does, but each container gets its own lightweight
virtual machine (QEMU: KVM where it works, TCG otherwise) with unmodified runc inside.
Callers that drive runc (podman --runtime, containerd's runc shim, dockerd --add-runtime)
can drive runm instead.
"""

EPILOG = """\
environment:
  RUNM_DATA_DIR      guest images and caches (default /var/lib/runm)
  RUNM_ACCEL         force the accelerator (kvm or tcg); default: probe KVM, fall back to TCG
  RUNM_BOOT_TIMEOUT  seconds to wait for the guest agent (default 90)
  RUNM_AUTO_BUILD    0: never build the guest image implicitly (error if it is missing)

exit status: 0 on success, 1 on any error; `run` exits with the container process's
status (128+N when it died of signal N).
"""


def _data_dir() -> Path:
    from runm.guest.image import default_data_dir

    return default_data_dir()


def ensure_guest_image(progress: Progress | None = None) -> object:
    """The current guest image, built on first use unless RUNM_AUTO_BUILD=0."""
    import os

    from runm.guest.image import GuestImageError, ensure_image, find_image

    progress = progress or Progress.for_stderr()
    try:
        if os.environ.get("RUNM_AUTO_BUILD", "1") == "0":
            return find_image(_data_dir())
        image = ensure_image(_data_dir(), progress=progress.step)
        _prepare_snapshot(image, progress)
        return image
    except GuestImageError as err:
        raise RunmError(str(err)) from None
    finally:
        progress.done()


def _prepare_snapshot(image: object, progress: Progress) -> bool:
    """Make the VM snapshot now (with progress shown) rather than inside the first start."""
    from runm.guest.image import GuestImage
    from runm.sandbox.sandbox import prepare_snapshot
    from runm.sandbox.snapshot import snapshots_enabled

    assert isinstance(image, GuestImage)
    if not snapshots_enabled():
        return False
    import asyncio  # not at the top: `state`, `kill` and the like do without it

    return asyncio.run(prepare_snapshot(image, progress.step))


def cmd_run(args: argparse.Namespace) -> int:
    from runm.guest.image import GuestImage
    from runm.net.ports import resolve_publish
    from runm.sandbox.bundle import load_bundle, validate_id
    from runm.sandbox.run import RunOptions, run_container
    from runm.sandbox.state import StateStore

    verbs.refuse_preserved_fds(args)
    validate_id(args.id)
    bundle = load_bundle(args.bundle)
    publish = resolve_publish(args.publish, bundle.annotations)
    image = ensure_guest_image()
    assert isinstance(image, GuestImage)
    if args.detach:
        from runm.sandbox.detached import Container, CreateOptions, create

        store = StateStore(args.root)
        create(CreateOptions(container_id=args.id, bundle=bundle, store=store, image=image,
                             pid_file=args.pid_file, console_socket=args.console_socket,
                             no_pivot=args.no_pivot, publish=publish))
        try:
            Container(store, args.id).start()
        except RunmError:
            Container(store, args.id).delete(force=True)
            raise
        return 0
    opts = RunOptions(container_id=args.id, bundle=bundle, store=StateStore(args.root),
                      image=image, keep=args.keep, no_pivot=args.no_pivot,
                      pid_file=args.pid_file, publish=publish)
    import asyncio

    return asyncio.run(run_container(opts))


def cmd_list(args: argparse.Namespace) -> int:
    from runm.sandbox.detached import Container
    from runm.sandbox.state import StateStore

    store = StateStore(args.root)
    records = []
    if store.root.is_dir():
        for entry in sorted(store.root.iterdir()):
            try:
                container = Container(store, entry.name)
            except RunmError:
                continue
            if container.record.status != "stopped" and not (
                    container.monitor_alive() or container.foreground_alive()):
                container.record.status = "stopped"
            records.append(container.record)
    if args.quiet:
        for record in records:
            print(record.id)
    elif args.format == "json":
        print(json.dumps([r.oci_state() for r in records]))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(r.id, str(r.oci_state()["pid"]), r.status, r.bundle, r.created, r.owner or "root")
                 for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            print("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from runm.sandbox.spec import default_spec, write_spec

    bundle = Path(args.bundle or ".")
    write_spec(bundle, default_spec(rootless=args.rootless), overwrite=False)
    return 0


def cmd_guest_build(args: argparse.Namespace) -> int:
    from runm.guest.image import GuestImageError, build_image

    progress = Progress.for_stderr()
    try:
        image = build_image(_data_dir(), progress=progress.step, force=args.force)
        if not args.no_snapshot:
            _prepare_snapshot(image, progress)
    except GuestImageError as err:
        raise RunmError(str(err)) from None
    finally:
        progress.done()
    print(image.rootfs.parent)
    return 0


def cmd_guest_path(args: argparse.Namespace) -> int:
    from runm.guest.image import GuestImageError, find_image

    try:
        image = find_image(_data_dir())
    except GuestImageError as err:
        raise RunmError(str(err)) from None
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd),
                      "rootfs": str(image.rootfs), "digest": image.digest,
                      "kernel_release": image.kernel_release}, indent=2))
    return 0


def cmd_pool_fill(args: argparse.Namespace) -> int:
    import time

    from runm.sandbox import pool
    from runm.sandbox.config import MIN_MEMORY_MIB, config_path
    from runm.sandbox.rundir import run_base

    if args.size is not None and args.size < 0:
        raise RunmError(f"invalid pool size {args.size}: must be 0 or more")
    if args.memory_mib is not None and args.memory_mib < MIN_MEMORY_MIB:
        raise RunmError(f"invalid --memory-mib {args.memory_mib}: must be {MIN_MEMORY_MIB} "
                        f"or more")
    base = run_base()
    if args.size is None:
        if args.memory_mib is not None:
            raise RunmError("--memory-mib needs a SIZE")
        pool.use_configured_sizes(base)
        sizes = pool.pool_sizes(base)
        if not sizes:
            raise RunmError(f"no pool size given, and the config ({config_path()[0]}) sets "
                            f"none ([pool] size or memory_mib)")
    else:
        sizes = pool.set_pool_size(base, args.size, args.memory_mib)
    if sizes:
        ensure_guest_image()  # and the snapshot: keepers would each try to make it otherwise
    pool.refill(base)
    wanted = sum(sizes.values())
    if args.no_wait or not wanted:
        return 0
    progress = Progress.for_stderr()
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            ready = [m.memory_mib for m in pool.members(base) if m.state == "ready"]
            have = sum(min(count, ready.count(memory)) for memory, count in sizes.items())
            progress.step(f"warming up pooled VMs: {have}/{wanted} ready")
            if have >= wanted:
                return 0
            if time.monotonic() > deadline:
                raise RunmError(f"only {have} of {wanted} pooled VMs ready after "
                                f"{args.timeout:.0f}s (see {base}/pool-*/keeper.log)")
            if not pool.members(base):
                raise RunmError(f"pooled VMs failed to start (keepers exited; is the guest "
                                f"image built?) under {base}")
            time.sleep(0.2)  # polling the members' state files: they have no other signal
    finally:
        progress.done()


def cmd_pool_list(args: argparse.Namespace) -> int:
    from runm.sandbox import pool
    from runm.sandbox.rundir import run_base

    base = run_base()
    members = pool.members(base)
    sizes = pool.pool_sizes(base)
    if args.format == "json":
        print(json.dumps({
            "size": sum(sizes.values()),
            "sizes": {str(memory): count for memory, count in sorted(sizes.items())},
            "members": [{"run_dir": str(m.run_dir), "state": m.state, "snapshot": m.key,
                         "memory_mib": m.memory_mib, "keeper_pid": m.keeper_pid,
                         "qemu_pid": m.qemu_pid} for m in members]}))
        return 0
    per_size = ", ".join(f"{count} x {memory} MiB" for memory, count in sorted(sizes.items()))
    print(f"pool size {sum(sizes.values())}{f' ({per_size})' if per_size else ''}, "
          f"{len(members)} member(s)")
    for m in members:
        print(f"{m.run_dir.name}   {m.state:<8}   {m.memory_mib} MiB   keeper {m.keeper_pid}   "
              f"qemu {m.qemu_pid or '-'}")
    return 0


def cmd_pool_drain(args: argparse.Namespace) -> int:
    from runm.sandbox import pool
    from runm.sandbox.rundir import run_base

    pool.set_pool_size(run_base(), 0)
    pool.drain(run_base())
    return 0


def version_text() -> str:
    return (f"runc version {RUNC_COMPAT_VERSION}\nrunm: {runm.__version__}\n"
            f"spec: {SPEC_VERSION}\npython: {sys.version.split()[0]}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runm", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="runm [global options] command [command options] [arguments...]")
    g = parser.add_argument_group("global options (runc's)")
    g.add_argument("--debug", action="store_true", help="enable debug logging")
    g.add_argument("--log", metavar="FILE", help="write logs to FILE (default: stderr)")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log format: text (default) or json, as runc writes them")
    g.add_argument("--config", metavar="FILE",
                   help="runm's configuration (default /etc/runm/config.toml if it exists; "
                        "also $RUNM_CONFIG): [vm] memory_mib, cpus, overhead_mib, "
                        "max_memory_mib, max_cpus; [snapshot] enabled")
    g.add_argument("--root", metavar="DIR", default="/run/runm",
                   help="directory for container state (default: /run/runm)")
    g.add_argument("--criu", metavar="PATH", help="accepted for runc compatibility; unused")
    g.add_argument("--systemd-cgroup", action="store_true",
                   help="accepted for runc compatibility (cgroups live in the guest)")
    g.add_argument("--rootless", default="auto", help="accepted for runc compatibility")
    g.add_argument("-v", "--version", action="store_true", help="print the version")
    # prog: subcommands' usage reads "runm pool fill ...", not the top-level usage line.
    sub = parser.add_subparsers(dest="command", metavar="command", prog="runm")

    run = sub.add_parser(
        "run", help="create and run a container in its own VM",
        description="Create and run a container in a new VM from the bundle, attached to "
                    "runm's stdin, stdout and stderr. runm exits with the container "
                    "process's exit status; the VM is gone when it returns and the container "
                    "is deleted unless --keep is given.",
        usage="runm run [command options] <container-id>")
    run.add_argument("id", nargs="?", default="", metavar="container-id")
    run.add_argument("-b", "--bundle", metavar="DIR",
                     help="path to the bundle (default: current directory)")
    run.add_argument("--console-socket", metavar="PATH",
                     help="unix socket to receive the pty master (for terminal containers)")
    run.add_argument("-d", "--detach", action="store_true", help="detach from the container")
    run.add_argument("--keep", action="store_true",
                     help="keep the container's state after it exits (delete it with "
                          "`runm delete`)")
    run.add_argument("--pid-file", metavar="PATH", help="write the process id to PATH")
    run.add_argument("--no-subreaper", action="store_true", help="accepted; no effect")
    verbs.add_publish_flag(run)
    run.add_argument("--no-pivot", action="store_true",
                     help="do not use pivot_root in the guest (passed to the guest's runc)")
    run.add_argument("--no-new-keyring", action="store_true", help="accepted; no effect")
    verbs.add_preserve_fds_flag(run)
    run.set_defaults(func=cmd_run)

    state = sub.add_parser("state", help="output the state of a container",
                           usage="runm state <container-id>")
    state.add_argument("id", nargs="?", default="", metavar="container-id")
    state.set_defaults(func=verbs.cmd_state)

    lst = sub.add_parser("list", aliases=["ls"], help="list containers started by runm")
    lst.add_argument("-f", "--format", choices=("table", "json"), default="table")
    lst.add_argument("-q", "--quiet", action="store_true", help="display only container IDs")
    lst.set_defaults(func=cmd_list)

    delete = sub.add_parser("delete", help="delete a container's state",
                            usage="runm delete [-f] <container-id>")
    delete.add_argument("id", nargs="?", default="", metavar="container-id")
    delete.add_argument("-f", "--force", action="store_true",
                        help="delete even if running; succeed if it does not exist")
    delete.set_defaults(func=verbs.cmd_delete)
    verbs.add_verbs(sub)

    spec = sub.add_parser("spec", help="create a new specification file (config.json)")
    spec.add_argument("-b", "--bundle", metavar="DIR", help="where to write config.json")
    spec.add_argument("--rootless", action="store_true", help="a spec for rootless containers")
    spec.set_defaults(func=cmd_spec)

    guest = sub.add_parser("guest", help="manage the guest image (kernel, initramfs, root)")
    guest.set_defaults(group=guest)
    guest_sub = guest.add_subparsers(dest="guest_command", metavar="command")
    build = guest_sub.add_parser("build", help="build the guest image (cached by content hash)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--no-snapshot", action="store_true",
                       help="do not also boot the image once to make the VM snapshot that "
                            "containers start from (it is then made on first use)")
    build.set_defaults(func=cmd_guest_build)
    path = guest_sub.add_parser("path", help="print the paths of the current guest image")
    path.set_defaults(func=cmd_guest_path)

    pool = sub.add_parser(
        "pool", help="keep VMs restored and warmed up in advance, so starts skip both",
        description="The warm pool: guests restored from the VM snapshot, warmed up by one "
                    "throwaway container, and kept idle, a number of them per guest memory "
                    "size. A start whose VM size matches takes one (plug in the bundle, run "
                    "runc on warm code paths) and a new one is prepared in the background. "
                    "Off until `runm pool fill` or the config file's [pool] table (`size = N` "
                    "for the default size, `memory_mib = { 1024 = 1 }` for others; a start "
                    "then fills it). Each pooled VM costs host memory while it waits (see "
                    "`runm bench`).")
    pool.set_defaults(group=pool)
    pool_sub = pool.add_subparsers(dest="pool_command", metavar="command")
    fill = pool_sub.add_parser(
        "fill", help="set the pool size and wait until it is full",
        description="Keep SIZE warm VMs of one guest memory size (default: the default VM "
                    "size, vm.memory_mib), leaving the other sizes as they are, and wait until "
                    "they are ready. Without SIZE: fill to the sizes the config file's [pool] "
                    "table sets. A container's VM gets its memory limit plus vm.overhead_mib, "
                    "rounded up to a power of two (or vm.memory_mib without a limit); only a "
                    "pooled VM of that very size serves it.")
    fill.add_argument("size", type=int, nargs="?",
                      help="VMs to keep ready (0 stops keeping this size)")
    fill.add_argument("--memory-mib", type=int, metavar="MIB",
                      help="the guest memory size these VMs have (default: vm.memory_mib)")
    fill.add_argument("--no-wait", action="store_true", help="return at once")
    fill.add_argument("--timeout", type=float, default=600.0,
                      help="seconds to wait for the pool to fill (default 600)")
    fill.set_defaults(func=cmd_pool_fill)
    plist = pool_sub.add_parser("list", help="show the pool's size and members")
    plist.add_argument("-f", "--format", choices=("table", "json"), default="table")
    plist.set_defaults(func=cmd_pool_list)
    pdrain = pool_sub.add_parser(
        "drain", help="turn the pool off and stop its waiting VMs",
        description="Turn the pool off (every size, and the config file's [pool] too, until "
                    "the next `runm pool fill` or reboot) and stop the VMs waiting in it; VMs "
                    "already taken are their containers'.")
    pdrain.set_defaults(func=cmd_pool_drain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text())
        return 0
    logs = Logging(args.log, args.log_format, args.debug)
    func = getattr(args, "func", None)
    if func is None:  # no command, or a group (`runm pool`) without its subcommand
        getattr(args, "group", parser).print_help(sys.stderr)
        return 1
    try:
        if args.config:
            import os

            os.environ["RUNM_CONFIG"] = args.config  # for the monitor and pool keepers too
        from runm.sandbox.config import load_config

        load_config()  # a bad file is an error now, naming the key, not halfway through
        if getattr(args, "id", None) is not None and args.command != "run":
            from runm.sandbox.bundle import validate_id

            validate_id(args.id)
        return int(func(args))
    except RunmError as err:
        logs.fatal(err.message)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # our reader went away (`runm list | head`): nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # a bug: say so plainly; the traceback goes to the debug log
        import traceback

        logging.getLogger("runm").debug("%s", traceback.format_exc())
        logs.fatal(f"internal error: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
