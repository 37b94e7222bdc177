"""Devices and the device manager: the core of the service, with no D-Bus in it.

A :class:`Device` wraps one minidriver instance. It owns the two arbiters of the
access model — data mode (one session) and the short-term device lock (FIFO,
timeouts, maximum hold) — the advisory lock file that programs outside the service
take part through, and a single worker thread that runs every blocking driver
call, so the event loop never waits on a device and one device's slow driver never
holds up another's.

The lock file is the service's claim on the device towards other programs. The
service holds it whenever anyone inside holds the device: for the whole life of
a data-mode session (so that between a scan application's calls no other program
can take the device) and for every hold of the device lock. When another program
holds it, the service waits for it like for any holder — up to the caller's
timeout, retrying the file, never blocking the loop — and shows the device as
``held-by-program``; the event monitor then launches nothing.

The :class:`DeviceManager` keeps the devices and sessions, applies the limits, and
tells its listeners (the D-Bus layer, the event monitor) what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from stillsvc.common.errors import (
    AccessDenied,
    Busy,
    Cancelled,
    Disconnected,
    Failed,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    StillError,
    Timeout,
    quote,
)
from stillsvc.common.limits import MAX_IO_BYTES, MAX_WAIT_MS
from stillsvc.common.names import sanitise_id
from stillsvc.core.config import Config, DeviceConfig
from stillsvc.core.items import (
    AppItem,
    attach_new_items,
    build_app_tree,
    check_dependent,
    check_writes,
    describe_property,
    synchronize_tree,
)
from stillsvc.core.lockfile import DeviceLockFile
from stillsvc.core.locks import FairLock
from stillsvc.core.sessions import Client, EventRecord, Hold, Session
from stillsvc.driver import Candidate, DeviceEvent, DeviceInfo, Minidriver, Mode, match
from stillsvc.driver.items import DriverItem

if TYPE_CHECKING:
    from stillsvc.discovery import Backend

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: How long a driver may take to initialise at start before the service goes on without it.
DEVICE_START_TIMEOUT = 15.0
#: Retrying a lock file another program holds: the first delay, doubling up to the last (seconds).
LOCKFILE_RETRY_FIRST = 0.005
LOCKFILE_RETRY_MAX = 0.05
#: How often a device found held by another program is looked at again, to show it ready.
OUTSIDE_RECHECK = 0.25


class Listener:
    """The core's one way of telling the outside what happened: the front-ends and
    the event monitor subclass it and override what they need (every method does
    nothing here). Called on the event loop; a listener that fails is logged and
    the others are still told."""

    def device_added(self, device: Device) -> None: ...
    def device_removed(self, device: Device) -> None: ...
    def device_changed(self, device: Device, names: list[str]) -> None: ...
    def session_closed(self, session: Session) -> None: ...
    def lock_revoked(self, session: Session) -> None: ...
    def event_queued(self, session: Session, record: EventRecord) -> None:
        """An event was queued for a session that subscribed (the holder of data mode)."""
    def event_routed(self, device: Device, record: EventRecord, consumer: str) -> None: ...
    def items_changed(self, device: Device) -> None: ...
    def client_gone(self, client: Client) -> None: ...


def _describe_owner(owner: Any) -> str:
    describe = getattr(owner, "describe", None)
    return describe() if callable(describe) else str(owner)


def _owner_alive(owner: Any) -> bool:
    """Sessions and holds say whether they (and their client) are still there."""
    return bool(getattr(owner, "alive", True))


def _owner_mode(owner: Any) -> Mode:
    """The mode a lock holder works in: its session's, status for the service's own."""
    return getattr(owner, "mode", Mode.STATUS)


class Device:
    """One device: its driver, its arbiters and its lock file."""

    def __init__(self, manager: DeviceManager, config: DeviceConfig, driver: Minidriver, info: DeviceInfo,
                 executor: ThreadPoolExecutor) -> None:
        self.manager = manager
        self.id = config.id
        self.config = config
        self.driver = driver
        self.info = info
        self.disconnected = False
        self.standing_back = False
        self.sessions: set[Session] = set()
        self.event_sequence = 0
        #: Events since the device appeared that reached no consumer (UndeliveredEvents).
        self.events_undelivered = 0
        self.log = log.bind(device=self.id)
        self.data_mode: FairLock[Session] = FairLock(
            f"device {self.id} in data mode", describe=_describe_owner,
            on_queue_changed=lambda: manager.changed(self, ["DataModeWaiters"]), alive=_owner_alive)
        self.device_lock: FairLock[Any] = FairLock(
            f"the device lock of {self.id}",
            max_hold=manager.config.limits.lock_max_hold_ms / 1000,
            on_expired=self._lock_expired,
            describe=_describe_owner,
            on_queue_changed=lambda: manager.changed(self, ["LockWaiters"]),
            alive=_owner_alive,
        )
        self.lockfile = DeviceLockFile(manager.config.runtime_dir, self.id)
        self.lockfile.create()
        #: Another program was last found holding the lock file (State held-by-program).
        self.held_outside = False
        self._outside_watch: asyncio.Task[None] | None = None
        #: The device-lock holder whose driver.lock() has completed (unlock undoes it).
        self._locked_for: Any = None
        #: The holder whose lock() is still being set up (lock file, driver.lock()),
        #: with a future that is done when that setup has finished or been undone.
        self._setup: tuple[Any, asyncio.Future[None]] | None = None
        #: A holder that was let go of while its setup ran: the setup undoes itself.
        self._abandoned: Any = None
        #: The driver item tree (root = the device), and every driver item that is
        #: still alive: in the tree, or out of it but linked by application items.
        self.tree: DriverItem | None = None
        self.live_items: list[DriverItem] = []
        #: The device's one worker thread: every blocking driver call runs here.
        self.executor = executor

    # -- what clients see -------------------------------------------------------
    @property
    def state(self) -> str:
        if self.disconnected:
            return "disconnected"
        if self.standing_back or self.held_outside:
            return "held-by-program"
        return "ready"

    @property
    def data_holder(self) -> Session | None:
        return self.data_mode.holder

    # -- running driver calls ---------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking driver call on this device's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)

    def check_usable(self) -> None:
        if self.disconnected:
            raise Disconnected(f"device {self.id} has been disconnected")
        if self.standing_back:
            raise Busy(f"device {self.id} is held by another program")

    async def io(self, session: Session | None, fn: Callable[..., T], *args: Any, why: str = "I/O") -> T:
        """Run ``fn`` under the device lock: the session's own hold if it has one,
        otherwise a hold the service takes (waiting in line) for this call alone."""
        self.check_usable()
        if session is not None and self.device_lock.holder is session:
            return await self.run_driver(fn, *args)
        owner = Hold(why, session)
        await self.lock(owner, self.manager.config.limits.io_wait_ms / 1000)
        try:
            return await self.run_driver(fn, *args)
        finally:
            await self.unlock(owner)

    async def run_driver(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self.call(fn, *args)
        except StillError:
            raise
        except Exception as e:
            # A driver bug must not reach the client as a traceback, nor stop the service.
            self.log.error("driver call failed", call=getattr(fn, "__name__", str(fn)), exc_info=e)
            raise Failed(f"the {self.driver.name} driver failed: {type(e).__name__}") from e

    # -- the device lock ----------------------------------------------------------
    async def lock(self, owner: Any, timeout: float, limited: bool = True) -> None:
        """Take the device lock for ``owner``, waiting in line (and then for another
        program holding the lock file) up to ``timeout`` seconds in all."""
        self.check_usable()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.device_lock.acquire(owner, timeout, limited)
        # Until the setup is done, letting go of this hold (unlock, the session
        # closing) only marks it abandoned: the setup undoes its own driver.lock()
        # and only then passes the lock on, so the next holder's driver.lock()
        # can never run before this one's driver.unlock().
        done: asyncio.Future[None] = loop.create_future()
        self._setup = (owner, done)

        def wanted() -> bool:
            return self._abandoned is not owner and _owner_alive(owner)

        driver_locked = False
        try:
            self.check_usable()
            await self.take_lockfile(wanted, deadline, timeout)
            self.check_usable()
            if not wanted():
                raise Cancelled(f"the device lock of {self.id} was given up while it was being taken")
            await self.run_driver(self.driver.lock, _owner_mode(owner))
            driver_locked = True
            if not wanted():
                raise Cancelled(f"the device lock of {self.id} was given up while it was being taken")
            self._locked_for = owner
        except BaseException:
            if driver_locked and not self.disconnected:
                with contextlib.suppress(StillError):
                    await self.run_driver(self.driver.unlock)
            if self.device_lock.holder is owner:
                self.device_lock.release(owner)
            self.settle_lockfile()
            raise
        finally:
            self._setup = None
            if self._abandoned is owner:
                self._abandoned = None
            done.set_result(None)

    async def unlock(self, owner: Any) -> None:
        if self.device_lock.holder is not owner:
            raise Failed(f"the device lock of {self.id} is not held by this session")
        if self._setup is not None and self._setup[0] is owner:
            # Still being taken: the taking gives up, undoes what it did and lets go.
            self._abandoned = owner
            await asyncio.shield(self._setup[1])
            return
        locked = self._locked_for is owner
        if locked:
            self._locked_for = None
        try:
            if locked and not self.disconnected:
                await self.run_driver(self.driver.unlock)
        except StillError as e:
            self.log.warning("driver unlock failed", error=e.message)
        finally:
            if self.device_lock.holder is owner:
                self.device_lock.release(owner)
            self.settle_lockfile()

    def _lock_expired(self, owner: Any) -> None:
        self.manager.spawn(self._revoke(owner))

    async def _revoke(self, owner: Any) -> None:
        """The hold time ran out. A holder whose transfer is still moving data keeps
        the lock (a feeder job may take minutes); otherwise its jobs are
        stopped first — they occupy the worker thread that must run the unlock —
        and the lock is taken away."""
        if self.device_lock.holder is not owner:
            return
        max_hold = self.manager.limits.lock_max_hold_ms
        jobs = list(getattr(owner, "jobs", ()))
        if any(job.progressed_within(max_hold / 1000) for job in jobs):
            self.log.debug("device lock hold extended: a transfer is making progress", holder=_describe_owner(owner))
            self.device_lock.extend(owner)
            return
        self.log.warning("device lock held too long, revoking", holder=_describe_owner(owner), max_hold_ms=max_hold)
        for job in jobs:
            job.stop(f"the device lock was held longer than {max_hold} ms", Timeout)
        for job in jobs:
            await job.finished.wait()
        if self.device_lock.holder is owner:
            await self.unlock(owner)
        if isinstance(owner, Session):
            self.manager.notify("lock_revoked", owner)

    # -- the lock file ------------------------------------------------------------
    async def take_lockfile(self, wanted: Callable[[], bool], deadline: float, timeout: float) -> None:
        """Hold the lock file (at once if the service already does), waiting for another
        program that holds it until ``deadline`` (loop time) — as long as ``wanted()``
        stays true. ``timeout`` 0 means no waiting: Busy at once."""
        if self.lockfile.try_take():
            self._held_outside(False)
            return
        self._held_outside(True)
        loop = asyncio.get_running_loop()
        delay = LOCKFILE_RETRY_FIRST
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                where = f"it is held by another program (lock file {self.lockfile.path})"
                if timeout <= 0:
                    raise Busy(f"device {self.id} is held by another program (lock file {self.lockfile.path})")
                raise Timeout(f"gave up waiting for device {self.id} after {timeout * 1000:.0f} ms: {where}")
            await asyncio.sleep(min(delay, remaining))
            if not wanted() or self.disconnected:
                raise Cancelled(f"stopped waiting for the lock file of {self.id}")
            if self.lockfile.try_take():
                self._held_outside(False)
                return
            delay = min(delay * 2, LOCKFILE_RETRY_MAX)

    def settle_lockfile(self) -> None:
        """Let the lock file go once nobody in the service holds the device."""
        if self.data_mode.holder is None and self.device_lock.holder is None:
            self.lockfile.release()

    def held_by_program(self) -> bool:
        """Whether another program has the device right now (looked at, not assumed)."""
        if self.standing_back:
            return True
        elsewhere = self.lockfile.held_elsewhere()
        self._held_outside(elsewhere)
        return elsewhere

    def _held_outside(self, held: bool) -> None:
        if held == self.held_outside:
            return
        self.held_outside = held
        if held:
            self.log.info("device held by another program", lock_file=str(self.lockfile.path))
            if self._outside_watch is None or self._outside_watch.done():
                self._outside_watch = self.manager.spawn(self._watch_outside())
        else:
            self.log.info("the other program has let go of the device")
        self.manager.changed(self, ["State"])

    async def _watch_outside(self) -> None:
        """While another program holds the lock file, look again now and then, so that
        State shows the device ready soon after it lets go."""
        while self.held_outside and not self.disconnected:
            await asyncio.sleep(OUTSIDE_RECHECK)
            if self.held_outside and not self.lockfile.held_elsewhere():
                self._held_outside(False)

    # -- handing the device to another program ---------------------------------
    async def hand_over(self, session: Session) -> int:
        """Stand back for a program outside the service: release the ports, stop
        monitoring, and return the locked lock-file descriptor for the client. The
        session keeps its copy until it closes; the service takes the device back
        when no copy is open any more (the client's, its command's, the session's)."""
        if not session.holds_data or not session.holds_lock:
            raise AccessDenied("handing the device over needs data mode and the device lock")
        self._locked_for = None
        await self.run_driver(self.driver.unlock)
        await self.run_driver(self.driver.release_port)
        fd = self.lockfile.hand_over()
        session.keep_fd(fd)
        self.standing_back = True
        self.device_lock.release(session)
        self.log.info("standing back for another program", session=session.number, client=session.client.name)
        loop = asyncio.get_running_loop()
        self.lockfile.watch_until_free(lambda: _call_soon(loop, self._spawn_take_back))
        self.manager.changed(self, ["State"])
        return fd

    def _spawn_take_back(self) -> None:
        self.manager.spawn(self._take_back())

    async def _take_back(self) -> None:
        if not self.standing_back:
            return
        try:
            if not self.disconnected:
                await self.run_driver(self.driver.reclaim_port)
        except StillError as e:
            self.log.error("could not reclaim the device's port", error=e.message)
        self.standing_back = False
        self.log.info("device is back from another program")
        self.manager.changed(self, ["State"])

    # -- the item tree ------------------------------------------------------------
    def adopt_tree(self, root: DriverItem) -> None:
        self.tree = root
        for item in root.walk():
            self._track(item)

    def _track(self, item: DriverItem) -> None:
        self.live_items.append(item)
        item.on_destroyed = self._item_destroyed

    def _item_destroyed(self, item: DriverItem) -> None:
        if item in self.live_items:
            self.live_items.remove(item)
        self.log.debug("driver item destroyed", item=item.path)

    def items_for(self, session: Session) -> AppItem | None:
        """The session's application items, made on first use: a session that never
        looks at items (a tray applet, the event monitor) costs none."""
        if session.root_item is None and not session.closed and self.tree is not None and not self.tree.removed:
            session.root_item = build_app_tree(self.tree)
        return session.root_item

    def item_report(self) -> list[dict[str, Any]]:
        """The diagnostic view: every live driver item with its reference count."""
        return [{"path": i.path, "kind": i.kind, "refcount": i.refcount, "removed": i.removed}
                for i in self.live_items]

    async def write_item_properties(self, app: AppItem, writes: dict[str, Any]) -> list[str]:
        """Validate ``writes`` with the minidriver and store them in the application
        item's own copy (no device I/O, no device lock; the driver's checks run on
        the worker thread like every driver call). Returns the names whose values
        changed."""
        app.check_device_access()
        driver = self.driver
        item, before = app.driver_item, dict(app.values)

        def validate() -> dict[str, Any]:
            checked = check_writes(app, writes, set(driver.valid_values(item, before)))
            result = driver.validate_properties(item, {**before, **checked}, set(checked), dict(before))
            check_dependent(result, driver.valid_values(item, result))
            return result

        result = await self.run_driver(validate)
        changed = [name for name in result if result[name] != app.values.get(name)]
        app.values = {name: result[name] for name in app.specs}
        return changed

    async def property_attributes(self, app: AppItem) -> dict[str, dict[str, Any]]:
        """Each property of ``app`` with its type, access and valid values now (some
        depend on other values: the driver says, on the worker thread)."""
        dynamic = await self.run_driver(self.driver.valid_values, app.driver_item, dict(app.values)) \
            if app.connected else {}
        return {name: describe_property(spec, dynamic.get(name, spec.valid)) for name, spec in app.specs.items()}

    async def synchronize(self, session: Session | None) -> tuple[list[DriverItem], list[DriverItem]]:
        """Rebuild the driver tree from the device; removed items follow the tree rules."""
        if self.tree is None or self.tree.removed:
            raise Disconnected(f"device {self.id} has no item tree")
        root = self.tree

        mode = session.mode if session is not None else Mode.STATUS

        def rebuild() -> DriverItem:
            self.driver.command(root, "synchronize", mode)
            return self.driver.build_item_tree()

        fresh = await self.io(session, rebuild, why="synchronize")
        added, removed = synchronize_tree(root, fresh)
        for item in added:
            self._track(item)
        for s in list(self.sessions):
            if s.root_item is not None:
                attach_new_items(s.root_item, added)
        if added or removed:
            self.log.info("item tree synchronized", added=[i.path for i in added], removed=[i.path for i in removed])
            self.manager.notify("items_changed", self)
        return added, removed

    # -- device I/O for sessions ---------------------------------------------------
    async def lock_for(self, session: Session, timeout_ms: int) -> None:
        """A session's LockDevice: wait up to ``timeout_ms`` (at most MAX_WAIT_MS)."""
        await self.lock(session, wait_seconds(timeout_ms, "timeout_ms"))

    async def get_status(self, session: Session) -> dict[str, Any]:
        return await self.io(session, self.driver.get_status, session.mode, why="status")

    async def reset(self, session: Session) -> None:
        await self.io(session, self.driver.reset, why="reset")

    async def diagnostic(self, session: Session) -> dict[str, Any]:
        return await self.io(session, self.driver.diagnostic, why="diagnostic")

    async def escape(self, session: Session, code: int, data: bytes) -> bytes:
        check_io_size(len(data), "escape data")
        return await self.io(session, self.driver.escape, code, data, session.mode, why="escape")

    async def read_data(self, session: Session, size: int) -> bytes:
        session.require_data("raw data I/O")
        check_io_size(size, "size")
        return await self.io(session, self.driver.read_data, size, session.mode, why="raw read")

    async def write_data(self, session: Session, data: bytes) -> None:
        session.require_data("raw data I/O")
        check_io_size(len(data), "data")
        await self.io(session, self.driver.write_data, data, session.mode, why="raw write")

    async def read_command(self, session: Session, size: int) -> bytes:
        check_io_size(size, "size")
        return await self.io(session, self.driver.read_command, size, session.mode, why="raw command read")

    async def write_command(self, session: Session, data: bytes) -> None:
        check_io_size(len(data), "data")
        await self.io(session, self.driver.write_command, data, session.mode, why="raw command write")

    # -- events -----------------------------------------------------------------
    def undelivered(self, count: int, why: str, level: str = "warning", **context: Any) -> None:
        """Count events that reached no consumer; never silently: each is logged here."""
        if count <= 0:
            return
        self.events_undelivered += count
        getattr(self.log, level)("event undelivered" if count == 1 else "events undelivered", count=count,
                                 **context, reason=why, undelivered_total=self.events_undelivered)
        self.manager.changed(self, ["UndeliveredEvents"])

    def record_event(self, event: DeviceEvent) -> EventRecord:
        self.event_sequence += 1
        when = event.time if event.time is not None else time.time()
        return EventRecord(self.id, event.name, self.event_sequence, when, dict(event.data))


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
        self.launcher: Callable[[Device, EventRecord], str | Awaitable[str]] | None = None
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
        try:
            info = await loop.run_in_executor(executor, driver.initialize, config.port, Mode.STATUS)
        except Exception as e:
            log.error("device failed to initialise", device=config.id, driver=config.driver, error=str(e))
            if config.id not in self.unplugged:
                executor.shutdown(wait=False)
            raise Failed(f"device {config.id} failed to initialise: {e}") from e
        device = Device(self, config, driver, info, executor)
        try:
            device.adopt_tree(await loop.run_in_executor(executor, driver.build_item_tree))
        except Exception as e:
            device.log.error("driver could not build its item tree", error=str(e))
            if config.id not in self.unplugged:
                executor.shutdown(wait=False)
            raise Failed(f"device {config.id} failed to build its item tree: {e}") from e
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
        device.disconnected = True
        if device._outside_watch is not None:
            device._outside_watch.cancel()
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
        device.undelivered(session.drop_queue(), f"left in the queue of a session that {why}",
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
        self.spawn(self.client_vanished(client.name))

    async def client_vanished(self, client_name: str) -> None:
        """Close everything the client named ``client_name`` had, at once."""
        for session in self.sessions_of(client_name):
            await self.close_session(session, why="client left the bus")
        for device in list(self.devices.values()):
            for fair in (device.data_mode, device.device_lock):
                for waiter in fair.waiting:
                    client = _client_of(waiter)
                    if client is not None and client.name == client_name:
                        fair.discard(waiter)

    # -- events -----------------------------------------------------------------
    def driver_event(self, device_id: str, event: DeviceEvent) -> None:
        """A driver reported ``event`` (on the loop): route it to exactly one consumer."""
        device = self.devices.get(device_id)
        if device is None:
            log.warning("event from a device that is gone", device=device_id, event_name=event.name)
            return
        record = device.record_event(event)
        consumer = self.route(device, record)
        if isinstance(consumer, str):
            self.notify("event_routed", device, record, consumer)
        else:
            self.spawn(self._routed_later(device, record, consumer))

    async def _routed_later(self, device: Device, record: EventRecord, consumer: Awaitable[str]) -> None:
        self.notify("event_routed", device, record, await consumer)

    def route(self, device: Device, record: EventRecord) -> str | Awaitable[str]:
        """Deliver ``record`` to exactly one consumer; returns who took it (or, when
        the launcher must ask someone first, an awaitable that does)."""
        holder = device.data_holder
        if holder is not None and holder in device.sessions and not device.standing_back:
            dropped = holder.queue_event(record)
            if holder.subscribed:
                self.notify("event_queued", holder, record)
            device.undelivered(dropped, "event queue full, dropped the oldest", session=holder.number,
                               client=holder.client.name, dropped=holder.events_dropped)
            return f"queue: session {holder.number} ({holder.client.name})"
        if device.held_by_program():
            device.undelivered(1, "the device is held by another program", level="info",
                               event_name=record.name, sequence=record.sequence)
            return "none: held by another program"
        if self.launcher is not None:
            return self.launcher(device, record)
        device.undelivered(1, "no application registered", level="info", event_name=record.name,
                           sequence=record.sequence)
        return "none: no application registered"

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


def wait_seconds(ms: int, what: str) -> float:
    """A client's wait in milliseconds, checked against the one limit, in seconds."""
    if not 0 <= ms <= MAX_WAIT_MS:
        raise InvalidArgument(f"{what} must be between 0 and {MAX_WAIT_MS}")
    return ms / 1000


def check_io_size(size: int, what: str) -> None:
    if size > MAX_IO_BYTES:
        raise InvalidArgument(f"{what} is limited to {MAX_IO_BYTES} bytes")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """From another thread: run ``fn`` on ``loop``, unless the loop has ended."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the service stopped while the other program held the device
        pass


def _client_of(owner: Any) -> Client | None:
    """The client a lock owner (a session, or a hold for one) works for."""
    session = owner if isinstance(owner, Session) else getattr(owner, "session", None)
    return session.client if isinstance(session, Session) else None


__all__ = ["Device", "DeviceManager", "Listener"]
