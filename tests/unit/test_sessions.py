"""Sessions in a DeviceManager running in this process with the simulated scanner,
no bus: data mode is exclusive and waited for fairly with a timeout, a client
that goes while waiting — or while being granted — is left nothing, the lock file
is held for a data session's whole life, an outside holder of the lock file is
waited for (Busy at once for a timeout of 0), and status sessions are refused
data I/O and Subscribe before anything is locked.

Each test waits for the state it needs through the manager's ``Listener`` (every
change of a device's waiters, holder or state is reported there), never for time
to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stillsvc.common.errors import AccessDenied, Busy, Cancelled, Timeout
from stillsvc.core.config import Config, DeviceConfig, Limits
from stillsvc.core.devices import Device
from stillsvc.core.listener import Listener
from stillsvc.core.manager import DeviceManager
from stillsvc.core.sessions import Client, Hold, Session
from stillsvc.driver import Mode
from stillsvc.drivers.sim import SimulatedScanner

LONG = 5.0  # a wait that must never run out in a test
FLOCK = shutil.which("flock")


class Changes(Listener):
    """Wakes ``until`` whenever the manager reports a change."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def _poke(self, *args: Any) -> None:
        self.event.set()

    device_changed = session_closed = device_added = device_removed = _poke

    async def until(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.event.clear()
                await self.event.wait()


class Rig:
    def __init__(self, manager: DeviceManager, device: Device, changes: Changes) -> None:
        self.manager = manager
        self.device = device
        self.changes = changes
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    def open(self, client: Client, mode: Mode = Mode.DATA, wait: float = 0.0):  # type: ignore[no-untyped-def]
        return self.manager.create_session(self.device.id, mode, client, wait)

    def waiting_clients(self) -> list[Client]:
        return [s.client for s in self.device.data_mode.waiting]

    def nothing_held(self) -> None:
        """Nothing in the service holds the device, and another program could take it."""
        assert self.device.data_holder is None
        assert self.device.device_lock.holder is None
        assert self.device.data_mode.waiting == [] and self.device.device_lock.waiting == []
        assert not self.device.lockfile.held
        assert can_lock(self.device.lockfile.path)


def can_lock(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@contextmanager
def outside_holder(path: Path) -> Iterator[Callable[[], None]]:
    """Another program holding the lock file (another open file description); the
    yielded function lets go early."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    state = {"fd": fd}

    def let_go() -> None:
        if state["fd"] >= 0:
            os.close(state["fd"])
            state["fd"] = -1

    try:
        yield let_go
    finally:
        let_go()


def make_config(tmp_path: Path, **limits: Any) -> Config:
    return Config(limits=Limits(**limits), runtime_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))


@pytest.fixture
async def rig(tmp_path):
    manager = DeviceManager(make_config(tmp_path, io_wait_ms=2000), drivers={"sim": SimulatedScanner})
    changes = Changes()
    manager.listeners.append(changes)
    r = None
    try:
        device = await manager.add_device(DeviceConfig(id="sim0", driver="sim"))
        r = Rig(manager, device, changes)
        yield r
    finally:
        if r is not None:
            for task in r.tasks:
                task.cancel()
            await asyncio.gather(*r.tasks, return_exceptions=True)
        await manager.stop()


# -- data mode ------------------------------------------------------------------------------------

async def test_data_mode_is_exclusive_and_status_mode_is_not(rig):
    a, b = Client("a"), Client("b")
    held = await rig.open(a, Mode.DATA)
    assert held.holds_data and rig.device.data_holder is held
    for mode in (Mode.DATA, Mode.BOTH):
        with pytest.raises(Busy):
            await rig.open(b, mode)
    watchers = [await rig.open(b, Mode.STATUS) for _ in range(3)]
    assert not any(w.holds_data for w in watchers) and rig.device.data_holder is held
    assert rig.manager.sessions_of("b") == watchers  # the refused ones left nothing behind
    await rig.manager.close_session(held)
    assert rig.device.data_holder is None
    both = await rig.open(b, Mode.BOTH)
    assert rig.device.data_holder is both


async def test_a_data_mode_wait_runs_out_with_timeout(rig):
    a, b = Client("a"), Client("b")
    held = await rig.open(a)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Timeout):
        await asyncio.wait_for(rig.open(b, wait=0.1), LONG)
    assert 0.095 <= loop.time() - started < 1.0
    assert rig.device.data_mode.waiting == [] and rig.manager.sessions_of("b") == []
    await rig.manager.close_session(held)
    rig.nothing_held()  # the waiter that gave up is not granted later


async def test_waiters_get_data_mode_in_the_order_they_asked(rig):
    a, b, c = Client("a"), Client("b"), Client("c")
    held = await rig.open(a)
    first = rig.start(rig.open(b, wait=LONG))
    await rig.changes.until(lambda: rig.waiting_clients() == [b])
    second = rig.start(rig.open(c, wait=LONG))
    await rig.changes.until(lambda: rig.waiting_clients() == [b, c])
    await rig.manager.close_session(held)
    got_b = await asyncio.wait_for(first, LONG)
    assert rig.device.data_holder is got_b and got_b.client is b
    assert rig.waiting_clients() == [c] and not second.done()
    await rig.manager.close_session(got_b)
    got_c = await asyncio.wait_for(second, LONG)
    assert rig.device.data_holder is got_c


async def test_a_client_gone_while_waiting_stops_waiting_and_gets_nothing(rig):
    a, b = Client("a"), Client("b")
    held = await rig.open(a)
    waiting = rig.start(rig.open(b, wait=LONG))
    await rig.changes.until(lambda: rig.waiting_clients() == [b])
    rig.manager.client_gone(b)
    with pytest.raises(Cancelled):
        await asyncio.wait_for(waiting, 1.0)
    assert rig.device.data_mode.waiting == []
    await rig.manager.close_session(held)
    rig.nothing_held()
    with pytest.raises(Cancelled):  # and it gets nothing later either
        await rig.open(b, Mode.STATUS)
    assert rig.manager.sessions_of("b") == []


@pytest.mark.parametrize("order", ["holder-released-first", "waiter-gone-first"])
async def test_holder_released_and_waiter_gone_in_the_same_step_leaves_nothing_held(rig, order):
    """The holder-and-waiter race, in-process: the holder's session closes and the
    waiter's client goes before the waiter's task runs again."""
    a, b = Client("a"), Client("b")
    held = await rig.open(a)
    waiting = rig.start(rig.open(b, wait=LONG))
    await rig.changes.until(lambda: rig.waiting_clients() == [b])
    if order == "holder-released-first":
        seen: list[tuple[Session | None, bool]] = []

        class Closed(Listener):
            def session_closed(self, session: Session) -> None:  # told once data mode is released
                if session is held:
                    seen.append((rig.device.data_holder, waiting.done()))
                    rig.manager.client_gone(b)

        rig.manager.listeners.append(Closed())
        await rig.manager.close_session(held)
        [(granted, resumed)] = seen
        assert granted is not None and granted.client is b and not resumed  # granted, not yet resumed
    else:
        rig.manager.client_gone(b)
        await rig.manager.close_session(held)
    with pytest.raises(Cancelled):
        await asyncio.wait_for(waiting, 1.0)
    rig.nothing_held()
    assert rig.manager.sessions_of("b") == []
    late = await rig.open(Client("c"), wait=0)  # free for the next one at once
    assert rig.device.data_holder is late


async def test_a_client_gone_while_being_granted_gets_nothing(rig):
    """Granted data mode, but still waiting for the lock file another program holds,
    when its client goes: it must let go of data mode and never take the file."""
    b = Client("b")
    with outside_holder(rig.device.lockfile.path) as let_go:
        waiting = rig.start(rig.open(b, wait=LONG))
        await rig.changes.until(lambda: rig.device.data_holder is not None
                                and rig.device.state == "held-by-program")
        rig.manager.client_gone(b)
        with pytest.raises(Cancelled):
            await asyncio.wait_for(waiting, 1.0)
        assert rig.device.data_holder is None and not rig.device.lockfile.held
        let_go()
        rig.nothing_held()


# -- the lock file ------------------------------------------------------------------------------------

async def test_the_lock_file_is_held_for_a_data_sessions_whole_life(rig):
    path = rig.device.lockfile.path
    watcher = await rig.open(Client("w"), Mode.STATUS)
    assert can_lock(path)  # status mode does not take the device from other programs
    await rig.device.get_status(watcher)
    assert can_lock(path)  # nor does a status call: the file is held only during it
    session = await rig.open(Client("a"), Mode.DATA)
    assert rig.device.lockfile.held and not can_lock(path)
    assert rig.device.device_lock.holder is None  # between calls too, not only under the device lock
    await rig.device.get_status(session)
    assert not can_lock(path)
    if FLOCK:
        proc = await asyncio.create_subprocess_exec(FLOCK, "-n", str(path), "true")
        assert await asyncio.wait_for(proc.wait(), LONG) == 1
    await rig.manager.close_session(session)
    assert can_lock(path) and not rig.device.lockfile.held


async def test_the_lock_file_is_let_go_when_the_data_session_s_client_goes(rig):
    a = Client("a")
    session = await rig.open(a)
    assert not can_lock(rig.device.lockfile.path)
    rig.manager.client_gone(a)
    await rig.changes.until(lambda: session.closed)
    rig.nothing_held()


async def test_an_outside_holder_makes_lock_and_create_session_busy_at_once_for_timeout_zero(rig):
    loop = asyncio.get_running_loop()
    with outside_holder(rig.device.lockfile.path):
        started = loop.time()
        with pytest.raises(Busy):
            await rig.device.lock(Hold("test"), 0)
        with pytest.raises(Busy):
            await rig.open(Client("a"), Mode.DATA, wait=0)
        assert loop.time() - started < 0.5  # no waiting for the file
        assert rig.device.state == "held-by-program"
        assert rig.device.device_lock.holder is None and rig.device.data_holder is None
        assert await rig.open(Client("a"), Mode.STATUS)  # status mode needs no device
    rig.nothing_held()


@pytest.mark.parametrize("how", ["device-lock", "data-mode"])
async def test_an_outside_holder_is_waited_for_up_to_the_timeout(rig, how):
    loop = asyncio.get_running_loop()
    with outside_holder(rig.device.lockfile.path):
        started = loop.time()
        with pytest.raises(Timeout):
            if how == "device-lock":
                await asyncio.wait_for(rig.device.lock(Hold("test"), 0.1), LONG)
            else:
                await asyncio.wait_for(rig.open(Client("a"), Mode.DATA, wait=0.1), LONG)
        assert 0.095 <= loop.time() - started < 1.0
        assert rig.device.device_lock.holder is None and rig.device.data_holder is None
    rig.nothing_held()


@pytest.mark.parametrize("how", ["device-lock", "data-mode"])
async def test_an_outside_holder_letting_go_ends_the_wait(rig, how):
    owner = Hold("test")
    with outside_holder(rig.device.lockfile.path) as let_go:
        if how == "device-lock":
            waiting = rig.start(rig.device.lock(owner, LONG))
            await rig.changes.until(lambda: rig.device.device_lock.holder is owner
                                    and rig.device.state == "held-by-program")
        else:
            waiting = rig.start(rig.open(Client("a"), Mode.DATA, wait=LONG))
            await rig.changes.until(lambda: rig.device.data_holder is not None
                                    and rig.device.state == "held-by-program")
        assert not waiting.done()
        let_go()
        result = await asyncio.wait_for(waiting, LONG)
    assert rig.device.lockfile.held and not can_lock(rig.device.lockfile.path)
    assert rig.device.state == "ready"
    if how == "device-lock":
        await rig.device.unlock(owner)
    else:
        await rig.manager.close_session(result)
    rig.nothing_held()


# -- what status sessions may not do ------------------------------------------------------------

async def test_status_sessions_are_refused_data_io_and_subscribe_before_anything_is_locked(rig):
    status = await rig.open(Client("s"), Mode.STATUS)
    blocker = Hold("blocker")
    await rig.device.lock(blocker, 1.0)  # a call that tried to lock would now wait io_wait_ms (2 s)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AccessDenied):
        await rig.device.read_data(status, 16)
    with pytest.raises(AccessDenied):
        await rig.device.write_data(status, b"data")
    with pytest.raises(AccessDenied):
        status.subscribe()
    assert loop.time() - started < 0.5 and not status.subscribed
    assert rig.device.device_lock.holder is blocker and rig.device.device_lock.waiting == []
    status.subscribe(False)  # saying no is always allowed
    await rig.device.unlock(blocker)
    assert await rig.device.read_command(status, 3) == b"OK\n"  # command I/O is for status sessions too

    data = await rig.open(Client("d"), Mode.DATA)
    assert await rig.device.read_data(data, 4) == bytes(range(4))
    await rig.device.write_data(data, b"data")
    data.subscribe()
    assert data.subscribed


# -- the device lock changing hands while it is being taken ------------------------------------------

class GatedScanner(SimulatedScanner):
    """The simulated scanner with a driver lock state, as a shared-port driver has
    (lock opens the port, unlock closes it), and a gate to hold ``lock`` on the
    worker thread."""

    name = "gated"

    def __init__(self, config, host) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, host)
        self.gate = threading.Event()
        self.gate.set()
        self.locked = False
        self.calls: list[str] = []
        self.entered: Callable[[], None] = lambda: None

    def lock(self, mode: Mode) -> None:
        self.calls.append("lock")
        self.entered()
        self.gate.wait(LONG)
        self.locked = True

    def unlock(self) -> None:
        self.calls.append("unlock")
        self.locked = False

    def get_status(self, mode: Mode) -> dict[str, Any]:
        return {**super().get_status(mode), "driver_locked": self.locked}


async def test_a_lock_given_up_while_the_driver_locks_does_not_unlock_the_next_holder(tmp_path):
    manager = DeviceManager(make_config(tmp_path), drivers={"gated": GatedScanner})
    changes = Changes()
    manager.listeners.append(changes)
    tasks: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()
    try:
        device = await manager.add_device(DeviceConfig(id="gated0", driver="gated"))
        driver: GatedScanner = device.driver  # type: ignore[assignment]
        h, s, t = [await manager.create_session("gated0", Mode.STATUS, Client(n)) for n in "hst"]
        await device.lock(h, 1.0)
        tasks.append(asyncio.ensure_future(device.lock(s, LONG)))
        tasks.append(asyncio.ensure_future(device.lock(t, LONG)))
        await changes.until(lambda: device.device_lock.waiting == [s, t])
        inside = asyncio.Event()
        driver.entered = lambda: loop.call_soon_threadsafe(inside.set)
        driver.gate.clear()
        await device.unlock(h)  # s is granted; its driver.lock starts and is held at the gate
        await asyncio.wait_for(inside.wait(), LONG)
        closing = asyncio.ensure_future(manager.close_session(s))  # s goes while its driver.lock runs
        tasks.append(closing)
        with contextlib.suppress(TimeoutError):  # a core that makes t wait for s's driver.lock is fine
            await changes.until(lambda: device.device_lock.holder is t, timeout=0.5)
        driver.gate.set()
        await asyncio.wait_for(closing, LONG)
        await asyncio.wait_for(tasks[1], LONG)  # t holds the device lock, its driver.lock done
        results = await asyncio.gather(tasks[0], return_exceptions=True)
        assert isinstance(results[0], Exception)
        status = await device.get_status(t)
        assert device.device_lock.holder is t
        assert status["driver_locked"], f"t holds the device lock, the driver is unlocked: {driver.calls}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await manager.stop()
