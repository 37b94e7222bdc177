"""The device manager: the devices (from discovery, through the matcher), the
sessions and their limits, clients that leave, routing each event to exactly one
consumer, and telling the listeners (:mod:`stillsvc.core.listener`) what changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog

from stillsvc.common.errors import (
    Cancelled,
    Disconnected,
    Failed,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    StillError,
    quote,
)
from stillsvc.common.names import sanitise_id
from stillsvc.core.config import Config, DeviceConfig
from stillsvc.core.devices import Device
from stillsvc.core.listener import Listener
from stillsvc.core.routing import Outcome
from stillsvc.core.sessions import Client, EventRecord, Session
from stillsvc.driver import Candidate, DeviceEvent, Minidriver, Mode, match

if TYPE_CHECKING:
    from stillsvc.discovery import Backend

log = structlog.get_logger(__name__)

#: How long a driver may take to initialise at start before the service goes on without it.
DEVICE_START_TIMEOUT = 15.0


class _Host:
    """The DriverHost given to each driver: hops from driver threads to the loop."""

    def __init__(self, manager: DeviceManager, device_id: str) -> None:
        self.manager = manager
        self.device_id = device_id
        self.loop = manager.loop

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def emit_event(self, event: DeviceEvent) -> None:
        self._post(self.manager.driver_event, self.device_id, event)

    def device_unplugged(self) -> None:
        self._post(self.manager.unplugged_by_driver, self.device_id)

    def device_replugged(self) -> None:
        self._post(self.manager.replugged_by_driver, self.device_id)


class DeviceManager:
    """The devices and sessions. Devices come from discovery backends as candidates
    (:meth:`found`, :meth:`lost`); the matcher picks each one's driver from
    ``drivers`` (name → class, as :func:`stillsvc.drivers.discover` finds them)."""

    def __init__(self, config: Config, drivers: dict[str, type[Minidriver]]) -> None:
        self.config = config
        self.limits = config.limits
        self.drivers = drivers
        self.devices: dict[str, Device] = {}
        #: Devices whose driver reported them unplugged: the driver (and its worker)
        #: is kept, for the driver may report the device back (device_replugged).
        self.unplugged: dict[str, tuple[DeviceConfig, Minidriver, ThreadPoolExecutor]] = {}
        self.backends: list[Backend] = []
        self.sessions: dict[int, Session] = {}
        self.listeners: list[Listener] = []
        #: Chooses the consumer of an event no data-mode session takes (the event
        #: monitor sets it); returns a description of the consumer, or an awaitable
        #: of one when delivering takes a while (asking an agent).
        self.launcher: Callable[[Device, EventRecord], Outcome | Awaitable[Outcome]] | None = None
        self._pending: dict[str, int] = {}
        #: Devices that went away while application items still linked their items.
        self.departed: dict[str, list[Device]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loop = asyncio.get_running_loop()

    # -- plumbing ---------------------------------------------------------------
    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; its failure is logged, never lost."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def notify(self, method: str, *args: Any) -> None:
        """Tell every listener (one failing listener does not stop the others)."""
        for listener in list(self.listeners):
            try:
                getattr(listener, method)(*args)
            except Exception:
                log.exception("listener failed", listener=type(listener).__name__, notification=method)

    def changed(self, device: Device, names: list[str]) -> None:
        self.notify("device_changed", device, names)

    # -- discovery ----------------------------------------------------------------
    async def found(self, candidate: Candidate) -> None:
        """A backend found a device: match its driver and add it. Failures are logged,
        never raised: one bad device must not stop the others."""
        cls = match(self.drivers, candidate)
        if cls is None:
            what = f"no driver named {quote(candidate.driver)}" if candidate.driver else "no driver matches it"
            log.error("device not added", device=candidate.id, subsystem=candidate.subsystem, reason=what,
                      installed=sorted(self.drivers))
            return
        try:
            await asyncio.wait_for(self.add_device(candidate.config(cls.name)), DEVICE_START_TIMEOUT)
        except StillError as e:
            log.error("device not added", device=candidate.id, error=e.message)
        except TimeoutError:
            log.error("device not added: its driver did not initialise in time", device=candidate.id,
                      timeout_s=DEVICE_START_TIMEOUT)

    async def lost(self, candidate_id: str) -> None:
        await self.remove_device(candidate_id)

    # -- devices ----------------------------------------------------------------
    def driver_of(self, device_id: str) -> Minidriver | None:
        """The driver of a present device, or of one its driver reported unplugged
        (it may report it back); None otherwise."""
        device = self.devices.get(device_id)
        if device is not None:
            return device.driver
        entry = self.unplugged.get(device_id)
        return entry[1] if entry else None

    async def add_device(self, config: DeviceConfig, driver: Minidriver | None = None,
                         executor: ThreadPoolExecutor | None = None) -> Device:
        if config.id in self.devices:
            raise InvalidArgument(f"device id {quote(config.id)} is already in use")
        path_element = sanitise_id(config.id)
        if any(sanitise_id(other) == path_element for other in self.devices):
            raise InvalidArgument(f"device id {quote(config.id)} clashes with another id's object path")
        if driver is None:
            cls = self.drivers.get(config.driver)
            if cls is None:
                raise NotFound(f"no driver named {quote(config.driver)} (installed: {', '.join(sorted(self.drivers))})")
            driver = cls(config, _Host(self, config.id))
        if executor is None:
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"device-{path_element}")
        loop = asyncio.get_running_loop()
        step = "initialise"
        try:
            info = await loop.run_in_executor(executor, driver.initialize, config.port, Mode.STATUS)
            step = "build its item tree"
            tree = await loop.run_in_executor(executor, driver.build_item_tree)
        except Exception as e:
            log.error(f"device failed to {step}", device=config.id, driver=config.driver, error=str(e))
            if config.id not in self.unplugged:  # a driver kept for replugging keeps its worker
                executor.shutdown(wait=False)
            raise Failed(f"device {config.id} failed to {step}: {e}") from e
        device = Device(self, config, driver, info, executor)
        device.adopt_tree(tree)
        self.devices[config.id] = device
        self.unplugged.pop(config.id, None)
        device.log.info("device added", driver=driver.name, name=info.name)
        self.notify("device_added", device)
        return device

    def check_string(self, value: str, what: str) -> None:
        """Refuse a client's string longer than ``service.max_string_length``."""
        if len(value) > self.limits.max_string_length:
            raise InvalidArgument(f"{what} is too long ({len(value)} characters, at most "
                                  f"{self.limits.max_string_length})")

    def get(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {quote(device_id)}")
        return device

    async def remove_device(self, device_id: str, *, keep_driver: bool = False) -> None:
        device = self.devices.pop(device_id, None)
        if device is None:
            return
        device.mark_disconnected()
        for session in list(device.sessions):
            for job in list(session.jobs):
                job.stop("the device was disconnected", Disconnected)
        if device.tree is not None:
            device.tree.remove()  # -1 for every item; linked ones live on, marked
        for fair in (device.data_mode, device.device_lock):
            for waiter in fair.waiting:
                fair.discard(waiter, Disconnected(f"device {device_id} has been disconnected"))
        device.lockfile.close()
        if device.live_items:
            self.departed.setdefault(device_id, []).append(device)
        if keep_driver:
            self.unplugged[device_id] = (device.config, device.driver, device.executor)
        device.log.info("device removed")
        self.notify("device_removed", device)
        if not keep_driver:
            try:
                await device.call(device.driver.shutdown)
            except Exception as e:
                device.log.warning("driver shutdown failed", error=str(e))
            device.executor.shutdown(wait=False)

    def unplugged_by_driver(self, device_id: str) -> None:
        self.spawn(self.remove_device(device_id, keep_driver=True))

    def replugged_by_driver(self, device_id: str) -> None:
        self.spawn(self.replug(device_id))

    async def replug(self, device_id: str) -> Device:
        entry = self.unplugged.get(device_id)
        if entry is None:
            raise NotFound(f"device {quote(device_id)} is not unplugged")
        config, driver, executor = entry
        return await self.add_device(config, driver, executor)

    def item_report(self, device_id: str) -> list[dict[str, Any]]:
        """Every live driver item of ``device_id``: the present device's tree and
        what is left of earlier ones (unplugged, still linked by application items)."""
        report: list[dict[str, Any]] = []
        earlier = [d for d in self.departed.get(device_id, []) if d.live_items]
        self.departed[device_id] = earlier
        for generation, device in enumerate(earlier):
            report += [{**entry, "present": False, "generation": generation} for entry in device.item_report()]
        present = self.devices.get(device_id)
        if present is not None:
            report += [{**entry, "present": True, "generation": len(earlier)} for entry in present.item_report()]
        elif not earlier:
            raise NotFound(f"no device {quote(device_id)}")
        return report

    # -- sessions ---------------------------------------------------------------
    def sessions_of(self, client_name: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.client.name == client_name]

    async def create_session(self, device_id: str, mode: Mode, client: Client, wait: float = 0.0) -> Session:
        """Open ``device_id`` for ``client``. Data mode is waited for in line (and then
        for another program holding the lock file) up to ``wait`` seconds in all; the
        lock file stays held for as long as the session has data mode."""
        if client.gone:
            raise Cancelled(f"client {client.name} has gone")
        device = self.get(device_id)
        device.check_usable()
        if not client.internal:
            mine = len(self.sessions_of(client.name)) + self._pending.get(client.name, 0)
            if mine >= self.limits.max_sessions_per_client:
                raise LimitExceeded(f"a client may have at most {self.limits.max_sessions_per_client} sessions")
            open_sessions = sum(1 for s in self.sessions.values() if not s.client.internal)
            if open_sessions + sum(self._pending.values()) >= self.limits.max_sessions:
                raise LimitExceeded(f"the service has reached its limit of {self.limits.max_sessions} sessions")
        session = Session(device, client, mode, self.limits.event_queue_length)
        self._pending[client.name] = self._pending.get(client.name, 0) + 1
        try:
            if mode & Mode.DATA:
                deadline = self.loop.time() + wait
                await device.data_mode.acquire(session, wait)
                try:
                    await device.take_lockfile(lambda: device.data_mode.holder is session and session.alive,
                                               deadline, wait)
                except BaseException:
                    self._give_up_data_mode(device, session)
                    raise
        finally:
            self._pending[client.name] -= 1
            if not self._pending[client.name]:
                del self._pending[client.name]
        if device.disconnected or device_id not in self.devices:
            self._give_up_data_mode(device, session)
            raise Disconnected(f"device {device_id} has been disconnected")
        if not session.alive:
            # The client left while it waited: nothing may be kept for it.
            self._give_up_data_mode(device, session)
            raise Cancelled(f"client {client.name} has gone")
        self.sessions[session.number] = session
        device.sessions.add(session)
        log.info("session opened", device=device_id, session=session.number, client=client.name, via=client.via,
                 mode=mode.label)
        if mode & Mode.DATA:
            self.changed(device, ["DataModeHolder"])
        return session

    @staticmethod
    def _give_up_data_mode(device: Device, session: Session) -> None:
        if device.data_mode.holder is session:
            device.data_mode.release(session)
        device.settle_lockfile()

    async def close_session(self, session: Session, why: str = "closed") -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.number, None)
        device = session.device
        device.sessions.discard(session)
        for job in list(session.jobs):
            job.stop("the session was closed")
        if device.device_lock.holder is session:
            await device.unlock(session)
        device.device_lock.discard(session, NotFound(f"session {session.number} is closed"))
        held_data = device.data_mode.discard(session, NotFound(f"session {session.number} is closed"))
        device.settle_lockfile()
        device.undelivered(session.drop_queue(), f"left in the queue of a closed session ({why})",
                           session=session.number, client=session.client.name)
        session.release_fds()
        if session.root_item is not None:
            session.root_item.release()  # -1 on each linked driver item; at 0 it is destroyed
        log.info("session closed", device=session.device_id, session=session.number,
                 client=session.client.name, why=why)
        self.notify("session_closed", session)
        if held_data and not device.disconnected:
            self.changed(device, ["DataModeHolder"])

    def client_gone(self, client: Client) -> None:
        """The client has left (its connection closed): from this instant nothing is
        granted to it — its waits fail now, a grant in flight is refused — and
        everything it had is closed."""
        client.gone = True
        for device in list(self.devices.values()):
            for fair in (device.data_mode, device.device_lock):
                for waiter in fair.waiting:
                    if _client_of(waiter) is client:
                        fair.discard(waiter, Cancelled(f"client {client.name} has gone"))
        self.notify("client_gone", client)
        self.spawn(self._close_sessions_of(client))

    async def _close_sessions_of(self, client: Client) -> None:
        # Its waits were failed above, and a gone client can wait for nothing new.
        for session in self.sessions_of(client.name):
            await self.close_session(session, why="client left the bus")

    # -- events -----------------------------------------------------------------
    def driver_event(self, device_id: str, event: DeviceEvent) -> None:
        """A driver reported ``event`` (on the loop): route it to exactly one consumer."""
        device = self.devices.get(device_id)
        if device is None:
            log.warning("event from a device that is gone", device=device_id, event_name=event.name)
            return
        record = device.record_event(event)
        outcome = self.route(device, record)
        if isinstance(outcome, Outcome):
            self.notify("event_routed", device, record, outcome)
        else:
            self.spawn(self._routed_later(device, record, outcome))

    async def _routed_later(self, device: Device, record: EventRecord, outcome: Awaitable[Outcome]) -> None:
        self.notify("event_routed", device, record, await outcome)

    def route(self, device: Device, record: EventRecord) -> Outcome | Awaitable[Outcome]:
        """Deliver ``record`` to exactly one consumer; returns who took it (or, when
        the launcher must ask someone first, an awaitable that does)."""
        holder = device.data_holder
        if holder is not None and holder in device.sessions and not device.standing_back:
            dropped = holder.queue_event(record)
            if holder.subscribed:
                self.notify("event_queued", holder, record)
            device.undelivered(dropped, "event queue full, dropped the oldest", session=holder.number,
                               client=holder.client.name, dropped=holder.events_dropped)
            return Outcome.queued(holder.number, holder.client.name)
        if device.held_by_program():
            device.undelivered(1, "the device is held by another program", level="info",
                               event_name=record.name, sequence=record.sequence)
            return Outcome.nobody("held by another program")
        if self.launcher is not None:
            return self.launcher(device, record)
        device.undelivered(1, "no application registered", level="info", event_name=record.name,
                           sequence=record.sequence)
        return Outcome.nobody("no application registered")

    # -- lifetime -----------------------------------------------------------------
    async def start(self, backends: list[Backend]) -> None:
        """Start the discovery backends (this manager is their sink); returns once the
        devices present at start are added, or were logged as failing."""
        self.backends = list(backends)
        for backend in self.backends:
            try:
                await backend.start(self)
            except Exception:
                log.exception("discovery backend failed to start", backend=backend.name)

    async def stop(self) -> None:
        for backend in self.backends:
            try:
                await backend.stop()
            except Exception:
                log.exception("discovery backend failed to stop", backend=backend.name)
        for session in list(self.sessions.values()):
            await self.close_session(session, why="service stopping")
        for device_id in list(self.devices):
            await self.remove_device(device_id)
        for _config, _driver, executor in self.unplugged.values():
            executor.shutdown(wait=False)
        self.unplugged.clear()
        for task in list(self._tasks):
            task.cancel()


def _client_of(owner: Any) -> Client | None:
    """The client a lock owner (a session, or a hold for one) works for."""
    session = owner if isinstance(owner, Session) else getattr(owner, "session", None)
    return session.client if isinstance(session, Session) else None



__all__ = ["DeviceManager"]
