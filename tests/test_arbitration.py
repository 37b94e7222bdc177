"""Arbitration of the device: who may reach it for data, and who holds it.

Against the real daemon over a private bus:

- a status-only session never reaches the device for data;
- a data-mode session holds the device's lock file for its whole life;
- programs outside the service that hold the lock file (``flock(1)``) are waited
  for, shown in the device's State, and respected by the event monitor;
- no event is dropped without being counted in ``UndeliveredEvents``;
- a transfer whose reader stalls cannot keep the device, one that makes progress
  is never stopped.

The outside program is ``flock -o LOCKFILE sh -c 'echo locked; exec sleep N'``: it
says when it holds the file, never holds it longer than N seconds, and (``-o``:
only flock itself has the locked descriptor) gives it up the moment flock exits.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant
from helpers import (
    DEVICE,
    ERROR,
    ITEM,
    MANAGER,
    ROOT,
    SESSION,
    SIM0,
    SIMULATOR,
    Signals,
    call,
    connect,
    create_session,
    expect_error,
    get_property,
    readable,
    unwrap,
    wait_until,
)

PROPERTIES = "org.freedesktop.DBus.Properties"


# -- helpers -------------------------------------------------------------------------------------

def now() -> float:
    return asyncio.get_running_loop().time()


async def lock_file_of(bus) -> str:
    return await get_property(bus, SIM0, DEVICE, "LockFile")


async def lock_file_free(path: str) -> bool:
    """``flock -n PATH true``: True if nobody holds the lock file (exit 0), False if held (exit 1)."""
    proc = await asyncio.create_subprocess_exec("flock", "-n", path, "true")
    try:
        code = await asyncio.wait_for(proc.wait(), 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code in (0, 1), f"flock -n exited with {code}"
    return code == 0


class OutsideHolder:
    """A program outside the service holding the device's lock file for at most ``seconds``."""

    def __init__(self, lock_file: str, seconds: float) -> None:
        self.lock_file = lock_file
        self.seconds = seconds
        self.proc: asyncio.subprocess.Process | None = None
        #: loop time at which it was known to hold the file
        self.since = 0.0

    async def __aenter__(self) -> OutsideHolder:
        self.proc = await asyncio.create_subprocess_exec(
            "flock", "-o", self.lock_file, "sh", "-c", f"echo locked; exec sleep {self.seconds}",
            stdout=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            assert self.proc.stdout is not None
            line = await asyncio.wait_for(self.proc.stdout.readline(), 5)
            assert line == b"locked\n", line
            self.since = now()
            assert not await lock_file_free(self.lock_file), "the outside holder does not hold the lock file"
        except BaseException:
            await self.end()
            raise
        return self

    async def finished(self, timeout: float = 5.0) -> None:
        """Wait for it to end by itself."""
        assert self.proc is not None
        await asyncio.wait_for(self.proc.wait(), timeout)

    async def end(self) -> None:
        """End it now (flock and its command); the lock file is free once flock has exited."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await asyncio.wait_for(self.proc.wait(), 5)

    async def __aexit__(self, *exc: object) -> None:
        await self.end()


class Routed(Signals):
    """EventRouted, as an administrator watching the routing (Manager.WatchEvents) sees it."""

    def __init__(self, bus) -> None:
        super().__init__(bus, member="EventRouted", interface=MANAGER)
        self._read = 0

    async def __aenter__(self) -> Routed:
        await super().__aenter__()
        await call(self.bus, ROOT, MANAGER, "WatchEvents")
        return self

    async def next(self) -> tuple[str, int, str]:
        """The next event's (name, sequence, consumer)."""
        await self.wait(self._read + 1)
        _path, event, sequence, _time, consumer, _data = self.received[self._read].body
        self._read += 1
        return event, sequence, consumer

    async def press(self, bus, button: str = "scan") -> tuple[str, int, str]:
        await call(bus, SIM0, SIMULATOR, "PressButton", "s", [button])
        return await self.next()


async def state(bus) -> str:
    return await get_property(bus, SIM0, DEVICE, "State")


async def wait_for_state(bus, expected: str, timeout: float) -> None:
    async def check() -> bool:
        return await state(bus) == expected

    await wait_until(check, timeout=timeout, what=f"device State {expected!r}")


async def lock(bus, session: str, timeout_ms: int) -> None:
    await call(bus, session, SESSION, "LockDevice", "u", [timeout_ms])


async def close(bus, session: str) -> None:
    await call(bus, session, SESSION, "Close")


async def flatbed_of(bus, session: str) -> str:
    return await get_property(bus, session, SESSION, "RootItem") + "/Flatbed"


async def write(bus, item: str, **values: Any) -> None:
    types = {"resolution": "u", "width": "u", "height": "u", "mode": "s"}
    await call(bus, item, ITEM, "WriteProperties", "a{sv}",
               [{name: Variant(types[name], value) for name, value in values.items()}])


async def many_megabytes(bus, item: str) -> None:
    """The whole bed, 300 dpi colour: 2551 x 3507 x 3, about 27 MB of raw data."""
    await write(bus, item, resolution=300, mode="color")


SLOW_WIDTH, SLOW_HEIGHT = 637, 550  # 75 dpi colour: about 1 MB, 17 reads of 64 KiB


async def about_a_megabyte(bus, item: str) -> None:
    await write(bus, item, resolution=75, mode="color", width=SLOW_WIDTH, height=SLOW_HEIGHT)


def start_transfer(bus, item: str, w: int, fmt: str = "raw", timeout: float = 10.0) -> asyncio.Future:
    return asyncio.ensure_future(call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, fmt, {}], unix_fds=[w],
                                      timeout=timeout))


