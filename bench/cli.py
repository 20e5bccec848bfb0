"""`python -m bench`: measure runm against a bare VM, native runc and host pipes."""

from __future__ import annotations

import argparse
import asyncio
import compileall
import datetime
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from bench import RESULTS, SRC
from bench.figures import (
    FIGURES,
    Config,
    can_exec,
    cold,
    exec_latency,
    fs_read,
    memory_and_density,
    net,
    not_measured,
    shim_start,
    stderr_log,
    stdio,
)
from bench.model import Figure
from bench.stats import parse_int_list

QUICK = {"repeat": 1, "warmup": 0, "size": 4, "density": [1, 2], "settle": 1.0}
DEFAULTS = {"repeat": 3, "warmup": 1, "size": 64, "density": [1, 4, 8], "settle": 3.0}


def parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown figure {', '.join(unknown) or '(none)'}; choose from {','.join(FIGURES)}")
    return names


def density_list(text: str) -> list[int]:
    try:
        return parse_int_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        epilog="Progress goes to stderr, the report to stdout. Needs root (runc, QEMU "
               "sockets under /run). See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="n=1, no warm-up, 4 MiB (stdio, fs), density 1,2, 1 s settle (smoke)")
    p.add_argument("--repeat", type=int, metavar="N", help="counted runs per figure (3)")
    p.add_argument("--warmup", type=int, metavar="N", help="uncounted warm-up runs (1)")
    p.add_argument("--only", type=parse_only, metavar="LIST", default=list(FIGURES),
                   help=f"comma-separated subset of {','.join(FIGURES)}")
    p.add_argument("--size", type=int, metavar="MiB", help="stdio transfer and fs file size (64)")
    p.add_argument("--density", type=density_list, metavar="LIST",
                   help="concurrent container counts for memory and density (1,4,8)")
    p.add_argument("--settle", type=float, metavar="S",
                   help="seconds between 'ready' and the PSS sample (3)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="give up on one run after S seconds (900)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="runm's data dir with the guest image (default: $RUNM_DATA_DIR, "
                        "else /var/lib/runm)")
    p.add_argument("--json", metavar="FILE", help="write results as JSON "
                   "(default bench/results/bench-<time>.json)")
    p.add_argument("--chart", metavar="FILE.png", help="draw a chart with matplotlib "
                   "(default bench/results/bench-<time>.png)")
    return p


