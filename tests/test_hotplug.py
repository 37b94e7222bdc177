"""USB hotplug end to end: the real daemon follows a umockdev testbed (tests/testbed.py)
through its udev discovery, and drives the devices with a real plugin driver
(tests/plugins: ``usbsim``, the simulated scanner on a USB device whose udev
property ``STILLSVC_TEST_DRIVER`` is ``usbsim``).

The daemon runs as ``umockdev-wrapper python3 -m stillsvc.daemon ... --udev`` with
``UMOCKDEV_DIR`` set to the testbed and ``tests/plugins`` on its ``PYTHONPATH``;
this process plugs and unplugs devices through the testbed's controller process
and watches the bus. Nothing is waited for by sleeping: signals, or a state polled
with a deadline (helpers.wait_until).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from dbus_fast import DBusError, Variant
from dbus_fast.aio import MessageBus
from helpers import (
    DEVICE,
    ITEM,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    TIMEOUT,
    Daemon,
    Signals,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    expect_error,
    get_all,
    get_property,
    readable,
    unwrap,
    wait_until,
)
from test_transfer import driver_items, open_items, pattern, read, read_all, sim, small, write
from testbed import Testbed, unavailable

from stillsvc.common.names import device_path
from stillsvc.imaging import parse_raw

UNAVAILABLE = unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"USB hotplug tests need umockdev: {UNAVAILABLE}")

PLUGINS = str(REPO / "tests" / "plugins")
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
DRIVER = {"STILLSVC_TEST_DRIVER": "usbsim"}

# The ids of the devices below: <driver>-<vid>-<pid>-<serial>, or -at-<port> without a serial.
SCANNER = "usbsim-04a9-190a-ABC"
AT_1_2 = "usbsim-04a9-190a-at-1-2"
AT_1_3 = "usbsim-04a9-190a-at-1-3"


# -- the service under the testbed ----------------------------------------------------------------

@pytest.fixture
def testbed():
    with Testbed() as tb:
        yield tb


@pytest.fixture
async def bus(bus_address):
    client = await connect(bus_address)
    yield client
    client.disconnect()


@pytest.fixture
async def bus2(bus_address):
    client = await connect(bus_address)
    yield client
    client.disconnect()


@pytest.fixture
async def service(request, bus_address, tmp_path, testbed):
    """``await service()`` starts the daemon (with ``--simulate`` and ``--udev``) under
    the testbed and returns it once it owns its name: plug the coldplugged devices
    in before (``event=False``)."""
    started: list[Daemon] = []

    async def start(*extra: str) -> Daemon:
        path = os.pathsep.join(p for p in (PLUGINS, os.environ.get("PYTHONPATH", "")) if p)
        daemon = Daemon(bus_address, "--udev", *extra, workdir=str(tmp_path / f"daemon{len(started)}"),
                        env={"PYTHONPATH": path})
        daemon.args, daemon.env = testbed.wrap(daemon.args, daemon.env)
        request.node._stillsvc_daemon = daemon  # its log is shown when the test fails
        started.append(daemon)
        return await daemon.ready()

    yield start
    for daemon in started:
        daemon.stop()


def plug(testbed: Testbed, port: str = "1-2", serial: str = "", *, event: bool = True, **properties: str) -> str:
    """Plug a device the usbsim driver takes; returns its sysfs path."""
    return testbed.add_usb(port, serial=serial, properties={**DRIVER, **properties}, event=event)


class Devices(Signals):
    """InterfacesAdded and InterfacesRemoved of device objects, in the order they came."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus, interface=OBJECT_MANAGER, path=ROOT,
                         predicate=lambda m: m.member in ("InterfacesAdded", "InterfacesRemoved")
                         and m.body[0].startswith(f"{ROOT}/devices/"))

    def added(self, path: str) -> list[dict[str, Any]]:
        """The Device properties of each InterfacesAdded for ``path``."""
        return [unwrap(m.body[1][DEVICE]) for m in self.received
                if m.member == "InterfacesAdded" and m.body[0] == path and DEVICE in m.body[1]]

    def removed(self, path: str) -> int:
        return sum(1 for m in self.received
                   if m.member == "InterfacesRemoved" and m.body[0] == path and DEVICE in m.body[1])

    def events(self, path: str) -> list[str]:
        return [m.member for m in self.received if m.body[0] == path]

    async def appeared(self, device_id: str, count: int = 1, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The Device properties of the ``count``-th InterfacesAdded of ``device_id``."""
        path = device_path(device_id)
        try:
            await self.wait(timeout=timeout, until=lambda _: len(self.added(path)) >= count)
        except TimeoutError:
            raise TimeoutError(f"{device_id} did not appear (InterfacesAdded #{count}) within {timeout} s; "
                               f"device signals so far: {self.summary()}") from None
        return self.added(path)[count - 1]

    async def gone(self, device_id: str, count: int = 1, timeout: float = TIMEOUT) -> None:
        path = device_path(device_id)
        try:
            await self.wait(timeout=timeout, until=lambda _: self.removed(path) >= count)
        except TimeoutError:
            raise TimeoutError(f"{device_id} did not go (InterfacesRemoved #{count}) within {timeout} s; "
                               f"device signals so far: {self.summary()}") from None

    def summary(self) -> list[str]:
        return [f"{m.member.removeprefix('Interfaces')} {m.body[0].rsplit('/', 1)[1]}" for m in self.received]


async def devices(bus: MessageBus) -> list[str]:
    (paths,) = await call(bus, ROOT, MANAGER, "GetDevices")
    return sorted(paths)


async def managed_devices(bus: MessageBus) -> dict[str, dict[str, Any]]:
    """GetManagedObjects: the Device properties of every device object."""
    (objects,) = await call(bus, ROOT, OBJECT_MANAGER, "GetManagedObjects")
    return {path: unwrap(interfaces[DEVICE]) for path, interfaces in objects.items() if DEVICE in interfaces}


async def candidates(bus: MessageBus) -> list[dict[str, Any]]:
    (entries,) = await call(bus, ROOT, MANAGER, "GetCandidates")
    return [unwrap(entry) for entry in entries]


async def state_of(bus: MessageBus, device_id: str) -> str | None:
    """The device's State, None while it has no object."""
    try:
        return await get_property(bus, device_path(device_id), DEVICE, "State")
    except DBusError:
        return None


async def scan(bus: MessageBus, device_id: str, page: int | None = 0, width: int = 32, height: int = 24) -> None:
    """A data session on the device, one small raw page from the flatbed, checked byte for
    byte against the simulator's pattern for ``page`` (the device's page count: 0 for a
    driver that has just started), and the session closed again."""
    session, root = await open_items(bus, "data", device_id)
    flatbed = root + "/Flatbed"
    await small(bus, flatbed, width=width, height=height)
    r, w = os.pipe()
    reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
    try:
        (summary,) = await call(bus, flatbed, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}], unix_fds=[w])
    finally:
        os.close(w)
        data = await reader
    assert unwrap(summary)["pages"] == 1
    ((info, _, rows),) = parse_raw(data)
    assert (info.width, info.height, info.mode) == (width, height, "color")
    if page is not None:
        assert rows == pattern(width, height, "color", page)
    await call(bus, session, SESSION, "Close")


