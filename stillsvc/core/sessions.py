"""Clients and sessions: a session is one client's open device.

A session belongs to the client (the D-Bus connection) that created it. It holds
status mode, data mode or both; data mode and the device lock are claimed through
the device's :class:`~stillsvc.core.locks.FairLock` objects, so that closing the session
— or the client vanishing — releases everything at once.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stillsvc.common.errors import AccessDenied, Disconnected, Empty, NotFound, quote
from stillsvc.driver import Mode

if TYPE_CHECKING:
    from stillsvc.core.devices import Device
    from stillsvc.core.items import AppItem
    from stillsvc.core.jobs import Job


@dataclass(eq=False)
class Client:
    """Who is on the other end, whichever front-end it came through.

    ``via`` names that front-end (``"dbus"``; ``""`` for the service's own
    clients, such as the event monitor) and ``name`` is unique among all clients:
    the D-Bus unique name, or a front-end's label for a network peer (say
    ``"saned:192.0.2.7:50123"``). Ownership of sessions, limits per client and
    the ``client`` in every log line work the same for every front-end.

    ``gone`` is set, once and for good, the moment the service learns that the
    client has left (its connection closed, the process killed). It is a state,
    not only an event: every grant — data mode, the device lock, a new session —
    checks it, so a call still in flight or a waiter served in the same instant
    can never leave anything held for a client that no longer exists.
    """

    name: str
    uid: int | None = None
    pid: int | None = None
    command: str | None = None
    internal: bool = False
    gone: bool = False
    via: str = ""

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
        self._fds: list[int] = []
        #: The session's own application items (root = the device), if the device has a tree.
        self.root_item: AppItem | None = None
        #: Jobs running for this session (stillsvc.core.jobs.Job).
        self.jobs: set[Job] = set()

    def __repr__(self) -> str:
        return f"<Session {self.number} {self.device_id} {self.mode.label} {self.client.name}>"

    def describe(self) -> str:
        return f"session {self.number} of {self.client.describe()}"

    def find_item(self, path: str) -> AppItem:
        for item in self.root_item.walk() if self.root_item else ():
            if item.path == path:
                return item
        raise NotFound(f"session {self.number} has no item {quote(path)}")

    # -- ownership and state ---------------------------------------------------
    @property
    def alive(self) -> bool:
        """Open, and its client still there: only then may it be granted anything."""
        return not self.closed and not self.client.gone

    def require_data(self, what: str) -> None:
        """Refuse ``what`` (a transfer, raw data I/O) to a session without data mode,
        before any locking or device I/O."""
        if not self.mode & Mode.DATA:
            raise AccessDenied(f"{what} needs a session opened in data mode; session {self.number} is status only")

    def subscribe(self, on: bool = True) -> None:
        """Ask to be told of queued events. Events go only to the data-mode holder
        (they are never broadcast), so a status-only session could never get one."""
        if on and not self.mode & Mode.DATA:
            raise AccessDenied(f"events are queued only for the session holding data mode; "
                               f"session {self.number} is status only")
        self.subscribed = on

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
        return dropped

    def drop_queue(self) -> int:
        """Empty the queue (the session is closing); returns how many were left unread."""
        left = len(self.events)
        self.events.clear()
        return left

    def next_event(self) -> EventRecord:
        if not self.events:
            raise Empty(f"no event is queued for session {self.number}")
        return self.events.popleft()


class Hold:
    """An owner of the device lock other than a session's own explicit hold: the
    service's hold around one I/O of a session (or of its own), a transfer's, the
    event monitor's poll. It is alive as long as the session it works for is."""

    def __init__(self, why: str, session: Session | None = None) -> None:
        self.why = why
        self.session = session

    @property
    def mode(self) -> Mode:
        return self.session.mode if self.session is not None else Mode.STATUS

    @property
    def alive(self) -> bool:
        return self.session is None or self.session.alive

    def describe(self) -> str:
        if self.session is None:
            return f"the service ({self.why})"
        return f"the service ({self.why} for {self.session.describe()})"
