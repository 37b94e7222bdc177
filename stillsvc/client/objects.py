"""The service's objects as Python objects: Manager, Device, Session, Item.

Each wrapper holds an object path and the :class:`~stillsvc.client.Client` it
was reached through; it keeps no copy of the service's state beyond what it
needs to filter signals, so a snapshot (``info()``) is always a fresh call.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dbus_fast import Message, MessageType, Variant

from stillsvc.client._dbus import OBJECT_MANAGER_IFACE, PROPERTIES_IFACE
from stillsvc.client.changes import Changes
from stillsvc.client.errors import ClientError, ConnectionLost
from stillsvc.client.records import (
    Application,
    CandidateInfo,
    DeviceInfo,
    DriverItemInfo,
    ItemInfo,
    Progress,
    PropertyAttributes,
    QueuedEvent,
    SessionInfo,
    TransferSummary,
)
from stillsvc.client.values import plain, vardict
from stillsvc.common.errors import Empty, NotFound, StillError
from stillsvc.common.names import (
    DEVICE_IFACE,
    DEVICES_PATH,
    ITEM_IFACE,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
)

if TYPE_CHECKING:
    from stillsvc.client.connection import Client

#: Session modes: many status sessions, one data session per device, or both in one.
MODES = ("status", "data", "both")


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class Manager:
    """The service itself (``/org/stillsvc/StillImage1``): devices, sessions,
    registrations. Reached as ``client.manager``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def _call(self, member: str, signature: str = "", args: Iterable[Any] = (),
                    timeout: float | None = None) -> list[Any]:
        return await self._client.call(ROOT_PATH, MANAGER_IFACE, member, signature, list(args), timeout=timeout)

    # -- devices ------------------------------------------------------------------------------
    async def devices(self) -> list[DeviceInfo]:
        """Every present device, sorted by id, in one call (``GetManagedObjects``)."""
        (objects,) = await self._client.call(ROOT_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        found = [DeviceInfo.from_interfaces(path, ifaces) for path, ifaces in objects.items() if DEVICE_IFACE in ifaces]
        return sorted(found, key=lambda d: d.id or d.path)

    async def find_device(self, device_id: str) -> Device:
        """The device with this id; :class:`NotFound` if none is present."""
        (path,) = await self._call("FindDevice", "s", [device_id])
        return Device(self._client, path, device_id)

    async def open_session(self, device_id: str, mode: str = "status", *, wait: float = 0.0) -> Session:
        """Open a device (``CreateDevice``): ``status``, ``data`` or ``both``.

        ``wait`` (seconds) is how long to wait in line for data mode when another
        session holds it, or a program outside the service holds the lock file; 0
        fails at once with :class:`Busy`, a wait that runs out with :class:`Timeout`.
        The session belongs to this connection; close it, or use ``async with``.
        """
        options = {"wait_ms": Variant("u", _ms(wait))} if wait > 0 else {}
        reply = await self._client._call_message(ROOT_PATH, MANAGER_IFACE, "CreateDevice", "ssa{sv}",
                                                 [device_id, mode, options], timeout=wait + self._client.timeout)
        return Session(self._client, reply.body[0], device_id, mode, reply.sender or "")

    async def driver_items(self, device_id: str) -> list[DriverItemInfo]:
        """The device's driver items with their reference counts (a diagnostic view)."""
        (items,) = await self._call("GetDriverItems", "s", [device_id])
        return [DriverItemInfo.from_dict(d) for d in items]

    async def candidates(self) -> list[CandidateInfo]:
        """Every device discovery reported, with the driver it matched (or why none
        did) and the device it became: for finding out why a device is missing."""
        (entries,) = await self._call("GetCandidates")
        return [CandidateInfo.from_dict(d) for d in entries]

    async def version(self) -> str:
        (value,) = await self._client.call(ROOT_PATH, PROPERTIES_IFACE, "Get", "ss", [MANAGER_IFACE, "Version"])
        return value

    def changes(self, *, events: bool = False, devices: bool = True) -> Changes:
        """Follow the service: devices added and removed and their property changes
        (``devices``), every routed event (``events``, for administrators), and the
        service stopping and starting (always). See :class:`Changes`."""
        return Changes(self._client, devices=DEVICES_PATH if devices else None, events=events)

    async def _watch_events(self) -> None:
        await self._call("WatchEvents")

    async def _unwatch_events(self) -> None:
        await self._call("UnwatchEvents")

    # -- registered applications ------------------------------------------------------------
    async def register_application(self, name: str, command: Iterable[str], *, events: Iterable[str] = (),
                                   devices: Iterable[str] = (), system: bool = False) -> None:
        """Register ``command`` to be started for device events nobody in data mode
        takes (``events``/``devices`` empty: all). ``system``: a system-wide one."""
        options = {"system": Variant("b", True)} if system else {}
        await self._call("RegisterLaunchApplication", "sasasasa{sv}",
                         [name, list(command), list(events), list(devices), options])

    async def unregister_application(self, name: str, *, system: bool = False, uid: int | None = None) -> None:
        """Remove a registration: one's own, the system-wide one, or user ``uid``'s."""
        options: dict[str, Variant] = {}
        if system:
            options["system"] = Variant("b", True)
        if uid is not None:
            options["uid"] = Variant("u", uid)
        await self._call("UnregisterLaunchApplication", "sa{sv}", [name, options])

    async def applications(self) -> list[Application]:
        """The registrations this caller may see, oldest first."""
        (apps,) = await self._call("ListLaunchApplications")
        return [Application.from_dict(a) for a in apps]

    async def set_default_application(self, device_id: str, event: str, application: str | None) -> None:
        """Start ``application`` (an :attr:`Application.id`) for ``event`` on
        ``device_id`` without asking; None clears the default."""
        await self._call("SetDefaultApplication", "sss", [device_id, event, application or ""])


class Device:
    """One device object (``/org/stillsvc/StillImage1/devices/ID``)."""

    def __init__(self, client: Client, path: str, device_id: str) -> None:
        self._client = client
        self.path = path
        self.id = device_id

    def __repr__(self) -> str:
        return f"<Device {self.id} {self.path}>"

    async def info(self) -> DeviceInfo:
        """A snapshot of its properties; :class:`NotFound` once the device is gone."""
        (objects,) = await self._client.call(ROOT_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        interfaces = objects.get(self.path, {})
        if DEVICE_IFACE not in interfaces:
            raise NotFound(f"no device {self.id!r}")
        return DeviceInfo.from_interfaces(self.path, interfaces)

    def changes(self) -> Changes:
        """Follow this device: its property changes, its removal, and the service
        stopping and starting. See :class:`Changes`."""
        return Changes(self._client, devices=self.path)


class Session:
    """An open device (``CreateDevice``), private to the connection that opened it.

    ``async with session:`` closes it at the end. After :meth:`close` — or once
    the service closed it — every call raises :class:`NotFound`.
    """

    def __init__(self, client: Client, path: str, device_id: str, mode: str, service: str) -> None:
        self._client = client
        self.path = path
        self.device_id = device_id
        self.mode = mode
        #: the service connection that answered CreateDevice: only its signals count
        self._service = service
        self._queued = asyncio.Event()
        self._listening = False

    def __repr__(self) -> str:
        return f"<Session {self.path} {self.device_id} {self.mode}>"

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            await self.close()
        except (NotFound, ClientError):
            pass  # closed already, or gone with the service or the connection
        except StillError:
            if exc_type is None:
                raise

    async def _call(self, member: str, signature: str = "", args: Iterable[Any] = (),
                    timeout: float | None = None) -> list[Any]:
        return await self._client.call(self.path, SESSION_IFACE, member, signature, list(args), timeout=timeout)

    # -- the device lock ----------------------------------------------------------------
    async def lock(self, timeout: float = 0.0) -> None:
        """Take the device lock (with the lock file) for a run of calls nobody else
        may come between. ``timeout`` (seconds): how long to wait in line; 0 fails
        at once with :class:`Busy`, running out raises :class:`Timeout`."""
        await self._call("LockDevice", "u", [_ms(timeout)], timeout=timeout + self._client.timeout)

    async def unlock(self) -> None:
        """Release the device lock; :class:`InvalidArgument` if this session does not hold it."""
        await self._call("UnlockDevice")

    async def hand_over(self) -> int:
        """Hand the device to a program outside the service; needs data mode and the
        device lock. Returns a descriptor of the device's lock file holding the
        service's flock: the caller owns it (pass it on, close every copy when done)
        and the service takes the device back once nobody holds it."""
        reply = await self._client._call_message(self.path, SESSION_IFACE, "HandOver", timeout=self._client.timeout)
        fds = list(reply.unix_fds)
        index = reply.body[0] if reply.body else -1
        if not 0 <= index < len(fds):
            for fd in fds:
                os.close(fd)
            raise ClientError(f"the service did not pass the lock of {self.device_id} "
                              "(the bus may not support passing file descriptors)")
        for i, fd in enumerate(fds):
            if i != index:
                os.close(fd)
        return fds[index]

    # -- device calls ---------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """The driver's status values (the simulator: online, jammed, pages_loaded, ...)."""
        (values,) = await self._call("GetStatus")
        return values

    async def reset(self) -> None:
        """Reset the device (the simulator clears a paper jam)."""
        await self._call("DeviceReset")

    async def diagnostic(self) -> dict[str, Any]:
        """Run the device's self test."""
        (values,) = await self._call("Diagnostic")
        return values

    async def escape(self, code: int, data: bytes = b"") -> bytes:
        """A vendor command; :class:`NotSupported` for a code the driver does not know."""
        (reply,) = await self._call("Escape", "uay", [code, bytes(data)])
        return bytes(reply)

    async def read_data(self, size: int) -> bytes:
        (data,) = await self._call("RawReadData", "u", [size])
        return bytes(data)

    async def write_data(self, data: bytes) -> None:
        await self._call("RawWriteData", "ay", [bytes(data)])

    async def read_command(self, size: int) -> bytes:
        (data,) = await self._call("RawReadCommand", "u", [size])
        return bytes(data)

    async def write_command(self, data: bytes) -> None:
        await self._call("RawWriteCommand", "ay", [bytes(data)])

    # -- events -----------------------------------------------------------------------------
    async def subscribe(self) -> None:
        """Ask for ``EventQueued`` signals, which :meth:`events` waits on. Needs data mode."""
        self._listen()
        await self._call("Subscribe")

    async def unsubscribe(self) -> None:
        await self._call("Unsubscribe")

    async def next_event(self) -> QueuedEvent:
        """Take the oldest queued event; :class:`Empty` when none is queued (the
        session is fine), :class:`NotFound` when the session is closed."""
        (values,) = await self._call("GetLastNotificationData")
        return QueuedEvent.from_dict(values)

    async def events(self) -> AsyncIterator[QueuedEvent]:
        """Every event queued for this session, as it comes (subscribes first), until
        the caller stops iterating; :class:`ConnectionLost` when the connection ends."""
        await self.subscribe()
        while True:
            self._queued.clear()
            try:
                yield await self.next_event()
                continue
            except Empty:
                pass
            queued = asyncio.ensure_future(self._queued.wait())
            lost = asyncio.ensure_future(self._client.wait_closed())
            try:
                await asyncio.wait({queued, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                queued.cancel()
                lost.cancel()
            if not self._queued.is_set() and not self._client.connected:
                raise ConnectionLost(f"lost the connection to the {self._client.bus} bus")

    def _listen(self) -> None:
        if not self._listening:
            self._listening = True
            self._client._add_handler(self._on_signal)

    def _on_signal(self, msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.path == self.path and msg.sender == self._service
                and msg.interface == SESSION_IFACE and msg.member == "EventQueued"):
            self._queued.set()

    # -- items and the rest ---------------------------------------------------------------------
    async def info(self) -> SessionInfo:
        """A snapshot of the session's properties (mode, lock, queue)."""
        (props,) = await self._client.call(self.path, PROPERTIES_IFACE, "GetAll", "s", [SESSION_IFACE])
        return SessionInfo.from_properties(self.path, props)

    async def root(self) -> Item:
        """The session's root item (the device)."""
        (path,) = await self._client.call(self.path, PROPERTIES_IFACE, "Get", "ss", [SESSION_IFACE, "RootItem"])
        return Item(self, path)

    async def items(self) -> list[ItemInfo]:
        """Every item of the session's tree, depth first from the root."""
        found: list[ItemInfo] = []

        async def walk(item: Item) -> None:
            info = await item.info()
            found.append(info)
            for child in info.children:
                await walk(Item(self, child))

        await walk(await self.root())
        return found

    async def item(self, which: str) -> Item:
        """An item by name (``Flatbed``), place in the tree (``Root/Feeder``) or
        object path; :class:`NotFound` if the tree has none such."""
        if which.startswith("/"):
            return Item(self, which)
        infos = await self.items()
        for info in infos:
            if which in (info.name, info.item_path):
                return Item(self, info.path)
        raise NotFound(f"no item {which!r} (items: {', '.join(i.item_path for i in infos)})")

    async def close(self) -> None:
        """Close the session: the lock and data mode go, queued events are dropped."""
        try:
            await self._call("Close")
        finally:
            if self._listening:
                self._listening = False
                self._client._remove_handler(self._on_signal)


class Item:
    """One application item of a session: its own copy of the item's properties."""

    def __init__(self, session: Session, path: str) -> None:
        self.session = session
        self.path = path
        self._client = session._client
        #: property name -> D-Bus type, learnt once: types do not change, valid values do
        self._types: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"<Item {self.path}>"

    async def _call(self, member: str, signature: str = "", args: Iterable[Any] = ()) -> list[Any]:
        return await self._client.call(self.path, ITEM_IFACE, member, signature, list(args))

    async def info(self) -> ItemInfo:
        (props,) = await self._client.call(self.path, PROPERTIES_IFACE, "GetAll", "s", [ITEM_IFACE])
        return ItemInfo.from_properties(self.path, props)

    async def children(self) -> list[Item]:
        return [Item(self.session, path) for path in (await self.info()).children]

    async def read(self) -> dict[str, Any]:
        """Every property of the item with its value in this application item."""
        (values,) = await self._call("ReadProperties")
        return values

    async def attributes(self) -> dict[str, PropertyAttributes]:
        """Each property's type, access, description and valid values (for the current values)."""
        (attributes,) = await self._call("GetPropertyAttributes")
        result = {name: PropertyAttributes.from_dict(a) for name, a in attributes.items()}
        self._types = {name: a.type for name, a in result.items()}
        return result

    async def write(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Write properties as plain values: ``item.write(resolution=300, mode="gray")``.

        Each value is sent with the D-Bus type the item declares for it, so callers
        need not know that ``resolution`` is ``u``. :class:`InvalidArgument` from the
        service names the property and what is valid; the driver may adjust
        dependent properties (read them back with :meth:`read`).
        """
        wanted = {**(values or {}), **more}
        if self._types is None:
            await self.attributes()
        await self._call("WriteProperties", "a{sv}", [vardict(wanted, self._types)])

    async def transfer(self, target: int | str | os.PathLike[str], format: str = "", *,
                       progress: Callable[[Progress], None] | None = None, offset: int | None = None,
                       length: int | None = None) -> TransferSummary:
        """Acquire an image into ``target``: a descriptor open for writing (a pipe, a
        socket, a file; it stays the caller's) or a path (created or truncated, and
        closed when done). ``format``: raw, pnm, png, tiff, jpeg, pdf; "" for the
        item's ``format`` property; for an item that is a file (a camera's picture)
        "native" (its bytes unchanged, also "") or "thumbnail"; ``offset`` and
        ``length`` ask for part of a file's native bytes.

        ``progress`` is called with each ``Progress`` signal. Cancelling the awaiting
        task cancels the transfer in the service too (``Item.Cancel``) and waits for
        it to end, so the item is free again when the cancellation arrives; another task
        may stop it with :meth:`cancel`, and the transfer then raises
        :class:`Cancelled`. There is no call timeout: the service itself stops a
        transfer whose reader stalls.
        """
        options = {name: Variant("t", value) for name, value in (("offset", offset), ("length", length))
                   if value is not None}
        if isinstance(target, int):
            return await self._transfer(target, format, progress, options)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            return await self._transfer(fd, format, progress, options)
        finally:
            os.close(fd)

    async def _transfer(self, fd: int, fmt: str, progress: Callable[[Progress], None] | None,
                        options: dict[str, Variant]) -> TransferSummary:
        service = self.session._service

        def on_signal(msg: Message) -> None:
            if (progress is not None and msg.message_type is MessageType.SIGNAL and msg.path == self.path
                    and msg.sender == service and msg.interface == ITEM_IFACE and msg.member == "Progress"):
                progress(Progress(*msg.body))

        self._client._add_handler(on_signal)
        call = asyncio.ensure_future(self._client._call_message(
            self.path, ITEM_IFACE, "Transfer", "hsa{sv}", [0, fmt, options], fds=[fd], timeout=None))
        call.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # Stop the service's transfer too, and see it end: once this raises, the
            # item is free for the next transfer and the descriptor no longer written.
            try:
                await self.cancel()
            except (StillError, ClientError):
                pass  # it ended meanwhile, or the service is gone
            await asyncio.wait({call}, timeout=self._client.timeout)
            raise
        finally:
            self._client._remove_handler(on_signal)
        return TransferSummary.from_dict(plain(reply.body[0]))

    async def cancel(self) -> None:
        """Stop this item's running transfer; :class:`InvalidArgument` if none runs."""
        await self._call("Cancel")

    async def synchronize(self) -> None:
        """Rebuild the device's item tree from the device (after a feeder came or went)."""
        await self._call("Synchronize")

    async def delete(self) -> None:
        """Remove this item from the device (a camera's picture); needs data mode."""
        await self._call("Delete")

    async def capture(self) -> None:
        """On a camera's root item: take a picture (it comes as a ``new-picture``
        event); needs data mode, and a camera that offers it (capability "capture")."""
        await self._call("Capture")

