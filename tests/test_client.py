"""stillsvc.client against the real daemon on a private bus.

Every test talks to the daemon of the ``daemon`` fixture (simulated scanner
``sim0``) through the client library, and where it needs a second party, through
a second library client or the raw dbus-fast connection of the ``client``
fixture. Nothing waits for time to pass: each wait is for a reply, a signal
(through :class:`~stillsvc.client.Changes` or a session's events) or data in a
pipe.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from helpers import (
    DEVICE,
    REPO,
    SIM0,
    SIMULATOR,
    TIMEOUT,
    call,
    get_all,
    names_client,
    readable,
)
from PIL import Image

from stillsvc.client import (
    MODES,
    AccessDenied,
    Application,
    BusUnavailable,
    Busy,
    Cancelled,
    Client,
    ClientError,
    ConnectionLost,
    DeviceInfo,
    Disconnected,
    Empty,
    EventRouted,
    Failed,
    InterfacesAdded,
    InterfacesRemoved,
    InvalidArgument,
    LaunchRequest,
    LimitExceeded,
    NoReply,
    NotFound,
    NotSupported,
    Progress,
    PropertiesChanged,
    QueuedEvent,
    ServiceNotRunning,
    ServiceStopped,
    StillError,
    Timeout,
    parse_bus,
)
from stillsvc.client.errors import error_from_reply
from stillsvc.client.values import to_variant, vardict
from stillsvc.common.errors import ALL_ERRORS, dbus_error_name, error_class
from stillsvc.common.names import (
    AGENT_IFACE,
    AGENTS_PATH,
    DEVICE_IFACE,
    ERROR_PREFIX,
    SIMULATOR_IFACE,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = {"resolution": 75, "width": 64, "height": 48}
BIG = {"resolution": 600}  # the whole bed in colour at 600 dpi: ~107 MB raw, far more than a pipe holds


@pytest.fixture
async def still(daemon) -> AsyncIterator[Client]:
    """A library client of the test's daemon."""
    async with Client(daemon.address, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
async def still2(daemon) -> AsyncIterator[Client]:
    """A second library client: another connection, so another owner."""
    async with Client(daemon.address, timeout=TIMEOUT) as c:
        yield c


async def simulate(client: Client, member: str, signature: str = "", *args: Any) -> None:
    await client.call(SIM0, SIMULATOR_IFACE, member, signature, list(args))


def read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


async def next_matching(changes, wanted: Callable[[Any], bool], timeout: float = TIMEOUT) -> Any:
    """The first change ``wanted`` accepts (the ones before it are skipped)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        change = await changes.next(max(0.001, deadline - asyncio.get_running_loop().time()))
        if wanted(change):
            return change


# -- connecting ------------------------------------------------------------------------

def test_bus_argument_rule():
    assert parse_bus("system") == "system"
    assert parse_bus("session") == "session"
    assert parse_bus("unix:path=/run/x,guid=00") == "unix:path=/run/x,guid=00"
    for bad in ("nonsense", "unix:", "path=/x", ""):
        with pytest.raises(ValueError, match="is not 'system', 'session' or a D-Bus address"):
            parse_bus(bad)
    with pytest.raises(ValueError):
        Client("nonsense")


async def test_a_bus_without_the_service_is_service_not_running(bus_address):
    with pytest.raises(ServiceNotRunning) as raised:
        await Client(bus_address).connect()
    assert type(raised.value) is ServiceNotRunning  # the bus is there: not BusUnavailable
    assert raised.value.message == f"the stillsvc service is not running on the {bus_address} bus"
    # Connected anyway, a call is answered by the bus itself: ServiceUnknown.
    client = await Client(bus_address).connect(require_service=False)
    try:
        assert client.service_owner is None
        with pytest.raises(ServiceNotRunning) as raised:
            await client.manager.devices()
        assert raised.value.error_name == "org.freedesktop.DBus.Error.ServiceUnknown"
    finally:
        client.disconnect()


async def test_a_bus_that_cannot_be_reached_is_bus_unavailable(tmp_path):
    address = f"unix:path={tmp_path}/no-bus-here"
    with pytest.raises(BusUnavailable) as raised:
        await Client(address).connect()
    assert isinstance(raised.value, ServiceNotRunning)
    assert raised.value.reason
    assert raised.value.message.startswith(f"the stillsvc service is not running on the {address} bus (cannot connect")


async def test_connect_disconnect_and_the_service_owner(daemon, client):
    still = Client(daemon.address)
    assert not still.connected
    async with still:
        assert still.connected and still.unique_name and still.unique_name != client.unique_name
        (owner,) = await call(client, "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", "s",
                              ["org.stillsvc.StillImage1"], destination="org.freedesktop.DBus")
        assert still.service_owner == owner
        assert await still.manager.version() == "0.1.0"
    assert not still.connected
    await asyncio.wait_for(still.wait_closed(), TIMEOUT)


# -- devices ---------------------------------------------------------------------------------

async def test_devices_and_find_device(still, client):
    (sim0,) = await still.manager.devices()
    assert isinstance(sim0, DeviceInfo)
    assert (sim0.path, sim0.id, sim0.name, sim0.state) == (SIM0, "sim0", "Simulated Scanner", "ready")
    assert sim0.simulated and not sim0.data_mode_held and sim0.data_mode_holder == ""
    assert "scan-button" in sim0.event_names and "flatbed" in sim0.capabilities
    assert sim0.as_dict() == await get_all(client, SIM0, DEVICE)  # nothing lost on the way
    assert sim0.interfaces[SIMULATOR_IFACE] == await get_all(client, SIM0, SIMULATOR)
    device = await still.manager.find_device("sim0")
    assert (device.path, device.id) == (SIM0, "sim0")
    assert (await device.info()).lock_file == sim0.lock_file
    with pytest.raises(NotFound, match="no device 'nope'"):
        await still.manager.find_device("nope")


async def test_driver_items(still):
    items = await still.manager.driver_items("sim0")
    assert {i.path for i in items} >= {"Root", "Root/Flatbed", "Root/Feeder"}
    assert all(i.refcount >= 1 and i.present and not i.removed for i in items)


# -- sessions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_open_a_session_in_each_mode(still, mode):
    session = await still.manager.open_session("sim0", mode)
    info = await session.info()
    assert (info.mode, info.device, info.device_id, info.holds_lock) == (mode, SIM0, "sim0", False)
    device = await (await still.manager.find_device("sim0")).info()
    assert device.data_mode_held is (mode != "status")
    if mode != "status":
        assert names_client(device.data_mode_holder, still.unique_name)
    assert (await session.status())["online"] is True
    await session.close()
    with pytest.raises(NotFound):  # a closed session: NotFound, never Empty
        await session.status()
    assert (await (await still.manager.find_device("sim0")).info()).data_mode_held is False


async def test_async_with_closes_the_session(still):
    async with await still.manager.open_session("sim0", "data") as session:
        assert (await session.info()).mode == "data"
    with pytest.raises(NotFound):
        await session.next_event()
    async with session:  # closing a closed session on the way out is not an error
        pass


async def test_lock_and_unlock(still, still2):
    mine = await still.manager.open_session("sim0", "status")
    other = await still2.manager.open_session("sim0", "status")
    await mine.lock(1.0)
    assert (await mine.info()).holds_lock is True
    with pytest.raises(Busy):
        await other.lock(0)
    with pytest.raises(Timeout):
        await other.lock(0.2)
    await mine.unlock()
    assert (await mine.info()).holds_lock is False
    with pytest.raises(InvalidArgument):
        await mine.unlock()
    await other.lock(0)
    await other.unlock()


async def test_status_diagnostic_escape_and_raw_io(still):
    async with await still.manager.open_session("sim0", "both") as session:
        status = await session.status()
        assert status["online"] is True and status["jammed"] is False
        assert (await session.diagnostic())["result"] == "pass"
        assert await session.escape(1, b"\x00echo") == b"\x00echo"
        assert await session.escape(2) == b"SIM 1.0"
        assert await session.read_data(300) == bytes(range(256)) + bytes(range(44))
        await session.write_data(b"abc")
        assert await session.read_command(10) == b"OK\n"
        await session.write_command(b"PING")
        await session.reset()
        assert (await session.status())["resets"] == status["resets"] + 1


async def test_hand_over_gives_the_lock_file(still):
    device = await still.manager.find_device("sim0")
    lock_file = (await device.info()).lock_file
    session = await still.manager.open_session("sim0", "both")
    await session.lock(1.0)
    fd = await session.hand_over()
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == lock_file
        assert (await device.info()).state == "held-by-program"
        with pytest.raises(Busy):
            await session.status()
    finally:
        async with device.changes() as changes:
            os.close(fd)
            await session.close()
            await next_matching(changes, lambda c: isinstance(c, PropertiesChanged)
                                and c.changed.get("State") == "ready")
    assert (await device.info()).state == "ready"


# -- items and transfers ----------------------------------------------------------------------------

async def test_the_item_tree(still):
    async with await still.manager.open_session("sim0", "status") as session:
        tree = await session.items()
        assert [(i.item_path, i.kind, i.depth) for i in tree] == [
            ("Root", "device", 0), ("Root/Flatbed", "flatbed", 1), ("Root/Feeder", "feeder", 1)]
        root = await session.root()
        assert root.path == tree[0].path
        assert [c.path for c in await root.children()] == [tree[1].path, tree[2].path]
        assert (await session.item("Root/Feeder")).path == tree[2].path
        flatbed = await session.item("Flatbed")
        attributes = await flatbed.attributes()
        assert attributes["resolution"].type == "u" and attributes["resolution"].writable
        assert attributes["resolution"].valid == {"kind": "list", "values": [75, 100, 150, 200, 300, 600]}
        assert not attributes["max_width"].writable
        with pytest.raises(NotFound, match="no item 'Lid'"):
            await session.item("Lid")
        await flatbed.synchronize()
        assert [i.item_path for i in await session.items()] == [i.item_path for i in tree]


async def test_property_writes_take_plain_values(still):
    async with await still.manager.open_session("sim0", "data") as session:
        flatbed = await session.item("Flatbed")
        await flatbed.write(resolution=75, mode="gray", brightness=-10)
        await flatbed.write({"contrast": 5})
        values = await flatbed.read()
        assert (values["resolution"], values["mode"], values["brightness"], values["contrast"]) == (75, "gray", -10, 5)
        assert values["max_width"] == 637  # the driver's dependent value for 75 dpi
        with pytest.raises(InvalidArgument, match="resolution") as raised:
            await flatbed.write(resolution=123)
        assert "75" in raised.value.message  # the service says what is valid
        with pytest.raises(InvalidArgument, match="resolution"):
            await flatbed.write(resolution="high")  # sent as what it is; the service refuses it
        with pytest.raises(InvalidArgument, match="loudness"):
            await flatbed.write(loudness=3)
        assert (await flatbed.read())["resolution"] == 75  # nothing changed


def test_values_get_the_declared_type():
    assert to_variant(300, "u") == Variant("u", 300)
    assert to_variant(5, "i") == Variant("i", 5)  # a guess from the Python type would say "u"
    assert to_variant(2, "d") == Variant("d", 2.0)
    assert to_variant(True, "b") == Variant("b", True)
    assert to_variant(["a"], "as") == Variant("as", ["a"])
    assert to_variant(-1, "u") == Variant("i", -1)  # does not fit: sent as it is, for the service to refuse
    assert to_variant("x", "u") == Variant("s", "x")
    assert to_variant(True, "u") == Variant("b", True)
    assert vardict({"a": 1, "b": 2}, {"a": "t"}) == {"a": Variant("t", 1), "b": Variant("u", 2)}


async def test_transfer_into_a_pipe_with_progress(still):
    async with await still.manager.open_session("sim0", "data") as session:
        flatbed = await session.item("Flatbed")
        await flatbed.write(resolution=75)  # the whole bed: 637 x 876, several bands
        progress: list[Progress] = []
        r, w = os.pipe()
        reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
        try:
            summary = await flatbed.transfer(w, "png", progress=progress.append)
        finally:
            os.close(w)  # the descriptor stays the caller's
        data = await reader
    assert data.startswith(PNG_MAGIC)
    assert (summary.format, summary.pages, summary.bytes) == ("png", 1, len(data))
    image = Image.open(io.BytesIO(data))
    assert image.size == (summary.width, summary.height) == (637, 876)
    assert progress and progress[-1].percent == 100 and progress[-1].page == 1
    assert [p.percent for p in progress] == sorted(p.percent for p in progress)
    assert progress[-1].bytes <= summary.bytes


async def test_transfer_into_a_file(still, tmp_path):
    target = tmp_path / "page.png"
    target.write_bytes(b"old content that must go" * 1000)
    async with await still.manager.open_session("sim0", "data") as session:
        flatbed = await session.item("Flatbed")
        await flatbed.write(SMALL)
        summary = await flatbed.transfer(target, "png")
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) == summary.bytes == target.stat().st_size
    assert Image.open(target).size == (64, 48) == (summary.width, summary.height)
    assert summary.as_dict()["content_type"] == summary.content_type == "image/png"


async def test_cancelling_the_awaiting_task_cancels_the_transfer(still):
    async with await still.manager.open_session("sim0", "data") as session:
        flatbed = await session.item("Flatbed")
        await flatbed.write(BIG)
        r, w = os.pipe()
        try:
            task = asyncio.ensure_future(flatbed.transfer(w, "raw"))
            await readable(r)  # the service is writing
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            os.close(w)
            os.close(r)
        # Item.Cancel went out: the service's transfer ended, the item takes another one.
        await flatbed.write(SMALL)
        r, w = os.pipe()
        reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
        try:
            summary = await flatbed.transfer(w, "raw")
        finally:
            os.close(w)
        assert summary.bytes == len(await reader)


# -- events --------------------------------------------------------------------------------------

async def test_events_subscribe_press_next_then_empty(still):
    async with await still.manager.open_session("sim0", "data") as session:
        with pytest.raises(Empty):
            await session.next_event()
        events = session.events()  # subscribes
        first = asyncio.ensure_future(events.__anext__())
        await simulate(still, "PressButton", "s", "scan")
        event = await asyncio.wait_for(first, TIMEOUT)
        assert isinstance(event, QueuedEvent)
        assert (event.event, event.device, event.data, event.remaining) == ("scan-button", "sim0",
                                                                             {"button": "scan"}, 0)
        assert event.sequence >= 1 and event.time > 1.6e9
        assert (await session.info()).subscribed is True
        with pytest.raises(Empty):
            await session.next_event()
        await simulate(still, "PressButton", "s", "copy")
        assert (await asyncio.wait_for(events.__anext__(), TIMEOUT)).event == "copy-button"
        await events.aclose()
        await session.unsubscribe()
        assert (await session.info()).subscribed is False


async def test_events_end_with_connection_lost(daemon):
    client = await Client(daemon.address).connect()
    session = await client.manager.open_session("sim0", "data")
    events = session.events()
    first = asyncio.ensure_future(events.__anext__())
    await session.info()
    # Wherever the iteration is (in a call, or waiting for EventQueued), the end of
    # the connection ends it with ConnectionLost.
    client.disconnect()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(first, TIMEOUT)


async def test_changes_follow_devices_properties_and_routed_events(still, still2):
    async with still.manager.changes(events=True) as changes:
        await simulate(still2, "PressButton", "s", "pdf")
        routed = await next_matching(changes, lambda c: isinstance(c, EventRouted))
        assert (routed.device, routed.event, routed.consumer) == (SIM0, "pdf-button",
                                                                  "none: no application registered")
        assert routed.data == {"button": "pdf"}
        session = await still2.manager.open_session("sim0", "data")
        held = await next_matching(changes, lambda c: isinstance(c, PropertiesChanged) and c.interface == DEVICE_IFACE
                                   and "DataModeHeld" in c.changed)
        assert held.path == SIM0 and held.changed["DataModeHeld"] is True
        await session.close()
        await simulate(still2, "Unplug")
        removed = await next_matching(changes, lambda c: isinstance(c, InterfacesRemoved))
        assert removed.path == SIM0 and DEVICE_IFACE in removed.interfaces
        await simulate(still2, "Replug")
        added = await next_matching(changes, lambda c: isinstance(c, InterfacesAdded))
        assert added.device is not None and (added.device.id, added.device.state) == ("sim0", "ready")


async def test_device_changes_and_the_service_stopping(daemon, still):
    device = await still.manager.find_device("sim0")
    async with device.changes() as changes:
        other = await Client(daemon.address).connect()
        try:
            await other.manager.open_session("sim0", "data")
            change = await next_matching(changes, lambda c: isinstance(c, PropertiesChanged)
                                         and "DataModeHolder" in c.changed)
            assert names_client(change.changed["DataModeHolder"], other.unique_name)
        finally:
            other.disconnect()  # its session closes with it
        change = await next_matching(changes, lambda c: isinstance(c, PropertiesChanged)
                                     and c.changed.get("DataModeHeld") is False)
        assert change.path == SIM0
        assert daemon.stop() == 0
        await next_matching(changes, lambda c: isinstance(c, ServiceStopped))
    assert still.service_owner is None
    with pytest.raises(ServiceNotRunning):
        await still.manager.devices()


async def test_changes_need_the_service(bus_address):
    lonely = await Client(bus_address).connect(require_service=False)
    try:
        with pytest.raises(ServiceNotRunning):
            async with lonely.manager.changes():
                pass
    finally:
        lonely.disconnect()


async def test_changes_end_with_the_connection(daemon):
    client = await Client(daemon.address).connect()
    async with client.manager.changes() as changes:
        client.disconnect()
        with pytest.raises(ConnectionLost):
            await changes.next(TIMEOUT)


# -- registrations and agents ---------------------------------------------------------------------

async def test_registrations(still):
    manager = still.manager
    await manager.register_application("scan-app", ["scan-app", "%d"], events=["scan-button"], devices=["id:sim0"])
    await manager.set_default_application("sim0", "scan-button", "scan-app")
    (app,) = await manager.applications()
    assert isinstance(app, Application)
    assert (app.id, app.scope, app.uid, app.command, app.events, app.devices) == (
        "scan-app", "user", os.getuid(), ("scan-app", "%d"), ("scan-button",), ("id:sim0",))
    assert app.default_for == (("sim0", "scan-button"),)
    await manager.set_default_application("sim0", "scan-button", None)
    assert (await manager.applications())[0].default_for == ()
    with pytest.raises(InvalidArgument):
        await manager.register_application("bad name!", ["x"])
    await manager.unregister_application("scan-app")
    with pytest.raises(NotFound):
        await manager.unregister_application("scan-app")
    assert await manager.applications() == []


async def test_an_exported_agent_launches_and_answers_only_the_service(daemon, still, still2):
    launched: list[LaunchRequest] = []

    async def launch(request: LaunchRequest) -> int:
        launched.append(request)
        return 4242

    agent = still.export_agent(launch, path=f"{AGENTS_PATH}/test")
    await agent.register()
    await still.manager.register_application("recorder", ["/bin/recorder", "%d", "%e"])
    async with still2.manager.changes(events=True) as changes:
        await simulate(still2, "PressButton", "s", "scan")
        routed = await next_matching(changes, lambda c: isinstance(c, EventRouted))
    assert re.fullmatch(r"launch: recorder via agent .* pid 4242 \(only match\)", routed.consumer), routed.consumer
    (request,) = launched
    assert (request.application, request.argv, request.device_id, request.event) == (
        "recorder", ("/bin/recorder", "sim0", "scan-button"), "sim0", "scan-button")
    assert request.environment["STILLSVC_EVENT_SEQUENCE"] == str(routed.sequence)
    # Anyone but the service is refused, whatever the bus policy says.
    with pytest.raises(AccessDenied, match="only the service"):
        await still2.call(agent.path, AGENT_IFACE, "Launch", "sasa{ss}sst",
                          ["x", ["/bin/true"], {}, "sim0", "scan-button", 1], destination=still.unique_name)
    # Two candidates: an agent without a chooser answers Choose with NotSupported,
    # and the service starts the oldest registration.
    await still.manager.register_application("second", ["/bin/second"])
    async with still2.manager.changes(events=True) as changes:
        await simulate(still2, "PressButton", "s", "copy")
        routed = await next_matching(changes, lambda c: isinstance(c, EventRouted))
    assert routed.consumer.startswith("launch: recorder via agent ") and "(oldest registration)" in routed.consumer
    assert [r.application for r in launched] == ["recorder", "recorder"]
    assert f"{ERROR_PREFIX}.NotSupported: this agent cannot ask its user" in daemon.log
    await agent.unregister()
    agent.unexport()


# -- every error name, mapped back ----------------------------------------------------------------

def test_every_error_name_maps_back_to_its_class():
    for cls in ALL_ERRORS:
        name = dbus_error_name(cls)
        assert error_class(name) is cls
        error = error_from_reply(name, "  what went wrong ", bus="session")
        assert type(error) is cls and error.message == "what went wrong"
        assert type(error_from_reply(name, "", bus="session")) is cls
    newer = error_from_reply(f"{ERROR_PREFIX}.Overheated", "too hot", bus="session")
    assert type(newer) is StillError and newer.name == "Overheated" and newer.message == "too hot"
    assert not isinstance(error_from_reply(f"{ERROR_PREFIX}Busy", "", bus="x"), StillError)


def test_the_bus_errors_are_client_errors():
    for name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
        error = error_from_reply(name, "whatever", bus="system")
        assert type(error) is ServiceNotRunning and error.error_name == name
        assert error.message == "the stillsvc service is not running on the system bus"
    assert type(error_from_reply("org.freedesktop.DBus.Error.NoReply", "", bus="system")) is NoReply
    refused = error_from_reply("org.freedesktop.DBus.Error.AccessDenied", "policy says no", bus="system")
    assert type(refused) is ClientError and refused.message == "the bus refused the call: policy says no"
    other = error_from_reply("org.freedesktop.DBus.Error.UnknownMethod", "no such method", bus="system")
    assert type(other) is ClientError and other.error_name.endswith("UnknownMethod")
    assert not any(isinstance(e, StillError) for e in (refused, other))


async def _not_found(still: Client, still2: Client) -> None:
    session = await still.manager.open_session("sim0", "status")
    await session.close()
    await session.status()


async def _invalid_argument(still: Client, still2: Client) -> None:
    await still.manager.open_session("sim0", "exclusive")


async def _access_denied(still: Client, still2: Client) -> None:
    session = await still.manager.open_session("sim0", "status")
    await still2.call(session.path, "org.stillsvc.StillImage1.Session", "GetStatus")  # not its session


async def _busy(still: Client, still2: Client) -> None:
    await still.manager.open_session("sim0", "data")
    await still2.manager.open_session("sim0", "data")


async def _timeout(still: Client, still2: Client) -> None:
    await still.manager.open_session("sim0", "data")
    await still2.manager.open_session("sim0", "data", wait=0.2)


async def _disconnected(still: Client, still2: Client) -> None:
    session = await still.manager.open_session("sim0", "status")
    await simulate(still, "Unplug")
    await session.status()


async def _limit_exceeded(still: Client, still2: Client) -> None:
    for _ in range(3):  # tests/data/small-limits.toml: two sessions per client
        await still.manager.open_session("sim0", "status")


async def _cancelled(still: Client, still2: Client) -> None:
    session = await still.manager.open_session("sim0", "data")
    flatbed = await session.item("Flatbed")
    await flatbed.write(BIG)
    r, w = os.pipe()
    try:
        transfer = asyncio.ensure_future(flatbed.transfer(w, "raw"))
        await readable(r)
        await flatbed.cancel()
        await transfer
    finally:
        os.close(w)
        os.close(r)


async def _empty(still: Client, still2: Client) -> None:
    session = await still.manager.open_session("sim0", "data")
    await session.next_event()


async def _failed(still: Client, still2: Client) -> None:
    await simulate(still, "LoadPages", "u", 2)
    session = await still.manager.open_session("sim0", "data")
    feeder = await session.item("Feeder")
    await feeder.write(resolution=75)
    await simulate(still, "Jam", "u", 300)
    r, w = os.pipe()
    reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
    try:
        await feeder.transfer(w, "raw")
    finally:
        os.close(w)
        await reader


async def _not_supported(still: Client, still2: Client) -> None:
    session = await still.manager.open_session("sim0", "status")
    await session.escape(99, b"")


PROVOKE: dict[str, Callable[[Client, Client], Awaitable[None]]] = {
    "NotFound": _not_found, "InvalidArgument": _invalid_argument, "AccessDenied": _access_denied,
    "Busy": _busy, "Timeout": _timeout, "Disconnected": _disconnected, "LimitExceeded": _limit_exceeded,
    "Cancelled": _cancelled, "Empty": _empty, "Failed": _failed, "NotSupported": _not_supported,
}
EXPECTED = {"NotFound": NotFound, "InvalidArgument": InvalidArgument, "AccessDenied": AccessDenied, "Busy": Busy,
            "Timeout": Timeout, "Disconnected": Disconnected, "LimitExceeded": LimitExceeded,
            "Cancelled": Cancelled, "Empty": Empty, "Failed": Failed, "NotSupported": NotSupported}


def test_every_service_error_is_provoked_below():
    assert set(PROVOKE) == set(EXPECTED) == {cls.name for cls in ALL_ERRORS}
    assert all(EXPECTED[cls.name] is cls for cls in ALL_ERRORS)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.daemon_args("--config", "tests/data/small-limits.toml")]
                 if name == "LimitExceeded" else [])
    for name in PROVOKE])
async def test_service_errors_arrive_as_their_class(still, still2, name):
    with pytest.raises(StillError) as raised:
        await PROVOKE[name](still, still2)
    assert type(raised.value) is EXPECTED[name], raised.value
    assert raised.value.message and ERROR_PREFIX not in raised.value.message


# -- the README's example -------------------------------------------------------------------------

def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Client library"):]
    section = section[:section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


async def test_the_readme_example_runs(daemon, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "STILLSVC_BUS": daemon.address,
                                             "PYTHONPATH": str(REPO)})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    page = Path(tmp_path / "page.png")
    data = page.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(page) as image:
        width, height = image.size
        assert image.mode == "RGB"
    assert out.decode() == f"page.png: {width}x{height}, {len(data)} bytes\n"
    assert width == round(8.5 * 300)  # the whole letter-wide bed at 300 dpi

