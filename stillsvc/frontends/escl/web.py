"""The scan page, served beside eSCL on the same listener and behind the same
access rules: who holds each device right now, live, and scanning from a
browser through the same core jobs as every other client.

* ``GET /`` and ``/static/…``: the page (plain HTML, CSS and a little
  JavaScript in the package, nothing fetched from anywhere else);
* ``GET /api/devices``: the exported devices with their state, holder, waiters
  and the valid values of each source, and the token that state-changing
  requests must carry;
* ``GET /api/events``: server-sent events, fed by the core's notifications
  (never by polling a device): ``devices`` when any device changes, ``job`` at
  each step of a job;
* ``POST /api/scan``, ``POST /api/jobs/<id>/cancel``: start and cancel a job.
  Both need the ``X-Stillsvc-Token`` header and, when the browser sends one,
  an ``Origin`` of this server: another site's page cannot start a scan;
* ``GET /api/jobs/<id>``, ``…/pages/<n>`` (a preview of each page as it
  arrives), ``…/result`` (the file, named ``scan-YYYY-MM-DD-HHMM.ext``).

A job from the page is a core job of a client ``web:HOST:JOB``: it waits in
line for data mode when asked to, scans every page into the chosen format as
it comes, and gives the device back at its end. A job nobody follows any more
— no event stream open, no request for it — for ``idle_ms`` is cancelled.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from PIL import Image

from stillsvc.common.errors import Busy, Cancelled, StillError, Timeout
from stillsvc.core.devices import Device
from stillsvc.core.jobs import Job, image_info
from stillsvc.core.listener import Listener
from stillsvc.core.sessions import Client, Session
from stillsvc.driver import Mode
from stillsvc.frontends.escl import documents
from stillsvc.frontends.escl.documents import BadRequest, ScanSettings
from stillsvc.imaging import ImageInfo, make_encoder

if TYPE_CHECKING:
    from stillsvc.frontends.escl.server import EsclServer

log = structlog.get_logger(__name__)

STATIC = ("index.html", "app.js", "style.css")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
MODES = {"RGB24": "color", "Grayscale8": "gray", "BlackAndWhite1": "lineart"}
EXTENSIONS = {"pdf": "pdf", "jpeg": "jpg", "png": "png"}
MIME = {"pdf": "application/pdf", "jpeg": "image/jpeg", "png": "image/png"}
#: How long a job waits in line for the device when the page asks it to.
MAX_WAIT_S = 300.0
PREVIEW_WIDTH = 480
#: Finished jobs kept (with their results) for the page to fetch.
KEEP_JOBS = 8
#: A result is kept in memory up to this size, then in a temporary file.
SPOOL_BYTES = 8 << 20


def _mm(units: int) -> float:
    return round(units / documents.UNITS_PER_INCH * 25.4, 1)


@dataclass(eq=False)
class WebJob:
    id: str
    device: Device
    client: Client
    settings: ScanSettings
    fmt: str
    feeder: bool
    state: str = "waiting"
    pages: int = 0
    page: int = 0
    percent: int = 0
    error: str = ""
    filename: str = ""
    previews: list[bytes] = field(default_factory=list)
    result: Any = None  # a SpooledTemporaryFile once done
    core: Job | None = None
    task: asyncio.Task[None] | None = None
    seen: float = field(default_factory=time.monotonic)

    def describe(self) -> dict[str, Any]:
        done = self.state == "done"
        return {"id": self.id, "device": self.device.id, "state": self.state, "pages": self.pages,
                "page": self.page, "percent": self.percent, "error": self.error, "filename": self.filename,
                "result": f"/api/jobs/{self.id}/result" if done else "",
                "previews": [f"/api/jobs/{self.id}/pages/{n}" for n in range(1, len(self.previews) + 1)]}


class ScanPage(Listener):
    """The page's routes on the eSCL server's application, and its live feed."""

    def __init__(self, server: EsclServer) -> None:
        self.server = server
        self.manager = server.manager
        self.token = secrets.token_urlsafe(24)
        self.jobs: dict[str, WebJob] = {}
        self.streams: set[asyncio.Queue[bytes]] = set()
        self._devices_pending = False

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/devices", self._devices)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/scan", self._scan)
        app.router.add_get("/api/jobs/{id}", self._job)
        app.router.add_get("/api/jobs/{id}/pages/{n}", self._preview)
        app.router.add_get("/api/jobs/{id}/result", self._result)
        app.router.add_post("/api/jobs/{id}/cancel", self._cancel)
        self.manager.listeners.append(self)

    async def stop(self) -> None:
        if self in self.manager.listeners:
            self.manager.listeners.remove(self)
        for job in list(self.jobs.values()):
            if job.core is not None:
                job.core.stop("the service is stopping")
            if job.task is not None:
                job.task.cancel()
        for queue in list(self.streams):
            queue.put_nowait(b"")

    # -- the page ----------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound(text="no such file\n")
        return self._file(name)

    @staticmethod
    def _file(name: str) -> web.Response:
        body = resources.files("stillsvc.frontends.escl").joinpath("static", name).read_bytes()
        kind = CONTENT_TYPES[name[name.rindex("."):]]
        return web.Response(body=body, content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:"})

    # -- state ------------------------------------------------------------------------------------
    async def device_list(self) -> list[dict[str, Any]]:
        return [await self._describe(device) for device in self.server.exported()]

    async def _describe(self, device: Device) -> dict[str, Any]:
        holder = device.data_holder
        async def sources(root: Any) -> list[dict[str, Any]]:
            found = await self.server.sources(device, root)
            return [{"name": {"Platen": "Flatbed", "AdfSimplex": "ADF", "AdfDuplex": "ADF Duplex"}[s.kind],
                     "value": value, "modes": [MODES[m] for m in s.color_modes if m in MODES],
                     "resolutions": list(s.resolutions), "max_width_mm": _mm(s.max_width),
                     "max_height_mm": _mm(s.max_height), "feeder": s.kind != "Platen"}
                    for s, _, value in found]
        try:
            source_list = await self.server.with_items(device, sources)
        except StillError:
            source_list = []
        state = device.state
        if holder is not None and state == "ready":
            state = "busy"
        return {"id": device.id, "name": device.info.name, "vendor": device.info.vendor,
                "model": device.info.model, "state": state, "state_reason": device.failure,
                "holder": describe_holder(holder.client) if holder is not None else
                ("another program" if device.held_outside or device.standing_back else ""),
                "waiters": len(device.data_mode.waiting), "sources": source_list,
                "formats": ["pdf", "jpeg", "png"]}

    def device_added(self, device: Device) -> None:
        self._devices_changed()

    def device_removed(self, device: Device) -> None:
        self._devices_changed()

    def device_changed(self, device: Device, names: list[str]) -> None:
        self._devices_changed()

    def _devices_changed(self) -> None:
        """Send the device list once for every burst of changes."""
        if self._devices_pending or not self.streams:
            return
        self._devices_pending = True
        self.manager.spawn(self._send_devices())

    async def _send_devices(self) -> None:
        await asyncio.sleep(0)  # let a burst of changes in one turn come together
        self._devices_pending = False
        self._broadcast("devices", {"devices": await self.device_list()})

    def _broadcast(self, event: str, data: Any) -> None:
        message = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
        for queue in list(self.streams):
            queue.put_nowait(message)

    # -- requests ---------------------------------------------------------------------------------
    async def _devices(self, request: web.Request) -> web.Response:
        return web.json_response({"token": self.token, "devices": await self.device_list()})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.streams.add(queue)
        try:
            await response.write(f"event: devices\ndata: {json.dumps({'devices': await self.device_list()})}\n\n"
                                 .encode())
            while message := await queue.get():
                await response.write(message)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.streams.discard(queue)
        return response

    def _check_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise _refused(403, "requests from another site's page are refused")
        if not secrets.compare_digest(request.headers.get("X-Stillsvc-Token", ""), self.token):
            raise _refused(403, "the request lacks this page's token: reload the page")

    def _get_job(self, request: web.Request) -> WebJob:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            raise _refused(404, "no such job (it may have ended a while ago)")
        job.seen = time.monotonic()
        return job

    async def _job(self, request: web.Request) -> web.Response:
        return web.json_response(self._get_job(request).describe())

    async def _preview(self, request: web.Request) -> web.Response:
        job = self._get_job(request)
        try:
            number = int(request.match_info["n"])
        except ValueError:
            raise _refused(400, "a page number is a whole number") from None
        if not 1 <= number <= len(job.previews):
            raise _refused(404, f"page {number} has not been scanned")
        return web.Response(body=job.previews[number - 1], content_type="image/png")

    async def _result(self, request: web.Request) -> web.StreamResponse:
        job = self._get_job(request)
        if job.state != "done" or job.result is None:
            raise _refused(409, f"the job is {job.state}: there is no file yet")
        response = web.StreamResponse(headers={
            "Content-Type": MIME[job.fmt], "Content-Disposition": f'attachment; filename="{job.filename}"'})
        await response.prepare(request)
        job.result.seek(0)
        while chunk := await asyncio.to_thread(job.result.read, 1 << 20):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _cancel(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        job = self._get_job(request)
        if job.state in ("waiting", "scanning"):
            if job.core is not None:
                job.core.stop("cancelled from the page")
            elif job.task is not None:
                job.task.cancel()
        return web.json_response(job.describe())

    async def _scan(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        if request.content_length is not None and request.content_length > self.server.config.max_request_bytes:
            raise _refused(413, "the request is too large")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise _refused(400, "the request is not JSON") from None
        if not isinstance(body, dict):
            raise _refused(400, "the request must be a JSON object")
        try:
            device = self.server.device(str(body.get("device", "")))
        except web.HTTPNotFound:
            raise _refused(404, f"no scanner {str(body.get('device'))[:40]!r}") from None
        fmt = str(body.get("format", "pdf"))
        if fmt not in MIME:
            raise _refused(409, f"unknown format {fmt[:20]!r} (pdf, jpeg or png)")
        source = str(body.get("source", "flatbed"))
        mode = str(body.get("mode", "color"))
        escl_mode = next((k for k, v in MODES.items() if v == mode), None)
        if escl_mode is None:
            raise _refused(409, f"unknown colour mode {mode[:20]!r}")
        resolution = body.get("resolution", 300)
        if type(resolution) is not int:
            raise _refused(409, "the resolution is a whole number of dpi")
        feeder = source != "flatbed"
        if feeder and fmt != "pdf":
            raise _refused(409, "a feeder's pages come as one PDF: choose PDF")
        region = None
        area = body.get("area")
        if area is not None:
            try:
                x, y, w, h = (float(area[k]) for k in ("x", "y", "width", "height"))
            except (TypeError, KeyError, ValueError):
                raise _refused(400, "the area needs x, y, width and height in mm") from None
            if min(x, y) < 0 or min(w, h) <= 0:
                raise _refused(409, "the area must lie on the bed and not be empty")
            units = documents.UNITS_PER_INCH / 25.4
            region = (round(x * units), round(y * units), round(w * units), round(h * units))
        settings = ScanSettings("Feeder" if feeder else "Platen", escl_mode, resolution, resolution,
                                MIME[fmt], source == "duplex", region)
        wait = bool(body.get("wait", False))
        job_id = str(uuidlib.uuid4())
        client = Client(name=f"web:{request.remote or '?'}:{job_id[:8]}", via="web")
        job = WebJob(job_id, device, client, settings, fmt, feeder)
        # Data mode at once (or in line when asked): a busy device is told now, by whom.
        try:
            session = await self.manager.create_session(device.id, Mode.DATA, client, 0.0)
        except (Busy, Timeout) as e:
            if not wait:
                holder = device.data_holder
                who = describe_holder(holder.client) if holder else "another program"
                log.info("web scan refused: the device is busy", device=device.id, holder=who, error=e.message)
                return web.json_response({"error": f"{device.info.name or device.id} is in use by {who}",
                                          "holder": who}, status=503)
            session = None
        except StillError as e:
            raise _refused(409, e.message) from None
        self.jobs[job_id] = job
        self._trim()
        job.task = self.manager.spawn(self._run(job, session))
        log.info("web scan job created", device=device.id, client=client.name, job=job_id, format=fmt,
                 source=source, waiting=session is None)
        return web.json_response({"job": job.id, **job.describe()}, status=201)

    # -- running a job --------------------------------------------------------------------------
    def _update(self, job: WebJob, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(job, key, value)
        self._broadcast("job", job.describe())

    async def _run(self, job: WebJob, session: Session | None) -> None:
        device = job.device
        idle = self.manager.loop.call_later(self.server.config.idle_ms / 1000, self._idle_check, job)
        try:
            if session is None:
                self._update(job, state="waiting")
                session = await self.manager.create_session(device.id, Mode.DATA, job.client, MAX_WAIT_S)
            root = device.items_for(session)
            if root is None:
                raise Cancelled("the device has no items")
            item, source = await self.server.item_for(device, root, job.settings)
            await device.write_item_properties(item, documents.item_values(item, job.settings, source))
            job.core = Job(device, session, item, max_pages=None if job.feeder else 1, why="web scan",
                           progress=lambda page, percent: self._update(job, page=page, percent=percent))
            await job.core.start()
            self._update(job, state="scanning")
            stamp = time.strftime("%Y-%m-%d-%H%M")
            job.filename = f"scan-{stamp}.{EXTENSIONS[job.fmt]}"
            job.result = tempfile.SpooledTemporaryFile(SPOOL_BYTES)
            await self._scan_pages(job)
            if not job.pages:
                raise Cancelled("the document feeder is empty" if job.feeder else "nothing was scanned")
            self._update(job, state="done", percent=100)
        except asyncio.CancelledError:
            self._update(job, state="cancelled", error="cancelled")
        except BadRequest as e:
            self._update(job, state="failed", error=e.reason)
        except StillError as e:
            cancelled = job.core is not None and job.core.stopped and "cancelled" in job.core.stop_reason
            self._update(job, state="cancelled" if cancelled else "failed", error=e.message)
        finally:
            idle.cancel()
            if job.core is not None:
                await job.core.close()
            if session is not None:
                await self.manager.close_session(session, why=f"web job {job.state}")
            self.manager.client_gone(job.client)
            log.info("web scan job ended", device=device.id, job=job.id, state=job.state, pages=job.pages,
                     error=job.error)

    async def _scan_pages(self, job: WebJob) -> None:
        core, out = job.core, job.result
        assert core is not None
        encoder = make_encoder(job.fmt)
        while (info := await core.next_page()) is not None:
            page = image_info(info)
            preview = _Preview(page)

            def through(band: bytes, preview: _Preview = preview) -> bytes:
                preview.add(band)
                return encoder.add_rows(band)

            out.write(await job.device.call(encoder.begin_page, page))
            while (data := await core.read(through)) is not None:
                out.write(data)
            out.write(await job.device.call(encoder.end_page))
            job.previews.append(await job.device.call(preview.png))
            self._update(job, pages=job.pages + 1)
            if job.fmt != "pdf":
                break
        if job.pages:
            out.write(await job.device.call(encoder.finish))

    def _idle_check(self, job: WebJob) -> None:
        if job.state not in ("waiting", "scanning"):
            return
        quiet = time.monotonic() - job.seen
        if self.streams or quiet < self.server.config.idle_ms / 1000:
            self.manager.loop.call_later(self.server.config.idle_ms / 1000, self._idle_check, job)
            return
        log.info("web scan job abandoned: nobody follows it", job=job.id, device=job.device.id)
        if job.core is not None:
            job.core.stop("nobody follows the job any more")
        elif job.task is not None:
            job.task.cancel()

    def _trim(self) -> None:
        ended = [k for k, j in self.jobs.items() if j.state not in ("waiting", "scanning")]
        for key in ended[: max(0, len(self.jobs) - KEEP_JOBS)]:
            job = self.jobs.pop(key)
            if job.result is not None:
                job.result.close()


class _Preview:
    """A small PNG of a page, from every n-th row of it as it is read."""

    def __init__(self, info: ImageInfo) -> None:
        self.info = info
        self.step = max(1, info.width // PREVIEW_WIDTH, info.height // (PREVIEW_WIDTH * 2))
        self.rows: list[bytes] = []
        self.row = 0

    def add(self, band: bytes) -> None:
        line = self.info.bytes_per_line
        for offset in range(0, len(band), line):
            if self.row % self.step == 0:
                self.rows.append(band[offset:offset + line])
            self.row += 1

    def png(self) -> bytes:
        info = self.info
        data = b"".join(self.rows)
        height = len(self.rows)
        if info.mode == "lineart":
            image = Image.frombytes("1", (info.width, height), data).point(lambda v: 255 - v).convert("L")
        else:
            if info.depth == 16:
                data = data[0::2]  # the high byte of each big-endian sample
            image = Image.frombytes("RGB" if info.mode == "color" else "L", (info.width, height), data)
        image = image.resize((max(1, info.width // self.step), max(1, height)))
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue()


def describe_holder(client: Client) -> str:
    """Who holds a device, in words for the page: "D-Bus client :1.42 (pid 1234,
    simple-scan)", "network client 192.168.1.7", "web page 127.0.0.1"."""
    if client.via in ("saned", "escl", "web"):
        host = client.name.split(":", 1)[1].rsplit(":", 1)[0]  # <via>:<host>:<port or job>
        kind = {"saned": "network client (SANE)", "escl": "AirScan client", "web": "web page"}[client.via]
        return f"{kind} {host}"
    if client.via == "dbus":
        return f"D-Bus client {client.describe()}"
    return f"the service ({client.name})"


def _refused(status: int, reason: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 404: web.HTTPNotFound, 409: web.HTTPConflict,
           413: web.HTTPBadRequest}[status]
    error = cls(text=json.dumps({"error": reason}), content_type="application/json")
    error.set_status(status)
    return error


__all__ = ["ScanPage", "describe_holder"]