class HeldTransfer:
    """A raw flatbed transfer into a pipe the test reads only in :meth:`finish`: the
    service fills the pipe and waits, so the transfer is running until then."""

    WIDTH, HEIGHT = 600, 800  # 75 dpi colour: 1.4 MB, far more than a pipe holds

    def __init__(self, bus: MessageBus, flatbed: str) -> None:
        self.bus, self.flatbed = bus, flatbed
        self.r = -1
        self.reply: asyncio.Future[list[Any]] | None = None

    async def start(self) -> HeldTransfer:
        await small(self.bus, self.flatbed, width=self.WIDTH, height=self.HEIGHT)
        self.r, w = os.pipe()
        self.reply = asyncio.ensure_future(call(self.bus, self.flatbed, ITEM, "Transfer", "hsa{sv}",
                                                [0, "raw", {}], unix_fds=[w], timeout=30))
        try:
            await readable(self.r)  # the service has the descriptor and is writing into it
        finally:
            os.close(w)
        return self

    async def finish(self) -> tuple[dict[str, Any], bytes]:
        """Read the rest; (the reply, every byte of the stream)."""
        assert self.reply is not None
        data = await asyncio.get_running_loop().run_in_executor(None, read_all, self.r)
        self.r = -1
        (summary,) = await asyncio.wait_for(self.reply, TIMEOUT)
        return unwrap(summary), data

    async def check(self, page: int) -> None:
        """It completes, byte for byte the simulator's pattern for ``page``."""
        summary, data = await self.finish()
        assert summary["pages"] == 1 and summary["bytes"] == len(data)
        ((info, _, rows),) = parse_raw(data)
        assert (info.width, info.height) == (self.WIDTH, self.HEIGHT)
        assert rows == pattern(self.WIDTH, self.HEIGHT, "color", page)

    def close(self) -> None:
        if self.reply is not None:
            if not self.reply.done():
                self.reply.cancel()
            elif not self.reply.cancelled():
                self.reply.exception()  # seen: a test that failed earlier says why, not this
        if self.r >= 0:
            os.close(self.r)
            self.r = -1


