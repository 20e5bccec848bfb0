"""The runc verbs that work on detached containers (create, start, kill, exec, ...)."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any

from runm.errors import RunmError
from runm.jsonfile import parse_object, read_text


def parse_signal(raw: str) -> int:
    """runc's parseSignal: a number, or a name with or without SIG, any case."""
    if raw.isdigit():
        signum = int(raw)
        if signum <= 0 or signum >= signal.NSIG:
            raise RunmError(f"unknown signal {raw!r}".replace("'", '"'))
        return signum
    name = raw.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise RunmError(f'unknown signal "{raw}"') from None


def _store(args: argparse.Namespace) -> Any:
    from runm.sandbox.state import StateStore

    return StateStore(args.root)


def _container(args: argparse.Namespace) -> Any:
    from runm.sandbox.detached import Container

    return Container(_store(args), args.id)


def cmd_create(args: argparse.Namespace) -> int:
    from runm.cli.main import ensure_guest_image
    from runm.guest.image import GuestImage
    from runm.net.ports import resolve_publish
    from runm.sandbox.bundle import load_bundle
    from runm.sandbox.detached import CreateOptions, create

    refuse_preserved_fds(args)
    bundle = load_bundle(args.bundle)
    publish = resolve_publish(args.publish, bundle.annotations)
    image = ensure_guest_image()
    assert isinstance(image, GuestImage)
    create(CreateOptions(container_id=args.id, bundle=bundle, store=_store(args), image=image,
                         pid_file=args.pid_file, console_socket=args.console_socket,
                         no_pivot=args.no_pivot, publish=publish))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    _container(args).start()
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    signum = parse_signal(args.signal)
    _container(args).kill(signum, all=args.all)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _container(args).pause()
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _container(args).resume()
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    pids = _container(args).ps()
    if args.format == "json":
        print(json.dumps(pids))
    else:
        print("PID")
        for pid in pids:
            print(pid)
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    print(json.dumps(_container(args).oci_state(), indent=2))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from runm.sandbox.detached import Container

    try:
        container = Container(_store(args), args.id)
    except RunmError:
        if args.force:
            _store(args).remove(args.id)
            return 0
        raise
    container.delete(force=args.force)
    return 0


