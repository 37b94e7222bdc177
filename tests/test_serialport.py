"""SerialPort against a pseudo-terminal: the slave path is the device, the master is the far end."""

from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from stillsvc.common.errors import Busy, NotFound, Timeout
from stillsvc.driver import serialport
from stillsvc.driver.serialport import SerialPort, lock_file_path, read_lock_owner

# Runs as another user: tries to open the tty and reports the uid and the outcome.
OPENER = """
import errno, os, sys
try:
    os.close(os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
    result = "ok"
except OSError as e:
    result = errno.errorcode[e.errno]
print(os.getuid(), result)
"""


class Pty:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        os.chmod(self.path, 0o666)  # reachable by the unprivileged opener

    def read_master(self, size: int, timeout: float = 2.0) -> bytes:
        data, deadline = b"", time.monotonic() + timeout
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.master], [], [], remaining)[0]:
                break
            data += os.read(self.master, size - len(data))
        return data


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = Pty()
    yield p
    os.close(p.master)
    os.close(p.slave)


@pytest.fixture
def lock_dir(tmp_path: Path) -> str:
    return str(tmp_path)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    # Popen returns once exec has begun; the process name changes a moment later.
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.001)
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


def write_lock(path: str, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


def test_open_writes_lock_file_and_close_removes_it(pty: Pty, lock_dir: str) -> None:
    port = SerialPort(pty.path, lock_dir=lock_dir)
    lock = lock_file_path(pty.path, lock_dir)
    assert os.path.basename(lock) == "LCK.." + os.path.basename(pty.path)

    fd = port.open()
    assert port.is_open and port.fd == fd
    assert Path(lock).read_bytes() == b"%10d\n" % os.getpid()
    assert len(Path(lock).read_bytes()) == 11
    assert os.listdir(lock_dir) == [os.path.basename(lock)]  # no temp files left over

    port.close()
    assert not os.path.exists(lock)
    assert not port.is_open and port.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)
    port.close()


def test_live_lock_owner_means_busy(
    pty: Pty, lock_dir: str, sleeper: subprocess.Popen[bytes]
) -> None:
    lock = lock_file_path(pty.path, lock_dir)
    write_lock(lock, b"%10d\n" % sleeper.pid)
    before = os.stat(lock)

    with pytest.raises(Busy) as exc:
        SerialPort(pty.path, lock_dir=lock_dir).open()

    assert str(sleeper.pid) in exc.value.message
    assert "sleep" in exc.value.message
    after = os.stat(lock)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert Path(lock).read_bytes() == b"%10d\n" % sleeper.pid


def test_stale_lock_is_broken(pty: Pty, lock_dir: str) -> None:
    lock = lock_file_path(pty.path, lock_dir)
    stale = dead_pid()
    write_lock(lock, b"%10d\n" % stale)

    with capture_logs() as logs, SerialPort(pty.path, lock_dir=lock_dir) as port:
        assert port.is_open
        assert read_lock_owner(lock) == os.getpid()
        assert Path(lock).read_bytes() == b"%10d\n" % os.getpid()
        assert os.listdir(lock_dir) == [os.path.basename(lock)]
    assert [(e["device"], e["stale_pid"]) for e in logs if "stale_pid" in e] == [(pty.path, stale)]
    assert not os.path.exists(lock)