async def marker(testbed: Testbed, watch: Devices, serial: str = "MARK", port: str = "1-9") -> str:
    """Plug a device and wait for its object. The daemon reads uevents in order, so it has
    read every one sent before (different devices are handled side by side, so wait for
    the state those events lead to as well)."""
    path = plug(testbed, port, serial)
    await watch.appeared(f"usbsim-04a9-190a-{serial}")
    return path


# -- device ids and coldplug ----------------------------------------------------------------------

async def test_coldplugged_devices_are_there_when_the_name_appears(testbed, service, bus):
    plug(testbed, "1-2", "ABC", event=False)
    plug(testbed, "1-3", event=False)
    plug(testbed, "1-5.4", event=False)  # behind a hub on 1-5
    plug(testbed, "1-6", event=False, ID_PATH_TAG="pci-0000_00_14_0-usb-0_6")
    await service()
    expected = {SCANNER: "usb:001:002", AT_1_3: "usb:001:003", "usbsim-04a9-190a-at-1-5.4": "usb:001:005",
                "usbsim-04a9-190a-at-pci-0000_00_14_0-usb-0_6": "usb:001:006"}
    assert await devices(bus) == sorted([SIM0, *(device_path(i) for i in expected)])
    objects = await managed_devices(bus)
    assert sorted(objects) == await devices(bus)
    for device_id, port in expected.items():
        props = objects[device_path(device_id)]
        assert (props["Id"], props["Driver"], props["Port"], props["State"]) == (device_id, "usbsim", port, "ready")
        assert (props["Generation"], props["StateReason"]) == (1, "")
    scanner = objects[device_path(SCANNER)]
    assert (scanner["Vendor"], scanner["Model"], scanner["Serial"]) == ("Canon", "CanoScan", "ABC")
    assert objects[device_path(AT_1_3)]["Serial"] == ""
    assert device_path("usbsim-04a9-190a-at-1-5.4") == f"{ROOT}/devices/usbsim_04a9_190a_at_1_5_4"
    assert objects[SIM0]["State"] == "ready" and objects[SIM0]["Driver"] == "sim"
    await scan(bus, AT_1_3)


