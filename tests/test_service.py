"""The service end to end: devices, properties, ObjectManager, errors, start and stop."""

from __future__ import annotations

import asyncio
import signal

import pytest
from dbus_fast import Variant
from helpers import (
    DEVICE,
    MANAGER,
    ROOT,
    SIM0,
    SIMULATOR,
    Daemon,
    Signals,
    call,
    connect,
    create_session,
    expect_error,
    get_all,
    get_property,
    wait_for_name,
)


async def test_sim0_device_object_and_properties(client):
    devices = await call(client, ROOT, MANAGER, "GetDevices")
    assert devices == [[SIM0]]
    props = await get_all(client, SIM0, DEVICE)
    assert props["Id"] == "sim0"
    assert props["Driver"] == "sim"
    assert props["State"] == "ready"
    assert props["Simulated"] is True
    assert props["DataModeHeld"] is False
    assert set(props["EventNames"]) >= {"scan-button", "copy-button", "email-button", "pdf-button", "paper-loaded"}
    assert "feeder" in props["Capabilities"]
    assert await get_property(client, ROOT, MANAGER, "Devices") == [SIM0]


async def test_object_manager_lists_devices_with_interfaces(client):
    (objects,) = await call(client, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    assert set(objects) == {SIM0}
    assert set(objects[SIM0]) == {DEVICE, SIMULATOR}
    assert objects[SIM0][DEVICE]["Id"].value == "sim0"


async def test_unplug_and_replug_send_object_manager_signals_from_the_root(client):
    async with Signals(client, interface="org.freedesktop.DBus.ObjectManager") as om:
        await call(client, SIM0, SIMULATOR, "Unplug")
        (removed,) = await om.wait(1)
        assert removed.member == "InterfacesRemoved"
        assert removed.path == ROOT
        assert removed.body == [SIM0, [DEVICE]]
        (objects,) = await call(client, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        assert set(objects[SIM0]) == {SIMULATOR}  # the simulated plug stays, the device is gone
        await expect_error("NotFound", create_session(client))

        await call(client, SIM0, SIMULATOR, "Replug")
        added = (await om.wait(2))[1]
        assert added.member == "InterfacesAdded"
        assert added.path == ROOT
        assert added.body[0] == SIM0
        assert added.body[1][DEVICE]["State"].value == "ready"
    assert await get_property(client, SIM0, DEVICE, "State") == "ready"


async def test_data_mode_holder_is_visible_and_announced(client):
    async with Signals(client, member="PropertiesChanged", path=SIM0) as changes:
        session = await create_session(client, mode="data")
        await changes.wait(1)
        assert changes.received[0].body[1]["DataModeHeld"].value is True
    holder = await get_property(client, SIM0, DEVICE, "DataModeHolder")
    assert holder.startswith(client.unique_name)
    assert "pid" in holder
    await call(client, session, "org.stillsvc.StillImage1.Session", "Close")
    assert await get_property(client, SIM0, DEVICE, "DataModeHeld") is False


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["nope", "status", {}], "NotFound"),
        (["sim0", "exclusive", {}], "InvalidArgument"),
        (["sim0", "status", {"bogus": Variant("s", "x")}], "InvalidArgument"),
        (["sim0", "data", {"wait_ms": Variant("s", "soon")}], "InvalidArgument"),
        (["x" * 100_000, "status", {}], "InvalidArgument"),
    ],
)
async def test_create_device_rejects_bad_arguments(client, args, error):
    e = await expect_error(error, call(client, ROOT, MANAGER, "CreateDevice", "ssa{sv}", args))
    assert e.text


async def test_simulator_rejects_unknown_button_and_keeps_serving(client):
    e = await expect_error("InvalidArgument", call(client, SIM0, SIMULATOR, "PressButton", "s", ["teleport"]))
    assert "scan" in e.text
    assert await get_property(client, SIM0, DEVICE, "State") == "ready"


async def test_wrong_signature_and_unknown_method_are_plain_dbus_errors(client):
    await expect_error("org.freedesktop.DBus.Error.UnknownMethod",
                       call(client, ROOT, MANAGER, "CreateDevice", "s", ["sim0"]))
    await expect_error("org.freedesktop.DBus.Error.UnknownMethod", call(client, ROOT, MANAGER, "Explode"))
    assert await call(client, ROOT, MANAGER, "GetDevices") == [[SIM0]]


async def test_sigterm_stops_cleanly(daemon: Daemon):
    assert daemon.stop(signal.SIGTERM) == 0
    assert "service stopped" in daemon.log


async def test_sigint_stops_cleanly(daemon: Daemon):
    assert daemon.stop(signal.SIGINT) == 0
    assert "service stopped" in daemon.log


async def test_second_instance_exits_with_name_taken(daemon: Daemon, tmp_path):
    second = Daemon(daemon.address, workdir=str(tmp_path / "second"))
    (tmp_path / "second").mkdir()
    proc = second.start()
    code = await asyncio.to_thread(proc.wait, 20)
    second.stop()
    assert code == 3
    assert "already taken" in second.log
    assert "Traceback" not in second.log


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[service]\nmax_sessions = 0\n", 2, "at least 1"),
        ("[service]\nmax_sesions = 3\n", 2, "unknown key"),
        ("[service]\nmax_sessions = \n", 2, "not valid TOML"),
        ("[[device]]\nid = \"a\"\n", 1, "has no 'driver'"),
        ("[[device]]\nid = \"a b\"\ndriver = \"sim\"\n", 2, "device id"),
    ],
)
async def test_bad_config_refuses_to_start(bus_address, tmp_path, text, line, words):
    config = tmp_path / "stillsvc.toml"
    config.write_text(text)
    d = Daemon(bus_address, "--config", str(config), workdir=str(tmp_path))
    proc = d.start()
    code = await asyncio.to_thread(proc.wait, 20)
    d.stop()
    assert code == 2
    assert f"{config}:{line}:" in d.log
    assert words in d.log
    assert "Traceback" not in d.log


async def test_config_devices_and_simulate_together(bus_address, tmp_path):
    config = tmp_path / "stillsvc.toml"
    config.write_text('[[device]]\nid = "office-1"\ndriver = "sim"\nname = "Office"\n')
    d = Daemon(bus_address, "--config", str(config), workdir=str(tmp_path))
    proc = d.start()
    bus = await connect(bus_address)
    try:
        await wait_for_name(bus, proc=proc)
        devices = (await call(bus, ROOT, MANAGER, "GetDevices"))[0]
        assert devices == [f"{ROOT}/devices/office_1", SIM0]
        assert await get_property(bus, f"{ROOT}/devices/office_1", DEVICE, "Name") == "Office"
        assert (await call(bus, ROOT, MANAGER, "FindDevice", "s", ["office-1"]))[0] == f"{ROOT}/devices/office_1"
    finally:
        bus.disconnect()
        d.stop()
