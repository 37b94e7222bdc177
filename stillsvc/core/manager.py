"""The device manager: the devices (from discovery, through the matcher), the
sessions and their limits, clients that leave, routing each event to exactly one
consumer, and telling the listeners (:mod:`stillsvc.core.listener`) what changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from stillsvc.common.errors import (
    Busy,
    Cancelled,
    Disconnected,
    Failed,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    NotSupported,
    StillError,
    quote,
)
from stillsvc.common.names import sanitise_id
from stillsvc.core.config import Config, DeviceConfig
from stillsvc.core.devices import Device
from stillsvc.core.listener import Listener
from stillsvc.core.routing import Outcome
from stillsvc.core.sessions import Client, EventRecord, Session
from stillsvc.driver import Candidate, DeviceEvent, DeviceInfo, Minidriver, Mode, match
from stillsvc.driver.items import DriverItem

if TYPE_CHECKING:
    from stillsvc.discovery import Backend

log = structlog.get_logger(__name__)

#: How long a driver may take to initialise before the device is shown as failed.
DEVICE_START_TIMEOUT = 15.0
#: How long a driver may take to shut down when its device goes.
DEVICE_STOP_TIMEOUT = 5.0
#: Starting again a device another program had: the first wait, doubling up to the last (seconds).
BUSY_RETRY_FIRST = 1.0
BUSY_RETRY_MAX = 30.0
#: Bringing back a device whose driver reported it failed: the first wait, doubling up to the last (seconds).
RECOVER_FIRST = 0.2
RECOVER_MAX = 30.0


@dataclass
class CandidateEntry:
    """A candidate and what became of it: ``status`` is "added" (``device_id`` is
    present), "failed" (``reason`` says why; the device is shown failed when it
    has an id) or "unmatched" (no driver; ``reason`` says why)."""

    candidate: Candidate
    driver: str = ""
    device_id: str = ""
    status: str = "unmatched"
    reason: str = ""

    def describe(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "id": c.id, "subsystem": c.subsystem, "port": c.port, "name": c.name, "vendor": c.vendor,
            "model": c.model, "serial": c.serial,
            "vendor_id": f"{c.vendor_id:04x}" if c.vendor_id is not None else "",
            "product_id": f"{c.product_id:04x}" if c.product_id is not None else "",
            "interfaces": [f"{a:02x}{b:02x}{p:02x}" for a, b, p in c.interfaces],
            "driver": self.driver, "device_id": self.device_id, "status": self.status, "reason": self.reason,
        }


def _placeholder_info(candidate: Candidate, config: DeviceConfig) -> DeviceInfo:
    """What a failed device shows: what discovery knows of it."""
    return DeviceInfo(name=candidate.name or config.id, vendor=candidate.vendor, model=candidate.model,
                      serial=candidate.serial)


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
        self._post(self.manager.event_by_driver, self.device_id, event)

    def device_unplugged(self) -> None:
        self._post(self.manager.unplugged_by_driver, self.device_id)

    def device_replugged(self) -> None:
        self._post(self.manager.replugged_by_driver, self.device_id)

    def device_failed(self, reason: str) -> None:
        self._post(self.manager.failed_by_driver, self.device_id, reason)

    def tree_changed(self, event: DeviceEvent | None = None) -> None:
        self._post(self.manager.tree_changed_by_driver, self.device_id, event)


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
        #: What the backends reported, by candidate id (candidate_report()).
        self.candidates: dict[str, CandidateEntry] = {}
        #: How many times each device id has appeared (Device.generation).
        self.generations: dict[str, int] = {}
        #: Ids of devices whose driver is being started (found()): taken already.
        self._starting: set[str] = set()
        #: Devices another program had when they were started: attempts so far.
        self._busy_retries: dict[str, int] = {}
        #: Tree changes drivers reported while their device was being brought up.
        self._early_changes: dict[str, list[DeviceEvent | None]] = {}
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
        """A backend found a device, or tells what it knows of it now (a udev
        ``change``): match its driver and add it, retry it when it had failed,
        and leave a working device alone. Failures are logged and shown, never
        raised: one bad device must not stop the others."""
        entry = self.candidates.get(candidate.id)
        present = self.devices.get(entry.device_id) if entry is not None and entry.device_id else None
        cls = match(self.drivers, candidate)
        if cls is None:
            if present is not None:
                await self.remove_device(present.id)
            reason = self._unmatched_reason(candidate)
            self.candidates[candidate.id] = CandidateEntry(candidate, status="unmatched", reason=reason)
            if candidate.driver:  # a configured device whose driver is missing is a mistake
                log.error("device not added", device=candidate.id, reason=reason, installed=sorted(self.drivers))
            else:
                log.debug("device ignored", candidate=candidate.id, subsystem=candidate.subsystem, reason=reason)
            return
        if present is not None and not present.failure and present.driver.name == cls.name:
            entry.candidate = candidate  # working: a change leaves it alone
            return
        config = candidate.config(cls.name)
        try:
            self._check_id(config.id, present)
        except InvalidArgument as e:
            log.error("device not added", candidate=candidate.id, error=e.message)
            self.candidates[candidate.id] = CandidateEntry(candidate, cls.name, status="failed", reason=e.message)
            return
        entry = CandidateEntry(candidate, cls.name, config.id, "added")
        self.candidates[candidate.id] = entry
        self._starting.add(config.id)
        try:
            await self._bring_up(candidate, entry, config, cls, present)
        finally:
            self._starting.discard(config.id)
            self._early_changes.pop(config.id, None)

    async def _bring_up(self, candidate: Candidate, entry: CandidateEntry, config: DeviceConfig,
                        cls: type[Minidriver], present: Device | None) -> None:
        """Start a driver for ``candidate``; the device replaces ``present`` (a failed
        one, or one of another driver). A driver that fails makes a failed device."""
        kept = self.unplugged.pop(config.id, None)
        if kept is not None:  # its driver had reported it unplugged; this is a new one
            self.spawn(self._discard(kept[1], kept[2]))
        driver = cls(config, _Host(self, config.id))
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"device-{sanitise_id(config.id)}")
        failure = ""
        try:
            info, tree = await asyncio.wait_for(self._start(config, driver, executor), DEVICE_START_TIMEOUT)
        except (StillError, TimeoutError) as e:
            failure = e.message if isinstance(e, StillError) else \
                f"its {cls.name} driver did not initialise within {DEVICE_START_TIMEOUT:g} s"
            log.error("device failed", device=config.id, driver=cls.name, reason=failure)
            entry.status, entry.reason = "failed", failure
            if isinstance(e.__cause__, Busy) or isinstance(e, Busy):
                # Another program has it (gvfs holding a camera's interface): try again
                # now and then, so the device comes up once that program lets go.
                self._retry_later(candidate)
            if present is not None and present.failure:  # it failed again: say why, in place
                self.spawn(self._discard(driver, executor))
                present.failure = failure
                self.changed(present, ["StateReason"])
                return
            info, tree = _placeholder_info(candidate, config), None
        if present is not None:
            await self.remove_device(present.id)
        device = Device(self, config, driver, info, executor, failure=failure)
        if tree is not None:
            device.adopt_tree(tree)
            self._busy_retries.pop(candidate.id, None)
        self._register(device)

    def _retry_later(self, candidate: Candidate) -> None:
        attempt = self._busy_retries.get(candidate.id, 0)
        self._busy_retries[candidate.id] = attempt + 1
        delay = min(BUSY_RETRY_FIRST * 2 ** attempt, BUSY_RETRY_MAX)

        async def retry() -> None:
            await asyncio.sleep(delay)
            entry = self.candidates.get(candidate.id)
            if entry is not None and entry.status == "failed" and entry.candidate is candidate:
                log.info("trying a device again that another program had", candidate=candidate.id)
                await self.found(candidate)

        self.spawn(retry())

    async def lost(self, candidate_id: str) -> None:
        self._busy_retries.pop(candidate_id, None)
        entry = self.candidates.pop(candidate_id, None)
        if entry is not None and entry.device_id:
            await self.remove_device(entry.device_id)
            kept = self.unplugged.pop(entry.device_id, None)  # its driver had reported it unplugged
            if kept is not None:
                await self._discard(kept[1], kept[2])

    def candidate_report(self) -> list[CandidateEntry]:
        """Every device the backends reported, with the driver it matched and what
        became of it: the first thing to look at when a device does not show up."""
        return sorted(self.candidates.values(), key=lambda e: (e.candidate.subsystem, e.candidate.id))

    def _unmatched_reason(self, candidate: Candidate) -> str:
        if candidate.driver:
            return (f"no driver named {quote(candidate.driver)} is installed "
                    f"(installed: {', '.join(sorted(self.drivers))})")
        return "no installed driver matches it"

    def _check_id(self, device_id: str, present: Device | None) -> None:
        """Refuse an id another device has or is being started with (``present``,
        the device a candidate replaces, keeps its own)."""
        if present is not None and device_id == present.id:
            return
        element = sanitise_id(device_id)
        if any(sanitise_id(other) == element for other in (*self.devices, *self._starting)):
            raise InvalidArgument(f"device id {quote(device_id)} (or its object path) is taken by another device")

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
        """Start a device with ``config`` (its driver made from the installed ones
        unless given) and add it; raises when the id is taken or the driver fails."""
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
        try:
            info, tree = await self._start(config, driver, executor)
        except Failed as e:
            log.error("device failed", device=config.id, driver=config.driver, reason=e.message)
            if config.id not in self.unplugged:  # a driver kept for replugging keeps its worker
                executor.shutdown(wait=False)
            raise
        device = Device(self, config, driver, info, executor)
        device.adopt_tree(tree)
        self._register(device)
        return device

    @staticmethod
    async def _start(config: DeviceConfig, driver: Minidriver,
                      executor: ThreadPoolExecutor) -> tuple[DeviceInfo, DriverItem]:
        """Initialise the driver and build its item tree, on the device's worker."""
        loop = asyncio.get_running_loop()
        step = "initialise the device"
        try:
            info = await loop.run_in_executor(executor, driver.initialize, config.port, Mode.STATUS)
            step = "build its item tree"
            tree = await loop.run_in_executor(executor, driver.build_item_tree)
        except Exception as e:
            raise Failed(f"the {config.driver} driver could not {step}: {e or type(e).__name__}") from e
        return info, tree

    @staticmethod
    async def _discard(driver: Minidriver, executor: ThreadPoolExecutor) -> None:
        """Let a driver that is not used after all close what it opened."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(executor, driver.shutdown), DEVICE_STOP_TIMEOUT)
        except Exception as e:
            log.debug("discarded driver did not shut down cleanly", driver=driver.name, error=str(e) or type(e).__name__)
        executor.shutdown(wait=False)

    def _register(self, device: Device) -> None:
        self.generations[device.id] = device.generation = self.generations.get(device.id, 0) + 1
        self.devices[device.id] = device
        self.unplugged.pop(device.id, None)
        if device.failure:
            device.log.info("failed device added", driver=device.driver.name, reason=device.failure)
        else:
            device.log.info("device added", driver=device.driver.name, name=device.info.name,
                            generation=device.generation)
        self.notify("device_added", device)
        for event in self._early_changes.pop(device.id, ()):
            self.tree_changed_by_driver(device.id, event)

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
                await asyncio.wait_for(device.call(device.driver.shutdown), DEVICE_STOP_TIMEOUT)
            except TimeoutError:
                device.log.warning("driver did not shut down in time", timeout_s=DEVICE_STOP_TIMEOUT)
            except Exception as e:
                device.log.warning("driver shutdown failed", error=str(e))
            device.executor.shutdown(wait=False)

    def unplugged_by_driver(self, device_id: str) -> None:
        self.spawn(self.remove_device(device_id, keep_driver=True))

    def replugged_by_driver(self, device_id: str) -> None:
        self.spawn(self.replug(device_id))

    def failed_by_driver(self, device_id: str, reason: str) -> None:
        """A working device's driver lost it (its backend crashed, say): the device is
        shown failed with ``reason``, and brought back through the driver's
        ``recover()``, tried again with growing waits until it works."""
        device = self.devices.get(device_id)
        if device is None or device.disconnected:
            return
        if device.failure != reason:
            device.failure = reason
            device.log.error("device failed", reason=reason)
            self.changed(device, ["StateReason"])
        if device.recovery is None or device.recovery.done():
            device.recovery = self.spawn(self._recover(device))

    def tree_changed_by_driver(self, device_id: str, event: DeviceEvent | None) -> None:
        """The driver's items changed by themselves: rebuild the tree, then route ``event``.
        Changes are applied one after another, in the order the driver reported them."""
        device = self.devices.get(device_id)
        if device is None and device_id in self._starting:
            # Still being brought up (a driver listing in the background): once the
            # device is added, its tree is brought up to date and the events routed.
            self._early_changes.setdefault(device_id, []).append(event)
            return
        if device is None or device.disconnected:
            return

        async def refresh() -> None:
            try:
                await device.refresh_tree()
            except StillError as e:
                device.log.warning("could not rebuild the item tree", error=e.message)
            if event is not None and not device.disconnected:
                self.driver_event(device_id, event)

        self._in_order(device, refresh)

    def event_by_driver(self, device_id: str, event: DeviceEvent) -> None:
        """A driver's event, routed in the order the driver reported it: after the tree
        changes it reported before (a camera's ObjectAdded, then its CaptureComplete)."""
        device = self.devices.get(device_id)
        if device is None or device.reported is None or device.reported.done():
            self.driver_event(device_id, event)
            return

        async def route() -> None:
            if not device.disconnected:
                self.driver_event(device_id, event)

        self._in_order(device, route)

    def _in_order(self, device: Device, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` once what the driver reported before it is done."""
        previous = device.reported

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await step()

        device.reported = self.spawn(run())

    def _recovered(self, device: Device) -> None:
        device.log.info("device recovered", was=device.failure)
        device.failure = ""
        self.changed(device, ["StateReason"])

    async def _recover(self, device: Device) -> None:
        delay = RECOVER_FIRST
        while device.failure and not device.disconnected and self.devices.get(device.id) is device:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECOVER_MAX)
            if not device.failure or device.disconnected:
                return
            try:
                await asyncio.wait_for(device.call(device.driver.recover), DEVICE_START_TIMEOUT)
            except NotSupported:
                device.log.info("the driver cannot recover the device by itself; it stays failed until it "
                                "changes or is plugged in again")
                return
            except asyncio.TimeoutError:
                device.log.warning("recovering the device timed out", timeout_s=DEVICE_START_TIMEOUT)
            except Exception as e:
                device.log.warning("recovering the device failed", error=str(e) or type(e).__name__,
                                   retry_in_s=delay)
            else:
                if device.failure and not device.disconnected:
                    self._recovered(device)
                return

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
        for device in earlier:
            report += [{**entry, "present": False, "generation": device.generation} for entry in device.item_report()]
        present = self.devices.get(device_id)
        if present is not None:
            report += [{**entry, "present": True, "generation": present.generation}
                       for entry in present.item_report()]
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
            await self.close_session(session, why="the client left")

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
            except Exception as e:  # the other backends, and the service, go on without it
                log.error("discovery backend failed to start", backend=backend.name, error=str(e) or type(e).__name__)
                log.debug("discovery backend failure", backend=backend.name, exc_info=e)

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
