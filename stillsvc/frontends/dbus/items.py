"""Application items on the bus: ``<session path>/items/Root/Feeder`` and so on.

Each session's items are its own (its own property copies); like the session,
only the connection that created it may use them, and their signals (progress,
property changes) go to that connection alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.service import ServiceInterface, dbus_property, signal

from stillsvc.common.errors import InvalidArgument, NotFound, quote
from stillsvc.common.names import ITEM_IFACE, sanitise_id, session_path
from stillsvc.core.items import AppItem
from stillsvc.core.transfer import Transfer
from stillsvc.frontends.dbus.bus import caller, method, take_fd
from stillsvc.frontends.dbus.variants import check_options, from_variant, to_vardict

if TYPE_CHECKING:
    from stillsvc.core.sessions import Session
    from stillsvc.frontends.dbus.service import Service

MAX_WRITES = 256


def item_path(session: Session, app: AppItem) -> str:
    return session_path(session.number) + "/items/" + "/".join(sanitise_id(part) for part in app.path.split("/"))


class ItemInterface(ServiceInterface):
    def __init__(self, service: Service, session: Session, app: AppItem) -> None:
        super().__init__(ITEM_IFACE)
        self.service = service
        self.session = session
        self.app = app
        self.path = item_path(session, app)
        self.transfer: Transfer | None = None

    def _mine(self) -> AppItem:
        self.session.check_owner(caller())
        if self.session.closed:
            raise NotFound(f"session {self.session.number} is closed")
        return self.app

    def _unicast(self, member: str, signature: str, body: list[Any]) -> None:
        self.service.bus.unicast_signal(self.session.client.name, self.path, ITEM_IFACE, member, signature, body)

    def properties_changed(self, values: dict[str, Variant]) -> None:
        self.service.bus.unicast_signal(self.session.client.name, self.path, "org.freedesktop.DBus.Properties",
                                        "PropertiesChanged", "sa{sv}as", [ITEM_IFACE, values, []])

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.app.name

    @dbus_property(access=PropertyAccess.READ)
    def Kind(self) -> "s":
        return self.app.kind

    @dbus_property(access=PropertyAccess.READ)
    def ItemPath(self) -> "s":
        return self.app.path

    @dbus_property(access=PropertyAccess.READ)
    def Children(self) -> "ao":
        return [item_path(self.session, child) for child in self.app.children]

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> "b":
        return self.app.connected

    @method()
    def ReadProperties(self) -> "a{sv}":
        app = self._mine()
        return {name: Variant(app.specs[name].signature, value) for name, value in app.values.items()}

    @method()
    async def GetPropertyAttributes(self) -> "a{sa{sv}}":
        app = self._mine()
        attributes = await self.session.device.property_attributes(app)
        return {name: to_vardict(described) for name, described in attributes.items()}

    @method()
    async def WriteProperties(self, values: "a{sv}"):
        app = self._mine()
        if len(values) > MAX_WRITES:
            raise InvalidArgument(f"at most {MAX_WRITES} properties per call")
        plain = {}
        for name, variant in values.items():
            try:
                plain[name] = from_variant(variant)
            except InvalidArgument as e:
                raise InvalidArgument(f"property {quote(name)}: {e.message}") from None
        changed = await self.session.device.write_item_properties(app, plain)
        if changed:
            self.properties_changed({"Properties": Variant("a{sv}", {
                n: Variant(app.specs[n].signature, app.values[n]) for n in changed})})

    @method()
    async def Transfer(self, fd: "h", format: "s", options: "a{sv}") -> "a{sv}":
        app = self._mine()
        self.session.check_open()
        check_options(options, {"offset", "length"})
        span = None
        if options:
            offset = options["offset"].value if "offset" in options else 0
            length = options["length"].value if "length" in options else None
            for name, value in (("offset", offset), ("length", length)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise InvalidArgument(f"option {name} must be a byte count (an unsigned integer)")
            span = (offset, length)
        if self.transfer is not None:
            raise InvalidArgument(f"a transfer from item {app.name} is already running")
        transfer = Transfer(self.session.device, self.session, app, fd, format, progress=self._progress, span=span)
        take_fd(fd)  # accepted: the transfer owns it now and closes it when it ends
        self.transfer = transfer
        try:
            summary = await transfer.run()
        finally:
            self.transfer = None
        return to_vardict(summary.as_dict())

    def _progress(self, page: int, percent: int, written: int) -> None:
        self._unicast("Progress", "uut", [page, percent, written])

    @method()
    def Cancel(self):
        self._mine()
        if self.transfer is None:
            raise InvalidArgument("no transfer is running from this item")
        self.transfer.stop("cancelled by the client")

    @method()
    async def Delete(self):
        app = self._mine()
        self.session.check_open()
        await self.session.device.delete_item(self.session, app)

    @method()
    async def Capture(self):
        app = self._mine()
        self.session.check_open()
        await self.session.device.capture(self.session, app)

    @method()
    async def Synchronize(self):
        self._mine()
        self.session.check_open()
        await self.session.device.synchronize(self.session)

    @signal()
    def Progress(self) -> "uut":  # pragma: no cover - sent with unicast_signal
        raise NotImplementedError
