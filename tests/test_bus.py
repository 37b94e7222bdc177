"""The bus connection's repairs (stillsvc.dbus.bus), against a real dbus-daemon."""

from __future__ import annotations

import asyncio
import os
import signal

from dbus_fast import DBusError
from dbus_fast.service import ServiceInterface
from helpers import DBusDaemon, call, connect

from stillsvc.common.errors import Busy
from stillsvc.frontends.dbus.bus import ServiceBus, caller, method


class Echo(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.stillsvc.Test")

    @method()
    def WhoAmI(self) -> "s":
        return caller() or ""

    @method()
    async def WhoAmILater(self) -> "s":
        await asyncio.sleep(0)
        return caller() or ""

    @method()
    def Refuse(self):
        raise Busy("held by someone else")

    @method()
    def Crash(self):
        raise KeyError("secret internal detail")


async def test_a_burst_while_the_bus_daemon_stalls_does_not_drop_the_connection():
    bus_daemon = DBusDaemon()
    service = await ServiceBus(bus_daemon.address).connect()
    client = await connect(bus_daemon.address)
    try:
        service.export("/test", Echo())
        os.kill(bus_daemon.proc.pid, signal.SIGSTOP)  # the bus stops reading: the socket buffer fills
        try:
            for n in range(20_000):
                service.broadcast_signal("/test", "org.stillsvc.Test", "Tick", "u", [n])
            await asyncio.sleep(0.5)  # the stall itself, not a synchronisation
            assert service.connected
        finally:
            os.kill(bus_daemon.proc.pid, signal.SIGCONT)
        (name,) = await call(client, "/test", "org.stillsvc.Test", "WhoAmI", destination=service.unique_name,
                             timeout=30)
        assert name == client.unique_name
        assert service.connected
    finally:
        client.disconnect()
        service.disconnect()
        bus_daemon.stop()


async def test_handlers_know_their_caller_and_errors_are_mapped():
    bus_daemon = DBusDaemon()
    service = await ServiceBus(bus_daemon.address).connect()
    clients = [await connect(bus_daemon.address) for _ in range(4)]
    try:
        service.export("/test", Echo())
        replies = await asyncio.gather(*[
            call(c, "/test", "org.stillsvc.Test", member, destination=service.unique_name)
            for c in clients for member in ("WhoAmI", "WhoAmILater") for _ in range(25)])
        expected = [c.unique_name for c in clients for _ in range(50)]
        assert [r[0] for r in replies] == expected
        try:
            await call(clients[0], "/test", "org.stillsvc.Test", "Refuse", destination=service.unique_name)
        except DBusError as e:
            assert e.type == "org.stillsvc.StillImage1.Error.Busy"
            assert e.text == "held by someone else"
        else:
            raise AssertionError("Refuse succeeded")
        try:
            await call(clients[0], "/test", "org.stillsvc.Test", "Crash", destination=service.unique_name)
        except DBusError as e:
            assert e.type == "org.stillsvc.StillImage1.Error.Failed"
            assert "secret" not in e.text and "Traceback" not in e.text and "KeyError" not in e.text
        else:
            raise AssertionError("Crash succeeded")
    finally:
        for c in clients:
            c.disconnect()
        service.disconnect()
        bus_daemon.stop()
