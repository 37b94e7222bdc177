"""Property-based test of the access model: random open/lock/unlock/close/disconnect
sequences from several clients against the real daemon, checking after every step:
never two data-mode holders, never two lock holders, nothing held by a client that is gone.

Two operations come from outside the clients' ordinary use: a program outside the
service takes the device's lock file for a while (``flock LOCKFILE sh -c ...``; the
service must then answer Busy or Timeout for I/O, and report no lock holder), and a
client vanishes while its calls are in flight (a CreateDevice or LockDevice is sent,
then the connection is closed before any reply: nothing may be created for it or
granted to it)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator

import pytest
from dbus_fast import DBusError, Variant
from helpers import (
    DEVICE,
    ERROR,
    MANAGER,
    ROOT,
    SESSION,
    SIM0,
    Daemon,
    DBusDaemon,
    Signals,
    call,
    connect,
    create_session,
    get_property,
    kill_connections,
    lock_file_free,
    names_client,
    send_now,
    session_objects,
    wait_for_name,
    wait_until,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

CLIENTS = 3
ALLOWED_ERRORS = {
    "org.stillsvc.StillImage1.Error.Busy",
    "org.stillsvc.StillImage1.Error.Timeout",
    "org.stillsvc.StillImage1.Error.InvalidArgument",
    "org.stillsvc.StillImage1.Error.NotFound",
}
#: What device I/O may answer while a program outside the service holds the lock file.
HELD_OUTSIDE_ERRORS = {
    "org.stillsvc.StillImage1.Error.Busy",
    "org.stillsvc.StillImage1.Error.Timeout",
}
#: What a client tries while the lock file is held outside (GetStatus waits io_wait_ms, 200 ms).
OUTSIDE_ATTEMPTS = ["lock-0", "lock-30", "data-0", "data-30", "status"]
#: Calls a vanishing client leaves in flight.
IN_FLIGHT = ["create-status", "create-data", "create-both-wait", "lock", "lock-wait"]

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
        st.tuples(st.just("outside"), client_ids, slots, st.sampled_from(OUTSIDE_ATTEMPTS)),
        st.tuples(st.just("vanish"), client_ids, st.sampled_from(IN_FLIGHT), slots),
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

    async def ready_again() -> None:
        observer = await connect(bus.address)
        try:
            async def shown_ready() -> bool:
                return await get_property(observer, SIM0, DEVICE, "State") == "ready"

            await wait_until(shown_ready, timeout=2, what="State ready again after the outside program let go")
        finally:
            observer.disconnect()

    asyncio.run(ready_again())
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log
    bus.stop()


async def scenario(address: str, ops: list[tuple]) -> None:
    buses = [await connect(address) for _ in range(CLIENTS)]
    sessions: list[list[str]] = [[] for _ in range(CLIENTS)]
    gone: set[str] = set()
    observer = await connect(address)
    lock_file = await get_property(observer, SIM0, DEVICE, "LockFile")
    async with Signals(observer, member="NameOwnerChanged", interface="org.freedesktop.DBus",
                       predicate=lambda msg: msg.body[2] == "") as left:
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
                        await after_leaving(address, left, bus.unique_name)
                    elif kind == "vanish":
                        await vanish_in_flight(bus, op[2], sessions[who], op[3])
                        gone.add(bus.unique_name)
                        buses[who] = await connect(address)
                        sessions[who] = []
                        await after_leaving(address, left, bus.unique_name)
                    elif kind == "outside":
                        await held_outside(address, observer, lock_file, buses, sessions, who, op[2], op[3])
                    elif sessions[who]:
                        path = sessions[who][op[2] % len(sessions[who])]
                        if kind == "lock":
                            await lock_again_fails(bus, path, op[3])
                        elif kind == "unlock":
                            await call(bus, path, SESSION, "UnlockDevice")
                        elif kind == "status":
                            await call(bus, path, SESSION, "GetStatus")
                        elif kind == "close":
                            await call(bus, path, SESSION, "Close")
                            sessions[who].remove(path)
                except DBusError as e:
                    assert e.type in ALLOWED_ERRORS, f"{op}: {e.type}: {e.text}"
                await check_invariants(observer, lock_file, buses, sessions, gone)
        finally:
            for bus in buses:
                bus.disconnect()

            # Everything is released once every client has gone.
            async def all_free() -> bool:
                return (await get_property(observer, SIM0, DEVICE, "DataModeHeld") is False
                        and await get_property(observer, SIM0, DEVICE, "LockWaiters") == 0
                        and await get_property(observer, SIM0, DEVICE, "DataModeWaiters") == 0
                        and lock_file_free(lock_file) and await session_objects(observer) == [])

            await wait_until(all_free, what="device free after every client left")
    observer.disconnect()


async def call_open_wait(bus, mode: str, wait_ms: int) -> str:
    return await create_session(bus, mode=mode, wait_ms=Variant("u", wait_ms))


async def lock_again_fails(bus, path: str, timeout_ms: int) -> None:
    """LockDevice; a session that already holds the lock is refused (Session.xml:
    Failed; InvalidArgument before that was documented)."""
    if not await get_property(bus, path, SESSION, "HoldsLock"):
        await call(bus, path, SESSION, "LockDevice", "u", [timeout_ms])
        return
    try:
        await call(bus, path, SESSION, "LockDevice", "u", [timeout_ms])
    except DBusError as e:
        assert e.type in {f"{ERROR}.Failed", f"{ERROR}.InvalidArgument"}, f"lock while holding: {e.type}: {e.text}"
    else:
        raise AssertionError("LockDevice succeeded on a session that already held the lock")


async def vanish_in_flight(bus, what: str, sessions: list[str], slot: int) -> None:
    """Send one call without waiting for its reply, then close the connection at once."""
    event(f"vanish: {what}")
    if what == "create-status":
        send_now(bus, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "status", {}])
    elif what == "create-data":
        send_now(bus, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "data", {}])
    elif what == "create-both-wait":
        send_now(bus, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "both", {"wait_ms": Variant("u", 60_000)}])
    else:
        try:
            path = sessions[slot % len(sessions)] if sessions else await create_session(bus, mode="status")
        except DBusError as e:
            assert e.type in ALLOWED_ERRORS, f"vanish {what}: {e.type}: {e.text}"
        else:
            send_now(bus, path, SESSION, "LockDevice", "u", [0 if what == "lock" else 60_000])
    kill_connections(bus)


async def after_leaving(address: str, left: Signals, name: str) -> None:
    """Once the bus has announced ``name`` gone, a new client opens (and closes) a
    status session: calls are handled in the order they reach the daemon, so anything
    the gone client sent has by then been taken up, and its effects show in the checks."""
    await left.wait(until=lambda msgs: any(msg.body[0] == name for msg in msgs))
    probe = await connect(address)
    try:
        await call(probe, await create_session(probe, mode="status"), SESSION, "Close")
    finally:
        probe.disconnect()


async def held_outside(address: str, observer, lock_file: str, buses, sessions, who: int, slot: int,
                       attempt: str) -> None:
    """A program outside the service takes the lock file (``flock``) for a while. Until
    it lets go, the service's I/O and data mode answer Busy or Timeout, no session
    holds the lock or data mode (never two holders), and State is held-by-program."""
    holders = [path for bus, paths in zip(buses, sessions) for path in paths
               if await get_property(bus, path, SESSION, "HoldsLock")]
    if holders or await get_property(observer, SIM0, DEVICE, "DataModeHeld"):
        # The service holds the lock file while a session holds the device lock or data mode.
        assert not lock_file_free(lock_file), "a session holds the device, but the lock file is free"
        event("outside: the service holds the device")
        return
    event("outside: held by the program")
    program = await asyncio.create_subprocess_exec(
        "flock", "-w", "3", lock_file, "sh", "-c", "echo locked; read x",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    temporary = path = None  # a connection of its own when the client has no session to try with
    try:
        line = await asyncio.wait_for(program.stdout.readline(), 10)
        # Nobody in the service holds the device, so nothing may keep the lock file from us.
        assert line == b"locked\n", "nobody holds the device, but the lock file stayed taken for 3 s"
        if sessions[who] and not attempt.startswith("data"):
            bus, path = buses[who], sessions[who][slot % len(sessions[who])]
        else:
            bus = temporary = await connect(address)
            path = await create_session(temporary, mode="status")
        member, target, interface, signature, body = {
            "status": ("GetStatus", path, SESSION, "", []),
            "lock-0": ("LockDevice", path, SESSION, "u", [0]),
            "lock-30": ("LockDevice", path, SESSION, "u", [30]),
            "data-0": ("CreateDevice", ROOT, MANAGER, "ssa{sv}", ["sim0", "data", {}]),
            "data-30": ("CreateDevice", ROOT, MANAGER, "ssa{sv}", ["sim0", "both", {"wait_ms": Variant("u", 30)}]),
        }[attempt]
        try:
            await call(bus, target, interface, member, signature, body)
        except DBusError as e:
            assert e.type in HELD_OUTSIDE_ERRORS, f"{member} while held outside: {e.type}: {e.text}"
        else:
            raise AssertionError(f"{member} succeeded while a program outside the service held the lock file")
        # Never two holders: the outside program has the device, no session has it too.
        assert await get_property(observer, SIM0, DEVICE, "DataModeHeld") is False
        for b, paths in zip(buses, sessions):
            for p in paths:
                assert await get_property(b, p, SESSION, "HoldsLock") is False, f"{p} holds the lock too"

        async def shown_held() -> bool:
            return await get_property(observer, SIM0, DEVICE, "State") == "held-by-program"

        await wait_until(shown_held, timeout=2, what="State held-by-program while the lock file is held outside")
    finally:
        if temporary is not None:
            if path is not None:
                with contextlib.suppress(DBusError):
                    await call(temporary, path, SESSION, "Close")
            temporary.disconnect()  # anything made by mistake goes with it
        if program.returncode is None:
            program.stdin.write(b"done\n")
            await program.stdin.drain()
        await asyncio.wait_for(program.wait(), 10)
    # State goes back to "ready" within a fraction of a second: checked once, after the
    # last example (waiting ~0.3 s for it after each step would triple the test's time).


async def check_invariants(observer, lock_file: str, buses, sessions, gone: set[str]) -> None:
    # Nothing held by a client that is gone (the service sees the departure in a few ms).
    async def holder_alive() -> bool:
        holder = await get_property(observer, SIM0, DEVICE, "DataModeHolder")
        return not any(names_client(holder, name) for name in gone)

    await wait_until(holder_alive, what="data mode released by a departed client")
    holder = await get_property(observer, SIM0, DEVICE, "DataModeHolder")
    live = [b.unique_name for b in buses]
    assert holder == "" or any(holder.startswith(name) for name in live), holder

    # Nothing created for or waited on by a gone client either: every session object
    # is a live client's, and (every step of the live ones being over) nobody waits.
    expected = sorted(path.rsplit("/", 1)[1] for paths in sessions for path in paths)

    async def only_live_clients() -> bool:
        return (await session_objects(observer) == expected
                and await get_property(observer, SIM0, DEVICE, "DataModeWaiters") == 0
                and await get_property(observer, SIM0, DEVICE, "LockWaiters") == 0)

    try:
        await wait_until(only_live_clients, timeout=5, what="only live clients' sessions and no waiters")
    except TimeoutError:
        raise AssertionError(f"session objects {await session_objects(observer)} (live: {expected}); "
                             f"DataModeWaiters {await get_property(observer, SIM0, DEVICE, 'DataModeWaiters')}, "
                             f"LockWaiters {await get_property(observer, SIM0, DEVICE, 'LockWaiters')}") from None

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
    # The lock file is the service's while a live session holds the device lock or data
    # mode, and free otherwise: nothing taken for a client that is gone.
    if lock_holders or holder:
        assert not lock_file_free(lock_file), "a session holds the device, but the lock file is free"
    else:
        await wait_until(lambda: lock_file_free(lock_file), timeout=5,
                         what="the lock file free while no live session holds the device lock or data mode")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_sequences_keep_the_invariants(service: Daemon, ops) -> None:
    asyncio.run(scenario(service.address, ops))
