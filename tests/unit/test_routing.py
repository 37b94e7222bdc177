"""Event routing in a DeviceManager running in this process with the simulated
scanner, no bus: every event to exactly one consumer — the data-mode holder's
queue if a session holds data mode, otherwise the launcher (a fake callable here,
the EventMonitor in the service) — never both; nobody while another program
holds the device; and every event that reaches nobody is counted in
``Device.events_undelivered`` (UndeliveredEvents): no consumer, a full queue, a
queue left unread by a session that closed.

Events come from the driver (the simulator's buttons), as in the service; each
test waits for the manager's report of where an event went (``event_routed``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stillsvc.common.errors import Empty
from stillsvc.core.agents import Agent, Agents
from stillsvc.core.config import Config, DeviceConfig, Limits
from stillsvc.core.devices import Device
from stillsvc.core.events import EventMonitor
from stillsvc.core.listener import Listener
from stillsvc.core.manager import DeviceManager
from stillsvc.core.registry import Registry
from stillsvc.core.routing import Consumer, Outcome
from stillsvc.core.sessions import Client, EventRecord, Session
from stillsvc.driver import Mode
from stillsvc.drivers.sim import SimulatedScanner

TIMEOUT = 5.0
QUEUE_LENGTH = 3
ME = os.getuid()


class Routed(Listener):
    def __init__(self) -> None:
        self.routed: asyncio.Queue[tuple[EventRecord, str]] = asyncio.Queue()
        self.changed: list[str] = []
        self.event = asyncio.Event()
        self.queued: list[tuple[Session, EventRecord]] = []
        self.outcomes: list[Outcome] = []

    def event_routed(self, device: Device, record: EventRecord, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.routed.put_nowait((record, str(outcome)))  # as the D-Bus front-end renders it

    def device_changed(self, device: Device, names: list[str]) -> None:
        self.changed += names
        self.event.set()

    def session_closed(self, session: Session) -> None:
        self.event.set()

    def event_queued(self, session: Session, record: EventRecord) -> None:
        self.queued.append((session, record))

    async def next(self) -> tuple[EventRecord, str]:
        return await asyncio.wait_for(self.routed.get(), TIMEOUT)

    async def until(self, predicate, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while not predicate():
                self.event.clear()
                await self.event.wait()


class Launcher:
    """A fake launcher: records what it is given and says it launched it."""

    def __init__(self) -> None:
        self.calls: list[EventRecord] = []

    def __call__(self, device: Device, record: EventRecord) -> Outcome:
        self.calls.append(record)
        return Outcome.launched("fake", f"fake for {record.name} #{record.sequence}")


class Rig:
    def __init__(self, manager: DeviceManager, device: Device, routed: Routed, launcher: Launcher) -> None:
        self.manager = manager
        self.device = device
        self.routed = routed
        self.launcher = launcher

    def press(self, button: str = "scan") -> None:
        """A button press on the simulated device: the driver emits the event."""
        self.device.driver.simulate("press_button", button=button)

    async def open(self, name: str, mode: Mode = Mode.DATA) -> Session:
        return await self.manager.create_session(self.device.id, mode, Client(name))


@contextmanager
def outside_holder(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def config_for(tmp_path: Path) -> Config:
    return Config(limits=Limits(event_queue_length=QUEUE_LENGTH), runtime_dir=str(tmp_path / "run"),
                  state_dir=str(tmp_path / "state"))


@pytest.fixture
async def rig(tmp_path):
    manager = DeviceManager(config_for(tmp_path), drivers={"sim": SimulatedScanner})
    routed = Routed()
    launcher = Launcher()
    manager.listeners.append(routed)
    manager.launcher = launcher
    try:
        device = await manager.add_device(DeviceConfig(id="sim0", driver="sim"))
        yield Rig(manager, device, routed, launcher)
    finally:
        await manager.stop()


# -- exactly one consumer -----------------------------------------------------------------------

async def test_without_a_data_mode_holder_the_launcher_gets_the_event(rig):
    watcher = await rig.open("watcher", Mode.STATUS)
    rig.press("scan")
    record, consumer = await rig.routed.next()
    assert (record.name, record.sequence, record.device_id) == ("scan-button", 1, "sim0")
    assert record.data == {"button": "scan"}
    assert consumer == "launch: fake for scan-button #1"
    assert rig.launcher.calls == [record]
    assert list(watcher.events) == []  # status sessions never get events
    assert rig.device.events_undelivered == 0


async def test_the_data_mode_holder_gets_the_event_in_its_queue_and_the_launcher_nothing(rig):
    watcher = await rig.open("watcher", Mode.STATUS)
    holder = await rig.open("holder", Mode.DATA)
    holder.subscribe()
    rig.press("copy")
    record, consumer = await rig.routed.next()
    assert consumer == f"queue: session {holder.number} (holder)"
    assert rig.routed.outcomes[-1] == Outcome(Consumer.QUEUE, f"session {holder.number} (holder)",
                                              session=holder.number)
    assert rig.routed.queued == [(holder, record)]
    assert holder.next_event() == record
    with pytest.raises(Empty):
        holder.next_event()
    assert rig.launcher.calls == [] and list(watcher.events) == []
    assert rig.device.events_undelivered == 0


async def test_an_unsubscribed_holder_still_gets_the_event_queued_without_being_told(rig):
    holder = await rig.open("holder", Mode.BOTH)
    rig.press("email")
    _record, consumer = await rig.routed.next()
    assert consumer.startswith(f"queue: session {holder.number} ")
    assert rig.routed.queued == [] and [e.name for e in holder.events] == ["email-button"]
    assert rig.launcher.calls == []


async def test_each_event_goes_to_exactly_one_consumer_as_data_mode_comes_and_goes(rig):
    rig.press()
    holder = await rig.open("holder")
    rig.press()
    await rig.manager.close_session(holder)
    rig.press()
    consumers = [(await rig.routed.next()) for _ in range(3)]
    assert [(r.sequence, c.split(":")[0]) for r, c in consumers] == [(1, "launch"), (2, "queue"), (3, "launch")]
    assert [r.sequence for r in rig.launcher.calls] == [1, 3]
    assert rig.routed.routed.empty()  # and no event was reported twice
    # The queued one was left unread when the session closed: counted, not lost silently.
    assert rig.device.events_undelivered == 1


async def test_a_launcher_that_takes_a_while_reports_where_the_event_went_when_it_is_done(rig):
    gate = asyncio.Event()
    calls: list[EventRecord] = []

    def slow(device: Device, record: EventRecord) -> Awaitable[str]:
        calls.append(record)

        async def deliver() -> str:
            await gate.wait()
            return Outcome.launched("fake", "after asking")

        return deliver()

    rig.manager.launcher = slow
    rig.press()
    assert len(calls) == 1 and rig.routed.routed.empty()  # routed, not yet reported
    gate.set()
    record, consumer = await rig.routed.next()
    assert (record, consumer) == (calls[0], "launch: after asking")


# -- nobody ------------------------------------------------------------------------------------------

async def test_while_another_program_holds_the_lock_file_nobody_gets_the_event(rig):
    with outside_holder(rig.device.lockfile.path):
        rig.press()
        _record, consumer = await rig.routed.next()
        assert consumer == "none: held by another program"
        assert rig.device.state == "held-by-program"
    assert rig.launcher.calls == []
    assert rig.device.events_undelivered == 1 and "UndeliveredEvents" in rig.routed.changed


async def test_while_the_device_is_handed_over_nobody_gets_the_event_not_even_the_holder(rig):
    holder = await rig.open("holder")
    await rig.device.lock(holder, 1.0)
    fd = await rig.device.hand_over(holder)
    try:
        assert rig.device.standing_back and rig.device.state == "held-by-program"
        rig.press()
        _record, consumer = await rig.routed.next()
        assert consumer == "none: held by another program"
        assert list(holder.events) == [] and rig.launcher.calls == []
        assert rig.device.events_undelivered == 1
    finally:
        os.close(fd)
        await rig.manager.close_session(holder)  # its own copy of the descriptor goes too
    await rig.routed.until(lambda: not rig.device.standing_back)  # the service takes the device back
    rig.press()
    _record, consumer = await rig.routed.next()
    assert consumer.startswith("launch: ")


async def test_with_no_launcher_the_event_is_counted_undelivered(rig):
    rig.manager.launcher = None
    rig.press()
    rig.press()
    for sequence in (1, 2):
        record, consumer = await rig.routed.next()
        assert (record.sequence, consumer) == (sequence, "none: no application registered")
    assert rig.device.events_undelivered == 2
    assert rig.routed.changed.count("UndeliveredEvents") == 2


# -- UndeliveredEvents for queued events -----------------------------------------------------------

async def test_a_full_queue_drops_the_oldest_and_counts_it(rig):
    holder = await rig.open("holder")
    for _ in range(QUEUE_LENGTH + 2):
        rig.press()
    for _ in range(QUEUE_LENGTH + 2):
        _record, consumer = await rig.routed.next()
        assert consumer.startswith("queue: ")
    assert [e.sequence for e in holder.events] == [3, 4, 5]
    assert holder.events_dropped == 2
    assert rig.device.events_undelivered == 2 and "UndeliveredEvents" in rig.routed.changed
    assert rig.launcher.calls == []


@pytest.mark.parametrize("how", ["closed", "client-gone"])
async def test_events_left_unread_in_a_closing_session_are_counted(rig, how):
    holder = await rig.open("holder")
    for _ in range(3):
        rig.press()
    for _ in range(3):
        await rig.routed.next()
    assert holder.next_event().sequence == 1  # read: delivered
    assert rig.device.events_undelivered == 0
    if how == "closed":
        await rig.manager.close_session(holder)
    else:
        rig.manager.client_gone(holder.client)
        await rig.routed.until(lambda: holder.closed)
    assert rig.device.events_undelivered == 2
    assert rig.launcher.calls == []


async def test_closing_sessions_with_empty_queues_counts_nothing(rig):
    watcher = await rig.open("watcher", Mode.STATUS)
    holder = await rig.open("holder")
    rig.press()
    await rig.routed.next()
    holder.next_event()
    await rig.manager.close_session(holder)
    await rig.manager.close_session(watcher)
    assert rig.device.events_undelivered == 0


# -- the event monitor as the launcher --------------------------------------------------------------

@pytest.fixture
async def monitored(rig, tmp_path):
    registry = Registry(str(tmp_path / "state"), rig.manager.limits)
    launched: list[tuple[str, str]] = []
    asked = asyncio.Event()
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def launch(request) -> int:  # type: ignore[no-untyped-def]
        launched.append((request.registration.name, request.event))
        return 4242

    async def choose(request) -> str:  # type: ignore[no-untyped-def]
        asked.set()
        return await answer

    agents = Agents()
    agents.add(Agent(owner=":agent", path="/agent", uid=ME, description="test agent", launch=launch, choose=choose))
    monitor = EventMonitor(rig.manager, registry, agents)
    monitor.start()
    try:
        assert rig.manager.launcher == monitor.launch
        yield monitor, registry, launched, asked, answer
    finally:
        monitor.stop()


async def test_the_monitor_counts_an_event_no_application_is_registered_for(rig, monitored):
    _monitor, _registry, launched, _asked, _answer = monitored
    rig.press()
    _record, consumer = await rig.routed.next()
    assert consumer == "none: no application registered"
    assert launched == [] and rig.device.events_undelivered == 1


async def test_the_monitor_launches_one_application_for_an_event_nobody_holds_data_mode_for(rig, monitored):
    _monitor, registry, launched, _asked, _answer = monitored
    await registry.register(ME, "scan-app", ["scan-app", "%d"], ["scan-button"], ["id:sim0"])
    rig.press()
    _record, consumer = await rig.routed.next()
    assert consumer.startswith("launch: scan-app via agent test agent")
    assert launched == [("scan-app", "scan-button")]


async def test_data_mode_taken_while_an_agent_chooses_gets_the_event_and_nothing_is_launched(rig, monitored):
    _monitor, registry, launched, asked, answer = monitored
    for name in ("first-app", "second-app"):
        await registry.register(ME, name, [name], ["scan-button"], ["id:sim0"])
    rig.press()
    await asyncio.wait_for(asked.wait(), TIMEOUT)  # two candidates: the agent is asked
    holder = await rig.open("late-holder")
    answer.set_result("first-app")
    record, consumer = await rig.routed.next()
    assert consumer == f"queue: session {holder.number} (late-holder)"
    assert holder.next_event() == record
    assert launched == []
    assert rig.device.events_undelivered == 0
