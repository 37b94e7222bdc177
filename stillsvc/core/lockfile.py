"""The per-device advisory lock file that programs outside the service can see and take.

``<runtime_dir>/devices/<sanitised device id>.lock`` is locked with ``flock(2)``
(exclusive) by the service for as long as it drives the device: while any hold
of the device lock lasts, and for the whole life of a data-mode session. Another
program that wants the device to itself takes the same lock, for example::

    flock /run/stillsvc/devices/sim0.lock vendor-scan-tool

and while it holds it, the service does not touch the device: calls that need
it wait for the file up to their timeout, the device shows as held by another
program, and the event monitor launches nothing.
``stillctl lock DEVICE -- COMMAND`` does better: it asks the service to stand back
(ports released, monitoring paused) and receives the service's own locked file
descriptor, so there is no moment in which a third party could slip in.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

from stillsvc.common.names import sanitise_id


class DeviceLockFile:
    def __init__(self, runtime_dir: str, device_id: str) -> None:
        self.path = Path(runtime_dir) / "devices" / f"{sanitise_id(device_id)}.lock"
        self._fd: int | None = None

    def create(self) -> None:
        """Make the file exist (world-readable, so any program can open and flock it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o755)  # whatever the service's umask
        fd = self._open()
        try:
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def try_take(self) -> bool:
        """Lock it without waiting; False if another program holds it."""
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def hand_over(self) -> int:
        """Give away the locked open file: the returned fd carries the lock; the
        caller sends it on and closes it. The lock lasts until every copy is closed."""
        if self._fd is None:
            raise RuntimeError("lock file is not held")
        fd, self._fd = self._fd, None
        return fd

    def held_elsewhere(self) -> bool:
        if self._fd is not None:
            return False
        if not self.try_take():
            return True
        self.release()
        return False

    def watch_until_free(self, callback: Callable[[], None]) -> threading.Thread:
        """Wait in a thread until nobody holds the lock, then call ``callback`` (from
        that thread). The lock is not kept."""

        def wait() -> None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
            callback()

        thread = threading.Thread(target=wait, name=f"lockwatch-{self.path.stem}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.release()