def test_stale_lock_retaken_by_live_process_mid_break_is_left_alone(
    pty: Pty, lock_dir: str, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process breaks the stale lock and takes it between our check and our rename."""
    lock = lock_file_path(pty.path, lock_dir)
    write_lock(lock, b"%10d\n" % dead_pid())
    real_inspect, looked = serialport._inspect, []

    def inspect_then_lose_race(path: str) -> tuple[int | None, bool]:
        result = real_inspect(path)
        if not looked:
            looked.append(path)
            os.unlink(lock)
            write_lock(lock, b"%10d\n" % sleeper.pid)
        return result

    monkeypatch.setattr(serialport, "_inspect", inspect_then_lose_race)
    with pytest.raises(Busy, match=str(sleeper.pid)):
        SerialPort(pty.path, lock_dir=lock_dir).open()
    assert looked == [lock]
    assert Path(lock).read_bytes() == b"%10d\n" % sleeper.pid
    assert os.listdir(lock_dir) == [os.path.basename(lock)]


def test_second_instance_in_same_process_is_busy(pty: Pty, lock_dir: str) -> None:
    with SerialPort(pty.path, lock_dir=lock_dir):
        with pytest.raises(Busy, match=str(os.getpid())):
            SerialPort(pty.path, lock_dir=lock_dir).open()
        assert read_lock_owner(lock_file_path(pty.path, lock_dir)) == os.getpid()


def test_unparsable_lock_is_busy_while_fresh_and_stale_when_old(pty: Pty, lock_dir: str) -> None:
    lock = lock_file_path(pty.path, lock_dir)
    write_lock(lock, b"")
    with pytest.raises(Busy):
        SerialPort(pty.path, lock_dir=lock_dir).open()
    assert Path(lock).read_bytes() == b""

    old = time.time() - 60
    os.utime(lock, (old, old))
    with SerialPort(pty.path, lock_dir=lock_dir):
        assert read_lock_owner(lock) == os.getpid()


def test_read_lock_owner_formats(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    path = str(tmp_path / "LCK..x")
    assert read_lock_owner(path) is None
    for content in (b"%10d\n" % sleeper.pid, b"%d\n" % sleeper.pid, struct.pack("=i", sleeper.pid)):
        write_lock(path, content)
        assert read_lock_owner(path) == sleeper.pid
    for content in (b"", b"garbage\n", b"         0\n"):
        write_lock(path, content)
        assert read_lock_owner(path) is None


def test_binary_lock_of_live_process_is_honoured(
    pty: Pty, lock_dir: str, sleeper: subprocess.Popen[bytes]
) -> None:
    write_lock(lock_file_path(pty.path, lock_dir), struct.pack("=i", sleeper.pid))
    with pytest.raises(Busy, match=str(sleeper.pid)):
        SerialPort(pty.path, lock_dir=lock_dir).open()


def _open_as_nobody(path: str) -> str:
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", OPENER, path],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()
    assert out[0] == "65534"  # really unprivileged, or the check below means nothing
    return out[1]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the second opener as uid 65534")
def test_tty_is_exclusive_while_open(pty: Pty, lock_dir: str) -> None:
    assert _open_as_nobody(pty.path) == "ok"  # the device is reachable at all
    port = SerialPort(pty.path, lock_dir=lock_dir)
    port.open()
    assert _open_as_nobody(pty.path) == "EBUSY"
    port.close()
    assert _open_as_nobody(pty.path) == "ok"


def test_data_round_trip(pty: Pty, lock_dir: str) -> None:
    payload = b"ESC/I\r\n\x00\xff\x03\x11\x13" * 50  # control bytes must pass untouched
    with SerialPort(pty.path, lock_dir=lock_dir, baudrate=9600) as port:
        assert termios.tcgetattr(pty.slave)[4:6] == [termios.B9600, termios.B9600]
        assert port.write(payload, timeout=2.0) == len(payload)
        assert pty.read_master(len(payload) + 1, timeout=0.5) == payload

        os.write(pty.master, b"\x06ack\r\n")
        assert port.read(64, timeout=2.0) == b"\x06ack\r\n"

        start = time.monotonic()
        assert port.read(64, timeout=0.2) == b""
        assert time.monotonic() - start >= 0.2


def test_write_times_out_when_nobody_reads(pty: Pty, lock_dir: str) -> None:
    with SerialPort(pty.path, lock_dir=lock_dir) as port:
        with pytest.raises(Timeout, match="wrote"):
            port.write(b"x" * (4 << 20), timeout=0.2)


@pytest.mark.parametrize("how", ["rewritten", "replaced"])
def test_close_keeps_lock_taken_over_by_another_process(
    pty: Pty, lock_dir: str, sleeper: subprocess.Popen[bytes], how: str
) -> None:
    lock = lock_file_path(pty.path, lock_dir)
    port = SerialPort(pty.path, lock_dir=lock_dir)
    port.open()
    if how == "replaced":
        os.unlink(lock)
    write_lock(lock, b"%10d\n" % sleeper.pid)

    port.close()
    assert not port.is_open
    assert Path(lock).read_bytes() == b"%10d\n" % sleeper.pid


def test_missing_device_is_not_found(tmp_path: Path, lock_dir: str) -> None:
    missing = str(tmp_path / "ttyUSB9")
    with pytest.raises(NotFound, match="ttyUSB9"):
        SerialPort(missing, lock_dir=lock_dir).open()
    assert not os.path.exists(lock_file_path(missing, lock_dir))