def read_slowly(fd: int, chunk: int = 64 * 1024, pause: float = 0.1, limit: float = 15.0) -> bytes:
    """A slow reader (in a thread): 64 KiB every 100 ms until end of file, for at most
    ``limit`` seconds. The pause is the reader's pace, not a wait for anything."""
    data = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    end = time.monotonic() + limit
    try:
        while time.monotonic() < end:
            if not poller.poll(100):
                continue
            got = os.read(fd, chunk)
            if not got:
                return bytes(data)
            data += got
            time.sleep(pause)
        raise TimeoutError(f"the stream did not end within {limit} s ({len(data)} bytes read)")
    finally:
        os.close(fd)


async def slow_transfer(bus, item: str) -> tuple[dict[str, Any], bytes, float]:
    """A whole raw transfer read slowly: (the reply, the bytes read, seconds it took)."""
    r, w = os.pipe()
    reader = asyncio.get_running_loop().run_in_executor(None, read_slowly, r)
    started = now()
    try:
        (summary,) = await start_transfer(bus, item, w)
        elapsed = now() - started
    finally:
        os.close(w)
        data = await asyncio.wait_for(reader, 20)
    return unwrap(summary), data, elapsed


async def settle(reply: asyncio.Future) -> None:
    """After a test's assertions: let a transfer call still running end (its reader is gone)."""
    if not reply.done():
        try:
            await asyncio.wait_for(reply, 10)
        except (DBusError, TimeoutError):
            pass
    elif not reply.cancelled():
        reply.exception()  # retrieved, so asyncio does not complain


def names_undelivered(msg) -> bool:
    interface, changed, invalidated = msg.body
    return interface == DEVICE and ("UndeliveredEvents" in changed or "UndeliveredEvents" in invalidated)


async def undelivered(bus) -> int:
    return await get_property(bus, SIM0, DEVICE, "UndeliveredEvents")


async def expect_undelivered(bus, changes: Signals, expected: int) -> None:
    """PropertiesChanged names UndeliveredEvents (with ``expected``, when it carries the
    value), and the property then reads ``expected``."""

    def reported(received) -> bool:
        return any("UndeliveredEvents" not in m.body[1] or m.body[1]["UndeliveredEvents"].value == expected
                   for m in received)

    try:
        await changes.wait(until=reported, timeout=5)
    except TimeoutError:
        raise AssertionError(f"no PropertiesChanged naming UndeliveredEvents = {expected}; got "
                             f"{[unwrap(m.body[1]) for m in changes.received]}, "
                             f"the property reads {await undelivered(bus)}") from None

    async def check() -> bool:
        return await undelivered(bus) == expected

    await wait_until(check, timeout=2, what=f"UndeliveredEvents == {expected}")
    changes.received.clear()