async def test_a_plugged_in_device_is_announced_with_its_properties(testbed, service, bus):
    daemon = await service()
    async with Devices(bus) as watch:
        path = plug(testbed, "1-2", "ABC")
        props = await watch.appeared(SCANNER)
    assert props["Id"] == SCANNER and props["Driver"] == "usbsim"
    assert (props["Vendor"], props["Model"], props["Serial"], props["Name"]) == (
        "Canon", "CanoScan", "ABC", "Canon CanoScan")
    assert props["Port"] == testbed.usb_port(path) == "usb:001:002"
    assert (props["State"], props["StateReason"], props["Generation"]) == ("ready", "", 1)
    assert await get_all(bus, device_path(SCANNER), DEVICE) == props
    assert await devices(bus) == sorted([SIM0, device_path(SCANNER)])
    await scan(bus, SCANNER)
    assert_daemon_healthy(daemon)


async def test_two_identical_devices_without_serial_get_ids_by_port(testbed, service, bus):
    await service()
    async with Devices(bus) as watch:
        first = plug(testbed, "1-2")
        second = plug(testbed, "1-3")
        a = await watch.appeared(AT_1_2)
        b = await watch.appeared(AT_1_3)
    assert (a["Port"], b["Port"]) == (testbed.usb_port(first), testbed.usb_port(second))
    assert await devices(bus) == sorted([SIM0, device_path(AT_1_2), device_path(AT_1_3)])
    await scan(bus, AT_1_2)
    await scan(bus, AT_1_3)


async def test_two_devices_with_the_same_serial_both_get_an_id(testbed, service, bus):
    await service()
    async with Devices(bus) as watch:
        plug(testbed, "1-2", "DUP")
        await watch.appeared("usbsim-04a9-190a-DUP")
        plug(testbed, "1-3", "DUP")
        second = await watch.appeared("usbsim-04a9-190a-DUP-at-1-3")
    assert second["State"] == "ready"
    assert await devices(bus) == sorted(
        [SIM0, device_path("usbsim-04a9-190a-DUP"), device_path("usbsim-04a9-190a-DUP-at-1-3")])
    await scan(bus, "usbsim-04a9-190a-DUP-at-1-3")


# -- unplugging ---------------------------------------------------------------------------------------

async def test_unplugging_removes_the_object(testbed, service, bus):
    path = plug(testbed, "1-2", "ABC", event=False)
    daemon = await service()
    async with Devices(bus) as watch:
        testbed.remove(path)
        await watch.gone(SCANNER)
    assert await devices(bus) == [SIM0]
    assert device_path(SCANNER) not in await managed_devices(bus)
    await expect_error("NotFound", create_session(bus, SCANNER))
    assert not any(c["device_id"] == SCANNER for c in await candidates(bus))
    assert_daemon_healthy(daemon)


async def test_after_unplugging_sessions_fail_with_disconnected_and_items_stay_readable(testbed, service, bus):
    path = plug(testbed, "1-2", "ABC", event=False)
    await service()
    status = await create_session(bus, SCANNER, "status")
    assert "online" in unwrap((await call(bus, status, SESSION, "GetStatus"))[0])
    data, root = await open_items(bus, "data", SCANNER)
    await write(bus, root + "/Flatbed", resolution=300, mode="gray")
    async with Devices(bus) as watch:
        testbed.remove(path)
        await watch.gone(SCANNER)
    await expect_error("Disconnected", call(bus, status, SESSION, "GetStatus"))
    await expect_error("Disconnected", call(bus, data, SESSION, "GetStatus"))
    values = await read(bus, root + "/Flatbed")
    assert (values["resolution"], values["mode"], values["width"]) == (300, "gray", 2550)
    assert await get_property(bus, root + "/Flatbed", ITEM, "Connected") is False
    entries = await driver_items(bus, SCANNER)
    assert entries and all(not e["present"] and e["removed"] and e["generation"] == 1 for e in entries.values())


