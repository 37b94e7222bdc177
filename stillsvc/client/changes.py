"""Following the service: one ordered stream of what happens to it and its devices."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from dbus_fast import Message, MessageType

from stillsvc.client._dbus import (
    DBUS_NAME,
    OBJECT_MANAGER_IFACE,
    PROPERTIES_IFACE,
    match_rule,
)
from stillsvc.client.errors import (
    ClientError,
    ConnectionLost,
    ServiceNotRunning,
    not_running_text,
)
from stillsvc.client.records import (
    Change,
    EventRouted,
    InterfacesAdded,
    InterfacesRemoved,
    PropertiesChanged,
    ServiceStarted,
    ServiceStopped,
)
from stillsvc.client.values import plain
from stillsvc.common.errors import StillError
from stillsvc.common.names import BUS_NAME, DEVICES_PATH, MANAGER_IFACE, ROOT_PATH

if TYPE_CHECKING:
    from stillsvc.client.connection import Client


class Changes:
    """What happens to the service and its devices, in the order it happened.

    Made by :meth:`Manager.changes` (every device) or :meth:`Device.changes` (one
    device), used as ``async with ... as changes: async for change in changes:``.
    Records are :class:`ServiceStarted`, :class:`ServiceStopped`,
    :class:`InterfacesAdded`, :class:`InterfacesRemoved` (from the ObjectManager at
    the root path), :class:`PropertiesChanged` and, with ``events``,
    :class:`EventRouted`.

    One stream rather than one callback per signal, because the order is the
    information: a device's ``UndeliveredEvents`` changes before the event that
    nobody took is reported, and a device removed then added again must not come
    out the other way round. Only signals from the current owner of the service's
    name count, so another program on the bus cannot forge a device appearing.

    With ``events`` the connection is subscribed to ``EventRouted``
    (``Manager.WatchEvents``), and subscribed again whenever the service restarts.
    The iteration ends with :class:`ConnectionLost` when the connection does.
    """

    def __init__(self, client: Client, *, devices: str | None = DEVICES_PATH, events: bool = False) -> None:
        self._client = client
        #: DEVICES_PATH for every device, one device's path, or None for none
        self._scope = devices
        self._events = events
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._owner: str | None = None
        self._rules: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False

    async def __aenter__(self) -> Changes:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> Changes:
        return self

    async def __anext__(self) -> Change:
        return await self.next()

    async def start(self) -> None:
        """Subscribe; :class:`ServiceNotRunning` if the service is not on the bus now
        (there would be nothing to follow, and nobody to ask for a first snapshot)."""
        client = self._client
        client._add_handler(self._handle)
        self._started = True
        if self._scope is not None:
            self._rules.append(match_rule(type="signal", sender=BUS_NAME, path=ROOT_PATH,
                                          interface=OBJECT_MANAGER_IFACE))
            where = {"path_namespace": self._scope} if self._scope == DEVICES_PATH else {"path": self._scope}
            self._rules.append(match_rule(type="signal", sender=BUS_NAME, interface=PROPERTIES_IFACE,
                                          member="PropertiesChanged", **where))
        for rule in self._rules:
            await client._add_match(rule)
        owner = await client._get_owner()
        if owner is None:
            await self.close()
            raise ServiceNotRunning(not_running_text(client.bus))
        if self._owner is None:
            self._owner = owner
        if self._events:
            await client.manager._watch_events()

    async def close(self) -> None:
        """Unsubscribe (what is still queued is dropped)."""
        if not self._started:
            return
        self._started = False
        self._client._remove_handler(self._handle)
        for task in self._tasks:
            task.cancel()
        for rule in self._rules:
            await self._client._remove_match(rule)
        self._rules = []
        if self._events and self._client.connected and self._owner is not None:
            try:
                await self._client.manager._unwatch_events()
            except (ClientError, StillError):
                pass

    async def next(self, timeout: float | None = None) -> Change:
        """The next change; TimeoutError if none comes within ``timeout`` seconds
        (None: wait as long as it takes); :class:`ConnectionLost` once the connection
        has ended and nothing is left."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        if not self._client.connected:
            raise ConnectionLost(f"lost the connection to the {self._client.bus} bus")
        got = asyncio.ensure_future(self._queue.get())
        lost = asyncio.ensure_future(self._client.wait_closed())
        try:
            done, _ = await asyncio.wait({got, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not got.done():
                got.cancel()
        if got in done:
            return got.result()
        if lost in done:
            raise ConnectionLost(f"lost the connection to the {self._client.bus} bus")
        raise TimeoutError(f"no change within {timeout:g} s")

    # -- signals ------------------------------------------------------------------------
    def _put(self, change: Change) -> None:
        self._queue.put_nowait(change)

    def _in_scope(self, path: str) -> bool:
        if self._scope is None:
            return False
        if self._scope == DEVICES_PATH:
            return path.startswith(DEVICES_PATH + "/")
        return path == self._scope

    def _handle(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        try:
            if msg.sender == DBUS_NAME:
                if msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME:
                    self._owner_changed(msg.body[2])
                return
            if self._owner is None or msg.sender != self._owner:
                return
            if msg.interface == MANAGER_IFACE and msg.member == "EventRouted" and self._events:
                path, event, sequence, timestamp_us, consumer, data = msg.body
                if self._scope in (DEVICES_PATH, path):
                    self._put(EventRouted(path, event, sequence, timestamp_us, consumer, plain(data)))
            elif msg.interface == OBJECT_MANAGER_IFACE and msg.path == ROOT_PATH:
                path, interfaces = msg.body
                if not self._in_scope(path):
                    return
                if msg.member == "InterfacesAdded":
                    self._put(InterfacesAdded(path, {i: plain(p) for i, p in interfaces.items()}))
                elif msg.member == "InterfacesRemoved":
                    self._put(InterfacesRemoved(path, tuple(interfaces)))
            elif (msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged"
                  and self._in_scope(msg.path or "")):
                interface, changed, invalidated = msg.body
                self._put(PropertiesChanged(msg.path, interface, plain(changed), tuple(invalidated)))
        except (TypeError, ValueError, IndexError, AttributeError):
            return  # not the shape the service sends: not ours

    def _owner_changed(self, new_owner: str) -> None:
        if self._owner is not None and new_owner != self._owner:
            self._owner = None
            self._put(ServiceStopped())
        if new_owner and new_owner != self._owner:
            self._owner = new_owner
            self._put(ServiceStarted(new_owner))
            if self._events:
                # The new service knows nothing of our subscription.
                task = asyncio.ensure_future(self._rewatch())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _rewatch(self) -> None:
        try:
            await self._client.manager._watch_events()
        except (ClientError, StillError):
            pass  # gone again: ServiceStopped follows
