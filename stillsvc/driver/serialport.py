"""Exclusive access to a serial port that other programs may share.

A device on a shared serial line may also be used by modem tools, terminal programs
or another instance of the service. Two cooperating conventions keep them apart and
are both honoured while the port is open:

* the UUCP lock file ``<lock_dir>/LCK..<tty basename>`` holding the owner's PID as
  ``"%10d\\n"`` — the only convention most serial tools (minicom, picocom, lockdev)
  check, and the one that also stops root, which ignores ``TIOCEXCL``;
* ``TIOCEXCL`` on the open descriptor, so unprivileged programs that skip the lock
  file get ``EBUSY`` from ``open()``.

The calls block; the service runs them in worker threads. A :class:`SerialPort` is
meant to be used by one thread at a time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import select
import struct
import tempfile
import termios
import time
from types import TracebackType

import structlog

from stillsvc.common.errors import AccessDenied, Busy, Disconnected, Failed, NotFound, Timeout

log = structlog.get_logger(__name__)

# A lock file that is empty or unreadable may still be in the middle of being written
# by a tool that creates it with O_EXCL and fills it afterwards; give it this long.
UNPARSABLE_GRACE_SECONDS = 5.0
_ACQUIRE_ATTEMPTS = 5
_GONE_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV})


def lock_file_path(device_path: str, lock_dir: str = "/run/lock") -> str:
    """The UUCP lock file for ``device_path``: ``<lock_dir>/LCK..<basename>``."""
    return os.path.join(lock_dir, "LCK.." + os.path.basename(device_path))


def _parse_pid(data: bytes) -> int | None:
    """PID from lock file contents: ASCII (any padding) or a 4-byte native int."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if text.isdigit():
        pid = int(text)
    elif len(data) == 4:  # binary format written by old tools
        pid = struct.unpack("=i", data)[0]
    else:
        return None
    return pid if pid > 0 else None


def read_lock_owner(path: str) -> int | None:
    """PID recorded in the lock file at ``path``; None if it is missing or unparsable."""
    try:
        with open(path, "rb") as f:
            return _parse_pid(f.read(64))
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _inspect(path: str) -> tuple[int | None, bool]:
    """(owner pid, is stale) of an existing lock file; FileNotFoundError if gone."""
    with open(path, "rb") as f:
        pid = _parse_pid(f.read(64))
        age = time.time() - os.fstat(f.fileno()).st_mtime
    if pid is None:
        return None, age > UNPARSABLE_GRACE_SECONDS
    return pid, not _alive(pid)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