async def test_unplugging_ends_a_running_transfer_with_disconnected(testbed, service, bus):
    path = plug(testbed, "1-2", "ABC", event=False)
    await service()
    _, root = await open_items(bus, "data", SCANNER)
    held = await HeldTransfer(bus, root + "/Flatbed").start()
    try:
        testbed.remove(path)
        await expect_error("Disconnected", asyncio.wait_for(held.reply, TIMEOUT))
    finally:
        held.close()
    assert await devices(bus) == [SIM0]


async def test_unplugging_fails_a_data_mode_waiter_with_disconnected(testbed, service, bus, bus2):
    path = plug(testbed, "1-2", "ABC", event=False)
    await service()
    await create_session(bus, SCANNER, "data")
    waiter = asyncio.ensure_future(create_session(bus2, SCANNER, "data", wait_ms=Variant("u", 20000)))

    async def waiting() -> bool:
        return await get_property(bus, device_path(SCANNER), DEVICE, "DataModeWaiters") == 1

    await wait_until(waiting, what="the second client waits for data mode")
    testbed.remove(path)
    await expect_error("Disconnected", asyncio.wait_for(waiter, TIMEOUT))


async def test_unplugging_one_device_leaves_another_devices_transfer_alone(testbed, service, bus, bus2):
    plug(testbed, "1-3", "XYZ", event=False)
    path = plug(testbed, "1-2", "ABC", event=False)
    daemon = await service()
    _, root = await open_items(bus, "data", "usbsim-04a9-190a-XYZ")
    _, sim_root = await open_items(bus2, "data", "sim0")
    fed = await sim(bus2, "PagesFed")
    usb_transfer = await HeldTransfer(bus, root + "/Flatbed").start()
    sim_transfer = await HeldTransfer(bus2, sim_root + "/Flatbed").start()
    try:
        async with Devices(bus) as watch:
            testbed.remove(path)
            await watch.gone(SCANNER)
        await usb_transfer.check(page=0)
        await sim_transfer.check(page=fed)
    finally:
        usb_transfer.close()
        sim_transfer.close()
    assert await devices(bus) == sorted([SIM0, device_path("usbsim-04a9-190a-XYZ")])
    assert_daemon_healthy(daemon)


# -- plugging in again ----------------------------------------------------------------------------------

async def test_replugging_gives_the_same_id_a_new_generation_and_a_fresh_item_tree(testbed, service, bus):
    path = plug(testbed, "1-2", "ABC", event=False)
    await service()
    old_session, old_root = await open_items(bus, "data", SCANNER)
    await write(bus, old_root + "/Flatbed", resolution=300)
    first = await get_property(bus, device_path(SCANNER), DEVICE, "Port")
    async with Devices(bus) as watch:
        testbed.remove(path)
        await watch.gone(SCANNER)
        again = plug(testbed, "1-2", "ABC")
        props = await watch.appeared(SCANNER)
    assert props["Generation"] == 2 and props["State"] == "ready"
    assert props["Port"] == testbed.usb_port(again) != first  # the kernel gave it a new devnum
    entries = await driver_items(bus, SCANNER)
    assert entries[("Root/Flatbed", 1)]["present"] is False and entries[("Root/Flatbed", 1)]["removed"] is True
    assert entries[("Root/Flatbed", 2)]["present"] is True and entries[("Root/Flatbed", 2)]["removed"] is False
    assert {gen for _, gen in entries} == {1, 2}
    assert await get_property(bus, old_root + "/Flatbed", ITEM, "Connected") is False
    assert (await read(bus, old_root + "/Flatbed"))["resolution"] == 300
    await expect_error("Disconnected", call(bus, old_session, SESSION, "GetStatus"))
    await call(bus, old_session, SESSION, "Close")
    assert {gen for _, gen in await driver_items(bus, SCANNER)} == {2}
    await scan(bus, SCANNER, page=0)  # a new driver: its first page