def make_config(args: argparse.Namespace, accel: str) -> Config:
    base = QUICK if args.quick else DEFAULTS

    def pick(name: str, attr: str | None = None) -> object:
        value = getattr(args, attr or name)
        return base[name] if value is None else value

    cfg = Config(repeat=int(str(pick("repeat"))), warmup=int(str(pick("warmup"))),
                 size_mib=int(str(pick("size"))), settle=float(str(pick("settle"))),
                 accel=accel, cores=os.cpu_count() or 0, ready_timeout=args.timeout)
    density = pick("density")
    assert isinstance(density, list)
    cfg.density = [int(n) for n in density]
    if cfg.repeat < 1 or cfg.warmup < 0 or cfg.size_mib < 1:
        raise SystemExit("--repeat and --size must be >= 1, --warmup >= 0")
    return cfg


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def snapshot_src(work: Path) -> Path:
    """Copy src/runm into work and import runm from there, for the bench and every runm it
    starts: edits to the checkout during a long run (which change the guest image digest)
    cannot change what is measured half-way."""
    if "runm" in sys.modules:  # already imported (not by `python -m bench`): measure that
        import runm

        return Path(runm.__file__).resolve().parent.parent
    dest = work / "src"
    shutil.copytree(SRC / "runm", dest / "runm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Byte-compiled, as an installed runm is (pip compiles; scripts/install.sh runs
    # compileall): every runm process would otherwise compile its imports, ~0.2 s here.
    compileall.compile_dir(str(dest / "runm"), quiet=1)
    sys.path.insert(0, str(dest))
    return dest


def pin_image(image_dir: Path, data_dir: Path, work: Path) -> Path:
    """A private RUNM_DATA_DIR holding (hard links to) this one image and the accelerator
    cache: runm prunes old images when a newer one is built, and concurrent work on the
    checkout builds new ones, which must not pull the image from under a long run."""
    private = work / "data"
    dest = private / "guest" / "images" / image_dir.name
    dest.parent.mkdir(parents=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    # With its VM snapshots: their files are never written once made.
    shutil.copytree(image_dir, dest, copy_function=link,
                    ignore=shutil.ignore_patterns(".lock", ".new-*"))
    if (data_dir / "accel").is_dir():
        shutil.copytree(data_dir / "accel", private / "accel")
    return private


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir:
        os.environ["RUNM_DATA_DIR"] = args.data_dir
    work = Path(tempfile.mkdtemp(prefix="runm-bench-"))
    try:
        return _main(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: Path) -> int:
    log = stderr_log
    src = snapshot_src(work)
    from bench import hostinfo
    from bench.harness import Harness
    from bench.report import draw_chart, render, write_json
    from runm.errors import RunmError
    from runm.guest.image import GuestImageError, default_data_dir, ensure_image, find_image
    from runm.sandbox.sandbox import prepare_snapshot
    from runm.vm.accel import choose_accelerator
    from runm.vm.base import VMError
    from runm.vm.qemu import qemu_binary

    data_dir = default_data_dir()
    os.environ["RUNM_DATA_DIR"] = str(data_dir)  # the accelerator cache lives there too
    try:
        qemu = qemu_binary()
        for attempt in range(3):  # a concurrent build may prune it between the two steps
            image = ensure_image(data_dir, progress=lambda s: log(f"guest image: {s}"))
            try:
                private = pin_image(image.kernel.parent, data_dir, work)
                break
            except FileNotFoundError:
                shutil.rmtree(work / "data", ignore_errors=True)
                if attempt == 2:
                    raise
        os.environ["RUNM_DATA_DIR"] = str(private)
        # VMs (and the warm pool) of this run apart from anyone else's
        os.environ["RUNM_RUN_DIR"] = str(work / "vm")
        image = find_image(private)
        if not asyncio.run(prepare_snapshot(image, lambda s: log(f"VM snapshot: {s}"))):
            log("bench: no VM snapshot could be made: every start will boot cold")
    except (GuestImageError, RunmError, VMError, OSError) as err:
        log(f"bench: cannot prepare runm: {err}")
        return 2
    accel = choose_accelerator(image.kernel)
    cfg = make_config(args, accel)
    info = hostinfo.collect(accel, qemu, image.kernel_release)
    info["guest_image"] = f"{image.digest[:12]} from {data_dir} (pinned for the run)"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else RESULTS / f"bench-{stamp}.json"
    chart_path = Path(args.chart) if args.chart else RESULTS / f"bench-{stamp}.png"
    want = set(args.only)
    exec_possible = can_exec()
    log(f"bench: accel={accel}, n={cfg.repeat} (+{cfg.warmup} warm-up), figures "
        f"{','.join(f for f in FIGURES if f in want)}, stdio {cfg.size_mib} MiB, density "
        f"{','.join(map(str, cfg.density))}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    figures: list[Figure] = []
    interrupted = False
    harness = Harness(work, private, image, src=src, timeout=args.timeout)
    try:
        if "cold" in want:
            figures.append(cold(harness, cfg, log))
        if "stdio" in want:
            figures.append(stdio(harness, cfg, log))
        if want & {"memory", "density"}:
            figures.extend(memory_and_density(harness, cfg, want, log))
        if "exec" in want and exec_possible:
            figures.append(exec_latency(harness, cfg, log))
        if "fs" in want and exec_possible:
            figures.append(fs_read(harness, cfg, log))
        if "net" in want:
            figures.append(net(harness, cfg, log))
        if "shim" in want:
            figures.append(shim_start(harness, cfg, log))
    except KeyboardInterrupt:
        interrupted = True
        log("bench: interrupted; cleaning up and reporting what was measured")
    finally:
        for note in harness.close():
            log(f"bench cleanup: {note}")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    figures.extend(f for f in not_measured(exec_possible) if f.key in want)
    text = render(info, cfg, figures)
    print(text, flush=True)
    write_json(json_path, info, cfg, figures, text)
    print(f"\njson: {json_path}")
    why_not = draw_chart(chart_path, info, figures)
    print(f"chart: {chart_path}" if why_not is None else f"chart: not drawn ({why_not})")
    if interrupted:
        return 130
    failed = any(m.failures for f in figures for m in f.measures.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