def exec_process(args: argparse.Namespace, bundle: str) -> dict[str, Any]:
    """The OCI process to exec: --process FILE, or the container's process with overrides."""
    if args.process:
        loaded = parse_object(read_text(args.process), args.process, "process")
        if not loaded.get("args"):
            raise RunmError("args must not be empty")
        return loaded
    if not args.command:
        raise RunmError("exec args cannot be empty")
    try:
        spec = json.loads((Path(bundle) / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise RunmError(f"reading the container's config.json: {err}") from None
    process: dict[str, Any] = dict(spec.get("process") or {})
    process["args"] = list(args.command)
    process["terminal"] = bool(args.tty)
    process["env"] = list(process.get("env") or []) + list(args.env or [])
    if args.cwd:
        process["cwd"] = args.cwd
    if args.user:
        uid, _, gid = args.user.partition(":")
        try:
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise RunmError(f"invalid user {args.user!r}: use UID[:GID]") from None
    if args.additional_gids:
        process.setdefault("user", {"uid": 0, "gid": 0})["additionalGids"] = [
            int(g) for g in args.additional_gids]
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    if args.cap:
        caps = process.setdefault("capabilities", {})
        for kind in ("bounding", "effective", "permitted"):
            caps[kind] = sorted(set(caps.get(kind) or []) | set(args.cap))
    return process


def cmd_exec(args: argparse.Namespace) -> int:
    refuse_preserved_fds(args)
    container = _container(args)
    process = exec_process(args, container.record.bundle)
    if args.tty:
        process["terminal"] = True
    if process.get("terminal") and not args.console_socket and "consoleSize" not in process:
        from runm.sandbox.tty import window_size

        size = window_size(0)
        if size:
            process["consoleSize"] = {"height": size[0], "width": size[1]}
    return int(container.exec(process, detach=args.detach, pid_file=args.pid_file,
                              console_socket=args.console_socket))


def add_publish_flag(parser: argparse.ArgumentParser) -> None:
    """runm's one flag beyond runc's (also settable as the io.runm.publish annotation)."""
    parser.add_argument(
        "-p", "--publish", action="append", default=[], metavar="[IP:]HOSTPORT:PORT[/PROTO]",
        help="forward a host port to the container's port (tcp or udp; IP defaults to "
             "0.0.0.0); repeatable. The container then uses the VM's network. Same as the "
             "annotation io.runm.publish=LIST (comma-separated), for callers that cannot "
             "pass flags")


def add_preserve_fds_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                        help="must be 0: open files cannot be passed into the container's VM")


def refuse_preserved_fds(args: argparse.Namespace) -> None:
    """A process started without the fds it was promised would fail obscurely later."""
    if args.preserve_fds:
        raise RunmError(f"--preserve-fds {args.preserve_fds}: passing open files into the "
                        "container's VM is not supported")


def add_verbs(sub: Any) -> None:
    """Register the detached-container verbs on the `runm` argument parser."""
    def id_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("id", nargs="?", default="", metavar="container-id")

    create = sub.add_parser(
        "create", help="create a container (in its own VM) without starting its process",
        description="Boot a VM, create the container in it with runc and leave its process "
                    "waiting for `runm start`. The pid written to --pid-file is a host "
                    "stand-in process that mirrors the container process: signals sent to it "
                    "are forwarded, and it exits with the container process's status.",
        usage="runm create [command options] <container-id>")
    id_arg(create)
    create.add_argument("-b", "--bundle", metavar="DIR", help="path to the bundle (default: .)")
    create.add_argument("--console-socket", metavar="PATH",
                        help="unix socket that receives the pty master (terminal: true)")
    create.add_argument("--pid-file", metavar="PATH", help="write the stand-in's pid to PATH")
    create.add_argument("--no-pivot", action="store_true", help="no pivot_root in the guest")
    add_publish_flag(create)
    create.add_argument("--no-new-keyring", action="store_true", help="accepted; no effect")
    add_preserve_fds_flag(create)
    create.set_defaults(func=cmd_create)

    for name, func, text in (("start", cmd_start, "start the process of a created container"),
                             ("pause", cmd_pause, "suspend all processes of a container"),
                             ("resume", cmd_resume, "resume a paused container")):
        p = sub.add_parser(name, help=text, usage=f"runm {name} <container-id>")
        id_arg(p)
        p.set_defaults(func=func)

    kill = sub.add_parser("kill", help="send a signal to the container's init process",
                          usage="runm kill [--all] <container-id> [signal]")
    id_arg(kill)
    kill.add_argument("signal", nargs="?", default="SIGTERM",
                      help="number or name, with or without SIG (default SIGTERM)")
    kill.add_argument("-a", "--all", action="store_true", help="signal every process")
    kill.set_defaults(func=cmd_kill)

    ps = sub.add_parser("ps", help="list the processes of a container (guest pids)",
                        usage="runm ps [--format table|json] <container-id>")
    id_arg(ps)
    ps.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ps.set_defaults(func=cmd_ps)

    ex = sub.add_parser("exec", help="run a new process in a running container",
                        usage="runm exec [command options] <container-id> [command args...]")
    id_arg(ex)
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.add_argument("-p", "--process", metavar="FILE", help="OCI process JSON (- for stdin)")
    ex.add_argument("-d", "--detach", action="store_true", help="detach from the process")
    ex.add_argument("--pid-file", metavar="PATH", help="write the stand-in's pid to PATH")
    ex.add_argument("--console-socket", metavar="PATH", help="receives the pty master")
    ex.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-TTY")
    ex.add_argument("--cwd", metavar="DIR", help="working directory in the container")
    ex.add_argument("-e", "--env", action="append", metavar="K=V", help="set an env variable")
    ex.add_argument("-u", "--user", metavar="UID[:GID]", help="user to run as")
    ex.add_argument("-g", "--additional-gids", action="append", metavar="GID")
    ex.add_argument("-c", "--cap", action="append", metavar="CAP", help="add a capability")
    ex.add_argument("--no-new-privs", action="store_true")
    ex.add_argument("--process-label", help="accepted; no effect")
    ex.add_argument("--apparmor", help="accepted; no effect")
    add_preserve_fds_flag(ex)
    ex.add_argument("--cgroup", help="accepted; no effect")
    ex.add_argument("--ignore-paused", action="store_true", help="accepted; no effect")
    ex.set_defaults(func=cmd_exec)
    add_more_verbs(sub)


def cmd_events(args: argparse.Namespace) -> int:
    """runc events: one stats event with --stats; otherwise one per interval until it stops,
    and an {"type": "oom"} event whenever the OOM killer took a process of the container
    since the previous one (the guest's cgroup's oom_kill count went up)."""
    import time

    from runm.proto.agent import OOM_KILLS_KEY

    container = _container(args)
    interval = parse_duration(args.interval)
    seen_kills: int | None = None
    while True:
        event = container.stats()
        kills = int(event.pop(OOM_KILLS_KEY, 0) or 0)
        if seen_kills is not None and kills > seen_kills:
            print(json.dumps({"type": "oom", "id": container.id}), flush=True)
        seen_kills = kills
        print(json.dumps(event), flush=True)
        if args.stats:
            return 0
        time.sleep(interval)  # the interval the caller asked for
        if container.status() == "stopped":
            return 0


def parse_duration(text: str) -> float:
    """Go-style durations as runc takes them: 5s, 500ms, 1m, 1.5s."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)]) * units[unit]
            except ValueError:
                break
            if value <= 0:
                break
            return value
    raise RunmError(f'invalid interval "{text}": the duration must be positive, e.g. 5s')


UPDATE_FLAGS = {
    # flag (runc's name): (LinuxResources section, key, help as runc words it)
    "blkio-weight": ("blockIO", "weight",
                     "specifies per cgroup weight, range is from 10 to 1000"),
    "cpu-period": ("cpu", "period", "CPU CFS period to be used for hardcapping (in usecs); "
                                    "0 to use system default"),
    "cpu-quota": ("cpu", "quota", "CPU CFS hardcap limit (in usecs); allowed cpu time in a "
                                  "given period"),
    "cpu-share": ("cpu", "shares", "CPU shares (relative weight vs. other containers)"),
    "cpu-rt-period": ("cpu", "realtimePeriod", "CPU realtime period to be used for hardcapping "
                                               "(in usecs); 0 to use system default"),
    "cpu-rt-runtime": ("cpu", "realtimeRuntime", "CPU realtime hardcap limit (in usecs); "
                                                 "allowed cpu time in a given period"),
    "cpuset-cpus": ("cpu", "cpus", "CPU(s) to use (of the VM's vCPUs)"),
    "cpuset-mems": ("cpu", "mems", "memory node(s) to use"),
    "kernel-memory": ("memory", "kernel", "(obsoleted; do not use)"),
    "memory": ("memory", "limit", "memory limit (in bytes); the VM's size stays as it was "
                                  "made"),
    "memory-reservation": ("memory", "reservation",
                           "memory reservation or soft_limit (in bytes)"),
    "memory-swap": ("memory", "swap", "total memory usage (memory + swap); set '-1' to enable "
                                      "unlimited swap"),
    "pids-limit": ("pids", "limit", "maximum number of pids allowed in the container"),
}
UPDATE_ALIASES = {"cpu-share": ["--cpu-shares"]}  # Docker's spelling, accepted too


def cmd_update(args: argparse.Namespace) -> int:
    if args.resources:  # as runc: the file (or stdin) says everything, flags are ignored
        _container(args).update(parse_object(read_text(args.resources), args.resources,
                                             "resources"))
        return 0
    resources: dict[str, Any] = {}
    for flag, (section, key, _) in UPDATE_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if key not in ("cpus", "mems"):
            try:
                value = int(value)
            except ValueError:
                raise RunmError(f"invalid value for --{flag}: {value}") from None
        resources.setdefault(section, {})[key] = value
    _container(args).update(resources)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    print(json.dumps(FEATURES, indent=4))
    return 0


FEATURES: dict[str, Any] = {
    "ociVersionMin": "1.0.0",
    "ociVersionMax": "1.0.2-dev",
    "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart",
              "poststop"],
    "mountOptions": ["async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
                     "iversion", "lazytime", "loud", "mand", "noatime", "nodev", "nodiratime",
                     "noexec", "noiversion", "nolazytime", "nomand", "norelatime",
                     "nostrictatime", "nosuid", "private", "rbind", "relatime", "remount", "ro",
                     "rprivate", "rshared", "rslave", "runbindable", "rw", "shared", "silent",
                     "slave", "strictatime", "sync", "tmpcopyup", "unbindable"],
    "linux": {
        "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
        "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
        "seccomp": {"enabled": True},
        "apparmor": {"enabled": False},
        "selinux": {"enabled": False},
    },
    "annotations": {"io.github.seccomp.libseccomp.version": "2.5.4",
                    "org.opencontainers.runc.version": "1.1.5",
                    "run.oci.runm.vm": "qemu"},
}


def add_more_verbs(sub: Any) -> None:
    events = sub.add_parser("events", help="display container events (resource usage)",
                            usage="runm events [--stats] [--interval 5s] <container-id>")
    events.add_argument("id", nargs="?", default="", metavar="container-id")
    events.add_argument("--stats", action="store_true", help="print one stats event and exit")
    events.add_argument("--interval", default="5s", help="stats collection interval (5s)")
    events.set_defaults(func=cmd_events)

    update = sub.add_parser("update", help="update a container's resource limits (in the VM)",
                            usage="runm update [--resources FILE|-] [flags] <container-id>")
    update.add_argument("id", nargs="?", default="", metavar="container-id")
    update.add_argument("-r", "--resources", metavar="FILE",
                        help="path to the file containing the resources to update (OCI "
                             "LinuxResources JSON) or '-' to read from the standard input; "
                             "all other options are then ignored")
    for flag, (_, _, text) in UPDATE_FLAGS.items():
        update.add_argument("--" + flag, *UPDATE_ALIASES.get(flag, []), metavar="VALUE",
                            dest=flag.replace("-", "_"), help=text)
    update.set_defaults(func=cmd_update)

    features = sub.add_parser("features", help="show the enabled features (runtime-spec JSON)")
    features.set_defaults(func=cmd_features)
