"""The eSCL (AirScan) server: macOS, iOS, Windows, Android (Mopria), ChromeOS and
Linux (sane-airscan, sane-backends' ``escl``) scan through the arbiter.

``/eSCL`` serves the first exported device, ``/eSCL/<device-id>`` each one.
An eSCL job is a core job of a network client (``escl:HOST:JOB``):
``POST ScanJobs`` takes data mode at once or answers ``503`` with
``Retry-After`` (never waits: clients retry by themselves), starts the
acquisition and answers ``201`` with the job's ``Location``; each
``NextDocument`` long-polls for the next page and streams it, encoded as it is
produced (PNG and JPEG: a page per document; PDF: every page of the job in one
document); ``404`` says there are no more. The device is given back the moment
the last page has gone, on ``DELETE``, when the client goes away mid-page, and
after ``idle_ms`` without a request for the job (a client that never comes
back for its pages).

Peers outside ``allow`` are refused at accept, before a byte of their request
is read; bodies over ``max_request_bytes`` get ``413``; every bad request a
``4xx`` with its reason in words; nothing a client sends can reach it as a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from stillsvc.common.errors import (
    Busy,
    Disconnected,
    Empty,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    NotSupported,
    StillError,
    Timeout,
)
from stillsvc.common.networks import Allowed
from stillsvc.core.config import EsclSettings
from stillsvc.core.devices import Device
from stillsvc.core.items import AppItem, scan_sources
from stillsvc.core.jobs import Job, image_info
from stillsvc.core.manager import DeviceManager
from stillsvc.core.sessions import Client, Session
from stillsvc.driver import Mode
from stillsvc.frontends.escl import documents
from stillsvc.frontends.escl.documents import BadRequest, JobStatus, ScanSettings, Source
from stillsvc.frontends.escl.web import ScanPage
from stillsvc.imaging import make_encoder

log = structlog.get_logger(__name__)

BASE = "/eSCL"
#: The name of the server's sockets under systemd (stillsvc-escl.socket).
SOCKET_NAME = "escl"
#: Finished jobs kept for ScannerStatus.
JOB_HISTORY = 16
RETRY_AFTER_S = 2
#: How long ScannerStatus waits for the device's own status.
STATUS_TIMEOUT = 2.0
#: An item's source value -> eSCL's input.
SOURCE_KINDS = {"flatbed": "Platen", "feeder": "AdfSimplex", "duplex": "AdfDuplex"}


def device_uuid(device_id: str, machine: str) -> str:
    """A device's UUID: the same on every run of the service on this machine."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"stillsvc:{machine}:{device_id}"))


def machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
    return "stillsvc"


@dataclass(eq=False)
class EsclJob:
    uuid: str
    device: Device
    base: str
    client: Client
    session: Session
    job: Job
    settings: ScanSettings
    feeder: bool
    created: float = field(default_factory=time.monotonic)
    last_request: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests for it being served now
    pages: int = 0
    state: str = "Processing"
    reason: str = "JobScanning"
    last_page: tuple[int, int, int] | None = None  # width, height, bytes per line
    finished: bool = False
    idle: asyncio.TimerHandle | None = None
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def uri(self) -> str:
        return f"{self.base}/ScanJobs/{self.uuid}"