def undelivered_changes(bus) -> Signals:
    return Signals(bus, member="PropertiesChanged", interface=PROPERTIES, path=SIM0, predicate=names_undelivered)


# -- 1. a status-only session never reaches the device for data -------------------------------------

async def test_a_status_session_cannot_transfer_and_its_settings_never_reach_the_device(client):
    session = await create_session(client, mode="status")
    flatbed = await flatbed_of(client, session)
    before = unwrap(await get_property(client, SIM0, SIMULATOR, "LastSettings"))
    await write(client, flatbed, resolution=300)  # the session's own copy only
    (values,) = await call(client, flatbed, ITEM, "ReadProperties")
    assert values["resolution"].value == 300
    r, w = os.pipe()
    try:
        await expect_error("AccessDenied", call(client, flatbed, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}],
                                                unix_fds=[w]))
    finally:
        os.close(w)
        os.close(r)
    assert unwrap(await get_property(client, SIM0, SIMULATOR, "LastSettings")) == before


async def test_a_status_session_may_not_read_or_write_raw_data(client):
    session = await create_session(client, mode="status")
    await expect_error("AccessDenied", call(client, session, SESSION, "RawReadData", "u", [16]))
    await expect_error("AccessDenied", call(client, session, SESSION, "RawWriteData", "ay", [b"x"]))


async def test_only_a_session_with_data_mode_may_subscribe_to_events(client):
    status = await create_session(client, mode="status")
    await expect_error("AccessDenied", call(client, status, SESSION, "Subscribe"))
    assert await get_property(client, status, SESSION, "Subscribed") is False
    for mode in ("data", "both"):
        session = await create_session(client, mode=mode)
        await call(client, session, SESSION, "Subscribe")
        assert await get_property(client, session, SESSION, "Subscribed") is True, mode
        await close(client, session)


# -- 2. a data-mode session holds the lock file for its whole life ----------------------------------

async def test_a_data_session_holds_the_lock_file_until_it_closes(client):
    lock_file = await lock_file_of(client)
    statuses = [await create_session(client, mode="status") for _ in range(2)]
    await call(client, statuses[0], SESSION, "GetStatus")
    assert await lock_file_free(lock_file), "only status sessions are open, yet the lock file is held"
    data = await create_session(client, mode="data")
    assert await get_property(client, data, SESSION, "HoldsLock") is False
    assert not await lock_file_free(lock_file), "an idle data session does not hold the lock file"
    await call(client, data, SESSION, "GetStatus")  # one call under the device lock, then idle again
    assert not await lock_file_free(lock_file), "the data session let the lock file go after a call"
    await close(client, data)
    await wait_until(lambda: lock_file_free(lock_file), timeout=0.5, what="the lock file free after Close()")


async def test_a_data_session_gives_up_the_lock_file_when_its_client_disconnects(daemon, client):
    lock_file = await lock_file_of(client)
    leaving = await connect(daemon.address)
    try:
        await create_session(leaving, mode="data")
        assert not await lock_file_free(lock_file)
    finally:
        leaving.disconnect()
    await wait_until(lambda: lock_file_free(lock_file), timeout=0.5, what="the lock file free after disconnect")


# -- 3. outside holders of the lock file are respected --------------------------------------------

async def test_lock_device_gives_up_on_time_or_waits_for_an_outside_holder(client):
    lock_file = await lock_file_of(client)
    session = await create_session(client, mode="status")
    async with OutsideHolder(lock_file, 1) as holder:
        started = now()
        try:
            await lock(client, session, 200)
        except DBusError as e:
            assert e.type in (f"{ERROR}.Timeout", f"{ERROR}.Busy"), f"{e.type}: {e.text}"
        else:
            raise AssertionError("LockDevice(200) succeeded while another program holds the lock file")
        assert now() - started < 1.0, f"LockDevice(200) took {now() - started:.2f} s to give up"
        started = now()
        await lock(client, session, 4000)
        granted = now()
        assert granted - holder.since >= 0.8, f"granted {granted - holder.since:.2f} s after the holder started"
        assert granted - started < 4.0
        assert await get_property(client, session, SESSION, "HoldsLock") is True
        await holder.finished()


