"""Keeps the exported object tree in step with the core, and knows the clients.

* Devices appear and disappear as objects under ``/org/stillsvc/StillImage1/devices``
  with ``InterfacesAdded``/``InterfacesRemoved`` sent from the manager's path.
* Sessions are objects under ``…/sessions/<n>``; they are private to their client,
  so no ObjectManager signal announces them.
* Every client that opens a session (or watches events) is watched with a
  ``NameOwnerChanged`` match for its unique name: when it leaves the bus, the core
  closes everything it had, at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from dbus_fast import Message, MessageType, Variant

from stillsvc.common.names import (
    BUS_NAME,
    DEVICE_IFACE,
    IFACE_PREFIX,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
    SESSIONS_PATH,
    device_path,
)
from stillsvc.core.devices import Device
from stillsvc.core.listener import Listener
from stillsvc.core.manager import DeviceManager
from stillsvc.core.routing import Outcome
from stillsvc.core.sessions import Client, EventRecord, Session
from stillsvc.frontends.dbus import extensions
from stillsvc.frontends.dbus.authority import Authority
from stillsvc.frontends.dbus.bus import ServiceBus, error_name
from stillsvc.frontends.dbus.interfaces import DeviceInterface, ManagerInterface, SessionInterface
from stillsvc.frontends.dbus.items import ItemInterface, item_path
from stillsvc.frontends.dbus.variants import to_vardict

log = structlog.get_logger(__name__)

OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


def _session_number(path: str) -> int:
    """The session number of a session path or of one of its items' paths."""
    try:
        return int(path[len(SESSIONS_PATH) + 1:].split("/", 1)[0])
    except ValueError:
        return -1


