"""The shim's host-side plumbing on real FIFOs, files, pipes and mounts: stdio URIs, CloseIO,
the logging binary, the rootfs mounts, runc stats as cgroup v2 metrics."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from runm.proto import task as api
from runm.shim import rootfs
from runm.shim.metrics import metrics_from_runc_stats
from runm.shim.stdio import ShimIO, StdioError


class Stream:
    """A mux stream stand-in: records what is written, serves queued reads."""

    def __init__(self, chunks: list[bytes] | None = None) -> None:
        self.written = bytearray()
        self.eof = asyncio.Event()
        self.chunks = list(chunks or [])

    async def write(self, data: bytes) -> None:
        self.written += data

    async def aclose(self) -> None:
        self.eof.set()

    async def read(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def reset(self) -> None:
        self.eof.set()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def fifos(tmp_path: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = tmp_path / name
        os.mkfifo(path)
        paths.append(str(path))
    return paths


def test_stdin_waits_for_a_writer_and_ends_when_it_goes(tmp_path: Path) -> None:
    stdin, = fifos(tmp_path, "in")

    async def body() -> None:
        io = await ShimIO.open(stdin, "", "", container_id="c", namespace="n")
        stream = Stream()
        io.connect(stream, None, None)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert not stream.eof.is_set(), "no writer yet is not EOF"
        writer = os.open(stdin, os.O_WRONLY)
        os.write(writer, b"hello")
        os.close(writer)
        await stream.eof.wait()
        assert bytes(stream.written) == b"hello"
        io.close()

    run(body())


def test_close_io_passes_on_what_was_written_then_eof(tmp_path: Path) -> None:
    stdin, = fifos(tmp_path, "in")

    async def body() -> None:
        io = await ShimIO.open(stdin, "", "", container_id="c", namespace="n")
        keep = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)  # the client keeps it open
        os.write(keep, b"last words")
        stream = Stream()
        io.connect(stream, None, None)  # type: ignore[arg-type]
        io.close_stdin()
        await stream.eof.wait()
        assert bytes(stream.written) == b"last words"
        os.close(keep)
        io.close()

    run(body())


def test_outputs_reach_fifos_and_files(tmp_path: Path) -> None:
    stdout, = fifos(tmp_path, "out")
    log = tmp_path / "logs" / "err.log"

    async def body() -> None:
        reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        io = await ShimIO.open("", stdout, f"file://{log}", container_id="c", namespace="n")
        assert (io.stdin, io.stdout, io.stderr) == (False, True, True)
        outputs = io.connect(None, Stream([b"to out"]), Stream([b"to file"]))  # type: ignore[arg-type]
        await asyncio.gather(*outputs)
        assert os.read(reader, 100) == b"to out"
        io.close()
        os.close(reader)

    run(body())
    assert log.read_text() == "to file"


def test_a_logging_binary_gets_fds_3_and_4(tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    out = tmp_path / "logged"
    logger.write_text("#!/bin/sh\n"
                      f"exec 5>&-\n"  # ready
                      f"echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > {out}.args\n"
                      f"cat <&3 > {out}.out\ncat <&4 > {out}.err\n")
    logger.chmod(0o755)

    async def body() -> None:
        io = await ShimIO.open("", f"binary://{logger}?level=debug", "",
                               container_id="c9", namespace="ns9")
        outputs = io.connect(None, Stream([b"o"]), Stream([b"e"]))  # type: ignore[arg-type]
        await asyncio.gather(*outputs)
        io.close()
        process = io._logger
        assert process is None  # handed to a waiter once our ends are closed

    run(body())
    assert (tmp_path / "logged.args").read_text() == "c9 ns9 level debug\n"


def test_bad_stdio_uris_are_clear_errors(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(StdioError, match="unknown STDIO scheme weird"):
            await ShimIO.open("", "weird://x", "", container_id="c", namespace="n")
        with pytest.raises(StdioError, match="No such file"):
            await ShimIO.open(str(tmp_path / "missing"), "", "", container_id="c",
                              namespace="n")
        with pytest.raises(StdioError, match="stdin cannot be a file"):
            await ShimIO.open(f"file://{tmp_path}/x", "", "", container_id="c",
                              namespace="n")
        with pytest.raises(StdioError, match="starting logging binary"):
            await ShimIO.open("", f"binary://{tmp_path}/none", "", container_id="c",
                              namespace="n")

    run(body())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_rootfs_mounts_and_unmounts(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "bin").mkdir(parents=True)
    target = tmp_path / "bundle" / "rootfs"

    async def body() -> None:
        await rootfs.mount_all([api.Mount("tmpfs", "tmpfs", options=["size=1m"]),
                                api.Mount("bind", str(source), options=["rbind", "ro"])],
                               target)
        assert rootfs.is_mountpoint(target) and (target / "bin").is_dir()
        await rootfs.unmount(target)
        assert not rootfs.is_mountpoint(target)
        with pytest.raises(Exception, match="mounting rootfs"):
            await rootfs.mount_all([api.Mount("tmpfs", "tmpfs"),
                                    api.Mount("nosuchfs", "x")], target)
        assert not rootfs.is_mountpoint(target), "a failed mount undoes the earlier ones"

    run(body())


def test_runc_stats_become_cgroup_v2_metrics() -> None:
    event = {"type": "stats", "id": "c1", "runm_oom_kills": 2, "data": {
        "cpu": {"usage": {"total": 3_000_000, "user": 2_000_000, "kernel": 1_000_000},
                "throttling": {"periods": 5, "throttledPeriods": 1, "throttledTime": 7000}},
        "memory": {"usage": {"usage": 100, "limit": 200, "max": 150},
                   "swap": {"usage": 130, "limit": 400}, "raw": {"anon": 60, "file": 40}},
        "pids": {"current": 3, "limit": 10}}}
    m = metrics_from_runc_stats(event)
    assert m.cpu == api.CPUStat(3000, 2000, 1000, 5, 1, 7)
    assert m.pids == api.PidsStat(3, 10)
    assert m.memory is not None
    assert (m.memory.anon, m.memory.file, m.memory.usage, m.memory.usage_limit) == \
        (60, 40, 100, 200)
    assert (m.memory.swap_usage, m.memory.swap_limit) == (30, 400)
    assert m.memory_events == api.MemoryEvents(oom_kill=2)
    assert api.Metrics.decode(m.encode()) == m
    assert metrics_from_runc_stats({}) == metrics_from_runc_stats({"data": None})
