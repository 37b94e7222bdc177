"""The SANE network server: every SANE application scans through the arbiter.

libsane's ``net`` backend — and through it scanimage, simple-scan, xsane,
skanlite, gscan2pdf, NAPS2, python-sane — talks to this server as it would to
``saned``. Each control connection is one client of the core (``saned:HOST:PORT``),
arbitrated like a D-Bus connection:

* ``OPEN`` opens a *status* session on the device (SANE applications keep a
  device open for a long time, so opening takes nothing from anyone);
* ``START`` takes *data mode* for the job, waiting first come, first served up
  to ``start_wait_ms`` and answering ``SANE_STATUS_DEVICE_BUSY`` after that;
  the page then streams on a data connection of its own, listened for on the
  control connection's local address and accepted only from its peer;
* the job ends — and data mode goes — when the page is read from a flatbed, or
  for a feeder when ``START`` finds it empty (a ``scanimage --batch`` is one
  job), on ``CANCEL``, ``CLOSE``, when the feeder is left waiting for longer
  than ``page_wait_ms`` between pages, and when the connection drops.

Every request is decoded with limits (:mod:`.protocol`); one that does not
decode, an unknown procedure, or a request on a handle that is not the
connection's own ends that connection or answers ``SANE_STATUS_INVAL``, and
touches nothing else. Peers outside ``allow`` are refused before a byte is
read. Every reply goes out in one write with ``TCP_NODELAY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from stillsvc.common.errors import (
    AccessDenied,
    Busy,
    Cancelled,
    Disconnected,
    Empty,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    StillError,
    Timeout,
)
from stillsvc.common.networks import Allowed
from stillsvc.core.config import SanedSettings
from stillsvc.core.devices import Device
from stillsvc.core.jobs import Job, image_info
from stillsvc.core.manager import DeviceManager
from stillsvc.core.sessions import Client, Session
from stillsvc.driver import Mode
from stillsvc.frontends.saned.options import Options, parameters_of
from stillsvc.frontends.saned.protocol import (
    BYTE_ORDER_BIG,
    MAX_ARRAY,
    PROTOCOL,
    VERSION_CODE,
    Action,
    Frame,
    Info,
    Parameters,
    Proc,
    ProtocolError,
    Reader,
    Status,
    Type,
    Writer,
)

log = structlog.get_logger(__name__)

#: The data stream's records: at most this many bytes each.
RECORD_BYTES = 256 * 1024
#: How long a client has to connect to the data port after START.
DATA_CONNECT_TIMEOUT = 10.0
#: The name of the server's sockets under systemd (stillsvc-saned.socket).
SOCKET_NAME = "saned"


def status_of(error: StillError) -> Status:
    """The SANE status a client sees for a core error."""
    if isinstance(error, Busy | Timeout | LimitExceeded):
        return Status.DEVICE_BUSY
    if isinstance(error, Cancelled):
        return Status.CANCELLED
    if isinstance(error, AccessDenied):
        return Status.ACCESS_DENIED
    if isinstance(error, InvalidArgument | NotFound):
        return Status.INVAL
    if isinstance(error, Empty):
        return Status.NO_DOCS
    if "jam" in error.message.lower():
        return Status.JAMMED
    return Status.IO_ERROR


def _sane_type(device: Device) -> str:
    caps = device.info.capabilities
    if device.info.kind == "camera":
        return "still camera"
    if "flatbed" in caps:
        return "flatbed scanner"
    if "feeder" in caps:
        return "sheetfed scanner"
    return "scanner"


class SanedServer:
    """Listens for SANE network clients and serves them from the core."""

    def __init__(self, manager: DeviceManager, config: SanedSettings,
                 sockets: list[socket.socket] | None = None) -> None:
        self.manager = manager
        self.config = config
        #: Listening sockets to serve instead of opening our own (systemd's).
        self.sockets = list(sockets or ())
        self.networks = Allowed(config.allow)
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[Connection] = set()
        self.per_peer: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        sockets = self.sockets
        if sockets:
            for sock in sockets:
                self.servers.append(await asyncio.start_server(self._accept, sock=sock))
        else:
            for host in self.config.listen:
                self.servers.append(await asyncio.start_server(self._accept, host, self.config.port,
                                                               reuse_address=True))
        addresses = [s.getsockname()[:2] for server in self.servers for s in server.sockets]
        log.info("SANE network server listening", addresses=addresses, allow=list(self.config.allow),
                 activated=bool(sockets))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.connections):
            connection.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.servers.clear()

    def allowed(self, host: str) -> bool:
        return host in self.networks

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        host, port = str(peer[0]), int(peer[1])
        if not self.allowed(host):
            log.warning("SANE client refused: not in the allowed networks", peer=host)
            writer.transport.abort()
            return
        if len(self.connections) >= self.config.max_connections or \
                self.per_peer.get(host, 0) >= self.config.max_connections_per_peer:
            log.warning("SANE client refused: too many connections", peer=host,
                        connections=len(self.connections), from_peer=self.per_peer.get(host, 0))
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = Connection(self, reader, writer, host, port)
        self.connections.add(connection)
        self.per_peer[host] = self.per_peer.get(host, 0) + 1
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.per_peer[host] -= 1
            if not self.per_peer[host]:
                del self.per_peer[host]

    def listed(self, device: Device) -> bool:
        """Whether GET_DEVICES lists ``device``: a present scanner that is not a SANE
        device bridged from this server itself (that would loop)."""
        if device.info.kind == "camera" or device.tree is None:
            return False
        port = device.config.port
        if port.startswith("net:"):
            host = port[4:].rsplit(":", 1)[0].strip("[]")
            if host in self.config.listen or host in ("localhost", "127.0.0.1", "::1"):
                return False
        return True


@dataclass(eq=False)
class Handle:
    """One OPENed device of a connection."""

    number: int
    device: Device
    session: Session
    options: Options
    job: Job | None = None
    data: Session | None = None
    streaming: asyncio.Task[None] | None = None
    #: The current page's parameters, once START has given one.
    page: Parameters | None = None
    #: The page has been sent (end marker and all): its stream only tidies up now.
    sent: bool = False
    idle: asyncio.TimerHandle | None = None
    log: Any = field(default=None, repr=False)


class Connection:
    """One control connection: a client of the core."""

    def __init__(self, server: SanedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str, port: int) -> None:
        self.server = server
        self.manager = server.manager
        self.reader = Reader(reader)
        self.stream = reader
        self.writer = writer
        self.host = host
        self.client = Client(name=f"saned:{host}:{port}", via="saned")
        self.handles: dict[int, Handle] = {}
        self.next_handle = 0
        self.log = log.bind(client=self.client.name)
        self.closed = False
        #: The client's protocol version (INIT).
        self.version = PROTOCOL

    def close(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def run(self) -> None:
        self.log.info("SANE client connected")
        why = "closed the connection"
        try:
            await self._serve()
        except EOFError:
            pass
        except ProtocolError as e:
            why = f"bad request: {e}"
            self.log.warning("SANE client sent a bad request; connection ended", error=str(e))
        except (ConnectionError, OSError) as e:
            why = f"connection lost: {e}"
        except Exception:
            why = "internal error"
            self.log.exception("SANE connection failed")
        finally:
            await self._cleanup()
            self.log.info("SANE client gone", why=why)

    async def _cleanup(self) -> None:
        for handle in list(self.handles.values()):
            await self._end_job(handle, "the client left")
        self.handles.clear()
        self.manager.client_gone(self.client)  # closes its sessions
        self.writer.transport.abort()

    def send(self, w: Writer) -> None:
        self.writer.write(w.bytes())

    # -- the request loop ----------------------------------------------------------------
    async def _serve(self) -> None:
        r = self.reader
        proc = await r.next_request()
        if proc != Proc.INIT:
            raise ProtocolError(f"the first request must be INIT, not {proc}")
        version = await r.word()
        await r.string()  # the user name: who is asking is the peer, authenticated by AUTHORIZE
        if version >> 24 != 1:
            raise ProtocolError(f"SANE major version {version >> 24} is not spoken here")
        self.version = version & 0xFFFF
        self.send(Writer().word(Status.GOOD).word(VERSION_CODE))
        await self.writer.drain()
        handlers: dict[int, Callable[[], Awaitable[bool | None]]] = {
            Proc.GET_DEVICES: self._get_devices, Proc.OPEN: self._open, Proc.CLOSE: self._close,
            Proc.GET_OPTION_DESCRIPTORS: self._get_option_descriptors, Proc.CONTROL_OPTION: self._control_option,
            Proc.GET_PARAMETERS: self._get_parameters, Proc.START: self._start, Proc.CANCEL: self._cancel,
            Proc.AUTHORIZE: self._authorize,
        }
        while not self.closed:
            proc = await r.next_request()
            if proc == Proc.EXIT:
                return
            handler = handlers.get(proc)
            if handler is None:
                raise ProtocolError(f"unknown procedure {proc}")
            await handler()
            await self.writer.drain()

    async def _handle(self) -> Handle | None:
        number = await self.reader.word()
        handle = self.handles.get(number)
        if handle is None:
            self.log.info("request for a handle that is not this connection's", handle=number)
        return handle

    # -- procedures ------------------------------------------------------------------------
    async def _get_devices(self) -> None:
        devices = [d for d in self.manager.devices.values() if self.server.listed(d)]
        w = Writer().word(Status.GOOD).word(len(devices) + 1)
        for device in sorted(devices, key=lambda d: d.id):
            w.pointer(True).string(device.id).string(device.info.vendor or "stillsvc")
            w.string(device.info.model or device.info.name).string(_sane_type(device))
        w.pointer(False)
        self.send(w)

    async def _open(self) -> None:
        name = await self.reader.text()
        try:
            if self.server.config.users_file and not await self._authorized(name):
                raise AccessDenied(f"no access to device {name} for this user")
            handle = await self._open_device(name)
        except StillError as e:
            self.log.info("OPEN refused", device=name, error=e.message)
            self.send(Writer().word(status_of(e)).word(0).string(None))
            return
        self.send(Writer().word(Status.GOOD).word(handle.number).string(None))

    async def _open_device(self, name: str) -> Handle:
        self.manager.check_string(name, "device name")
        if not name:  # the default device: the first one listed
            listed = sorted(d.id for d in self.manager.devices.values() if self.server.listed(d))
            if not listed:
                raise NotFound("there are no devices")
            name = listed[0]
        device = self.manager.get(name)
        if not self.server.listed(device):
            raise NotFound(f"device {name} is not a scanner this server offers")
        session = await self.manager.create_session(device.id, Mode.STATUS, self.client)
        try:
            root = device.items_for(session)
            if root is None:
                raise Disconnected(f"device {device.id} has no items")
            options = Options(device, root)
            await options.refresh()
        except BaseException:
            await self.manager.close_session(session, why="OPEN failed")
            raise
        number = self.next_handle
        self.next_handle += 1
        handle = Handle(number, device, session, options, log=self.log.bind(device=device.id, session=session.number))
        self.handles[number] = handle
        handle.log.info("SANE device opened")
        return handle

    async def _close(self) -> None:
        handle = await self._handle()
        if handle is not None:
            await self._end_job(handle, "CLOSE")
            self.handles.pop(handle.number, None)
            await self.manager.close_session(handle.session, why="SANE CLOSE")
        self.send(Writer().word(0))

    async def _get_option_descriptors(self) -> None:
        handle = await self._handle()
        if handle is None:
            self.send(Writer().word(0))  # an empty array
            return
        options = handle.options.options
        w = Writer().word(len(options))
        for i, option in enumerate(options):
            d = option.descriptor
            if i == 0:
                d.size = 4
            d.encode(w)
        self.send(w)

    async def _control_option(self) -> None:
        r = self.reader
        number = await r.word()
        index = await r.word()
        action = await r.word()
        value_type, value_size, value = Type.INT, 0, None
        if self.version < 3 or action != Action.AUTO:
            value_type = await r.word()
            value_size = await r.word()
            value = await self._read_value(value_type, value_size)
        handle = self.handles.get(number)
        status, info, reply = Status.GOOD, Info(0), (value_type, value_size, value)
        try:
            if handle is None:
                raise InvalidArgument(f"handle {number} is not this connection's")
            if handle.job is not None and action != Action.GET:
                raise Busy("options cannot change while a scan runs")
            options = handle.options
            if action == Action.GET:
                reply = options.get(index)
            elif action == Action.SET:
                info = await options.set(index, value)
                reply = options.get(index)
            elif action == Action.AUTO:
                info = await options.set_auto(index)
                reply = options.get(index)
            else:
                raise InvalidArgument(f"unknown action {action}")
        except StillError as e:
            status = Status.DEVICE_BUSY if isinstance(e, Busy) else Status.INVAL
            (handle.log if handle else self.log).info("CONTROL_OPTION refused", option=index, action=action,
                                                      error=e.message)
        w = Writer().word(status).word(info)
        self._write_value(w, *reply)
        w.string(None)
        self.send(w)

    async def _read_value(self, value_type: int, size: int) -> Any:
        r = self.reader
        if size < 0 or size > MAX_ARRAY:
            raise ProtocolError(f"an option value of {size} bytes")
        if value_type in (Type.BOOL, Type.INT, Type.FIXED):
            count = await r.length(MAX_ARRAY // 4, "option value")
            return [await r.word() for _ in range(count)]
        if value_type == Type.STRING:
            count = await r.length(MAX_ARRAY, "option value")
            data = await r.raw(count)
            return data.split(b"\0", 1)[0].decode("utf-8", "replace")
        if value_type in (Type.BUTTON, Type.GROUP):
            await r.length(0, "button value")
            return None
        raise ProtocolError(f"unknown value type {value_type}")

    @staticmethod
    def _write_value(w: Writer, value_type: int, size: int, value: Any) -> None:
        w.word(value_type).word(size)
        if value_type == Type.STRING:
            data = (value or "").encode("utf-8")[: max(0, size - 1)]
            data = data + b"\0" * (size - len(data))
            w.word(size)
            w.parts.append(data)
        elif value_type in (Type.BOOL, Type.INT, Type.FIXED):
            words = value if isinstance(value, list) else []
            w.words(words)
        else:
            w.word(0)

    async def _get_parameters(self) -> None:
        handle = await self._handle()
        w = Writer()
        if handle is None:
            w.word(Status.INVAL)
            Parameters(Frame.GRAY, True, 0, 0, 0, 0).encode(w)
        else:
            w.word(Status.GOOD)
            (handle.page or handle.options.parameters()).encode(w)
        self.send(w)

    async def _authorize(self) -> None:
        """An AUTHORIZE nobody asked for: acknowledged, and nothing else."""
        await self.reader.text()  # resource
        await self.reader.text()  # user
        await self.reader.text()  # password
        self.send(Writer().word(0))

    async def _authorized(self, name: str) -> bool:
        """saned's challenge: OPEN answers with a resource to authorize holding a
        random salt; the client sends AUTHORIZE with a user and "$MD5$" +
        md5(salt + password) (the frontend computes it: scanimage does); after
        acknowledging it the real OPEN reply follows. The
        users file has saned's ``user:password:resource`` lines, the resource
        being a device id (or ``*`` for every device)."""
        device_id = name or "*"
        salt = secrets.token_hex(16)
        resource = f"{device_id}$MD5${salt}"
        self.send(Writer().word(Status.GOOD).word(0).string(resource))
        await self.writer.drain()
        proc = await self.reader.word()
        if proc != Proc.AUTHORIZE:
            raise ProtocolError(f"expected AUTHORIZE after the challenge, not procedure {proc}")
        answered = await self.reader.text()
        user = await self.reader.text()
        password = await self.reader.text()
        self.send(Writer().word(0))
        if answered != resource:
            self.log.warning("AUTHORIZE for another resource", device=device_id, user=user)
            return False
        for entry_user, secret, allowed in await asyncio.to_thread(_users, self.server.config.users_file or ""):
            if entry_user == user and allowed in (device_id, "*"):
                # The frontend sends "$MD5$" + md5(salt + password), or (as saned
                # also accepts) the password itself.
                digest = "$MD5$" + hashlib.md5((salt + secret).encode()).hexdigest()
                if hmac.compare_digest(password.encode(), (digest if password.startswith("$MD5$") else secret).encode()):
                    self.log.info("SANE user authorized", user=user, device=device_id)
                    return True
        self.log.warning("SANE user refused", user=user, device=device_id)
        return False

    async def _cancel(self) -> None:
        handle = await self._handle()
        if handle is not None:
            await self._end_job(handle, "CANCEL")
        self.send(Writer().word(0))

    # -- scanning ------------------------------------------------------------------------------
    async def _start(self) -> None:
        handle = await self._handle()
        if handle is None:
            self.send(Writer().word(Status.INVAL).word(0).word(BYTE_ORDER_BIG).string(None))
            return
        try:
            listener, port = await self._begin_page(handle)
        except StillError as e:
            await self._end_job(handle, f"START failed: {e.message}")
            status = status_of(e)
            handle.log.info("START refused", status=status.name, error=e.message)
            self.send(Writer().word(status).word(0).word(BYTE_ORDER_BIG).string(None))
            return
        self.send(Writer().word(Status.GOOD).word(port).word(BYTE_ORDER_BIG).string(None))
        handle.streaming = asyncio.get_running_loop().create_task(self._stream(handle, listener))

    async def _begin_page(self, handle: Handle) -> tuple[asyncio.base_events.Server, int]:
        if handle.streaming is not None and not handle.streaming.done():
            raise Busy("a page is being sent already")
        if handle.idle is not None:
            handle.idle.cancel()
            handle.idle = None
        if handle.job is None:
            await self._begin_job(handle)
        handle.sent = False
        job = handle.job
        assert job is not None
        info = await self._waiting_for_peer(job.next_page())
        if info is None:
            raise Empty("the document feeder is empty") if job.pages else \
                Empty("no document was scanned")
        handle.page = parameters_of(image_info(info))
        local = self.writer.get_extra_info("sockname")
        expected = self.host

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername") or ("?",)
            if str(peer[0]) != expected or accepted.done():
                handle.log.warning("data connection refused", peer=peer[0])
                writer.transport.abort()
                return
            accepted.set_result(writer)

        accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
        listener = await asyncio.start_server(accept, local[0], 0)
        listener.accepted = accepted  # type: ignore[attr-defined]
        return listener, listener.sockets[0].getsockname()[1]

    async def _begin_job(self, handle: Handle) -> None:
        """Take data mode (waiting in line) and start the acquisition."""
        wait = self.server.config.start_wait_ms / 1000
        await handle.options.apply_area()
        handle.data = await self._waiting_for_peer(
            self.manager.create_session(handle.device.id, Mode.DATA, self.client, wait))
        item = handle.options.item
        feeder = item.kind == "feeder" or item.values.get("source") in ("feeder", "duplex")
        # The job is the data session's; the settings are the OPENed session's items.
        handle.job = Job(handle.device, handle.data, item, max_pages=None if feeder else 1, why="SANE scan")
        await handle.job.start()
        handle.log.info("SANE job started", source=handle.options.source_name)

    async def _waiting_for_peer(self, step: Awaitable[Any]) -> Any:
        """Await ``step`` while watching the control connection: a client waiting for
        a reply sends nothing, so anything readable means it left (or broke the
        protocol) and the wait is given up at once."""
        task = asyncio.ensure_future(step)
        peer = asyncio.ensure_future(self.stream.read(1))
        try:
            done, _ = await asyncio.wait({task, peer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not peer.done():
                peer.cancel()
                # The read must be over before the next request is read.
                with contextlib.suppress(asyncio.CancelledError):
                    await peer
        if peer.done() and not peer.cancelled() and peer.result():
            # A request before the reply to the last one: the client broke the protocol
            # (what the step took is given back as the connection ends).
            raise ProtocolError("a request arrived before the reply to the last one")
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if peer.result():
            raise ProtocolError("a request arrived before the reply to the last one")
        raise EOFError("the peer closed the connection")

    async def _stream(self, handle: Handle, listener: asyncio.base_events.Server) -> None:
        job = handle.job
        accepted: asyncio.Future[asyncio.StreamWriter] = listener.accepted  # type: ignore[attr-defined]
        status = Status.EOF
        writer: asyncio.StreamWriter | None = None
        try:
            writer = await asyncio.wait_for(accepted, DATA_CONNECT_TIMEOUT)
            listener.close()
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert job is not None
            while (band := await job.read()) is not None:
                for start in range(0, len(band), RECORD_BYTES):
                    chunk = band[start:start + RECORD_BYTES]
                    writer.write(len(chunk).to_bytes(4, "big") + chunk)
                    await writer.drain()
        except TimeoutError:
            handle.log.warning("the client never connected to the data port")
            status = Status.IO_ERROR
        except StillError as e:
            status = status_of(e)
            handle.log.info("SANE page ended early", status=status.name, error=e.message)
        except (ConnectionError, OSError):
            status = Status.IO_ERROR
        finally:
            listener.close()
        if writer is not None:
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(b"\xff\xff\xff\xff" + bytes([status]))
                await writer.drain()
            writer.close()
        handle.sent = True  # from here on a CLOSE or CANCEL waits for the rest, not cancels it
        job_done = job is None or job.stopped or (job.max_pages is not None and job.pages >= job.max_pages)
        if status is not Status.EOF or job_done:
            await self._end_job(handle, "page done" if status is Status.EOF else f"page failed: {status.name}",
                                from_stream=True)
        elif not self.closed:
            # A feeder: the job waits for the next START, but not for ever.
            handle.idle = asyncio.get_running_loop().call_later(
                self.server.config.page_wait_ms / 1000,
                lambda: self.manager.spawn(self._end_job(handle, "no START for the next page")))

    async def _end_job(self, handle: Handle, why: str, from_stream: bool = False) -> None:
        """End the handle's job (stopping its stream) and give data mode back."""
        if handle.idle is not None:
            handle.idle.cancel()
            handle.idle = None
        stream = handle.streaming
        if stream is not None and not from_stream and not stream.done():
            if not handle.sent:
                if handle.job is not None:
                    handle.job.stop(why)
                stream.cancel()
            with contextlib.suppress(BaseException):
                await stream
        job, handle.job = handle.job, None
        data, handle.data = handle.data, None
        handle.page = None
        if job is not None:
            await job.close()
            handle.log.info("SANE job ended", why=why, pages=job.pages)
        if data is not None:
            await self.manager.close_session(data, why=f"SANE job ended ({why})")


def _users(path: str) -> list[tuple[str, str, str]]:
    """The ``user:password:resource`` lines of a saned users file (unreadable: none)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        log.error("SANE users file unreadable: nobody is authorized", path=path, error=str(e))
        return []
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) == 3 and all(parts):
            entries.append((parts[0], parts[1], parts[2]))
    return entries


__all__ = ["SanedServer", "status_of"]