class SerialPort:
    """An exclusively held serial port (TIOCEXCL + LCK..<tty> file)."""

    def __init__(
        self, device_path: str, *, lock_dir: str = "/run/lock", baudrate: int | None = None
    ) -> None:
        if baudrate is not None and not hasattr(termios, f"B{baudrate}"):
            raise ValueError(f"unsupported baud rate {baudrate}")
        self.device_path = device_path
        self.lock_dir = lock_dir
        self.lock_path = lock_file_path(device_path, lock_dir)
        self.baudrate = baudrate
        self._fd: int | None = None
        self._lock_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our lock file
        self._lock_pid = 0

    @property
    def fd(self) -> int | None:
        return self._fd

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> SerialPort:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> int:
        """Take the lock file, open the tty exclusively in raw mode and return the fd."""
        if self._fd is not None:
            return self._fd
        try:  # checked first so a missing device leaves no lock file churn behind
            os.stat(self.device_path)
        except FileNotFoundError:
            raise NotFound(f"serial device {self.device_path} does not exist") from None
        except PermissionError as e:
            raise AccessDenied(f"cannot access {self.device_path}: {e.strerror}") from None
        self._acquire_lock()
        try:
            self._fd = self._open_tty()
        except BaseException:
            self._release_lock()
            raise
        return self._fd

    def close(self) -> None:
        """Give up exclusivity, close the fd and remove our lock file (if still ours)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.ioctl(fd, termios.TIOCNXCL)
            except OSError:
                pass  # device vanished; closing is all that is left
            os.close(fd)
        self._release_lock()

    def read(self, size: int, timeout: float) -> bytes:
        """Wait up to ``timeout`` seconds for input; return what is there (b"" if none)."""
        fd = self._require_open()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if poller.poll(remaining * 1000):
                try:
                    return os.read(fd, size)
                except BlockingIOError:
                    pass  # spurious wakeup: wait for the rest of the timeout
                except OSError as e:
                    raise self._io_error("read", e) from e
            if remaining <= 0:
                return b""

    def write(self, data: bytes, timeout: float) -> int:
        """Write all of ``data`` within ``timeout`` seconds or raise Timeout."""
        fd = self._require_open()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        view, done = memoryview(data), 0
        while done < len(data):
            try:
                done += os.write(fd, view[done:])
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise self._io_error("write", e) from e
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise Timeout(
                    f"{self.device_path}: wrote {done} of {len(data)} bytes in {timeout} s"
                )
        return done

    # -- internals ---------------------------------------------------------------

    def _require_open(self) -> int:
        if self._fd is None:
            raise Failed(f"serial port {self.device_path} is not open")
        return self._fd

    def _io_error(self, what: str, e: OSError) -> Exception:
        if e.errno in _GONE_ERRNOS:
            return Disconnected(f"{self.device_path} went away during {what}")
        return Failed(f"{self.device_path}: {what} failed: {e.strerror}")

    def _acquire_lock(self) -> None:
        """Link a fully written temp file into place, so nobody ever sees a partial one."""
        pid = os.getpid()
        try:
            tmp_fd, tmp = tempfile.mkstemp(prefix=f"LTMP.{pid}.", dir=self.lock_dir)
        except OSError as e:
            kind = AccessDenied if isinstance(e, PermissionError) else Failed
            raise kind(f"cannot create lock files in {self.lock_dir}: {e.strerror}") from None
        try:
            with os.fdopen(tmp_fd, "wb") as f:
                f.write(b"%10d\n" % pid)
                os.fchmod(f.fileno(), 0o644)  # other tools must be able to read the pid
                st = os.fstat(f.fileno())
            for _ in range(_ACQUIRE_ATTEMPTS):
                try:
                    os.link(tmp, self.lock_path)  # atomic O_EXCL-like create
                    self._lock_id, self._lock_pid = (st.st_dev, st.st_ino), pid
                    return
                except FileExistsError:
                    pass
                try:
                    owner, stale = _inspect(self.lock_path)
                except FileNotFoundError:
                    continue
                if not stale:
                    raise Busy(self._held_message(owner))
                self._break_stale(owner)
            raise Busy(f"{self.device_path}: lock file {self.lock_path} keeps changing hands")
        finally:
            os.unlink(tmp)

    def _break_stale(self, stale_pid: int | None) -> None:
        """Remove a stale lock file without ever removing a live process's lock.

        Two processes may both judge the same file stale; the second could then hit a
        lock file the first has just created. Renaming aside first and re-checking the
        file we actually got catches that, and puts a live lock back where it was.
        """
        aside = f"{self.lock_path}.stale.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return  # somebody else broke it; retry
        try:
            owner, stale = _inspect(aside)
            if stale:
                log.warning("broke stale serial lock", device=self.device_path,
                            stale_pid=owner, lock_file=self.lock_path)
            else:
                try:
                    os.link(aside, self.lock_path)
                except FileExistsError:
                    log.error("displaced a live serial lock and could not restore it",
                              device=self.device_path, pid=owner, lock_file=self.lock_path)
        finally:
            os.unlink(aside)

    def _held_message(self, pid: int | None) -> str:
        if pid is None:
            return f"{self.device_path} is held by an unknown process (lock file {self.lock_path})"
        return f"{self.device_path} is held by process {pid} ({_process_name(pid)})"

    def _release_lock(self) -> None:
        """Remove the lock file only if it is still the one we created with our pid."""
        lock_id, self._lock_id = self._lock_id, None
        if lock_id is None:
            return
        try:
            st = os.stat(self.lock_path)
            ours = read_lock_owner(self.lock_path) == self._lock_pid
            if ours and (st.st_dev, st.st_ino) == lock_id:
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass

    def _open_tty(self) -> int:
        flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.device_path, flags)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Busy(f"{self.device_path} is held exclusively by another process") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise AccessDenied(f"cannot open {self.device_path}: {e.strerror}") from None
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                raise NotFound(f"serial device {self.device_path} is not present") from None
            raise Failed(f"cannot open {self.device_path}: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, termios.TIOCEXCL)
            self._make_raw(fd)
        except (OSError, termios.error) as e:
            os.close(fd)
            raise Failed(f"cannot set up {self.device_path}: {e}") from None
        return fd

    def _make_raw(self, fd: int) -> None:
        """8N1 raw mode, no echo or translation, and drop input left from before."""
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
                   | termios.IXOFF | termios.IXANY)
        oflag &= ~termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)
        cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
        cc[termios.VMIN], cc[termios.VTIME] = 0, 0
        if self.baudrate is not None:
            ispeed = ospeed = getattr(termios, f"B{self.baudrate}")
        termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
        termios.tcflush(fd, termios.TCIFLUSH)
