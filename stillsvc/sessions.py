"""Clients and sessions: a session is one client's open device.

A session belongs to the client (the D-Bus connection) that created it. It holds
status mode, data mode or both; data mode and the device lock are claimed through
the device's :class:`~stillsvc.locks.FairLock` objects, so that closing the session
— or the client vanishing — releases everything at once.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .driver import Mode
from .errors import AccessDenied, Disconnected, NotFound

if TYPE_CHECKING:
    from .devices import Device
    from .items import AppItem


@dataclass(frozen=True)
class Client:
    """Who is on the other end. ``name`` is the D-Bus unique name (or an internal label)."""

    name: str
    uid: int | None = None
    pid: int | None = None
    command: str | None = None
    internal: bool = False

    def describe(self) -> str:
        details = []
        if self.pid is not None:
            details.append(f"pid {self.pid}")
        if self.command:
            details.append(self.command)
        return f"{self.name} ({', '.join(details)})" if details else self.name


@dataclass(frozen=True)
class EventRecord:
    """One device event as the service routes it."""

    device_id: str
    name: str
    sequence: int
    timestamp: float
    data: dict[str, Any] = field(default_factory=dict)


_numbers = itertools.count(1)


class Session:
    def __init__(self, device: Device, client: Client, mode: Mode, queue_length: int) -> None:
        self.number = next(_numbers)
        self.device = device
        self.device_id = device.id
        self.client = client
        self.mode = mode
        self.created = time.monotonic()
        self.closed = False
        self.subscribed = False
        self.events: deque[EventRecord] = deque()
        self.queue_length = queue_length
        self.events_dropped = 0
        #: Set by the D-Bus layer (or a test): called when the lock was revoked,
        #: and for each queued event while subscribed.
        self.on_lock_revoked: list = []
        self.on_event: list = []
        self.on_closed: list = []
        self._fds: list[int] = []
        #: The session's own application items (root = the device), if the device has a tree.
        self.root_item: AppItem | None = None
        #: Transfers running for this session (stillsvc.transfer.Transfer).
        self.transfers: set[Any] = set()

    def __repr__(self) -> str:
        return f"<Session {self.number} {self.device_id} {self.mode.label} {self.client.name}>"

    def describe(self) -> str:
        return f"session {self.number} of {self.client.describe()}"

    def find_item(self, path: str) -> AppItem:
        for item in self.root_item.walk() if self.root_item else ():
            if item.path == path:
                return item
        raise NotFound(f"session {self.number} has no item {path!r}")

    # -- ownership and state ---------------------------------------------------
    def check_owner(self, caller: str | None) -> None:
        if caller != self.client.name:
            raise AccessDenied(f"session {self.number} belongs to another client")

    def check_open(self) -> None:
        if self.closed:
            raise NotFound(f"session {self.number} is closed")
        if self.device.disconnected:
            raise Disconnected(f"device {self.device_id} has been disconnected")

    @property
    def holds_data(self) -> bool:
        return self.device.data_mode.holder is self

    @property
    def holds_lock(self) -> bool:
        return self.device.device_lock.holder is self

    def keep_fd(self, fd: int) -> None:
        """Hold ``fd`` open for as long as the session lives."""
        self._fds.append(fd)

    def release_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- events -----------------------------------------------------------------
    def queue_event(self, record: EventRecord) -> int:
        """Append to the bounded queue; returns how many were dropped to make room."""
        dropped = 0
        while len(self.events) >= self.queue_length:
            self.events.popleft()
            dropped += 1
        self.events_dropped += dropped
        self.events.append(record)
        if self.subscribed:
            for callback in self.on_event:
                callback(self, record)
        return dropped

    def next_event(self) -> EventRecord:
        if not self.events:
            raise NotFound(f"no event is queued for session {self.number}")
        return self.events.popleft()