async def test_state_shows_an_outside_holder_and_returns_to_ready_when_it_is_gone(client):
    lock_file = await lock_file_of(client)
    session = await create_session(client, mode="status")
    assert await state(client) == "ready"
    async with OutsideHolder(lock_file, 10) as holder:
        with pytest.raises(DBusError):
            await lock(client, session, 200)
        await wait_for_state(client, "held-by-program", timeout=1)
        await holder.end()
        await wait_for_state(client, "ready", timeout=2)
    await lock(client, session, 0)
    assert await get_property(client, session, SESSION, "HoldsLock") is True


async def test_data_mode_waits_for_an_outside_holder_or_is_busy_at_once(client):
    lock_file = await lock_file_of(client)
    async with OutsideHolder(lock_file, 1) as holder:
        started = now()
        e = await expect_error("Busy", create_session(client, mode="data", wait_ms=Variant("u", 0)))
        assert now() - started < 0.5, f"wait_ms 0 took {now() - started:.2f} s to fail"
        assert "another program" in e.text, e.text
        started = now()
        session = await create_session(client, mode="data", wait_ms=Variant("u", 4000))
        granted = now()
        assert granted - holder.since >= 0.8, f"data mode {granted - holder.since:.2f} s after the holder started"
        assert granted - started < 4.0
        await holder.finished()
    assert not await lock_file_free(lock_file)  # the new data session has it now
    await close(client, session)


async def test_no_application_is_launched_while_an_outside_program_holds_the_device(client):
    shared = Path(tempfile.mkdtemp(prefix="stillsvc-arbitration-app-"))
    try:
        shared.chmod(0o777)  # as root, the service runs it as nobody
        out = shared / "launched"
        await call(client, ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}",
                   ["append", ["/bin/sh", "-c", 'echo "$2" >> "$1"', "sh", str(out), "%n"], [], [],
                    {"system": Variant("b", True)}])
        lock_file = await lock_file_of(client)
        async with Routed(client) as routed:
            async with OutsideHolder(lock_file, 10) as holder:
                _, first, consumer = await routed.press(client, "scan")
                assert consumer == "none: held by another program", consumer
                await holder.end()
            await wait_for_state(client, "ready", timeout=2)
            _, second, consumer = await routed.press(client, "scan")
            assert consumer.startswith("launch: system:append "), consumer
        await wait_until(lambda: out.exists() and out.read_text().endswith("\n"),
                         what="the system-wide application writing its file")
        assert out.read_text().split() == [str(second)], f"first press was #{first}"
    finally:
        shutil.rmtree(shared)


# -- 4. no event is dropped silently -------------------------------------------------------------------

async def test_events_routed_to_nobody_are_counted_as_undelivered(client):
    assert await undelivered(client) == 0
    async with undelivered_changes(client) as changes, Routed(client) as routed:
        for expected, button in enumerate(("scan", "copy"), 1):
            assert (await routed.press(client, button))[2] == "none: no application registered"
            await expect_undelivered(client, changes, expected)


@pytest.mark.daemon_args("--config", "tests/data/short-event-queue.toml")
async def test_events_dropped_from_a_full_queue_are_counted_as_undelivered(client):
    session = await create_session(client, mode="data")
    async with undelivered_changes(client) as changes, Routed(client) as routed:
        for button in ("scan", "copy", "email", "pdf", "scan"):
            assert (await routed.press(client, button))[2].startswith("queue: ")
        await expect_undelivered(client, changes, 2)
    assert await get_property(client, session, SESSION, "DroppedEvents") == 2
    assert await undelivered(client) == 2


async def test_events_left_in_a_closed_queue_are_counted_as_undelivered(client):
    session = await create_session(client, mode="data")
    async with undelivered_changes(client) as changes, Routed(client) as routed:
        for button in ("scan", "copy", "email"):
            assert (await routed.press(client, button))[2].startswith("queue: ")
        assert await undelivered(client) == 0  # queued is not undelivered (yet)
        await close(client, session)
        await expect_undelivered(client, changes, 3)


