"""Streaming an acquisition into a client's file descriptor.

The whole pipeline — pages and bands from the minidriver, encoding
(:mod:`stillsvc.imaging`), writing into the client's descriptor — runs on the
device's worker thread, so the event loop never touches image data and never
waits on a reader. The descriptor is non-blocking; the thread waits for room
with ``poll()`` in short slices and checks for cancellation in between, so a
slow reader slows the scan (the thread writes only as fast as it reads), a
reader that never reads parks one transfer and nothing else, and cancelling —
by the client, by the session closing, by the device going away — takes effect
within a slice. A reader that closes its end ends the transfer at once.

A reader that takes nothing for ``service.transfer_stall_ms`` stops the transfer
with ``Timeout``, so a stalled client cannot keep the device. A transfer that is
moving data keeps its session's device lock past the lock's maximum hold time
(the device asks :meth:`Transfer.progressed_within`); a feeder job may take minutes.

Only a session in data mode may transfer: that is checked here, before anything
is locked or sent to the driver.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from stillsvc.common.errors import Cancelled, Failed, InvalidArgument, StillError, Timeout, quote
from stillsvc.core.sessions import Hold
from stillsvc.driver import PageInfo
from stillsvc.imaging import FORMATS, MULTIPAGE_FORMATS, ImageInfo, make_encoder

if TYPE_CHECKING:
    from stillsvc.core.devices import Device
    from stillsvc.core.items import AppItem
    from stillsvc.core.sessions import Session

log = structlog.get_logger(__name__)

WAIT_SLICE_MS = 100  # how often a writer waiting for the reader checks for cancellation
PROGRESS_INTERVAL = 0.1  # seconds between progress reports, at most

Progress = Callable[[int, int, int], None]  # page (1-based), percent of the page, bytes written


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


def check_descriptor(fd: int) -> None:
    """Check ``fd`` is open for writing (and not a directory)."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise InvalidArgument(f"unusable file descriptor: {e.strerror}") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise InvalidArgument("the file descriptor is not open for writing")
    if stat.S_ISDIR(mode):
        raise InvalidArgument("the file descriptor is a directory")


class Transfer:
    """One acquisition from an application item into a descriptor."""

    def __init__(self, device: Device, session: Session, app: AppItem, fd: int, fmt: str,
                 progress: Progress | None = None) -> None:
        session.require_data("transferring images")
        if fmt not in FORMATS:
            raise InvalidArgument(f"unknown format {quote(fmt)} (formats: {', '.join(FORMATS)})")
        self.device = device
        self.session = session
        self.app = app
        self.fd = fd
        self.format = fmt
        self.progress = progress
        self.cancel = threading.Event()
        self.cancel_reason = "transfer cancelled"
        self.cancel_error: type[StillError] = Cancelled
        self.stall = device.manager.limits.transfer_stall_ms / 1000
        #: When data last moved (monotonic; written by the worker thread).
        self.last_progress = time.monotonic()
        #: Set when run() has ended, however it ended.
        self.finished = asyncio.Event()
        self.summary = Summary(format=fmt, content_type=make_encoder(fmt).content_type)
        self.log = log.bind(device=device.id, session=session.number, client=session.client.name, item=app.path)

    def stop(self, reason: str = "transfer cancelled", error: type[StillError] = Cancelled) -> None:
        """End the transfer; its call fails with ``error`` (Cancelled, or Disconnected
        when the device went away)."""
        if not self.cancel.is_set():
            self.cancel_reason = reason
            self.cancel_error = error
            self.cancel.set()

    def progressed_within(self, seconds: float) -> bool:
        """Whether data moved (or the transfer started) in the last ``seconds``."""
        return time.monotonic() - self.last_progress < seconds

    async def run(self) -> Summary:
        """Run the whole transfer under the device lock; the descriptor is closed at the end."""
        loop = asyncio.get_running_loop()
        try:
            check_descriptor(self.fd)
            self.app.check_device_access()
            os.set_blocking(self.fd, False)
            own_lock = self.device.device_lock.holder is self.session
            owner: Any = self.session if own_lock else Hold("transfer", self.session)
            if not own_lock:
                await self.device.lock(owner, self.device.manager.limits.io_wait_ms / 1000, limited=False)
            try:
                self.last_progress = time.monotonic()
                return await self._stream(loop)
            finally:
                if not own_lock:
                    await self.device.unlock(owner)
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.finished.set()

    async def _stream(self, loop: asyncio.AbstractEventLoop) -> Summary:
        driver = self.device.driver
        item = self.app.driver_item
        values = dict(self.app.values)
        self.log.info("transfer starting", format=self.format)
        await self.device._guarded(driver.write_properties, item, values, self.session.mode)
        try:
            await self.device.call(self._produce, item, values, loop)
        except Cancelled:
            pass
        except StillError:
            raise
        except Exception as e:
            self.log.error("transfer failed in the driver", exc_info=e)
            raise Failed(f"the {driver.name} driver failed during the transfer: {type(e).__name__}") from e
        if self.cancel.is_set():
            self.log.info("transfer stopped", reason=self.cancel_reason, bytes=self.summary.bytes)
            raise self.cancel_error(f"{self.cancel_reason} after {self.summary.bytes} bytes")
        self.log.info("transfer done", bytes=self.summary.bytes, pages=self.summary.pages)
        return self.summary

    def _produce(self, item: Any, values: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: pages and bands from the driver, encoded, into the descriptor."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        put = functools.partial(self._write, poller)
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
            put(encoder.begin_page(info))
            rows = 0
            for band in page.bands():
                if self.cancel.is_set():
                    break
                put(encoder.add_rows(band))
                rows += len(band) // info.bytes_per_line
                now = time.monotonic()
                if self.progress and now - last_report >= PROGRESS_INTERVAL:
                    last_report = now
                    loop.call_soon_threadsafe(self._report, number, rows * 100 // max(1, info.height))
            if self.cancel.is_set():
                break
            put(encoder.end_page())
            if self.progress:
                loop.call_soon_threadsafe(self._report, number, 100)
            if self.format not in MULTIPAGE_FORMATS:
                break  # one page per transfer for single-image formats
        if not self.cancel.is_set():
            if self.summary.pages == 0:
                raise Failed("the device produced no page")
            put(encoder.finish())

    def _report(self, page: int, percent: int) -> None:
        if self.progress is not None and not self.cancel.is_set():
            self.progress(page, percent, self.summary.bytes)

    def _write(self, poller: select.poll, data: bytes) -> None:
        """Write all of ``data``, waiting for the reader in slices; raises Cancelled
        (when stopped, and when the reader has stalled: then with Timeout as the error)."""
        view = memoryview(data)
        while view:
            if self.cancel.is_set():
                raise Cancelled(self.cancel_reason)
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                if time.monotonic() - self.last_progress >= self.stall:
                    self.stop(f"the reader took no data for {self.stall * 1000:.0f} ms", Timeout)
                    raise Cancelled(self.cancel_reason) from None
                poller.poll(WAIT_SLICE_MS)
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    self.stop("the reader closed its end of the stream")
                    raise Cancelled(self.cancel_reason) from None
                raise Failed(f"writing the image failed: {e.strerror}") from None
            view = view[written:]
            self.summary.bytes += written
            self.last_progress = time.monotonic()


def _image_info(info: PageInfo) -> ImageInfo:
    return ImageInfo(info.width, info.height, info.mode, info.depth, info.resolution)
