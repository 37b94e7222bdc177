"""Property-based test of the access model: random open/lock/unlock/close/disconnect
sequences from several clients against the real daemon, checking after every step:
never two data-mode holders, never two lock holders, nothing held by a client that is gone."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator

import pytest
from dbus_fast import DBusError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, SESSION, SIM0, Daemon, DBusDaemon, call, connect, create_session, get_property, \
    wait_for_name, wait_until

CLIENTS = 3
ALLOWED_ERRORS = {
    "org.stillsvc.StillImage1.Error.Busy",
    "org.stillsvc.StillImage1.Error.Timeout",
    "org.stillsvc.StillImage1.Error.InvalidArgument",
    "org.stillsvc.StillImage1.Error.NotFound",
}

client_ids = st.integers(0, CLIENTS - 1)
slots = st.integers(0, 3)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("open"), client_ids, st.sampled_from(["status", "data", "both"]), st.sampled_from([0, 30])),
        st.tuples(st.just("lock"), client_ids, slots, st.sampled_from([0, 30])),
        st.tuples(st.just("unlock"), client_ids, slots),
        st.tuples(st.just("status"), client_ids, slots),
        st.tuples(st.just("close"), client_ids, slots),
        st.tuples(st.just("disconnect"), client_ids),
    ),
    min_size=1,
    max_size=25,
)


@pytest.fixture(scope="module")
def service() -> Iterator[Daemon]:
    bus = DBusDaemon()
    # A call that did not lock gives up on the device lock after 200 ms (Timeout),
    # so one client's lock never stalls the sequence.
    daemon = Daemon(bus.address, "--config", "tests/data/short-io-wait.toml",
                    workdir=tempfile.mkdtemp(prefix="stillsvc-prop-"))
    proc = daemon.start()

    async def ready() -> None:
        probe = await connect(bus.address)
        try:
            await wait_for_name(probe, proc=proc)
        finally:
            probe.disconnect()

    asyncio.run(ready())
    yield daemon
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log
    bus.stop()


async def scenario(address: str, ops: list[tuple]) -> None:
    buses = [await connect(address) for _ in range(CLIENTS)]
    sessions: list[list[str]] = [[] for _ in range(CLIENTS)]
    gone: set[str] = set()
    observer = await connect(address)
    try:
        for op in ops:
            kind, who = op[0], op[1]
            bus = buses[who]
            try:
                if kind == "open":
                    sessions[who].append(await create_session(bus, mode=op[2]) if not op[3] else
                                         await call_open_wait(bus, op[2], op[3]))
                elif kind == "disconnect":
                    gone.add(bus.unique_name)
                    bus.disconnect()
                    buses[who] = await connect(address)
                    sessions[who] = []
                elif sessions[who]:
                    path = sessions[who][op[2] % len(sessions[who])]
                    if kind == "lock":
                        await call(bus, path, SESSION, "LockDevice", "u", [op[3]])
                    elif kind == "unlock":
                        await call(bus, path, SESSION, "UnlockDevice")
                    elif kind == "status":
                        await call(bus, path, SESSION, "GetStatus")
                    elif kind == "close":
                        await call(bus, path, SESSION, "Close")
                        sessions[who].remove(path)
            except DBusError as e:
                assert e.type in ALLOWED_ERRORS, f"{op}: {e.type}: {e.text}"
            await check_invariants(observer, buses, sessions, gone)
    finally:
        for bus in buses:
            bus.disconnect()
        # Everything is released once every client has gone.
        async def all_free() -> bool:
            return (await get_property(observer, SIM0, DEVICE, "DataModeHeld") is False
                    and await get_property(observer, SIM0, DEVICE, "LockWaiters") == 0
                    and await get_property(observer, SIM0, DEVICE, "DataModeWaiters") == 0)

        await wait_until(all_free, what="device free after every client left")
        observer.disconnect()


async def call_open_wait(bus, mode: str, wait_ms: int) -> str:
    from dbus_fast import Variant

    return await create_session(bus, mode=mode, wait_ms=Variant("u", wait_ms))


async def check_invariants(observer, buses, sessions, gone: set[str]) -> None:
    # Nothing held by a client that is gone (the service sees the departure in a few ms).
    async def holder_alive() -> bool:
        holder = await get_property(observer, SIM0, DEVICE, "DataModeHolder")
        return not any(holder.startswith(name + " ") or holder == name for name in gone)

    await wait_until(holder_alive, what="data mode released by a departed client")
    holder = await get_property(observer, SIM0, DEVICE, "DataModeHolder")
    live = [b.unique_name for b in buses]
    assert holder == "" or any(holder.startswith(name) for name in live), holder

    lock_holders = 0
    data_holders = 0
    for bus, paths in zip(buses, sessions):
        for path in paths:
            if await get_property(bus, path, SESSION, "HoldsLock"):
                lock_holders += 1
            if await get_property(bus, path, SESSION, "Mode") != "status" and holder.startswith(bus.unique_name):
                data_holders += 1
    assert lock_holders <= 1
    # Only one client can be named as the holder; its data sessions number at most one.
    assert data_holders <= 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_sequences_keep_the_invariants(service: Daemon, ops) -> None:
    asyncio.run(scenario(service.address, ops))