async def test_a_bounce_ends_with_one_usable_device(testbed, service, bus):
    path = plug(testbed, "1-2", "ABC", event=False)
    daemon = await service()
    async with Devices(bus) as watch:
        with testbed.batch():  # back to back, in one go
            testbed.remove(path)
            plug(testbed, "1-2", "ABC")
        await marker(testbed, watch)
        target = device_path(SCANNER)

        async def settled() -> bool:
            return await state_of(bus, SCANNER) == "ready" and watch.removed(target) == len(watch.added(target))

        await wait_until(settled, what="the bounced device is back and ready")
    objects = await managed_devices(bus)
    assert [p for p in objects if p == target] == [target]
    assert objects[target]["Generation"] in (1, 2)
    assert watch.events(target) in ([], ["InterfacesRemoved", "InterfacesAdded"])
    await scan(bus, SCANNER, page=None)
    assert await state_of(bus, SCANNER) == "ready"
    assert_daemon_healthy(daemon)


async def test_a_burst_of_plugging_ends_in_the_state_of_the_last_events(testbed, service, bus, bus2):
    daemon = await service()
    _, sim_root = await open_items(bus2, "data", "sim0")
    fed = await sim(bus2, "PagesFed")
    held = await HeldTransfer(bus2, sim_root + "/Flatbed").start()
    ports = {f"B{n}": f"1-{4 + n}" for n in range(3)}
    present: dict[str, str] = {}
    try:
        async with Devices(bus) as watch:
            with testbed.batch():
                for n in range(50):
                    serial = f"B{n % 3}"
                    if serial in present:
                        testbed.remove(present.pop(serial))
                    else:
                        present[serial] = plug(testbed, ports[serial], serial)
            assert sorted(present) == ["B0", "B1"]  # 17 events each for B0 and B1, 16 for B2
            await marker(testbed, watch)
            expected = sorted([SIM0, device_path("usbsim-04a9-190a-MARK"),
                               *(device_path(f"usbsim-04a9-190a-{s}") for s in present)])

            def consistent() -> bool:
                return all(len(watch.added(device_path(f"usbsim-04a9-190a-{s}")))
                           - watch.removed(device_path(f"usbsim-04a9-190a-{s}")) == (s in present) for s in ports)

            async def settled() -> bool:
                return consistent() and await devices(bus) == expected

            await wait_until(settled, what="the devices settle in their last state")
        await held.check(page=fed)  # sim0's transfer ran through the burst untouched
    finally:
        held.close()
    objects = await managed_devices(bus)
    assert sorted(objects) == expected == await devices(bus)
    for serial in present:
        assert objects[device_path(f"usbsim-04a9-190a-{serial}")]["State"] == "ready"
    assert sorted(c["device_id"] for c in await candidates(bus) if c["subsystem"] == "usb") == sorted(
        ["usbsim-04a9-190a-MARK", *(f"usbsim-04a9-190a-{s}" for s in present)])
    for serial in present:
        await scan(bus, f"usbsim-04a9-190a-{serial}", page=None)
    assert_daemon_healthy(daemon)


# -- drivers that fail, devices nobody drives --------------------------------------------------------

async def test_a_device_whose_driver_fails_is_shown_failed_until_a_change_fixes_it(testbed, service, bus):
    await service()
    async with Devices(bus) as watch:
        path = plug(testbed, "1-2", "ABC", STILLSVC_TEST_FAIL="1")
        props = await watch.appeared(SCANNER)
    assert props["State"] == "failed"
    assert "refused to start" in props["StateReason"]
    e = await expect_error("Failed", create_session(bus, SCANNER, "status"))
    assert "refused to start" in e.text
    (entry,) = [c for c in await candidates(bus) if c["subsystem"] == "usb"]
    assert (entry["status"], entry["driver"], entry["device_id"]) == ("failed", "usbsim", SCANNER)
    assert "refused to start" in entry["reason"]

    async with Devices(bus) as watch:
        testbed.change(path, STILLSVC_TEST_FAIL="")
        async def ready() -> bool:
            return await state_of(bus, SCANNER) == "ready"

        await wait_until(ready, what="the fixed device is ready")
    assert watch.events(device_path(SCANNER)) in ([], ["InterfacesRemoved", "InterfacesAdded"])
    props = await get_all(bus, device_path(SCANNER), DEVICE)
    assert (props["State"], props["StateReason"]) == ("ready", "")
    (entry,) = [c for c in await candidates(bus) if c["subsystem"] == "usb"]
    assert (entry["status"], entry["device_id"], entry["reason"]) == ("added", SCANNER, "")
    await scan(bus, SCANNER)


