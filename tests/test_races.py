"""Clients that leave in the same instant, against the real daemon on a private bus.

The defect guarded against: when the client holding a device in data mode and the
client waiting in line for it die at the same moment, the waiter could be granted
data mode after its own cleanup had already run. The device then stayed held by a
client that is gone (DataModeHolder names the dead waiter) and everyone else got
Busy until the service restarted. By hand: ``stillctl events sim0`` (holds sim0),
``stillctl events sim0 --wait 60`` (waits in line), then ``kill -9`` both at once.

In-process rounds close the connections' sockets outright, all in one synchronous
step (helpers.kill_connections: from the daemon's side the same as kill -9), in
both orders, for data mode, the device lock, both at once, a holder letting go as
its waiter dies, and calls still in flight from a client that leaves. The last
test does the same with real stillctl processes killed with SIGKILL.

After each round, once the bus has announced the clients gone: a client asking
next (for data mode and the lock, willing to wait) is served, since whatever the
gone clients' calls did must be undone by then; nothing is held or waited for on
their behalf (DataModeHeld false, no waiters, the lock file free, no session object
left); DataModeHolder never names them again, and the device's last announcements
agree; and a fresh client gets data mode and the device lock at once, without
waiting. At the end the daemon still runs and its log has no traceback.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterable

import pytest
from dbus_fast import DBusError, Message, Variant
from dbus_fast.aio import MessageBus
from helpers import (
    DEVICE,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    Daemon,
    Signals,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    dbus_call,
    get_all,
    get_property,
    kill_connections,
    lock_file_free,
    names_client,
    send_now,
    session_objects,
    wait_until,
)

#: Rounds per kill order of the main race (two orders: 300 rounds in all by default).
ROUNDS = int(os.environ.get("STILLSVC_RACE_ROUNDS", "150"))
#: Rounds of each of the other variants.
VARIANT_ROUNDS = max(1, ROUNDS // 5)
#: Rounds with real stillctl processes.
PROCESS_ROUNDS = int(os.environ.get("STILLSVC_RACE_PROCESS_ROUNDS", "10"))
#: How long the daemon may take to clean up after clients that left (it takes ms).
SETTLE = 5.0
#: How soon a client asking after the gone ones must be served (they hold nothing).
SERVED_WITHIN = 2.0
WAIT_LONG = {"wait_ms": Variant("u", 60_000)}
ORDERS = ["holder-first", "waiter-first"]
STILLCTL = [sys.executable, "-m", "stillsvc.ctl"]


# -- what a round checks ---------------------------------------------------------------------

async def device_state(observer: MessageBus) -> dict:
    props = await get_all(observer, SIM0, DEVICE)
    return {k: props[k] for k in ("State", "DataModeHeld", "DataModeHolder", "DataModeWaiters", "LockWaiters")}


async def wait_for_waiters(observer: MessageBus, name: str, count: int) -> None:
    async def queued() -> bool:
        return await get_property(observer, SIM0, DEVICE, name) == count

    await wait_until(queued, what=f"{name} == {count}")


async def diagnosis(observer: MessageBus, lock_file: str, gone: list[str], expected: list[str]) -> str:
    state = await device_state(observer)
    culprits = [name for name in gone if names_client(state["DataModeHolder"], name)]
    return (f"device {state}; lock file free: {lock_file_free(lock_file)}; "
            f"session objects: {await session_objects(observer)} (expected {expected})"
            + (f"; DataModeHolder names the gone client {culprits[0]}" if culprits else ""))


async def served_after(address: str, observer: MessageBus, lock_file: str, gone: list[str], what: str) -> None:
    """A client that asks after the gone ones have left the bus, for data mode and the
    lock and willing to wait a little, is served. Calls are handled in the order they
    reach the daemon, and whatever the gone clients sent came before: so by then
    everything their calls did has been undone, or was never done."""
    late = await connect(address)
    patience = int(SERVED_WITHIN * 1000)
    try:
        session = await create_session(late, mode="both", wait_ms=Variant("u", patience))
        await call(late, session, SESSION, "LockDevice", "u", [patience])
        await call(late, session, SESSION, "Close")
    except Exception as e:
        raise AssertionError(f"{what}: a client asking after {', '.join(gone)} left was not served within "
                             f"{SERVED_WITHIN} s ({e}): {await diagnosis(observer, lock_file, gone, [])}") from None
    finally:
        late.disconnect()


async def expect_nothing_left(observer: MessageBus, lock_file: str, gone: list[str], what: str,
                              live_sessions: Iterable[str] = ()) -> None:
    """Nothing held or waited for on behalf of the clients in ``gone``: no data mode,
    no waiters, the lock file free, no session objects but ``live_sessions``."""
    expected = sorted(path.rsplit("/", 1)[1] for path in live_sessions)

    async def free() -> bool:
        state = await device_state(observer)
        return (state["State"] == "ready" and not state["DataModeHeld"] and state["DataModeWaiters"] == 0
                and state["LockWaiters"] == 0 and lock_file_free(lock_file)
                and await session_objects(observer) == expected)

    try:
        await wait_until(free, timeout=SETTLE, what="the device free")
    except TimeoutError:
        raise AssertionError(f"{what}: {SETTLE} s after {', '.join(gone)} left, the device is not free: "
                             f"{await diagnosis(observer, lock_file, gone, expected)}") from None
    holder = await get_property(observer, SIM0, DEVICE, "DataModeHolder")
    assert holder == "", f"{what}: DataModeHeld is false but DataModeHolder is {holder!r}"


def check_announcements(received: list[Message], gone: list[str], what: str, settled_at: int) -> None:
    """The device's PropertiesChanged: the last ones before the device was found free
    agree with it, and none after names a client that is gone."""
    def device_changes(messages: list[Message]) -> list[dict]:
        return [msg.body[1] for msg in messages if msg.body and msg.body[0] == DEVICE]

    before, after = device_changes(received[:settled_at]), device_changes(received[settled_at:])
    for name, idle in (("DataModeHeld", False), ("DataModeHolder", ""), ("DataModeWaiters", 0), ("LockWaiters", 0)):
        values = [c[name].value for c in before if name in c]
        if values:
            assert values[-1] == idle, f"{what}: the last {name} announced was {values[-1]!r}, not {idle!r}"
    for change in after:
        holder = change["DataModeHolder"].value if "DataModeHolder" in change else ""
        for name in gone:
            assert not names_client(holder, name), f"{what}: DataModeHolder announced as {holder!r} after {name} left"


async def fresh_client_gets_everything(address: str, what: str) -> None:
    """A new client opens data mode without waiting (wait_ms 0) and takes the device lock at once."""
    fresh = await connect(address)
    try:
        session = await create_session(fresh, mode="both", wait_ms=Variant("u", 0))
        holder = await get_property(fresh, SIM0, DEVICE, "DataModeHolder")
        assert names_client(holder, fresh.unique_name), f"{what}: DataModeHolder is {holder!r}"
        await call(fresh, session, SESSION, "LockDevice", "u", [0])
        await call(fresh, session, SESSION, "Close")
    except Exception as e:
        raise AssertionError(f"{what}: a fresh client could not have the device at once: {e}") from e
    finally:
        fresh.disconnect()


async def killed(*calls: asyncio.Future) -> None:
    """The calls of killed connections end with the connection error, not a reply."""
    for result in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(result, (ConnectionError, EOFError)), f"a killed client's call ended with {result!r}"


class Round:
    """Checks a round after its clients were killed: once the bus has seen them go, a
    client asking after them is served, nothing is left for them, the announcements
    agree, and a fresh client gets the device at once."""

    def __init__(self, daemon: Daemon, observer: MessageBus, lock_file: str, seen: Signals,
                 left: Signals) -> None:
        self.daemon, self.observer, self.lock_file, self.seen, self.left = daemon, observer, lock_file, seen, left

    def begin(self) -> None:
        """Call just before the kill."""
        self.seen.received.clear()

    async def check(self, gone: list[MessageBus | str], what: str, live_sessions: Iterable[str] = ()) -> None:
        names = [who if isinstance(who, str) else who.unique_name for who in gone]
        await self.left.wait(until=lambda left: set(names) <= {msg.body[0] for msg in left}, timeout=SETTLE)
        await served_after(self.daemon.address, self.observer, self.lock_file, names, what)
        await expect_nothing_left(self.observer, self.lock_file, names, what, live_sessions)
        # Replies to our calls come after every signal sent before them: all announcements
        # up to the moment the device was found free are in.
        check_announcements(self.seen.received, names, what, len(self.seen.received))
        settled_at = len(self.seen.received)
        await fresh_client_gets_everything(self.daemon.address, what)
        await expect_nothing_left(self.observer, self.lock_file, names, what, live_sessions)
        check_announcements(self.seen.received, names, what, settled_at)

    async def finish(self) -> None:
        """After the last round: nothing left, and the daemon alive with a clean log."""
        assert await session_objects(self.observer) == []
        assert lock_file_free(self.lock_file)
        assert_daemon_healthy(self.daemon)


@pytest.fixture
async def rounds(daemon: Daemon, client: MessageBus):
    lock_file = await get_property(client, SIM0, DEVICE, "LockFile")
    async with Signals(client, member="PropertiesChanged", path=SIM0) as seen, \
            Signals(client, member="NameOwnerChanged", interface="org.freedesktop.DBus",
                    predicate=lambda msg: msg.body[2] == "") as left:
        yield Round(daemon, client, lock_file, seen, left)


def in_order(order: str, holder: MessageBus, waiter: MessageBus) -> tuple[MessageBus, MessageBus]:
    return (holder, waiter) if order == "holder-first" else (waiter, holder)


# -- in-process rounds -----------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
async def test_data_mode_holder_and_waiter_killed_in_the_same_instant(daemon, client, rounds, order):
    for n in range(ROUNDS):
        what = f"round {n} ({order})"
        holder, waiter = await connect(daemon.address), await connect(daemon.address)
        await create_session(holder, mode="data")
        waiting = asyncio.ensure_future(create_session(waiter, mode="data", **WAIT_LONG))
        await wait_for_waiters(client, "DataModeWaiters", 1)
        rounds.begin()
        kill_connections(*in_order(order, holder, waiter))
        await killed(waiting)
        await rounds.check([holder, waiter], what)
    await rounds.finish()

@pytest.mark.parametrize("order", ORDERS)
async def test_lock_holder_and_waiter_killed_in_the_same_instant(daemon, client, rounds, order):
    for n in range(VARIANT_ROUNDS):
        what = f"round {n} ({order})"
        holder, waiter = await connect(daemon.address), await connect(daemon.address)
        held = await create_session(holder, mode="status")
        other = await create_session(waiter, mode="status")
        await call(holder, held, SESSION, "LockDevice", "u", [0])
        waiting = asyncio.ensure_future(call(waiter, other, SESSION, "LockDevice", "u", [60_000]))
        await wait_for_waiters(client, "LockWaiters", 1)
        rounds.begin()
        kill_connections(*in_order(order, holder, waiter))
        await killed(waiting)
        await rounds.check([holder, waiter], what)
    await rounds.finish()

async def test_holder_of_both_and_its_waiters_killed_in_the_same_instant(daemon, client, rounds):
    """One client holds data mode and the lock; one waits for data mode, one for the
    lock on a status session; all three die at once, in an order that changes."""
    rng = random.Random(1234)
    for n in range(VARIANT_ROUNDS * 2):
        holder, data_waiter, lock_waiter = [await connect(daemon.address) for _ in range(3)]
        held = await create_session(holder, mode="both")
        await call(holder, held, SESSION, "LockDevice", "u", [0])
        status = await create_session(lock_waiter, mode="status")
        waits = [asyncio.ensure_future(create_session(data_waiter, mode="data", **WAIT_LONG)),
                 asyncio.ensure_future(call(lock_waiter, status, SESSION, "LockDevice", "u", [60_000]))]
        await wait_for_waiters(client, "DataModeWaiters", 1)
        await wait_for_waiters(client, "LockWaiters", 1)
        order = [holder, data_waiter, lock_waiter]
        rng.shuffle(order)
        what = f"round {n} (killed in the order {[b.unique_name for b in order]}, holder {holder.unique_name})"
        rounds.begin()
        kill_connections(*order)
        await killed(*waits)
        await rounds.check(order, what)
    await rounds.finish()

@pytest.mark.parametrize("letting_go", ["UnlockDevice", "Close"])
async def test_waiter_killed_as_the_holder_lets_go(daemon, client, rounds, letting_go):
    """The holder unlocks (or closes) in the same instant its waiter dies: the lock
    (or data mode) must not pass to the dead waiter."""
    for n in range(VARIANT_ROUNDS * 2):
        first = "holder" if n % 2 else "waiter"
        what = f"round {n} ({letting_go}, {first} first)"
        holder, waiter = await connect(daemon.address), await connect(daemon.address)
        if letting_go == "UnlockDevice":
            held = await create_session(holder, mode="status")
            await call(holder, held, SESSION, "LockDevice", "u", [0])
            other = await create_session(waiter, mode="status")
            waiting = asyncio.ensure_future(call(waiter, other, SESSION, "LockDevice", "u", [60_000]))
            await wait_for_waiters(client, "LockWaiters", 1)
        else:
            held = await create_session(holder, mode="data")
            waiting = asyncio.ensure_future(create_session(waiter, mode="data", **WAIT_LONG))
            await wait_for_waiters(client, "DataModeWaiters", 1)
        rounds.begin()
        if first == "holder":
            send_now(holder, held, SESSION, letting_go)
            kill_connections(waiter)
        else:
            kill_connections(waiter)
            send_now(holder, held, SESSION, letting_go)
        await killed(waiting)
        live = [held] if letting_go == "UnlockDevice" else []
        await rounds.check([waiter], what, live_sessions=live)
        if live:
            assert await get_property(holder, held, SESSION, "HoldsLock") is False, what
            await call(holder, held, SESSION, "Close")
        holder.disconnect()
    await rounds.finish()

IN_FLIGHT = ["create-status", "create-data", "create-data-waiting", "lock", "lock-waiting"]


@pytest.mark.parametrize("kind", IN_FLIGHT)
async def test_calls_in_flight_from_a_client_that_leaves(daemon, client, rounds, kind):
    """A client sends CreateDevice or LockDevice and is gone before the reply: nothing
    may be created for it or granted to it. In the "-waiting" kinds another client
    holds what it asks for and dies in the same instant."""
    for n in range(VARIANT_ROUNDS):
        leaving = await connect(daemon.address)
        holder = await connect(daemon.address) if kind.endswith("-waiting") else None
        if kind == "create-data-waiting":
            await create_session(holder, mode="data")
        elif kind == "lock-waiting":
            await call(holder, await create_session(holder, mode="status"), SESSION, "LockDevice", "u", [0])
        session = await create_session(leaving, mode="status") if kind.startswith("lock") else None
        rounds.begin()
        if kind == "create-status":
            send_now(leaving, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "status", {}])
        elif kind == "create-data":
            send_now(leaving, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "data", {}])
        elif kind == "create-data-waiting":
            send_now(leaving, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "data", WAIT_LONG])
        elif kind == "lock":
            send_now(leaving, session, SESSION, "LockDevice", "u", [0])
        else:
            send_now(leaving, session, SESSION, "LockDevice", "u", [60_000])
        gone = [leaving] if holder is None else ([leaving, holder] if n % 2 else [holder, leaving])
        kill_connections(*gone)
        await rounds.check(gone, f"round {n} ({kind}, killed {[b.unique_name for b in gone]})")
    await rounds.finish()

# -- real processes ------------------------------------------------------------------------------

def pids_named(description: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"\bpid (\d+)", description)}


async def unique_names_of(bus: MessageBus, pid: int) -> list[str]:
    """The bus connections of process ``pid`` (asked of the bus itself)."""
    (names,) = await dbus_call(bus, "ListNames")
    found = []
    for name in names:
        if name.startswith(":"):
            try:
                (owner_pid,) = await dbus_call(bus, "GetConnectionUnixProcessID", "s", [name])
            except DBusError:
                continue  # gone meanwhile
            if owner_pid == pid:
                found.append(name)
    return found


async def test_stillctl_holder_and_waiter_killed_with_sigkill(daemon, client, rounds):
    """``stillctl events sim0`` holds sim0, ``stillctl events sim0 --wait 60`` waits in
    line; both get SIGKILL at once, ten times over, in alternating order."""
    env = {k: v for k, v in os.environ.items() if k != "STILLSVC_BUS"}
    dead: set[int] = set()

    async def stillctl(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *STILLCTL, "--bus", daemon.address, *args, cwd=str(REPO), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    for n in range(PROCESS_ROUNDS):
        what = f"round {n} ({'holder' if n % 2 == 0 else 'waiter'} killed first)"
        holder = await stillctl("events", "sim0")
        waiter = None
        try:
            line = await asyncio.wait_for(holder.stderr.readline(), 10)
            assert line.startswith(b"Holding sim0 in data mode"), line
            assert holder.pid in pids_named(await get_property(client, SIM0, DEVICE, "DataModeHolder"))
            waiter = await stillctl("events", "sim0", "--wait", "60")
            await wait_for_waiters(client, "DataModeWaiters", 1)
            names = await unique_names_of(client, holder.pid) + await unique_names_of(client, waiter.pid)
            assert len(names) == 2, names
            rounds.begin()
            pair = [holder, waiter] if n % 2 == 0 else [waiter, holder]
            for proc in pair:
                os.kill(proc.pid, signal.SIGKILL)
            for proc in pair:
                assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
            dead |= {holder.pid, waiter.pid}
            await rounds.check(names, f"{what}, holder pid {holder.pid}, waiter pid {waiter.pid}")
            assert not pids_named(await get_property(client, SIM0, DEVICE, "DataModeHolder")) & dead, what
        finally:
            for proc in (holder, waiter):
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    await rounds.finish()