class EsclServer:
    """The HTTP side of eSCL, serving the core's devices."""

    def __init__(self, manager: DeviceManager, config: EsclSettings, sockets: list[Any] | None = None) -> None:
        self.manager = manager
        self.config = config
        self.sockets = list(sockets or ())
        self.networks = Allowed(config.allow)
        self.machine = machine_id()
        self.jobs: OrderedDict[str, EsclJob] = OrderedDict()
        self.servers: list[asyncio.base_events.Server] = []
        self.connections = 0
        self.runner: web.AppRunner | None = None
        #: The scan page, on the same listener.
        self.page = ScanPage(self)

    # -- lifetime ----------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=self.config.max_request_bytes, middlewares=[self._errors])
        app.router.add_route("*", BASE + "/{path:.*}", self._dispatch)
        app.router.add_route("*", BASE, self._dispatch)
        self.page.add_routes(app)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_HttpLog())
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        tls = self.tls_context()
        if self.sockets:
            for sock in self.sockets:
                self.servers.append(await loop.create_server(self._protocol, sock=sock, ssl=tls))
        else:
            for host in self.config.listen:
                self.servers.append(await loop.create_server(self._protocol, host, self.config.port,
                                                             reuse_address=True, ssl=tls))
        log.info("eSCL server listening", addresses=[s.getsockname()[:2] for srv in self.servers for s in srv.sockets],
                 allow=list(self.config.allow), devices=list(self.config.devices))

    @property
    def secure(self) -> bool:
        return self.config.certificate is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """HTTPS when a certificate is configured (an unreadable one stops the start)."""
        if self.config.certificate is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.certificate, self.config.private_key)
        return context

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        await self.page.stop()
        for job in list(self.jobs.values()):
            await self._finish(job, "Canceled", "the service is stopping")
        if self.runner is not None:
            await self.runner.cleanup()
        self.servers.clear()

    def _protocol(self) -> asyncio.Protocol:
        assert self.runner is not None and self.runner.server is not None
        return _Gate(self, self.runner.server)

    def allowed(self, host: str) -> bool:
        return host in self.networks

    # -- which devices ------------------------------------------------------------------
    def exported(self) -> list[Device]:
        """The devices this server offers, sorted by id: scanners that are present,
        working and listed in ``devices``, and not bridged from this server itself."""
        wanted = self.config.devices
        found = []
        for device in self.manager.devices.values():
            if device.failure or device.tree is None or device.info.kind == "camera":
                continue
            if "*" not in wanted and device.id not in wanted:
                continue
            port = device.config.port
            if port.startswith(("airscan:", "escl:")) and any(f"{h}:{self.config.port}" in port
                                                               for h in (*self.config.listen, "localhost")):
                continue  # our own eSCL server seen through a SANE bridge: a loop
            found.append(device)
        return sorted(found, key=lambda d: d.id)

    def device(self, device_id: str | None) -> Device:
        devices = self.exported()
        if device_id is None:
            if not devices:
                raise web.HTTPNotFound(text="no scanner is exported\n")
            return devices[0]
        for device in devices:
            if device.id == device_id:
                return device
        raise web.HTTPNotFound(text=f"no scanner {device_id!r}\n")

    # -- requests ------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except BadRequest as e:
            return web.Response(status=e.status, text=e.reason + "\n")
        except StillError as e:
            status = 503 if isinstance(e, Busy | Timeout | LimitExceeded) else 404 if isinstance(e, NotFound) else \
                409 if isinstance(e, Empty | InvalidArgument | NotSupported) else 500
            log.info("eSCL request refused", method=request.method, path=request.path, status=status,
                     error=e.message)
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
            return web.Response(status=status, text=e.message + "\n", headers=headers)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("eSCL request failed", method=request.method, path=request.path)
            return web.Response(status=500, text="internal error (see the service's log)\n")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.match_info.get("path", "").split("/") if p]
        device_id = None
        if parts and parts[0] not in ("ScannerCapabilities", "ScannerStatus", "ScanJobs"):
            device_id, parts = parts[0], parts[1:]
        base = BASE if device_id is None else f"{BASE}/{device_id}"
        route = tuple(parts)
        method = request.method
        if route == ("ScannerCapabilities",) and method == "GET":
            return await self._capabilities(request, self.device(device_id), base)
        if route == ("ScannerStatus",) and method == "GET":
            return await self._status(self.device(device_id))
        if route == ("ScanJobs",) and method == "POST":
            return await self._create_job(request, self.device(device_id), base)
        if len(route) >= 2 and route[0] == "ScanJobs":
            job = self.jobs.get(route[1])
            if job is None or job.base != base:
                raise web.HTTPNotFound(text=f"no job {route[1][:40]!r}\n")
            if len(route) == 2 and method == "DELETE":
                await self._finish(job, "Canceled", "JobCanceledByUser")
                return web.Response(status=200)
            if route[2:] == ("NextDocument",) and method == "GET":
                return await self._next_document(request, job)
            if route[2:] == ("ScanImageInfo",) and method == "GET":
                if job.last_page is None:
                    raise web.HTTPNotFound(text="no page has been scanned yet\n")
                return _xml(documents.image_info(job.uri, *job.last_page))
        if route in (("ScannerCapabilities",), ("ScannerStatus",), ("ScanJobs",)) or \
                (len(route) >= 2 and route[0] == "ScanJobs"):
            raise web.HTTPMethodNotAllowed(method, [], text=f"{method} is not allowed here\n")
        raise web.HTTPNotFound(text=f"no such eSCL resource: {request.path[:80]}\n")

    # -- documents -------------------------------------------------------------------------------
    async def sources(self, device: Device, root: AppItem) -> list[tuple[Source, AppItem, str]]:
        found = []
        attributes: dict[int, dict[str, Any]] = {}  # the driver is asked once per item
        for item, value in scan_sources(root):
            kind = SOURCE_KINDS.get(value)
            if kind is None:
                continue
            if id(item) not in attributes:
                attributes[id(item)] = await device.property_attributes(item)
            attrs, values = attributes[id(item)], item.values
            modes = attrs.get("mode", {}).get("valid", {}).get("values", [values.get("mode", "color")])
            depths = attrs.get("depth", {}).get("valid", {}).get("values", [values.get("depth", 8)])
            color_modes = tuple(name for name, (mode, depth) in documents.COLOR_MODES.items()
                                if mode in modes and depth in depths)
            resolutions = tuple(sorted(attrs["resolution"]["valid"].get("values", [values["resolution"]])))
            dpi = values["resolution"]
            width = values.get("max_width", 0) * documents.UNITS_PER_INCH // dpi
            height = values.get("max_height", 0) * documents.UNITS_PER_INCH // dpi
            found.append((Source(kind, width, height, color_modes, resolutions, tuple(documents.FORMATS)),
                          item, value))
        return found

    @contextlib.asynccontextmanager
    async def passing_session(self, device: Device, why: str) -> AsyncIterator[Session]:
        """A status session of the server's own for reading ``device`` once."""
        client = Client(name=f"escl:{why}:{device.id}", internal=True, via="escl")
        session = await self.manager.create_session(device.id, Mode.STATUS, client)
        try:
            yield session
        finally:
            await self.manager.close_session(session, why=f"eSCL {why} read")

    async def with_items(self, device: Device, use: Callable[[AppItem], Awaitable[Any]]) -> Any:
        """Run ``use`` with the device's application items of a passing status session."""
        async with self.passing_session(device, "capabilities") as session:
            root = device.items_for(session)
            if root is None:
                raise Disconnected(f"device {device.id} has no items")
            return await use(root)

    async def _capabilities(self, request: web.Request, device: Device, base: str) -> web.Response:
        async def build(root: AppItem) -> bytes:
            sources = await self.sources(device, root)
            pages = [i.specs["pages"].valid for _, i, v in sources if v == "feeder" and "pages" in i.specs]
            capacity = int(getattr(pages[0], "maximum", 0)) if pages else 0
            model = " ".join(p for p in (device.info.vendor, device.info.model) if p) or device.info.name
            admin = f"{request.scheme}://{request.host}/"
            return documents.capabilities(model, device.info.serial, device_uuid(device.id, self.machine), admin,
                                          [s for s, _, _ in sources], capacity)
        return _xml(await self.with_items(device, build))

    async def _status(self, device: Device) -> web.Response:
        busy = device.data_holder is not None or device.held_outside or device.standing_back
        now = time.monotonic()
        jobs = [JobStatus(j.uuid, j.uri, int(now - j.created), j.pages, j.state, j.reason)
                for j in reversed(self.jobs.values()) if j.device is device]
        return _xml(documents.status("Processing" if busy else "Idle", jobs, await self._adf_state(device, busy)))

    async def _adf_state(self, device: Device, busy: bool) -> str | None:
        """The feeder's state (clients tell "out of documents" by it): asked of the
        device only while nobody uses it; a feeder in use is "processing"."""
        if "feeder" not in device.info.capabilities:
            return None
        if busy or device.device_lock.holder is not None:
            return "ScannerAdfProcessing"
        try:
            async with self.passing_session(device, "status") as session:
                status = await asyncio.wait_for(device.get_status(session), STATUS_TIMEOUT)
        except (StillError, TimeoutError):
            return None
        if status.get("jammed"):
            return "ScannerAdfJam"
        if "paper_loaded" in status:
            return "ScannerAdfLoaded" if status["paper_loaded"] else "ScannerAdfEmpty"
        return None

    # -- jobs -----------------------------------------------------------------------------------
    async def _create_job(self, request: web.Request, device: Device, base: str) -> web.Response:
        if request.content_length is not None and request.content_length > self.config.max_request_bytes:
            raise web.HTTPRequestEntityTooLarge(self.config.max_request_bytes, request.content_length)
        settings = documents.parse_settings(await request.read())
        peer = request.remote or "?"
        job_id = str(uuidlib.uuid4())
        client = Client(name=f"escl:{peer}:{job_id[:8]}", via="escl")
        session = await self.manager.create_session(device.id, Mode.DATA, client, 0.0)
        try:
            root = device.items_for(session)
            if root is None:
                raise Disconnected(f"device {device.id} has no items")
            item, source = await self.item_for(device, root, settings)
            await device.write_item_properties(item, documents.item_values(item, settings, source))
            feeder = source != "flatbed"
            job = Job(device, session, item, max_pages=None if feeder else 1, why="eSCL scan")
            await job.start()
        except BaseException:
            await self.manager.close_session(session, why="eSCL job not started")
            self.manager.client_gone(client)
            raise
        escl = EsclJob(job_id, device, base, client, session, job, settings, feeder)
        self.jobs[job_id] = escl
        self._trim()
        self._arm_idle(escl)
        log.info("eSCL job created", device=device.id, client=client.name, session=session.number, job=job_id,
                 source=settings.input_source, mode=settings.color_mode, resolution=settings.x_resolution,
                 format=settings.document_format)
        return web.Response(status=201, headers={"Location": f"{request.scheme}://{request.host}{escl.uri}"})

    async def item_for(self, device: Device, root: AppItem, settings: ScanSettings) -> tuple[AppItem, str]:
        wanted = "AdfDuplex" if settings.input_source == "Feeder" and settings.duplex else \
            "AdfSimplex" if settings.input_source == "Feeder" else "Platen"
        for source, item, value in await self.sources(device, root):
            if source.kind == wanted:
                if settings.color_mode not in source.color_modes:
                    raise BadRequest(409, f"ColorMode {settings.color_mode} is not offered by {wanted}")
                if settings.x_resolution not in source.resolutions:
                    raise BadRequest(409, f"resolution {settings.x_resolution} is not offered by {wanted} "
                                          f"(one of {', '.join(map(str, source.resolutions))})")
                if settings.region is not None:
                    x, y, width, height = settings.region
                    if x + width > source.max_width or y + height > source.max_height:
                        raise BadRequest(409, f"the scan region ({width}x{height} at {x},{y}) goes beyond the "
                                              f"{source.max_width}x{source.max_height} of the {wanted} "
                                              "(in 300ths of an inch)")
                return item, value
        raise BadRequest(409, f"the scanner has no {wanted} input")

    async def _next_document(self, request: web.Request, job: EsclJob) -> web.StreamResponse:
        job.busy += 1
        job.last_request = time.monotonic()
        try:
            async with job.sending:  # one document at a time; the next asker waits its turn
                return await self._send_document(request, job)
        finally:
            job.busy -= 1
            job.last_request = time.monotonic()
            if not job.finished:
                self._arm_idle(job)

    async def _send_document(self, request: web.Request, job: EsclJob) -> web.StreamResponse:
        if job.finished:
            raise web.HTTPNotFound(text="the job has no more documents\n")
        fmt = documents.FORMATS[job.settings.document_format]
        core = job.job
        response: web.StreamResponse | None = None
        encoder = make_encoder(fmt)
        try:
            while True:
                info = await core.next_page()
                if info is None:
                    break
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": job.settings.document_format})
                    response.enable_chunked_encoding()
                    await response.prepare(request)
                page = image_info(info)
                # Encoding runs on the device's worker, where the page is read (a JPEG
                # page is ~70 ms of work), never on the event loop.
                await response.write(await job.device.call(encoder.begin_page, page))
                while (data := await core.read(encoder.add_rows)) is not None:
                    if data:
                        await response.write(data)
                await response.write(await job.device.call(encoder.end_page))
                job.pages += 1
                job.last_page = (page.width, page.height, page.bytes_per_line)
                if fmt != "pdf":
                    break  # a page per document
            if response is None:  # no page: the job is over
                await self._finish(job, "Completed", "JobCompletedSuccessfully")
                if not job.pages:
                    raise Empty("the document feeder is empty") if job.feeder else Empty("nothing was scanned")
                raise web.HTTPNotFound(text="the job has no more documents\n")
            await response.write(await job.device.call(encoder.finish))
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            await self._finish(job, "Aborted", "the client went away mid-page")
            raise
        except StillError as e:
            await self._finish(job, "Aborted", e.message)
            if response is not None:  # headers are gone: all that is left is to cut the stream
                with contextlib.suppress(Exception):
                    request.transport.abort()  # type: ignore[union-attr]
                return response
            raise
        if not job.feeder or fmt == "pdf":  # that was the job's last page: give the device back now
            await self._finish(job, "Completed", "JobCompletedSuccessfully")
        return response

    def _arm_idle(self, job: EsclJob) -> None:
        if job.idle is not None:
            job.idle.cancel()
        job.idle = asyncio.get_running_loop().call_later(self.config.idle_ms / 1000, self._idle_check, job)

    def _idle_check(self, job: EsclJob) -> None:
        job.idle = None
        if job.finished or job.busy:
            return
        log.info("eSCL job abandoned: no request for it", job=job.uuid, device=job.device.id,
                 idle_ms=self.config.idle_ms)
        self.manager.spawn(self._finish(job, "Aborted", "JobTimedOut"))

    async def _finish(self, job: EsclJob, state: str, reason: str) -> None:
        """End the job and give the device back (at once: data mode, lock, session)."""
        if job.finished:
            return
        job.finished = True
        job.state, job.reason = state, reason
        if job.idle is not None:
            job.idle.cancel()
            job.idle = None
        await job.job.close()
        await self.manager.close_session(job.session, why=f"eSCL job {state.lower()}")
        self.manager.client_gone(job.client)
        log.info("eSCL job ended", job=job.uuid, device=job.device.id, state=state, reason=reason, pages=job.pages)

    def _trim(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.finished]
        for key in finished[: max(0, len(self.jobs) - JOB_HISTORY)]:
            del self.jobs[key]


