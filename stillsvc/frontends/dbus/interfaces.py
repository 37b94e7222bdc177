"""The exported interfaces. Each method checks its caller and arguments, then calls the core.

Signatures and documentation: one XML file per interface in ``dbus/``; a test
checks that what is exported here matches them exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.service import ServiceInterface, dbus_property, signal

from stillsvc import __version__
from stillsvc.common.errors import InvalidArgument, NotFound
from stillsvc.common.limits import MAX_WAIT_MS
from stillsvc.common.names import (
    DEVICE_IFACE,
    MANAGER_IFACE,
    SESSION_IFACE,
    SIMULATOR_IFACE,
    device_path,
    session_path,
)
from stillsvc.driver import Mode
from stillsvc.frontends.dbus.bus import caller, method
from stillsvc.frontends.dbus.variants import check_options, integer_option, to_vardict

if TYPE_CHECKING:
    from stillsvc.core.devices import Device
    from stillsvc.core.sessions import Session
    from stillsvc.frontends.dbus.service import Service



def check_string(service: Service, value: str, what: str) -> None:
    service.manager.check_string(value, what)


class ManagerInterface(ServiceInterface):
    def __init__(self, service: Service):
        super().__init__(MANAGER_IFACE)
        self.service = service

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Devices(self) -> "ao":
        return sorted(device_path(d) for d in self.service.manager.devices)

    @method()
    def GetDevices(self) -> "ao":
        return sorted(device_path(d) for d in self.service.manager.devices)

    @method()
    def FindDevice(self, device_id: "s") -> "o":
        check_string(self.service, device_id, "device_id")
        return device_path(self.service.manager.get(device_id).id)

    @method()
    async def CreateDevice(self, device_id: "s", mode: "s", options: "a{sv}") -> "o":
        check_string(self.service, device_id, "device_id")
        parsed = Mode.parse(mode)
        check_options(options, {"wait_ms"})
        wait_ms = integer_option(options, "wait_ms", 0, 0, MAX_WAIT_MS)
        client = await self.service.client(caller())
        session = await self.service.manager.create_session(device_id, parsed, client, wait_ms / 1000)
        return self.service.export_session(session)

    @method()
    def GetCandidates(self) -> "aa{sv}":
        return [to_vardict(entry.describe()) for entry in self.service.manager.candidate_report()]

    @method()
    def GetDriverItems(self, device_id: "s") -> "aa{sv}":
        check_string(self.service, device_id, "device_id")
        return [to_vardict(entry) for entry in self.service.manager.item_report(device_id)]

    @method()
    async def WatchEvents(self):
        await self.service.watch_events(caller())

    @method()
    def UnwatchEvents(self):
        self.service.unwatch_events(caller())

    @signal()
    def EventRouted(self) -> "ostxsa{sv}":  # pragma: no cover - sent with unicast_signal
        raise NotImplementedError

    # -- agents and launch registrations (dbus/agents.py) ---------------------------------
    @method()
    async def RegisterAgent(self, agent: "o"):
        await self.service.events.register_agent(caller(), agent)

    @method()
    def UnregisterAgent(self, agent: "o"):
        self.service.events.unregister_agent(caller(), agent)

    @method()
    async def RegisterLaunchApplication(self, name: "s", command: "as", events: "as", devices: "as",
                                        options: "a{sv}"):
        await self.service.events.register_application(caller(), name, command, events, devices, options)

    @method()
    async def UnregisterLaunchApplication(self, name: "s", options: "a{sv}"):
        await self.service.events.unregister_application(caller(), name, options)

    @method()
    async def ListLaunchApplications(self) -> "aa{sv}":
        return await self.service.events.list_applications(caller())

    @method()
    async def SetDefaultApplication(self, device_id: "s", event: "s", application: "s"):
        await self.service.events.set_default(caller(), device_id, event, application)


class DeviceInterface(ServiceInterface):
    def __init__(self, service: Service, device: Device):
        super().__init__(DEVICE_IFACE)
        self.service = service
        self.device = device

    def snapshot(self) -> dict[str, Variant]:
        d = self.device
        holder = d.data_holder
        return {
            "Id": Variant("s", d.id),
            "Name": Variant("s", d.info.name),
            "Vendor": Variant("s", d.info.vendor),
            "Model": Variant("s", d.info.model),
            "Serial": Variant("s", d.info.serial),
            "Kind": Variant("s", d.info.kind),
            "Driver": Variant("s", d.driver.name),
            "Port": Variant("s", d.config.port),
            "State": Variant("s", d.state),
            "StateReason": Variant("s", d.failure),
            "Generation": Variant("u", d.generation),
            "Capabilities": Variant("as", list(d.info.capabilities)),
            "EventNames": Variant("as", list(d.info.event_names)),
            "DataModeHeld": Variant("b", holder is not None),
            "DataModeHolder": Variant("s", holder.client.describe() if holder else ""),
            "DataModeWaiters": Variant("u", len(d.data_mode.waiting)),
            "LockWaiters": Variant("u", len(d.device_lock.waiting)),
            "LockFile": Variant("s", str(d.lockfile.path)),
            "Simulated": Variant("b", SIMULATOR_IFACE in self.service.extensions_of(d.id)),
            "UndeliveredEvents": Variant("u", d.events_undelivered),
        }

    def changed(self, names: list[str]):
        snap = self.snapshot()
        expanded = set(names)
        if "DataModeHolder" in expanded:
            expanded.add("DataModeHeld")
        if "StateReason" in expanded:
            expanded.add("State")
        self.emit_properties_changed({n: snap[n].value for n in expanded if n in snap})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.device.id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.device.info.name

    @dbus_property(access=PropertyAccess.READ)
    def Vendor(self) -> "s":
        return self.device.info.vendor

    @dbus_property(access=PropertyAccess.READ)
    def Model(self) -> "s":
        return self.device.info.model

    @dbus_property(access=PropertyAccess.READ)
    def Serial(self) -> "s":
        return self.device.info.serial

    @dbus_property(access=PropertyAccess.READ)
    def Kind(self) -> "s":
        return self.device.info.kind

    @dbus_property(access=PropertyAccess.READ)
    def Driver(self) -> "s":
        return self.device.driver.name

    @dbus_property(access=PropertyAccess.READ)
    def Port(self) -> "s":
        return self.device.config.port

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.device.state

    @dbus_property(access=PropertyAccess.READ)
    def StateReason(self) -> "s":
        return self.device.failure

    @dbus_property(access=PropertyAccess.READ)
    def Generation(self) -> "u":
        return self.device.generation

    @dbus_property(access=PropertyAccess.READ)
    def Capabilities(self) -> "as":
        return list(self.device.info.capabilities)

    @dbus_property(access=PropertyAccess.READ)
    def EventNames(self) -> "as":
        return list(self.device.info.event_names)

    @dbus_property(access=PropertyAccess.READ)
    def DataModeHeld(self) -> "b":
        return self.device.data_holder is not None

    @dbus_property(access=PropertyAccess.READ)
    def DataModeHolder(self) -> "s":
        holder = self.device.data_holder
        return holder.client.describe() if holder else ""

    @dbus_property(access=PropertyAccess.READ)
    def DataModeWaiters(self) -> "u":
        return len(self.device.data_mode.waiting)

    @dbus_property(access=PropertyAccess.READ)
    def LockWaiters(self) -> "u":
        return len(self.device.device_lock.waiting)

    @dbus_property(access=PropertyAccess.READ)
    def LockFile(self) -> "s":
        return str(self.device.lockfile.path)

    @dbus_property(access=PropertyAccess.READ)
    def Simulated(self) -> "b":
        return SIMULATOR_IFACE in self.service.extensions_of(self.device.id)

    @dbus_property(access=PropertyAccess.READ)
    def UndeliveredEvents(self) -> "u":
        return self.device.events_undelivered


class SessionInterface(ServiceInterface):
    def __init__(self, service: Service, session: Session):
        super().__init__(SESSION_IFACE)
        self.service = service
        self.session = session
        self.path = session_path(session.number)

    def changed(self, values: dict[str, Any]) -> None:
        """PropertiesChanged for the session's owner only: sessions are private."""
        body = {name: Variant(sig, values[name]) for name, sig in (
            ("HoldsLock", "b"), ("Subscribed", "b")) if name in values}
        self.service.bus.unicast_signal(self.session.client.name, self.path, "org.freedesktop.DBus.Properties",
                                        "PropertiesChanged", "sa{sv}as", [SESSION_IFACE, body, []])

    def _mine(self) -> Session:
        """The session, after checking that the caller owns it and it is open."""
        self.session.check_owner(caller())
        self.session.check_open()
        return self.session

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> "o":
        return device_path(self.session.device_id)

    @dbus_property(access=PropertyAccess.READ)
    def DeviceId(self) -> "s":
        return self.session.device_id

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> "s":
        return self.session.mode.label

    @dbus_property(access=PropertyAccess.READ)
    def HoldsLock(self) -> "b":
        return self.session.holds_lock

    @dbus_property(access=PropertyAccess.READ)
    def Subscribed(self) -> "b":
        return self.session.subscribed

    @dbus_property(access=PropertyAccess.READ)
    def QueuedEvents(self) -> "u":
        return len(self.session.events)

    @dbus_property(access=PropertyAccess.READ)
    def DroppedEvents(self) -> "u":
        return self.session.events_dropped

    @dbus_property(access=PropertyAccess.READ)
    def RootItem(self) -> "o":
        return self.service.root_item_path(self.session)

    @method()
    async def LockDevice(self, timeout_ms: "u"):
        session = self._mine()
        await session.device.lock_for(session, timeout_ms)
        self.changed({"HoldsLock": True})

    @method()
    async def UnlockDevice(self):
        session = self._mine()
        if not session.holds_lock:
            raise InvalidArgument("this session does not hold the device lock")
        await session.device.unlock(session)
        self.changed({"HoldsLock": False})

    @method()
    async def GetStatus(self) -> "a{sv}":
        session = self._mine()
        return to_vardict(await session.device.get_status(session))

    @method()
    async def DeviceReset(self):
        session = self._mine()
        await session.device.reset(session)

    @method()
    async def Diagnostic(self) -> "a{sv}":
        session = self._mine()
        return to_vardict(await session.device.diagnostic(session))

    @method()
    async def Escape(self, code: "u", data: "ay") -> "ay":
        session = self._mine()
        return await session.device.escape(session, code, bytes(data))

    @method()
    async def RawReadData(self, size: "u") -> "ay":
        session = self._mine()
        return await session.device.read_data(session, size)

    @method()
    async def RawWriteData(self, data: "ay"):
        session = self._mine()
        await session.device.write_data(session, bytes(data))

    @method()
    async def RawReadCommand(self, size: "u") -> "ay":
        session = self._mine()
        return await session.device.read_command(session, size)

    @method()
    async def RawWriteCommand(self, data: "ay"):
        session = self._mine()
        await session.device.write_command(session, bytes(data))

    @method()
    def Subscribe(self):
        session = self._mine()
        session.subscribe(True)
        self.changed({"Subscribed": True})

    @method()
    def Unsubscribe(self):
        session = self._mine()
        session.subscribe(False)
        self.changed({"Subscribed": False})

    @method()
    def GetLastNotificationData(self) -> "a{sv}":
        session = self.session
        session.check_owner(caller())
        if session.closed:
            raise NotFound(f"session {session.number} is closed")
        record = session.next_event()
        return to_vardict({
            "event": record.name,
            "device": record.device_id,
            "sequence": Variant("t", record.sequence),
            "timestamp_us": Variant("x", int(record.timestamp * 1_000_000)),
            "data": record.data,
            "dropped": Variant("u", session.events_dropped),
            "remaining": Variant("u", len(session.events)),
        })

    @method()
    async def HandOver(self) -> "h":
        session = self._mine()
        fd = await session.device.hand_over(session)
        self.changed({"HoldsLock": False})
        # The reply is sent from this descriptor, whenever the socket has room; the
        # session keeps it (and so the lock) until it is closed.
        return fd

    @method()
    async def Close(self):
        self.session.check_owner(caller())
        if self.session.closed:
            raise NotFound(f"session {self.session.number} is closed")
        await self.service.manager.close_session(self.session)

    @signal()
    def LockRevoked(self) -> "s":  # pragma: no cover - sent with unicast_signal
        raise NotImplementedError

    @signal()
    def EventQueued(self) -> "st":  # pragma: no cover - sent with unicast_signal
        raise NotImplementedError
