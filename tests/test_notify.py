"""sd_notify: readiness, watchdog pings from the event loop, stopping — as systemd sees them."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator

import pytest
from helpers import Daemon, wait_until


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


async def receive(sock: socket.socket, wanted: str, timeout: float = 10.0) -> list[str]:
    """Datagrams until one contains ``wanted``."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while not any(wanted in s for s in seen):
            seen.append((await loop.sock_recv(sock, 4096)).decode())
    return seen


@pytest.fixture
def notify(tmp_path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A socket in systemd's place, and the environment that points the daemon at it
    (with a 200 ms watchdog)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    sock.close()


async def test_ready_watchdog_and_stopping_are_sent(bus_address, tmp_path, notify):
    sock, env = notify
    d = Daemon(bus_address, workdir=str(tmp_path / "d"), env=env)
    try:
        d.start()
        ready = await receive(sock, "READY=1")
        assert any("STATUS=Serving 1 device(s)" in s for s in ready)
        # Pinged at half the watchdog interval, from the loop: several within a second.
        pings = await receive(sock, "WATCHDOG=1")
        pings += await receive(sock, "WATCHDOG=1")
        assert sum("WATCHDOG=1" in s for s in pings) >= 2
        d.proc.send_signal(signal.SIGTERM)
        await receive(sock, "STOPPING=1")
        assert d.stop() == 0
    finally:
        d.stop()


async def test_a_stopped_loop_sends_no_pings(bus_address, tmp_path, notify):
    sock, env = notify
    d = Daemon(bus_address, workdir=str(tmp_path / "d"), env=env)
    try:
        d.start()
        await receive(sock, "WATCHDOG=1")
        d.proc.send_signal(signal.SIGSTOP)  # what a hung loop looks like from outside
        await wait_until(lambda: stopped(d.proc.pid), what="the daemon stopped")
        while True:  # drain what was sent before the stop
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        try:
            await receive(sock, "WATCHDOG=1", timeout=0.5)
        except TimeoutError:
            pass
        else:
            raise AssertionError("a stopped daemon pinged the watchdog")
        d.proc.send_signal(signal.SIGCONT)
        await receive(sock, "WATCHDOG=1")  # and it resumes
    finally:
        d.stop()