def _xml(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="text/xml", charset="utf-8")


class _HttpLog(logging.Logger):
    """aiohttp's own log of requests it could not parse: a client's mistake, told
    in one line without a traceback (aiohttp has answered it with a 400)."""

    def __init__(self) -> None:
        super().__init__("stillsvc.escl.http")

    def _log(self, level: int, msg: object, args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        text = (msg % args) if args else str(msg)
        if error is not None:
            text = f"{text}: {type(error).__name__}: {str(error)[:200]}"
        log.info("eSCL: bad HTTP from a client", detail=text)


class _Gate(asyncio.Protocol):
    """Accepts a connection for aiohttp only from an allowed peer, within the
    limits: anyone else is cut off before a byte of the request is read."""

    def __init__(self, server: EsclServer, factory: Callable[[], Any]) -> None:
        self.server = server
        self.factory = factory
        self.inner: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?",)
        if not self.server.allowed(str(peer[0])):
            log.warning("eSCL client refused: not in the allowed networks", peer=peer[0])
            transport.abort()
            return
        if self.server.connections >= self.server.config.max_connections:
            log.warning("eSCL client refused: too many connections", peer=peer[0])
            transport.abort()
            return
        self.server.connections += 1
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.server.connections -= 1
            self.inner.connection_lost(exc)
            self.inner = None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


__all__ = ["EsclServer", "device_uuid"]
