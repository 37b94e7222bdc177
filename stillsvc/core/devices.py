"""A device: one minidriver instance and the arbiters of its access model.

A :class:`Device` owns the two arbiters — data mode (one session) and the
short-term device lock (FIFO, timeouts, maximum hold) — the advisory lock file
that programs outside the service take part through, and a single worker thread
that runs every blocking driver call, so the event loop never waits on a device
and one device's slow driver never holds up another's.

The lock file is the service's claim on the device towards other programs. The
service holds it whenever anyone inside holds the device: for the whole life of
a data-mode session (so that between a scan application's calls no other program
can take the device) and for every hold of the device lock. When another program
holds it, the service waits for it like for any holder — up to the caller's
timeout, retrying the file, never blocking the loop — and shows the device as
``held-by-program``; the event monitor then launches nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
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
    StillError,
    Timeout,
)
from stillsvc.common.limits import MAX_IO_BYTES, MAX_WAIT_MS
from stillsvc.core.config import DeviceConfig
from stillsvc.core.items import (
    AppItem,
    attach_new_items,
    build_app_tree,
    check_dependent,
    check_writes,
    describe_property,
    refresh_read_only,
    synchronize_tree,
)
from stillsvc.core.lockfile import DeviceLockFile
from stillsvc.core.locks import FairLock
from stillsvc.core.sessions import EventRecord, Hold, Session
from stillsvc.driver import DeviceEvent, DeviceInfo, Minidriver, Mode
from stillsvc.driver.items import DriverItem

if TYPE_CHECKING:
    from stillsvc.core.manager import DeviceManager

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Retrying a lock file another program holds: the first delay, doubling up to the last (seconds).
LOCKFILE_RETRY_FIRST = 0.005
LOCKFILE_RETRY_MAX = 0.05
#: How often a device found held by another program is looked at again, to show it ready.
OUTSIDE_RECHECK = 0.25


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
                 executor: ThreadPoolExecutor, failure: str = "") -> None:
        self.manager = manager
        self.id = config.id
        self.config = config
        self.driver = driver
        self.info = info
        #: Why the driver could not start the device (State failed); empty when it did.
        #: A failed device has no item tree and refuses every use with Failed.
        self.failure = failure
        #: How many times a device with this id has appeared since the service started.
        self.generation = 1
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
        #: Bringing a device back whose driver reported it failed (DeviceManager.recover).
        self.recovery: asyncio.Task[None] | None = None
        #: The last of what the driver reported by itself (tree changes, events), which
        #: the manager applies one after another (DeviceManager._in_order).
        self.reported: asyncio.Task[None] | None = None

    # -- what clients see -------------------------------------------------------
    @property
    def state(self) -> str:
        if self.disconnected:
            return "disconnected"
        if self.failure:
            return "failed"
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

    def mark_disconnected(self) -> None:
        """The device has gone: every use of it fails with Disconnected from now on."""
        self.disconnected = True
        for task in (self._outside_watch, self.recovery):
            if task is not None:
                task.cancel()

    def check_usable(self) -> None:
        if self.disconnected:
            raise Disconnected(f"device {self.id} has been disconnected")
        if self.failure:
            raise Failed(f"device {self.id} failed: {self.failure}")
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
    async def lock(self, owner: Any, timeout: float, limited: bool = True, driver_lock: bool = True) -> None:
        """Take the device lock for ``owner``, waiting in line (and then for another
        program holding the lock file) up to ``timeout`` seconds in all. Without
        ``driver_lock`` the driver's lock()/unlock() are left to the holder, which
        calls them itself on the worker thread (the event poller: one hop a poll)."""
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

        def still_wanted() -> None:
            if not wanted():
                raise Cancelled(f"the device lock of {self.id} was given up while it was being taken")

        driver_locked = False
        try:
            self.check_usable()
            await self.take_lockfile(wanted, deadline, timeout)
            self.check_usable()
            still_wanted()
            if driver_lock:
                await self.run_driver(self.driver.lock, _owner_mode(owner))
                driver_locked = True
                still_wanted()
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
                held = f"held by another program (lock file {self.lockfile.path})"
                if timeout <= 0:
                    raise Busy(f"device {self.id} is {held}")
                raise Timeout(f"gave up waiting for device {self.id} after {timeout * 1000:.0f} ms: it is {held}")
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
        if not self.disconnected and not self.failure and not self.standing_back:
            # The other program may want the device itself (a scanner's USB interface,
            # an open SANE handle): the driver lets go of its ports while it holds
            # the lock file, and takes them back after. Queued on the worker thread
            # now, so they run in order with the driver.lock() of whoever waits.
            self._driver_soon(self.driver.release_port if held else self.driver.reclaim_port)
        self.manager.changed(self, ["State"])

    def _driver_soon(self, fn: Callable[[], Any]) -> None:
        """Queue a driver call on the worker thread at once; its failure is logged."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None:
                self.log.warning("driver call failed", call=getattr(fn, "__name__", str(fn)),
                                 error=str(f.exception()))

        future.add_done_callback(done)

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
        driver, item, values = self.driver, app.driver_item, dict(app.values)

        def ask() -> tuple[dict[str, Any], set[str]]:
            return driver.valid_values(item, values), set(driver.inactive(item, values))

        dynamic, inactive = await self.run_driver(ask) if app.connected else ({}, set())
        return {name: describe_property(spec, dynamic.get(name, spec.valid), name in inactive)
                for name, spec in app.specs.items()}

    async def synchronize(self, session: Session | None) -> tuple[list[DriverItem], list[DriverItem]]:
        """Rebuild the driver tree from the device; removed items follow the tree rules."""
        if self.tree is None or self.tree.removed:
            raise Disconnected(f"device {self.id} has no item tree")
        root = self.tree

        mode = session.mode if session is not None else Mode.STATUS

        def rebuild() -> DriverItem:
            self.driver.command(root, "synchronize", mode)
            return self.driver.build_item_tree()

        return self._merge(root, await self.io(session, rebuild, why="synchronize"))

    async def refresh_tree(self) -> tuple[list[DriverItem], list[DriverItem]]:
        """Bring the tree in line with what the driver knows now (no device I/O:
        the driver changed its items by itself, see DriverHost.tree_changed)."""
        if self.tree is None or self.tree.removed:
            raise Disconnected(f"device {self.id} has no item tree")
        root = self.tree
        return self._merge(root, await self.run_driver(self.driver.build_item_tree))

    async def delete_item(self, session: Session, app: AppItem) -> None:
        """A session's Delete: the driver removes the item from the device (a camera's
        picture), then the tree follows (-1, the item marked dead)."""
        if app.driver_item is self.tree:
            raise InvalidArgument("the root item cannot be deleted")
        await self._command(session, app, "delete", "deleting an item")
        await self.refresh_tree()

    async def capture(self, session: Session, app: AppItem) -> None:
        """A session's Capture on a camera's root: the camera takes a picture (it
        arrives as a new-picture event, its item in the tree)."""
        if app.driver_item is not self.tree:
            raise InvalidArgument("Capture is a command of the device's root item")
        await self._command(session, app, "capture", "taking a picture")

    async def _command(self, session: Session, app: AppItem, command: str, what: str) -> None:
        """A device command on an item, for a session in data mode, under the device lock."""
        session.require_data(what)
        app.check_device_access()
        await self.io(session, self.driver.command, app.driver_item, command, session.mode, why=command)

    def _merge(self, root: DriverItem, fresh: DriverItem) -> tuple[list[DriverItem], list[DriverItem]]:
        updated: dict[DriverItem, set[str]] = {}
        added, removed = synchronize_tree(root, fresh, updated)
        for item in added:
            self._track(item)
        for s in list(self.sessions):
            if s.root_item is not None:
                refresh_read_only(s.root_item, updated)
                attach_new_items(s.root_item, added)
        if added or removed:
            self.log.info("item tree synchronized", added=len(added), removed=len(removed),
                          first_added=[i.path for i in added[:5]], first_removed=[i.path for i in removed[:5]])
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



__all__ = ["Device", "check_io_size", "wait_seconds"]
