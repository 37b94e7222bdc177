"""Streaming an acquisition into a client's file descriptor.

Two halves meet in a small bounded queue:

* the *producer* runs on the device's worker thread: it pulls pages and bands from
  the minidriver and encodes them (:mod:`stillsvc.imaging`);
* the *writer* runs on the event loop: it writes each chunk into the client's
  descriptor — non-blocking for pipes and sockets, waiting for writability with
  the loop, so a reader that does not read costs the service nothing but one
  parked transfer; for regular files, in a worker thread.

The queue holds a few chunks only, so a slow reader slows the scan (the producer
waits for room), never the service. Cancelling — by the client, by the reader
closing its end, by the session closing, by the device going away — stops both.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from .driver import PageInfo
from .errors import Cancelled, Failed, InvalidArgument, StillError
from .imaging import FORMATS, MULTIPAGE_FORMATS, ImageInfo, make_encoder

if TYPE_CHECKING:
    from .devices import Device
    from .items import AppItem
    from .sessions import Session

log = structlog.get_logger(__name__)

QUEUE_DEPTH = 4
PROGRESS_INTERVAL = 0.1  # seconds between progress reports, at most

Progress = Callable[[int, int, int], None]  # page (1-based), percent of the page, bytes written


class _ReaderGone(Exception):
    pass


@dataclass
class Summary:
    format: str
    content_type: str
    bytes: int = 0
    pages: int = 0
    width: int = 0
    height: int = 0
    mode: str = ""
    depth: int = 0
    resolution: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Chunks:
    """Bounded hand-over from the producer thread to the writer on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: threading.Event) -> None:
        self.loop = loop
        self.cancel = cancel
        self.items: deque[bytes] = deque()
        self.space = threading.Semaphore(QUEUE_DEPTH)
        self.ready = asyncio.Event()
        self.finished = False

    # producer side (worker thread)
    def put(self, chunk: bytes) -> None:
        if not chunk:
            return
        while not self.space.acquire(timeout=0.1):
            if self.cancel.is_set():
                raise Cancelled("transfer cancelled")
        self.loop.call_soon_threadsafe(self._push, chunk)

    def _push(self, chunk: bytes) -> None:
        self.items.append(chunk)
        self.ready.set()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        self.finished = True
        self.ready.set()

    # writer side (event loop)
    async def get(self) -> bytes | None:
        while not self.items:
            if self.finished:
                return None
            self.ready.clear()
            await self.ready.wait()
        chunk = self.items.popleft()
        self.space.release()
        return chunk

    def drain(self) -> None:
        while self.items:
            self.items.popleft()
            self.space.release()


