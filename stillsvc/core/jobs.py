"""Jobs: one acquisition from an application item, as the core runs it.

A data-mode session creates a :class:`Job` for one of its application items. From
:meth:`Job.start` until :meth:`Job.close` the job holds the device (the
session's own device lock if it holds it, otherwise a hold of its own with no
maximum time: the job is watched instead) and produces pages one at a time —
each page's parameters first, then its pixel rows in bands — that its consumer
takes in one of two ways:

* **pulled**, a page and a band at a time (:meth:`Job.next_page`,
  :meth:`Job.read`), by consumers that speak a protocol with its own pace: the
  SANE network server pulls a frame per ``START``, the eSCL server a document
  per ``NextDocument``;
* **pushed** into a :class:`PageSink` on the device's worker thread
  (:meth:`Job.push`), by consumers that only write the pages somewhere: the
  D-Bus ``Item.Transfer`` encodes them into the client's descriptor
  (:mod:`stillsvc.core.transfer`). No image data then crosses the event loop.

A job's life is not tied to one call of any front-end. Every driver call runs on
the device's worker thread. A job can be stopped at any moment
(:meth:`Job.stop`: by its consumer, the session closing, the device going away,
the lock's hold running out); the driver sees it through the ``cancel`` event
it was given, the consumer as the error of its next call. Only a session in
data mode may create a job: that is checked before anything is locked or sent
to the driver.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from stillsvc.common.errors import Cancelled, Failed, StillError
from stillsvc.core.sessions import Hold
from stillsvc.driver import FileData, Page, PageInfo
from stillsvc.imaging import ImageInfo

if TYPE_CHECKING:
    from stillsvc.core.devices import Device
    from stillsvc.core.items import AppItem
    from stillsvc.core.sessions import Session

log = structlog.get_logger(__name__)

#: Seconds between progress reports, at most.
PROGRESS_INTERVAL = 0.1

#: page (1-based), percent of the page.
Progress = Callable[[int, int], None]


class JobState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DONE = "done"  # every page delivered
    STOPPED = "stopped"  # cancelled, failed or given up
    CLOSED = "closed"


class PageSink(Protocol):
    """Where :meth:`Job.push` delivers pages; called on the device's worker thread.
    A sink may raise :class:`~stillsvc.common.errors.Cancelled` after calling
    :meth:`Job.stop` (its reader went away, or stalled)."""

    def begin_page(self, info: PageInfo, number: int) -> None: ...

    def add_rows(self, band: bytes) -> None: ...

    def end_page(self) -> None: ...

    def finish(self) -> None:
        """After the last page, if there was at least one."""
        ...


class Job:
    """One acquisition from ``app`` for ``session``; see the module documentation.

    ``max_pages``: stop after this many pages (a single-image format takes one
    page per job; a feeder's next page is the next job's). ``progress`` is called
    on the event loop with the page number and the percentage of that page.
    """

    def __init__(self, device: Device, session: Session, app: AppItem, *, max_pages: int | None = None,
                 progress: Progress | None = None, why: str = "job", file: str = "",
                 span: tuple[int, int | None] | None = None) -> None:
        session.require_data("transferring images")
        app.check_device_access()
        self.device = device
        self.session = session
        self.app = app
        self.max_pages = max_pages
        self.progress = progress
        self.why = why
        self.state = JobState.NEW
        self.pages = 0
        #: Set when the job is stopped; the driver and the worker loop watch it.
        self.cancel = threading.Event()
        self.stop_reason = ""
        self.stop_error: type[StillError] = Cancelled
        #: When data last moved (monotonic; written by the worker thread too).
        self.last_progress = time.monotonic()
        #: Set once the job is closed, however it ended.
        self.finished = asyncio.Event()
        self._owner: Any = None
        #: A file job (an item that is a file: a camera's picture) names the variant
        #: ("native", "thumbnail"); its data is :attr:`file`, not pages.
        self.file_variant = file
        #: Part of a file: (offset, length or None for the rest).
        self.span = span
        self.file: FileData | None = None
        self._pages: Iterator[Page] | None = None
        self._bands: Iterator[bytes] | None = None
        self._page: PageInfo | None = None
        self._bytes_per_line = 1
        self._rows = 0
        self._last_report = 0.0
        self._loop = asyncio.get_running_loop()
        self.log = log.bind(device=device.id, session=session.number, client=session.client.name, item=app.path)

    # -- lifetime -------------------------------------------------------------------
    async def start(self) -> None:
        """Take the device (waiting up to ``service.io_wait_ms``), write the item's
        properties to it and start the driver's acquisition."""
        if self.state is not JobState.NEW:
            raise Failed("the job has already started")
        self.session.jobs.add(self)
        try:
            if self.device.device_lock.holder is not self.session:
                self._owner = Hold(self.why, self.session)
                await self.device.lock(self._owner, self.device.manager.limits.io_wait_ms / 1000, limited=False)
            self._check_running()
            item, values = self.app.driver_item, dict(self.app.values)
            if self.file_variant:
                self.log.info("file job starting", variant=self.file_variant)
                self.file = await self._on_worker(self.device.driver.open_file, item, self.file_variant,
                                                  self.session.mode, self.cancel, self.span)
            else:
                self.log.info("job starting", max_pages=self.max_pages)
                await self.device.run_driver(self.device.driver.write_properties, item, values, self.session.mode)
                self._pages = await self._on_worker(self.device.driver.acquire, item, values, self.session.mode,
                                                    self.cancel)
            self.state = JobState.RUNNING
            self.last_progress = time.monotonic()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """End the job (stopping it if it still runs) and give the device back."""
        if self.state is JobState.CLOSED:
            return
        if self.state in (JobState.NEW, JobState.RUNNING):
            self.stop("the job was closed")
        self.state = JobState.CLOSED
        try:
            if self._pages is not None:
                pages, self._pages, self._bands = self._pages, None, None
                close = getattr(pages, "close", None)
                if close is not None:  # let the driver's generator clean up, on the worker
                    try:
                        await self.device.run_driver(close)
                    except StillError as e:
                        self.log.warning("driver failed ending the acquisition", error=e.message)
            owner, self._owner = self._owner, None
            if owner is not None and self.device.device_lock.holder is owner:
                await self.device.unlock(owner)
        finally:
            self.session.jobs.discard(self)
            self.finished.set()

    async def __aenter__(self) -> Job:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stop(self, reason: str = "cancelled", error: type[StillError] = Cancelled) -> None:
        """Stop the job from any thread: its consumer's next call fails with ``error``."""
        if not self.cancel.is_set():
            self.stop_reason = reason
            self.stop_error = error
            self.cancel.set()

    @property
    def stopped(self) -> bool:
        return self.cancel.is_set()

    def progressed_within(self, seconds: float) -> bool:
        """Whether data moved (or the job started) in the last ``seconds``."""
        return time.monotonic() - self.last_progress < seconds

    def touch(self) -> None:
        """The consumer took data (a sink calls it from the worker thread too)."""
        self.last_progress = time.monotonic()

    # -- pulling ----------------------------------------------------------------------
    async def next_page(self) -> PageInfo | None:
        """Advance to the next page and return its parameters; None when there are no
        more (the rest of the current page, if any, is skipped)."""
        self._check_running()
        info = await self._on_worker(self._advance)
        if info is None:
            self.state = JobState.DONE
        return info

    async def read(self, transform: Callable[[bytes], bytes] | None = None) -> bytes | None:
        """The next band of rows of the current page; None at the end of the page.
        ``transform`` (an encoder's ``add_rows``, say) is applied to the band on
        the worker thread, in the same hop as reading it."""
        self._check_running()
        band = await self._on_worker(self._next_band_through, transform)
        self.touch()
        return band

    # -- pushing ----------------------------------------------------------------------
    async def push(self, sink: PageSink) -> None:
        """Deliver every page into ``sink``, all on the worker thread."""
        self._check_running()
        await self._on_worker(self._push, sink)
        self.state = JobState.DONE

    async def push_file(self, write: Callable[[bytes | memoryview], None]) -> None:
        """A file job: every piece of the file into ``write``, on the worker thread."""
        self._check_running()
        if self.file is None:
            raise Failed("this job is not a file job")
        await self._on_worker(self._push_file, self.file, write)
        self.state = JobState.DONE

    # -- on the worker thread -------------------------------------------------------
    def _push_file(self, file: FileData, write: Callable[[bytes | memoryview], None]) -> None:
        size = max(1, file.info.size)
        done = 0
        self.pages = 1

        def piece(chunk: bytes | memoryview) -> None:
            nonlocal done
            if self.cancel.is_set():
                raise Cancelled(self.stop_reason)
            write(chunk)
            done += len(chunk)
            self._report(min(99, done * 100 // size))

        file.write_to(piece)
        if self.cancel.is_set():
            raise Cancelled(self.stop_reason)
        self._report(100)

    def _advance(self) -> PageInfo | None:
        if self._page is not None:
            self._report(100)
        self._bands, self._page = None, None
        if self._pages is None or self.cancel.is_set():
            return None
        if self.max_pages is not None and self.pages >= self.max_pages:
            return None
        page = next(self._pages, None)
        if page is None or self.cancel.is_set():
            return None
        self.pages += 1
        self._page, self._rows = page.info, 0
        self._bytes_per_line = max(1, image_info(page.info).bytes_per_line)
        self._bands = iter(page.bands())
        return page.info

    def _next_band_through(self, transform: Callable[[bytes], bytes] | None) -> bytes | None:
        band = self._next_band()
        return band if band is None or transform is None else transform(band)

    def _next_band(self) -> bytes | None:
        if self._bands is None or self._page is None:
            return None
        if self.cancel.is_set():
            raise Cancelled(self.stop_reason)
        band = next(self._bands, None)
        if band is None:
            self._bands = None
            return None
        self._rows += len(band) // self._bytes_per_line
        self._report(self._rows * 100 // max(1, self._page.height))
        return band

    def _push(self, sink: PageSink) -> None:
        while (info := self._advance()) is not None:
            sink.begin_page(info, self.pages)
            while (band := self._next_band()) is not None:
                sink.add_rows(band)
            if self.cancel.is_set():
                raise Cancelled(self.stop_reason)
            sink.end_page()
        if self.cancel.is_set():
            raise Cancelled(self.stop_reason)
        if self.pages:
            sink.finish()

    def _report(self, percent: int) -> None:
        if self.progress is None or self.cancel.is_set():
            return
        now = time.monotonic()
        if percent < 100 and now - self._last_report < PROGRESS_INTERVAL:
            return
        self._last_report = now
        page = self.pages
        self._loop.call_soon_threadsafe(self._progress, page, percent)

    def _progress(self, page: int, percent: int) -> None:
        if self.progress is not None and not self.cancel.is_set():
            self.progress(page, percent)

    # -- helpers --------------------------------------------------------------------
    def _check_running(self) -> None:
        if self.cancel.is_set():
            raise self.stop_error(self.stop_reason)
        if self.state is JobState.CLOSED:
            raise Failed("the job is closed")

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A driver-facing step on the worker thread; a stop shows as the stop's error."""
        try:
            return await self.device.run_driver(fn, *args)
        except Cancelled:
            if self.cancel.is_set():
                raise self.stop_error(self.stop_reason) from None
            raise
        except StillError:
            if self.cancel.is_set():
                raise self.stop_error(self.stop_reason) from None
            raise


def image_info(info: PageInfo) -> ImageInfo:
    """A driver's page geometry in the imaging layer's terms (the raw layout)."""
    return ImageInfo(info.width, info.height, info.mode, info.depth, info.resolution)


__all__ = ["Job", "JobState", "PageSink", "Progress", "image_info"]
