"""Sessions and the lock manager over D-Bus: modes, the device lock, ownership, no stale locks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from dbus_fast import Variant
from helpers import (
    DEVICE,
    SESSION,
    SIM0,
    Signals,
    call,
    connect,
    create_session,
    expect_error,
    get_property,
    wait_until,
)


def wait_ms(ms: int) -> dict[str, Variant]:
    return {"wait_ms": Variant("u", ms)}


async def lock(bus, session: str, timeout_ms: int = 0):
    return await call(bus, session, SESSION, "LockDevice", "u", [timeout_ms])


async def unlock(bus, session: str):
    return await call(bus, session, SESSION, "UnlockDevice")


async def close(bus, session: str):
    return await call(bus, session, SESSION, "Close")


async def wait_for_property(bus, name: str, value) -> None:
    async def check() -> bool:
        return await get_property(bus, SIM0, DEVICE, name) == value

    await wait_until(check, what=f"{name} == {value}")


# -- modes -----------------------------------------------------------------------

async def test_many_status_sessions_one_data_session(client, client2):
    statuses = [await create_session(client, mode="status") for _ in range(3)]
    statuses += [await create_session(client2, mode="status") for _ in range(3)]
    assert len(set(statuses)) == 6
    data = await create_session(client, mode="data")
    e = await expect_error("Busy", create_session(client2, mode="data"))
    assert client.unique_name in e.text  # names who holds it
    assert "pid" in e.text
    await expect_error("Busy", create_session(client2, mode="both"))
    await create_session(client2, mode="status")  # status is still fine
    await close(client, data)
    await create_session(client2, mode="data")


async def test_data_mode_waiters_are_served_in_order_and_time_out(daemon, client):
    others = [await connect(daemon.address) for _ in range(3)]
    try:
        held = await create_session(client, mode="data")
        order: list[int] = []

        async def wait_for_data(i: int) -> str:
            path = await create_session(others[i], mode="data", **wait_ms(10_000))
            order.append(i)
            return path

        first = asyncio.ensure_future(wait_for_data(0))
        await wait_for_property(client, "DataModeWaiters", 1)  # queued before the second asks
        second = asyncio.ensure_future(wait_for_data(1))
        await wait_for_property(client, "DataModeWaiters", 2)
        e = await expect_error("Timeout", create_session(others[2], mode="data", **wait_ms(100)))
        assert "100 ms" in e.text
        assert not first.done() and not second.done()
        await close(client, held)
        path0 = await asyncio.wait_for(first, 5)
        assert not second.done()
        await close(others[0], path0)
        await asyncio.wait_for(second, 5)
        assert order == [0, 1]
    finally:
        for bus in others:
            bus.disconnect()


async def test_status_session_refuses_raw_data_but_allows_status(client):
    status = await create_session(client, mode="status")
    await expect_error("AccessDenied", call(client, status, SESSION, "RawReadData", "u", [16]))
    await expect_error("AccessDenied", call(client, status, SESSION, "RawWriteData", "ay", [b"x"]))
    (result,) = await call(client, status, SESSION, "GetStatus")
    assert result["online"].value is True
    assert (await call(client, status, SESSION, "Escape", "uay", [1, b"ping"]))[0] == b"ping"
    data = await create_session(client, mode="data")
    (raw,) = await call(client, data, SESSION, "RawReadData", "u", [300])
    assert raw == bytes(range(256)) + bytes(range(44))


# -- the device lock ----------------------------------------------------------------

async def test_lock_unlock_errors_are_clear(client):
    session = await create_session(client, mode="both")
    e = await expect_error("InvalidArgument", unlock(client, session))
    assert "does not hold" in e.text
    await lock(client, session)
    assert await get_property(client, session, SESSION, "HoldsLock") is True
    e = await expect_error("Failed", lock(client, session))  # as Session.xml says
    assert "already held" in e.text
    await unlock(client, session)
    assert await get_property(client, session, SESSION, "HoldsLock") is False


async def test_lock_waiters_fifo_and_timeout(daemon, client):
    others = [await connect(daemon.address) for _ in range(3)]
    try:
        sessions = [await create_session(b, mode="status") for b in others]
        holder = await create_session(client, mode="status")
        await lock(client, holder)
        order: list[int] = []

        async def take(i: int) -> None:
            await lock(others[i], sessions[i], 10_000)
            order.append(i)

        first = asyncio.ensure_future(take(0))
        await wait_for_property(client, "LockWaiters", 1)  # queued before the second asks
        second = asyncio.ensure_future(take(1))
        await wait_for_property(client, "LockWaiters", 2)
        await expect_error("Timeout", lock(others[2], sessions[2], 50))
        # A status read by a client that did not lock waits its turn too: it must not
        # get the device while another session holds the lock.
        status_read = asyncio.ensure_future(call(others[2], sessions[2], SESSION, "GetStatus"))
        await unlock(client, holder)
        await asyncio.wait_for(first, 5)
        assert order == [0]
        assert not status_read.done()
        await unlock(others[0], sessions[0])
        await asyncio.wait_for(second, 5)
        assert order == [0, 1]
        await unlock(others[1], sessions[1])
        await asyncio.wait_for(status_read, 5)
    finally:
        for bus in others:
            bus.disconnect()


@pytest.mark.daemon_args("--config", "tests/data/short-lock.toml")
async def test_lock_held_too_long_is_revoked_and_holder_told(client, client2):
    session = await create_session(client, mode="status")
    async with Signals(client, member="LockRevoked") as revoked:
        await lock(client, session)
        (msg,) = await revoked.wait(1, timeout=5)
        assert msg.path == session
        assert msg.destination == client.unique_name  # unicast, to the holder only
        assert "held longer than 300 ms" in msg.body[0]
    assert await get_property(client, session, SESSION, "HoldsLock") is False
    other = await create_session(client2, mode="status")
    await lock(client2, other)  # free again


# -- ownership and nothing stale --------------------------------------------------------

async def test_only_the_creating_connection_may_use_a_session(client, client2):
    session = await create_session(client, mode="both")
    for member, sig, body in [("LockDevice", "u", [0]), ("GetStatus", "", []), ("Close", "", []),
                              ("Subscribe", "", []), ("GetLastNotificationData", "", [])]:
        e = await expect_error("AccessDenied", call(client2, session, SESSION, member, sig, body))
        assert "another client" in e.text
    await lock(client, session)  # still the owner's


async def test_close_releases_data_mode_and_lock(client, client2):
    session = await create_session(client, mode="both")
    await lock(client, session)
    waiting = asyncio.ensure_future(create_session(client2, mode="both", **wait_ms(5000)))
    await close(client, session)
    path = await asyncio.wait_for(waiting, 5)
    await lock(client2, path)
    await expect_error("NotFound", close(client, session))
    e = await expect_error("NotFound", call(client, session, SESSION, "GetStatus"))
    assert "closed" in e.text


async def test_disconnect_releases_everything_at_once(daemon, client):
    leaving = await connect(daemon.address)
    session = await create_session(leaving, mode="both")
    await lock(leaving, session)
    assert await get_property(client, SIM0, DEVICE, "DataModeHeld") is True
    waiting = asyncio.ensure_future(create_session(client, mode="data", **wait_ms(5000)))
    leaving.disconnect()
    path = await asyncio.wait_for(waiting, 5)
    await lock(client, path)  # the lock was released as well
    assert (await get_property(client, SIM0, DEVICE, "DataModeHolder")).startswith(client.unique_name)


KILLED_CLIENT = textwrap.dedent("""
    import asyncio, sys
    from dbus_fast import Message, Variant
    from dbus_fast.aio import MessageBus

    async def main():
        bus = await MessageBus(bus_address=sys.argv[1]).connect()
        reply = await bus.call(Message(destination="org.stillsvc.StillImage1", path="/org/stillsvc/StillImage1",
            interface="org.stillsvc.StillImage1.Manager", member="CreateDevice", signature="ssa{sv}",
            body=["sim0", "both", {}]))
        session = reply.body[0]
        await bus.call(Message(destination="org.stillsvc.StillImage1", path=session,
            interface="org.stillsvc.StillImage1.Session", member="LockDevice", signature="u", body=[0]))
        print(session, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_kill_9_of_a_client_process_releases_its_sessions(daemon, client):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_CLIENT, daemon.address,
                                                stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.startswith(b"/org/stillsvc/StillImage1/sessions/")
        assert await get_property(client, SIM0, DEVICE, "DataModeHeld") is True
        waiting = asyncio.ensure_future(create_session(client, mode="both", **wait_ms(5000)))
        os.kill(proc.pid, signal.SIGKILL)
        path = await asyncio.wait_for(waiting, 5)
        await lock(client, path)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert "client left the bus" in daemon.log


# -- limits --------------------------------------------------------------------------

@pytest.mark.daemon_args("--config", "tests/data/small-limits.toml")
async def test_session_limits_per_client_and_in_total(daemon, client, client2):
    first = await create_session(client)
    await create_session(client)
    e = await expect_error("LimitExceeded", create_session(client))
    assert "at most 2" in e.text
    await create_session(client2)
    third = await connect(daemon.address)
    try:
        e = await expect_error("LimitExceeded", create_session(third))
        assert "limit of 3" in e.text
    finally:
        third.disconnect()
    # a closed session frees its place
    await close(client, first)
    await create_session(client)


# -- the device as another program holds it ---------------------------------------------

@pytest.mark.daemon_args("--config", "tests/data/short-io-wait.toml")
async def test_outside_program_holding_the_lock_file_is_waited_for_then_refused(daemon, client):
    lock_file = await get_property(client, SIM0, DEVICE, "LockFile")
    session = await create_session(client, mode="status")
    holder = subprocess.Popen(["flock", lock_file, "sh", "-c", "echo locked; read x"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # The service's own I/O waits for the other program up to io_wait_ms (200 ms here).
        e = await expect_error("Timeout", call(client, session, SESSION, "GetStatus"))
        assert "another program" in e.text and "200 ms" in e.text
        assert await get_property(client, SIM0, DEVICE, "State") == "held-by-program"
        e = await expect_error("Busy", lock(client, session))  # timeout 0: no waiting
        assert "another program" in e.text
    finally:
        holder.communicate("done\n", timeout=5)
    (status,) = await call(client, session, SESSION, "GetStatus")
    assert status["online"].value is True


async def test_service_holds_the_lock_file_while_it_holds_the_device(client):
    lock_file = await get_property(client, SIM0, DEVICE, "LockFile")
    session = await create_session(client, mode="status")
    assert subprocess.run(["flock", "-n", lock_file, "true"]).returncode == 0
    await lock(client, session)
    assert subprocess.run(["flock", "-n", lock_file, "true"]).returncode == 1
    await unlock(client, session)
    assert subprocess.run(["flock", "-n", lock_file, "true"]).returncode == 0


@pytest.mark.daemon_args("--config", "tests/data/short-io-wait.toml")
async def test_io_without_the_lock_gives_up_after_io_wait(client, client2):
    holder = await create_session(client, mode="status")
    await lock(client, holder)
    other = await create_session(client2, mode="status")
    e = await expect_error("Timeout", call(client2, other, SESSION, "GetStatus"))
    assert "200 ms" in e.text and client.unique_name in e.text
    await unlock(client, holder)
    (status,) = await call(client2, other, SESSION, "GetStatus")
    assert status["online"].value is True