async def test_events_left_in_the_queue_of_a_client_that_disconnects_are_counted(daemon, client):
    leaving = await connect(daemon.address)
    try:
        await create_session(leaving, mode="data")
        async with undelivered_changes(client) as changes, Routed(client) as routed:
            for button in ("scan", "copy", "email"):
                assert (await routed.press(client, button))[2].startswith("queue: ")
            assert await undelivered(client) == 0
            leaving.disconnect()
            await expect_undelivered(client, changes, 3)
    finally:
        if leaving.connected:
            leaving.disconnect()


# -- 5. a stalled reader cannot keep the device ----------------------------------------------------------

@pytest.mark.daemon_args("--config", "tests/data/transfer-stall.toml")
async def test_a_transfer_into_a_pipe_nobody_reads_times_out_and_frees_the_device(client, client2):
    session = await create_session(client, mode="data")
    flatbed = await flatbed_of(client, session)
    await many_megabytes(client, flatbed)
    other = await create_session(client2, mode="status")
    r, w = os.pipe()
    started = now()
    reply = start_transfer(client, flatbed, w)
    try:
        await readable(r)  # the service is writing; from now on nobody reads
        await expect_error("Timeout", asyncio.wait_for(asyncio.shield(reply), 8))
        elapsed = now() - started
        assert 0.4 <= elapsed <= 5.0, f"the stalled transfer ended after {elapsed:.2f} s (stall limit 0.5 s)"
        await lock(client2, other, 0)
        assert await get_property(client2, other, SESSION, "HoldsLock") is True
    finally:
        os.close(r)
        os.close(w)
        await settle(reply)


@pytest.mark.daemon_args("--config", "tests/data/transfer-stall.toml")
async def test_a_slow_reader_that_keeps_reading_is_not_stopped_by_the_stall_limit(client):
    session = await create_session(client, mode="data")
    flatbed = await flatbed_of(client, session)
    await about_a_megabyte(client, flatbed)
    summary, data, elapsed = await slow_transfer(client, flatbed)
    assert elapsed > 1.0, f"the transfer took only {elapsed:.2f} s: the reader was not slow enough to test"
    assert summary["bytes"] == len(data) == 36 + SLOW_WIDTH * SLOW_HEIGHT * 3
    assert summary["pages"] == 1


@pytest.mark.daemon_args("--config", "tests/data/stall-and-short-lock.toml")
async def test_an_explicitly_locked_transfer_making_progress_outlives_the_maximum_hold(client):
    session = await create_session(client, mode="data")
    flatbed = await flatbed_of(client, session)
    await about_a_megabyte(client, flatbed)
    await lock(client, session, 1000)
    summary, data, elapsed = await slow_transfer(client, flatbed)
    assert elapsed > 1.0, f"the transfer took only {elapsed:.2f} s: not longer than the 300 ms maximum hold"
    assert summary["bytes"] == len(data) == 36 + SLOW_WIDTH * SLOW_HEIGHT * 3
    assert summary["pages"] == 1


@pytest.mark.daemon_args("--config", "tests/data/stall-and-short-lock.toml")
async def test_an_explicitly_locked_session_whose_reader_stalls_loses_the_lock_and_its_transfer(client):
    session = await create_session(client, mode="data")
    flatbed = await flatbed_of(client, session)
    await many_megabytes(client, flatbed)
    r, w = os.pipe()
    reply: asyncio.Future | None = None
    try:
        async with Signals(client, member="LockRevoked", path=session) as revoked:
            await lock(client, session, 1000)
            started = now()
            reply = start_transfer(client, flatbed, w)
            await readable(r)  # the service is writing; from now on nobody reads
            await expect_error("Timeout", asyncio.wait_for(asyncio.shield(reply), 8))
            elapsed = now() - started
            assert elapsed < 4.0, f"the transfer failed only after {elapsed:.2f} s (stall limit 10 s)"
            await revoked.wait(1, timeout=2)
        assert await get_property(client, session, SESSION, "HoldsLock") is False
    finally:
        os.close(r)
        os.close(w)
        if reply is not None:
            await settle(reply)
