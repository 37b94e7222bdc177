"""Streaming a job's pages, encoded, into a client's file descriptor.

A :class:`Transfer` is a consumer of a core job (:mod:`stillsvc.core.jobs`) that
pushes every page into a descriptor: the whole pipeline — pages and bands from
the minidriver, encoding (:mod:`stillsvc.imaging`), writing into the descriptor
— runs on the device's worker thread, so the event loop never touches image data
and never waits on a reader. The descriptor is non-blocking; the thread waits for room
with ``poll()`` in short slices and checks for cancellation in between, so a
slow reader slows the scan (the thread writes only as fast as it reads), a
reader that never reads parks one transfer and nothing else, and cancelling —
by the client, by the session closing, by the device going away — takes effect
within a slice. A reader that closes its end ends the transfer at once.

A reader that takes nothing for ``service.transfer_stall_ms`` stops the transfer
with ``Timeout``, so a stalled client cannot keep the device. A transfer that is
moving data keeps its session's device lock past the lock's maximum hold time
(the device asks the job, :meth:`~stillsvc.core.jobs.Job.progressed_within`); a
feeder job may take minutes.

Only a session in data mode may transfer: the job checks it before anything is
locked or sent to the driver.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stillsvc.common.errors import Cancelled, Failed, InvalidArgument, StillError, Timeout, quote
from stillsvc.core.jobs import Job, image_info
from stillsvc.driver import FILE_VARIANTS, PageInfo
from stillsvc.imaging import FORMATS, MULTIPAGE_FORMATS, make_encoder

if TYPE_CHECKING:
    from stillsvc.core.devices import Device
    from stillsvc.core.items import AppItem
    from stillsvc.core.sessions import Session

#: The format of a transfer that names none, from an item without a "format" property.
DEFAULT_FORMAT = "png"
WAIT_SLICE_MS = 100  # how often a writer waiting for the reader checks for cancellation

Progress = Callable[[int, int, int], None]  # page (1-based), percent of the page, bytes written


@dataclass
class Summary:
    format: str
    content_type: str
    #: A file's name (a camera's picture), empty for scanned pages.
    name: str = ""
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
    """One acquisition from an application item into a descriptor: a job whose
    pages are pushed, encoded in ``fmt`` (empty: the item's ``format`` property,
    else PNG), into ``fd`` (which it closes)."""

    def __init__(self, device: Device, session: Session, app: AppItem, fd: int, fmt: str,
                 progress: Progress | None = None, span: tuple[int, int | None] | None = None) -> None:
        is_file = "resolution" not in app.specs and "size" in app.specs  # a camera's picture, a file
        fmt = fmt or ("native" if is_file else app.values.get("format", DEFAULT_FORMAT))
        if fmt not in FORMATS and fmt not in FILE_VARIANTS:
            raise InvalidArgument(f"unknown format {quote(fmt)} (formats: {', '.join(FORMATS + FILE_VARIANTS)})")
        if fmt in FILE_VARIANTS and not is_file:
            raise InvalidArgument(f"format {fmt} is for items that are files (a camera's pictures); item "
                                  f"{app.name} scans images (formats: {', '.join(FORMATS)})")
        if fmt in FORMATS and is_file:
            raise InvalidArgument(f"item {app.name} is a file: its formats are {', '.join(FILE_VARIANTS)}")
        if span is not None and fmt != "native":
            raise InvalidArgument("the options offset and length are for a file's native bytes only")
        self.fd = fd
        self.format = fmt
        self.progress = progress
        self.job = Job(device, session, app, max_pages=None if fmt in MULTIPAGE_FORMATS else 1,
                       progress=self._report, why="transfer", file=fmt if is_file else "", span=span)
        self.stall = device.manager.limits.transfer_stall_ms / 1000
        self.summary = Summary(format=fmt, content_type="" if is_file else make_encoder(fmt).content_type)
        self.log = self.job.log

    def stop(self, reason: str = "transfer cancelled", error: type[StillError] = Cancelled) -> None:
        """End the transfer; its call fails with ``error``."""
        self.job.stop(reason, error)

    async def run(self) -> Summary:
        """Run the whole transfer; the descriptor is closed at the end."""
        watch: asyncio.Task[None] | None = None
        try:
            check_descriptor(self.fd)
            os.set_blocking(self.fd, False)
            watch = asyncio.get_running_loop().create_task(self._watch_reader())
            async with self.job:
                self.log.info("transfer starting", format=self.format)
                try:
                    if self.job.file is not None:
                        self.summary.content_type = self.job.file.info.content_type
                        self.summary.name = self.job.file.info.name
                        self.summary.pages = 1
                        await self.job.push_file(_FdWriter(self)._write)
                    else:
                        await self.job.push(_FdSink(self))
                except StillError as e:
                    if not self.job.stopped:
                        raise
                    self.log.info("transfer stopped", reason=self.job.stop_reason, bytes=self.summary.bytes)
                    raise self.job.stop_error(f"{self.job.stop_reason} after {self.summary.bytes} bytes") from e
            if self.summary.pages == 0:
                raise Failed("the device produced no page")
            self.log.info("transfer done", bytes=self.summary.bytes, pages=self.summary.pages)
            return self.summary
        finally:
            if watch is not None:
                watch.cancel()
            try:
                os.close(self.fd)
            except OSError:
                pass

    async def _watch_reader(self) -> None:
        """A reader that closes its end stops the transfer within a slice, even while
        the device is still making the next band (a slow scanner): the descriptor is
        looked at now and then for the error or hang-up that says so."""
        poller = select.poll()
        poller.register(self.fd, select.POLLERR | select.POLLHUP)
        while not self.job.stopped:
            await asyncio.sleep(WAIT_SLICE_MS / 1000)
            if any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0)):
                self.job.stop("the reader closed its end of the stream")
                return

    def _report(self, page: int, percent: int) -> None:
        if self.progress is not None:
            self.progress(page, percent, self.summary.bytes)


class _FdWriter:
    """Writes into the transfer's descriptor (worker thread): a file's bytes as they come."""

    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer
        self.job = transfer.job
        self.summary = transfer.summary
        self.poller = select.poll()
        self.poller.register(transfer.fd, select.POLLOUT)

    def _write(self, data: bytes | memoryview) -> None:
        """Write all of ``data``, waiting for the reader in slices; raises Cancelled
        (when stopped, and when the reader has stalled: then with Timeout as the error)."""
        view = memoryview(data)
        fd = self.transfer.fd
        while view:
            if self.job.stopped:
                raise Cancelled(self.job.stop_reason)
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                if not self.job.progressed_within(self.transfer.stall):
                    self.job.stop(f"the reader took no data for {self.transfer.stall * 1000:.0f} ms", Timeout)
                    raise Cancelled(self.job.stop_reason) from None
                self.poller.poll(WAIT_SLICE_MS)
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    self.job.stop("the reader closed its end of the stream")
                    raise Cancelled(self.job.stop_reason) from None
                raise Failed(f"writing the image failed: {e.strerror}") from None
            view = view[written:]
            self.summary.bytes += written
            self.job.touch()


class _FdSink(_FdWriter):
    """Encodes pages and writes them into the transfer's descriptor (worker thread)."""

    def __init__(self, transfer: Transfer) -> None:
        super().__init__(transfer)
        self.encoder = make_encoder(transfer.format)

    def begin_page(self, info: PageInfo, number: int) -> None:
        image = image_info(info)
        s = self.summary
        s.pages = number
        s.width, s.height, s.mode, s.depth, s.resolution = (
            image.width, image.height, image.mode, image.depth, image.resolution)
        self._write(self.encoder.begin_page(image))

    def add_rows(self, band: bytes) -> None:
        self._write(self.encoder.add_rows(band))

    def end_page(self) -> None:
        self._write(self.encoder.end_page())

    def finish(self) -> None:
        self._write(self.encoder.finish())

