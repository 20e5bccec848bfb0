"""The guest end of a virtio-serial port, over stand-ins that behave like one.

A socketpair end models a port with a connected host (reads block until data, EOF and EPIPE
once the host goes away). A FIFO opened read-only models the disconnected state of a real
port: read() returns 0 while no host (writer) is attached, and data once one writes; the same
fd then serves the next writer, as the port serves the next host.

VirtioPort puts the fd in O_ASYNC mode, so the kernel sends SIGIO on I/O; the tests ignore
SIGIO (its default action would kill the test run) unless a test routes it to notify().
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from runm.agent.port import VirtioPort, find_port

WAIT = 2.0  # generous upper bound for things that happen at once


@pytest.fixture(autouse=True)
def _sigio_ignored() -> Iterator[None]:
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGIO, old)


def make_pair() -> tuple[int, socket.socket]:
    """(fd for the port, the host's end as a non-blocking socket)."""
    ours, host = socket.socketpair()
    host.setblocking(False)
    return ours.detach(), host


# --- find_port -------------------------------------------------------------------------------


def make_sysfs(root: Path, names: dict[str, str]) -> Path:
    for entry, name in names.items():
        (root / entry).mkdir(parents=True)
        (root / entry / "name").write_text(name + "\n")
    return root


def test_find_port_maps_a_name_to_its_dev_node(tmp_path: Path) -> None:
    sys_dir = make_sysfs(tmp_path / "virtio-ports",
                         {"vport0p1": "org.qemu.guest_agent.0", "vport1p1": "runm.ctl",
                          "vport1p2": "runm.io"})
    assert find_port("runm.ctl", sys_dir) == Path("/dev/vport1p1")
    assert find_port("runm.io", sys_dir) == Path("/dev/vport1p2")


def test_find_port_none_when_absent(tmp_path: Path) -> None:
    assert find_port("runm.ctl", tmp_path / "missing") is None
    sys_dir = make_sysfs(tmp_path / "virtio-ports", {"vport0p1": "other"})
    assert find_port("runm.ctl", sys_dir) is None
    assert find_port("runm", sys_dir) is None  # whole names only
    (tmp_path / "file").write_text("")
    assert find_port("runm.ctl", tmp_path / "file") is None  # not a directory


def test_find_port_skips_entries_whose_name_cannot_be_read(tmp_path: Path) -> None:
    sys_dir = tmp_path / "virtio-ports"
    (sys_dir / "vport0p1").mkdir(parents=True)  # no name file
    (sys_dir / "vport0p2" / "name").mkdir(parents=True)  # name is unreadable (a directory)
    (sys_dir / "vport0p3").mkdir()
    (sys_dir / "vport0p3" / "name").symlink_to(tmp_path / "dangling")
    (sys_dir / "vport0p4").mkdir()
    (sys_dir / "vport0p4" / "name").write_text("runm.ctl")  # no trailing newline
    assert find_port("runm.ctl", sys_dir) == Path("/dev/vport0p4")


def test_find_port_prefers_the_first_entry_in_sorted_order(tmp_path: Path) -> None:
    sys_dir = make_sysfs(tmp_path, {"vport2p1": "dup", "vport1p1": "dup"})
    assert find_port("dup", sys_dir) == Path("/dev/vport1p1")


# --- VirtioPort over a connected host --------------------------------------------------------


def test_constructor_arms_sigio_and_nonblocking_mode() -> None:
    fd, host = make_pair()
    try:
        VirtioPort(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_NONBLOCK
        assert flags & os.O_ASYNC
        assert fcntl.fcntl(fd, fcntl.F_GETOWN) == os.getpid()
    finally:
        os.close(fd)
        host.close()


def test_receive_returns_data_sent_by_the_host() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            host.send(b"hello")
            assert await asyncio.wait_for(port.receive(), WAIT) == b"hello"
            # Nothing waiting yet: receive waits for the fd, then returns what arrives.
            task = asyncio.create_task(port.receive(3))
            await asyncio.sleep(0)
            assert not task.done()
            host.send(b"abcdef")
            assert await asyncio.wait_for(task, WAIT) == b"abc"
            assert await asyncio.wait_for(port.receive(), WAIT) == b"def"
        finally:
            os.close(fd)
            host.close()

    asyncio.run(main())


def test_receive_takes_every_queued_buffer_in_one_call() -> None:
    """A real port's read() returns one page-sized buffer of the driver at most; a SEQPACKET
    socket's returns one packet. receive() gathers what is queued, up to max_bytes, so one
    (costly, under TCG) turn of the mux reader handles it all; an EOF behind the data comes on
    the next call."""

    async def main() -> None:
        ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd = ours.detach()
        port = VirtioPort(fd)
        try:
            for part in (b"a" * 4096, b"b" * 4096, b"c" * 100):
                host.send(part)
            assert await asyncio.wait_for(port.receive(), WAIT) == (
                b"a" * 4096 + b"b" * 4096 + b"c" * 100)
            for part in (b"d" * 4096, b"e" * 4096, b"f" * 4096):
                host.send(part)
            assert await asyncio.wait_for(port.receive(8192), WAIT) == b"d" * 4096 + b"e" * 4096
            host.send(b"last")
            host.close()
            assert await asyncio.wait_for(port.receive(), WAIT) == b"f" * 4096 + b"last"
            assert await asyncio.wait_for(port.receive(), WAIT) == b""
        finally:
            os.close(fd)
            host.close()

    asyncio.run(main())


def test_send_all_delivers_several_mib_through_a_small_buffer() -> None:
    payload = os.urandom(6 * 1024 * 1024 + 7)  # far above the socket buffer: EAGAIN waits

    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        loop = asyncio.get_running_loop()
        try:
            received = bytearray()

            async def drain() -> None:
                while len(received) < len(payload):
                    chunk = await loop.sock_recv(host, 1 << 20)
                    assert chunk
                    received.extend(chunk)

            reader = asyncio.create_task(drain())
            await asyncio.wait_for(port.send_all(payload), 10)
            await asyncio.wait_for(reader, 10)
            assert len(received) == len(payload)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        finally:
            os.close(fd)
            host.close()

    asyncio.run(main())


def test_send_all_of_nothing_returns_at_once() -> None:
    async def main() -> None:
        fd, host = make_pair()
        try:
            await asyncio.wait_for(VirtioPort(fd).send_all(b""), WAIT)
            with pytest.raises(BlockingIOError):
                host.recv(1)
        finally:
            os.close(fd)
            host.close()

    asyncio.run(main())


def test_wait_connected_keeps_waiting_data_for_receive() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            host.send(b"hello world")
            await asyncio.wait_for(port.wait_connected(), WAIT)
            await asyncio.wait_for(port.wait_connected(), WAIT)  # again: nothing lost
            assert await port.receive(5) == b"hello"
            assert await port.receive(100) == b" world"
            host.send(b"next")
            assert await asyncio.wait_for(port.receive(), WAIT) == b"next"
        finally:
            os.close(fd)
            host.close()

    asyncio.run(main())


def test_wait_connected_returns_at_once_when_connected_and_idle() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            await asyncio.wait_for(port.wait_connected(), 0.5)
            host.send(b"later")
            assert await asyncio.wait_for(port.receive(), WAIT) == b"later"
        finally:
            os.close(fd)
            host.close()

    asyncio.run(main())


def test_receive_returns_empty_after_the_host_closes() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            host.send(b"last words")
            host.close()
            assert await asyncio.wait_for(port.receive(), WAIT) == b"last words"
            assert await asyncio.wait_for(port.receive(), WAIT) == b""
        finally:
            os.close(fd)

    asyncio.run(main())


def test_receive_waiting_for_data_wakes_up_when_the_host_closes() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            task = asyncio.create_task(port.receive())
            await asyncio.sleep(0)
            assert not task.done()
            host.close()
            assert await asyncio.wait_for(task, WAIT) == b""
        finally:
            os.close(fd)

    asyncio.run(main())


def test_send_all_after_the_host_closed_raises_connection_reset() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            host.close()
            with pytest.raises(ConnectionResetError, match="host disconnected"):
                await asyncio.wait_for(port.send_all(b"x" * 100), WAIT)
        finally:
            os.close(fd)

    asyncio.run(main())


def test_send_all_blocked_on_a_full_buffer_fails_when_the_host_goes_away() -> None:
    async def main() -> None:
        fd, host = make_pair()
        port = VirtioPort(fd)
        try:
            sender = asyncio.create_task(port.send_all(b"y" * (8 << 20)))
            await asyncio.sleep(0)
            assert not sender.done()  # the buffer is full: waiting for the host to read
            host.close()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(sender, WAIT)
        finally:
            os.close(fd)

    asyncio.run(main())


def test_send_all_reraises_other_errors() -> None:
    async def main() -> None:
        r, w = os.pipe()
        port = VirtioPort(r)  # the read end of a pipe cannot be written: EBADF
        try:
            with pytest.raises(OSError) as info:
                await port.send_all(b"x")
            assert not isinstance(info.value, ConnectionResetError)
        finally:
            os.close(r)
            os.close(w)

    asyncio.run(main())


# --- VirtioPort across host connections (FIFO stand-in) --------------------------------------


def test_notify_wakes_wait_connected_when_a_host_attaches(tmp_path: Path) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def main() -> None:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        port = VirtioPort(fd)
        writer = -1
        try:
            task = asyncio.create_task(port.wait_connected())
            await asyncio.sleep(0)
            assert not task.done()  # no host: read() returns 0, so it waits
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"hi")
            port.notify()
            # Well within the 1 s fallback poll: it was notify() that woke it.
            await asyncio.wait_for(task, 0.5)
            assert await port.receive() == b"hi"
        finally:
            os.close(fd)
            if writer >= 0:
                os.close(writer)

    asyncio.run(main())


def test_same_fd_serves_the_next_host_after_a_disconnect(tmp_path: Path) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def main() -> None:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        port = VirtioPort(fd)
        try:
            first = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(first, b"one")
            await asyncio.wait_for(port.wait_connected(), WAIT)
            assert await port.receive() == b"one"
            os.close(first)
            assert await asyncio.wait_for(port.receive(), WAIT) == b""  # host gone
            await port.aclose()  # per connection: keeps the fd open
            os.fstat(fd)

            task = asyncio.create_task(port.wait_connected())
            await asyncio.sleep(0)
            assert not task.done()
            second = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(second, b"two")
                port.notify()
                await asyncio.wait_for(task, 0.5)
                assert await port.receive() == b"two"
            finally:
                os.close(second)
        finally:
            os.close(fd)

    asyncio.run(main())


def test_sigio_routed_to_notify_wakes_wait_connected(tmp_path: Path) -> None:
    """The agent's wiring: loop.add_signal_handler(SIGIO, port.notify)."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        port = VirtioPort(fd)
        writer = -1
        loop.add_signal_handler(signal.SIGIO, port.notify)
        try:
            task = asyncio.create_task(port.wait_connected())
            await asyncio.sleep(0)
            assert not task.done()
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"sig")  # the kernel sends SIGIO to the fd's owner: us
            await asyncio.wait_for(task, 0.5)
            assert await port.receive() == b"sig"
        finally:
            os.close(fd)  # no SIGIO source left before the handler goes
            if writer >= 0:
                os.close(writer)
            loop.remove_signal_handler(signal.SIGIO)
            signal.signal(signal.SIGIO, signal.SIG_IGN)

    asyncio.run(main())


def test_open_opens_the_path_read_write(tmp_path: Path) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def main() -> None:
        port = VirtioPort.open(fifo)
        try:
            flags = fcntl.fcntl(port.fd, fcntl.F_GETFL)
            assert flags & os.O_ACCMODE == os.O_RDWR
            assert fcntl.fcntl(port.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            await port.send_all(b"loop")  # a FIFO opened O_RDWR reads back its own writes
            assert await asyncio.wait_for(port.receive(), WAIT) == b"loop"
        finally:
            os.close(port.fd)

    asyncio.run(main())


def test_open_of_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        VirtioPort.open(tmp_path / "vport9p9")


def test_fd_is_left_open_by_aclose() -> None:
    fd, host = make_pair()
    try:
        asyncio.run(VirtioPort(fd).aclose())
        host.send(b"still here")
        assert os.read(fd, 100) == b"still here"
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        host.close()