class Service(Listener):
    def __init__(self, bus: ServiceBus, manager: DeviceManager, authorization: str = "none") -> None:
        self.bus = bus
        self.manager = manager
        self.authority = Authority(bus, authorization)
        self.manager_iface = ManagerInterface(self)
        self.device_ifaces: dict[str, DeviceInterface] = {}
        #: Driver-specific interfaces on device objects (extensions.py), by device id.
        self.extension_ifaces: dict[str, list[Any]] = {}
        self.extension_classes = extensions.discover()
        self.session_ifaces: dict[int, SessionInterface] = {}
        self.item_ifaces: dict[int, dict[int, ItemInterface]] = {}
        self.clients: dict[str, Client] = {}
        self._client_lookups: dict[str, asyncio.Future[Client]] = {}
        #: Names that left the bus while they were being looked up.
        self._left_during_lookup: set[str] = set()
        self.event_watchers: set[str] = set()
        #: The event monitor's D-Bus side (agents, registrations: dbus/agents.py), set at start.
        self.events: Any = None

    # -- start and stop -----------------------------------------------------------
    async def start(self) -> None:
        self.bus.add_message_handler(self._handle)
        self.bus.object_manager_path = ROOT_PATH
        self.bus.export(ROOT_PATH, self.manager_iface)
        self.manager.listeners.append(self)
        for device in self.manager.devices.values():
            self.device_added(device)

    def stop(self) -> None:
        if self in self.manager.listeners:
            self.manager.listeners.remove(self)

    # -- messages the library must not answer itself -------------------------------
    def _handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type is MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME and msg.body[2] == "":
                self._name_lost(msg.body[0])
            return None
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        if msg.path.startswith(SESSIONS_PATH + "/") and msg.interface == PROPERTIES_IFACE:
            # Sessions are private: the library's Properties handler knows no owners.
            iface = self.session_ifaces.get(_session_number(msg.path))
            if iface is not None and msg.sender != iface.session.client.name:  # the session's items too
                return Message.new_error(msg, error_name("AccessDenied"),
                                         f"session {iface.session.number} belongs to another client")
        if msg.interface == OBJECT_MANAGER_IFACE and msg.member == "GetManagedObjects":
            if msg.path != ROOT_PATH or msg.signature != "":
                return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                         f"no ObjectManager at {msg.path}; it is at {ROOT_PATH}")
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [self.managed_objects()])
        if (msg.interface or "").startswith(IFACE_PREFIX + ".") and msg.path not in self.bus._path_exports:
            # A closed session or a device that went away: say so in our own terms.
            what = "session" if msg.path.startswith(SESSIONS_PATH + "/") else "object"
            return Message.new_error(msg, error_name("NotFound"), f"no {what} at {msg.path} (closed or gone)")
        return None

    def managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        objects: dict[str, dict[str, dict[str, Variant]]] = {}
        for device_id in set(self.device_ifaces) | set(self.extension_ifaces):
            objects[device_path(device_id)] = self._interfaces_of(device_id)
        return objects

    def _interfaces_of(self, device_id: str) -> dict[str, dict[str, Variant]]:
        interfaces: dict[str, dict[str, Variant]] = {}
        if device_id in self.device_ifaces:
            interfaces[DEVICE_IFACE] = self.device_ifaces[device_id].snapshot()
        for extension in self.extension_ifaces.get(device_id, ()):
            interfaces[extension.name] = _snapshot(extension)
        return interfaces

    def extensions_of(self, device_id: str) -> list[str]:
        """The names of the driver-specific interfaces on a device's object."""
        return [extension.name for extension in self.extension_ifaces.get(device_id, ())]

    # -- devices --------------------------------------------------------------------
    def device_added(self, device: Device) -> None:
        path = device_path(device.id)
        iface = DeviceInterface(self, device)
        self.device_ifaces[device.id] = iface
        self.bus.export(path, iface)
        if device.id not in self.extension_ifaces:
            extensions_added = [cls(self, device.id) for cls in self.extension_classes.get(device.driver.name, ())]
            for extension in extensions_added:
                self.bus.export(path, extension)
            self.extension_ifaces[device.id] = extensions_added
        else:  # the driver was kept while the device was away: its interfaces stayed
            extensions_added = []
            for extension in self.extension_ifaces[device.id]:
                _changed(extension)
        added = {DEVICE_IFACE: iface.snapshot(), **{e.name: _snapshot(e) for e in extensions_added}}
        self.bus.broadcast_signal(ROOT_PATH, OBJECT_MANAGER_IFACE, "InterfacesAdded", "oa{sa{sv}}", [path, added])
        self.manager_iface.emit_properties_changed({"Devices": sorted(device_path(d) for d in self.manager.devices)})

    def device_removed(self, device: Device) -> None:
        path = device_path(device.id)
        iface = self.device_ifaces.pop(device.id, None)
        if iface is None:
            return
        self.bus.unexport(path, iface)
        removed = [DEVICE_IFACE]
        if self.manager.driver_of(device.id) is None:
            for extension in self.extension_ifaces.pop(device.id, ()):
                self.bus.unexport(path, extension)
                removed.append(extension.name)
        else:  # the driver may bring the device back: its own interfaces stay
            for extension in self.extension_ifaces.get(device.id, ()):
                _changed(extension)
        self.bus.broadcast_signal(ROOT_PATH, OBJECT_MANAGER_IFACE, "InterfacesRemoved", "oas", [path, removed])
        self.manager_iface.emit_properties_changed({"Devices": sorted(device_path(d) for d in self.manager.devices)})

    def device_changed(self, device: Device, names: list[str]) -> None:
        iface = self.device_ifaces.get(device.id)
        if iface is not None and iface.device is device:
            iface.changed(names)
        for extension in self.extension_ifaces.get(device.id, ()):
            _changed(extension)

    # -- sessions ---------------------------------------------------------------------
    def export_session(self, session: Session) -> str:
        iface = SessionInterface(self, session)
        self.session_ifaces[session.number] = iface
        self.bus.export(iface.path, iface)
        return iface.path

    def _export_items(self, session: Session) -> list[ItemInterface]:
        exported = self.item_ifaces.setdefault(session.number, {})
        new: list[ItemInterface] = []
        if session.root_item is None:
            return new
        by_path = {iface.path: key for key, iface in exported.items()}
        for app in session.root_item.walk():
            if id(app) not in exported:
                iface = ItemInterface(self, session, app)
                replaced = by_path.get(iface.path)
                if replaced is not None:  # a retired item at the same place gives way
                    self.bus.unexport(iface.path, exported.pop(replaced))
                exported[id(app)] = iface
                self.bus.export(iface.path, iface)
                new.append(iface)
        return new

    def root_item_path(self, session: Session) -> str:
        root = session.device.items_for(session)
        if root is None:
            return "/"
        self._export_items(session)
        return item_path(session, root)

    def items_changed(self, device: Device) -> None:
        """Synchronize added items: export them, and tell each owner its parents' Children changed."""
        for session in list(device.sessions):
            if session.number not in self.session_ifaces:
                continue  # the service's own sessions (the event monitor) are not on the bus
            for iface in self._export_items(session):
                parent = iface.app.parent
                parent_iface = self.item_ifaces[session.number].get(id(parent)) if parent else None
                if parent_iface is not None:
                    parent_iface.properties_changed({"Children": Variant("ao", [
                        item_path(session, child) for child in parent.children])})

    def session_closed(self, session: Session) -> None:
        iface = self.session_ifaces.pop(session.number, None)
        if iface is not None:
            self.bus.unexport(iface.path, iface)
        for item_iface in self.item_ifaces.pop(session.number, {}).values():
            self.bus.unexport(item_iface.path, item_iface)

    def lock_revoked(self, session: Session) -> None:
        iface = self.session_ifaces.get(session.number)
        if iface is None:
            return
        reason = f"held longer than {self.manager.limits.lock_max_hold_ms} ms"
        self.bus.unicast_signal(session.client.name, iface.path, SESSION_IFACE, "LockRevoked", "s", [reason])
        iface.changed({"HoldsLock": False})

    def event_queued(self, session: Session, record: EventRecord) -> None:
        iface = self.session_ifaces.get(session.number)
        if iface is not None:
            self.bus.unicast_signal(session.client.name, iface.path, SESSION_IFACE, "EventQueued", "st",
                                    [record.name, record.sequence])

    # -- events for administrators ------------------------------------------------
    async def watch_events(self, name: str | None) -> None:
        if name is None:
            return
        client = await self.client(name)  # watched from now on, so the subscription ends when it leaves
        if not client.gone:
            self.event_watchers.add(name)

    def unwatch_events(self, name: str | None) -> None:
        self.event_watchers.discard(name)  # type: ignore[arg-type]

    def event_routed(self, device: Device, record: EventRecord, outcome: Outcome) -> None:
        body = [device_path(device.id), record.name, record.sequence, int(record.timestamp * 1_000_000), str(outcome),
                to_vardict(record.data)]
        for watcher in list(self.event_watchers):
            self.bus.unicast_signal(watcher, ROOT_PATH, MANAGER_IFACE, "EventRouted", "ostxsa{sv}", body)

    # -- clients ---------------------------------------------------------------------
    async def client(self, name: str | None) -> Client:
        """Who ``name`` is (uid, pid, command), watched from now on for leaving the bus."""
        if name is None:
            return Client(name="(unknown)")
        known = self.clients.get(name)
        if known is not None:
            return known
        pending = self._client_lookups.get(name)
        if pending is None:
            pending = self.manager.loop.create_future()
            self._client_lookups[name] = pending
            self.manager.spawn(self._look_up(name, pending))
        return await asyncio.shield(pending)

    async def _look_up(self, name: str, result: asyncio.Future[Client]) -> None:
        try:
            await self._dbus_call("AddMatch", "s", [
                f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_NAME}',"
                f"member='NameOwnerChanged',arg0='{name}'"])
            uid = pid = None
            try:
                creds = await self._dbus_call("GetConnectionCredentials", "s", [name])
                found = creds[0]
                uid = found["UnixUserID"].value if "UnixUserID" in found else None
                pid = found["ProcessID"].value if "ProcessID" in found else None
            except Exception as e:
                log.debug("no credentials for client", client=name, error=str(e))
            command = None
            if pid is not None:
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                        command = f.read().strip()
                except OSError:
                    pass
            client = Client(name=name, uid=uid, pid=pid, command=command, via="dbus")
            # The match is in place: from here a departure is either seen by NameHasOwner
            # or arrives as NameOwnerChanged (perhaps before this coroutine resumes).
            has_owner = await self._dbus_call("NameHasOwner", "s", [name])
            if not has_owner[0] or name in self._left_during_lookup:
                client.gone = True
                self._forget_match(name)
            else:
                self.clients[name] = client
            result.set_result(client)
        except Exception as e:
            if not result.done():
                result.set_exception(e)
        finally:
            self._client_lookups.pop(name, None)
            self._left_during_lookup.discard(name)

    async def _dbus_call(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        reply = await self.bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_NAME,
                                            member=member, signature=signature, body=body))
        if reply.message_type is MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return reply.body

    def _name_lost(self, name: str) -> None:
        if not name.startswith(":"):
            return
        self.event_watchers.discard(name)
        if name in self._client_lookups:
            self._left_during_lookup.add(name)
        client = self.clients.pop(name, None)
        if client is None:
            return
        log.info("client left the bus", client=name)
        # Marked gone in this very step: nothing in flight can be granted to it later.
        self.manager.client_gone(client)
        self._forget_match(name)

    def _forget_match(self, name: str) -> None:
        self.manager.spawn(self._dbus_call("RemoveMatch", "s", [
            f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_NAME}',"
            f"member='NameOwnerChanged',arg0='{name}'"]))


def _snapshot(extension: Any) -> dict[str, Variant]:
    snapshot = getattr(extension, "snapshot", None)
    return snapshot() if callable(snapshot) else {}


def _changed(extension: Any) -> None:
    changed = getattr(extension, "changed", None)
    if callable(changed):
        try:
            changed()
        except Exception:
            log.exception("extension interface failed to announce a change", interface=extension.name)


__all__ = ["Service", "BUS_NAME"]
