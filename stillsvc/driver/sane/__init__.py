"""The SANE transport: libsane in a worker process of its own.

SANE backends are C code, some of them vendor blobs, and some block for seconds.
Nothing of libsane is loaded into the service: each bridged device gets a
:class:`SaneProcess`, a worker process (:mod:`.worker`) spawned on demand that
makes the device's SANE calls, talking over two pipes. A backend that crashes
takes its worker with it and nothing else: the call in progress fails with
:class:`WorkerDied` (the reason names the signal), and the next call spawns a
new worker. A backend that stops answering is given ``timeout`` seconds, then
its worker is killed (:class:`WorkerHung`).

Every method blocks and belongs on the device's worker thread. Pixel data comes
through the pipe in messages of up to 1 MiB of whole rows, read straight into
the buffer that is handed on (one copy, on the device's thread, none through
the event loop); the pipe is enlarged to 1 MiB so the worker reads the next
block from the backend while the service writes out the last.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stillsvc.common.errors import (
    AccessDenied,
    Busy,
    Cancelled,
    Empty,
    Failed,
    InvalidArgument,
    NotSupported,
    StillError,
)
from stillsvc.driver.sane.pipe import HEADER

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024
#: How long a backend may take for one call (or one block of a scan) before its worker is killed.
DEFAULT_TIMEOUT = 60.0
#: How often a scan waiting for the worker looks whether it was cancelled (seconds).
CANCEL_SLICE = 0.1


class WorkerDied(Failed):
    """The worker process ended while it had a call to answer (the backend crashed)."""


class WorkerHung(Failed):
    """The backend did not answer in time; its worker was killed."""


#: What a SANE status means to a client, and how to say it.
_STATUS_ERRORS: dict[str, tuple[type[StillError], str]] = {
    "DEVICE_BUSY": (Busy, "the scanner is busy (another program may be using it)"),
    "JAMMED": (Failed, "paper jam in the document feeder"),
    "NO_DOCS": (Empty, "the document feeder is empty"),
    "COVER_OPEN": (Failed, "the scanner's cover is open"),
    "CANCELLED": (Cancelled, "the scan was cancelled"),
    "INVAL": (InvalidArgument, "the scanner refused the request as invalid"),
    "UNSUPPORTED": (NotSupported, "the scanner does not support this"),
    "ACCESS_DENIED": (AccessDenied, "the scanner refused access"),
    "IO_ERROR": (Failed, "input/output error talking to the scanner"),
    "NO_MEM": (Failed, "the SANE backend ran out of memory"),
}


def status_error(status: str, call: str) -> StillError:
    """The service's error for a SANE status, with SANE's name in the message."""
    kind, text = _STATUS_ERRORS.get(status, (Failed, "the SANE backend failed"))
    return kind(f"{text} (SANE_STATUS_{status} from {call})")


@dataclass(frozen=True)
class PageGeometry:
    """A page as the worker announces it, in the raw layout."""

    width: int
    height: int
    mode: str
    depth: int


class SaneProcess:
    """One SANE device's worker process (spawned on first use), and the calls to it."""

    def __init__(self, device: str, timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None) -> None:
        self.device = device
        self.timeout = timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        #: How many workers this device has had (1 after the first spawn).
        self.spawned = 0
        #: Why the last worker ended, when it did not end on request.
        self.last_death = ""
        self._cancel_sent = False

    # -- the process ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        if self.running:
            return
        self._reap()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stillsvc.driver.sane.worker", "--device", self.device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, close_fds=True)
        self.spawned += 1
        try:
            assert self.proc.stdout is not None
            fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only costs speed
        self._write({"op": "hello"}, "starting")
        self.receive("starting")

    def stop(self) -> None:
        """End the worker (asked nicely, then killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "exit"}\n')
                proc.stdin.flush()
                proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_pipes(proc)

    def kill(self, why: str) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.last_death = why
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._close_pipes(proc)

    def _reap(self) -> None:
        if self.proc is not None:
            self._close_pipes(self.proc)
            self.proc = None

    @staticmethod
    def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    def _died(self, during: str) -> WorkerDied:
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            self._close_pipes(proc)
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        self.last_death = f"the SANE backend's worker process {how}"
        return WorkerDied(f"{self.last_death} during {during}")

    # -- messages -------------------------------------------------------------------------
    def send(self, op: str, **arguments: Any) -> None:
        if not self.running:
            self.spawn()
        self._write({"op": op, **arguments}, op)

    def _write(self, request: dict[str, Any], during: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            os.write(self.proc.stdin.fileno(), json.dumps(request).encode() + b"\n")
        except OSError:
            raise self._died(during) from None

    def cancel(self) -> None:
        """Ask the worker to ``sane_cancel`` now, even mid-read (safe from any thread)."""
        proc = self.proc
        if proc is not None and proc.stdin is not None and proc.poll() is None:
            try:
                os.write(proc.stdin.fileno(), b'{"op": "cancel"}\n')
            except OSError:
                pass

    def receive(self, during: str, timeout: float | None = None,
                cancel: threading.Event | None = None) -> tuple[dict[str, Any], bytes]:
        """The next message: its JSON and its payload. While it waits, ``cancel`` being
        set sends the worker ``cancel`` (``sane_cancel`` at once, even mid-read)."""
        header = self._read_exact(HEADER.size, during, timeout, cancel)
        size, payload_size = HEADER.unpack(header)
        message = json.loads(bytes(self._read_exact(size, during, timeout, cancel)))
        payload = self._read_exact(payload_size, during, timeout, cancel) if payload_size else b""
        return message, payload

    def _read_exact(self, size: int, during: str, timeout: float | None,
                    cancel: threading.Event | None = None) -> bytes:
        """``size`` bytes from the worker: usually one read (the pipe holds a whole
        message), else the pieces joined. Each result is new memory, the caller's to keep."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pieces: list[bytes] = []
        got = 0
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while got < size:
            slice_ms = CANCEL_SLICE * 1000 if cancel is not None and not self._cancel_sent else wait * 1000
            if not poller.poll(min(slice_ms, max(0.0, deadline - time.monotonic()) * 1000)):
                if cancel is not None and cancel.is_set() and not self._cancel_sent:
                    self._cancel_sent = True
                    self.cancel()
                if time.monotonic() < deadline:
                    continue
                self.kill(f"the SANE backend did not answer within {wait:g} s")
                raise WorkerHung(f"the SANE backend did not answer within {wait:g} s during {during}; "
                                 "its worker process was stopped")
            piece = os.read(fd, size - got)
            if not piece:
                raise self._died(during)
            pieces.append(piece)
            got += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def request(self, op: str, **arguments: Any) -> dict[str, Any]:
        """One request and its reply; a SANE error status raises the service's error for it."""
        with self._lock:
            self.send(op, **arguments)
            reply, _ = self.receive(op)
        error = reply.get("error")
        if error is not None:
            raise status_error(str(error.get("status")), str(error.get("call", op)))
        return reply

    # -- SANE ---------------------------------------------------------------------------------
    def devices(self, local_only: bool = True) -> list[dict[str, str]]:
        return list(self.request("devices", local_only=local_only)["devices"])

    def open(self) -> list[dict[str, Any]]:
        """Open the device (if it is not open) and return its options with their values."""
        return list(self.request("open")["options"])

    def close(self) -> None:
        if self.running:
            self.request("close")

    def get(self, indices: list[int]) -> list[Any]:
        return list(self.request("get", indices=indices)["values"])

    def set(self, index: int, value: Any) -> dict[str, Any]:
        return self.request("set", index=index, value=value)

    def stats(self) -> dict[str, Any]:
        return self.request("stats") if self.running else {"calls": {}, "open": False, "pid": None}

    def scan(self, cancel: threading.Event) -> Iterator[PageGeometry | bytes]:
        """One page: ``sane_start`` and the frames. Yields the page's geometry, then
        blocks of whole rows. Closing the iterator early cancels the scan and
        drains the worker. A SANE error (NO_DOCS at the start of a page, JAMMED
        within it) raises the service's error."""
        with self._lock:
            self.send("scan")
            self._cancel_sent = False
            finished = False
            try:
                while True:
                    message, payload = self.receive("a scan", cancel=cancel)
                    if "data" in message:
                        yield payload
                    elif "page" in message:
                        p = message["page"]
                        yield PageGeometry(int(p["width"]), int(p["height"]), str(p["mode"]), int(p["depth"]))
                    elif "end" in message:
                        finished = True
                        return
                    elif "error" in message:
                        finished = True
                        error = message["error"]
                        raise status_error(str(error.get("status")), str(error.get("call", "sane_read")))
                    if cancel.is_set():
                        break
            finally:
                if not finished and self.running:
                    self._drain()

    def _drain(self) -> None:
        """A scan left early: cancel it and read the worker's messages up to its end."""
        if not self._cancel_sent:
            self._cancel_sent = True
            self.cancel()
        while self.running:
            message, _ = self.receive("cancelling a scan")
            if "end" in message or "error" in message:
                return

    def finish(self) -> None:
        """End a batch: ``sane_cancel`` (after the last page, or a page left unread)."""
        if self.running:
            self.request("finish")


__all__ = ["DEFAULT_TIMEOUT", "PageGeometry", "SaneProcess", "WorkerDied", "WorkerHung",
           "status_error"]