def check_descriptor(fd: int) -> bool:
    """Check ``fd`` is open for writing; returns whether it is a regular file."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise InvalidArgument(f"unusable file descriptor: {e.strerror}") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise InvalidArgument("the file descriptor is not open for writing")
    if stat.S_ISDIR(mode):
        raise InvalidArgument("the file descriptor is a directory")
    return stat.S_ISREG(mode)


class Transfer:
    """One acquisition from an application item into a descriptor."""

    def __init__(self, device: Device, session: Session, app: AppItem, fd: int, fmt: str,
                 progress: Progress | None = None) -> None:
        if fmt not in FORMATS:
            raise InvalidArgument(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
        self.device = device
        self.session = session
        self.app = app
        self.fd = fd
        self.format = fmt
        self.progress = progress
        self.cancel = threading.Event()
        self._stopped = asyncio.Event()  # the same, for the loop
        self.cancel_reason = "transfer cancelled"
        self.summary = Summary(format=fmt, content_type=make_encoder(fmt).content_type)
        self.log = log.bind(device=device.id, session=session.number, client=session.client.name, item=app.path)

    def stop(self, reason: str = "transfer cancelled") -> None:
        if not self.cancel.is_set():
            self.cancel_reason = reason
            self.cancel.set()
            self._stopped.set()

    async def run(self) -> Summary:
        """Run the whole transfer under the device lock; the descriptor is closed at the end."""
        loop = asyncio.get_running_loop()
        try:
            regular = check_descriptor(self.fd)
            self.app.check_device_access()
            if not regular:
                os.set_blocking(self.fd, False)
            own_lock = self.device.device_lock.holder is self.session
            owner: Any = self.session if own_lock else _TransferHold(self.session)
            if not own_lock:
                await self.device.lock(owner, self.device.manager.limits.io_wait_ms / 1000, limited=False)
            try:
                return await self._stream(loop, regular)
            finally:
                if not own_lock:
                    await self.device.unlock(owner)
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass

    async def _stream(self, loop: asyncio.AbstractEventLoop, regular: bool) -> Summary:
        driver = self.device.driver
        item = self.app.driver_item
        values = dict(self.app.values)
        self.log.info("transfer starting", format=self.format)
        await self.device._guarded(driver.write_properties, item, values)
        chunks = _Chunks(loop, self.cancel)
        producer = asyncio.ensure_future(self.device.call(self._produce, chunks, item, values, loop))
        try:
            written = 0
            while True:
                chunk = await chunks.get()
                if chunk is None:
                    break
                if self.cancel.is_set():
                    continue
                try:
                    if regular:
                        await loop.run_in_executor(None, _write_blocking, self.fd, chunk)
                    else:
                        await self._write_nonblocking(loop, chunk)
                except _ReaderGone:
                    self.stop("the reader closed its end of the stream")
                    chunks.drain()
                    continue
                written += len(chunk)
                self.summary.bytes = written
        except BaseException:
            self.stop("transfer interrupted")
            chunks.drain()
            raise
        finally:
            chunks.drain()
        try:
            await producer
        except Cancelled:
            pass
        except StillError:
            raise
        except Exception as e:
            self.log.error("transfer failed in the driver", exc_info=e)
            raise Failed(f"the {driver.name} driver failed during the transfer: {type(e).__name__}") from e
        if self.cancel.is_set():
            self.log.info("transfer stopped", reason=self.cancel_reason, bytes=self.summary.bytes)
            raise Cancelled(f"{self.cancel_reason} after {self.summary.bytes} bytes")
        self.log.info("transfer done", bytes=self.summary.bytes, pages=self.summary.pages)
        return self.summary

    def _produce(self, chunks: _Chunks, item: Any, values: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: pages and bands from the driver, encoded, into ``chunks``."""
        try:
            encoder = make_encoder(self.format)
            pages = self.device.driver.acquire(item, values, self.session.mode, self.cancel)
            last_report = 0.0
            for page in pages:
                if self.cancel.is_set():
                    break
                info = _image_info(page.info)
                self.summary.pages += 1
                number = self.summary.pages
                s = self.summary
                s.width, s.height, s.mode, s.depth, s.resolution = (
                    info.width, info.height, info.mode, info.depth, info.resolution)
                chunks.put(encoder.begin_page(info))
                rows = 0
                for band in page.bands():
                    if self.cancel.is_set():
                        break
                    chunks.put(encoder.add_rows(band))
                    rows += len(band) // info.bytes_per_line
                    now = time.monotonic()
                    if self.progress and now - last_report >= PROGRESS_INTERVAL:
                        last_report = now
                        loop.call_soon_threadsafe(self._report, number, rows * 100 // max(1, info.height))
                if self.cancel.is_set():
                    break
                chunks.put(encoder.end_page())
                if self.progress:
                    loop.call_soon_threadsafe(self._report, number, 100)
                if self.format not in MULTIPAGE_FORMATS:
                    break  # one page per transfer for single-image formats
            if not self.cancel.is_set():
                if self.summary.pages == 0:
                    raise Failed("the device produced no page")
                chunks.put(encoder.finish())
        finally:
            chunks.close()

    def _report(self, page: int, percent: int) -> None:
        if self.progress is not None and not self.cancel.is_set():
            self.progress(page, percent, self.summary.bytes)

    async def _write_nonblocking(self, loop: asyncio.AbstractEventLoop, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.cancel.is_set():
                return
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await self._writable(loop)
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise _ReaderGone() from None
                raise Failed(f"writing the image failed: {e.strerror}") from None
            view = view[n:]

    async def _writable(self, loop: asyncio.AbstractEventLoop) -> None:
        ready = loop.create_future()
        loop.add_writer(self.fd, lambda: ready.done() or ready.set_result(None))
        stopper = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_writer(self.fd)
            stopper.cancel()


class _TransferHold:
    """The device-lock owner for a transfer by a session that did not lock itself."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def describe(self) -> str:
        return f"a transfer of {self.session.describe()}"


def _write_blocking(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                raise _ReaderGone() from None
            raise Failed(f"writing the image failed: {e.strerror}") from None


def _image_info(info: PageInfo) -> ImageInfo:
    return ImageInfo(info.width, info.height, info.mode, info.depth, info.resolution)
