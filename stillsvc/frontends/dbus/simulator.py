"""``org.stillsvc.StillImage1.Simulator``: the simulated scanner's controls on its device object."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.service import ServiceInterface, dbus_property

from stillsvc.common.errors import NotFound, quote
from stillsvc.common.names import SIMULATOR_IFACE
from stillsvc.frontends.dbus.bus import method
from stillsvc.frontends.dbus.interfaces import check_string
from stillsvc.frontends.dbus.variants import to_vardict

if TYPE_CHECKING:
    from stillsvc.frontends.dbus.service import Service


class SimulatorInterface(ServiceInterface):
    """Drive the simulated scanner (the ``sim`` driver): press its buttons, load
    pages, jam it, pull its plug. Exported through the extension hook
    (:mod:`.extensions`) on the device objects of that driver."""

    def __init__(self, service: Service, device_id: str):
        super().__init__(SIMULATOR_IFACE)
        self.service = service
        self.device_id = device_id

    @property
    def driver(self) -> Any:
        driver = self.service.manager.driver_of(self.device_id)
        if driver is None:
            raise NotFound(f"device {quote(self.device_id)} is gone")
        return driver

    def snapshot(self) -> dict[str, Variant]:
        state = self.driver.simulator_state()
        return {
            "Connected": Variant("b", state["connected"]),
            "PortOpen": Variant("b", state["port_open"]),
            "PagesLoaded": Variant("u", state["pages_loaded"]),
            "Jammed": Variant("b", state["jammed"]),
            "FeederAttached": Variant("b", state["feeder_attached"]),
            "PagesFed": Variant("u", state["pages_fed"]),
            "LastSettings": Variant("a{sv}", self._last_settings()),
        }

    def _last_settings(self) -> dict[str, Variant]:
        return {item: Variant("a{sv}", to_vardict(values))
                for item, values in self.driver.last_settings.items()}

    def changed(self):
        self.emit_properties_changed({k: v.value for k, v in self.snapshot().items()})

    async def _act(self, action: str, **arguments: Any):
        # On a thread of its own, not the device's worker: pulling the plug must be
        # possible while a transfer occupies the device.
        await asyncio.to_thread(self.driver.simulate, action, **arguments)
        self.changed()

    @method()
    async def PressButton(self, button: "s"):
        check_string(self.service, button, "button")
        await self._act("press_button", button=button)

    @method()
    async def LoadPages(self, count: "u"):
        await self._act("load_pages", count=count)

    @method()
    async def Jam(self, at_row: "u"):
        await self._act("jam", at_row=at_row)

    @method()
    async def Unplug(self):
        await self._act("unplug")

    @method()
    async def Replug(self):
        await self._act("replug")

    @method()
    async def AttachFeeder(self, attached: "b"):
        await self._act("attach_feeder", attached=attached)

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> "b":
        return self.driver.simulator_state()["connected"]

    @dbus_property(access=PropertyAccess.READ)
    def PortOpen(self) -> "b":
        return self.driver.simulator_state()["port_open"]

    @dbus_property(access=PropertyAccess.READ)
    def PagesLoaded(self) -> "u":
        return self.driver.simulator_state()["pages_loaded"]

    @dbus_property(access=PropertyAccess.READ)
    def Jammed(self) -> "b":
        return self.driver.simulator_state()["jammed"]

    @dbus_property(access=PropertyAccess.READ)
    def FeederAttached(self) -> "b":
        return self.driver.simulator_state()["feeder_attached"]

    @dbus_property(access=PropertyAccess.READ)
    def PagesFed(self) -> "u":
        return self.driver.simulator_state()["pages_fed"]

    @dbus_property(access=PropertyAccess.READ)
    def LastSettings(self) -> "a{sv}":
        return self._last_settings()