async def test_a_slow_driver_holds_up_no_other_device(testbed, service, bus):
    await service()
    async with Devices(bus) as watch:
        plug(testbed, "1-2", "SLOW", STILLSVC_TEST_INIT_DELAY_MS="3000")
        plug(testbed, "1-3", "FAST")
        await watch.appeared("usbsim-04a9-190a-FAST")
        assert watch.added(device_path("usbsim-04a9-190a-SLOW")) == []  # the slow one is still starting
        status = await create_session(bus, "sim0", "status")
        await asyncio.wait_for(call(bus, status, SESSION, "GetStatus"), 2.0)  # the service answers meanwhile
        slow = await watch.appeared("usbsim-04a9-190a-SLOW")
    assert slow["State"] == "ready"


async def test_an_unmatched_device_is_only_a_candidate_and_hubs_are_not_even_that(testbed, service, bus):
    mouse = testbed.add_usb("1-2", vendor_id=0x046d, product_id=0xc077, interfaces=":030102:", event=False)
    daemon = await service()
    async with Devices(bus) as watch:
        scanner = plug(testbed, "1-3.1", "ABC")  # a hub on 1-3 first
        await watch.appeared(SCANNER)
    assert await devices(bus) == sorted([SIM0, device_path(SCANNER)])
    usb = {c["port"]: c for c in await candidates(bus) if c["subsystem"] == "usb"}
    assert sorted(usb) == sorted([testbed.usb_port(mouse), testbed.usb_port(scanner)])  # no hub, no interface
    entry = usb[testbed.usb_port(mouse)]
    assert {"id", "subsystem", "port", "driver", "device_id", "status", "reason"} <= set(entry)
    assert entry["id"] and (entry["driver"], entry["device_id"], entry["status"]) == ("", "", "unmatched")
    assert entry["reason"]
    found = usb[testbed.usb_port(scanner)]
    assert (found["driver"], found["device_id"], found["status"]) == ("usbsim", SCANNER, "added")
    assert found["id"] != entry["id"]
    async with Devices(bus) as watch:
        testbed.remove(mouse)
        await marker(testbed, watch)
    assert entry["port"] not in {c["port"] for c in await candidates(bus)}  # unplugged: no longer a candidate
    assert_daemon_healthy(daemon)


async def test_a_change_event_leaves_a_working_device_alone(testbed, service, bus):
    path = plug(testbed, "1-2", "ABC", event=False)
    daemon = await service()
    status = await create_session(bus, SCANNER, "status")
    async with Signals(bus, member="PropertiesChanged", path=device_path(SCANNER)) as changes:
        async with Devices(bus) as watch:
            testbed.change(path, ID_MODEL_FROM_DATABASE="CanoScan LiDE")
            testbed.uevent(path, "bind")
            await marker(testbed, watch)
        assert watch.events(device_path(SCANNER)) == []
    states = [m.body[1]["State"].value for m in changes.received if "State" in m.body[1]]
    assert all(state == "ready" for state in states)
    assert await get_property(bus, device_path(SCANNER), DEVICE, "Generation") == 1
    assert "online" in unwrap((await call(bus, status, SESSION, "GetStatus"))[0])  # the same device
    assert_daemon_healthy(daemon)
